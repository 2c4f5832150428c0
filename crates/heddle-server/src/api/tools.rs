//! Tool calling, the request side: `tools`, `tool_choice`, `parallel_tool_calls`; tool
//! calls and results in the conversation; how the model is shown its tools; the grammar
//! that makes `required` and named choices produce calls.
//!
//! A template that reads the `tools` variable gets the tools and the messages' tool calls
//! and results as they are. For one that does not (the embedded SmolLM2's), heddle writes
//! the tools into the system prompt and asks for Hermes-style `<tool_call>` blocks, and
//! renders earlier calls and results as text in that same format.
//!
//! `tool_choice`: `none` shows no tools (and no call is looked for); `auto` shows them and
//! looks for calls in the output (see [`super::tool_call_parser`]); `required` constrains
//! the output to one or more calls (one if `parallel_tool_calls` is false), each naming a
//! function and giving arguments valid under its `parameters` schema; a named function,
//! to exactly one call of it.

use rand::distr::{Alphanumeric, SampleString};
use serde_json::{json, Map, Value};

use heddle_core::FinishReason;
use heddle_model::chat_template::ChatMessage;
use heddle_model::grammar::GrammarSpec;

use super::errors::ApiError;
use super::generation::finish_reason_name;
use super::openai::{FunctionCall, ToolCall};
use super::tool_call_parser;

/// One function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    /// The JSON schema of its arguments (`{"type": "object"}` when not given).
    pub parameters: Value,
    /// The tool as the request gave it, for templates.
    definition: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    Auto,
    Required,
    Named(String),
}

/// The tools of a request whose `tool_choice` is not `none`.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolRequest {
    pub tools: Vec<Tool>,
    pub choice: ToolChoice,
    pub parallel: bool,
}

/// Reads `tools`, `tool_choice` and `parallel_tool_calls`; None when no tool may be
/// called (no tools, or `tool_choice: "none"`).
pub fn tool_request(
    tools: Option<&Value>,
    tool_choice: Option<&Value>,
    parallel_tool_calls: Option<&Value>,
) -> Result<Option<ToolRequest>, ApiError> {
    let tools = match tools {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| tool(i, item))
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::invalid_param(
                "tools",
                "`tools` must be a list of {\"type\": \"function\", \"function\": {...}}.",
            ))
        }
    };
    for (i, tool) in tools.iter().enumerate() {
        if tools[..i].iter().any(|other| other.name == tool.name) {
            return Err(ApiError::invalid_param(
                format!("tools[{i}].function.name"),
                format!("Two tools are named {:?}.", tool.name),
            ));
        }
    }
    let parallel = match parallel_tool_calls {
        None | Some(Value::Null) => true,
        Some(Value::Bool(parallel)) => *parallel,
        Some(_) => {
            return Err(ApiError::invalid_param(
                "parallel_tool_calls",
                "`parallel_tool_calls` must be a boolean.",
            ))
        }
    };
    let choice = match tool_choice {
        None | Some(Value::Null) => None,
        Some(Value::String(choice)) => match choice.as_str() {
            "none" => return Ok(None),
            "auto" => Some(ToolChoice::Auto),
            "required" => Some(ToolChoice::Required),
            other => {
                return Err(ApiError::invalid_param(
                    "tool_choice",
                    format!(
                        "Unsupported `tool_choice` {other:?}: expected \"none\", \"auto\", \
                         \"required\" or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}."
                    ),
                ))
            }
        },
        Some(object) => {
            let name = object
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| object.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    ApiError::invalid_param(
                        "tool_choice",
                        "A named `tool_choice` is {\"type\": \"function\", \"function\": \
                         {\"name\": ...}}.",
                    )
                })?;
            if !tools.iter().any(|tool| tool.name == name) {
                return Err(ApiError::invalid_param(
                    "tool_choice",
                    format!("`tool_choice` names {name:?}, which is not in `tools`."),
                ));
            }
            Some(ToolChoice::Named(name.to_string()))
        }
    };
    if tools.is_empty() {
        return match choice {
            None => Ok(None),
            Some(_) => Err(ApiError::invalid_param(
                "tool_choice",
                "`tool_choice` needs `tools`.",
            )),
        };
    }
    Ok(Some(ToolRequest {
        tools,
        choice: choice.unwrap_or(ToolChoice::Auto),
        parallel,
    }))
}

fn tool(i: usize, item: &Value) -> Result<Tool, ApiError> {
    let shape = || {
        ApiError::invalid_param(
            format!("tools[{i}]"),
            "A tool is {\"type\": \"function\", \"function\": {\"name\", \"description\", \
             \"parameters\", \"strict\"}}.",
        )
    };
    if item.get("type").and_then(Value::as_str) != Some("function") {
        return Err(shape());
    }
    let function = item
        .get("function")
        .and_then(Value::as_object)
        .ok_or_else(shape)?;
    let name = function.get("name").and_then(Value::as_str).unwrap_or("");
    let valid_name = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !valid_name {
        return Err(ApiError::invalid_param(
            format!("tools[{i}].function.name"),
            "A function name is 1 to 64 letters, digits, underscores or dashes.",
        ));
    }
    let parameters = match function.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object"}),
        Some(schema) if schema.is_object() => schema.clone(),
        Some(_) => {
            return Err(ApiError::invalid_param(
                format!("tools[{i}].function.parameters"),
                "`parameters` must be a JSON schema object.",
            ))
        }
    };
    Ok(Tool {
        name: name.to_string(),
        parameters,
        definition: item.clone(),
    })
}

