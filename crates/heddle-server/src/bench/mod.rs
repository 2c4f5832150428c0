//! `heddle bench`: a load generator for any OpenAI-compatible server, in the style of
//! `vllm bench serve`.
//!
//! It makes prompts of exact token lengths from the target model's tokenizer
//! ([`dataset`]), sends them as streamed requests on a Poisson or gamma schedule under a
//! concurrency limit ([`arrival`], [`load`]), times every chunk ([`client`]) and reports
//! TTFT, TPOT, ITL, end-to-end latency and throughput ([`stats`], [`report`]).
//!
//! ```text
//! heddle bench --url http://127.0.0.1:8080 --input-len 128 --output-len 128 \
//!     --ignore-eos --num-prompts 32 --max-concurrency 16 --compare-single --json out.json
//! ```

pub mod arrival;
pub mod client;
pub mod dataset;
pub mod load;
pub mod report;
pub mod stats;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context};
use clap::{Args, ValueEnum};
use heddle_core::TokenId;
use heddle_model::tokenizer::{Tokenizer, TokenizerBundle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use arrival::{arrival_offsets, PriorityMix, RequestRate};
use client::{BenchClient, ClientSettings, Endpoint};
use dataset::{BenchPrompt, PromptSynthesizer};
use load::{run_load, LoadPlan};
use report::{BenchReport, PromptStats};
use stats::RunMetrics;

/// `heddle bench`'s flags.
#[derive(Args, Debug, Clone, Serialize)]
pub struct BenchArgs {
    /// Base URL of the OpenAI-compatible server.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// The API to call: completions (/v1/completions) or chat (/v1/chat/completions).
    #[arg(long, value_enum, default_value_t = Endpoint::Completions)]
    pub endpoint: Endpoint,
    /// The model id to send.
    #[arg(long, default_value_t = crate::config::default_model_id())]
    pub model: String,
    /// Bearer token for the server.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    #[serde(skip)]
    pub api_key: Option<String>,
    /// The target model's tokenizer, to make prompts of exact token lengths: a GGUF
    /// file, a tokenizer.json, or a Hugging Face model directory. Default: the embedded
    /// model's.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,

    /// Where prompts come from: random tokens, a shared prefix plus random tokens, or a
    /// JSONL file (see --dataset-path).
    #[arg(long, value_enum, default_value_t = DatasetKind::Random)]
    pub dataset: DatasetKind,
    /// For --dataset file: a JSONL file, one {"prompt": "...", "output_len": N} object
    /// per line (output_len optional, else --output-len).
    #[arg(long)]
    pub dataset_path: Option<PathBuf>,
    /// Prompt tokens (random and prefix datasets; for prefix, the part after the prefix).
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    /// Output tokens to ask for (max_tokens).
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    /// Lengths are drawn uniformly from len × [1 − r, 1 + r]; 0 makes them all equal.
    #[arg(long, default_value_t = 0.0)]
    pub range_ratio: f64,
    /// For --dataset prefix: tokens of the prefix every prompt shares.
    #[arg(long, default_value_t = 256)]
    pub prefix_len: usize,
    /// How many requests to send.
    #[arg(long, default_value_t = 32)]
    pub num_prompts: usize,
    /// Seed of every random choice (prompts, arrivals, priorities).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Ask the server to generate until max_tokens even past end-of-sequence.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,

    /// Requests per second (Poisson or gamma arrivals), or `inf` to send all at once.
    #[arg(long, default_value = "inf")]
    pub request_rate: RequestRate,
    /// Shape of the gamma-distributed gaps between arrivals: 1 is Poisson, below 1 is
    /// burstier, above 1 more regular. The mean gap stays 1 / rate.
    #[arg(long, default_value_t = 1.0)]
    pub burstiness: f64,
    /// Most requests in flight at once (default: no limit).
    #[arg(long)]
    pub max_concurrency: Option<usize>,
    /// Send heddle's `priority` field, drawn per request with these weights, e.g.
    /// high:0.2,normal:0.5,low:0.3; figures are then also given per priority.
    #[arg(long)]
    pub priority_mix: Option<PriorityMix>,

    /// First run the prompts one at a time, then as configured, and report the speedup
    /// of output tokens per second (concurrent / single).
    #[arg(long)]
    pub compare_single: bool,
    /// Requests sent and discarded before measuring (lazy model loading, caches).
    #[arg(long, default_value_t = 1)]
    pub warmup_requests: usize,
    /// Wait up to this many seconds for the server to answer GET /v1/models.
    #[arg(long, default_value_t = 0.0)]
    pub wait_ready: f64,
    /// Seconds one request may take before it counts as failed.
    #[arg(long, default_value_t = 600.0)]
    pub request_timeout: f64,
    /// Write every figure and the configuration to this JSON file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// A name for this run, kept in the JSON (e.g. "heddle c=16").
    #[arg(long)]
    pub label: Option<String>,
    /// No progress line on stderr.
    #[arg(long)]
    pub no_progress: bool,
}

/// `--dataset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetKind {
    /// Random prompts of --input-len tokens.
    Random,
    /// A shared prefix of --prefix-len tokens, then --input-len random tokens.
    Prefix,
    /// Prompts from a JSONL file (--dataset-path).
    File,
}

