//! The sampling fields of a request -> how the engine answers it: every range checked before
//! any media is fetched, every rejected field named in `param`; then, with the proven prompt,
//! the engine request.

use crate::config::api_limits::{MAX_STOP_SEQUENCES, MAX_TOP_LOGPROBS};
use crate::error::ApiError;
use crate::state::Loaded;
use crate::wire::SamplingFields;
use std::collections::HashMap;
use std::num::NonZeroUsize;
use weft_engine::{Constraint, GenerateRequest, SamplingParams, ValidPrompt};

/// Sampling fields -> engine parameters, checking every range.
pub fn sampling(f: &SamplingFields, logprobs: Option<usize>) -> Result<SamplingParams, ApiError> {
    let mut p = SamplingParams::default();
    let range = |name: &str, v: f32, lo: f32, hi: f32| {
        if v.is_finite() && v >= lo && v <= hi {
            Ok(v)
        } else {
            Err(ApiError::invalid(name, format!("{v} is outside [{lo}, {hi}]")))
        }
    };
    if let Some(t) = f.temperature {
        p.temperature = range("temperature", t, 0.0, 2.0)?;
    }
    if let Some(v) = f.top_p {
        p.top_p = range("top_p", v, 1e-9, 1.0)?;
    }
    if let Some(k) = f.top_k {
        if k < -1 {
            return Err(ApiError::invalid("top_k", "must be -1 (off), 0 (off) or positive"));
        }
        p.top_k = k.max(0) as usize;
    }
    if let Some(v) = f.min_p {
        p.min_p = range("min_p", v, 0.0, 1.0)?;
    }
    if let Some(v) = f.presence_penalty {
        p.presence_penalty = range("presence_penalty", v, -2.0, 2.0)?;
    }
    if let Some(v) = f.frequency_penalty {
        p.frequency_penalty = range("frequency_penalty", v, -2.0, 2.0)?;
    }
    if let Some(v) = f.repetition_penalty {
        p.repetition_penalty = range("repetition_penalty", v, 1e-3, 10.0)?;
    }
    if let Some(bias) = &f.logit_bias {
        let mut out = HashMap::new();
        for (k, v) in bias {
            let id: u32 =
                k.parse().map_err(|_| ApiError::invalid("logit_bias", format!("key {k:?} is not a token id")))?;
            out.insert(id, range("logit_bias", *v, -100.0, 100.0)?);
        }
        p.logit_bias = out;
    }
    p.seed = f.seed.map(|s| s as u64);
    p.top_logprobs = logprobs;
    Ok(p)
}

/// A request's answer settings, checked; the prompt comes later.
pub struct Answer {
    sampling: SamplingParams,
    n: NonZeroUsize,
    /// `None`: as many as the context leaves, up to the server's limit.
    max_tokens: Option<NonZeroUsize>,
    stop: Vec<String>,
    stop_token_ids: Vec<u32>,
    ignore_eos: bool,
    #[cfg(feature = "fault-injection")]
    fault: Option<weft_engine::Fault>,
}

impl Answer {
    /// Checks `n`, `max_tokens` (named `max_tokens_param` in errors), the stops and the
    /// sampling ranges.
    pub fn check(
        state: &Loaded,
        f: &SamplingFields,
        max_tokens: Option<i64>,
        max_tokens_param: &str,
        logprobs: Option<usize>,
    ) -> Result<Answer, ApiError> {
        let limits = &state.limits;
        let n = f.n.unwrap_or(1);
        let n = usize::try_from(n)
            .ok()
            .filter(|&n| n <= limits.max_n)
            .and_then(NonZeroUsize::new)
            .ok_or_else(|| ApiError::invalid("n", format!("must be between 1 and {}", limits.max_n)))?;
        let max_tokens = match max_tokens {
            None => None,
            Some(m) if m >= 1 && m as usize <= limits.max_tokens => NonZeroUsize::new(m as usize),
            Some(m) => {
                return Err(ApiError::invalid(max_tokens_param, format!("{m} is outside 1..={}", limits.max_tokens)))
            }
        };
        let stop = f.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
        if stop.len() > MAX_STOP_SEQUENCES {
            return Err(ApiError::invalid("stop", format!("at most {MAX_STOP_SEQUENCES} stop sequences")));
        }
        Ok(Answer {
            sampling: sampling(f, logprobs)?,
            n,
            max_tokens,
            stop,
            stop_token_ids: f.stop_token_ids.clone().unwrap_or_default(),
            ignore_eos: f.ignore_eos,
            #[cfg(feature = "fault-injection")]
            fault: fault(state, f),
        })
    }

    pub fn n(&self) -> usize {
        self.n.get()
    }

    /// The engine request for `prompt`.
    pub fn request(&self, state: &Loaded, prompt: ValidPrompt, constraint: Option<Constraint>) -> GenerateRequest {
        let room = state.context_len.saturating_sub(prompt.len());
        let default = NonZeroUsize::new(state.limits.max_tokens.min(room)).unwrap_or(NonZeroUsize::MIN);
        let mut r = GenerateRequest::new(prompt, self.max_tokens.unwrap_or(default));
        r.sampling = self.sampling.clone();
        r.n = self.n;
        r.stop = self.stop.clone();
        r.stop_token_ids = self.stop_token_ids.clone();
        r.ignore_eos = self.ignore_eos;
        r.constraint = constraint;
        #[cfg(feature = "fault-injection")]
        {
            r.fault = self.fault;
        }
        r
    }
}

/// Test-only (builds with the `fault-injection` feature, started with
/// `WEFT_FAULT_INJECTION=1`): `user: "weft-fault:panic"` panics the step that runs it.
#[cfg(feature = "fault-injection")]
fn fault(state: &Loaded, f: &SamplingFields) -> Option<weft_engine::Fault> {
    if !state.fault_injection {
        return None;
    }
    match f.user.as_deref() {
        Some("weft-fault:panic") => Some(weft_engine::Fault::Panic),
        Some("weft-fault:fatal") => Some(weft_engine::Fault::Fatal),
        _ => None,
    }
}

/// `logprobs` and `top_logprobs` of a chat request -> how many alternatives to report.
pub fn chat_logprobs(logprobs: bool, top_logprobs: Option<i64>) -> Result<Option<usize>, ApiError> {
    if !logprobs {
        if top_logprobs.is_some_and(|k| k > 0) {
            return Err(ApiError::invalid("top_logprobs", "requires logprobs: true"));
        }
        return Ok(None);
    }
    let k = top_logprobs.unwrap_or(0);
    if k < 0 || k as usize > MAX_TOP_LOGPROBS {
        return Err(ApiError::invalid("top_logprobs", format!("must be between 0 and {MAX_TOP_LOGPROBS}")));
    }
    Ok(Some(k as usize))
}
