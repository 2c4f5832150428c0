//! Recognising tool calls in a model's output. The formats, tried in this order:
//!
//! - Hermes / Qwen: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (the
//!   closing tag may be missing at the very end); text around them is the content. This is
//!   also the format heddle's own tool prompt asks for.
//! - Mistral: `[TOOL_CALLS]` followed by a JSON list of `{"name", "arguments"}`; text
//!   before it is the content.
//! - Llama 3: the whole output (after an optional `<|python_tag|>`) is one JSON object
//!   `{"name", "parameters"}` (or `"arguments"`), or a list of them.
//!
//! A call counts only if it names one of the request's functions and its arguments are a
//! JSON object; otherwise the output is plain content.

use serde_json::Value;

/// One recognised call: the function and its arguments as a JSON text.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCall {
    pub name: String,
    pub arguments: String,
}

/// An output with its tool calls taken out.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedOutput {
    /// The text besides the calls, trimmed; None if there is none.
    pub content: Option<String>,
    pub calls: Vec<ParsedCall>,
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const MISTRAL_MARKER: &str = "[TOOL_CALLS]";
const PYTHON_TAG: &str = "<|python_tag|>";

/// The calls in `text` to functions `known` accepts, or None when it holds none.
pub fn parse(text: &str, known: impl Fn(&str) -> bool) -> Option<ParsedOutput> {
    let parsed = hermes(text, &known)
        .or_else(|| mistral(text, &known))
        .or_else(|| llama(text, &known))?;
    (!parsed.calls.is_empty()).then_some(parsed)
}

fn hermes(text: &str, known: &impl Fn(&str) -> bool) -> Option<ParsedOutput> {
    if !text.contains(HERMES_OPEN) {
        return None;
    }
    let mut content = String::new();
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(HERMES_OPEN) {
        content.push_str(&rest[..start]);
        let after = &rest[start + HERMES_OPEN.len()..];
        let (body, next) = match after.find(HERMES_CLOSE) {
            Some(end) => (&after[..end], &after[end + HERMES_CLOSE.len()..]),
            None => (after, ""),
        };
        calls.push(call(serde_json::from_str(body.trim()).ok()?, known)?);
        rest = next;
    }
    content.push_str(rest);
    Some(ParsedOutput {
        content: non_empty(&content),
        calls,
    })
}

fn mistral(text: &str, known: &impl Fn(&str) -> bool) -> Option<ParsedOutput> {
    let (before, after) = text.split_once(MISTRAL_MARKER)?;
    let list: Value = serde_json::from_str(after.trim()).ok()?;
    Some(ParsedOutput {
        content: non_empty(before),
        calls: calls(list, known)?,
    })
}

fn llama(text: &str, known: &impl Fn(&str) -> bool) -> Option<ParsedOutput> {
    let text = text.trim();
    let text = text.strip_prefix(PYTHON_TAG).unwrap_or(text).trim();
    if !(text.starts_with('{') || text.starts_with('[')) {
        return None;
    }
    let value: Value = serde_json::from_str(text).ok()?;
    Some(ParsedOutput {
        content: None,
        calls: calls(value, known)?,
    })
}

/// One call object, or a list of them.
fn calls(value: Value, known: &impl Fn(&str) -> bool) -> Option<Vec<ParsedCall>> {
    match value {
        Value::Array(items) => items.into_iter().map(|item| call(item, known)).collect(),
        object => Some(vec![call(object, known)?]),
    }
}

fn call(value: Value, known: &impl Fn(&str) -> bool) -> Option<ParsedCall> {
    let Value::Object(mut object) = value else {
        return None;
    };
    let name = object.get("name")?.as_str()?.to_string();
    if !known(&name) {
        return None;
    }
    let arguments = object
        .remove("arguments")
        .or_else(|| object.remove("parameters"))
        .unwrap_or_else(|| Value::Object(Default::default()));
    // Some models write the arguments as a JSON text rather than an object.
    let arguments = match arguments {
        Value::String(text) => serde_json::from_str(&text).ok()?,
        other => other,
    };
    arguments.is_object().then(|| ParsedCall {
        name,
        arguments: arguments.to_string(),
    })
}

fn non_empty(text: &str) -> Option<String> {
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(name: &str) -> bool {
        ["get_weather", "add"].contains(&name)
    }

    fn call(name: &str, arguments: &str) -> ParsedCall {
        ParsedCall {
            name: name.into(),
            arguments: arguments.into(),
        }
    }

    #[test]
    fn hermes_blocks_with_text_around() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>{\"name\":\"add\",\"arguments\":{\"a\":1,\"b\":2}}</tool_call>";
        let parsed = parse(text, known).unwrap();
        assert_eq!(parsed.content.as_deref(), Some("Let me check."));
        assert_eq!(
            parsed.calls,
            [
                call("get_weather", r#"{"city":"Paris"}"#),
                call("add", r#"{"a":1,"b":2}"#)
            ]
        );
        // An unclosed last block still counts; an unknown function does not.
        let open = "<tool_call>{\"name\": \"add\", \"arguments\": {}}";
        assert_eq!(parse(open, known).unwrap().calls, [call("add", "{}")]);
        assert_eq!(
            parse(
                "<tool_call>{\"name\": \"rm\", \"arguments\": {}}</tool_call>",
                known
            ),
            None
        );
        assert_eq!(parse("<tool_call>{\"name\": \"add\"", known), None);
    }

    #[test]
    fn mistral_and_llama_formats() {
        let mistral = "[TOOL_CALLS] [{\"name\": \"add\", \"arguments\": {\"a\": 1}}]";
        assert_eq!(
            parse(mistral, known).unwrap(),
            ParsedOutput {
                content: None,
                calls: vec![call("add", r#"{"a":1}"#)]
            }
        );
        let llama =
            "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}";
        assert_eq!(
            parse(llama, known).unwrap().calls,
            [call("get_weather", r#"{"city":"Oslo"}"#)]
        );
        let stringly = "{\"name\": \"add\", \"arguments\": \"{\\\"a\\\": 2}\"}";
        assert_eq!(
            parse(stringly, known).unwrap().calls,
            [call("add", r#"{"a":2}"#)]
        );
    }

    #[test]
    fn plain_text_and_other_json_are_content() {
        assert_eq!(parse("The weather is fine.", known), None);
        assert_eq!(parse("{\"city\": \"Paris\"}", known), None);
        assert_eq!(parse("[1, 2]", known), None);
        assert_eq!(
            parse("{\"name\": \"add\", \"arguments\": [1]}", known),
            None
        );
    }
}