impl ToolRequest {
    pub fn knows(&self, name: &str) -> bool {
        self.tools.iter().any(|tool| tool.name == name)
    }

    /// The grammar of the output for `required` and named choices: `<tool_call>` blocks
    /// whose JSON names a function and gives arguments valid under its schema.
    pub fn grammar(&self) -> Option<GrammarSpec> {
        let (candidates, repeat): (Vec<&Tool>, bool) = match &self.choice {
            ToolChoice::Auto => return None,
            ToolChoice::Required => (self.tools.iter().collect(), self.parallel),
            ToolChoice::Named(name) => (
                self.tools
                    .iter()
                    .filter(|tool| &tool.name == name)
                    .collect(),
                false,
            ),
        };
        let calls: Vec<Value> = candidates
            .iter()
            .map(|tool| {
                json!({
                    "type": "object",
                    "properties": {
                        "name": {"const": tool.name},
                        "arguments": tool.parameters,
                    },
                    "required": ["name", "arguments"],
                    "additionalProperties": false,
                })
            })
            .collect();
        let mut schema = match <[Value; 1]>::try_from(calls) {
            Ok([one]) => one,
            Err(calls) => json!({ "anyOf": calls }),
        };
        schema["x-guidance"] = json!({"whitespace_flexible": false});
        let start = if repeat {
            "start: call (\"\\n\" call)*"
        } else {
            "start: call"
        };
        Some(GrammarSpec::Lark(format!(
            "{start}\ncall: \"<tool_call>\\n\" %json {schema} \"\\n</tool_call>\"\n"
        )))
    }

    /// The tools as templates expect them (the request's own objects).
    pub fn template_variables(&self) -> Map<String, Value> {
        let tools: Vec<Value> = self
            .tools
            .iter()
            .map(|tool| tool.definition.clone())
            .collect();
        let mut variables = Map::new();
        variables.insert("tools".into(), Value::Array(tools));
        variables
    }

    /// What heddle tells a model whose template has no place for tools.
    fn prompt(&self) -> String {
        let mut prompt =
            String::from("You can call functions. Their definitions, as JSON schemas:\n<tools>\n");
        for tool in &self.tools {
            prompt.push_str(&tool.definition["function"].to_string());
            prompt.push('\n');
        }
        prompt.push_str(
            "</tools>\nTo call a function, answer with one block per call:\n<tool_call>\n\
             {\"name\": <function name>, \"arguments\": <arguments object>}\n</tool_call>",
        );
        match &self.choice {
            ToolChoice::Auto => {}
            ToolChoice::Required => prompt.push_str("\nCall a function now."),
            ToolChoice::Named(name) => prompt.push_str(&format!("\nCall the function {name} now.")),
        }
        prompt
    }

    /// Puts the tools into the conversation's system prompt (for a template without tools).
    pub fn add_prompt(&self, messages: &mut Vec<ChatMessage>) {
        match messages.first_mut() {
            Some(first) if first.role == "system" => {
                first.content = format!("{}\n\n{}", first.content, self.prompt());
            }
            _ => messages.insert(0, ChatMessage::new("system", self.prompt())),
        }
    }
}

/// A finished choice of a request with tools, as the client sees it.
#[derive(Debug)]
pub struct ToolReply {
    pub content: Option<String>,
    pub tool_calls: Option<Vec<ToolCall>>,
    pub finish_reason: &'static str,
}

impl ToolRequest {
    /// The reply of a choice that ended with `reason` after generating `text`: its calls,
    /// with `finish_reason: "tool_calls"`, when it made any and was not cut short; else the
    /// text as it is.
    pub fn reply(&self, text: String, reason: FinishReason) -> ToolReply {
        let parsed = (reason == FinishReason::Stop)
            .then(|| tool_call_parser::parse(&text, |name| self.knows(name)))
            .flatten();
        match parsed {
            Some(parsed) => ToolReply {
                content: parsed.content,
                tool_calls: Some(
                    parsed
                        .calls
                        .into_iter()
                        .map(|call| ToolCall {
                            index: None,
                            id: format!(
                                "call_{}",
                                Alphanumeric.sample_string(&mut rand::rng(), 24)
                            ),
                            kind: "function",
                            function: FunctionCall {
                                name: call.name,
                                arguments: call.arguments,
                            },
                        })
                        .collect(),
                ),
                finish_reason: "tool_calls",
            },
            None => ToolReply {
                content: Some(text),
                tool_calls: None,
                finish_reason: finish_reason_name(reason),
            },
        }
    }
}

