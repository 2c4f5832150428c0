//! The official `openai` Python client against the real server. Ignored by a plain
//! `cargo test` because it needs that package: `scripts/test-python.sh` installs it into a
//! virtual environment and runs this test with `HEDDLE_PYTHON` pointing there.

mod api_support;

use std::path::Path;
use std::process::Command;

use api_support::{model, start, test_config};

#[tokio::test]
#[ignore = "needs the openai package; run scripts/test-python.sh"]
async fn the_openai_python_client_works_unchanged() {
    let server = start(test_config(vec![model("smollm2")])).await;
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/python/test_openai_client.py");
    let python = std::env::var("HEDDLE_PYTHON").unwrap_or_else(|_| "python3".into());
    let base_url = format!("{}/v1", server.base);
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .env("HEDDLE_BASE_URL", base_url)
            .env("HEDDLE_MODEL", "smollm2")
            .output()
            .expect("python runs")
    })
    .await
    .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{report}");
    println!("{report}");
    server.server.shutdown().await.unwrap();
}
