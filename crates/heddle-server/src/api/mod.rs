//! The OpenAI-compatible HTTP API.
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
//! `GET /v1/models/{id}`, `POST /tokenize`, `POST /detokenize`, `GET /health` (the process is alive), `GET /ready` (the startup
//! loads are done and the server is not shutting down), `GET /metrics` (Prometheus text),
//! and admin routes: `GET /admin/models`, `POST /admin/models/{id}/load`,
//! `POST /admin/models/{id}/unload`, and the Batch API (`/v1/files`, `/v1/batches`, see
//! [`crate::batch`]). Which key each needs: [`auth`].
//!
//! Choices this API makes where OpenAI's leaves room:
//! - Errors are `{"error": {"message", "type", "param", "code"}}`. Every malformed body
//!   (bad JSON, wrong field types, any content type) is 400 `invalid_request_error`;
//!   a body over the limit is 413 (at once when its Content-Length says so, before any of
//!   it is read), one that does not arrive within the body read timeout 408; an unknown
//!   route is 404 and a wrong method 405 (after the access check: without a key, 401).
//! - A request may ask for a priority its API key does not allow: 403 `permission_error`.
//! - A sequence the engine cancels without the client asking ends the request with an
//!   error instead of a finish_reason: 503 when the server is shutting down or the model
//!   was unloaded, 429 when a more urgent request displaced it from a full waiting queue;
//!   an engine failure is 500. In a stream, whose status is already sent, the error
//!   arrives as `data: {"error": ...}` followed by `data: [DONE]`.
//! - With `n` > 1 and a `seed`, choice i uses seed + i so that the choices differ.
//! - A request field heddle does not implement (`suffix`, `best_of`, ...)
//!   or does not know is refused with a 400 naming it, never ignored; informational ones
//!   (`user`, `metadata`, ...) are accepted (docs/API.md lists every field).
//! - `logprobs` token texts of partial UTF-8 characters show U+FFFD.

pub mod auth;
pub mod errors;
pub mod generation;
pub mod logit_bias;
pub mod openai;
pub mod params;
pub mod response_format;
pub mod routes;
pub mod server_info;
pub mod sse;
pub mod tokenize;
pub mod tool_call_parser;
pub mod tools;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::header::{CONNECTION, CONTENT_LENGTH};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use serde::de::DeserializeOwned;
use tower_http::catch_panic::CatchPanicLayer;

use crate::batch::runner::BatchRunner;
use crate::batch::{batches_api, files_api};
use crate::metrics::Metrics;
use crate::pool::{ModelPool, PoolError, ServedModel};
use auth::AccessControl;
use errors::ApiError;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub pool: Arc<ModelPool>,
    pub metrics: Arc<Metrics>,
    pub access: Arc<AccessControl>,
    pub max_body_bytes: usize,
    /// How long a handler waits for the whole request body.
    pub body_read_timeout: Duration,
    /// Set once the startup loads are done.
    pub ready: Arc<AtomicBool>,
    /// Unix time the server started; the `created` of every model card.
    pub started: u64,
    /// The Batch API's database and runner.
    pub batches: Arc<BatchRunner>,
}

