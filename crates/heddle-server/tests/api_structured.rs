//! Structured output, logit biases and /tokenize on the real embedded model behind the real
//! server: every constrained output is checked against what it was constrained to, with a
//! small JSON-schema validator of the keywords the schemas here use.

mod api_support;

use std::sync::OnceLock;

use api_support::{
    assert_error, model, post_json, shared_server, start, test_config, SharedServer,
};
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

const MODEL: &str = "smollm2";

fn server() -> &'static SharedServer {
    static SERVER: OnceLock<SharedServer> = OnceLock::new();
    shared_server(&SERVER, || test_config(vec![model(MODEL)]))
}

async fn chat(body: Value) -> (u16, Value) {
    let (status, body) = post_json(
        &reqwest::Client::new(),
        &server().url("/v1/chat/completions"),
        &body,
    )
    .await;
    (status.as_u16(), body)
}

fn chat_request(prompt: &str, fields: Value) -> Value {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 200,
        "temperature": 0,
    });
    body.as_object_mut()
        .unwrap()
        .extend(fields.as_object().unwrap().clone());
    body
}

fn content(body: &Value) -> &str {
    body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content in {body}"))
}

fn finish_reason(body: &Value) -> &str {
    body["choices"][0]["finish_reason"].as_str().unwrap()
}

/// Why `value` is not valid under `schema`, or None if it is. Knows the keywords the
/// schemas of these tests use, and refuses any other (so a test cannot pass unchecked).
fn violation(schema: &Value, value: &Value) -> Option<String> {
    let Some(schema) = schema.as_object() else {
        return (schema == &Value::Bool(false)).then(|| "false schema".into());
    };
    let fail = |why: String| Some(format!("{why} at {value}"));
    for (keyword, rule) in schema {
        let wrong = match keyword.as_str() {
            "type" => {
                let types: Vec<&str> = match rule {
                    Value::String(t) => vec![t.as_str()],
                    Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
                    _ => return fail(format!("bad type rule {rule}")),
                };
                let ok = types.iter().any(|t| match *t {
                    "object" => value.is_object(),
                    "array" => value.is_array(),
                    "string" => value.is_string(),
                    "integer" => value.is_i64() || value.is_u64(),
                    "number" => value.is_number(),
                    "boolean" => value.is_boolean(),
                    "null" => value.is_null(),
                    _ => false,
                });
                (!ok).then(|| format!("not of type {rule}"))
            }
            "properties" => value.as_object().and_then(|object| {
                rule.as_object()
                    .unwrap()
                    .iter()
                    .find_map(|(name, sub)| object.get(name).and_then(|v| violation(sub, v)))
            }),
            "required" => value.as_object().and_then(|object| {
                rule.as_array()
                    .unwrap()
                    .iter()
                    .find(|name| !object.contains_key(name.as_str().unwrap()))
                    .map(|name| format!("missing {name}"))
            }),
            "additionalProperties" => value.as_object().and_then(|object| {
                let known = schema.get("properties").and_then(Value::as_object);
                object
                    .iter()
                    .filter(|(name, _)| !known.is_some_and(|k| k.contains_key(*name)))
                    .find_map(|(name, v)| {
                        violation(rule, v).map(|why| format!("extra property {name}: {why}"))
                    })
            }),
            "items" => value
                .as_array()
                .and_then(|items| items.iter().find_map(|item| violation(rule, item))),
            "minItems" => value
                .as_array()
                .filter(|items| (items.len() as u64) < rule.as_u64().unwrap())
                .map(|_| format!("fewer items than {rule}")),
            "maxItems" => value
                .as_array()
                .filter(|items| (items.len() as u64) > rule.as_u64().unwrap())
                .map(|_| format!("more items than {rule}")),
            "minLength" => value
                .as_str()
                .filter(|s| (s.chars().count() as u64) < rule.as_u64().unwrap())
                .map(|_| format!("shorter than {rule}")),
            "maxLength" => value
                .as_str()
                .filter(|s| (s.chars().count() as u64) > rule.as_u64().unwrap())
                .map(|_| format!("longer than {rule}")),
            "minimum" => value
                .as_f64()
                .filter(|n| *n < rule.as_f64().unwrap())
                .map(|_| format!("below {rule}")),
            "maximum" => value
                .as_f64()
                .filter(|n| *n > rule.as_f64().unwrap())
                .map(|_| format!("above {rule}")),
            "enum" => (!rule.as_array().unwrap().contains(value)).then(|| "not in the enum".into()),
            "const" => (rule != value).then(|| format!("not {rule}")),
            "pattern" => value.as_str().and_then(|s| {
                let regex = regex::Regex::new(rule.as_str().unwrap()).unwrap();
                (!regex.is_match(s)).then(|| format!("does not match {rule}"))
            }),
            "anyOf" => {
                let options = rule.as_array().unwrap();
                options
                    .iter()
                    .all(|option| violation(option, value).is_some())
                    .then(|| "matches no anyOf option".into())
            }
            "description" | "title" => None,
            other => return fail(format!("the test validator does not know `{other}`")),
        };
        if let Some(why) = wrong {
            return fail(why);
        }
    }
    None
}

