//! A batch's input file: JSONL, one request a line, checked whole before any line runs.
//!
//! Each line is `{"custom_id": "...", "method": "POST", "url": "<the batch's endpoint>",
//! "body": {...}}`. What this checks is the envelope — JSON, the four fields, unique
//! custom ids, the endpoint; the body is checked when its line runs, by the same code as
//! an interactive request, so a bad body fails its line alone.

use std::collections::HashSet;

use serde_json::Value;

use super::objects::{BatchEndpoint, BatchLineError};

/// The most lines one batch may have (OpenAI's limit).
pub const MAX_LINES: usize = 50_000;
/// The most problems a failed batch lists; the first ones are the useful ones.
pub const MAX_ERRORS: usize = 100;

/// A line that passed the checks.
#[derive(Debug, Clone, PartialEq)]
pub struct InputLine {
    pub custom_id: String,
    /// The request body, as JSON text.
    pub body: String,
    /// The body's `model`, when it names one as a string (for metrics and slots).
    pub model: Option<String>,
}

/// The lines of an input file, or every problem found (up to [`MAX_ERRORS`]).
pub fn parse(
    content: &[u8],
    endpoint: BatchEndpoint,
) -> Result<Vec<InputLine>, Vec<BatchLineError>> {
    let text = std::str::from_utf8(content).map_err(|error| {
        vec![problem(
            "invalid_file_encoding",
            format!("The input file is not UTF-8: {error}."),
            None,
            None,
        )]
    })?;
    let mut lines = Vec::new();
    let mut errors = Vec::new();
    let mut custom_ids = HashSet::new();
    for (index, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let number = index + 1;
        match parse_line(raw, number, endpoint) {
            Ok(line) if !custom_ids.insert(line.custom_id.clone()) => errors.push(problem(
                "duplicate_custom_id",
                format!(
                    "The custom_id {:?} is used by an earlier line; each must be unique.",
                    line.custom_id
                ),
                Some("custom_id"),
                Some(number),
            )),
            Ok(line) => lines.push(line),
            Err(error) => errors.push(error),
        }
        if errors.len() >= MAX_ERRORS {
            break;
        }
    }
    if errors.is_empty() && lines.is_empty() {
        errors.push(problem(
            "empty_file",
            "The input file has no requests.".into(),
            None,
            None,
        ));
    }
    if errors.is_empty() && lines.len() > MAX_LINES {
        errors.push(problem(
            "too_many_requests",
            format!(
                "The input file has {} requests; a batch may have at most {MAX_LINES}.",
                lines.len()
            ),
            None,
            None,
        ));
    }
    if errors.is_empty() {
        Ok(lines)
    } else {
        Err(errors)
    }
}

fn parse_line(
    raw: &str,
    number: usize,
    endpoint: BatchEndpoint,
) -> Result<InputLine, BatchLineError> {
    let invalid = |code: &str, message: String, param: Option<&str>| {
        problem(code, message, param, Some(number))
    };
    let value: Value = serde_json::from_str(raw).map_err(|error| {
        invalid(
            "invalid_json_line",
            format!("This line is not valid JSON: {error}."),
            None,
        )
    })?;
    let Value::Object(mut fields) = value else {
        return Err(invalid(
            "invalid_json_line",
            "A line must be a JSON object.".into(),
            None,
        ));
    };
    let custom_id = match fields.remove("custom_id") {
        Some(Value::String(id)) if !id.is_empty() => id,
        _ => {
            return Err(invalid(
                "missing_required_parameter",
                "A line needs `custom_id`, a non-empty string.".into(),
                Some("custom_id"),
            ))
        }
    };
    match fields.remove("method") {
        Some(Value::String(method)) if method == "POST" => {}
        _ => {
            return Err(invalid(
                "invalid_method",
                "A line's `method` must be \"POST\".".into(),
                Some("method"),
            ))
        }
    }
    match fields.remove("url") {
        Some(Value::String(url)) if url == endpoint.as_str() => {}
        _ => {
            return Err(invalid(
                "invalid_url",
                format!(
                    "A line's `url` must be the batch's endpoint, {:?}.",
                    endpoint.as_str()
                ),
                Some("url"),
            ))
        }
    }
    let body = match fields.remove("body") {
        Some(Value::Object(body)) => body,
        _ => {
            return Err(invalid(
                "missing_required_parameter",
                "A line needs `body`, the request's JSON object.".into(),
                Some("body"),
            ))
        }
    };
    if let Some(unknown) = fields.keys().next() {
        return Err(invalid(
            "unrecognized_field",
            format!("Unrecognized field in a batch line: {unknown}."),
            Some(unknown),
        ));
    }
    Ok(InputLine {
        custom_id,
        model: body
            .get("model")
            .and_then(Value::as_str)
            .map(str::to_string),
        body: Value::Object(body).to_string(),
    })
}

