//! Where the model's passes run: on a thread of rayon's pool (the compute pool), with the other
//! threads either sleeping between the pass's parallel loops, as rayon's threads do, or
//! spinning, as OpenMP's threads do by default (what torch runs on).
//!
//! A decode step is some 170 products and attention loops a few tens of microseconds apart; a
//! rayon thread that finds no work sleeps within microseconds, and waking it (a futex, and on a
//! virtual machine the host's wake-up of an idle vCPU) cost every loop part of its time: one
//! stream's decode after an image went from 21.7 to 23.6-24.3 tokens/s on a 2-core AMX Xeon
//! with the threads spinning, 16 streams' decode steps from 60.3 to 54.1 ms. The same spinning
//! made an image's encode and a 754-token prefill 5-15% slower: candle runs elementwise
//! operations of 64 Ki values or more (the residual adds) on threads of its own, which then
//! wait for the cores the spinning threads hold (with those adds moved onto this pool, spinning
//! still cost an image's first token about 2%). So callers choose; decode steps' adds are
//! small enough that candle runs them on the calling thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What the compute pool's other threads do while a pass runs on one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// Sleep when they find no work (rayon's way): for passes of long loops.
    Sleep,
    /// Look for work without sleeping until the pass ends: for passes of many short loops.
    Spin,
}

/// Runs `f` on a thread of the compute pool while the caller waits, the other threads doing
/// what `idle` says meanwhile. A product issued from a pool thread is split with the other
/// threads directly; issued from outside the pool, each one costs the caller a sleep and a
/// wake-up.
pub fn on_compute_pool<R: Send>(idle: Idle, f: impl FnOnce() -> R + Send) -> R {
    let finished = &AtomicBool::new(false);
    rayon::scope(|scope| {
        if idle == Idle::Spin {
            let owner = rayon::current_thread_index();
            for _ in 1..rayon::current_num_threads() {
                scope.spawn(move |scope| spin(scope, finished, owner));
            }
        }
        let result = f();
        finished.store(true, Ordering::Release);
        result
    })
}

/// How long a spinning thread looks for work in vain before it lets go of its stack (see
/// [`spin`]): longer than the gaps between a decode step's loops.
const SPIN_WINDOW: Duration = Duration::from_micros(200);

/// Runs the pool's pending jobs as they come until the pass is `finished`. The thread may have
/// picked this job up while waiting inside another job (rayon's joins run other work while they
/// wait), and that job may be what the pass is waiting for: so after [`SPIN_WINDOW`] without
/// work it returns, leaving a fresh spinner in its place, and the job below resumes if its wait
/// is over. The thread running the pass (`owner`) never spins: the pass itself is below it.
fn spin<'s>(scope: &rayon::Scope<'s>, finished: &'s AtomicBool, owner: Option<usize>) {
    if rayon::current_thread_index() == owner {
        return;
    }
    let mut idle_since = Instant::now();
    while !finished.load(Ordering::Acquire) {
        if rayon::yield_now() == Some(rayon::Yield::Executed) {
            idle_since = Instant::now();
        } else if idle_since.elapsed() > SPIN_WINDOW {
            scope.spawn(move |scope| spin(scope, finished, owner));
            return;
        } else {
            // A pause between looks, so that the owner's pushes and pops of its queue do not
            // contend with a thief on every cycle.
            (0..64).for_each(|_| std::hint::spin_loop());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    fn sum_of_squares(n: u64) -> u64 {
        (0..n).into_par_iter().map(|i| i * i).sum()
    }

    /// Passes that spin finish with the right results on pools of several sizes, from several
    /// callers at once, nested in one another and in the pool's own jobs.
    #[test]
    fn spinning_passes_finish_whoever_calls_them() {
        let want = |n: u64| (0..n).map(|i| i * i).sum::<u64>();
        for threads in [1, 2, 4] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            std::thread::scope(|callers| {
                for caller in 0..4u64 {
                    let pool = &pool;
                    callers.spawn(move || {
                        for round in 0..50 {
                            let n = 1000 + caller * 100 + round;
                            let idle = if round % 3 == 0 { Idle::Sleep } else { Idle::Spin };
                            let got = pool.install(|| {
                                on_compute_pool(idle, || {
                                    let inner = on_compute_pool(Idle::Spin, || sum_of_squares(n));
                                    let nested: Vec<u64> = (0..4u64)
                                        .into_par_iter()
                                        .map(|i| on_compute_pool(Idle::Spin, || sum_of_squares(n + i)))
                                        .collect();
                                    (inner, nested)
                                })
                            });
                            assert_eq!(got.0, want(n), "{threads} threads");
                            assert_eq!(got.1, (0..4).map(|i| want(n + i)).collect::<Vec<_>>());
                        }
                    });
                }
            });
        }
    }

    /// Outside any pool the pass runs on the global one and returns what `f` returns.
    #[test]
    fn a_pass_returns_its_result() {
        assert_eq!(on_compute_pool(Idle::Spin, || sum_of_squares(10)), 285);
        assert_eq!(on_compute_pool(Idle::Sleep, || 7), 7);
    }
}
