//! The GPU self-test as a test: runs where a CUDA device is, skips (with a message)
//! elsewhere, e.g. in CI.

#[test]
fn kernels_and_runner_match_the_cpu_on_a_gpu() {
    if let Err(why) = heddle_cuda::probe_device() {
        eprintln!("skipping the GPU self-test: {why:#}");
        return;
    }
    let checks = heddle_cuda::selftest::run_all().expect("the self-test ran");
    let failed: Vec<_> = checks.iter().filter(|c| !c.passed()).collect();
    assert!(failed.is_empty(), "failed checks: {failed:#?}");
}
