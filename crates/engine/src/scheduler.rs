//! The batching policy as a pure function: given the running and waiting sequences and the
//! limits, decide what runs in the next step. Decodes go first, prefills are chunked into the
//! leftover token budget, admission is first-come-first-served and bounded by KV memory, and
//! when memory runs out the newest running sequence is preempted (to be recomputed later).

/// Limits of one engine step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Tokens (decode tokens plus prefill chunk tokens) one forward pass may carry.
    pub max_batched_tokens: usize,
    /// Sequences that may be running at once.
    pub max_seqs: usize,
    /// Tokens the KV budget can hold across all running sequences.
    pub kv_tokens: usize,
}

/// A running sequence as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningView {
    pub id: u64,
    /// Tokens already in its KV cache.
    pub computed: usize,
    /// Tokens still to feed: the rest of the prompt while prefilling, 1 while decoding.
    pub pending: usize,
    pub cancelled: bool,
}

impl RunningView {
    /// KV tokens it holds once its pending tokens are in.
    fn commitment(&self) -> usize {
        self.computed + self.pending
    }
}

/// A waiting request as the policy sees it (queue order = arrival order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitingView {
    pub id: u64,
    /// Tokens it needs computed (its prompt less any prefix-cache hit).
    pub to_compute: usize,
    /// Tokens it reuses from the prefix cache (they occupy KV too).
    pub cached: usize,
    pub cancelled: bool,
}

/// What the next step does. Every id appears in at most one of the lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Cancelled sequences to drop (their KV is freed).
    pub dropped: Vec<u64>,
    /// Running sequences to preempt: KV freed, recomputed when readmitted.
    pub preempted: Vec<u64>,
    /// Waiting requests to start.
    pub admitted: Vec<u64>,
    /// `(id, tokens)` to feed this step, running and newly admitted alike.
    pub chunks: Vec<(u64, usize)>,
}

