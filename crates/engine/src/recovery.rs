//! Fault containment: a step that errors or panics fails only the requests it was running;
//! the engine then checks its own state and goes on. When the state cannot be trusted (or
//! steps keep failing) it fails everything, reports `Health::Failed` and stops, so that the
//! server can turn unready and exit for its supervisor to restart it. Also the audit the
//! simulation tests run after every step.

use crate::engine::Engine;
use crate::request::{EngineError, Event, Health};
use std::any::Any;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering::Relaxed;

/// Steps in a row that may fail before the engine gives up.
const MAX_CONSECUTIVE_FAULTS: usize = 3;

/// The message of a panic payload.
pub(crate) fn panic_text(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// What the engine holds, counted two ways where it can be (see [`Engine::audit`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audit {
    pub requests: usize,
    pub running: usize,
    pub waiting: usize,
    /// Blocks of the KV pool.
    pub kv_blocks: usize,
    /// Blocks held by running sequences.
    pub kv_blocks_held: usize,
    /// Blocks keeping a prefix for reuse that nobody holds.
    pub kv_blocks_cached: usize,
    /// Blocks a sequence could take now.
    pub kv_blocks_available: usize,
    /// Times so far that a second sequence took hold of a block (a prefix hit on a block in
    /// use, or a choice sharing its prompt), that a shared block was copied before a write,
    /// and that a cached block was evicted for a new one.
    pub kv_blocks_shared: u64,
    pub kv_block_copies: u64,
    pub kv_evictions: u64,
    pub vision_entries: usize,
    pub vision_bytes: usize,
}

impl Engine {
    /// Runs one step, containing whatever goes wrong in it.
    pub(crate) fn step(&mut self) {
        self.in_step.clear();
        let outcome = catch_unwind(AssertUnwindSafe(|| self.step_inner()));
        let (why, panicked) = match outcome {
            Ok(Ok(())) => {
                self.consecutive_faults = 0;
                return;
            }
            Ok(Err(e)) => (e.to_string(), false),
            Err(payload) => (format!("panic: {}", panic_text(payload.as_ref())), true),
        };
        self.stats.faults_total.fetch_add(1, Relaxed);
        self.consecutive_faults += 1;
        tracing::error!(why, panicked, seqs = self.in_step.len(), "an engine step failed; failing its requests");
        let recovered = catch_unwind(AssertUnwindSafe(|| self.recover(&why, panicked))).unwrap_or(false);
        if !recovered || self.consecutive_faults >= MAX_CONSECUTIVE_FAULTS {
            self.give_up(&why);
        }
    }

    /// Fails the requests of the failed step and checks that what is left is sound.
    fn recover(&mut self, why: &str, panicked: bool) -> bool {
        let mut failed: Vec<u64> =
            self.in_step.drain(..).filter_map(|id| self.seqs.get(&id).map(|s| s.req_id)).collect();
        failed.sort_unstable();
        failed.dedup();
        #[cfg(feature = "fault-injection")]
        if failed.iter().any(|&r| self.injected(r) == Some(crate::request::Fault::Fatal)) {
            return false; // the caller gives up, failing every request
        }
        for req_id in failed {
            self.fail_request(req_id, EngineError::Internal(why.to_string()));
        }
        if panicked {
            // Either cache may have been half-way through a change: start them afresh.
            self.blocks.forget_prefixes();
            self.vision.clear();
        }
        self.publish_gauges();
        self.check_invariants().is_ok()
    }

    /// Sends `error` to a request and removes all of its choices (their KV is not reused).
    fn fail_request(&mut self, req_id: u64, error: EngineError) {
        if let Some(req) = self.requests.get(&req_id) {
            let _ = req.events.send(Event::Error(error));
        }
        let mut ids: Vec<u64> = self.seqs.values().filter(|s| s.req_id == req_id).map(|s| s.id).collect();
        ids.sort_unstable(); // the same seed must replay the same schedule
        for id in ids {
            self.remove_seq(id);
        }
        self.requests.remove(&req_id);
    }

