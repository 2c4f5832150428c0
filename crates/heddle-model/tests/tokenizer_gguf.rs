//! The tokenizer and chat template rebuilt from the embedded model's GGUF metadata.

use std::path::PathBuf;

use candle_core::quantized::gguf_file;
use heddle_model::chat_template::ChatMessage;
use heddle_model::tokenizer::{Tokenizer, TokenizerBundle, TokenizerError};

/// The embedded model, checked; scripts/fetch-model.sh fetches it.
fn model_path() -> PathBuf {
    heddle_model::embedded_model_path().unwrap()
}

fn read_gguf() -> gguf_file::Content {
    let mut file = std::fs::File::open(model_path()).unwrap();
    gguf_file::Content::read(&mut file).unwrap()
}

fn bundle() -> TokenizerBundle {
    TokenizerBundle::from_gguf_file(model_path()).unwrap()
}

#[test]
fn special_ids_and_flags_follow_the_metadata() {
    let tok = bundle().tokenizer;
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(tok.eos_token_id(), Some(2));
    assert_eq!(tok.bos_token().as_deref(), Some("<|im_start|>"));
    assert_eq!(tok.eos_token().as_deref(), Some("<|im_end|>"));
    assert!(!tok.add_bos());
    // EOS is <|im_end|>; <|endoftext|> (0) and the code-completion <reponame> (4) also
    // end generation.
    let mut stops = tok.stop_token_ids().to_vec();
    stops.sort_unstable();
    assert_eq!(stops, [0, 2, 4]);
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(tok.token_to_piece(2).as_deref(), Some("<|im_end|>"));
    assert_eq!(tok.token_to_piece(49152), None);
}

#[test]
fn special_tokens_are_parsed_only_on_request() {
    let tok = bundle().tokenizer;
    assert_eq!(tok.encode("<|im_start|>", true).unwrap(), [1]);
    assert_eq!(
        tok.encode("<|im_start|>user\nHi<|im_end|>", true).unwrap()[..2],
        [1, tok.encode("user", false).unwrap()[0]]
    );
    let literal = tok.encode("<|im_start|>", false).unwrap();
    assert!(literal.len() > 1, "{literal:?}");
    assert!(!literal.contains(&1));
    assert_eq!(tok.decode(&literal, true).unwrap(), "<|im_start|>");
    // No BOS for this model, so a prompt is just its tokens.
    let prompt = "<|im_start|>user\nHi<|im_end|>\n";
    assert_eq!(
        tok.encode_prompt(prompt).unwrap(),
        tok.encode(prompt, true).unwrap()
    );
}

#[test]
fn digits_are_split_one_by_one() {
    let tok = bundle().tokenizer;
    let ids = tok.encode("2024", false).unwrap();
    assert_eq!(ids.len(), 4);
    let pieces: Vec<String> = ids
        .iter()
        .map(|&id| tok.token_to_piece(id).unwrap())
        .collect();
    assert_eq!(pieces, ["2", "0", "2", "4"]);
}

#[test]
fn decode_inverts_encode() {
    let tok = bundle().tokenizer;
    let texts = [
        "Hello, world! How are you today?",
        "Héllo wörld — ça va? naïve café Zürich, Ελληνικά, Привет",
        "emoji 🦀🚀👩‍👩‍👧 and ❤️ flags 🇫🇷",
        "日本語のテキストです。中文也可以。한국어도",
        "   leading, inner  \t\t  runs,\n\n\n newlines\r\n and trailing   ",
        "code:\n\tfn main() { println!(\"{}\", 1 + 2); }\n",
        "",
        " ",
        "\u{0}\u{7f}\u{ad}\u{200b}\u{feff} odd code points",
    ];
    for text in texts {
        for parse_special in [false, true] {
            let ids = tok.encode(text, parse_special).unwrap();
            assert_eq!(tok.decode(&ids, false).unwrap(), text, "{ids:?}");
        }
    }
    let with_special = "<|im_start|>assistant\nSure 🙂<|im_end|>";
    let ids = tok.encode(with_special, true).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), with_special);
    assert_eq!(tok.decode(&ids, true).unwrap(), "assistant\nSure 🙂");
}

