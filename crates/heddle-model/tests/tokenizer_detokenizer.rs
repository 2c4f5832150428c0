//! Streaming detokenization and stop strings over the embedded model's tokenizer.

use std::path::PathBuf;
use std::sync::Arc;

use heddle_model::detokenizer::IncrementalDetokenizer;
use heddle_model::stop_strings::StopStringMatcher;
use heddle_model::tokenizer::{Tokenizer, TokenizerBundle};

/// The embedded model, checked; scripts/fetch-model.sh fetches it.
fn model_path() -> PathBuf {
    heddle_model::embedded_model_path().unwrap()
}

fn tokenizer() -> Arc<Tokenizer> {
    Arc::new(
        TokenizerBundle::from_gguf_file(model_path())
            .unwrap()
            .tokenizer,
    )
}

/// Feeds `ids` one at a time; returns every delta, the final flush last.
fn stream(tok: &Arc<Tokenizer>, ids: &[u32], skip_special: bool) -> Vec<String> {
    let mut decoder = IncrementalDetokenizer::new(tok.clone(), skip_special);
    let mut deltas: Vec<String> = ids.iter().map(|&id| decoder.push(id).unwrap()).collect();
    deltas.push(decoder.finish().unwrap());
    deltas
}

const TEXTS: &[&str] = &[
    "Plain ASCII text, with punctuation; and numbers 12345.",
    "Accents: déjà vu, naïve, Zürich, São Paulo, ça va ?",
    "Emoji: 🦀🚀 family 👩‍👩‍👧 heart ❤️ flag 🇯🇵 end",
    "CJK: 日本語のテキストです。中文字符。한국어 텍스트",
    "Mixed 🙂日本 é\n\ttabs   and  spaces  ",
];

#[test]
fn deltas_concatenate_to_the_full_decode() {
    let tok = tokenizer();
    for text in TEXTS {
        let ids = tok.encode(text, false).unwrap();
        for skip_special in [false, true] {
            let deltas = stream(&tok, &ids, skip_special);
            assert_eq!(deltas.concat(), tok.decode(&ids, skip_special).unwrap());
            assert_eq!(deltas.concat(), *text);
            // Every delta is whole characters: no replacement characters anywhere.
            assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')), "{deltas:?}");
            assert_eq!(deltas.last().unwrap(), "", "nothing left at the end");
        }
    }
}

#[test]
fn split_characters_are_held_until_complete() {
    let tok = tokenizer();
    let ids = tok.encode("🦀", false).unwrap();
    assert!(
        ids.len() > 1,
        "the crab emoji is several byte tokens: {ids:?}"
    );
    let deltas = stream(&tok, &ids, true);
    assert!(
        deltas[..ids.len() - 1].iter().all(String::is_empty),
        "{deltas:?}"
    );
    assert_eq!(deltas[ids.len() - 1], "🦀");

    // A stream cut in the middle of a character flushes it as U+FFFD.
    let mut decoder = IncrementalDetokenizer::new(tok.clone(), true);
    assert_eq!(decoder.push(ids[0]).unwrap(), "");
    assert_eq!(decoder.finish().unwrap(), "\u{FFFD}");
}

#[test]
fn special_tokens_are_skipped_or_kept() {
    let tok = tokenizer();
    let ids = tok
        .encode("<|im_start|>assistant\nBonjour 🙂<|im_end|>\n", true)
        .unwrap();
    assert_eq!(stream(&tok, &ids, true).concat(), "assistant\nBonjour 🙂\n");
    let kept = stream(&tok, &ids, false);
    assert_eq!(
        kept.concat(),
        "<|im_start|>assistant\nBonjour 🙂<|im_end|>\n"
    );
    assert_eq!(kept[0], "<|im_start|>");
}

#[test]
fn detokenizer_feeds_stop_strings() {
    // The engine's path: token → text delta → stop-string matcher → client.
    let tok = tokenizer();
    let ids = tok
        .encode("The answer is 42.\n\nUser: what else?", false)
        .unwrap();
    let mut decoder = IncrementalDetokenizer::new(tok.clone(), true);
    let mut stops = StopStringMatcher::new(["\n\nUser:", "never"]);
    let mut emitted = String::new();
    let mut hit = None;
    for &id in &ids {
        let scan = stops.push(&decoder.push(id).unwrap());
        emitted.push_str(&scan.text);
        if scan.stop.is_some() {
            hit = scan.stop;
            break;
        }
    }
    assert_eq!(hit, Some(0));
    assert_eq!(emitted, "The answer is 42.");
}