impl AppState {
    pub fn new(
        pool: Arc<ModelPool>,
        access: AccessControl,
        max_body_bytes: usize,
        body_read_timeout: Duration,
        batches: Arc<BatchRunner>,
    ) -> Self {
        AppState {
            metrics: pool.metrics().clone(),
            pool,
            access: Arc::new(access),
            max_body_bytes,
            body_read_timeout,
            ready: Arc::new(AtomicBool::new(false)),
            started: unix_now(),
            batches,
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.pool.is_shutting_down()
    }

    /// The model's engine, loading it if needed, with pool errors as API errors.
    pub async fn model(&self, id: &str) -> Result<Arc<ServedModel>, ApiError> {
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

/// Every route of the API: its path and handlers. The router serves exactly these.
pub fn routes() -> Vec<(&'static str, MethodRouter<AppState>)> {
    vec![
        ("/health", get(routes::health)),
        ("/ready", get(routes::ready)),
        ("/metrics", get(routes::metrics)),
        ("/server_info", get(server_info::server_info)),
        ("/v1/models", get(routes::list_models)),
        ("/v1/models/{*id}", get(routes::get_model)),
        ("/v1/chat/completions", post(routes::chat_completions)),
        ("/v1/completions", post(routes::completions)),
        ("/v1/files", get(files_api::list).post(files_api::upload)),
        (
            "/v1/files/{id}",
            get(files_api::retrieve).delete(files_api::delete),
        ),
        ("/v1/files/{id}/content", get(files_api::content)),
        (
            "/v1/batches",
            get(batches_api::list).post(batches_api::create),
        ),
        ("/v1/batches/{id}", get(batches_api::retrieve)),
        ("/v1/batches/{id}/cancel", post(batches_api::cancel)),
        ("/tokenize", post(tokenize::tokenize)),
        ("/detokenize", post(tokenize::detokenize)),
        ("/admin/models", get(routes::admin_list)),
        ("/admin/models/{id}/load", post(routes::admin_load)),
        ("/admin/models/{id}/unload", post(routes::admin_unload)),
    ]
}

/// The API's router. Every request, whatever its route, passes the access check
/// ([`auth::check_access`]) and the body size check first.
pub fn router(state: AppState) -> Router {
    routes()
        .into_iter()
        .fold(Router::new(), |router, (path, handlers)| {
            router.route(path, handlers)
        })
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            refuse_oversized_bodies,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::check_access,
        ))
        .layer(CatchPanicLayer::custom(|_| panicked()))
        .with_state(state)
}

/// A request whose Content-Length is over the limit is answered 413 before any of its
/// body is read, with `connection: close`; the server then drains what the client still
/// sends for a bounded time (see `serve`), so that the client reads the 413 instead of a
/// connection reset. Bodies without a length are limited while they are read (JsonBody).
async fn refuse_oversized_bodies(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > state.max_body_bytes as u64) {
        let mut response = ApiError::payload_too_large(state.max_body_bytes).into_response();
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
        return response;
    }
    next.run(request).await
}

/// A handler panicked (a bug): the client still gets an OpenAI-shaped 500.
fn panicked() -> Response {
    ApiError::internal("The server hit an internal error; see its log.").into_response()
}

/// A JSON body, whatever its content type, with every rejection in OpenAI's format:
/// 413 over the size limit, 408 when it does not arrive within the body read timeout, 400
/// for anything else.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        let read = Bytes::from_request(request, state);
        let bytes = tokio::time::timeout(state.body_read_timeout, read)
            .await
            .map_err(|_| ApiError::body_timeout(state.body_read_timeout))?
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::payload_too_large(state.max_body_bytes)
                } else {
                    ApiError::bad_request(format!("Could not read the request body: {rejection}"))
                }
            })?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Parses a JSON body. A value of the wrong type (or a missing field) is a 400 naming its
/// place in the body as `param` (`temperature`, `messages[0]`); a body that is not JSON at
/// all is a 400 without one.
fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let unparsable = |error: &serde_json::Error| {
        format!("We could not parse the JSON body of your request: {error}")
    };
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        if !error.inner().is_data() {
            return ApiError::bad_request(unparsable(error.inner()));
        }
        let path = error.path().to_string();
        let place = if path == "." {
            culprit_field::<T>(bytes)
        } else {
            Some(path)
        };
        match place {
            Some(place) => ApiError::invalid_param(place, unparsable(error.inner())),
            None => ApiError::bad_request(unparsable(error.inner())),
        }
    })?;
    // Trailing characters after the value are refused, as serde_json::from_slice does.
    deserializer
        .end()
        .map_err(|error| ApiError::bad_request(unparsable(&error)))?;
    Ok(value)
}

/// The top-level field without which a body that failed to parse as `T` parses: where the
/// error is when the parser could not say (fields read through `#[serde(flatten)]` lose
/// their path). None when no single field is to blame.
fn culprit_field<T: DeserializeOwned>(bytes: &[u8]) -> Option<String> {
    let serde_json::Value::Object(fields) = serde_json::from_slice(bytes).ok()? else {
        return None;
    };
    fields.keys().find_map(|key| {
        let mut without = fields.clone();
        without.remove(key);
        serde_json::from_value::<T>(serde_json::Value::Object(without))
            .is_ok()
            .then(|| key.clone())
    })
}
