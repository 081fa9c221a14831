//! Turning one row of logits into the next token: penalties, bias, temperature, top-k, top-p,
//! min-p, seeded draws, and logprobs. Pure functions plus a per-sequence RNG.

use candle_core::{DType, Tensor, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::borrow::Cow;
use std::collections::HashMap;

/// Sampling settings of one request (OpenAI's and vLLM's names and meanings).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 disables.
    pub top_p: f32,
    /// 0 disables.
    pub top_k: usize,
    /// Drop tokens whose probability is below `min_p` times the top one; 0 disables.
    pub min_p: f32,
    /// Subtracted once from every token already generated.
    pub presence_penalty: f32,
    /// Subtracted per occurrence in the generated tokens.
    pub frequency_penalty: f32,
    /// Hugging Face style, over prompt and generated tokens; 1 disables.
    pub repetition_penalty: f32,
    pub logit_bias: HashMap<u32, f32>,
    /// Same seed and same request give the same output.
    pub seed: Option<u64>,
    /// Alternatives to report with each token's logprob; `None` reports no logprobs.
    pub top_logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: HashMap::new(),
            seed: None,
            top_logprobs: None,
        }
    }
}

impl SamplingParams {
    /// Greedy with nothing that needs the whole row on the host: no penalties, no bias, no
    /// logprobs. Such a row's token can be chosen where the logits are (see [`first_argmax_rows`]).
    pub fn is_plain_greedy(&self) -> bool {
        self.temperature <= 0.0 && self.top_logprobs.is_none() && !self.changes_scores()
    }

    /// Whether penalties or a bias change the logits before the draw.
    fn changes_scores(&self) -> bool {
        self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || self.repetition_penalty != 1.0
            || !self.logit_bias.is_empty()
    }
}

/// The index of the first largest value of each row of `logits` (`[rows, vocab]`), computed
/// where the tensor lives so that only one id per row is copied back; `None` for a row with no
/// largest value (NaN). The first index among equal values, as [`argmax`] and torch choose:
/// bf16 logits tie often, and candle's own CUDA argmax does not promise which of them it picks.
pub fn first_argmax_rows(logits: &Tensor) -> candle_core::Result<Vec<Option<u32>>> {
    let (_, vocab) = logits.dims2()?;
    let best = logits.max_keepdim(D::Minus1)?;
    let is_best = logits.broadcast_eq(&best)?;
    let index = Tensor::arange(0u32, vocab as u32, logits.device())?.unsqueeze(0)?.broadcast_as(logits.shape())?;
    let beyond = Tensor::full(vocab as u32, logits.shape(), logits.device())?;
    let first = is_best.where_cond(&index, &beyond)?.min(D::Minus1)?.to_dtype(DType::U32)?;
    Ok(first.to_vec1::<u32>()?.into_iter().map(|i| (i < vocab as u32).then_some(i)).collect())
}

