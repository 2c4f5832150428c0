//! `/v1/files`: upload (multipart, purpose `batch`), list, retrieve, download, delete.
//! Uploads are bounded by the server's body limit (413 over it).

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::multipart::{MultipartError, MultipartRejection};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::objects::{DeletedFile, FileObject, ListPage};
use super::{list_query, no_such, unknown_cursor, unrecognized};
use crate::api::auth::Scope;
use crate::api::errors::ApiError;
use crate::api::{unix_now, AppState};

/// The only purpose an upload may have: heddle stores files for the Batch API.
const UPLOAD_PURPOSE: &str = "batch";
const DEFAULT_LIST_LIMIT: usize = 10_000;

pub async fn upload(
    State(state): State<AppState>,
    scope: Scope,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Json<FileObject>, ApiError> {
    let multipart = multipart.map_err(|rejection| {
        ApiError::bad_request(format!(
            "Uploads are multipart/form-data with the fields `file` and `purpose`: {}",
            rejection.body_text()
        ))
    })?;
    let form = tokio::time::timeout(state.body_read_timeout, read_form(multipart, &state))
        .await
        .map_err(|_| ApiError::body_timeout(state.body_read_timeout))??;
    let purpose = form
        .purpose
        .ok_or_else(|| ApiError::invalid_param("purpose", "The form needs the field `purpose`."))?;
    if purpose != UPLOAD_PURPOSE {
        return Err(ApiError::invalid_param(
            "purpose",
            format!("heddle stores files for the Batch API only: `purpose` must be \"batch\", got {purpose:?}."),
        ));
    }
    let (filename, content) = form
        .file
        .ok_or_else(|| ApiError::invalid_param("file", "The form needs the field `file`."))?;
    if content.is_empty() {
        return Err(ApiError::invalid_param("file", "The file is empty."));
    }
    let file = state
        .batches
        .store
        .insert_file(
            filename,
            purpose,
            content.to_vec(),
            unix_now(),
            scope.owner(),
        )
        .await?;
    tracing::info!(file = %file.id, bytes = file.bytes, "file uploaded");
    Ok(Json(file))
}

/// The fields of an upload form.
struct UploadForm {
    purpose: Option<String>,
    file: Option<(String, Bytes)>,
}

async fn read_form(mut multipart: Multipart, state: &AppState) -> Result<UploadForm, ApiError> {
    let failed = |error: MultipartError| {
        if error.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::payload_too_large(state.max_body_bytes)
        } else {
            ApiError::bad_request(format!("Could not read the upload: {}", error.body_text()))
        }
    };
    let mut form = UploadForm {
        purpose: None,
        file: None,
    };
    while let Some(field) = multipart.next_field().await.map_err(failed)? {
        match field.name() {
            Some("purpose") => form.purpose = Some(field.text().await.map_err(failed)?),
            Some("file") => {
                let filename = field.file_name().unwrap_or("upload.jsonl").to_string();
                form.file = Some((filename, field.bytes().await.map_err(failed)?));
            }
            Some(other) => return Err(unrecognized(other)),
            None => return Err(ApiError::bad_request("A form field has no name.")),
        }
    }
    Ok(form)
}

pub async fn list(
    State(state): State<AppState>,
    scope: Scope,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<ListPage<FileObject>>, ApiError> {
    let Query(params) = query.map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
    let (query, mut filters) = list_query(
        params,
        DEFAULT_LIST_LIMIT,
        DEFAULT_LIST_LIMIT,
        &["order", "purpose"],
    )?;
    let after = query.after.clone();
    let (files, has_more) = state
        .batches
        .store
        .list_files(filters.remove("purpose"), query, scope.owner())
        .await?
        .ok_or_else(|| unknown_cursor(after.as_deref()))?;
    Ok(Json(ListPage::new(files, has_more, |file| &file.id)))
}

pub async fn retrieve(
    State(state): State<AppState>,
    scope: Scope,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<FileObject>, ApiError> {
    let Path(id) = id.map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
    let file = state.batches.store.file(id.clone(), scope.owner()).await?;
    file.map(Json).ok_or_else(|| no_such("File", &id))
}

pub async fn content(
    State(state): State<AppState>,
    scope: Scope,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(id) = id.map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
    let content = (state.batches.store)
        .file_content(id.clone(), scope.owner())
        .await?;
    let content = content.ok_or_else(|| no_such("File", &id))?;
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        content,
    )
        .into_response())
}

pub async fn delete(
    State(state): State<AppState>,
    scope: Scope,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<DeletedFile>, ApiError> {
    let Path(id) = id.map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
    if !state
        .batches
        .store
        .delete_file(id.clone(), scope.owner())
        .await?
    {
        return Err(no_such("File", &id));
    }
    tracing::info!(file = %id, "file deleted");
    Ok(Json(DeletedFile {
        id,
        object: "file",
        deleted: true,
    }))
}
