//! The Batch API's wire objects, in OpenAI's shapes: files, batches, their lists, and a
//! batch's status.

use serde::Serialize;
use serde_json::Value;

/// Where a batch is in its life. The order of the variants is the order of the happy
/// path; `Failed`, `Expired` and `Cancelled` end it early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchStatus {
    /// Created; its input file is checked next.
    Validating,
    /// Its lines are running.
    InProgress,
    /// Every line has its result; the output and error files are written next.
    Finalizing,
    Completed,
    /// Its input file was invalid (see the batch's `errors`).
    Failed,
    /// Its completion window passed before every line ran.
    Expired,
    /// Cancelled by its client; the lines in flight are being stopped.
    Cancelling,
    Cancelled,
}

impl BatchStatus {
    pub const ALL: [BatchStatus; 8] = [
        BatchStatus::Validating,
        BatchStatus::InProgress,
        BatchStatus::Finalizing,
        BatchStatus::Completed,
        BatchStatus::Failed,
        BatchStatus::Expired,
        BatchStatus::Cancelling,
        BatchStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BatchStatus::Validating => "validating",
            BatchStatus::InProgress => "in_progress",
            BatchStatus::Finalizing => "finalizing",
            BatchStatus::Completed => "completed",
            BatchStatus::Failed => "failed",
            BatchStatus::Expired => "expired",
            BatchStatus::Cancelling => "cancelling",
            BatchStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == text)
    }

    /// Whether the batch still has work for the runner (a restart resumes it).
    pub fn is_unfinished(self) -> bool {
        matches!(
            self,
            BatchStatus::Validating
                | BatchStatus::InProgress
                | BatchStatus::Finalizing
                | BatchStatus::Cancelling
        )
    }

    /// The batch's timestamp field that records when it entered this status.
    pub fn timestamp_field(self) -> &'static str {
        match self {
            BatchStatus::Validating => "created_at",
            BatchStatus::InProgress => "in_progress_at",
            BatchStatus::Finalizing => "finalizing_at",
            BatchStatus::Completed => "completed_at",
            BatchStatus::Failed => "failed_at",
            BatchStatus::Expired => "expired_at",
            BatchStatus::Cancelling => "cancelling_at",
            BatchStatus::Cancelled => "cancelled_at",
        }
    }
}

/// The endpoints a batch's lines may call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchEndpoint {
    ChatCompletions,
    Completions,
}

impl BatchEndpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            BatchEndpoint::ChatCompletions => "/v1/chat/completions",
            BatchEndpoint::Completions => "/v1/completions",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [BatchEndpoint::ChatCompletions, BatchEndpoint::Completions]
            .into_iter()
            .find(|endpoint| endpoint.as_str() == text)
    }
}

/// OpenAI's File object.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FileObject {
    pub id: String,
    pub object: &'static str,
    pub bytes: u64,
    pub created_at: u64,
    pub filename: String,
    /// `batch` for uploads, `batch_output` for the files heddle writes.
    pub purpose: String,
    /// Always `processed`: a file is usable as soon as its upload is committed.
    pub status: &'static str,
    pub expires_at: Option<u64>,
    pub status_details: Option<String>,
}

/// A deleted file's answer.
#[derive(Debug, Serialize)]
pub struct DeletedFile {
    pub id: String,
    pub object: &'static str,
    pub deleted: bool,
}

/// One problem of a batch's input file.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct BatchLineError {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
    /// 1-based line number in the input file.
    pub line: Option<usize>,
}

/// A batch's `errors`: why its input file was refused.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BatchErrors {
    pub object: &'static str,
    pub data: Vec<BatchLineError>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RequestCounts {
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
}

/// OpenAI's Batch object.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BatchObject {
    pub id: String,
    pub object: &'static str,
    pub endpoint: String,
    pub errors: Option<BatchErrors>,
    pub input_file_id: String,
    pub completion_window: String,
    pub status: &'static str,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub created_at: u64,
    pub in_progress_at: Option<u64>,
    pub expires_at: u64,
    pub finalizing_at: Option<u64>,
    pub completed_at: Option<u64>,
    pub failed_at: Option<u64>,
    pub expired_at: Option<u64>,
    pub cancelling_at: Option<u64>,
    pub cancelled_at: Option<u64>,
    pub request_counts: RequestCounts,
    pub metadata: Option<Value>,
}

impl BatchObject {
    /// A batch just created: `validating`, nothing run, no files yet.
    pub fn validating(
        id: String,
        endpoint: String,
        input_file_id: String,
        completion_window: String,
        metadata: Option<Value>,
        created_at: u64,
        expires_at: u64,
    ) -> Self {
        BatchObject {
            id,
            object: "batch",
            endpoint,
            errors: None,
            input_file_id,
            completion_window,
            status: BatchStatus::Validating.as_str(),
            output_file_id: None,
            error_file_id: None,
            created_at,
            in_progress_at: None,
            expires_at,
            finalizing_at: None,
            completed_at: None,
            failed_at: None,
            expired_at: None,
            cancelling_at: None,
            cancelled_at: None,
            request_counts: RequestCounts {
                total: 0,
                completed: 0,
                failed: 0,
            },
            metadata,
        }
    }
}

/// A page of a list: `first_id`/`last_id` and `has_more` let a client ask for the next
/// page with `after=last_id`.
#[derive(Debug, Serialize)]
pub struct ListPage<T> {
    pub object: &'static str,
    pub data: Vec<T>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub has_more: bool,
}

impl<T> ListPage<T> {
    pub fn new(data: Vec<T>, has_more: bool, id: impl Fn(&T) -> &str) -> Self {
        ListPage {
            first_id: data.first().map(|item| id(item).to_string()),
            last_id: data.last().map(|item| id(item).to_string()),
            object: "list",
            data,
            has_more,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_endpoints_round_trip_through_their_names() {
        for status in BatchStatus::ALL {
            assert_eq!(BatchStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(BatchStatus::parse("done"), None);
        assert_eq!(
            BatchEndpoint::parse("/v1/completions"),
            Some(BatchEndpoint::Completions)
        );
        assert_eq!(BatchEndpoint::parse("/v1/embeddings"), None);
    }

    #[test]
    fn a_page_names_its_first_and_last_items() {
        let page = ListPage::new(vec!["a".to_string(), "b".to_string()], true, |s| s);
        assert_eq!(page.first_id.as_deref(), Some("a"));
        assert_eq!(page.last_id.as_deref(), Some("b"));
        let empty = ListPage::new(Vec::<String>::new(), false, |s| s);
        assert!(empty.first_id.is_none() && empty.last_id.is_none());
    }
}
