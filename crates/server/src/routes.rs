//! The router: routes, authentication, request ids, body limits, and the small endpoints
//! (models, health, readiness, version, tokenize, metrics, OpenAPI).

use crate::error::{ApiError, ApiJson, BodyDeadline, ErrorKind};
use crate::state::{Loaded, Shared};
use crate::wire::*;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use std::sync::Arc;
use utoipa::OpenApi;
use weft_engine::Health;

pub const REQUEST_ID: &str = "x-request-id";

#[derive(OpenApi)]
#[openapi(
    info(title = "Weft", description = "OpenAI-compatible API for LLaVA-NeXT-Interleave"),
    paths(
        crate::chat::chat_completions,
        crate::completions::completions,
        crate::responses::create_response,
        list_models,
        get_model,
        health,
        ready,
        version,
        tokenize,
        metrics_endpoint
    ),
    components(schemas(
        ErrorBody,
        ChatCompletionRequest,
        ChatCompletion,
        ChatCompletionChunk,
        CompletionRequest,
        Completion,
        ModelList,
        ModelCard,
        TokenizeRequest,
        TokenizeResponse,
        crate::responses_wire::ResponsesRequest,
        crate::responses_wire::ResponseObject
    ))
)]
pub struct ApiDoc;

/// Limits on request bodies, enforced before and while they are read.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub max_bytes: usize,
    /// The whole body must arrive within this time.
    pub timeout: std::time::Duration,
}

pub fn router(shared: Shared, body: BodyLimits) -> Router {
    let protected = Router::new()
        .route("/v1/chat/completions", post(crate::chat::chat_completions))
        .route("/v1/completions", post(crate::completions::completions))
        .route("/v1/responses", post(crate::responses::create_response))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/version", get(version))
        .route("/tokenize", post(tokenize))
        .route("/openapi.json", get(openapi_json));
    let protected = if shared.metrics_auth { protected.route("/metrics", get(metrics_endpoint)) } else { protected };
    let protected = protected.route_layer(middleware::from_fn_with_state(shared.clone(), auth));
    let open = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/", get(playground))
        .route("/playground", get(playground));
    let open = if shared.metrics_auth { open } else { open.route("/metrics", get(metrics_endpoint)) };
    protected
        .merge(open)
        .fallback(|| async { ApiError::new(ErrorKind::RouteNotFound, "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(ErrorKind::MethodNotAllowed, "method not allowed on this route")
        })
        .layer(axum::extract::DefaultBodyLimit::max(body.max_bytes))
        .layer(middleware::from_fn_with_state(body, guard_body))
        .layer(middleware::from_fn(request_ids))
        .with_state(shared)
}

/// Accepts the client's `x-request-id` or makes one, echoes it, and tags the tracing span.
async fn request_ids(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.chars().all(|c| c.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()));
    let value = HeaderValue::from_str(&id).expect("ascii");
    req.headers_mut().insert(REQUEST_ID, value.clone());
    let span = tracing::info_span!("request", id = %id, method = %req.method(), path = %req.uri().path());
    let mut response = tracing::Instrument::instrument(next.run(req), span).await;
    response.headers_mut().insert(REQUEST_ID, value);
    response
}

/// Refuses a body whose declared length is over the limit before reading any of it (a client
/// declaring 300 MB and sending nothing gets its 413 at once), and gives the body extractor
/// its deadline.
async fn guard_body(State(limits): State<BodyLimits>, mut req: Request, next: Next) -> Response {
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_bytes as u64) {
        return ApiError::new(ErrorKind::PayloadTooLarge, "the request body is larger than the server accepts")
            .into_response();
    }
    req.extensions_mut().insert(BodyDeadline(limits.timeout));
    next.run(req).await
}

/// Constant-time comparison, so that timing does not reveal how much of a key matched.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(State(shared): State<Shared>, req: Request, next: Next) -> Response {
    if shared.api_keys.is_empty() {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compare against every key, without stopping early.
    let ok = shared.api_keys.iter().fold(false, |ok, key| ok | same_secret(presented.as_bytes(), key.as_bytes()));
    if ok {
        next.run(req).await
    } else {
        ApiError::new(ErrorKind::Unauthorized, "a valid API key is required (Authorization: Bearer <key>)")
            .into_response()
    }
}

pub fn loaded(shared: &Shared) -> Result<Arc<Loaded>, ApiError> {
    if shared.shutting_down.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(ApiError::new(ErrorKind::NotReady, "the server is shutting down"));
    }
    let state =
        shared.loaded.get().cloned().ok_or_else(|| ApiError::new(ErrorKind::NotReady, "the model is still loading"))?;
    engine_alive(&state)?;
    Ok(state)
}

