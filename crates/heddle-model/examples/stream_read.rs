//! Prints this machine's streaming-read bandwidth with RAYON_NUM_THREADS threads (default:
//! one per core) over a 1 GiB buffer, and, given GGUF files, the time to read each once:
//! the floor of a decode step on it. Used by scripts/bench-cpu-vs-llamacpp.sh.
//!
//! `cargo run --release -p heddle-model --example stream_read -- [model.gguf ...]`

fn main() {
    let bandwidth = heddle_model::membw::stream_read_bandwidth(1 << 30, 5);
    println!(
        "streaming read: {:.1} GB/s with {} threads",
        bandwidth / 1e9,
        rayon::current_num_threads()
    );
    for path in std::env::args().skip(1) {
        let bytes = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .len() as f64;
        println!(
            "{path}: {:.0} MB, read once in {:.2} ms (decode floor {:.1} tokens/s per sequence)",
            bytes / 1e6,
            bytes / bandwidth * 1e3,
            bandwidth / bytes
        );
    }
}