/// Output tokens of each warm-up request: enough to exercise decoding.
const WARMUP_OUTPUT_LEN: usize = 8;

/// Everything sent, made before any request so that making it is not measured.
#[derive(Debug, Clone)]
pub struct Workload {
    pub tokenizer_path: PathBuf,
    /// The measured (concurrent) run's prompts.
    pub prompts: Vec<BenchPrompt>,
    pub offsets: Vec<Duration>,
    /// With --compare-single: prompts for the one-at-a-time run.
    pub single_prompts: Option<Vec<BenchPrompt>>,
    pub warmup: Vec<BenchPrompt>,
}

/// Runs `heddle bench`: prints the report to stdout, and writes the JSON when asked.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let workload = prepare(&args)?;
    // One thread is plenty to read a few hundred streams, and leaves the cores to the
    // server when both share a machine.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = runtime.block_on(execute(&args, &workload))?;
    print!("{}", report.table());
    if let Some(path) = &args.json {
        report.write_json(path)?;
        tracing::info!("wrote {}", path.display());
    }
    Ok(())
}

fn validate(args: &BenchArgs) -> anyhow::Result<()> {
    ensure!(args.num_prompts >= 1, "--num-prompts must be at least 1");
    ensure!(
        args.input_len >= 1 && args.output_len >= 1,
        "--input-len and --output-len must be at least 1"
    );
    ensure!(
        (0.0..1.0).contains(&args.range_ratio),
        "--range-ratio must be in [0, 1), got {}",
        args.range_ratio
    );
    ensure!(
        args.max_concurrency != Some(0),
        "--max-concurrency must be at least 1"
    );
    ensure!(
        args.request_timeout > 0.0 && args.wait_ready >= 0.0,
        "--request-timeout must be positive and --wait-ready not negative"
    );
    ensure!(
        args.temperature >= 0.0,
        "--temperature must not be negative"
    );
    ensure!(
        args.dataset == DatasetKind::File || args.dataset_path.is_none(),
        "--dataset-path needs --dataset file"
    );
    Ok(())
}

/// The tokenizer at `path`: from a GGUF file's metadata, a Hugging Face directory, or a
/// tokenizer.json.
fn load_tokenizer(path: &std::path::Path) -> anyhow::Result<Tokenizer> {
    let loaded = if path.is_dir() {
        TokenizerBundle::from_hf_dir(path).map(|bundle| bundle.tokenizer)
    } else if path.extension().is_some_and(|ext| ext == "gguf") {
        TokenizerBundle::from_gguf_file(path).map(|bundle| bundle.tokenizer)
    } else {
        Tokenizer::from_file(path)
    };
    loaded.with_context(|| format!("loading the tokenizer from {}", path.display()))
}

