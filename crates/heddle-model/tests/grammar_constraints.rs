//! Grammar constraints over the embedded model's real vocabulary: what the masks allow,
//! how a constraint advances and completes, and what is refused.

use std::sync::Arc;

use heddle_model::grammar::{GrammarCompiler, GrammarSpec};
use heddle_model::logits_processing::LogitsAdjustment;
use heddle_model::tokenizer::{Tokenizer, TokenizerBundle};
use serde_json::json;

const VOCAB: usize = 49152;

fn tokenizer() -> Arc<Tokenizer> {
    let path = heddle_model::embedded_model_path().unwrap();
    Arc::new(TokenizerBundle::from_gguf_file(path).unwrap().tokenizer)
}

fn compiler() -> (GrammarCompiler, Arc<Tokenizer>) {
    let tokenizer = tokenizer();
    (
        GrammarCompiler::new(tokenizer.clone(), VOCAB).unwrap(),
        tokenizer,
    )
}

#[test]
fn a_choice_allows_exactly_the_tokens_that_start_a_choice_and_completes() {
    let (compiler, tokenizer) = compiler();
    let mut constraint = compiler
        .compile(&GrammarSpec::Choice(vec!["yes".into(), "no".into()]))
        .unwrap();
    let mask = constraint.next_mask().unwrap();
    let id = |text: &str| {
        let ids = tokenizer.encode(text, false).unwrap();
        assert_eq!(ids.len(), 1, "{text:?}");
        ids[0]
    };
    for allowed in ["yes", "no", "y", "n"] {
        assert!(mask.allows(id(allowed)), "{allowed}");
    }
    for refused in ["maybe", " yes", "Yes"] {
        assert!(!mask.allows(id(refused)), "{refused}");
    }
    // Stop tokens only once the grammar is complete; special tokens never as text.
    for &stop in tokenizer.stop_token_ids() {
        assert!(!mask.allows(stop));
    }
    assert!(!mask.allows(tokenizer.token_to_id("<|im_start|>").unwrap()));
    assert!(!constraint.is_complete());
    constraint.accept(id("yes")).unwrap();
    assert!(constraint.is_complete(), "nothing can follow \"yes\"");
    let after = constraint.next_mask().unwrap();
    assert_eq!(after.num_allowed(), tokenizer.stop_token_ids().len());
}

#[test]
fn a_refused_token_is_an_error_and_masks_apply_to_logits() {
    let (compiler, tokenizer) = compiler();
    let mut constraint = compiler
        .compile(&GrammarSpec::Regex("[0-9]+".into()))
        .unwrap();
    let mask = constraint.next_mask().unwrap();
    let digit = tokenizer.encode("7", false).unwrap()[0];
    let letter = tokenizer.encode("x", false).unwrap()[0];
    let mut logits = vec![1.0f32; VOCAB];
    let adjustment = LogitsAdjustment {
        bias: Arc::from([(digit, 2.0), (letter, 5.0)]),
        mask: Some(mask),
    };
    adjustment.apply(&mut logits);
    assert_eq!(logits[digit as usize], 3.0);
    assert_eq!(logits[letter as usize], f32::NEG_INFINITY);
    let allowed = logits.iter().filter(|l| l.is_finite()).count();
    // This vocabulary spells numbers digit by digit: the ten digits, and nothing else.
    assert_eq!(allowed, 10);
    assert!(constraint.accept(letter).is_err());
}

#[test]
fn a_ban_is_minus_infinity() {
    let mut logits = vec![0.5f32; 8];
    LogitsAdjustment {
        bias: Arc::from([(3, -100.0), (4, -99.0), (9, 1.0)]),
        mask: None,
    }
    .apply(&mut logits);
    assert_eq!(logits[3], f32::NEG_INFINITY);
    assert_eq!(logits[4], 0.5 - 99.0);
}

#[test]
fn invalid_grammars_say_what_is_wrong() {
    let (compiler, _) = compiler();
    let cases = [
        (GrammarSpec::JsonSchema(json!({"type": "strng"})), "strng"),
        (GrammarSpec::JsonSchema(json!([1])), "object or a boolean"),
        (GrammarSpec::Regex("(".into()), ""),
        (GrammarSpec::Choice(Vec::new()), "empty"),
        (GrammarSpec::Lark("start: missing".into()), "missing"),
        (
            GrammarSpec::JsonSchema(json!({"type": "string", "pattern": "x".repeat(300_000)})),
            "bytes",
        ),
    ];
    for (spec, needle) in cases {
        let error = compiler.compile(&spec).unwrap_err();
        assert!(error.0.contains(needle), "{spec:?}: {error}");
    }
}
