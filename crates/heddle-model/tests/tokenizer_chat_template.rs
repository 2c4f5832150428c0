//! Chat templates in the style real models ship, rendered as `transformers` renders them
//! (the expected texts were checked against Jinja2 set up like `apply_chat_template`).

use std::path::{Path, PathBuf};

use heddle_model::chat_template::{ChatMessage, ChatTemplate, ChatTemplateError, CHATML_TEMPLATE};
use heddle_model::tokenizer::TokenizerBundle;
use serde_json::json;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn template(name: &str, bos: &str, eos: &str) -> ChatTemplate {
    let source = std::fs::read_to_string(data(name)).unwrap();
    ChatTemplate::new(source, bos, eos).unwrap()
}

fn extra(value: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    value.as_object().unwrap().clone()
}

fn system_user() -> Vec<ChatMessage> {
    vec![
        ChatMessage::new("system", "  You are helpful.  "),
        ChatMessage::new("user", "Hi there! "),
    ]
}

#[test]
fn llama3_style_template() {
    let tmpl = template("tok_llama3_style.jinja", "<|begin_of_text|>", "<|eot_id|>");
    let rendered = tmpl
        .render_with(
            &system_user(),
            true,
            &extra(json!({"date_string": "26 Jul 2024"})),
        )
        .unwrap();
    assert_eq!(
        rendered,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n\
         Today Date: 26 Jul 2024\n\nYou are helpful.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHi there!<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );

    // Without a date the template asks strftime_now for today's.
    let rendered = tmpl.render(&system_user(), false).unwrap();
    let date = rendered
        .split("Today Date: ")
        .nth(1)
        .and_then(|rest| rest.split("\n\n").next())
        .unwrap();
    let parts: Vec<&str> = date.split(' ').collect();
    assert_eq!(parts.len(), 3, "{date:?}");
    assert!(parts[0].len() == 2 && parts[0].chars().all(|c| c.is_ascii_digit()));
    assert!(parts[1].len() == 3 && parts[1].chars().next().unwrap().is_ascii_uppercase());
    assert!(parts[2].len() == 4 && parts[2].chars().all(|c| c.is_ascii_digit()));
    assert!(rendered.ends_with("Hi there!<|eot_id|>"));
}

