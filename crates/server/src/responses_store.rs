//! Stored responses for `previous_response_id`: each response's whole conversation (its input
//! items and its output, as input items) in memory, within a byte budget (least recently
//! stored dropped first) and for a time limit. Nothing survives a restart.

use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

struct Entry {
    items: Vec<Value>,
    bytes: usize,
    stored: Instant,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    /// Ids, oldest first.
    order: VecDeque<String>,
    bytes: usize,
}

/// About the bytes a JSON value holds (its strings and keys, and a word per other value),
/// counted without writing it out: a conversation's data URIs can be tens of megabytes.
fn size(value: &Value) -> usize {
    match value {
        Value::String(s) => s.len(),
        Value::Array(items) => items.iter().map(size).sum::<usize>() + 8,
        Value::Object(map) => map.iter().map(|(k, v)| k.len() + size(v)).sum::<usize>() + 8,
        _ => 8,
    }
}

pub struct ResponseStore {
    inner: Mutex<Inner>,
    budget: usize,
    ttl: Duration,
}

impl ResponseStore {
    pub fn new(budget: usize, ttl: Duration) -> Self {
        ResponseStore { inner: Mutex::new(Inner::default()), budget, ttl }
    }

    /// The conversation of response `id`, if it is still kept.
    pub fn get(&self, id: &str) -> Option<Vec<Value>> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let entry = inner.entries.get(id)?;
        (entry.stored.elapsed() <= self.ttl).then(|| entry.items.clone())
    }

    /// Keeps `items` under `id`, dropping expired and then the oldest entries to stay within the
    /// budget; a conversation larger than the whole budget is not kept.
    pub fn put(&self, id: String, items: Vec<Value>) {
        let bytes: usize = items.iter().map(size).sum::<usize>() + id.len();
        if bytes > self.budget {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(oldest) = inner.order.front() {
            let expired = inner.entries.get(oldest).is_none_or(|e| e.stored.elapsed() > self.ttl);
            if !expired && inner.bytes + bytes <= self.budget {
                break;
            }
            let oldest = inner.order.pop_front().expect("non-empty");
            if let Some(gone) = inner.entries.remove(&oldest) {
                inner.bytes -= gone.bytes;
            }
        }
        inner.bytes += bytes;
        inner.order.push_back(id.clone());
        inner.entries.insert(id, Entry { items, bytes, stored: Instant::now() });
    }

    /// Bytes kept now.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.inner.lock().unwrap().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_oldest_go_first_and_the_budget_holds() {
        let item = json!({"role": "user", "content": "x".repeat(100)});
        let size = super::size(&item) + 2;
        let store = ResponseStore::new(3 * size, Duration::from_secs(60));
        for i in 0..5 {
            store.put(format!("r{i}"), vec![item.clone()]);
            assert!(store.bytes() <= 3 * size);
        }
        assert!(store.get("r0").is_none() && store.get("r1").is_none());
        assert_eq!(store.get("r4").unwrap(), vec![item.clone()]);
        // Larger than the whole budget: not kept, and nothing else dropped for it.
        store.put("big".into(), vec![item.clone(); 4]);
        assert!(store.get("big").is_none() && store.get("r4").is_some());
    }

    #[test]
    fn entries_expire() {
        let store = ResponseStore::new(1 << 20, Duration::ZERO);
        store.put("r".into(), vec![json!({"role": "user", "content": "hi"})]);
        // Any time at all is past a zero time limit.
        assert!(store.get("r").is_none());
    }
}
