//! Access control end to end: every route of the router but the probes refuses a missing
//! or wrong key when keys are configured, each kind of key opens its own routes, admin
//! routes are off without an admin key, and an exposed address needs API keys.

mod api_support;

use api_support::{model, start, test_config, TestServer};
use heddle_core::Priority;
use heddle_server::api::auth::{ApiKey, KeyTier};
use heddle_server::serve;
use serde_json::Value;

const API_KEY: &str = "sk-app";
const ADMIN_KEY: &str = "sk-owner";
const METRICS_KEY: &str = "sk-scraper";

/// Models are not pinned: nothing loads, and no request here reaches a model.
async fn server_with_every_kind_of_key() -> TestServer {
    let mut config = test_config(vec![model("m")]);
    config.api_keys = vec![ApiKey {
        key: API_KEY.into(),
        tier: KeyTier::at(Priority::Normal),
    }];
    config.admin_api_keys = vec![ADMIN_KEY.into()];
    config.metrics_api_keys = vec![METRICS_KEY.into()];
    start(config).await
}

async fn call(
    server: &TestServer,
    method: reqwest::Method,
    path: &str,
    key: Option<&str>,
) -> (u16, Value) {
    let mut request = server.http.request(method, server.url(path));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.expect("answered");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// A request path for a route pattern.
fn concrete(pattern: &str) -> String {
    pattern.replace("{*id}", "org/model").replace("{id}", "m")
}

#[tokio::test]
async fn every_route_but_the_probes_refuses_a_missing_or_wrong_key() {
    let server = server_with_every_kind_of_key().await;
    let mut paths: Vec<String> = heddle_server::api::routes()
        .iter()
        .map(|(pattern, _)| concrete(pattern))
        .collect();
    assert!(paths.len() >= 10, "{paths:?}");
    // Paths no route serves need a key too: nothing is public by default.
    paths.extend(
        [
            "/v1/nothing",
            "/admin/nothing",
            "/",
            "/health/",
            "/metricsx",
        ]
        .map(String::from),
    );
    for path in &paths {
        let public = path == "/health" || path == "/ready";
        for method in [reqwest::Method::GET, reqwest::Method::POST] {
            for key in [None, Some("sk-wrong"), Some("")] {
                let (status, body) = call(&server, method.clone(), path, key).await;
                if public {
                    assert_ne!(status, 401, "{method} {path} {key:?}: {body}");
                } else {
                    assert_eq!(status, 401, "{method} {path} {key:?}: {body}");
                    assert_eq!(body["error"]["type"], "authentication_error", "{body}");
                    assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
                }
            }
        }
    }
    server.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn each_kind_of_key_opens_its_own_routes() {
    let server = server_with_every_kind_of_key().await;
    let get = reqwest::Method::GET;
    let cases = [
        (API_KEY, "/v1/models", 200),
        (API_KEY, "/admin/models", 403),
        (API_KEY, "/metrics", 403),
        (ADMIN_KEY, "/v1/models", 200),
        (ADMIN_KEY, "/admin/models", 200),
        (ADMIN_KEY, "/metrics", 200),
        (METRICS_KEY, "/metrics", 200),
        (METRICS_KEY, "/v1/models", 403),
        (METRICS_KEY, "/admin/models", 403),
    ];
    for (key, path, expected) in cases {
        let (status, body) = call(&server, get.clone(), path, Some(key)).await;
        assert_eq!(status, expected, "{key} {path}: {body}");
        if expected == 403 {
            assert_eq!(body["error"]["type"], "permission_error", "{body}");
        }
    }
    // Admin actions work with the admin key.
    let (status, body) = call(
        &server,
        reqwest::Method::POST,
        "/admin/models/m/unload",
        Some(ADMIN_KEY),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["unloaded"], false);
    server.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn admin_routes_are_off_without_an_admin_key_unless_opened_on_loopback() {
    let mut config = test_config(vec![model("m")]);
    config.admin_api_keys.clear();
    let server = start(config.clone()).await;
    let (status, body) = call(&server, reqwest::Method::GET, "/admin/models", None).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "admin_disabled", "{body}");
    let (status, body) = call(
        &server,
        reqwest::Method::POST,
        "/admin/models/m/load",
        Some("anything"),
    )
    .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (403, &"admin_disabled".into())
    );
    // The API and the metrics stay open without keys.
    for path in ["/v1/models", "/metrics"] {
        let (status, body) = call(&server, reqwest::Method::GET, path, None).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    server.server.shutdown().await.unwrap();

    config.admin_on_loopback = true;
    let server = start(config).await;
    let (status, body) = call(&server, reqwest::Method::GET, "/admin/models", None).await;
    assert_eq!(status, 200, "{body}");
    server.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_address_other_machines_reach_needs_api_keys_or_an_explicit_flag() {
    let mut config = test_config(vec![model("m")]);
    config.host = "0.0.0.0".into();
    let error = serve::start(config.clone())
        .await
        .err()
        .expect("refused without API keys");
    assert!(
        error.to_string().contains("--allow-unauthenticated"),
        "{error:#}"
    );
    config.admin_api_keys.clear();
    config.admin_on_loopback = true;
    config.allow_unauthenticated = true;
    let error = serve::start(config)
        .await
        .err()
        .expect("admin on loopback refused on 0.0.0.0");
    assert!(error.to_string().contains("loopback"), "{error:#}");
}
