//! `/v1/batches`: create, retrieve, list, cancel.

use std::collections::HashMap;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::objects::{BatchEndpoint, BatchObject, BatchStatus, ListPage};
use super::store::BatchRecord;
use super::{list_query, no_such, unknown_cursor, unrecognized};
use crate::api::auth::{Caller, Scope};
use crate::api::errors::ApiError;
use crate::api::routes::new_id;
use crate::api::{unix_now, AppState, JsonBody};

/// The only completion window, as OpenAI's.
const COMPLETION_WINDOW: &str = "24h";
const COMPLETION_WINDOW_SECONDS: u64 = 24 * 60 * 60;
const DEFAULT_LIST_LIMIT: usize = 20;
const MAX_LIST_LIMIT: usize = 100;
/// OpenAI's bounds on `metadata`.
const MAX_METADATA_PAIRS: usize = 16;
const MAX_METADATA_KEY_CHARS: usize = 64;
const MAX_METADATA_VALUE_CHARS: usize = 512;

#[derive(Debug, Deserialize)]
pub struct CreateBatch {
    input_file_id: Option<String>,
    endpoint: Option<String>,
    completion_window: Option<String>,
    metadata: Option<Value>,
    /// Every other field: refused by name unless null.
    #[serde(flatten)]
    unread: Map<String, Value>,
}

pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    scope: Scope,
    JsonBody(request): JsonBody<CreateBatch>,
) -> Result<Json<BatchObject>, ApiError> {
    if let Some((name, _)) = request.unread.iter().find(|(_, value)| !value.is_null()) {
        return Err(unrecognized(name));
    }
    let input_file_id = request.input_file_id.ok_or_else(|| {
        ApiError::invalid_param("input_file_id", "You must provide `input_file_id`.")
    })?;
    let endpoint = request.endpoint.unwrap_or_default();
    if BatchEndpoint::parse(&endpoint).is_none() {
        return Err(ApiError::invalid_param(
            "endpoint",
            format!(
                "heddle runs batches of \"/v1/chat/completions\" or \"/v1/completions\", not \
                 {endpoint:?}."
            ),
        ));
    }
    let window = request.completion_window.unwrap_or_default();
    if window != COMPLETION_WINDOW {
        return Err(ApiError::invalid_param(
            "completion_window",
            format!("`completion_window` must be \"24h\", got {window:?}."),
        ));
    }
    let metadata = check_metadata(request.metadata)?;
    let file = (state.batches.store)
        .file(input_file_id.clone(), scope.owner())
        .await?;
    match file {
        None => return Err(no_such("File", &input_file_id)),
        Some(file) if file.purpose != "batch" => {
            return Err(ApiError::invalid_param(
                "input_file_id",
                format!(
                    "The file {input_file_id} has purpose {:?}; a batch's input needs \"batch\".",
                    file.purpose
                ),
            ))
        }
        Some(_) => {}
    }
    let now = unix_now();
    let batch = BatchRecord {
        status: BatchStatus::Validating,
        caller,
        owner: scope.owner(),
        object: BatchObject::validating(
            new_id("batch_"),
            endpoint,
            input_file_id,
            window,
            metadata,
            now,
            now + COMPLETION_WINDOW_SECONDS,
        ),
    };
    state.batches.store.insert_batch(batch.clone()).await?;
    tracing::info!(batch = %batch.object.id, input = %batch.object.input_file_id, "batch created");
    state.batches.launch(&state, &batch.object.id);
    Ok(Json(batch.object))
}

/// `metadata`: null, or up to 16 string pairs (keys up to 64 characters, values 512).
fn check_metadata(metadata: Option<Value>) -> Result<Option<Value>, ApiError> {
    let invalid = |message: String| ApiError::invalid_param("metadata", message);
    let pairs = match metadata {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(pairs)) => pairs,
        Some(_) => return Err(invalid("`metadata` must be an object of strings.".into())),
    };
    if pairs.len() > MAX_METADATA_PAIRS {
        return Err(invalid(format!(
            "`metadata` may have at most {MAX_METADATA_PAIRS} pairs."
        )));
    }
    for (key, value) in &pairs {
        let fits = key.chars().count() <= MAX_METADATA_KEY_CHARS
            && value
                .as_str()
                .is_some_and(|v| v.chars().count() <= MAX_METADATA_VALUE_CHARS);
        if !fits {
            return Err(invalid(format!(
                "`metadata` values are strings of at most {MAX_METADATA_VALUE_CHARS} \
                 characters, keys at most {MAX_METADATA_KEY_CHARS}: {key:?} is not."
            )));
        }
    }
    Ok(Some(Value::Object(pairs)))
}

pub async fn retrieve(
    State(state): State<AppState>,
    scope: Scope,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<BatchObject>, ApiError> {
    let Path(id) = id.map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
    visible_batch(&state, &scope, &id)
        .await
        .map(|batch| Json(batch.object))
}

/// The batch `id` if `scope` sees it; another key's batch is as unknown as a missing one.
async fn visible_batch(state: &AppState, scope: &Scope, id: &str) -> Result<BatchRecord, ApiError> {
    let batch = state.batches.store.batch(id.to_string()).await?;
    batch
        .filter(|batch| scope.sees(batch.owner.as_deref()))
        .ok_or_else(|| no_such("Batch", id))
}

pub async fn list(
    State(state): State<AppState>,
    scope: Scope,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<ListPage<BatchObject>>, ApiError> {
    let Query(params) = query.map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
    let (query, _) = list_query(params, DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT, &[])?;
    let after = query.after.clone();
    let (batches, has_more) = state
        .batches
        .store
        .list_batches(query, scope.owner())
        .await?
        .ok_or_else(|| unknown_cursor(after.as_deref()))?;
    let objects = batches.into_iter().map(|batch| batch.object).collect();
    Ok(Json(ListPage::new(objects, has_more, |batch| &batch.id)))
}

/// Moves the batch to `cancelling` and stops its lines; the runner then writes what ran
/// and ends it `cancelled`. Cancelling a batch already cancelling or cancelled answers
/// it as it is; one that already ended otherwise is a 409.
pub async fn cancel(
    State(state): State<AppState>,
    scope: Scope,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<BatchObject>, ApiError> {
    let Path(id) = id.map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
    visible_batch(&state, &scope, &id).await?;
    let store = &state.batches.store;
    let moved = store
        .move_status(
            id.clone(),
            &[BatchStatus::Validating, BatchStatus::InProgress],
            BatchStatus::Cancelling,
            unix_now(),
        )
        .await?;
    if moved {
        tracing::info!(batch = %id, "batch cancelling");
        state.batches.cancel(&id);
    }
    let batch = store
        .batch(id.clone())
        .await?
        .ok_or_else(|| no_such("Batch", &id))?;
    match batch.status {
        BatchStatus::Cancelling | BatchStatus::Cancelled => Ok(Json(batch.object)),
        other => Err(ApiError {
            status: StatusCode::CONFLICT,
            message: format!("Cannot cancel a batch with status {:?}.", other.as_str()),
            kind: "invalid_request_error",
            param: None,
            code: Some("batch_not_cancellable"),
            retry_after: None,
        }),
    }
}