fn problem(
    code: &str,
    message: String,
    param: Option<&str>,
    line: Option<usize>,
) -> BatchLineError {
    BatchLineError {
        code: code.to_string(),
        message,
        param: param.map(str::to_string),
        line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAT: BatchEndpoint = BatchEndpoint::ChatCompletions;

    fn line(custom_id: &str) -> String {
        format!(
            r#"{{"custom_id": "{custom_id}", "method": "POST", "url": "/v1/chat/completions", "body": {{"model": "m", "messages": []}}}}"#
        )
    }

    #[test]
    fn good_lines_keep_their_body_and_model_and_blank_lines_are_skipped() {
        let file = format!("{}\n\n{}\n", line("a"), line("b"));
        let lines = parse(file.as_bytes(), CHAT).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1].custom_id, "b");
        assert_eq!(lines[0].model.as_deref(), Some("m"));
        let body: Value = serde_json::from_str(&lines[0].body).unwrap();
        assert_eq!(body["messages"], Value::Array(Vec::new()));
    }

    #[test]
    fn every_bad_line_is_reported_with_its_number() {
        let file = [
            line("a"),
            "not json".into(),
            line("a"),
            r#"{"custom_id": "c", "method": "GET", "url": "/v1/chat/completions", "body": {}}"#
                .into(),
            r#"{"custom_id": "d", "method": "POST", "url": "/v1/completions", "body": {}}"#.into(),
            r#"{"custom_id": "e", "method": "POST", "url": "/v1/chat/completions"}"#.into(),
            r#"{"method": "POST", "url": "/v1/chat/completions", "body": {}}"#.into(),
            r#"{"custom_id": "f", "method": "POST", "url": "/v1/chat/completions", "body": {}, "x": 1}"#
                .into(),
            "[1]".into(),
        ]
        .join("\n");
        let errors = parse(file.as_bytes(), CHAT).unwrap_err();
        let found: Vec<(&str, Option<usize>)> =
            errors.iter().map(|e| (e.code.as_str(), e.line)).collect();
        assert_eq!(
            found,
            [
                ("invalid_json_line", Some(2)),
                ("duplicate_custom_id", Some(3)),
                ("invalid_method", Some(4)),
                ("invalid_url", Some(5)),
                ("missing_required_parameter", Some(6)),
                ("missing_required_parameter", Some(7)),
                ("unrecognized_field", Some(8)),
                ("invalid_json_line", Some(9)),
            ]
        );
        assert_eq!(errors[6].param.as_deref(), Some("x"));
    }

    #[test]
    fn empty_and_non_utf8_files_are_refused() {
        assert_eq!(parse(b"\n \n", CHAT).unwrap_err()[0].code, "empty_file");
        assert_eq!(
            parse(&[0xff, 0xfe], CHAT).unwrap_err()[0].code,
            "invalid_file_encoding"
        );
    }

    #[test]
    fn the_error_list_is_bounded() {
        let file = "x\n".repeat(MAX_ERRORS * 3);
        assert_eq!(parse(file.as_bytes(), CHAT).unwrap_err().len(), MAX_ERRORS);
    }
}
