//! heddle's text side against llama.cpp on the embedded model: the same rendered chat
//! prompts, the same token ids, the same special ids. The reference comes from
//! scripts/reference/make_reference.py (llama-cpp-python) in tests/data.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use heddle_model::chat_template::ChatMessage;
use heddle_model::detokenizer::IncrementalDetokenizer;
use heddle_model::tokenizer::TokenizerBundle;
use serde_json::Value;

/// The embedded model, checked; scripts/fetch-model.sh fetches it.
fn model_path() -> PathBuf {
    heddle_model::embedded_model_path().unwrap()
}

fn reference() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/llamacpp_reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; generate it with scripts/reference/make_reference.py",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap()
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|id| u32::try_from(id.as_u64().unwrap()).unwrap())
        .collect()
}

fn text(value: &Value) -> &str {
    value.as_str().unwrap()
}

#[test]
fn special_tokens_match_llamacpp() {
    let reference = reference();
    let gguf = &reference["gguf"];
    let bundle = TokenizerBundle::from_gguf_file(model_path()).unwrap();
    let tok = &bundle.tokenizer;
    assert_eq!(tok.vocab_size() as u64, gguf["n_vocab"].as_u64().unwrap());
    assert_eq!(
        tok.bos_token_id().map(i64::from),
        gguf["bos_token_id"].as_i64().filter(|&id| id >= 0)
    );
    assert_eq!(
        tok.eos_token_id().map(i64::from),
        gguf["eos_token_id"].as_i64().filter(|&id| id >= 0)
    );
    assert_eq!(tok.add_bos(), gguf["add_bos_token"].as_bool().unwrap());
    let mut stops = tok.stop_token_ids().to_vec();
    stops.sort_unstable();
    assert_eq!(stops, ids(&gguf["eog_token_ids"]), "end-of-generation ids");
    // Every control / user-defined token is one token when special tokens are parsed.
    for entry in gguf["special_tokens"].as_array().unwrap() {
        let id = u32::try_from(entry[0].as_u64().unwrap()).unwrap();
        assert_eq!(tok.encode(text(&entry[1]), true).unwrap(), [id], "{entry}");
    }
}

#[test]
fn chat_prompts_render_and_tokenize_like_llamacpp() {
    let reference = reference();
    let bundle = TokenizerBundle::from_gguf_file(model_path()).unwrap();
    let cases = reference["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let name = text(&case["name"]);
        let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).unwrap();
        let rendered = bundle.chat_template.render(&messages, true).unwrap();
        assert_eq!(rendered, text(&case["rendered"]), "case {name}: rendering");
        assert_eq!(
            bundle.tokenizer.encode_prompt(&rendered).unwrap(),
            ids(&case["prompt_ids"]),
            "case {name}: prompt ids"
        );
    }
}

#[test]
fn plain_strings_tokenize_like_llamacpp() {
    let reference = reference();
    let bundle = TokenizerBundle::from_gguf_file(model_path()).unwrap();
    let tok = &bundle.tokenizer;
    let entries = reference["tokenization"].as_array().unwrap();
    assert!(!entries.is_empty());
    for entry in entries {
        let s = text(&entry["text"]);
        assert_eq!(
            tok.encode(s, false).unwrap(),
            ids(&entry["special_false"]),
            "{s:?} without special tokens"
        );
        assert_eq!(
            tok.encode(s, true).unwrap(),
            ids(&entry["special_true"]),
            "{s:?} with special tokens"
        );
    }
}

#[test]
fn generated_tokens_decode_like_llamacpp() {
    let reference = reference();
    let tok = Arc::new(
        TokenizerBundle::from_gguf_file(model_path())
            .unwrap()
            .tokenizer,
    );
    for case in reference["cases"].as_array().unwrap() {
        let name = text(&case["name"]);
        let greedy = ids(&case["greedy_ids"]);
        for (skip_special, key) in [(true, "greedy_text"), (false, "greedy_text_special")] {
            let expected = text(&case[key]);
            assert_eq!(
                tok.decode(&greedy, skip_special).unwrap(),
                expected,
                "case {name}: {key}"
            );
            let mut decoder = IncrementalDetokenizer::new(tok.clone(), skip_special);
            let mut streamed = String::new();
            for &id in &greedy {
                streamed.push_str(&decoder.push(id).unwrap());
            }
            streamed.push_str(&decoder.finish().unwrap());
            assert_eq!(streamed, expected, "case {name}: streamed {key}");
        }
    }
}
