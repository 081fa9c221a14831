//! The batching policy as a pure function: given the running and waiting sequences and the
//! limits, decide what runs in the next step. Decodes go first, prefills are chunked into the
//! leftover token budget, admission is first-come-first-served and bounded by the KV pool's
//! blocks, and when blocks run out the newest running sequence is preempted (to be recomputed
//! later, from the prefix cache where its blocks are still there).

/// Limits of one engine step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Tokens (decode tokens plus prefill chunk tokens) one forward pass may carry.
    pub max_batched_tokens: usize,
    /// Sequences that may be running at once.
    pub max_seqs: usize,
    /// KV pool blocks that can be taken now (free, or cached and held by nobody).
    pub kv_blocks: usize,
}

/// A running sequence as the policy sees it (cancelled ones were removed before planning).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningView {
    pub id: u64,
    /// Tokens already in its KV cache.
    pub computed: usize,
    /// Tokens still to feed: the rest of the prompt while prefilling, 1 while decoding.
    pub pending: usize,
    /// Blocks it must take to feed its pending tokens (new blocks, and a copy of a shared
    /// block it is about to write).
    pub grow: usize,
    /// Blocks that become available if it is preempted (those it alone holds).
    pub frees: usize,
}

/// A waiting request as the policy sees it (queue order = arrival order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitingView {
    pub id: u64,
    /// Tokens it needs computed (its prompt less any prefix-cache hit).
    pub to_compute: usize,
    /// Blocks it takes from the available ones when admitted: for its whole prompt less the
    /// cached ones, the cached ones nobody holds, and one for each other choice to copy the
    /// prompt's last block into.
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
    // stays; a sequence never outgrows the pool, so it fits alone).
    let mut available = limits.kv_blocks;
    let mut growing: usize = live.iter().map(|r| r.grow).sum();
    while growing > available && live.len() > 1 {
        let newest = live.pop().expect("len > 1");
        growing -= newest.grow;
        available += newest.frees;
        plan.preempted.push(newest.id);
    }
    let mut kv_used = growing;

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
            if seqs >= limits.max_seqs || budget == 0 || kv_used + w.need > available {
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

    /// Views in blocks of 16 tokens, whose prompts were given all their blocks at admission.
    fn decode(id: u64, computed: usize) -> RunningView {
        let grow = usize::from(computed.is_multiple_of(16));
        RunningView { id, computed, pending: 1, grow, frees: computed.div_ceil(16) }
    }
    fn prefill(id: u64, computed: usize, pending: usize) -> RunningView {
        RunningView { id, computed, pending, grow: 0, frees: (computed + pending).div_ceil(16) }
    }
    fn waiting(id: u64, to_compute: usize) -> WaitingView {
        WaitingView { id, to_compute, need: to_compute.div_ceil(16) }
    }
    const ROOMY: Limits = Limits { max_batched_tokens: 512, max_seqs: 16, kv_blocks: 1 << 20 };

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
        // Three decodes at a block boundary each need a block; one is available.
        let limits = Limits { kv_blocks: 1, ..ROOMY };
        let running = [decode(1, 48), decode(2, 48), decode(3, 32)];
        let p = plan(&running, &[waiting(4, 1)], limits);
        // Preempting 3 frees its two blocks: enough for 1 and 2.
        assert_eq!(p.preempted, vec![3]);
        assert_eq!(p.chunks, vec![(1, 1), (2, 1)]);
        assert!(p.admitted.is_empty(), "no admission in a step that preempted");
        // Blocks shared with others are not freed by preempting their holder.
        let mut shared = decode(2, 48);
        shared.frees = 0;
        let mut newest = decode(3, 48);
        newest.frees = 1;
        let p = plan(&[decode(1, 48), shared, newest], &[], Limits { kv_blocks: 0, ..ROOMY });
        assert_eq!(p.preempted, vec![3, 2]);
    }

    #[test]
    fn admission_counts_blocks_not_tokens() {
        let limits = Limits { kv_blocks: 4, ..ROOMY };
        // The runner is mid-block: it needs no block this step.
        let mut w = waiting(2, 30);
        w.need = 5;
        assert!(plan(&[decode(1, 40)], &[w.clone()], limits).admitted.is_empty());
        w.need = 4;
        assert_eq!(plan(&[decode(1, 40)], &[w.clone()], limits).admitted, vec![2]);
        // A runner at a block boundary takes one first.
        assert!(plan(&[decode(1, 48)], &[w], limits).admitted.is_empty());
    }

    #[test]
    fn the_head_of_the_queue_is_not_starved_by_smaller_requests() {
        // 10 blocks free while the runner holds its 32.
        let limits = Limits { kv_blocks: 10, max_batched_tokens: 1024, ..ROOMY };
        let p = plan(&[decode(1, 500)], &[waiting(2, 600), waiting(3, 10)], limits);
        assert!(p.admitted.is_empty(), "request 3 must not jump ahead of request 2");
        // Once the runner's blocks are free, the head goes first.
        let limits = Limits { kv_blocks: 42, ..limits };
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
