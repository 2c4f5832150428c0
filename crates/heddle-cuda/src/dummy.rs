//! What serving random weights needs besides them: the model config from a file, and a
//! tokenizer of the right vocabulary size.
//!
//! Random weights have no tokenizer. Prompts are meant to arrive as token ids (the
//! completions API takes a list of ids as `prompt`); text is split on whitespace into
//! words `t<id>`, and output ids print as `t<id>` separated by spaces. Unknown words map
//! to id 0. That keeps the server's text paths working at the model's real vocabulary.

use std::path::{Path, PathBuf};

use anyhow::Context;
use heddle_model::tokenizer::TokenizerBundle;
use heddle_model::ModelConfig;

/// Reads an HF `config.json`-format file.
pub fn read_config(path: &Path) -> anyhow::Result<ModelConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    ModelConfig::from_hf_json(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The `tokenizer.json` text of a word-level tokenizer with words `t0` … `t<vocab-1>`.
pub fn tokenizer_json(vocab_size: usize) -> String {
    let vocab: serde_json::Map<String, serde_json::Value> = (0..vocab_size)
        .map(|i| (format!("t{i}"), serde_json::Value::from(i)))
        .collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
    })
    .to_string()
}

/// A tokenizer bundle for random weights of `vocab_size` tokens, written to (and read
/// from) a folder under the system's temporary directory.
pub fn tokenizer_bundle(vocab_size: usize) -> anyhow::Result<TokenizerBundle> {
    let dir: PathBuf = std::env::temp_dir().join(format!(
        "heddle-dummy-tokenizer-{vocab_size}-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json(vocab_size))
        .with_context(|| format!("writing {}", dir.display()))?;
    let bundle = TokenizerBundle::from_hf_dir(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(bundle?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dummy_tokenizer_round_trips_ids() {
        let bundle = tokenizer_bundle(1000).unwrap();
        let t = &bundle.tokenizer;
        assert_eq!(t.vocab_size(), 1000);
        assert_eq!(t.encode("t5 t999 t17", false).unwrap(), vec![5, 999, 17]);
        assert_eq!(t.decode(&[5, 999], false).unwrap(), "t5 t999");
    }

    #[test]
    fn the_shipped_configs_parse_with_their_public_shapes() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let small = read_config(&root.join("llama-3.2-1b.json")).unwrap();
        assert_eq!(
            (
                small.hidden_size,
                small.num_layers,
                small.num_kv_heads,
                small.head_dim
            ),
            (2048, 16, 8, 64)
        );
        assert!(small.tie_word_embeddings);
        let big = read_config(&root.join("llama-3.1-8b.json")).unwrap();
        assert_eq!(
            (
                big.hidden_size,
                big.intermediate_size,
                big.num_layers,
                big.head_dim
            ),
            (4096, 14336, 32, 128)
        );
        assert!(!big.tie_word_embeddings && big.rope_scaling.is_some());
        assert_eq!(big.vocab_size, 128_256);
        // The 70B shape (141 GB in bf16): the 8B's vocabulary, RoPE and head size.
        let largest = read_config(&root.join("llama-3.1-70b.json")).unwrap();
        assert_eq!(
            (
                largest.hidden_size,
                largest.intermediate_size,
                largest.num_layers,
                largest.num_heads,
                largest.num_kv_heads,
                largest.head_dim
            ),
            (8192, 28672, 80, 64, 8, 128)
        );
        assert_eq!(
            (
                largest.vocab_size,
                largest.rope_theta,
                &largest.rope_scaling
            ),
            (big.vocab_size, big.rope_theta, &big.rope_scaling)
        );
    }
}
