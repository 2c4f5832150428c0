//! The Batch API's database: files, batches and every line's result, in SQLite.
//!
//! One connection, used from tokio's blocking threads so that no query stalls the async
//! runtime. WAL journaling and a commit per line result: a result is on disk before the
//! line counts as done, and a process killed at any instant leaves either the result or
//! nothing. `(batch_id, line_index)` is the primary key of a line and a result is written
//! only where there is none (`result IS NULL`), so a line has at most one result whatever
//! runs twice. File contents live in the database as blobs: one transaction covers a
//! finished batch's output files and its status, and there is one thing to back up.
//!
//! The connection holds SQLite's lock for its whole life (exclusive locking mode), so a
//! second server cannot open the same data dir and run the same batches again.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};
use serde_json::{json, Value};

use heddle_core::Priority;

use super::input::InputLine;
use super::objects::{
    BatchErrors, BatchLineError, BatchObject, BatchStatus, FileObject, RequestCounts,
};
use crate::api::auth::{Caller, KeyTier};
use crate::api::routes::new_id;

/// The file of the database inside the data dir.
const DATABASE_FILE: &str = "batches.sqlite3";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    purpose TEXT NOT NULL,
    filename TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    content BLOB NOT NULL,
    -- The API key namespace it belongs to (api::auth::Scope); NULL: everyone's.
    owner TEXT
);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    status TEXT NOT NULL,
    caller TEXT NOT NULL,
    metadata TEXT,
    errors TEXT,
    output_file_id TEXT,
    error_file_id TEXT,
    created_at INTEGER NOT NULL,
    in_progress_at INTEGER,
    expires_at INTEGER NOT NULL,
    finalizing_at INTEGER,
    completed_at INTEGER,
    failed_at INTEGER,
    expired_at INTEGER,
    cancelling_at INTEGER,
    cancelled_at INTEGER,
    total INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    owner TEXT
);
CREATE TABLE IF NOT EXISTS batch_lines (
    batch_id TEXT NOT NULL,
    line_index INTEGER NOT NULL,
    custom_id TEXT NOT NULL,
    body TEXT NOT NULL,
    model TEXT,
    -- The line of the output or error file, written once.
    result TEXT,
    succeeded INTEGER,
    PRIMARY KEY (batch_id, line_index)
) WITHOUT ROWID;
";