/// Renders tool calls and tool results as text in heddle's own tool format, for a
/// template that does not read `tools`: calls become `<tool_call>` blocks of the
/// assistant's text, results a user turn of `<tool_response>` blocks.
pub fn inline_tool_messages(messages: Vec<ChatMessage>) -> Vec<ChatMessage> {
    messages
        .into_iter()
        .map(|mut message| {
            if let Some(calls) = message.tool_calls.take() {
                for call in calls {
                    let function = &call["function"];
                    let block =
                        json!({"name": function["name"], "arguments": function["arguments"]});
                    if !message.content.is_empty() {
                        message.content.push('\n');
                    }
                    message
                        .content
                        .push_str(&format!("<tool_call>\n{block}\n</tool_call>"));
                }
            }
            if message.role == "tool" {
                message = ChatMessage::new(
                    "user",
                    format!("<tool_response>\n{}\n</tool_response>", message.content),
                );
            }
            message
        })
        .collect()
}

/// An assistant message's `tool_calls` (`{"id", "type": "function", "function": {"name",
/// "arguments"}}` with the arguments a JSON text), as templates see them: the arguments
/// an object. `param` places them in the request.
pub fn message_tool_calls(param: &str, value: &Value) -> Result<Vec<Value>, ApiError> {
    let invalid = |message: &str| ApiError::invalid_param(param, message);
    let items = value
        .as_array()
        .ok_or_else(|| invalid("`tool_calls` must be a list."))?;
    items
        .iter()
        .map(|call| {
            let function = call
                .get("function")
                .filter(|_| call.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    invalid(
                        "A tool call is {\"id\", \"type\": \"function\", \"function\": {\"name\", \
                         \"arguments\"}}.",
                    )
                })?;
            let name = function
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid("A tool call's function needs a `name`."))?;
            let arguments: Value = match function.get("arguments") {
                Some(Value::String(text)) => serde_json::from_str(text)
                    .map_err(|_| invalid("A tool call's `arguments` must be a JSON text."))?,
                Some(object) if object.is_object() => object.clone(),
                _ => return Err(invalid("A tool call's `arguments` must be a JSON text.")),
            };
            Ok(json!({
                "id": call.get("id").cloned().unwrap_or(Value::Null),
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
    }

    #[test]
    fn choices_are_read_and_checked() {
        let tools = weather();
        let auto = tool_request(Some(&tools), None, None).unwrap().unwrap();
        assert_eq!(auto.choice, ToolChoice::Auto);
        assert!(auto.parallel && auto.grammar().is_none());
        assert_eq!(
            tool_request(Some(&tools), Some(&json!("none")), None).unwrap(),
            None
        );
        assert_eq!(tool_request(None, None, None).unwrap(), None);
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        let request = tool_request(Some(&tools), Some(&named), Some(&json!(false)))
            .unwrap()
            .unwrap();
        assert_eq!(request.choice, ToolChoice::Named("get_weather".into()));
        let Some(GrammarSpec::Lark(grammar)) = request.grammar() else {
            panic!("a named choice has a grammar")
        };
        assert!(grammar.contains("%json") && grammar.contains("\"const\":\"get_weather\""));
        for (tools, choice, param) in [
            (tools.clone(), json!("sometimes"), "tool_choice"),
            (
                tools.clone(),
                json!({"type": "function", "function": {"name": "x"}}),
                "tool_choice",
            ),
            (json!([]), json!("required"), "tool_choice"),
            (
                json!([{"type": "function", "function": {"name": "a b"}}]),
                json!("auto"),
                "tools[0].function.name",
            ),
            (json!([{"type": "code"}]), json!("auto"), "tools[0]"),
        ] {
            let error = tool_request(Some(&tools), Some(&choice), None).unwrap_err();
            assert_eq!(error.param.as_deref(), Some(param), "{tools} {choice}");
        }
    }

    #[test]
    fn calls_and_results_are_inlined_for_templates_without_tools() {
        let calls = message_tool_calls(
            "messages[1].tool_calls",
            &json!([{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]),
        )
        .unwrap();
        assert_eq!(calls[0]["function"]["arguments"], json!({"city": "Paris"}));
        let mut assistant = ChatMessage::new("assistant", "");
        assistant.tool_calls = Some(calls);
        let mut result = ChatMessage::new("tool", "18 degrees");
        result.tool_call_id = Some("call_1".into());
        let inlined = inline_tool_messages(vec![assistant, result]);
        let block = json!({"name": "get_weather", "arguments": {"city": "Paris"}});
        assert_eq!(
            inlined[0].content,
            format!("<tool_call>\n{block}\n</tool_call>")
        );
        assert_eq!(inlined[1].role, "user");
        assert_eq!(
            inlined[1].content,
            "<tool_response>\n18 degrees\n</tool_response>"
        );
        let error = message_tool_calls(
            "p",
            &json!([{"type": "function", "function": {"name": "f", "arguments": "{"}}]),
        )
        .unwrap_err();
        assert_eq!(error.param.as_deref(), Some("p"));
    }
}