#[test]
fn tools_are_rendered_with_python_json() {
    let tmpl = template("tok_llama3_style.jinja", "<|begin_of_text|>", "<|eot_id|>");
    assert!(tmpl.reads_tools());
    let chatml = ChatTemplate::new(heddle_model::chat_template::CHATML_TEMPLATE, "", "").unwrap();
    assert!(!chatml.reads_tools());
    let tools = json!([{
        "description": "Weather at <place> & 'now'",
        "name": "get_weather",
        "parameters": {
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "type": "object"
        }
    }]);
    let rendered = tmpl
        .render_with(
            &system_user()[1..],
            false,
            &extra(json!({"date_string": "26 Jul 2024", "tools": tools})),
        )
        .unwrap();
    assert_eq!(
        rendered,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n\
         Today Date: 26 Jul 2024\n\nYou may call these functions:\n\
         {\n    \"description\": \"Weather at <place> & 'now'\",\n    \"name\": \"get_weather\",\n    \
         \"parameters\": {\n        \"properties\": {\n            \"city\": {\n                \
         \"type\": \"string\"\n            }\n        },\n        \"required\": [\n            \
         \"city\"\n        ],\n        \"type\": \"object\"\n    }\n}\n\n<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHi there!<|eot_id|>"
    );
}

#[test]
fn tojson_matches_python() {
    let tmpl = ChatTemplate::new(
        "{{ x | tojson }}|{{ x | tojson(indent=2, sort_keys=true) }}|\
         {{ 'é\"\\\\\n\t<>&\\'' | tojson }}|{{ 'é😀' | tojson(ensure_ascii=true) }}|\
         {{ [] | tojson(indent=2) }}|{{ {} | tojson }}|\
         {{ [1, 2.5, none, true] | tojson(separators=(',', ':')) }}",
        "",
        "",
    )
    .unwrap();
    let rendered = tmpl
        .render_with(
            &[],
            false,
            &extra(json!({"x": {"a": "x", "b": [1, {"c": null}]}})),
        )
        .unwrap();
    assert_eq!(
        rendered,
        "{\"a\": \"x\", \"b\": [1, {\"c\": null}]}|\
         {\n  \"a\": \"x\",\n  \"b\": [\n    1,\n    {\n      \"c\": null\n    }\n  ]\n}|\
         \"é\\\"\\\\\\n\\t<>&'\"|\"\\u00e9\\ud83d\\ude00\"|[]|{}|[1,2.5,null,true]"
    );
}

#[test]
fn namespace_loops_and_string_methods() {
    let tmpl = template("tok_strict_roles.jinja", "", "");
    let conversation = [
        ChatMessage::new("system", " Be brief. "),
        ChatMessage::new("user", "  Hello  world "),
        ChatMessage::new("assistant", "Hi!"),
        ChatMessage::new("user", "How are you?"),
    ];
    assert_eq!(
        tmpl.render(&conversation, true).unwrap(),
        "[1/3 first] USER: Hello  world\n[2/3] ASSISTANT: Hi!\n[3/3 last] USER: How are you?\n\
         (system: \"Be brief.\", turns: 3, words: 6)\n[4] ASSISTANT:"
    );
    assert_eq!(
        tmpl.render(&conversation[1..2], false).unwrap(),
        "[1/1 first last] USER: Hello  world\n"
    );
}

#[test]
fn raise_exception_becomes_a_client_error() {
    let tmpl = template("tok_strict_roles.jinja", "", "");
    let err = tmpl
        .render(
            &[
                ChatMessage::new("user", "one"),
                ChatMessage::new("user", "two"),
            ],
            true,
        )
        .unwrap_err();
    match err {
        ChatTemplateError::Raised(message) => assert_eq!(
            message,
            "Conversation roles must alternate user/assistant/user/assistant/..."
        ),
        other => panic!("expected Raised, got {other:?}"),
    }
    let err = tmpl
        .render(&[ChatMessage::new("user", "/reset now")], true)
        .unwrap_err();
    assert!(
        matches!(&err, ChatTemplateError::Raised(m) if m == "Commands are not allowed: /reset"),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "Commands are not allowed: /reset");
}

#[test]
fn template_bugs_are_not_client_errors() {
    let err = ChatTemplate::new("{% for m in messages %}", "", "").unwrap_err();
    assert!(matches!(err, ChatTemplateError::Invalid(_)), "{err:?}");
    let tmpl = ChatTemplate::new("{{ messages[0].content.no_such_method() }}", "", "").unwrap();
    let err = tmpl
        .render(&[ChatMessage::new("user", "x")], false)
        .unwrap_err();
    assert!(matches!(err, ChatTemplateError::Render(_)), "{err:?}");
}

#[test]
fn chatml_fallback() {
    let tmpl = ChatTemplate::new(CHATML_TEMPLATE, "", "").unwrap();
    assert_eq!(
        tmpl.render(&system_user(), true).unwrap(),
        "<|im_start|>system\n  You are helpful.  <|im_end|>\n\
         <|im_start|>user\nHi there! <|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn hugging_face_directory() {
    let bundle = TokenizerBundle::from_hf_dir(data("tok_hf_tiny")).unwrap();
    let tok = &bundle.tokenizer;
    assert_eq!(tok.bos_token_id(), Some(0));
    assert_eq!(tok.eos_token_id(), Some(1));
    // generation_config.json lists two end ids.
    assert_eq!(tok.stop_token_ids(), [1, 2]);
    // tokenizer.json's post-processor adds <s>, so prompts get BOS.
    assert!(tok.add_bos());
    assert_eq!(tok.encode("hi hi!", true).unwrap(), [6, 7, 8]);
    assert_eq!(tok.encode_prompt("hi hi!").unwrap(), [0, 6, 7, 8]);
    assert_eq!(tok.encode_prompt("<s>hi").unwrap(), [0, 6]);
    assert_eq!(tok.decode(&[0, 6, 7, 8, 1], true).unwrap(), "hi hi!");
    // The "default" one of the named templates.
    assert_eq!(
        bundle
            .chat_template
            .render(&[ChatMessage::new("user", "hi")], false)
            .unwrap(),
        "<s>user: hi</s>"
    );

    // A chat_template.jinja file wins over tokenizer_config.json, and add_bos_token
    // there overrides the post-processor.
    let dir = std::env::temp_dir().join(format!("heddle-tok-hf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["tokenizer.json", "generation_config.json"] {
        std::fs::copy(data("tok_hf_tiny").join(file), dir.join(file)).unwrap();
    }
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": false}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("chat_template.jinja"),
        "{{ messages | length }} message(s)",
    )
    .unwrap();
    let bundle = TokenizerBundle::from_hf_dir(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    let bundle = bundle.unwrap();
    assert!(!bundle.tokenizer.add_bos());
    assert_eq!(bundle.tokenizer.encode_prompt("hi").unwrap(), [6]);
    assert_eq!(
        bundle
            .chat_template
            .render(&[ChatMessage::new("user", "hi")], true)
            .unwrap(),
        "1 message(s)"
    );
}
