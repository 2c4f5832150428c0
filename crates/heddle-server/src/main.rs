//! The `heddle` command.

use std::io::IsTerminal;
use std::process::ExitCode;

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
    Serve(Box<config::ServeArgs>),
    /// Generate a completion from a model, streaming it to stdout.
    Generate(generate::GenerateArgs),
    /// Benchmark an OpenAI-compatible server under load (TTFT, TPOT, ITL, throughput).
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("HEDDLE_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours for people; plain text for log files and pipes.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let outcome = match Cli::parse().command {
        Command::Serve(args) => serve::run(*args),
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line, its causes joined by ": ", and no backtrace whatever
            // RUST_BACKTRACE says: the error is the user's to act on, not a crash.
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
