//! API errors: one table maps each error kind to its HTTP status, OpenAI `type` and `code`;
//! bodies always have the shape `{"error": {"message", "type", "param", "code"}}`.

use crate::wire::{ErrorBody, ErrorDetail};
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use weft_engine::{EngineError, PromptError, SubmitError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidRequest,
    ContextLength,
    Unauthorized,
    ModelNotFound,
    RouteNotFound,
    MethodNotAllowed,
    PayloadTooLarge,
    UnsupportedMediaType,
    MediaUnprocessable,
    Overloaded,
    RequestTimeout,
    Timeout,
    NotReady,
    Internal,
}

impl ErrorKind {
    /// The table: status, OpenAI error `type`, and `code`.
    pub fn table(self) -> (StatusCode, &'static str, &'static str) {
        use ErrorKind::*;
        match self {
            InvalidRequest => (StatusCode::BAD_REQUEST, "invalid_request_error", "invalid_request"),
            ContextLength => (StatusCode::BAD_REQUEST, "invalid_request_error", "context_length_exceeded"),
            Unauthorized => (StatusCode::UNAUTHORIZED, "authentication_error", "invalid_api_key"),
            ModelNotFound => (StatusCode::NOT_FOUND, "invalid_request_error", "model_not_found"),
            RouteNotFound => (StatusCode::NOT_FOUND, "invalid_request_error", "not_found"),
            MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", "method_not_allowed"),
            PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", "payload_too_large"),
            UnsupportedMediaType => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "invalid_request_error", "unsupported_media_type")
            }
            MediaUnprocessable => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error", "invalid_media"),
            Overloaded => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "overloaded"),
            RequestTimeout => (StatusCode::REQUEST_TIMEOUT, "invalid_request_error", "request_timeout"),
            Timeout => (StatusCode::GATEWAY_TIMEOUT, "timeout_error", "timeout"),
            NotReady => (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", "not_ready"),
            Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error", "internal_error"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    pub param: Option<String>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError { kind, message: message.into(), param: None }
    }
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError { kind: ErrorKind::InvalidRequest, message: message.into(), param: Some(param.into()) }
    }
    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn body(&self) -> ErrorBody {
        let (_, kind, code) = self.kind.table();
        ErrorBody {
            error: ErrorDetail { message: self.message.clone(), kind, param: self.param.clone(), code: Some(code) },
        }
    }
}

impl ApiError {
    /// A prompt the engine's builder refused; `param` is the field the prompt came from
    /// (`messages` or `prompt`): the engine names none.
    pub fn prompt(e: PromptError, param: &str) -> Self {
        match e {
            PromptError::Preprocess(_) => ApiError::new(ErrorKind::Internal, e.to_string()),
            PromptError::ImageInText => {
                ApiError::invalid(param, "text completions take no images; use /v1/chat/completions")
            }
            _ => ApiError::invalid(param, e.to_string()),
        }
    }

    /// A request the engine refused at submission; `param` as for [`ApiError::prompt`].
    pub fn submit(e: SubmitError, param: &str) -> Self {
        let (kind, param) = match &e {
            SubmitError::PromptTooLong { .. } => (ErrorKind::ContextLength, Some(param)),
            SubmitError::Overloaded { .. } => (ErrorKind::Overloaded, None),
            SubmitError::Stopped => (ErrorKind::NotReady, None),
        };
        ApiError { kind, message: e.to_string(), param: param.map(str::to_string) }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let kind = match e {
            EngineError::Internal(_) => ErrorKind::Internal,
            EngineError::Stopped(_) => ErrorKind::NotReady,
        };
        ApiError::new(kind, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, _, _) = self.kind.table();
        if status.is_server_error() {
            tracing::error!(message = %self.message, "request failed");
        }
        let mut response = (status, axum::Json(self.body())).into_response();
        if self.kind == ErrorKind::Overloaded {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// A JSON body extractor whose rejections are API errors: wrong content type -> 415, too large
/// -> 413, malformed JSON or a wrong field type -> 400 naming the field.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send + 'static> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json"));
        if !is_json {
            return Err(ApiError::new(
                ErrorKind::UnsupportedMediaType,
                "the body must be JSON (Content-Type: application/json)",
            ));
        }
        let deadline = req.extensions().get::<BodyDeadline>().map_or(std::time::Duration::MAX, |d| d.0);
        let read = axum::body::Bytes::from_request(req, state);
        let bytes = tokio::time::timeout(deadline, read)
            .await
            .map_err(|_| ApiError::new(ErrorKind::RequestTimeout, "the request body did not arrive in time"))?
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(ErrorKind::PayloadTooLarge, "the request body is larger than the server accepts")
                } else {
                    ApiError::new(ErrorKind::InvalidRequest, format!("cannot read the body: {rejection}"))
                }
            })?;
        // Large bodies (images as data URIs) take milliseconds to parse: not on an async worker.
        if bytes.len() > 1 << 20 {
            return tokio::task::spawn_blocking(move || parse(&bytes))
                .await
                .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
        }
        parse(&bytes)
    }
}

/// How long a request's body may take to arrive in all (set by the router's body guard).
#[derive(Debug, Clone, Copy)]
pub struct BodyDeadline(pub std::time::Duration);

/// JSON -> `T`, naming the offending field in the error.
fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<ApiJson<T>, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize(de) {
        Ok(value) => Ok(ApiJson(value)),
        Err(e) => {
            let mut path = e.path().to_string();
            let inner = e.into_inner();
            if (path.is_empty() || path == ".") && inner.is_data() {
                // serde loses the path inside `#[serde(flatten)]` fields: look for the
                // offending field in the flattened sampling fields directly.
                if let Ok(value) = serde_json::from_slice::<serde_json::Value>(bytes) {
                    if let Err(e) = serde_path_to_error::deserialize::<_, crate::wire::SamplingFields>(value) {
                        path = e.path().to_string();
                    }
                }
            }
            let message = if inner.is_syntax() || inner.is_eof() {
                format!("the body is not valid JSON: {inner}")
            } else {
                format!("invalid value: {inner}")
            };
            let err = ApiError::new(ErrorKind::InvalidRequest, message);
            Err(if path == "." || path.is_empty() { err } else { err.with_param(path) })
        }
    }
}
