//! The batching policy as a pure function: given the running and waiting sequences and the
//! limits, decide what runs in the next step. Decodes go first, prefills are chunked into the
//! leftover token budget, admission is first-come-first-served and bounded by the KV storage
//! really reserved, and when memory runs out the newest running sequence is preempted (to be
//! recomputed later).

/// Limits of one engine step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Tokens (decode tokens plus prefill chunk tokens) one forward pass may carry.
    pub max_batched_tokens: usize,
    /// Sequences that may be running at once.
    pub max_seqs: usize,
    /// Tokens of KV storage the budget can reserve across all running sequences.
    pub kv_tokens: usize,
}

/// A running sequence as the policy sees it (cancelled ones were removed before planning).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningView {
    pub id: u64,
    /// Tokens already in its KV cache.
    pub computed: usize,
    /// Tokens still to feed: the rest of the prompt while prefilling, 1 while decoding.
    pub pending: usize,
    /// Tokens of KV storage it holds once its pending tokens are in (capacity, not length:
    /// what the allocator really reserves, plus the copies its other choices will fork).
    pub reserved: usize,
}

/// A waiting request as the policy sees it (queue order = arrival order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitingView {
    pub id: u64,
    /// Tokens it needs computed (its prompt less any prefix-cache hit).
    pub to_compute: usize,
    /// Tokens of KV storage it reserves once its prompt is in (all of its choices).
    pub need: usize,
}

/// What the next step does. Every id appears in at most one of `preempted` and `admitted`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
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
    let mut live: Vec<&RunningView> = running.iter().collect();

    // Memory first: preempt the newest until everyone's next tokens fit (the oldest always
    // stays; its storage is capped at the budget, so it fits alone).
    let mut kv_used: usize = live.iter().map(|r| r.reserved).sum();
    while kv_used > limits.kv_tokens && live.len() > 1 {
        let newest = live.pop().expect("len > 1");
        kv_used -= newest.reserved;
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
        for (seqs, w) in (live.len()..).zip(waiting) {
            if seqs >= limits.max_seqs || budget == 0 || kv_used + w.need > limits.kv_tokens {
                break;
            }
            let n = w.to_compute.min(budget);
            plan.admitted.push(w.id);
            plan.chunks.push((w.id, n));
            budget -= n;
            kv_used += w.need;
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(id: u64, computed: usize) -> RunningView {
        RunningView { id, computed, pending: 1, reserved: computed + 1 }
    }
    fn prefill(id: u64, computed: usize, pending: usize) -> RunningView {
        RunningView { id, computed, pending, reserved: computed + pending }
    }
    fn waiting(id: u64, to_compute: usize) -> WaitingView {
        WaitingView { id, to_compute, need: to_compute }
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
    fn memory_pressure_preempts_the_newest() {
        let limits = Limits { kv_tokens: 100, ..ROOMY };
        let running = [decode(1, 40), decode(2, 40), decode(3, 40)];
        let p = plan(&running, &[waiting(4, 1)], limits);
        assert_eq!(p.preempted, vec![3]);
        assert_eq!(p.chunks, vec![(1, 1), (2, 1)]);
        assert!(p.admitted.is_empty(), "no admission in a step that preempted");
    }

    #[test]
    fn admission_respects_kv_memory_reserved_not_just_computed() {
        let limits = Limits { kv_tokens: 100, ..ROOMY };
        let mut w = waiting(2, 30);
        w.need = 60;
        // 40 + 1 held by the runner; 60 more would exceed 100.
        let p = plan(&[decode(1, 40)], &[w.clone()], limits);
        assert!(p.admitted.is_empty());
        w.need = 50;
        assert_eq!(plan(&[decode(1, 40)], &[w.clone()], limits).admitted, vec![2]);
        // A runner whose storage doubled holds its capacity, not its length.
        let mut grown = decode(1, 40);
        grown.reserved = 64;
        assert!(plan(&[grown], &[w], limits).admitted.is_empty());
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
