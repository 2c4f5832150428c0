//! OpenAI's wire types for chat completions, completions and models.
//!
//! Requests keep the fields whose JSON type varies (`stop`, `prompt`, message `content`,
//! `priority`) as raw JSON: the handlers convert them with error messages that name the
//! field, which serde's untagged enums cannot do. Every field a request type does not
//! read lands in its `unread` map, which [`super::params::UnreadFields`] accepts
//! (informational fields) or refuses (fields heddle does not implement, unknown fields):
//! none is silently dropped.

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};

/// Fields shared by `/v1/chat/completions` and `/v1/completions`.
#[derive(Debug, Default, Deserialize)]
pub struct CommonFields {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// 0 or -1 disable it (-1 as in vLLM).
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<i64>,
    /// A string or a list of strings.
    pub stop: Option<Value>,
    /// Token ids that end the request (a vLLM extension).
    pub stop_token_ids: Option<Vec<i64>>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// Keep generating past the end-of-sequence token (a vLLM extension).
    pub ignore_eos: Option<bool>,
    /// heddle's own: "high", "normal", "low" (or 0, 1, 2).
    pub priority: Option<Value>,
    /// Structured output (see [`super::response_format`]): OpenAI's field and the
    /// vLLM-named extensions.
    pub response_format: Option<Value>,
    pub guided_json: Option<Value>,
    pub guided_regex: Option<Value>,
    pub guided_choice: Option<Value>,
    pub guided_grammar: Option<Value>,
    /// `{"token id": bias}` (see [`super::logit_bias`]).
    pub logit_bias: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
    #[serde(flatten)]
    pub unread: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    #[serde(flatten)]
    pub common: CommonFields,
    pub messages: Option<Vec<ChatMessageIn>>,
    /// The newer name of `max_tokens`; wins when both are given.
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    /// Tool calling (see [`super::tools`]).
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<Value>,
    /// Declared after `common`, whose fields serde takes first: only the rest lands here.
    #[serde(flatten)]
    pub unread: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    /// A string, a list of `{"type": "text", "text": ...}` parts, or null.
    #[serde(default)]
    pub content: Value,
    /// An assistant's calls; a tool message's answered call.
    pub tool_calls: Option<Value>,
    pub tool_call_id: Option<Value>,
    #[serde(flatten)]
    pub unread: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    #[serde(flatten)]
    pub common: CommonFields,
    /// A string, a list of strings, a list of token ids or a list of token id lists.
    pub prompt: Option<Value>,
    /// How many alternatives per token to return (0 returns only the chosen token's).
    pub logprobs: Option<i64>,
    /// Return the prompt before the completion, with its tokens' log-probabilities when
    /// `logprobs` is set.
    pub echo: Option<bool>,
    /// Declared after `common`, whose fields serde takes first: only the rest lands here.
    #[serde(flatten)]
    pub unread: Map<String, Value>,
}

/// Token counts of a response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens },
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Debug, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: &'static str,
}

#[derive(Debug, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    /// Null when the reply is only tool calls.
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

/// A call the model made: `{"id", "type": "function", "function": {"name", "arguments"}}`,
/// the arguments a JSON text.
#[derive(Debug, Clone, Serialize)]
pub struct ToolCall {
    /// Its position among the message's calls (streamed deltas only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, Serialize)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: String,
}

#[derive(Debug, Default, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Serialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Serialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Serialize)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: Delta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// What a chunk adds to the message; empty in the final chunk.
#[derive(Debug, Default, Serialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

/// A `/v1/completions` response; its streamed chunks have the same shape.
#[derive(Debug, Serialize)]
pub struct Completion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Serialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// The legacy completions log-probability format: parallel lists.
#[derive(Debug, Default, Serialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    /// null for an echoed prompt's first token, which nothing predicts.
    pub token_logprobs: Vec<Option<f32>>,
    /// null where `token_logprobs` is.
    pub top_logprobs: Vec<Option<TokenLogprobMap>>,
    /// Character offset of each token in the choice's text.
    pub text_offset: Vec<usize>,
}

/// Alternatives of one token, `{"token": logprob, ...}`, most likely first.
#[derive(Debug, Default)]
pub struct TokenLogprobMap(pub Vec<(String, f32)>);

impl Serialize for TokenLogprobMap {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (token, logprob) in &self.0 {
            map.serialize_entry(token, logprob)?;
        }
        map.end()
    }
}

#[derive(Debug, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_not_read_are_kept_apart() {
        let request: ChatCompletionRequest = serde_json::from_str(
            r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}],
                "temperature": 0, "max_completion_tokens": 5, "frobnicate": {"x": 1},
                "stream_options": {"include_usage": true}, "logprobs": true, "user": "u"}"#,
        )
        .unwrap();
        assert_eq!(request.common.model.as_deref(), Some("m"));
        assert_eq!(request.common.temperature, Some(0.0));
        assert_eq!(request.max_completion_tokens, Some(5));
        assert_eq!(request.logprobs, Some(true));
        assert_eq!(
            request.common.stream_options.and_then(|o| o.include_usage),
            Some(true)
        );
        assert_eq!(request.messages.unwrap()[0].content, Value::from("hi"));
        // Only what neither the request nor its common fields read.
        assert_eq!(
            request.unread.keys().collect::<Vec<_>>(),
            ["frobnicate", "user"]
        );
        let request: CompletionRequest = serde_json::from_str(
            r#"{"prompt": "x", "seed": 1, "suffix": "",
                "stream_options": {"include_usage": true, "include_obfuscation": false}}"#,
        )
        .unwrap();
        assert_eq!(request.common.seed, Some(1));
        assert_eq!(request.unread.keys().collect::<Vec<_>>(), ["suffix"]);
        let options = request.common.stream_options.unwrap();
        assert_eq!(options.include_usage, Some(true));
        assert_eq!(
            options.unread.keys().collect::<Vec<_>>(),
            ["include_obfuscation"]
        );
    }

    #[test]
    fn top_logprobs_of_completions_serialize_as_an_ordered_object() {
        let map = TokenLogprobMap(vec![("b".into(), -0.5), ("a".into(), -1.0)]);
        assert_eq!(
            serde_json::to_string(&map).unwrap(),
            r#"{"b":-0.5,"a":-1.0}"#
        );
    }

    #[test]
    fn a_chunk_without_usage_has_no_usage_field() {
        let chunk = ChatCompletionChunk {
            id: "chatcmpl-1".into(),
            object: "chat.completion.chunk",
            created: 0,
            model: "m".into(),
            choices: vec![ChatChunkChoice {
                index: 0,
                delta: Delta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                    tool_calls: None,
                },
                logprobs: None,
                finish_reason: None,
            }],
            usage: None,
        };
        let json: Value = serde_json::to_value(&chunk).unwrap();
        assert!(json.get("usage").is_none());
        assert_eq!(json["choices"][0]["delta"]["role"], "assistant");
        assert!(json["choices"][0]["finish_reason"].is_null());
    }
}
