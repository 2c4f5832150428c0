//! The official `openai` Python client against the real server. It needs that package:
//! `scripts/test.sh` installs it into a virtual environment (scripts/python-client.sh) and
//! points `HEDDLE_PYTHON` there; without it the test looks for that environment and fails
//! saying how to make it.

mod api_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use api_support::{model, start, test_config};

/// The interpreter that has the `openai` package.
fn python() -> PathBuf {
    if let Some(python) = std::env::var_os("HEDDLE_PYTHON") {
        return python.into();
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/python-venv/bin/python");
    assert!(
        venv.exists(),
        "this test needs the official openai Python package: run `bash scripts/test.sh`, \
         or `bash scripts/python-client.sh` once before `cargo test`"
    );
    venv
}

#[tokio::test]
async fn the_openai_python_client_works_unchanged() {
    let python = python();
    let server = start(test_config(vec![model("smollm2")])).await;
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/python/test_openai_client.py");
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
