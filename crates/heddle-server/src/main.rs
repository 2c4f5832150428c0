//! The `heddle` command.

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use heddle_server::{bench, config, generate, serve};

#[derive(Parser)]
#[command(
    name = "heddle",
    version,
    about = "An LLM inference server with continuous batching"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve models over the OpenAI-compatible HTTP API (default: the embedded model on
    /// 127.0.0.1:8080).
    Serve(config::ServeArgs),
    /// Generate a completion from a model, streaming it to stdout.
    Generate(generate::GenerateArgs),
    /// Benchmark an OpenAI-compatible server under load (TTFT, TPOT, ITL, throughput).
    Bench(bench::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("HEDDLE_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Serve(args) => serve::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
    }
}