/// Most alternatives a request may ask for per token.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// The logprob of the chosen token and of the best alternatives (from the model's raw
/// distribution, before penalties and temperature).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// One sequence's sampler: its parameters and its random stream.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// `stream` separates the choices of one request (n > 1) that share a seed.
    pub fn new(params: SamplingParams, stream: u64) -> Self {
        let seed = params.seed.unwrap_or_else(rand::random).wrapping_add(stream.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        Sampler { params, rng: StdRng::seed_from_u64(seed) }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token. `prompt` and `generated` feed the penalties; `allowed` (bits,
    /// token `i` at bit `i % 32` of word `i / 32`) restricts the draw to a grammar's tokens.
    pub fn sample(
        &mut self,
        logits: &[f32],
        prompt: &[u32],
        generated: &[u32],
        allowed: Option<&[u32]>,
    ) -> (u32, Option<TokenLogprobs>) {
        // The row is copied only where something changes it (a vocabulary's row is 600 KB).
        let p = &self.params;
        let mut scores = Cow::Borrowed(logits);
        if allowed.is_some() || p.changes_scores() {
            let scores = scores.to_mut();
            if let Some(allowed) = allowed {
                mask_scores(scores, allowed);
            }
            apply_penalties(scores, p, prompt, generated);
            for (&id, &bias) in &p.logit_bias {
                if let Some(s) = scores.get_mut(id as usize) {
                    *s += bias;
                }
            }
        }
        let token = if self.params.temperature <= 0.0 {
            argmax(&scores)
        } else {
            let candidates = filtered_candidates(&scores, &self.params);
            let draw: f64 = self.rng.random();
            pick(&candidates, draw)
        };
        let logprobs = self.params.top_logprobs.map(|k| logprobs_of(logits, token, k.min(MAX_TOP_LOGPROBS)));
        (token, logprobs)
    }
}

/// Sets the score of every token whose bit is clear to minus infinity.
pub fn mask_scores(scores: &mut [f32], allowed: &[u32]) {
    for (w, chunk) in scores.chunks_mut(32).enumerate() {
        let bits = allowed.get(w).copied().unwrap_or(0);
        if bits == u32::MAX {
            continue;
        }
        for (j, s) in chunk.iter_mut().enumerate() {
            if bits & (1 << j) == 0 {
                *s = f32::NEG_INFINITY;
            }
        }
    }
}

pub fn argmax(scores: &[f32]) -> u32 {
    // The largest value first, in 16 independent lanes (a loop the compiler vectorizes; one
    // running best is a chain of dependent comparisons), then its first index. NaN is never
    // larger, so it is skipped; a row with no number at all gives 0.
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = scores.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (best, &s) in lanes.iter_mut().zip(chunk) {
            *best = if s > *best { s } else { *best };
        }
    }
    let largest = lanes.iter().chain(tail).fold(f32::NEG_INFINITY, |a, &s| if s > a { s } else { a });
    // The first stretch holding it (tested whole, as vectors), then its place there.
    let hit = |stretch: &[f32]| stretch.iter().fold(false, |hit, &s| hit | (s == largest));
    let Some(stretch) = scores.chunks(LANES).position(hit) else { return 0 };
    let first = scores[stretch * LANES..].iter().position(|&s| s == largest).expect("the stretch holds it");
    (stretch * LANES + first) as u32
}

/// Repetition penalty (HF: divide positive, multiply negative logits of seen tokens), then
/// OpenAI's presence and frequency penalties over the generated tokens.
pub fn apply_penalties(scores: &mut [f32], p: &SamplingParams, prompt: &[u32], generated: &[u32]) {
    if p.repetition_penalty != 1.0 {
        let mut seen = vec![false; scores.len()];
        for &id in prompt.iter().chain(generated) {
            if let Some(flag) = seen.get_mut(id as usize) {
                *flag = true;
            }
        }
        for (s, _) in scores.iter_mut().zip(&seen).filter(|(_, &seen)| seen) {
            *s = if *s > 0.0 { *s / p.repetition_penalty } else { *s * p.repetition_penalty };
        }
    }
    if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &id in generated {
            *counts.entry(id).or_default() += 1;
        }
        for (id, count) in counts {
            if let Some(s) = scores.get_mut(id as usize) {
                *s -= p.presence_penalty + p.frequency_penalty * count as f32;
            }
        }
    }
}

/// Tokens that survive temperature, top-k, top-p and min-p, with their probabilities: most
/// likely first when top-k or top-p cut the list, in token order otherwise (an exact draw
/// needs no order, and sorting a 152k vocabulary cost 2 ms per sequence and step).
pub fn filtered_candidates(scores: &[f32], p: &SamplingParams) -> Vec<(u32, f64)> {
    let t = p.temperature.max(1e-5) as f64;
    let mut order: Vec<u32> = (0..scores.len() as u32).filter(|&i| scores[i as usize].is_finite()).collect();
    if order.is_empty() {
        return vec![(argmax(scores), 1.0)];
    }
    let by_score = |a: &u32, b: &u32| scores[*b as usize].total_cmp(&scores[*a as usize]);
    let top_k = p.top_k > 0 && p.top_k < order.len();
    if top_k {
        order.select_nth_unstable_by(p.top_k - 1, by_score);
        order.truncate(p.top_k);
    }
    if top_k || p.top_p < 1.0 {
        order.sort_unstable_by(by_score);
    }
    let max = order.iter().map(|&i| scores[i as usize]).fold(f32::NEG_INFINITY, f32::max);
    // exp in f32 (a third of the time of f64 over the vocabulary), sums in f64.
    let inv_t = (1.0 / t) as f32;
    let mut candidates: Vec<(u32, f64)> =
        order.into_iter().map(|i| (i, ((scores[i as usize] - max) * inv_t).exp() as f64)).collect();
    let total: f64 = candidates.iter().map(|c| c.1).sum();
    candidates.iter_mut().for_each(|c| c.1 /= total);
    if p.min_p > 0.0 {
        // The most likely token has probability 1 / total; order is kept.
        let floor = p.min_p as f64 / total;
        candidates.retain(|c| c.1 >= floor);
    }
    if p.top_p < 1.0 {
        let mut mass = 0.0;
        let inside = candidates.iter().take_while(|c| {
            let before = mass;
            mass += c.1;
            before < p.top_p as f64
        });
        let keep = inside.count().max(1);
        candidates.truncate(keep);
    }
    let kept: f64 = candidates.iter().map(|c| c.1).sum();
    candidates.iter_mut().for_each(|c| c.1 /= kept);
    candidates
}