fn assert_valid(schema: &Value, text: &str) {
    let value: Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
    if let Some(why) = violation(schema, &value) {
        panic!("{text} breaks the schema: {why}");
    }
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "role": {"enum": ["engineer", "artist", "farmer"]},
            "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
            "email": {"anyOf": [{"type": "string", "maxLength": 30}, {"type": "null"}]},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 20},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"}
                },
                "required": ["city", "zip"],
                "additionalProperties": false
            },
            "skills": {
                "type": "array",
                "items": {"type": "string", "maxLength": 15},
                "minItems": 1,
                "maxItems": 3
            }
        },
        "required": ["name", "age", "role", "code", "email", "address", "skills"],
        "additionalProperties": false
    })
}

fn json_schema_format(schema: &Value) -> Value {
    json!({"response_format": {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": schema, "strict": true}
    }})
}

#[tokio::test]
async fn json_schema_output_is_valid_greedy_and_sampled() {
    let schema = person_schema();
    let prompt = "Describe a fictional person as JSON.";
    let (status, body) = chat(chat_request(prompt, json_schema_format(&schema))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(finish_reason(&body), "stop", "{body}");
    assert_valid(&schema, content(&body));

    let mut sampled = chat_request(prompt, json_schema_format(&schema));
    sampled["temperature"] = json!(1.0);
    sampled["n"] = json!(4);
    sampled["seed"] = json!(11);
    let (status, body) = chat(sampled).await;
    assert_eq!(status, 200, "{body}");
    for choice in body["choices"].as_array().unwrap() {
        assert_eq!(choice["finish_reason"], "stop", "{choice}");
        assert_valid(&schema, choice["message"]["content"].as_str().unwrap());
    }
}

#[tokio::test]
async fn json_object_regex_choice_and_lark_outputs_match() {
    let (status, body) = chat(chat_request(
        "List three colours.",
        json!({"response_format": {"type": "json_object"}, "max_tokens": 100}),
    ))
    .await;
    assert_eq!(status, 200, "{body}");
    if finish_reason(&body) == "stop" {
        let value: Value = serde_json::from_str(content(&body)).expect("JSON");
        assert!(value.is_object(), "{value}");
    } else {
        assert!(content(&body).starts_with('{'), "{body}");
    }

    let (status, body) = chat(chat_request(
        "Give me a phone number.",
        json!({"guided_regex": "[0-9]{3}-[0-9]{4}"}),
    ))
    .await;
    assert_eq!(status, 200, "{body}");
    let number = content(&body);
    assert!(
        regex::Regex::new("^[0-9]{3}-[0-9]{4}$")
            .unwrap()
            .is_match(number),
        "{number:?}"
    );
    assert_eq!(finish_reason(&body), "stop");

    let choices = ["sunny (warm)", "rainy [wet]", "snowy *cold*"];
    for temperature in [0.0, 1.5] {
        let (status, body) = chat(chat_request(
            "What is the weather like?",
            json!({"guided_choice": choices, "temperature": temperature}),
        ))
        .await;
        assert_eq!(status, 200, "{body}");
        assert!(choices.contains(&content(&body)), "{body}");
        assert_eq!(finish_reason(&body), "stop");
    }

    let (status, body) = chat(chat_request(
        "Answer yes or no, then a number.",
        json!({"guided_grammar": "start: answer \" \" num\nanswer: \"yes\" | \"no\"\nnum: /[1-9][0-9]?/"}),
    ))
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        regex::Regex::new("^(yes|no) [1-9][0-9]?$")
            .unwrap()
            .is_match(content(&body)),
        "{body}"
    );
}