/// Makes the prompts, their arrival times and priorities.
pub fn prepare(args: &BenchArgs) -> anyhow::Result<Workload> {
    validate(args)?;
    let tokenizer_path = match &args.tokenizer {
        Some(path) => path.clone(),
        None => heddle_model::embedded_model_path().context(
            "the embedded model's tokenizer (run scripts/fetch-model.sh, or pass --tokenizer)",
        )?,
    };
    let tokenizer = load_tokenizer(&tokenizer_path)?;
    let synth = PromptSynthesizer::new(&tokenizer)?;

    // Independent streams per purpose, so that e.g. changing the arrival rate leaves
    // the prompts as they were.
    let mut seeds = StdRng::seed_from_u64(args.seed);
    let mut prompt_rng = StdRng::seed_from_u64(seeds.random());
    let mut arrival_rng = StdRng::seed_from_u64(seeds.random());
    let mut priority_rng = StdRng::seed_from_u64(seeds.random());
    let mut single_rng = StdRng::seed_from_u64(seeds.random());
    let mut warmup_rng = StdRng::seed_from_u64(seeds.random());

    let count = args.num_prompts;
    let shared_prefix: Vec<TokenId> = match args.dataset {
        DatasetKind::Prefix => {
            ensure!(args.prefix_len >= 1, "--prefix-len must be at least 1");
            synth.text_of_len(&mut prompt_rng, &[], args.prefix_len)?.1
        }
        DatasetKind::Random | DatasetKind::File => Vec::new(),
    };
    let mut prompts = match args.dataset {
        DatasetKind::Random => dataset::random_prompts(
            &synth,
            &mut prompt_rng,
            count,
            args.input_len,
            args.output_len,
            args.range_ratio,
        )?,
        DatasetKind::Prefix => dataset::prefix_prompts(
            &synth,
            &mut prompt_rng,
            count,
            &shared_prefix,
            args.input_len,
            args.output_len,
            args.range_ratio,
        )?,
        DatasetKind::File => {
            let path = args
                .dataset_path
                .as_deref()
                .context("--dataset file needs --dataset-path")?;
            dataset::file_prompts(&synth, path, count, args.output_len)?
        }
    };
    if let Some(mix) = &args.priority_mix {
        for prompt in &mut prompts {
            prompt.priority = Some(mix.draw(&mut priority_rng));
        }
    }
    let offsets = arrival_offsets(
        &mut arrival_rng,
        prompts.len(),
        args.request_rate,
        args.burstiness,
    )?;

    // The one-at-a-time run gets prompts of the same lengths and priorities but fresh
    // tokens: with the very same prompts, whichever run comes second would find them in
    // the server's prefix cache and skip their prefill. A file's prompts are what they
    // are, and are reused.
    let single_prompts = match (args.compare_single, args.dataset) {
        (false, _) => None,
        (true, DatasetKind::File) => {
            tracing::warn!(
                "--compare-single with --dataset file sends the same prompts twice: a \
                 server with a prefix cache answers the second run faster"
            );
            Some(prompts.clone())
        }
        (true, _) => Some(dataset::same_shape_prompts(
            &synth,
            &mut single_rng,
            &prompts,
            &shared_prefix,
        )?),
    };
    let warmup = dataset::random_prompts(
        &synth,
        &mut warmup_rng,
        args.warmup_requests,
        args.input_len,
        WARMUP_OUTPUT_LEN.min(args.output_len),
        0.0,
    )?;
    Ok(Workload {
        tokenizer_path,
        prompts,
        offsets,
        single_prompts,
        warmup,
    })
}

/// Sends the workload and measures it.
pub async fn execute(args: &BenchArgs, workload: &Workload) -> anyhow::Result<BenchReport> {
    let client = BenchClient::new(ClientSettings {
        base_url: args.url.clone(),
        endpoint: args.endpoint,
        model: args.model.clone(),
        api_key: args.api_key.clone(),
        ignore_eos: args.ignore_eos,
        temperature: args.temperature,
        request_timeout: Duration::from_secs_f64(args.request_timeout),
    })?;
    if args.wait_ready > 0.0 {
        client
            .wait_until_ready(Duration::from_secs_f64(args.wait_ready))
            .await?;
    } else {
        client.check_reachable().await?;
    }
    for (index, prompt) in workload.warmup.iter().enumerate() {
        client.send(prompt).await.map_err(|failure| {
            anyhow::anyhow!(
                "warm-up request {} to {} failed: {}",
                index + 1,
                args.url,
                failure.message()
            )
        })?;
    }

    let show_progress = !args.no_progress;
    let single = match &workload.single_prompts {
        Some(prompts) => {
            let offsets = vec![Duration::ZERO; prompts.len()];
            let plan = LoadPlan {
                label: "single",
                prompts,
                offsets: &offsets,
                max_concurrency: Some(1),
                show_progress,
            };
            let (records, duration) = run_load(&client, &plan).await;
            Some(RunMetrics::from_records(&records, duration))
        }
        None => None,
    };
    let plan = LoadPlan {
        label: "bench",
        prompts: &workload.prompts,
        offsets: &workload.offsets,
        max_concurrency: args.max_concurrency,
        show_progress,
    };
    let (records, duration) = run_load(&client, &plan).await;
    let result = RunMetrics::from_records(&records, duration);
    Ok(BenchReport::new(
        args.clone(),
        workload.tokenizer_path.clone(),
        PromptStats::of(&workload.prompts),
        single,
        result,
    ))
}
