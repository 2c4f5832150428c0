//! The OpenAI Batch API: `/v1/files` and `/v1/batches`, run in-process at LOW priority
//! and kept in SQLite so that a batch survives a crash (docs/BATCH.md).
//!
//! A client uploads a JSONL file of requests (`files_api`), creates a batch over it
//! (`batches_api`), and the runner (`runner`) checks the file (`input`), then runs each
//! line through the same code as an interactive request (`line`) in a bounded number of
//! slots per model, committing every line's result (`store`) before counting it. The
//! objects on the wire are OpenAI's (`objects`).

pub mod batches_api;
pub mod files_api;
pub mod input;
pub mod line;
pub mod objects;
pub mod runner;
pub mod store;

use std::collections::HashMap;

use axum::http::StatusCode;

use crate::api::errors::ApiError;
use store::{ListQuery, StoreError};

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        tracing::error!(%error, "batch database");
        ApiError::internal("The batch database failed; see the server log.")
    }
}

/// 404 for an id that names no object: OpenAI's "No such File object: file-...".
fn no_such(kind: &str, id: &str) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!("No such {kind} object: {id}"),
        kind: "invalid_request_error",
        param: Some("id".into()),
        code: None,
        retry_after: None,
    }
}

/// A list's query string: `after`, `limit` (1 to `max_limit`), and `order` or a filter
/// where the list has them (`accepted`). Any other parameter is refused by name.
fn list_query(
    mut params: HashMap<String, String>,
    default_limit: usize,
    max_limit: usize,
    accepted: &[&str],
) -> Result<(ListQuery, HashMap<String, String>), ApiError> {
    let limit = match params.remove("limit") {
        None => default_limit,
        Some(text) => match text.parse::<usize>() {
            Ok(limit) if (1..=max_limit).contains(&limit) => limit,
            _ => {
                return Err(ApiError::invalid_param(
                    "limit",
                    format!("`limit` must be an integer from 1 to {max_limit}, got {text:?}."),
                ))
            }
        },
    };
    let after = params.remove("after");
    let ascending = match params.remove("order").as_deref() {
        None | Some("desc") => false,
        Some("asc") if accepted.contains(&"order") => true,
        Some(other) if accepted.contains(&"order") => {
            return Err(ApiError::invalid_param(
                "order",
                format!("`order` must be \"asc\" or \"desc\", got {other:?}."),
            ))
        }
        Some(_) => return Err(unrecognized("order")),
    };
    if let Some(name) = params
        .keys()
        .find(|name| !accepted.contains(&name.as_str()))
    {
        return Err(unrecognized(name));
    }
    Ok((
        ListQuery {
            after,
            limit,
            ascending,
        },
        params,
    ))
}

fn unrecognized(name: &str) -> ApiError {
    ApiError::invalid_param(
        name,
        format!("Unrecognized request argument supplied: {name}"),
    )
}

/// 400 for a cursor that names nothing.
fn unknown_cursor(after: Option<&str>) -> ApiError {
    ApiError::invalid_param(
        "after",
        format!("`after` names no object: {}", after.unwrap_or_default()),
    )
}
