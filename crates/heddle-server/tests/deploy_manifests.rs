//! The Kubernetes manifests under deploy/kubernetes are checked without a cluster by
//! tests/python/check_deploy_manifests.py (PyYAML, from the environment
//! scripts/router-tools.sh makes): their structure and cross-references, heddle's and
//! sglang-router's flags against their `--help`, and the metric names the endpoint picker
//! reads against a live server's /metrics.

mod api_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use api_support::{model, start, test_config};

fn router_python() -> PathBuf {
    if let Some(python) = std::env::var_os("HEDDLE_ROUTER_PYTHON") {
        return python.into();
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/router-venv/bin/python");
    assert!(
        venv.exists(),
        "this test needs PyYAML and sglang-router: run `bash scripts/test.sh`, or \
         `bash scripts/router-tools.sh` once before `cargo test`"
    );
    venv
}

/// What `command` prints, which must succeed.
fn output_of(command: &mut Command) -> String {
    let output = command.output().expect("the command runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{command:?}: {text}");
    text
}

#[tokio::test]
async fn the_kubernetes_manifests_are_consistent_with_heddle_and_the_routers() {
    let dir = std::env::temp_dir().join(format!("heddle-manifests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let python = router_python();

    let heddle_help = dir.join("heddle-serve-help.txt");
    let text = output_of(Command::new(env!("CARGO_BIN_EXE_heddle")).args(["serve", "--help"]));
    std::fs::write(&heddle_help, text).unwrap();
    let router_help = dir.join("router-help.txt");
    let text =
        output_of(Command::new(&python).args(["-m", "sglang_router.launch_router", "--help"]));
    std::fs::write(&router_help, text).unwrap();

    let mut spec = model("m");
    spec.pinned = true;
    let server = start(test_config(vec![spec])).await;
    let metrics = dir.join("metrics.txt");
    std::fs::write(&metrics, server.metrics().await.0).unwrap();
    server.server.shutdown().await.unwrap();

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let report = output_of(
        Command::new(&python)
            .arg(root.join("tests/python/check_deploy_manifests.py"))
            .arg(root.join("deploy/kubernetes"))
            .args([&heddle_help, &router_help, &metrics]),
    );
    println!("{report}");
    assert!(report.contains("InferencePool"), "{report}");
    let _ = std::fs::remove_dir_all(&dir);
}