/// Inverse-CDF draw: `draw` in [0, 1).
pub fn pick(candidates: &[(u32, f64)], draw: f64) -> u32 {
    let mut acc = 0.0;
    for &(id, prob) in candidates {
        acc += prob;
        if draw < acc {
            return id;
        }
    }
    candidates.last().map(|c| c.0).unwrap_or(0)
}

/// Log-softmax of the raw logits at `token`, plus the `k` most likely tokens.
pub fn logprobs_of(logits: &[f32], token: u32, k: usize) -> TokenLogprobs {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let log_total = logits.iter().map(|&x| (x - max).exp() as f64).sum::<f64>().ln() + max as f64;
    let lp = |i: u32| (logits[i as usize] as f64 - log_total) as f32;
    let mut top: Vec<u32> = (0..logits.len() as u32).collect();
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
    if k > 0 && k < top.len() {
        top.select_nth_unstable_by(k - 1, by_logit);
    }
    top.truncate(k);
    top.sort_unstable_by(by_logit);
    TokenLogprobs { logprob: lp(token), top: top.into_iter().map(|i| (i, lp(i))).collect() }
}

#[cfg(test)]
mod tests {
    #[test]
    fn first_argmax_rows_picks_the_first_of_equal_bests_as_argmax_does() {
        let rows = [
            vec![0.5f32, 2.0, -1.0, 2.0, 2.0],
            vec![3.0, 3.0, 3.0, 3.0, 3.0],
            vec![-5.0, -4.0, -3.0, -2.0, -1.0],
            vec![f32::NEG_INFINITY, 1.0, f32::NEG_INFINITY, 0.0, 1.0],
        ];
        let flat: Vec<f32> = rows.concat();
        let logits = Tensor::from_vec(flat, (4, 5), &candle_core::Device::Cpu).unwrap();
        let chosen = first_argmax_rows(&logits).unwrap();
        let expected: Vec<Option<u32>> = rows.iter().map(|r| Some(argmax(r))).collect();
        assert_eq!(chosen, expected);
        assert_eq!(chosen, [Some(1), Some(0), Some(4), Some(1)]);
        let nan = Tensor::from_vec(vec![f32::NAN; 5], (1, 5), &candle_core::Device::Cpu).unwrap();
        assert_eq!(first_argmax_rows(&nan).unwrap(), [None], "a NaN row is left to the host");
    }

    /// The lane-wise argmax is the first index of the largest value, as one running best finds
    /// it, on rows with ties, tails of every length and NaNs past the first value.
    #[test]
    fn argmax_is_the_first_of_the_largest() {
        let mut rng = StdRng::seed_from_u64(3);
        for len in [1, 2, 15, 16, 17, 33, 1000, 151_936] {
            for _ in 0..20 {
                // Few distinct values, so that the largest one repeats.
                let mut row: Vec<f32> = (0..len).map(|_| rng.random_range(0..8) as f32).collect();
                if len > 3 {
                    row[len / 2] = f32::NAN;
                }
                let mut best = 0;
                for (i, &s) in row.iter().enumerate() {
                    if s > row[best] {
                        best = i;
                    }
                }
                assert_eq!(argmax(&row), best as u32, "{len}");
            }
        }
        assert_eq!(argmax(&[f32::NEG_INFINITY; 20]), 0);
    }

