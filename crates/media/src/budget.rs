//! The bytes one request's media may take in all, shared by its concurrent fetches and
//! charged while reading, so that a request over its budget stops at the byte that crosses it.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct ByteBudget {
    remaining: Arc<AtomicUsize>,
    limit: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the media of this request add up to more than the limit of {limit} bytes")]
pub struct OverBudget {
    pub limit: usize,
}

impl ByteBudget {
    pub fn new(limit: usize) -> Self {
        ByteBudget { remaining: Arc::new(AtomicUsize::new(limit)), limit }
    }

    /// Takes `n` bytes, or refuses if fewer are left.
    pub fn take(&self, n: usize) -> Result<(), OverBudget> {
        self.remaining
            .fetch_update(Relaxed, Relaxed, |r| r.checked_sub(n))
            .map(drop)
            .map_err(|_| OverBudget { limit: self.limit })
    }

    pub fn limit(&self) -> usize {
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_between_clones_and_exact() {
        let a = ByteBudget::new(10);
        let b = a.clone();
        a.take(6).unwrap();
        assert_eq!(b.take(5), Err(OverBudget { limit: 10 }));
        b.take(4).unwrap();
        assert!(a.take(1).is_err());
    }
}
