//! A place for each generation request, taken at handler entry before its body is parsed or
//! any media fetched: when all places are taken the request is answered 429 at once, so work
//! in progress (bodies, fetches, decodes, engine queue) is bounded by the number of places.
//! The permit travels with the response (an SSE stream holds it until its last event).
//!
//! And a share of the in-flight byte budget (`--max-inflight-media-bytes`), taken before the
//! body is read: three times the body's declared length (the body, its parsed text, and the
//! media decoded from it are each about that size), held until the prompt is built and they are
//! gone. A burst of large requests waits for bytes (their bodies stay in the kernel's socket
//! buffers meanwhile) and gets 429 past the body timeout, instead of growing the heap.

use crate::error::{ApiError, ErrorKind};
use crate::state::Shared;
use axum::extract::FromRequestParts;
use axum::http::header::CONTENT_LENGTH;
use axum::http::request::Parts;
use tokio::sync::OwnedSemaphorePermit;

/// The budget's unit: permits count KiB (a semaphore takes at most u32 permits at once).
pub const UNIT: usize = 1024;

/// Bytes a request is charged per byte of its body.
const PER_BODY_BYTE: usize = 3;

/// A request's share of the in-flight byte budget; dropping it gives the bytes back.
pub struct InflightBytes(#[allow(dead_code)] OwnedSemaphorePermit);

/// KiB charged for a body of `declared` bytes (the largest accepted body when undeclared).
pub fn charge(declared: Option<usize>, max_body: usize) -> u32 {
    let bytes = declared.unwrap_or(max_body).min(max_body) * PER_BODY_BYTE;
    u32::try_from(bytes.div_ceil(UNIT)).unwrap_or(u32::MAX)
}

impl FromRequestParts<Shared> for InflightBytes {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, shared: &Shared) -> Result<Self, ApiError> {
        let declared = parts.headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        shared.inflight.take(declared).await
    }
}

/// The in-flight byte budget every handler with a body shares.
#[derive(Clone)]
pub struct InflightBudget {
    pub semaphore: std::sync::Arc<tokio::sync::Semaphore>,
    pub capacity_kib: usize,
    /// How long a request may wait for its bytes (the body timeout).
    pub wait: std::time::Duration,
    /// The largest body accepted (`--max-body`), charged for a body of undeclared length.
    pub max_body: usize,
}

impl InflightBudget {
    /// A body of `declared` bytes' share: at once if free, after a wait of at most `wait`, or
    /// 429 (413 if it is more than the whole budget).
    pub async fn take(&self, declared: Option<usize>) -> Result<InflightBytes, ApiError> {
        let units = charge(declared, self.max_body);
        if units as usize > self.capacity_kib {
            return Err(ApiError::new(
                ErrorKind::PayloadTooLarge,
                format!(
                    "the body and the media in it would take about {:.1} MiB while in flight, more than the \
                     server's whole budget for them ({:.1} MiB, max_inflight_media_bytes)",
                    (units as usize * UNIT) as f64 / (1 << 20) as f64,
                    (self.capacity_kib * UNIT) as f64 / (1 << 20) as f64
                ),
            ));
        }
        let wait = self.semaphore.clone().acquire_many_owned(units);
        match tokio::time::timeout(self.wait, wait).await {
            Ok(Ok(permit)) => Ok(InflightBytes(permit)),
            _ => {
                metrics::counter!("weft:requests_refused_total", "reason" => "inflight_bytes").increment(1);
                Err(ApiError::new(
                    ErrorKind::Overloaded,
                    "the server is busy with other large requests (max_inflight_media_bytes); retry later",
                ))
            }
        }
    }

    /// Bytes taken now, and the whole budget.
    pub fn usage(&self) -> (usize, usize) {
        let free = self.semaphore.available_permits();
        ((self.capacity_kib - free) * UNIT, self.capacity_kib * UNIT)
    }

    pub fn new(bytes: usize, wait: std::time::Duration, max_body: usize) -> Self {
        let capacity_kib = bytes / UNIT;
        InflightBudget {
            semaphore: std::sync::Arc::new(tokio::sync::Semaphore::new(capacity_kib)),
            capacity_kib,
            wait,
            max_body,
        }
    }
}

pub struct Admission(#[allow(dead_code)] OwnedSemaphorePermit);

impl FromRequestParts<Shared> for Admission {
    type Rejection = ApiError;

    async fn from_request_parts(_parts: &mut Parts, shared: &Shared) -> Result<Self, ApiError> {
        match shared.admission.clone().try_acquire_owned() {
            Ok(permit) => Ok(Admission(permit)),
            Err(_) => {
                metrics::counter!("weft:requests_refused_total", "reason" => "overloaded").increment(1);
                Err(ApiError::new(
                    ErrorKind::Overloaded,
                    format!(
                        "the server is at capacity ({} requests in progress); retry later",
                        shared.admission_capacity
                    ),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_is_charged_three_times_its_declared_length() {
        assert_eq!(charge(Some(1024), 1 << 20), 3);
        assert_eq!(charge(Some(1), 1 << 20), 1, "rounded up to a KiB");
        assert_eq!(charge(None, 1 << 20), 3 * 1024, "undeclared: the largest body");
        assert_eq!(charge(Some(usize::MAX), 1 << 20), 3 * 1024, "no more than the largest body");
    }

    #[tokio::test]
    async fn past_the_budget_requests_wait_then_get_429_and_more_than_it_413() {
        // 30 KiB: two bodies of 4 KiB (12 KiB each) fit, a third does not.
        let budget = InflightBudget::new(30 * UNIT, std::time::Duration::ZERO, 1 << 20);
        let (a, b) = (budget.take(Some(4096)).await.unwrap(), budget.take(Some(4096)).await.unwrap());
        let refused = budget.take(Some(4096)).await.err().unwrap();
        assert_eq!(refused.kind, ErrorKind::Overloaded, "{}", refused.message);
        drop(a);
        let c = budget.take(Some(4096)).await.unwrap();
        drop((b, c));
        assert_eq!(budget.take(Some(11 * 1024)).await.err().unwrap().kind, ErrorKind::PayloadTooLarge);
        assert_eq!(budget.semaphore.available_permits(), 30, "every byte given back");
    }
}
