//! The OpenAI-compatible HTTP API.
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
//! `GET /v1/models/{id}`, `GET /health` (the process is alive), `GET /ready` (the startup
//! loads are done and the server is not shutting down), `GET /metrics` (Prometheus text),
//! and admin routes: `GET /admin/models`, `POST /admin/models/{id}/load`,
//! `POST /admin/models/{id}/unload`.
//!
//! Choices this API makes where OpenAI's leaves room:
//! - Errors are `{"error": {"message", "type", "param", "code"}}`. Every malformed body
//!   (bad JSON, wrong field types, any content type) is 400 `invalid_request_error`;
//!   a body over the limit is 413; an unknown route is 404 and a wrong method 405.
//! - A request may ask for a priority its API key does not allow: 403 `permission_error`.
//! - A sequence the engine cancels without the client asking ends the request with an
//!   error instead of a finish_reason: 503 when the server is shutting down or the model
//!   was unloaded, 429 when a more urgent request displaced it from a full waiting queue;
//!   an engine failure is 500. In a stream, whose status is already sent, the error
//!   arrives as `data: {"error": ...}` followed by `data: [DONE]`.
//! - With `n` > 1 and a `seed`, choice i uses seed + i so that the choices differ.
//! - A request field heddle does not implement (`tools`, `response_format`, `echo`, ...)
//!   or does not know is refused with a 400 naming it, never ignored; informational ones
//!   (`user`, `metadata`, ...) are accepted (docs/API.md lists every field).
//! - `logprobs` token texts of partial UTF-8 characters show U+FFFD.

pub mod auth;
pub mod errors;
pub mod generation;
pub mod openai;
pub mod params;
pub mod routes;
pub mod sse;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use tower_http::catch_panic::CatchPanicLayer;

use crate::metrics::Metrics;
use crate::pool::{LoadedModel, ModelPool, PoolError};
use auth::ApiKeys;
use errors::ApiError;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub pool: Arc<ModelPool>,
    pub metrics: Arc<Metrics>,
    pub keys: Arc<ApiKeys>,
    pub max_body_bytes: usize,
    /// Set once the startup loads are done.
    pub ready: Arc<AtomicBool>,
    /// Unix time the server started; the `created` of every model card.
    pub started: u64,
}

impl AppState {
    pub fn new(pool: Arc<ModelPool>, keys: ApiKeys, max_body_bytes: usize) -> Self {
        AppState {
            metrics: pool.metrics().clone(),
            pool,
            keys: Arc::new(keys),
            max_body_bytes,
            ready: Arc::new(AtomicBool::new(false)),
            started: unix_now(),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.pool.is_shutting_down()
    }

    /// The model's engine, loading it if needed, with pool errors as API errors.
    pub async fn model(&self, id: &str) -> Result<Arc<LoadedModel>, ApiError> {
        self.pool.acquire(id).await.map_err(|error| match error {
            PoolError::UnknownModel(model) => ApiError::model_not_found(&model),
            PoolError::ShuttingDown => {
                ApiError::unavailable("shutting_down", "The server is shutting down.")
            }
            PoolError::OverBudget { .. } => {
                ApiError::unavailable("insufficient_memory", error.to_string())
            }
            PoolError::LoadFailed { .. } => ApiError::internal(error.to_string()),
        })
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The API's router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(routes::health))
        .route("/ready", get(routes::ready))
        .route("/metrics", get(routes::metrics))
        .route("/v1/models", get(routes::list_models))
        .route("/v1/models/{*id}", get(routes::get_model))
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/completions", post(routes::completions))
        .route("/admin/models", get(routes::admin_list))
        .route("/admin/models/{id}/load", post(routes::admin_load))
        .route("/admin/models/{id}/unload", post(routes::admin_unload))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .layer(CatchPanicLayer::custom(|_| panicked()))
        .with_state(state)
}

/// A handler panicked (a bug): the client still gets an OpenAI-shaped 500.
fn panicked() -> Response {
    ApiError::internal("The server hit an internal error; see its log.").into_response()
}

/// A JSON body, whatever its content type, with every rejection in OpenAI's format:
/// 413 over the size limit, 400 for anything else.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::payload_too_large(state.max_body_bytes)
                } else {
                    ApiError::bad_request(format!("Could not read the request body: {rejection}"))
                }
            })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|error| {
                ApiError::bad_request(format!(
                    "We could not parse the JSON body of your request: {error}"
                ))
            })
    }
}