    /// The state cannot be trusted: fail every request, drop everything, report the failure.
    fn give_up(&mut self, why: &str) {
        let why = format!("{why} (the engine could not recover and has stopped)");
        tracing::error!(why, "engine failed");
        // Unhealthy first: whoever sees the error event and asks the readiness probe sees it.
        self.health.send_replace(Health::Failed(why.clone()));
        for req in self.requests.values() {
            let _ = req.events.send(Event::Error(EngineError::Stopped(why.clone())));
        }
        self.requests.clear();
        self.seqs.clear();
        self.running.clear();
        self.waiting.clear();
        self.blocks = crate::block_pool::BlockPool::new(self.blocks.num_blocks());
        self.vision.clear();
        self.stats.waiting.store(0, Relaxed);
        self.publish_gauges();
    }

    /// The engine's structural invariants: every running sequence holds blocks for its
    /// computed tokens, with something left to feed; waiting ones hold none; every sequence
    /// belongs to a live request whose choice count matches; every block is free, cached, or
    /// held by exactly as many running sequences as its count says, and none holds the tokens
    /// of two prefixes (see [`Engine::check_blocks`]).
    /// (Also run by the simulation tests after every step.)
    #[doc(hidden)]
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut per_request: HashMap<u64, usize> = HashMap::new();
        for (id, s) in &self.seqs {
            *per_request.entry(s.req_id).or_default() += 1;
            if !self.requests.contains_key(&s.req_id) {
                return Err(format!("sequence {id} belongs to no request"));
            }
        }
        for (req_id, req) in &self.requests {
            let seqs = per_request.get(req_id).copied().unwrap_or(0);
            if seqs != req.live_choices {
                return Err(format!("request {req_id} counts {} choices but has {seqs} sequences", req.live_choices));
            }
        }
        if self.running.len() + self.waiting.len() != self.seqs.len() {
            return Err(format!(
                "{} running + {} waiting but {} sequences",
                self.running.len(),
                self.waiting.len(),
                self.seqs.len()
            ));
        }
        for id in &self.running {
            let s = self.seqs.get(id).ok_or(format!("running {id} is unknown"))?;
            if s.computed() >= s.tokens.len() {
                return Err(format!("running {id}: computed {} of {} tokens", s.computed(), s.tokens.len()));
            }
        }
        for id in &self.waiting {
            let s = self.seqs.get(id).ok_or(format!("waiting {id} is unknown"))?;
            if !s.blocks.is_empty() || s.computed() > 0 || self.running.contains(id) {
                return Err(format!("waiting {id} holds blocks or is also running"));
            }
        }
        self.check_blocks()?;
        let audit = self.audit();
        if self.vision.bytes() != audit.vision_bytes {
            return Err(format!(
                "the vision cache counts {} bytes but holds {}",
                self.vision.bytes(),
                audit.vision_bytes
            ));
        }
        Ok(())
    }

    /// What the engine holds right now.
    #[doc(hidden)]
    pub fn audit(&self) -> Audit {
        Audit {
            requests: self.requests.len(),
            running: self.running.len(),
            waiting: self.waiting.len(),
            kv_blocks: self.blocks.num_blocks(),
            kv_blocks_held: self.blocks.held(),
            kv_blocks_cached: self.blocks.cached_unheld(),
            kv_blocks_available: self.blocks.available(),
            kv_blocks_shared: self.blocks.counts().shared,
            kv_block_copies: self.blocks.counts().copies,
            kv_evictions: self.blocks.counts().evictions,
            vision_entries: self.vision.len(),
            vision_bytes: self.vision.counted_bytes(),
        }
    }

    /// Empties the prefix and vision caches (the simulation then expects every block free).
    #[doc(hidden)]
    pub fn clear_caches(&mut self) {
        self.blocks.forget_prefixes();
        self.vision.clear();
        self.publish_gauges();
    }
}

/// Test-only faults (builds with the `fault-injection` feature): a request that carries one
/// panics the step that runs it.
#[cfg(feature = "fault-injection")]
impl Engine {
    fn injected(&self, req_id: u64) -> Option<crate::request::Fault> {
        self.requests.get(&req_id).and_then(|r| r.spec.fault)
    }

    pub(crate) fn inject_fault(&self, req_id: u64, seq_id: u64) {
        if self.injected(req_id).is_some() {
            panic!("fault injected into the step of sequence {seq_id}");
        }
    }
}