#[test]
fn embedded_template_renders_chatml() {
    let bundle = bundle();
    let messages = [
        ChatMessage::new("system", "You are a concise assistant."),
        ChatMessage::new("user", "What is the capital of France?"),
    ];
    let rendered = bundle.chat_template.render(&messages, true).unwrap();
    assert_eq!(
        rendered,
        "<|im_start|>system\nYou are a concise assistant.<|im_end|>\n\
         <|im_start|>user\nWhat is the capital of France?<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    // Without a system message the template adds its own.
    let rendered = bundle
        .chat_template
        .render(&[ChatMessage::new("user", "Hi")], false)
        .unwrap();
    assert_eq!(
        rendered,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
         Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    );
}

#[test]
fn unsupported_tokenizers_fail_clearly() {
    let mut content = read_gguf();
    let set = |content: &mut gguf_file::Content, key: &str, value: &str| {
        content
            .metadata
            .insert(key.into(), gguf_file::Value::String(value.into()));
    };

    set(&mut content, "tokenizer.ggml.pre", "chameleon");
    let err = Tokenizer::from_gguf(&content).unwrap_err();
    assert!(matches!(err, TokenizerError::Unsupported(_)), "{err}");
    assert!(err.to_string().contains("\"chameleon\""), "{err}");
    assert!(err.to_string().contains("smollm"), "{err}");

    set(&mut content, "tokenizer.ggml.model", "llama");
    let err = Tokenizer::from_gguf(&content).unwrap_err();
    assert!(matches!(err, TokenizerError::Unsupported(_)), "{err}");
    assert!(err.to_string().contains("SentencePiece"), "{err}");

    content.metadata.remove("tokenizer.ggml.model");
    let err = Tokenizer::from_gguf(&content).unwrap_err();
    assert!(
        err.to_string().contains("missing tokenizer.ggml.model"),
        "{err}"
    );
}

#[test]
fn llama3_family_adds_bos_once() {
    // The same vocabulary under the Llama 3 family, which adds BOS unless the file says
    // otherwise.
    let mut content = read_gguf();
    content.metadata.insert(
        "tokenizer.ggml.pre".into(),
        gguf_file::Value::String("llama-bpe".into()),
    );
    assert!(!Tokenizer::from_gguf(&content).unwrap().add_bos());
    content.metadata.remove("tokenizer.ggml.add_bos_token");
    let tok = Tokenizer::from_gguf(&content).unwrap();
    assert!(tok.add_bos());
    assert_eq!(tok.encode_prompt("Hi").unwrap()[0], 1);
    // Not twice when the text (a rendered template) already starts with it.
    let ids = tok.encode_prompt("<|im_start|>Hi").unwrap();
    assert_eq!(ids.iter().filter(|&&id| id == 1).count(), 1);
}

#[test]
fn token_bytes_rebuild_text_even_inside_a_character() {
    let tokenizer = bundle().tokenizer;
    for text in [
        "héllo wörld\n",
        "日本語のテキスト",
        "emoji 🦀 and tabs\t",
        "<|im_end|>",
    ] {
        let ids = tokenizer.encode(text, true).unwrap();
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&id| tokenizer.token_bytes(id).unwrap())
            .collect();
        assert_eq!(String::from_utf8(bytes).unwrap(), text, "{ids:?}");
    }
    // A character split over tokens: each piece alone is not valid UTF-8.
    let ids = tokenizer.encode("🦀", false).unwrap();
    assert!(ids.len() > 1, "{ids:?}");
    assert!(String::from_utf8(tokenizer.token_bytes(ids[0]).unwrap()).is_err());
    assert_eq!(tokenizer.token_bytes(u32::MAX), None);
}
