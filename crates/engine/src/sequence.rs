//! One choice of one request as it moves through the engine: its tokens, its KV blocks, its
//! sampler, its detokenizer and stop matcher, and its timings.

use crate::block_pool::BlockId;
use crate::constraint::Constraint;
use crate::detokenize::{Decode, IncrementalDecoder};
use crate::prefix_cache::BlockHash;
use crate::request::{Event, FinishReason, GenerateRequest};
use crate::sampling::{Sampler, TokenLogprobs};
use crate::stop::StopMatcher;
use std::borrow::Cow;
use std::time::Instant;

pub(crate) struct Sequence {
    pub id: u64,
    pub req_id: u64,
    /// Which choice of the request (0..n).
    pub choice: usize,
    /// Prompt followed by the generated tokens.
    pub tokens: Vec<u32>,
    /// The pool blocks holding its keys and values, in order (none while waiting or
    /// preempted); they cover at least its computed tokens.
    pub blocks: Vec<BlockId>,
    /// Hashes of the full blocks of its tokens so far (the prefix cache's keys).
    pub hashes: Vec<BlockHash>,
    computed: usize,
    /// Prompt tokens reused from the prefix cache at first admission.
    pub reused: usize,
    prompt_len: usize,
    max_tokens: usize,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stop: StopMatcher,
    /// This choice's place in the request's grammar, if it has one.
    constraint: Option<Constraint>,
    /// Microseconds spent computing grammar masks since the engine last collected them.
    pub mask_us: u64,
    pub admitted_at: Option<Instant>,
    pub first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
    pub inter_token: Vec<f64>,
}

/// What a sequence samples its next token from.
pub(crate) enum Scores<'a> {
    /// Its row of logits, on the host (read where the forward pass left it, or copied there).
    Row(Cow<'a, [f32]>),
    /// The token greedy decoding picked where the logits are.
    Greedy(u32),
}

/// What sampling one token produced.
pub(crate) enum Emitted {
    Token(Event),
    /// The sequence is done: maybe a last token event, the reason, and held-back text.
    Finished(Option<Event>, FinishReason, String),
    /// The grammar failed (a limit of the matcher): the request ends with this error.
    Failed(String),
}

impl Sequence {
    pub fn new(id: u64, req_id: u64, choice: usize, spec: &GenerateRequest) -> Self {
        Sequence {
            id,
            req_id,
            choice,
            tokens: spec.prompt.ids().to_vec(),
            blocks: Vec::new(),
            hashes: Vec::new(),
            computed: 0,
            reused: 0,
            prompt_len: spec.prompt.len(),
            max_tokens: spec.max_tokens.get(),
            sampler: Sampler::new(spec.sampling.clone(), choice as u64),
            decoder: IncrementalDecoder::new(),
            stop: StopMatcher::new(spec.stop.clone()),
            constraint: spec.constraint.clone(),
            mask_us: 0,
            admitted_at: None,
            first_token_at: None,
            last_token_at: None,
            inter_token: Vec::new(),
        }
    }

    /// Another choice of the same request, sharing this one's prompt blocks (the caller counts
    /// the new holder of each).
    pub fn sibling(&self, id: u64, choice: usize, spec: &GenerateRequest) -> Self {
        let mut s = Sequence::new(id, self.req_id, choice, spec);
        s.admitted_at = self.admitted_at;
        s.reused = self.reused;
        s.blocks = self.blocks.clone();
        s.hashes = self.hashes.clone();
        s.computed = self.computed;
        s
    }

    /// Tokens in the KV cache.
    pub fn computed(&self) -> usize {
        self.computed
    }

