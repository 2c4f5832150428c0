//! Errors in OpenAI's format: `{"error": {"message", "type", "param", "code"}}` with the
//! matching HTTP status (and `Retry-After` where waiting helps).

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use heddle_core::CoreError;

/// An error answered to an API client.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's error `type`: `invalid_request_error`, `authentication_error`, ...
    pub kind: &'static str,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds after which a retry may succeed (429 and 503).
    pub retry_after: Option<u64>,
}

/// The wire shape of an error body.
#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorObject<'a>,
}

#[derive(Serialize)]
pub(crate) struct ErrorObject<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// 400: a field has a value the server does not accept.
    pub fn invalid_param(param: impl Into<String>, message: impl Into<String>) -> Self {
        let mut error = Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message);
        error.param = Some(param.into());
        error
    }

    /// 400: the body is not the JSON the endpoint expects.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 401: keys are configured and the request has none, or a wrong one.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "authentication_error", message)
            .with_code("invalid_api_key")
    }

    /// 403: the key is valid but may not do this (ask for this priority, use admin routes).
    pub fn forbidden(param: Option<&str>, message: impl Into<String>) -> Self {
        let mut error = Self::new(StatusCode::FORBIDDEN, "permission_error", message);
        error.param = param.map(str::to_string);
        error
    }

    pub fn model_not_found(model: &str) -> Self {
        let mut error = Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{model}` does not exist."),
        )
        .with_code("model_not_found");
        error.param = Some("model".into());
        error
    }

    pub fn route_not_found(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("Unknown request URL: {method} {path}."),
        )
        .with_code("unknown_url")
    }

    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            format!("Method {method} is not allowed for {path}."),
        )
        .with_code("method_not_allowed")
    }

    /// 413: the body is larger than the configured limit.
    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("The request body is larger than the limit of {limit} bytes."),
        )
        .with_code("request_too_large")
    }

    /// 408: the request body did not arrive within the body read timeout.
    pub fn body_timeout(timeout: Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!(
                "The request body did not arrive within {} seconds.",
                timeout.as_secs_f64()
            ),
        )
        .with_code("request_timeout")
    }

    /// 429: the model's waiting queue is full of requests at least as urgent.
    pub fn queue_full(model: &str, retry_after: u64) -> Self {
        let mut error = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!("The waiting queue of model `{model}` is full; retry later."),
        )
        .with_code("queue_full");
        error.retry_after = Some(retry_after);
        error
    }

    /// 503: the server cannot take the request now (shutting down, no memory for the model).
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        let mut error =
            Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message).with_code(code);
        error.retry_after = Some(1);
        error
    }

    /// 500: the engine failed while running the request.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// The error as the JSON object OpenAI clients parse (also sent inside SSE streams).
    pub(crate) fn object(&self) -> ErrorObject<'_> {
        ErrorObject {
            message: &self.message,
            kind: self.kind,
            param: self.param.as_deref(),
            code: self.code,
        }
    }

    /// The body alone, `{"error": {...}}`, as JSON text.
    pub fn body_json(&self) -> String {
        serde_json::to_string(&ErrorBody {
            error: self.object(),
        })
        .unwrap_or_else(|_| {
            String::from(
                r#"{"error":{"message":"error","type":"server_error","param":null,"code":null}}"#,
            )
        })
    }
}

/// Invalid sampling or stop values found by heddle-core's validation.
impl From<CoreError> for ApiError {
    fn from(error: CoreError) -> Self {
        match &error {
            CoreError::InvalidParam { param, .. } => Self::invalid_param(*param, error.to_string()),
            CoreError::InvalidPriority(_) => Self::invalid_param("priority", error.to_string()),
            CoreError::ContextTooLong { .. } => {
                Self::invalid_param("max_tokens", error.to_string())
                    .with_code("context_length_exceeded")
            }
            _ => Self::internal(error.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            self.body_json(),
        )
            .into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_has_openai_fields_even_when_empty() {
        let body: serde_json::Value =
            serde_json::from_str(&ApiError::bad_request("no").body_json()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"error": {
                "message": "no", "type": "invalid_request_error", "param": null, "code": null
            }})
        );
    }

    #[test]
    fn queue_full_carries_retry_after() {
        let response = ApiError::queue_full("m", 2).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
    }

    #[test]
    fn core_errors_name_the_param() {
        let error = ApiError::from(CoreError::InvalidParam {
            param: "top_p",
            reason: "must be in (0, 1], got 0".into(),
        });
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
        assert_eq!(error.param.as_deref(), Some("top_p"));
    }
}
