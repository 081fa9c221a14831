//! A place for each generation request, taken at handler entry before its body is parsed or
//! any media fetched: when all places are taken the request is answered 429 at once, so work
//! in progress (bodies, fetches, decodes, engine queue) is bounded by the number of places.
//! The permit travels with the response (an SSE stream holds it until its last event).

use crate::error::{ApiError, ErrorKind};
use crate::state::Shared;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use tokio::sync::OwnedSemaphorePermit;

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
