//! Running one batch line: the same parsing, validation, engine and response body as the
//! interactive endpoint (`api::routes::chat` / `completion`), with the batch's caller.

use std::time::Instant;

use axum::http::StatusCode;
use heddle_core::Priority;
use serde_json::{json, Value};

use super::objects::BatchEndpoint;
use crate::api::auth::Caller;
use crate::api::errors::ApiError;
use crate::api::openai::{ChatCompletionRequest, CompletionRequest};
use crate::api::routes::{self, new_id, Reply};
use crate::api::AppState;

/// What one attempt at a line came to.
#[derive(Debug)]
pub enum Attempt {
    /// The line has its answer: its output-file line and whether it succeeded (200).
    Answered { succeeded: bool, result: Value },
    /// The server could not take it now (a full waiting queue, a model reloading): the
    /// line is tried again later, not failed.
    RetryLater(ApiError),
}

/// Runs a line's body against `endpoint` on behalf of `caller`.
pub async fn run(
    state: &AppState,
    caller: &Caller,
    endpoint: BatchEndpoint,
    custom_id: &str,
    body: &str,
) -> Attempt {
    let answer = match answer(state, caller, endpoint, body).await {
        Ok(body) => Ok(body),
        Err(error) if is_transient(&error) => return Attempt::RetryLater(error),
        Err(error) => Err(error),
    };
    let (status, body) = match &answer {
        Ok(body) => (StatusCode::OK, body.clone()),
        Err(error) => (
            error.status,
            serde_json::from_str(&error.body_json()).unwrap_or(Value::Null),
        ),
    };
    Attempt::Answered {
        succeeded: answer.is_ok(),
        result: json!({
            "id": new_id("batch_req_"),
            "custom_id": custom_id,
            "response": {
                "status_code": status.as_u16(),
                "request_id": new_id("req_"),
                "body": body,
            },
            "error": null,
        }),
    }
}

/// 429 (a full waiting queue, displaced by more urgent requests) and 503 (shutting down,
/// model unloaded or without memory now) say "later", not "never".
fn is_transient(error: &ApiError) -> bool {
    matches!(
        error.status,
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
    )
}

async fn answer(
    state: &AppState,
    caller: &Caller,
    endpoint: BatchEndpoint,
    body: &str,
) -> Result<Value, ApiError> {
    let arrived = Instant::now();
    let mut body: Value = serde_json::from_str(body)
        .map_err(|error| ApiError::bad_request(format!("The line's body is not JSON: {error}")))?;
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        return Err(ApiError::invalid_param(
            "stream",
            "A batch line cannot stream: its answer is a line of the output file.",
        ));
    }
    if body.get("priority").is_none_or(Value::is_null) && allows_low(caller) {
        body["priority"] = Value::from(Priority::Low.as_str());
    }
    let parse_error = |error: serde_json::Error| {
        ApiError::bad_request(format!(
            "We could not parse the JSON body of your request: {error}"
        ))
    };
    match endpoint {
        BatchEndpoint::ChatCompletions => {
            let request: ChatCompletionRequest =
                serde_json::from_value(body).map_err(parse_error)?;
            whole(routes::chat(state, caller, request, arrived).await?)
        }
        BatchEndpoint::Completions => {
            let request: CompletionRequest = serde_json::from_value(body).map_err(parse_error)?;
            whole(routes::completion(state, caller, request, arrived).await?)
        }
    }
}

/// Batch lines run at LOW priority unless they ask for another; a key whose tier does
/// not allow LOW runs them at its default.
fn allows_low(caller: &Caller) -> bool {
    match caller {
        Caller::Anonymous => true,
        Caller::Key(tier) => tier.allowed.contains(&Priority::Low),
    }
}

fn whole<T: serde::Serialize>(reply: Reply<T>) -> Result<Value, ApiError> {
    match reply {
        Reply::Whole(body) => serde_json::to_value(body)
            .map_err(|error| ApiError::internal(format!("Serializing the answer failed: {error}"))),
        // `stream: true` was refused above.
        Reply::Stream(_) => Err(ApiError::internal(
            "A batch line was answered with a stream.",
        )),
    }
}