    #[test]
    fn only_plain_greedy_settings_skip_the_host() {
        let greedy = SamplingParams { temperature: 0.0, ..Default::default() };
        assert!(greedy.is_plain_greedy());
        assert!(!SamplingParams::default().is_plain_greedy(), "temperature 1");
        assert!(!SamplingParams { top_logprobs: Some(0), ..greedy.clone() }.is_plain_greedy());
        assert!(!SamplingParams { repetition_penalty: 1.1, ..greedy.clone() }.is_plain_greedy());
        assert!(!SamplingParams { logit_bias: HashMap::from([(3, 1.0)]), ..greedy }.is_plain_greedy());
    }

    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams { temperature, seed: Some(7), ..Default::default() }
    }

    #[test]
    fn greedy_takes_the_maximum_after_bias() {
        let mut s = Sampler::new(params(0.0), 0);
        assert_eq!(s.sample(&[1.0, 3.0, 2.0], &[], &[], None).0, 1);
        let mut p = params(0.0);
        p.logit_bias.insert(2, 5.0);
        assert_eq!(Sampler::new(p, 0).sample(&[1.0, 3.0, 2.0], &[], &[], None).0, 2);
    }

    #[test]
    fn same_seed_same_draws_and_streams_differ() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draws = |stream| {
            let mut s = Sampler::new(params(1.0), stream);
            (0..20).map(|_| s.sample(&logits, &[], &[], None).0).collect::<Vec<_>>()
        };
        assert_eq!(draws(0), draws(0));
        assert_ne!(draws(0), draws(1));
    }

    #[test]
    fn top_k_top_p_min_p_cut_the_tail() {
        let scores = [0.0f32, 1.0, 2.0, 3.0];
        let p = SamplingParams { temperature: 1.0, top_k: 2, ..Default::default() };
        let c = filtered_candidates(&scores, &p);
        assert_eq!(c.iter().map(|c| c.0).collect::<Vec<_>>(), vec![3, 2]);
        assert!((c.iter().map(|c| c.1).sum::<f64>() - 1.0).abs() < 1e-9);
        let p = SamplingParams { temperature: 1.0, top_p: 0.5, ..Default::default() };
        assert_eq!(filtered_candidates(&scores, &p).len(), 1);
        let p = SamplingParams { temperature: 1.0, min_p: 0.3, ..Default::default() };
        // p(2)/p(3) = e^-1 = 0.37 >= 0.3, p(1)/p(3) = e^-2 < 0.3
        assert_eq!(filtered_candidates(&scores, &p).len(), 2);
    }

    #[test]
    fn without_a_cut_every_token_stays_in_token_order() {
        let scores = [0.0f32, 2.0, f32::NEG_INFINITY, 1.0];
        let c = filtered_candidates(&scores, &SamplingParams { temperature: 0.5, ..Default::default() });
        assert_eq!(c.iter().map(|c| c.0).collect::<Vec<_>>(), vec![0, 1, 3]);
        let total = 1.0 + 4f64.exp() + 2f64.exp();
        assert!((c[1].1 - 4f64.exp() / total).abs() < 1e-6);
        assert!((c.iter().map(|c| c.1).sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn penalties_follow_hf_and_openai() {
        let p = SamplingParams { repetition_penalty: 2.0, ..Default::default() };
        let mut s = vec![4.0, -4.0, 4.0];
        apply_penalties(&mut s, &p, &[0, 1], &[]);
        assert_eq!(s, vec![2.0, -8.0, 4.0]);
        let p = SamplingParams { presence_penalty: 1.0, frequency_penalty: 0.5, ..Default::default() };
        let mut s = vec![0.0; 3];
        apply_penalties(&mut s, &p, &[2], &[0, 0, 1]);
        assert_eq!(s, vec![-2.0, -1.5, 0.0]);
    }

    #[test]
    fn a_mask_confines_every_draw() {
        let logits: Vec<f32> = (0..70).map(|i| (i as f32 * 0.37).sin()).collect();
        // Tokens 3, 40 and 69 only.
        let allowed = [1u32 << 3, 1 << (40 - 32), 1 << (69 - 64)];
        let mut s = Sampler::new(params(1.0), 0);
        for _ in 0..50 {
            assert!([3, 40, 69].contains(&s.sample(&logits, &[], &[], Some(&allowed)).0));
        }
        let mut greedy = Sampler::new(params(0.0), 0);
        let best = [3usize, 40, 69].into_iter().max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap();
        assert_eq!(greedy.sample(&logits, &[], &[], Some(&allowed)).0 as usize, best);
    }

    #[test]
    fn logprobs_are_normalised_and_sorted() {
        let l = logprobs_of(&[0.0, (2.0f32).ln(), 0.0], 1, 2);
        assert!((l.logprob - 0.5f32.ln()).abs() < 1e-6);
        assert_eq!(l.top[0].0, 1);
        assert_eq!(l.top.len(), 2);
    }
}
