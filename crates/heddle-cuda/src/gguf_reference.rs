//! A GGUF model on the GPU against the committed reference outputs of the same file
//! (crates/heddle-model/tests/data/llamacpp_reference.json, made by
//! scripts/reference/make_reference.py): the exact float64 forward pass's greedy tokens,
//! which heddle's CPU runner in its exact f32 mode reproduces on every prompt.
//!
//! The GPU runs the file dequantized to f32 (must give the same tokens) or to bf16 (may
//! part from them, but only where the float64 model itself rates the two tokens within
//! [`NEAR_TIE_NATS`] of each other).

use anyhow::Context;
use heddle_core::TokenId;

use crate::runner::CudaRunner;

/// A bf16 divergence counts as a near-tie when the float64 model's log-probabilities of
/// its token and heddle's differ by at most this (the CPU serving mode's rule against
/// llama.cpp, docs/CORRECTNESS.md).
pub const NEAR_TIE_NATS: f64 = 0.5;

/// One reference prompt and the float64 model's outputs on it.
pub struct Case {
    pub name: String,
    pub prompt: Vec<TokenId>,
    pub greedy: Vec<TokenId>,
    /// Per position of prompt + greedy: the float64 top-10 (id, log-probability).
    pub top: Vec<Vec<(TokenId, f64)>>,
}

/// Reads the reference file's cases.
pub fn read_cases(text: &str) -> anyhow::Result<Vec<Case>> {
    let v: serde_json::Value = serde_json::from_str(text)?;
    let ids = |x: &serde_json::Value| -> anyhow::Result<Vec<TokenId>> {
        x.as_array()
            .context("expected a list of token ids")?
            .iter()
            .map(|t| t.as_u64().map(|t| t as TokenId).context("not a token id"))
            .collect()
    };
    v["cases"]
        .as_array()
        .context("the reference has no cases")?
        .iter()
        .map(|c| {
            let top = c["f64"]["positions"]
                .as_array()
                .context("no float64 positions")?
                .iter()
                .map(|p| {
                    p["top"]
                        .as_array()
                        .context("no top list")?
                        .iter()
                        .map(|e| {
                            Ok((
                                e[0].as_u64().context("top id")? as TokenId,
                                e[1].as_f64().context("top log-probability")?,
                            ))
                        })
                        .collect::<anyhow::Result<Vec<_>>>()
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            Ok(Case {
                name: c["name"].as_str().unwrap_or("?").to_string(),
                prompt: ids(&c["prompt_ids"])?,
                greedy: ids(&c["f64"]["greedy_ids"])?,
                top,
            })
        })
        .collect()
}

/// How one case's GPU greedy text compares with the float64 one.
#[derive(Debug, Clone, PartialEq)]
pub struct Agreement {
    pub name: String,
    /// The first generated index where the GPU's token differs, if any.
    pub parted_at: Option<usize>,
    /// There: the float64 log-probability of its own token minus that of the GPU's (a
    /// lower bound when the GPU's token is not in the float64 top 10).
    pub margin: f64,
}

pub fn compare(case: &Case, gpu: &[TokenId]) -> Agreement {
    let parted_at = case.greedy.iter().zip(gpu).position(|(a, b)| a != b);
    let margin = parted_at.map_or(0.0, |k| {
        let top = &case.top[case.prompt.len() - 1 + k];
        let lp = |id: TokenId| top.iter().find(|(t, _)| *t == id).map(|(_, lp)| *lp);
        let theirs = lp(case.greedy[k]).unwrap_or(f64::NAN);
        let lowest = top.last().map_or(f64::NEG_INFINITY, |(_, lp)| *lp);
        theirs - lp(gpu[k]).unwrap_or(lowest)
    });
    Agreement {
        name: case.name.clone(),
        parted_at,
        margin,
    }
}

/// Greedy generation of every case's reference length, all cases together.
pub fn run(runner: &mut CudaRunner, cases: &[Case]) -> anyhow::Result<Vec<Agreement>> {
    let prompts: Vec<(usize, Vec<TokenId>)> = cases.iter().map(|c| (0, c.prompt.clone())).collect();
    let tokens = cases.iter().map(|c| c.greedy.len()).max().unwrap_or(0);
    let outputs = crate::selftest::generate(runner, &prompts, tokens)?;
    Ok(cases
        .iter()
        .zip(&outputs)
        .map(|(c, out)| compare(c, out))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_reference_reads_and_a_divergence_gets_its_margin() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../heddle-model/tests/data/llamacpp_reference.json"
        );
        let cases = read_cases(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(cases.len(), 12);
        let case = &cases[0];
        assert_eq!(case.top.len(), case.prompt.len() + case.greedy.len());
        assert_eq!(compare(case, &case.greedy).parted_at, None);
        // Swap the first generated token for the float64 runner-up: the margin is the
        // float64 gap between the two.
        let top = &case.top[case.prompt.len() - 1];
        assert_eq!(top[0].0, case.greedy[0]);
        let mut other = case.greedy.clone();
        other[0] = top[1].0;
        let a = compare(case, &other);
        assert_eq!(a.parted_at, Some(0));
        assert!((a.margin - (top[0].1 - top[1].1)).abs() < 1e-12);
    }
}