    /// Tokens still to feed.
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.computed
    }

    pub fn generated(&self, prompt_len: usize) -> usize {
        self.tokens.len() - prompt_len
    }

    /// Starts (or restarts, after preemption) with `blocks`, whose first `reused` tokens are
    /// already computed (a prefix-cache hit).
    pub fn admit(&mut self, blocks: Vec<BlockId>, reused: usize) {
        if self.admitted_at.is_none() {
            self.reused = reused;
            self.admitted_at = Some(Instant::now());
        }
        self.computed = reused;
        self.blocks = blocks;
    }

    /// `n` more tokens are in its blocks (a forward pass wrote them).
    pub fn advance(&mut self, n: usize) {
        self.computed += n;
    }

    /// Gives up its blocks (preempted: recomputed when readmitted, from the prefix cache where
    /// its blocks are still there) and returns them for the caller to release.
    pub fn preempt(&mut self) -> Vec<BlockId> {
        self.computed = 0;
        std::mem::take(&mut self.blocks)
    }

    /// Samples the next token from `scores` and decides whether the sequence goes on.
    pub fn sample(
        &mut self,
        scores: &Scores<'_>,
        prompt: &[u32],
        spec: &GenerateRequest,
        eos_ids: &[u32],
        context: usize,
        tokenizer: &impl Decode,
    ) -> Emitted {
        let logits = match scores {
            Scores::Row(logits) => logits,
            // Chosen where the logits are: plain greedy, no grammar (see `first_argmax_rows`).
            &Scores::Greedy(token) => return self.accept(token, None, spec, eos_ids, context, tokenizer),
        };
        let allowed = match self.constraint.as_mut() {
            Some(constraint) => {
                let started = Instant::now();
                let mask = constraint.allowed();
                self.mask_us += started.elapsed().as_micros() as u64;
                match mask {
                    Ok(mut mask) => {
                        // The grammar knows one end token; the model's others end it as well.
                        if let Some(&first) = eos_ids.first() {
                            if mask_allows(&mask, first) {
                                eos_ids.iter().for_each(|&id| allow(&mut mask, id));
                            }
                        }
                        Some(mask)
                    }
                    Err(e) => return Emitted::Failed(format!("structured output: {e}")),
                }
            }
            None => None,
        };
        let (token, logprobs) =
            self.sampler.sample(logits, prompt, &self.tokens[self.prompt_len..], allowed.as_deref());
        self.accept(token, logprobs, spec, eos_ids, context, tokenizer)
    }

    /// Takes `token` as the next one: timings, stop tokens, the grammar, stop strings, limits.
    fn accept(
        &mut self,
        token: u32,
        logprobs: Option<TokenLogprobs>,
        spec: &GenerateRequest,
        eos_ids: &[u32],
        context: usize,
        tokenizer: &impl Decode,
    ) -> Emitted {
        let now = Instant::now();
        if let Some(last) = self.last_token_at {
            self.inter_token.push((now - last).as_secs_f64());
        }
        self.first_token_at.get_or_insert(now);
        self.last_token_at = Some(now);
        self.tokens.push(token);
        let is_eos = eos_ids.contains(&token);
        // Under a grammar an end token is only ever drawn where the answer is complete.
        let is_stop_token =
            spec.stop_token_ids.contains(&token) || (is_eos && (!spec.ignore_eos || self.constraint.is_some()));
        if is_stop_token {
            let tail = self.release_tail(tokenizer);
            return Emitted::Finished(None, FinishReason::Stop, tail);
        }
        let mut complete = false;
        if let Some(constraint) = self.constraint.as_mut() {
            if let Err(e) = constraint.advance(token) {
                return Emitted::Failed(format!("structured output: {e}"));
            }
            complete = constraint.is_complete();
        }
        let delta = self.decoder.push(token, tokenizer);
        let step = self.stop.push(&delta);
        let event = Event::Token { index: self.choice, id: token, text: step.emit, logprobs };
        if step.stopped {
            return Emitted::Finished(Some(event), FinishReason::Stop, String::new());
        }
        if complete {
            let tail = self.release_tail(tokenizer);
            return Emitted::Finished(Some(event), FinishReason::Stop, tail);
        }
        if self.generated(self.prompt_len) >= self.max_tokens || self.tokens.len() >= context {
            let tail = self.release_tail(tokenizer);
            return Emitted::Finished(Some(event), FinishReason::Length, tail);
        }
        Emitted::Token(event)
    }

    /// Text still held by the detokenizer and the stop matcher when generation ends.
    fn release_tail(&mut self, tokenizer: &impl Decode) -> String {
        let rest = self.decoder.flush(tokenizer);
        let step = self.stop.push(&rest);
        if step.stopped {
            return step.emit;
        }
        step.emit + &self.stop.finish()
    }
}

fn mask_allows(mask: &[u32], token: u32) -> bool {
    mask.get(token as usize / 32).is_some_and(|w| w & (1 << (token % 32)) != 0)
}

fn allow(mask: &mut [u32], token: u32) {
    if let Some(w) = mask.get_mut(token as usize / 32) {
        *w |= 1 << (token % 32);
    }
}
