//! `heddle-cuda`: the GPU runner's checks and its in-process benchmark, for the GPU
//! machine (scripts/gpu/check-and-bench.sh runs both).

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::bail;
use clap::{Parser, Subcommand};
use heddle_cuda::bench::{self, Load};
use heddle_cuda::{dummy, selftest, CudaOptions, CudaRunner, KvBudget, WeightSource};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "heddle-cuda",
    about = "Checks and benchmarks of heddle's CUDA runner"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every kernel and the runner against CPU references, and batch invariance.
    Selftest,
    /// Throughput on random weights: N requests at once, greedy, ignore_eos.
    Bench(BenchArgs),
    /// Writes the stand-in tokenizer.json that `heddle serve --dummy-weights` uses, so a
    /// client (`heddle bench --tokenizer`) can make prompts of exact token lengths.
    Tokenizer {
        #[arg(long)]
        vocab_size: usize,
        /// Folder to write tokenizer.json into.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(clap::Args)]
struct BenchArgs {
    /// An HF config.json-format file giving the model's shape.
    #[arg(long)]
    config: PathBuf,
    #[arg(long, default_value_t = 256)]
    requests: usize,
    #[arg(long, default_value_t = 512)]
    prompt_len: usize,
    #[arg(long, default_value_t = 128)]
    output_len: usize,
    #[arg(long, default_value_t = 256)]
    max_running: usize,
    #[arg(long, default_value_t = 8192)]
    max_batched_tokens: usize,
    #[arg(long, default_value_t = 0.9)]
    gpu_memory_fraction: f64,
    /// Also time one request alone (decode milliseconds per token).
    #[arg(long)]
    single_stream: bool,
    /// Launch every step's kernels directly instead of replaying decode steps as graphs.
    #[arg(long)]
    no_cuda_graphs: bool,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("HEDDLE_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours for people; plain text for log files and pipes.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match Cli::parse().command {
        Command::Selftest => {
            let checks = selftest::run_all()?;
            println!("{:<92} {:>12} {:>10}  result", "check", "error", "limit");
            for c in &checks {
                println!(
                    "{:<92} {:>12.3e} {:>10.1e}  {}",
                    c.name,
                    c.error,
                    c.limit,
                    if c.passed() { "ok" } else { "FAIL" }
                );
            }
            let failed = checks.iter().filter(|c| !c.passed()).count();
            if failed > 0 {
                bail!("{failed} of {} checks failed", checks.len());
            }
            println!("all {} checks passed", checks.len());
            Ok(())
        }
        Command::Tokenizer { vocab_size, out } => {
            std::fs::create_dir_all(&out)?;
            std::fs::write(
                out.join("tokenizer.json"),
                dummy::tokenizer_json(vocab_size),
            )?;
            Ok(())
        }
        Command::Bench(args) => {
            let config = dummy::read_config(&args.config)?;
            let options = CudaOptions {
                max_batched_tokens: args.max_batched_tokens,
                max_running: args.max_running,
                kv: KvBudget::MemoryFraction(args.gpu_memory_fraction),
                cuda_graphs: !args.no_cuda_graphs,
                ..CudaOptions::default()
            };
            let mut runner = CudaRunner::new(config, &WeightSource::Dummy { seed: 0 }, options)?;
            let name = args
                .config
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            let load = Load {
                requests: args.requests,
                prompt_len: args.prompt_len,
                output_len: args.output_len,
                max_running: args.max_running,
                max_batched_tokens: args.max_batched_tokens,
                seed: 1,
            };
            // A short warm-up (cuBLAS picks and loads its kernels on first use).
            bench::run(
                &mut runner,
                Load {
                    requests: 4,
                    output_len: 4,
                    ..load
                },
            )?;
            let m = bench::run(&mut runner, load)?;
            println!(
                "RESULT model={name} requests={} prompt={} output={} seconds={:.3} \
                 output_tok_s={:.1} total_tok_s={:.1} steps={} mean_ttft_s={:.3} \
                 mean_decode_step_ms={:.2} (runner host {:.2} + GPU wait {:.2})",
                load.requests,
                load.prompt_len,
                load.output_len,
                m.seconds,
                m.output_tokens_per_second(),
                (m.output_tokens + m.prompt_tokens) as f64 / m.seconds,
                m.steps,
                m.mean_ttft,
                m.mean_decode_step * 1e3,
                m.mean_decode_host * 1e3,
                m.mean_decode_wait * 1e3,
            );
            if args.single_stream {
                let single = bench::run(
                    &mut runner,
                    Load {
                        requests: 1,
                        ..load
                    },
                )?;
                println!(
                    "RESULT model={name} single_stream decode_ms_per_token={:.3} seconds={:.3} \
                     (runner host {:.2} + GPU wait {:.2})",
                    single.mean_decode_step * 1e3,
                    single.seconds,
                    single.mean_decode_host * 1e3,
                    single.mean_decode_wait * 1e3,
                );
            }
            Ok(())
        }
    }
}
