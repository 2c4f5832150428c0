//! Structured output: OpenAI's `response_format` and heddle's `guided_*` extensions (named
//! as vLLM names them) → the grammar the output must match, compiled for the model.
//!
//! - `response_format: {"type": "text"}`: no constraint.
//! - `response_format: {"type": "json_object"}`: any JSON object.
//! - `response_format: {"type": "json_schema", "json_schema": {"name", "schema", "strict",
//!   "description"}}`: a JSON document valid under `schema`.
//! - `guided_json` (a schema), `guided_regex` (a regular expression, whole match),
//!   `guided_choice` (a list of strings: exactly one of them), `guided_grammar` (a Lark
//!   grammar, llguidance's dialect).
//!
//! At most one of them per request. A grammar that does not compile is a 400 naming the
//! field and saying why; so is one that does not compile within [`COMPILE_TIME_LIMIT`].

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use heddle_model::grammar::{GrammarSpec, TokenConstraint};

use super::errors::ApiError;
use super::openai::CommonFields;
use crate::pool::ServedModel;

/// How long compiling one request's grammar may take before the request is refused. The
/// compiler's own fuel limits end it soon after; this bounds what a client waits.
pub const COMPILE_TIME_LIMIT: Duration = Duration::from_secs(5);

/// The grammar a request asks for, with the field that asked (for error messages).
#[derive(Debug, Clone, PartialEq)]
pub struct RequestedGrammar {
    pub field: &'static str,
    pub spec: GrammarSpec,
}

/// Reads the structured-output fields; None when the output is free text.
pub fn requested_grammar(common: &CommonFields) -> Result<Option<RequestedGrammar>, ApiError> {
    let mut found: Vec<RequestedGrammar> = Vec::new();
    if let Some(format) = present(&common.response_format) {
        if let Some(spec) = response_format(format)? {
            found.push(RequestedGrammar {
                field: "response_format",
                spec,
            });
        }
    }
    if let Some(schema) = present(&common.guided_json) {
        found.push(RequestedGrammar {
            field: "guided_json",
            spec: GrammarSpec::JsonSchema(schema_value("guided_json", schema)?),
        });
    }
    if let Some(regex) = present(&common.guided_regex) {
        let regex = regex.as_str().ok_or_else(|| {
            ApiError::invalid_param("guided_regex", "`guided_regex` must be a string.")
        })?;
        found.push(RequestedGrammar {
            field: "guided_regex",
            spec: GrammarSpec::Regex(regex.to_string()),
        });
    }
    if let Some(choices) = present(&common.guided_choice) {
        let invalid = || {
            ApiError::invalid_param(
                "guided_choice",
                "`guided_choice` must be a non-empty list of strings.",
            )
        };
        let choices: Vec<String> = choices
            .as_array()
            .filter(|items| !items.is_empty())
            .ok_or_else(invalid)?
            .iter()
            .map(|item| item.as_str().map(str::to_string).ok_or_else(invalid))
            .collect::<Result<_, _>>()?;
        found.push(RequestedGrammar {
            field: "guided_choice",
            spec: GrammarSpec::Choice(choices),
        });
    }
    if let Some(grammar) = present(&common.guided_grammar) {
        let grammar = grammar.as_str().ok_or_else(|| {
            ApiError::invalid_param(
                "guided_grammar",
                "`guided_grammar` must be a string (a Lark grammar).",
            )
        })?;
        found.push(RequestedGrammar {
            field: "guided_grammar",
            spec: GrammarSpec::Lark(grammar.to_string()),
        });
    }
    if found.len() > 1 {
        return Err(ApiError::invalid_param(
            found[1].field,
            format!(
                "`{}` and `{}` both constrain the output; give at most one.",
                found[0].field, found[1].field
            ),
        ));
    }
    Ok(found.pop())
}

fn present(value: &Option<Value>) -> Option<&Value> {
    value.as_ref().filter(|v| !v.is_null())
}

