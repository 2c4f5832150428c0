//! `GET /server_info`: what a router asks a worker when it registers it. sglang-router
//! (SGLang Model Gateway) reads `served_model_name` here (SGLang's own field) to learn the
//! model id it routes under; without it the worker is listed as model "unknown".
//!
//! Only what heddle knows for certain is told: the served model's id when the server
//! serves exactly one model (with several, no single name is true, and the router keeps
//! routing every model name to this worker), every id and alias, the version, and the
//! scheduler's limits. No `model_path`: a path on this machine means nothing to a router
//! elsewhere, and SGLang's router would try to load a tokenizer from it.

use axum::extract::State;
use axum::Json;
use serde::Serialize;

use super::AppState;

#[derive(Debug, Serialize)]
pub struct ServerInfo {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub served_model_name: Option<String>,
    /// Every name a request may use, ids first.
    pub served_model_names: Vec<String>,
    pub version: &'static str,
    /// Most sequences in one step.
    pub max_running_requests: usize,
    /// Most tokens (prefill and decode together) in one step.
    pub max_prefill_tokens: usize,
}

pub async fn server_info(State(state): State<AppState>) -> Json<ServerInfo> {
    let specs = state.pool.specs();
    let served_model_name = match specs {
        [only] => Some(only.id.clone()),
        _ => None,
    };
    let served_model_names = specs
        .iter()
        .map(|s| s.id.clone())
        .chain(specs.iter().flat_map(|s| s.aliases.iter().cloned()))
        .collect();
    let scheduler = state.pool.scheduler_config();
    Json(ServerInfo {
        served_model_name,
        served_model_names,
        version: env!("CARGO_PKG_VERSION"),
        max_running_requests: scheduler.max_running,
        max_prefill_tokens: scheduler.max_batched_tokens,
    })
}