/// The database failed (disk full, corruption, a bug): the server logs it and the client
/// gets a 500.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the batch database failed: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("the batch database task panicked")]
    Panicked,
    #[error("the batch database holds an unreadable {0}")]
    Corrupt(&'static str),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A batch as stored, with the caller whose key tier bounds its lines' priority.
#[derive(Debug, Clone)]
pub struct BatchRecord {
    pub object: BatchObject,
    pub status: BatchStatus,
    pub caller: Caller,
    /// The API key namespace it belongs to (see api::auth::Scope); None: everyone's.
    pub owner: Option<String>,
}

/// A line still without a result.
#[derive(Debug, Clone)]
pub struct PendingLine {
    pub index: u64,
    pub custom_id: String,
    pub body: String,
    pub model: Option<String>,
}

/// Where a list starts and how long it is.
#[derive(Debug, Clone)]
pub struct ListQuery {
    /// The id of the item before the page (the previous page's `last_id`).
    pub after: Option<String>,
    pub limit: usize,
    /// Oldest first; else newest first.
    pub ascending: bool,
}

/// The handle every task shares.
#[derive(Clone)]
pub struct Store {
    connection: Arc<Mutex<Connection>>,
}

impl Store {
    /// Opens (creating if needed) the database in `data_dir`, or an in-memory one.
    pub fn open(data_dir: Option<&Path>) -> anyhow::Result<Self> {
        use anyhow::Context;
        let connection = match data_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating the data dir {}", dir.display()))?;
                let path = dir.join(DATABASE_FILE);
                let connection = Connection::open(&path)
                    .with_context(|| format!("opening {}", path.display()))?;
                connection.busy_timeout(Duration::from_millis(500))?;
                connection
                    .pragma_update(None, "locking_mode", "EXCLUSIVE")
                    .context("setting the locking mode")?;
                connection
                    .pragma_update(None, "journal_mode", "WAL")
                    .context("turning on WAL")?;
                connection.pragma_update(None, "synchronous", "FULL")?;
                // Takes the exclusive lock now rather than at the first write.
                connection
                    .execute_batch("BEGIN EXCLUSIVE; COMMIT;")
                    .with_context(|| {
                        format!(
                            "locking {}: is another heddle using this data dir?",
                            path.display()
                        )
                    })?;
                connection
            }
            None => Connection::open_in_memory()?,
        };
        connection
            .execute_batch(SCHEMA)
            .context("creating the batch tables")?;
        add_owner_columns(&connection).context("adding the owner columns")?;
        Ok(Store {
            connection: Arc::new(Mutex::new(connection)),
        })
    }

    /// Runs `work` on the connection on a blocking thread.
    async fn call<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> StoreResult<T> {
        let connection = self.connection.clone();
        tokio::task::spawn_blocking(move || {
            let mut connection = connection.lock().unwrap_or_else(|e| e.into_inner());
            work(&mut connection)
        })
        .await
        .map_err(|_| StoreError::Panicked)?
        .map_err(StoreError::from)
    }

    /// Stores a file of `owner` (None: everyone's).
    pub async fn insert_file(
        &self,
        filename: String,
        purpose: String,
        content: Vec<u8>,
        now: u64,
        owner: Option<String>,
    ) -> StoreResult<FileObject> {
        self.call(move |c| insert_file(c, &filename, &purpose, &content, now, owner.as_deref()))
            .await
    }

    /// A file `scope` sees (an owner, or None for every file).
    pub async fn file(&self, id: String, scope: Option<String>) -> StoreResult<Option<FileObject>> {
        self.call(move |c| {
            c.query_row(
                "SELECT id, purpose, filename, bytes, created_at FROM files
                 WHERE id = ?1 AND (?2 IS NULL OR owner = ?2)",
                params![id, scope],
                file_from_row,
            )
            .optional()
        })
        .await
    }

    pub async fn file_content(
        &self,
        id: String,
        scope: Option<String>,
    ) -> StoreResult<Option<Vec<u8>>> {
        self.call(move |c| {
            c.query_row(
                "SELECT content FROM files WHERE id = ?1 AND (?2 IS NULL OR owner = ?2)",
                params![id, scope],
                |row| row.get(0),
            )
            .optional()
        })
        .await
    }

    /// A page of files, of one purpose or all; None if `after` names no file.
    pub async fn list_files(
        &self,
        purpose: Option<String>,
        query: ListQuery,
        scope: Option<String>,
    ) -> StoreResult<Option<(Vec<FileObject>, bool)>> {
        self.call(move |c| {
            let Some(after) = cursor(c, "files", query.after.as_deref())? else {
                return Ok(None);
            };
            let (compare, order) = direction(query.ascending);
            let mut statement = c.prepare(&format!(
                "SELECT id, purpose, filename, bytes, created_at FROM files
                 WHERE (?1 IS NULL OR purpose = ?1) AND (?2 IS NULL OR seq {compare} ?2)
                   AND (?4 IS NULL OR owner = ?4)
                 ORDER BY seq {order} LIMIT ?3"
            ))?;
            let rows = statement
                .query_map(
                    params![purpose, after, query.limit as i64 + 1, scope],
                    file_from_row,
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(Some(page(rows, query.limit)))
        })
        .await
    }

    /// Deletes a file; false if there was none.
    pub async fn delete_file(&self, id: String, scope: Option<String>) -> StoreResult<bool> {
        self.call(move |c| {
            let deleted = c.execute(
                "DELETE FROM files WHERE id = ?1 AND (?2 IS NULL OR owner = ?2)",
                params![id, scope],
            )?;
            Ok(deleted == 1)
        })
        .await
    }

    /// Stores a new batch, `validating`.
    pub async fn insert_batch(&self, batch: BatchRecord) -> StoreResult<()> {
        self.call(move |c| {
            let object = &batch.object;
            c.execute(
                "INSERT INTO batches (id, endpoint, input_file_id, completion_window, status,
                    caller, metadata, created_at, expires_at, owner)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    object.id,
                    object.endpoint,
                    object.input_file_id,
                    object.completion_window,
                    batch.status.as_str(),
                    caller_to_text(&batch.caller),
                    object.metadata.as_ref().map(Value::to_string),
                    object.created_at,
                    object.expires_at,
                    batch.owner,
                ],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn batch(&self, id: String) -> StoreResult<Option<BatchRecord>> {
        self.call(move |c| batch(c, &id)).await
    }

    /// A page of batches; None if `after` names no batch.
    pub async fn list_batches(
        &self,
        query: ListQuery,
        scope: Option<String>,
    ) -> StoreResult<Option<(Vec<BatchRecord>, bool)>> {
        self.call(move |c| {
            let Some(after) = cursor(c, "batches", query.after.as_deref())? else {
                return Ok(None);
            };
            let (compare, order) = direction(query.ascending);
            let mut statement = c.prepare(&format!(
                "SELECT {BATCH_COLUMNS} FROM batches WHERE (?1 IS NULL OR seq {compare} ?1)
                   AND (?3 IS NULL OR owner = ?3)
                 ORDER BY seq {order} LIMIT ?2"
            ))?;
            let rows = statement
                .query_map(
                    params![after, query.limit as i64 + 1, scope],
                    batch_from_row,
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(Some(page(rows, query.limit)))
        })
        .await
    }

    /// The ids of batches a restart must resume.
    pub async fn unfinished_batches(&self) -> StoreResult<Vec<String>> {
        self.call(|c| {
            let unfinished: Vec<&str> = BatchStatus::ALL
                .into_iter()
                .filter(|status| status.is_unfinished())
                .map(BatchStatus::as_str)
                .collect();
            let mut statement = c.prepare(&format!(
                "SELECT id FROM batches WHERE status IN ('{}') ORDER BY seq",
                unfinished.join("', '")
            ))?;
            let ids = statement
                .query_map([], |row| row.get(0))?
                .collect::<rusqlite::Result<Vec<String>>>()?;
            Ok(ids)
        })
        .await
    }

    /// Stores a validated batch's lines and moves it to `in_progress`, in one
    /// transaction; a batch no longer `validating` (cancelled meanwhile) keeps its status.
    pub async fn start_batch(
        &self,
        id: String,
        lines: Vec<InputLine>,
        now: u64,
    ) -> StoreResult<()> {
        self.call(move |c| {
            let transaction = c.transaction()?;
            {
                let mut insert = transaction.prepare(
                    "INSERT INTO batch_lines (batch_id, line_index, custom_id, body, model)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                for (index, line) in lines.iter().enumerate() {
                    insert.execute(params![
                        id,
                        index as i64,
                        line.custom_id,
                        line.body,
                        line.model
                    ])?;
                }
            }
            transaction.execute(
                "UPDATE batches SET total = ?2 WHERE id = ?1",
                params![id, lines.len() as i64],
            )?;
            move_status(
                &transaction,
                &id,
                &[BatchStatus::Validating],
                BatchStatus::InProgress,
                now,
            )?;
            transaction.commit()
        })
        .await
    }

    /// Ends a `validating` batch as `failed`, listing what was wrong with its input.
    pub async fn fail_batch(
        &self,
        id: String,
        errors: Vec<BatchLineError>,
        now: u64,
    ) -> StoreResult<()> {
        self.call(move |c| {
            let transaction = c.transaction()?;
            if move_status(
                &transaction,
                &id,
                &[BatchStatus::Validating],
                BatchStatus::Failed,
                now,
            )? {
                let errors = serde_json::to_string(&errors)
                    .map_err(|e| rusqlite::Error::ToSqlConversionFailure(e.into()))?;
                transaction.execute(
                    "UPDATE batches SET errors = ?2 WHERE id = ?1",
                    params![id, errors],
                )?;
            }
            transaction.commit()
        })
        .await
    }

    /// Moves a batch from one of `from` to `to`, stamping the time; false if it was in
    /// none of them.
    pub async fn move_status(
        &self,
        id: String,
        from: &'static [BatchStatus],
        to: BatchStatus,
        now: u64,
    ) -> StoreResult<bool> {
        self.call(move |c| move_status(c, &id, from, to, now)).await
    }

    /// The lines of a batch that have no result yet, in file order.
    pub async fn pending_lines(&self, id: String) -> StoreResult<Vec<PendingLine>> {
        self.call(move |c| {
            let mut statement = c.prepare(
                "SELECT line_index, custom_id, body, model FROM batch_lines
                 WHERE batch_id = ?1 AND result IS NULL ORDER BY line_index",
            )?;
            let lines = statement
                .query_map([&id], |row| {
                    Ok(PendingLine {
                        index: row.get(0)?,
                        custom_id: row.get(1)?,
                        body: row.get(2)?,
                        model: row.get(3)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(lines)
        })
        .await
    }

    /// Commits a line's result (its output or error file line) and counts it, unless it
    /// already has one; true if this call wrote it.
    pub async fn record_result(
        &self,
        id: String,
        index: u64,
        succeeded: bool,
        result: String,
    ) -> StoreResult<bool> {
        self.call(move |c| {
            let transaction = c.transaction()?;
            let written = transaction.execute(
                "UPDATE batch_lines SET result = ?3, succeeded = ?4
                 WHERE batch_id = ?1 AND line_index = ?2 AND result IS NULL",
                params![id, index as i64, result, succeeded],
            )? == 1;
            if written {
                let column = if succeeded { "completed" } else { "failed" };
                transaction.execute(
                    &format!("UPDATE batches SET {column} = {column} + 1 WHERE id = ?1"),
                    [&id],
                )?;
            }
            transaction.commit()?;
            Ok(written)
        })
        .await
    }

    /// Ends a batch: writes its output file (the lines answered 200) and its error file
    /// (the other results, and for `unrun`'s code every line that never ran), and sets
    /// its final status, all in one transaction. Only from `finalizing`, `cancelling` or
    /// (to expire) `validating`/`in_progress`; false if the batch was elsewhere.
    pub async fn finish_batch(
        &self,
        id: String,
        status: BatchStatus,
        unrun: Option<UnrunLines>,
        now: u64,
    ) -> StoreResult<bool> {
        self.call(move |c| {
            let transaction = c.transaction()?;
            let from: &[BatchStatus] = match status {
                BatchStatus::Completed => &[BatchStatus::Finalizing],
                BatchStatus::Cancelled => &[BatchStatus::Cancelling],
                _ => &[BatchStatus::Validating, BatchStatus::InProgress],
            };
            if !move_status(&transaction, &id, from, status, now)? {
                return Ok(false);
            }
            let (output, errors) = result_files(&transaction, &id, unrun.as_ref())?;
            for (purpose_column, suffix, content) in [
                ("output_file_id", "output", output),
                ("error_file_id", "error", errors),
            ] {
                if content.is_empty() {
                    continue;
                }
                let filename = format!("{id}_{suffix}.jsonl");
                let owner: Option<String> = transaction.query_row(
                    "SELECT owner FROM batches WHERE id = ?1",
                    [&id],
                    |row| row.get(0),
                )?;
                let file = insert_file(
                    &transaction,
                    &filename,
                    "batch_output",
                    &content,
                    now,
                    owner.as_deref(),
                )?;
                transaction.execute(
                    &format!("UPDATE batches SET {purpose_column} = ?2 WHERE id = ?1"),
                    params![id, file.id],
                )?;
            }
            transaction.commit()?;
            Ok(true)
        })
        .await
    }
}

/// How the lines that never ran are written to a cancelled or expired batch's error
/// file: `{"error": {"code", "message"}}` and no response.
#[derive(Debug, Clone)]
pub struct UnrunLines {
    pub code: &'static str,
    pub message: &'static str,
}

/// The output and error files' contents, in line order.
fn result_files(
    transaction: &Transaction<'_>,
    id: &str,
    unrun: Option<&UnrunLines>,
) -> rusqlite::Result<(Vec<u8>, Vec<u8>)> {
    let mut statement = transaction.prepare(
        "SELECT custom_id, result, succeeded FROM batch_lines WHERE batch_id = ?1
         ORDER BY line_index",
    )?;
    let mut rows = statement.query([id])?;
    let (mut output, mut errors) = (Vec::new(), Vec::new());
    while let Some(row) = rows.next()? {
        let custom_id: String = row.get(0)?;
        let result: Option<String> = row.get(1)?;
        let succeeded: Option<bool> = row.get(2)?;
        let line = match (result, unrun) {
            (Some(result), _) => result,
            (None, Some(unrun)) => json!({
                "id": new_id("batch_req_"),
                "custom_id": custom_id,
                "response": null,
                "error": {"code": unrun.code, "message": unrun.message},
            })
            .to_string(),
            (None, None) => continue,
        };
        let file = if succeeded == Some(true) {
            &mut output
        } else {
            &mut errors
        };
        file.extend_from_slice(line.as_bytes());
        file.push(b'\n');
    }
    Ok((output, errors))
}

fn insert_file(
    c: &Connection,
    filename: &str,
    purpose: &str,
    content: &[u8],
    now: u64,
    owner: Option<&str>,
) -> rusqlite::Result<FileObject> {
    let file = FileObject {
        id: new_id("file-"),
        object: "file",
        bytes: content.len() as u64,
        created_at: now,
        filename: filename.to_string(),
        purpose: purpose.to_string(),
        status: "processed",
        expires_at: None,
        status_details: None,
    };
    c.execute(
        "INSERT INTO files (id, purpose, filename, bytes, created_at, content, owner)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            file.id,
            file.purpose,
            file.filename,
            file.bytes,
            file.created_at,
            content,
            owner
        ],
    )?;
    Ok(file)
}

/// Data dirs made before files and batches had owners get the column (NULL: everyone's).
fn add_owner_columns(c: &Connection) -> rusqlite::Result<()> {
    for table in ["files", "batches"] {
        let has_owner = c
            .prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))?
            .query_map([], |row| row.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?
            .iter()
            .any(|name| name == "owner");
        if !has_owner {
            c.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN owner TEXT"))?;
        }
    }
    Ok(())
}

fn move_status(
    c: &Connection,
    id: &str,
    from: &[BatchStatus],
    to: BatchStatus,
    now: u64,
) -> rusqlite::Result<bool> {
    let from: Vec<&str> = from.iter().map(|status| status.as_str()).collect();
    let changed = c.execute(
        &format!(
            "UPDATE batches SET status = ?2, {} = ?3 WHERE id = ?1 AND status IN ('{}')",
            to.timestamp_field(),
            from.join("', '")
        ),
        params![id, to.as_str(), now],
    )?;
    Ok(changed == 1)
}

/// The `seq` of the item a page starts after: Some(None) without a cursor, None if the
/// cursor names nothing.
fn cursor(
    c: &Connection,
    table: &str,
    after: Option<&str>,
) -> rusqlite::Result<Option<Option<i64>>> {
    let Some(after) = after else {
        return Ok(Some(None));
    };
    let seq = c
        .query_row(
            &format!("SELECT seq FROM {table} WHERE id = ?1"),
            [after],
            |row| row.get(0),
        )
        .optional()?;
    Ok(seq.map(Some))
}

fn direction(ascending: bool) -> (&'static str, &'static str) {
    if ascending {
        (">", "ASC")
    } else {
        ("<", "DESC")
    }
}

/// A page of `limit` rows out of `limit + 1` fetched, and whether more follow.
fn page<T>(mut rows: Vec<T>, limit: usize) -> (Vec<T>, bool) {
    let has_more = rows.len() > limit;
    rows.truncate(limit);
    (rows, has_more)
}

fn file_from_row(row: &Row<'_>) -> rusqlite::Result<FileObject> {
    Ok(FileObject {
        id: row.get(0)?,
        object: "file",
        purpose: row.get(1)?,
        filename: row.get(2)?,
        bytes: row.get(3)?,
        created_at: row.get(4)?,
        status: "processed",
        expires_at: None,
        status_details: None,
    })
}

const BATCH_COLUMNS: &str = "id, endpoint, input_file_id, completion_window, status, caller,
    metadata, errors, output_file_id, error_file_id, created_at, in_progress_at, expires_at,
    finalizing_at, completed_at, failed_at, expired_at, cancelling_at, cancelled_at, total,
    completed, failed, owner";

fn batch(c: &Connection, id: &str) -> rusqlite::Result<Option<BatchRecord>> {
    c.query_row(
        &format!("SELECT {BATCH_COLUMNS} FROM batches WHERE id = ?1"),
        [id],
        batch_from_row,
    )
    .optional()
}

fn batch_from_row(row: &Row<'_>) -> rusqlite::Result<BatchRecord> {
    let corrupt = |column: usize, what: &str| {
        rusqlite::Error::FromSqlConversionFailure(
            column,
            rusqlite::types::Type::Text,
            format!("unreadable {what}").into(),
        )
    };
    let status_text: String = row.get(4)?;
    let status = BatchStatus::parse(&status_text).ok_or_else(|| corrupt(4, "status"))?;
    let caller_text: String = row.get(5)?;
    let caller = caller_from_text(&caller_text).ok_or_else(|| corrupt(5, "caller"))?;
    let json_column = |column: usize| -> rusqlite::Result<Option<Value>> {
        let text: Option<String> = row.get(column)?;
        text.map(|text| serde_json::from_str(&text).map_err(|_| corrupt(column, "JSON")))
            .transpose()
    };
    let errors = match json_column(7)? {
        Some(list) => Some(BatchErrors {
            object: "list",
            data: serde_json::from_value(list).map_err(|_| corrupt(7, "errors"))?,
        }),
        None => None,
    };
    let object = BatchObject {
        id: row.get(0)?,
        object: "batch",
        endpoint: row.get(1)?,
        input_file_id: row.get(2)?,
        completion_window: row.get(3)?,
        status: status.as_str(),
        metadata: json_column(6)?,
        errors,
        output_file_id: row.get(8)?,
        error_file_id: row.get(9)?,
        created_at: row.get(10)?,
        in_progress_at: row.get(11)?,
        expires_at: row.get(12)?,
        finalizing_at: row.get(13)?,
        completed_at: row.get(14)?,
        failed_at: row.get(15)?,
        expired_at: row.get(16)?,
        cancelling_at: row.get(17)?,
        cancelled_at: row.get(18)?,
        request_counts: RequestCounts {
            total: row.get(19)?,
            completed: row.get(20)?,
            failed: row.get(21)?,
        },
    };
    Ok(BatchRecord {
        object,
        status,
        caller,
        owner: row.get(22)?,
    })
}

/// `anonymous`, or `key:<default>:<allowed,...>`: the tier a batch's lines run with,
/// kept with the batch so that a restart runs them with the same rights.
fn caller_to_text(caller: &Caller) -> String {
    match caller {
        Caller::Anonymous => "anonymous".into(),
        Caller::Key(tier) => {
            let allowed: Vec<&str> = tier.allowed.iter().map(|p| p.as_str()).collect();
            format!(
                "key:{}:{}",
                tier.default_priority.as_str(),
                allowed.join(",")
            )
        }
    }
}

fn caller_from_text(text: &str) -> Option<Caller> {
    if text == "anonymous" {
        return Some(Caller::Anonymous);
    }
    let (default, allowed) = text.strip_prefix("key:")?.split_once(':')?;
    let allowed = allowed
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<Priority>().ok())
        .collect::<Option<Vec<_>>>()?;
    Some(Caller::Key(KeyTier {
        default_priority: default.parse().ok()?,
        allowed,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_batch(id: &str) -> BatchRecord {
        BatchRecord {
            status: BatchStatus::Validating,
            caller: Caller::Key(KeyTier::at(Priority::Normal)),
            owner: Some("k1".into()),
            object: BatchObject::validating(
                id.into(),
                "/v1/completions".into(),
                "file-x".into(),
                "24h".into(),
                Some(json!({"k": "v"})),
                1,
                86_401,
            ),
        }
    }

    fn lines(count: usize) -> Vec<InputLine> {
        (0..count)
            .map(|i| InputLine {
                custom_id: format!("c{i}"),
                body: "{}".into(),
                model: Some("m".into()),
            })
            .collect()
    }

    #[test]
    fn callers_round_trip_through_their_text() {
        for caller in [
            Caller::Anonymous,
            Caller::Key(KeyTier::at(Priority::Low)),
            Caller::Key(KeyTier::any()),
        ] {
            assert_eq!(caller_from_text(&caller_to_text(&caller)), Some(caller));
        }
        assert_eq!(caller_from_text("key:urgent:"), None);
    }

    #[tokio::test]
    async fn a_result_is_written_once_and_a_finished_batch_gets_its_files() {
        let store = Store::open(None).unwrap();
        store.insert_batch(new_batch("batch_a")).await.unwrap();
        store
            .start_batch("batch_a".into(), lines(3), 5)
            .await
            .unwrap();
        assert_eq!(
            store.pending_lines("batch_a".into()).await.unwrap().len(),
            3
        );
        assert!(store
            .record_result("batch_a".into(), 0, true, "{\"ok\":0}".into())
            .await
            .unwrap());
        // A second result for the same line (a line run twice) is not written.
        assert!(!store
            .record_result("batch_a".into(), 0, false, "{\"again\":0}".into())
            .await
            .unwrap());
        assert!(store
            .record_result("batch_a".into(), 2, false, "{\"bad\":2}".into())
            .await
            .unwrap());
        let pending = store.pending_lines("batch_a".into()).await.unwrap();
        assert_eq!(pending.iter().map(|l| l.index).collect::<Vec<_>>(), [1]);

        // Cancelled with line 1 never run.
        let moved = store
            .move_status(
                "batch_a".into(),
                &[BatchStatus::InProgress],
                BatchStatus::Cancelling,
                6,
            )
            .await
            .unwrap();
        assert!(moved);
        let unrun = UnrunLines {
            code: "batch_cancelled",
            message: "cancelled",
        };
        assert!(store
            .finish_batch("batch_a".into(), BatchStatus::Cancelled, Some(unrun), 7)
            .await
            .unwrap());
        let batch = store.batch("batch_a".into()).await.unwrap().unwrap();
        assert_eq!(batch.status, BatchStatus::Cancelled);
        assert_eq!(batch.object.cancelled_at, Some(7));
        assert_eq!(batch.object.in_progress_at, Some(5));
        assert_eq!(
            batch.object.request_counts,
            RequestCounts {
                total: 3,
                completed: 1,
                failed: 1
            }
        );
        let output = store
            .file_content(batch.object.output_file_id.unwrap(), Some("k1".into()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(output, b"{\"ok\":0}\n");
        let errors = store
            .file_content(batch.object.error_file_id.unwrap(), Some("k1".into()))
            .await
            .unwrap()
            .unwrap();
        let errors = String::from_utf8(errors).unwrap();
        let error_lines: Vec<Value> = errors
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(error_lines[0]["error"]["code"], "batch_cancelled");
        assert_eq!(error_lines[0]["custom_id"], "c1");
        assert_eq!(error_lines[1], json!({"bad": 2}));
        // Finished once: a second finish changes nothing.
        assert!(!store
            .finish_batch("batch_a".into(), BatchStatus::Cancelled, None, 8)
            .await
            .unwrap());
    }

    #[tokio::test]
    async fn lists_page_by_cursor_newest_first() {
        let store = Store::open(None).unwrap();
        let mut ids = Vec::new();
        for i in 0..5 {
            let file = store
                .insert_file(
                    format!("f{i}"),
                    "batch".into(),
                    vec![b'x'; i],
                    i as u64,
                    None,
                )
                .await
                .unwrap();
            ids.push(file.id);
        }
        // A key's files are its own; everyone's files are not its.
        let mine = store
            .insert_file("k".into(), "batch".into(), vec![b'y'], 9, Some("k1".into()))
            .await
            .unwrap();
        let everything = ListQuery {
            after: None,
            limit: 100,
            ascending: true,
        };
        let (page, _) = (store.list_files(None, everything.clone(), Some("k1".into())))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(page.iter().map(|f| &f.id).collect::<Vec<_>>(), [&mine.id]);
        assert!(store
            .file(ids[0].clone(), Some("k1".into()))
            .await
            .unwrap()
            .is_none());
        assert!(store.file(mine.id.clone(), None).await.unwrap().is_some());
        assert!(!store
            .delete_file(mine.id.clone(), Some("k2".into()))
            .await
            .unwrap());
        assert!(store.delete_file(mine.id, Some("k1".into())).await.unwrap());
        let first = ListQuery {
            after: None,
            limit: 2,
            ascending: false,
        };
        let (page, more) = store.list_files(None, first, None).await.unwrap().unwrap();
        assert_eq!(
            page.iter().map(|f| &f.id).collect::<Vec<_>>(),
            [&ids[4], &ids[3]]
        );
        assert!(more);
        let next = ListQuery {
            after: Some(ids[3].clone()),
            limit: 5,
            ascending: false,
        };
        let (page, more) = store.list_files(None, next, None).await.unwrap().unwrap();
        assert_eq!(page.len(), 3);
        assert!(!more);
        let unknown = ListQuery {
            after: Some("file-none".into()),
            limit: 5,
            ascending: true,
        };
        assert!(store
            .list_files(None, unknown, None)
            .await
            .unwrap()
            .is_none());
        let outputs = ListQuery {
            after: None,
            limit: 5,
            ascending: true,
        };
        let (page, _) = store
            .list_files(Some("batch_output".into()), outputs, None)
            .await
            .unwrap()
            .unwrap();
        assert!(page.is_empty());
        assert!(store.delete_file(ids[0].clone(), None).await.unwrap());
        assert!(!store.delete_file(ids[0].clone(), None).await.unwrap());
    }

    #[test]
    fn a_data_dir_from_before_owners_gets_the_columns() {
        let dir = std::env::temp_dir().join(format!("heddle-store-owner-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let old_schema = SCHEMA
            .replace(",\n    -- The API key namespace it belongs to (api::auth::Scope); NULL: everyone's.\n    owner TEXT", "")
            .replace(",\n    owner TEXT", "");
        assert!(!old_schema.contains("owner"), "{old_schema}");
        Connection::open(dir.join(DATABASE_FILE))
            .unwrap()
            .execute_batch(&old_schema)
            .unwrap();
        drop(Store::open(Some(&dir)).unwrap());
        let connection = Connection::open(dir.join(DATABASE_FILE)).unwrap();
        for table in ["files", "batches"] {
            let columns: i64 = connection
                .query_row(
                    &format!(
                        "SELECT COUNT(*) FROM pragma_table_info('{table}') WHERE name = 'owner'"
                    ),
                    [],
                    |row| row.get(0),
                )
                .unwrap();
            assert_eq!(columns, 1, "{table}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_second_server_cannot_open_the_same_data_dir() {
        let dir = std::env::temp_dir().join(format!("heddle-store-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = Store::open(Some(&dir)).unwrap();
        let second = Store::open(Some(&dir));
        assert!(second.is_err());
        drop(first);
        assert!(Store::open(Some(&dir)).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