#[tokio::test]
async fn a_streamed_constrained_output_is_the_same_as_a_whole_one() {
    let schema = person_schema();
    let request = chat_request("Describe a farmer as JSON.", json_schema_format(&schema));
    let (status, whole) = chat(request.clone()).await;
    assert_eq!(status, 200, "{whole}");
    let mut streamed = request;
    streamed["stream"] = json!(true);
    let response = reqwest::Client::new()
        .post(server().url("/v1/chat/completions"))
        .json(&streamed)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut text = String::new();
    let mut finish = None;
    for event in api_support::SseReader::new(response).collect().await {
        if event == "[DONE]" {
            continue;
        }
        let chunk: Value = serde_json::from_str(&event).unwrap();
        let choice = &chunk["choices"][0];
        text.push_str(choice["delta"]["content"].as_str().unwrap_or_default());
        if let Some(reason) = choice["finish_reason"].as_str() {
            finish = Some(reason.to_string());
        }
    }
    assert_eq!(finish.as_deref(), Some("stop"));
    assert_eq!(text, content(&whole));
    assert_valid(&schema, &text);
}

#[tokio::test]
async fn completions_honour_grammars_too() {
    let (status, body) = post_json(
        &reqwest::Client::new(),
        &server().url("/v1/completions"),
        &json!({
            "model": MODEL,
            "prompt": "The answer is",
            "max_tokens": 10,
            "temperature": 0,
            "guided_choice": ["42", "forty-two"],
        }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let text = body["choices"][0]["text"].as_str().unwrap();
    assert!(text == "42" || text == "forty-two", "{body}");
}

#[tokio::test]
async fn a_cut_output_ends_with_length() {
    let schema = person_schema();
    let mut request = chat_request("Describe a person as JSON.", json_schema_format(&schema));
    request["max_tokens"] = json!(6);
    let (status, body) = chat(request).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(finish_reason(&body), "length", "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 6);
    assert!(content(&body).starts_with("{\""), "{body}");
    assert!(serde_json::from_str::<Value>(content(&body)).is_err());
}

#[tokio::test]
async fn invalid_grammars_are_refused_by_name() {
    let bad = [
        (
            json_schema_format(&json!({"type": "object", "properties": {"a": {"type": "strng"}}})),
            "response_format",
        ),
        (
            json_schema_format(&json!({"type": "array", "minItems": 5, "maxItems": 2})),
            "response_format",
        ),
        (
            json_schema_format(&json!(["not", "a", "schema"])),
            "response_format.json_schema.schema",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}),
            "response_format.json_schema.name",
        ),
        (
            json!({"response_format": {"type": "yaml"}}),
            "response_format.type",
        ),
        (json!({"guided_regex": "([a-z"}), "guided_regex"),
        (json!({"guided_choice": []}), "guided_choice"),
        (json!({"guided_choice": ["a", 1]}), "guided_choice"),
        (
            json!({"guided_grammar": "start: undefined_rule"}),
            "guided_grammar",
        ),
        (
            json!({"guided_regex": "a+", "response_format": {"type": "json_object"}}),
            "guided_regex",
        ),
        (
            json!({"guided_json": "{\"type\": \"object\"}"}),
            "guided_json",
        ),
    ];
    for (fields, param) in bad {
        let (status, body) = post_json(
            &reqwest::Client::new(),
            &server().url("/v1/chat/completions"),
            &chat_request("Hi.", fields.clone()),
        )
        .await;
        assert_error(status, &body, 400, "invalid_request_error");
        assert_eq!(body["error"]["param"], param, "{fields}: {body}");
    }
}

async fn tokenize(text: &str) -> Vec<u64> {
    let (status, body) = post_json(
        &reqwest::Client::new(),
        &server().url("/tokenize"),
        &json!({"model": MODEL, "prompt": text, "add_special_tokens": false}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["count"], body["tokens"].as_array().unwrap().len());
    body["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn tokenize_and_detokenize_round_trip() {
    let text = "Structured output, with <|im_end|> special tokens.";
    let tokens = tokenize(text).await;
    assert!(tokens.len() > 5);
    let (status, body) = post_json(
        &reqwest::Client::new(),
        &server().url("/detokenize"),
        &json!({"model": MODEL, "tokens": tokens}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["prompt"], text);
    let (status, body) = post_json(
        &reqwest::Client::new(),
        &server().url("/detokenize"),
        &json!({"model": MODEL, "tokens": [49152]}),
    )
    .await;
    assert_error(status, &body, 400, "invalid_request_error");
    assert_eq!(body["error"]["param"], "tokens");
}

/// The pieces of the generated tokens, from the chat log-probabilities.
fn token_pieces(body: &Value) -> Vec<String> {
    body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["token"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn logit_bias_bans_and_forces_tokens() {
    let prompt = "Name a large city.";
    let fields = json!({"logprobs": true, "max_tokens": 12});
    let (status, free) = chat(chat_request(prompt, fields.clone())).await;
    assert_eq!(status, 200, "{free}");
    let first = token_pieces(&free)[0].clone();
    let ids = tokenize(&first).await;
    assert_eq!(ids.len(), 1, "{first:?} is one token");

    let mut banned = chat_request(prompt, fields.clone());
    banned["logit_bias"] = json!({ ids[0].to_string(): -100 });
    let (status, body) = chat(banned).await;
    assert_eq!(status, 200, "{body}");
    let pieces = token_pieces(&body);
    assert!(!pieces.contains(&first), "{first:?} was banned: {pieces:?}");

    let forced_id = tokenize(" banana").await;
    assert_eq!(forced_id.len(), 1);
    let mut forced = chat_request(prompt, fields);
    forced["logit_bias"] = json!({ forced_id[0].to_string(): 100 });
    forced["max_tokens"] = json!(4);
    let (status, body) = chat(forced).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(content(&body), " banana banana banana banana", "{body}");

    for bad in [json!({"49152": 1}), json!({"1": -101}), json!({"x": 1})] {
        let (status, body) = chat(chat_request(prompt, json!({ "logit_bias": bad }))).await;
        assert_error(
            reqwest::StatusCode::from_u16(status).unwrap(),
            &body,
            400,
            "invalid_request_error",
        );
        assert_eq!(body["error"]["param"], "logit_bias");
    }
}

#[tokio::test]
async fn a_constrained_request_is_the_same_alone_and_in_a_busy_batch() {
    let schema = person_schema();
    let request = chat_request("Describe an artist as JSON.", json_schema_format(&schema));
    let (status, alone) = chat(request.clone()).await;
    assert_eq!(status, 200, "{alone}");
    let busy: Vec<_> = (0..6)
        .map(|i| {
            let mut other = chat_request(&format!("Tell story number {i}."), json!({}));
            other["max_tokens"] = json!(60);
            other["temperature"] = json!(0.8);
            tokio::spawn(chat(other))
        })
        .collect();
    let (status, batched) = chat(request).await;
    assert_eq!(status, 200, "{batched}");
    for other in busy {
        assert_eq!(other.await.unwrap().0, 200);
    }
    assert_eq!(content(&alone), content(&batched));
    assert_valid(&schema, content(&batched));
}

#[tokio::test]
async fn constrained_sequences_survive_preemption() {
    let mut config = test_config(vec![model(MODEL)]);
    // Room for about two of the sequences at once: the others are preempted and
    // recomputed, their grammar state kept.
    config.scheduler.num_blocks = 24;
    config.scheduler.max_running = 6;
    let server = start(config).await;
    let schema = person_schema();
    let requests: Vec<_> = (0..6)
        .map(|i| {
            let mut request = chat_request(
                &format!("Describe person {i} as JSON."),
                json_schema_format(&schema),
            );
            request["temperature"] = json!(0.7);
            request["seed"] = json!(i);
            let (http, url) = (server.http.clone(), server.url("/v1/chat/completions"));
            tokio::spawn(async move { post_json(&http, &url, &request).await })
        })
        .collect();
    for request in requests {
        let (status, body) = request.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(finish_reason(&body), "stop", "{body}");
        assert_valid(&schema, content(&body));
    }
    let metrics = server.metrics().await;
    assert!(
        metrics.model_value("heddle_preemptions_total", MODEL) > 0.0,
        "the test must exercise preemption"
    );
    assert!(metrics.model_value("heddle_grammar_mask_seconds_count", MODEL) > 0.0);
}

/// A random schema from the keywords the validator knows, sometimes with a broken part.
fn random_schema(rng: &mut impl Rng, depth: u32) -> Value {
    let leaf = depth == 0 || rng.random_bool(0.3);
    let pick = if leaf {
        rng.random_range(0..6)
    } else {
        rng.random_range(0..9)
    };
    match pick {
        0 => json!({"type": "string", "maxLength": rng.random_range(0..12)}),
        1 => json!({"type": "integer", "minimum": -5, "maximum": rng.random_range(-5..100)}),
        2 => json!({"type": "boolean"}),
        3 => json!({"type": "string", "pattern": "^[a-c]{1,4}$"}),
        4 => {
            // A huge enum.
            let size = if rng.random_bool(0.3) { 5_000 } else { 4 };
            let values: Vec<Value> = (0..size).map(|i| json!(format!("v{i}"))).collect();
            json!({"enum": values})
        }
        5 => {
            // Broken: an unknown type, a bad pattern, or an unsatisfiable bound.
            match rng.random_range(0..3) {
                0 => json!({"type": "strin"}),
                1 => json!({"type": "string", "pattern": "(["}),
                _ => json!({"type": "integer", "minimum": 10, "maximum": 1}),
            }
        }
        6 => {
            let count = rng.random_range(1..4);
            let mut properties = Map::new();
            for i in 0..count {
                properties.insert(format!("p{i}"), random_schema(rng, depth - 1));
            }
            let required: Vec<String> = (0..count).map(|i| format!("p{i}")).collect();
            json!({"type": "object", "properties": properties, "required": required,
                   "additionalProperties": false})
        }
        7 => json!({"type": "array", "items": random_schema(rng, depth - 1),
                    "minItems": 0, "maxItems": rng.random_range(0..3)}),
        _ => json!({"anyOf": [random_schema(rng, depth - 1), {"type": "null"}]}),
    }
}

#[tokio::test]
async fn fuzzed_schemas_get_a_400_or_valid_output() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2024);
    let mut schemas: Vec<Value> = (0..24).map(|_| random_schema(&mut rng, 4)).collect();
    // Deep nesting, and a recursive schema ($ref the validator cannot follow: it must be
    // refused or produce JSON).
    let nested = |levels| {
        let mut deep = json!({"type": "integer"});
        for _ in 0..levels {
            deep = json!({"type": "array", "items": deep, "maxItems": 1});
        }
        deep
    };
    schemas.push(nested(40));
    // Nested past the JSON parser's depth limit: the body itself is refused.
    let (status, body) = chat(chat_request(
        "Produce JSON.",
        json_schema_format(&nested(200)),
    ))
    .await;
    assert_eq!(status, 400, "{body}");
    let mut refused = 0;
    for schema in &schemas {
        let mut request = chat_request("Produce JSON.", json_schema_format(schema));
        request["max_tokens"] = json!(48);
        request["temperature"] = json!(1.0);
        request["seed"] = json!(5);
        let (status, body) = chat(request).await;
        match status {
            400 => {
                refused += 1;
                assert_eq!(body["error"]["param"], "response_format", "{body}");
            }
            200 if finish_reason(&body) == "stop" => assert_valid(schema, content(&body)),
            200 => assert_eq!(finish_reason(&body), "length", "{body}"),
            other => panic!("{other} for {schema}: {body}"),
        }
    }
    let recursive = json!({
        "$ref": "#/$defs/node",
        "$defs": {"node": {"type": "object", "properties": {"next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}}, "required": ["next"], "additionalProperties": false}}
    });
    let mut request = chat_request("Produce JSON.", json_schema_format(&recursive));
    request["max_tokens"] = json!(48);
    let (status, body) = chat(request).await;
    assert!(status == 200 || status == 400, "{body}");
    if status == 200 && finish_reason(&body) == "stop" {
        serde_json::from_str::<Value>(content(&body)).expect("JSON");
    }
    assert!(
        refused > 0 && refused < schemas.len(),
        "{refused} of {} refused",
        schemas.len()
    );
    // The engine still serves.
    let (status, body) = chat(chat_request("Hi.", json!({"max_tokens": 4}))).await;
    assert_eq!(status, 200, "{body}");
}