/// Decides the next step. `running` is in arrival order (oldest first), `waiting` in queue order.
pub fn plan(running: &[RunningView], waiting: &[WaitingView], limits: Limits) -> Plan {
    let mut plan = Plan::default();
    let mut live: Vec<&RunningView> = Vec::new();
    for r in running {
        if r.cancelled {
            plan.dropped.push(r.id);
        } else {
            live.push(r);
        }
    }
    plan.dropped.extend(waiting.iter().filter(|w| w.cancelled).map(|w| w.id));

    // Memory first: preempt the newest until everyone's next tokens fit (the oldest always stays).
    let mut kv_used: usize = live.iter().map(|r| r.commitment()).sum();
    while kv_used > limits.kv_tokens && live.len() > 1 {
        let newest = live.pop().expect("len > 1");
        kv_used -= newest.commitment();
        plan.preempted.push(newest.id);
    }

    // Decodes, then prefill chunks, oldest first, within the token budget.
    let mut budget = limits.max_batched_tokens;
    let (decoding, prefilling): (Vec<&RunningView>, Vec<&RunningView>) = live.iter().partition(|r| r.pending == 1);
    for r in decoding.into_iter().chain(prefilling) {
        let n = r.pending.min(budget);
        if n == 0 {
            break;
        }
        plan.chunks.push((r.id, n));
        budget -= n;
    }

    // Admission: strictly in queue order so that a large request at the head is never starved
    // by smaller ones behind it; nothing is admitted in a step that had to preempt.
    if plan.preempted.is_empty() {
        for (seqs, w) in (live.len()..).zip(waiting.iter().filter(|w| !w.cancelled)) {
            let need = w.cached + w.to_compute;
            if seqs >= limits.max_seqs || budget == 0 || kv_used + need > limits.kv_tokens {
                break;
            }
            let n = w.to_compute.min(budget);
            plan.admitted.push(w.id);
            plan.chunks.push((w.id, n));
            budget -= n;
            kv_used += need;
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(id: u64, computed: usize) -> RunningView {
        RunningView { id, computed, pending: 1, cancelled: false }
    }
    fn prefill(id: u64, computed: usize, pending: usize) -> RunningView {
        RunningView { id, computed, pending, cancelled: false }
    }
    fn waiting(id: u64, to_compute: usize) -> WaitingView {
        WaitingView { id, to_compute, cached: 0, cancelled: false }
    }
    const ROOMY: Limits = Limits { max_batched_tokens: 512, max_seqs: 16, kv_tokens: 1 << 20 };

    #[test]
    fn token_budget_is_shared_by_decodes_and_prefill_chunks() {
        let running = [prefill(1, 0, 10_000), decode(2, 50), decode(3, 60)];
        let p = plan(&running, &[waiting(4, 100)], ROOMY);
        // Decodes first, then a 510-token chunk of the long prompt; no budget left to admit.
        assert_eq!(p.chunks, vec![(2, 1), (3, 1), (1, 510)]);
        assert!(p.admitted.is_empty());
    }

    #[test]
    fn admission_chunks_a_long_prompt() {
        let p = plan(&[], &[waiting(1, 2000), waiting(2, 10)], ROOMY);
        assert_eq!(p.admitted, vec![1]);
        assert_eq!(p.chunks, vec![(1, 512)]);
    }

    #[test]
    fn sequence_limit_caps_admission() {
        let limits = Limits { max_seqs: 2, ..ROOMY };
        let p = plan(&[decode(1, 5)], &[waiting(2, 3), waiting(3, 3)], limits);
        assert_eq!(p.admitted, vec![2]);
    }

    #[test]
    fn dropped_receivers_are_removed_and_use_no_budget() {
        let mut gone = decode(1, 5);
        gone.cancelled = true;
        let mut left = waiting(3, 4);
        left.cancelled = true;
        let p = plan(&[gone, decode(2, 5)], &[left, waiting(4, 4)], ROOMY);
        assert_eq!(p.dropped, vec![1, 3]);
        assert_eq!(p.chunks, vec![(2, 1), (4, 4)]);
    }

    #[test]
    fn memory_pressure_preempts_the_newest() {
        let limits = Limits { kv_tokens: 100, ..ROOMY };
        let running = [decode(1, 40), decode(2, 40), decode(3, 40)];
        let p = plan(&running, &[waiting(4, 1)], limits);
        assert_eq!(p.preempted, vec![3]);
        assert_eq!(p.chunks, vec![(1, 1), (2, 1)]);
        assert!(p.admitted.is_empty(), "no admission in a step that preempted");
    }

    #[test]
    fn admission_respects_kv_memory_and_counts_cached_tokens() {
        let limits = Limits { kv_tokens: 100, ..ROOMY };
        let mut w = waiting(2, 30);
        w.cached = 30;
        // 40 + 1 held by the runner; 60 more would exceed 100.
        let p = plan(&[decode(1, 40)], &[w.clone()], limits);
        assert!(p.admitted.is_empty());
        w.cached = 20;
        assert_eq!(plan(&[decode(1, 40)], &[w], limits).admitted, vec![2]);
    }

    #[test]
    fn the_head_of_the_queue_is_not_starved_by_smaller_requests() {
        let limits = Limits { kv_tokens: 1000, max_batched_tokens: 1024, ..ROOMY };
        let p = plan(&[decode(1, 500)], &[waiting(2, 600), waiting(3, 10)], limits);
        assert!(p.admitted.is_empty(), "request 3 must not jump ahead of request 2");
        // Once memory frees up, the head goes first.
        assert_eq!(plan(&[], &[waiting(2, 600), waiting(3, 10)], limits).admitted, vec![2, 3]);
    }

    #[test]
    fn decodes_keep_running_while_a_long_prompt_prefills() {
        let limits = Limits { max_batched_tokens: 256, ..ROOMY };
        let mut computed = 0;
        let mut steps = 0;
        while computed < 11_664 {
            let running = [decode(1, 100 + steps), prefill(2, computed, 11_664 - computed)];
            let p = plan(&running, &[], limits);
            assert_eq!(p.chunks[0], (1, 1), "the decode runs every step");
            computed += p.chunks[1].1;
            steps += 1;
        }
        assert_eq!(steps, 11_664usize.div_ceil(255));
    }
}