/// OpenAI's `response_format` object.
fn response_format(format: &Value) -> Result<Option<GrammarSpec>, ApiError> {
    let kind = format.get("type").and_then(Value::as_str).ok_or_else(|| {
        ApiError::invalid_param(
            "response_format.type",
            "`response_format` must be an object with a `type`: \"text\", \"json_object\" or \
             \"json_schema\".",
        )
    })?;
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(GrammarSpec::JsonObject)),
        "json_schema" => {
            let param = "response_format.json_schema";
            let Some(definition) = format.get("json_schema").filter(|d| d.is_object()) else {
                return Err(ApiError::invalid_param(
                    param,
                    "`response_format.json_schema` must be an object with `name` and `schema`.",
                ));
            };
            match definition.get("name") {
                Some(Value::String(name)) if valid_schema_name(name) => {}
                _ => {
                    return Err(ApiError::invalid_param(
                        "response_format.json_schema.name",
                        "`response_format.json_schema.name` must be a string of 1 to 64 \
                         letters, digits, underscores or dashes.",
                    ))
                }
            }
            if let Some(strict) = definition.get("strict").filter(|s| !s.is_null()) {
                if !strict.is_boolean() {
                    return Err(ApiError::invalid_param(
                        "response_format.json_schema.strict",
                        "`response_format.json_schema.strict` must be a boolean.",
                    ));
                }
            }
            // Without a schema, OpenAI's rule is any JSON object; `strict` changes nothing
            // here, where every constrained output matches its schema exactly.
            match definition.get("schema").filter(|s| !s.is_null()) {
                None => Ok(Some(GrammarSpec::JsonObject)),
                Some(schema) => Ok(Some(GrammarSpec::JsonSchema(schema_value(
                    "response_format.json_schema.schema",
                    schema,
                )?))),
            }
        }
        other => Err(ApiError::invalid_param(
            "response_format.type",
            format!(
                "Unsupported `response_format.type` {other:?}: expected \"text\", \
                 \"json_object\" or \"json_schema\"."
            ),
        )),
    }
}

fn valid_schema_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn schema_value(param: &str, schema: &Value) -> Result<Value, ApiError> {
    if schema.is_object() || schema.is_boolean() {
        Ok(schema.clone())
    } else {
        Err(ApiError::invalid_param(
            param,
            format!("`{param}` must be a JSON schema: an object (or a boolean)."),
        ))
    }
}

/// Compiles the grammar for `model`, off the async threads and within
/// [`COMPILE_TIME_LIMIT`].
pub async fn compile(
    model: &Arc<ServedModel>,
    grammar: RequestedGrammar,
) -> Result<TokenConstraint, ApiError> {
    let RequestedGrammar { field, spec } = grammar;
    refuse_unless_supported(model, field)?;
    let engine = model.engine.clone();
    let compiling = tokio::task::spawn_blocking(move || {
        engine
            .grammar_compiler()
            .and_then(|compiler| compiler.compile(&spec))
    });
    match tokio::time::timeout(COMPILE_TIME_LIMIT, compiling).await {
        Err(_) => Err(ApiError::invalid_param(
            field,
            format!(
                "The grammar of `{field}` did not compile within {} s; simplify it.",
                COMPILE_TIME_LIMIT.as_secs()
            ),
        )),
        Ok(Err(_)) => Err(ApiError::internal("Compiling the grammar failed.")),
        Ok(Ok(Err(error))) => Err(ApiError::invalid_param(
            field,
            format!("Invalid `{field}`: {error}"),
        )),
        Ok(Ok(Ok(constraint))) => Ok(constraint),
    }
}

/// A 400 naming `field` when the model's runner cannot apply masks and biases.
pub fn refuse_unless_supported(model: &ServedModel, field: &str) -> Result<(), ApiError> {
    if model.engine.applies_logits_adjustments() {
        return Ok(());
    }
    let mut error = ApiError::invalid_param(
        field,
        format!(
            "`{field}` is not supported on model `{}`: its runner cannot apply grammar masks \
             or logit biases.",
            model.id
        ),
    );
    error.code = Some("unsupported_parameter");
    Err(error)
}