/// 503 once the engine has failed for good (the process is then about to exit).
fn engine_alive(state: &Loaded) -> Result<(), ApiError> {
    match &*state.engine.health().borrow() {
        Health::Failed(why) => Err(ApiError::new(ErrorKind::NotReady, format!("the engine has failed: {why}"))),
        Health::Serving => Ok(()),
    }
}

/// Requests name the served model; any other name is a 404 naming `param`.
pub fn check_model(shared: &Shared, name: &str, param: &str) -> Result<(), ApiError> {
    if name == shared.model_name {
        Ok(())
    } else {
        Err(ApiError::new(ErrorKind::ModelNotFound, format!("the model `{name}` does not exist")).with_param(param))
    }
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub fn request_id(headers: &HeaderMap) -> String {
    headers.get(REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("0").to_string()
}

pub fn fingerprint() -> String {
    concat!("weft-", env!("CARGO_PKG_VERSION")).to_string()
}

fn card(shared: &Shared) -> ModelCard {
    let max_model_len = shared.loaded.get().map_or(0, |l| l.context_len);
    ModelCard {
        id: shared.model_name.clone(),
        object: "model",
        created: shared.started,
        owned_by: "weft",
        max_model_len,
    }
}

#[utoipa::path(get, path = "/v1/models", responses((status = 200, body = ModelList)))]
pub async fn list_models(State(shared): State<Shared>) -> axum::Json<ModelList> {
    axum::Json(ModelList { object: "list", data: vec![card(&shared)] })
}

#[utoipa::path(get, path = "/v1/models/{id}", params(("id" = String, Path)), responses((status = 200, body = ModelCard), (status = 404, body = ErrorBody)))]
pub async fn get_model(
    State(shared): State<Shared>,
    Path(id): Path<String>,
) -> Result<axum::Json<ModelCard>, ApiError> {
    check_model(&shared, &id, "id")?;
    Ok(axum::Json(card(&shared)))
}

/// Liveness: the process answers and its engine has not failed (503 once it has: the process
/// is then about to exit).
#[utoipa::path(get, path = "/health", responses((status = 200), (status = 503, body = ErrorBody)))]
pub async fn health(State(shared): State<Shared>) -> Result<StatusCode, ApiError> {
    shared.loaded.get().map_or(Ok(()), |l| engine_alive(l))?;
    Ok(StatusCode::OK)
}

/// Readiness: 200 once the model is loaded and warm, 503 before, while shutting down, and once
/// the engine has failed.
#[utoipa::path(get, path = "/ready", responses((status = 200), (status = 503, body = ErrorBody)))]
pub async fn ready(State(shared): State<Shared>) -> Result<StatusCode, ApiError> {
    loaded(&shared).map(|_| StatusCode::OK)
}

#[utoipa::path(get, path = "/version", responses((status = 200)))]
pub async fn version() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({"version": env!("CARGO_PKG_VERSION")}))
}

#[utoipa::path(post, path = "/tokenize", request_body = TokenizeRequest, responses((status = 200, body = TokenizeResponse), (status = 400, body = ErrorBody)))]
pub async fn tokenize(
    State(shared): State<Shared>,
    _place: crate::admission::Admission,
    _bytes: crate::admission::InflightBytes,
    ApiJson(req): ApiJson<TokenizeRequest>,
) -> Result<axum::Json<TokenizeResponse>, ApiError> {
    let state = loaded(&shared)?;
    if let Some(model) = &req.model {
        check_model(&shared, model, "model")?;
    }
    let (tokens, images) = match (&req.messages, &req.prompt) {
        (Some(messages), None) => crate::prompt::chat_token_ids(&state, messages, req.add_generation_prompt).await?,
        (None, Some(prompt)) => (state.prompts.tokenize(prompt).map_err(|e| ApiError::prompt(e, "prompt"))?, 0),
        _ => return Err(ApiError::invalid("messages", "give exactly one of `messages` and `prompt`")),
    };
    Ok(axum::Json(TokenizeResponse {
        count: tokens.len(),
        max_model_len: state.context_len,
        images,
        image_tokens: images * state.prompts.tokens_per_image(),
        tokens,
    }))
}

/// The playground page (no key needed to load it; its requests carry the key typed in it).
async fn playground() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], include_str!("playground.html"))
}

async fn openapi_json() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(ApiDoc::openapi())
}

/// Prometheus metrics: engine gauges read at scrape time, plus the request histograms.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format")))]
pub async fn metrics_endpoint(State(shared): State<Shared>) -> Response {
    let (taken, budget) = shared.inflight.usage();
    metrics::gauge!("weft:inflight_media_bytes").set(taken as f64);
    metrics::gauge!("weft:inflight_media_budget_bytes").set(budget as f64);
    if let Some(loaded) = shared.loaded.get() {
        let in_progress = shared.admission_capacity - shared.admission.available_permits();
        crate::prometheus::publish_engine(&loaded.engine.stats(), in_progress);
    }
    let body = shared.prometheus.render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}
