//! `POST /tokenize` and `POST /detokenize`, as vLLM's and llama.cpp's servers have them:
//! `{"model", "prompt"}` → `{"tokens": [...], "count", "max_model_len"}` and
//! `{"model", "tokens"}` → `{"prompt"}`.
//!
//! `/tokenize` encodes the prompt as `/v1/completions` does (special-token texts parsed,
//! BOS first when the model wants it), unless `add_special_tokens` is false (no BOS).

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use heddle_core::TokenId;

use super::auth::Caller;
use super::errors::ApiError;
use super::{AppState, JsonBody};

#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub add_special_tokens: Option<bool>,
    #[serde(flatten)]
    pub unread: Map<String, Value>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TokenizeResponse {
    pub tokens: Vec<TokenId>,
    pub count: usize,
    pub max_model_len: usize,
}

#[derive(Debug, Deserialize)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Option<Vec<i64>>,
    #[serde(flatten)]
    pub unread: Map<String, Value>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

fn model_field(model: &Option<String>) -> Result<&str, ApiError> {
    match model.as_deref() {
        Some(model) if !model.is_empty() => Ok(model),
        _ => Err(ApiError::invalid_param(
            "model",
            "You must provide a model parameter.",
        )),
    }
}

fn refuse_unknown(unread: &Map<String, Value>) -> Result<(), ApiError> {
    match unread.iter().find(|(_, value)| !value.is_null()) {
        Some((field, _)) => Err(ApiError::invalid_param(
            field,
            format!("Unrecognized request argument supplied: {field}"),
        )),
        None => Ok(()),
    }
}

pub async fn tokenize(
    State(state): State<AppState>,
    _caller: Caller,
    JsonBody(request): JsonBody<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    refuse_unknown(&request.unread)?;
    let model_id = model_field(&request.model)?;
    let Some(prompt) = request.prompt else {
        return Err(ApiError::invalid_param(
            "prompt",
            "You must provide a prompt.",
        ));
    };
    let model = state.model(model_id).await?;
    let with_special = request.add_special_tokens.unwrap_or(true);
    let max_model_len = model.max_sequence_len;
    let tokens = tokio::task::spawn_blocking(move || {
        let tokenizer = model.engine.tokenizer();
        if with_special {
            tokenizer.encode_prompt(&prompt)
        } else {
            tokenizer.encode(&prompt, true)
        }
    })
    .await
    .map_err(|_| ApiError::internal("Tokenizing the prompt failed."))?
    .map_err(|error| ApiError::internal(error.to_string()))?;
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        tokens,
        max_model_len,
    }))
}

pub async fn detokenize(
    State(state): State<AppState>,
    _caller: Caller,
    JsonBody(request): JsonBody<DetokenizeRequest>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    refuse_unknown(&request.unread)?;
    let model_id = model_field(&request.model)?;
    let Some(ids) = request.tokens else {
        return Err(ApiError::invalid_param(
            "tokens",
            "You must provide `tokens`, a list of token ids.",
        ));
    };
    let model = state.model(model_id).await?;
    let vocab_size = model.vocab_size;
    let tokens = ids
        .iter()
        .map(|&id| {
            TokenId::try_from(id)
                .ok()
                .filter(|&id| (id as usize) < vocab_size)
                .ok_or_else(|| {
                    ApiError::invalid_param(
                        "tokens",
                        format!(
                            "Token id {id} is outside the model's vocabulary of {vocab_size} \
                             tokens."
                        ),
                    )
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let prompt =
        tokio::task::spawn_blocking(move || model.engine.tokenizer().decode(&tokens, false))
            .await
            .map_err(|_| ApiError::internal("Detokenizing failed."))?
            .map_err(|error| ApiError::internal(error.to_string()))?;
    Ok(Json(DetokenizeResponse { prompt }))
}
