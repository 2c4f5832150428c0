//! The server's configuration: command-line flags, `HEDDLE_*` environment variables and
//! an optional TOML file, in that order of precedence, over built-in defaults.
//!
//! With no models configured anywhere, the embedded default model is served under the id
//! [`default_model_id`], pinned (loaded at start).
//!
//! The TOML file (every key optional):
//!
//! ```toml
//! host = "0.0.0.0"
//! port = 8080
//! memory_budget = "4GiB"        # or a number of bytes
//! max_body_bytes = 4194304
//! shutdown_grace_secs = 30
//! max_connections = 1024
//! header_read_timeout_secs = 10
//! body_read_timeout_secs = 60
//! idle_timeout_secs = 75
//! admin_api_keys = ["sk-admin"]     # /admin routes, and /v1 and /metrics too
//! metrics_api_keys = ["sk-scraper"] # /metrics only
//! admin_on_loopback = false         # /admin without a key (loopback bind only)
//! allow_unauthenticated = false     # serve /v1 without API keys on a non-loopback address
//! data_dir = "/var/lib/heddle"      # the Batch API's database [default: see --data-dir]
//! batch_lines_in_flight = 8         # batch lines submitted at once, per model
//!
//! [scheduler]
//! max_running = 32
//! max_batched_tokens = 2048
//! prefill_chunk = 512
//! kv_blocks = 1024
//! block_size = 16
//! queue_capacity = 256
//! max_model_len = 8192
//! aging_rate = 0.1
//! prefix_cache = true
//!
//! [gpu]                             # flags of the same names override these
//! device = "cuda"                   # or "cpu" (the default)
//! gpu_memory_fraction = 0.9
//! batch_invariant = false
//! overlap_steps = false             # experimental: see --overlap-steps
//! tensor_parallel_size = 2
//! quantization = "fp8"
//! kv_cache_dtype = "fp8"            # or "auto" (the default)
//!
//! [[models]]
//! id = "smollm2"
//! path = "/models/SmolLM2-135M-Instruct.Q4_1.gguf"   # omit for the embedded model
//! pinned = true
//!
//! [[api_keys]]                      # keys for the /v1 routes
//! key = "sk-batch-jobs"
//! priority = "low"                  # default priority of its requests
//! allowed_priorities = ["low"]      # default: the default priority and less urgent ones
//! ```
//!
//! Which key opens which routes, and what is open without keys: [`crate::api::auth`].
//! The server refuses to listen on a non-loopback address without API keys unless
//! `allow_unauthenticated` is set, and accepts `admin_on_loopback` only on loopback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use heddle_core::{Priority, SchedulerConfig};
use serde::Deserialize;

use crate::api::auth::{ApiKey, KeyTier};
use crate::kv_events::KvEventsConfig;
use crate::pool::{Device, ModelSpec};
use crate::serve::HttpLimits;

/// The id the embedded default model is served under: `smollm2-135m-instruct`.
pub fn default_model_id() -> String {
    heddle_model::embedded::EMBEDDED_MODEL_ID.to_ascii_lowercase()
}

/// `heddle serve`'s flags. Every flag also reads the environment variable named in its
/// help; a flag given on the command line wins over the variable, both over the file.
#[derive(Args, Debug, Clone, Default)]
pub struct ServeArgs {
    /// A TOML configuration file.
    #[arg(long, env = "HEDDLE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1].
    #[arg(long, env = "HEDDLE_HOST")]
    pub host: Option<String>,
    /// Port to listen on; 0 picks a free one [default: 8080].
    #[arg(long, env = "HEDDLE_PORT")]
    pub port: Option<u16>,
    /// A model to serve, as ID=PATH or PATH (its id is then the file name without
    /// extension, lowercased); repeatable, or comma-separated in the variable. Replaces
    /// the file's models. Default: the embedded model.
    #[arg(long = "model", env = "HEDDLE_MODELS", value_delimiter = ',')]
    pub models: Vec<String>,
    /// A model id to pin: loaded at start, never evicted; repeatable.
    #[arg(long = "pin", env = "HEDDLE_PINNED", value_delimiter = ',')]
    pub pinned: Vec<String>,
    /// Most memory the loaded models may take (weights + KV cache), e.g. 4GiB or 500MB;
    /// least recently used models are unloaded to stay under it [default: unlimited].
    #[arg(long, env = "HEDDLE_MEMORY_BUDGET")]
    pub memory_budget: Option<String>,
    /// An API key for the /v1 routes, as KEY (any priority) or KEY:TIER with TIER high,
    /// normal or low (that priority by default, it or less urgent ones on request);
    /// repeatable. With API keys, every /v1 request needs one; without, /v1 is open.
    #[arg(
        long = "api-key",
        env = "HEDDLE_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,
    /// A key for the /admin routes (list, load, unload models), also good for /v1 at any
    /// priority and for /metrics; repeatable. Without one, admin routes are off.
    #[arg(
        long = "admin-api-key",
        env = "HEDDLE_ADMIN_API_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub admin_api_keys: Vec<String>,
    /// A key that may read /metrics and nothing else; repeatable. With one, /metrics needs
    /// it (or an admin key); without, /metrics is open.
    #[arg(
        long = "metrics-api-key",
        env = "HEDDLE_METRICS_API_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub metrics_api_keys: Vec<String>,
    /// Open the /admin routes without a key; only allowed when listening on a loopback
    /// address, and not together with --admin-api-key.
    #[arg(long, env = "HEDDLE_ADMIN_ON_LOOPBACK")]
    pub admin_on_loopback: bool,
    /// Serve /v1 without API keys on a non-loopback address (refused otherwise).
    #[arg(long, env = "HEDDLE_ALLOW_UNAUTHENTICATED")]
    pub allow_unauthenticated: bool,
    /// Most connections held at once; more wait in the kernel's backlog, and when all are
    /// taken the one that has waited longest on its client (idle, or still sending its
    /// request) is closed to make room [default: 1024, within the open-file limit].
    #[arg(long, env = "HEDDLE_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Seconds a client has to send a request's headers, from its connection (or its first
    /// byte after an idle keep-alive wait) [default: 10].
    #[arg(long, env = "HEDDLE_HEADER_READ_TIMEOUT_SECS")]
    pub header_read_timeout_secs: Option<f64>,
    /// Seconds a client has to send a whole request body; later is 408 [default: 60].
    #[arg(long, env = "HEDDLE_BODY_READ_TIMEOUT_SECS")]
    pub body_read_timeout_secs: Option<f64>,
    /// Seconds a keep-alive connection may wait for its next request [default: 75].
    #[arg(long, env = "HEDDLE_IDLE_TIMEOUT_SECS")]
    pub idle_timeout_secs: Option<f64>,
    /// Largest request body in bytes [default: 4194304].
    #[arg(long, env = "HEDDLE_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Seconds that running requests get to finish after SIGINT/SIGTERM before they are
    /// cancelled [default: 30].
    #[arg(long, env = "HEDDLE_SHUTDOWN_GRACE_SECS")]
    pub shutdown_grace_secs: Option<f64>,
    /// Most sequences in one model step [default: 32].
    #[arg(long, env = "HEDDLE_MAX_RUNNING")]
    pub max_running: Option<usize>,
    /// Most tokens (prefill and decode) in one model step [default: 2048].
    #[arg(long, env = "HEDDLE_MAX_BATCHED_TOKENS")]
    pub max_batched_tokens: Option<usize>,
    /// KV cache blocks per model [default: 1024].
    #[arg(long, env = "HEDDLE_KV_BLOCKS")]
    pub kv_blocks: Option<usize>,
    /// Positions per KV cache block [default: 16].
    #[arg(long, env = "HEDDLE_BLOCK_SIZE")]
    pub block_size: Option<usize>,
    /// Most waiting requests per model; beyond it requests get 429 [default: 256].
    #[arg(long, env = "HEDDLE_QUEUE_CAPACITY")]
    pub queue_capacity: Option<usize>,
    /// Cap on prompt + output tokens, below the model's own context length.
    #[arg(long, env = "HEDDLE_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,
    /// Priority levels a waiting request gains per second [default: 0.1].
    #[arg(long, env = "HEDDLE_AGING_RATE")]
    pub aging_rate: Option<f64>,
    /// Reuse computed KV blocks of identical prompt prefixes [default: true].
    #[arg(long, env = "HEDDLE_PREFIX_CACHE")]
    pub prefix_cache: Option<bool>,
    /// Where models run: cpu, or cuda (the first NVIDIA GPU; needs a build with the
    /// `cuda` feature) [default: cpu]. On cuda, --max-running and --max-batched-tokens
    /// default to 256 and 8192, and the KV cache is sized by --gpu-memory-fraction.
    #[arg(long, env = "HEDDLE_DEVICE", value_enum)]
    pub device: Option<DeviceKind>,
    /// Fraction of GPU memory heddle may use; the KV cache gets what the weights and
    /// buffers leave of it [default: 0.9].
    #[arg(long, env = "HEDDLE_GPU_MEMORY_FRACTION")]
    pub gpu_memory_fraction: Option<f64>,
    /// On cuda: make each request's output independent of what else runs with it (pinned
    /// GEMM algorithms, one attention kernel), at a cost in speed (docs/CUDA.md). The CPU
    /// runner always is.
    #[arg(long, env = "HEDDLE_BATCH_INVARIANT")]
    pub batch_invariant: bool,
    /// On cuda, experimental: queue each step behind the one in flight, so that the
    /// host's share of a step overlaps the GPU's (docs/CUDA.md "Overlapped steps"; not yet
    /// measured on a GPU, hence off by default).
    #[arg(long, env = "HEDDLE_OVERLAP_STEPS")]
    pub overlap_steps: bool,
    /// On cuda: split each model over this many GPUs of this machine (tensor parallelism
    /// through NCCL; the GPUs are the first N that CUDA_VISIBLE_DEVICES leaves visible)
    /// [default: 1]. The model's attention heads, KV heads, intermediate size and
    /// vocabulary must divide by it; see docs/DEPLOY.md.
    #[arg(long, env = "HEDDLE_TENSOR_PARALLEL_SIZE")]
    pub tensor_parallel_size: Option<usize>,
    /// On cuda: store the layers' projections in FP8 (E4M3, one scale a matrix, quantized
    /// at load; a step's activations quantized before each projection), halving their
    /// memory and using the FP8 tensor cores; needs compute capability 8.9 (Ada, Hopper)
    /// or newer. See docs/CUDA.md.
    #[arg(long, env = "HEDDLE_QUANTIZATION", value_enum)]
    pub quantization: Option<QuantizationKind>,
    /// On cuda: what the KV cache holds: `auto` (the model's dtype) or `fp8` (E4M3 codes
    /// with scale 1, widened to bf16 as attention reads them: twice the tokens in the same
    /// memory and half the bytes a decode step reads; compute capability 8.9 or newer)
    /// [default: auto]. See docs/CUDA.md.
    #[arg(long, env = "HEDDLE_KV_CACHE_DTYPE", value_enum)]
    pub kv_cache_dtype: Option<KvCacheDtypeKind>,
    /// Serve random weights of the shape in --model-config, made on the GPU (benchmarks).
    /// Prompts should be token ids; see docs/CUDA.md.
    #[arg(long, env = "HEDDLE_DUMMY_WEIGHTS", requires = "model_config")]
    pub dummy_weights: bool,
    /// An HF config.json-format file for --dummy-weights, e.g. configs/llama-3.1-8b.json;
    /// the model's id is the file name without extension.
    #[arg(long, env = "HEDDLE_MODEL_CONFIG")]
    pub model_config: Option<PathBuf>,
    /// Where the Batch API keeps its files, batches and results (a SQLite database)
    /// [default: `heddle` in the user's data directory, $XDG_DATA_HOME or
    /// ~/.local/share].
    #[arg(long, env = "HEDDLE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Most lines of batches submitted to one model's engine at once; the rest wait, so
    /// that batches never fill the waiting queue ahead of interactive requests
    /// [default: 8].
    #[arg(long, env = "HEDDLE_BATCH_LINES_IN_FLIGHT")]
    pub batch_lines_in_flight: Option<usize>,
    /// The name(s) clients use for the one model served, as vLLM's flag: the first is its
    /// id (in responses, metrics and `/server_info`), the others are accepted too. Names
    /// the embedded model, the single `--model`, or the single model of the file.
    #[arg(
        long = "served-model-name",
        env = "HEDDLE_SERVED_MODEL_NAME",
        num_args = 1..,
        value_delimiter = ','
    )]
    pub served_model_names: Vec<String>,
    /// Publish KV-cache events (blocks stored / removed / all cleared) on this ZeroMQ PUB
    /// endpoint, in vLLM's format, for prefix-aware routers: bound with a wildcard host
    /// (`tcp://*:5557`), connected to a subscriber otherwise (`tcp://epp:5557`), as vLLM
    /// does (docs/DEPLOY.md). Off by default.
    #[arg(long, env = "HEDDLE_KV_EVENTS_ENDPOINT")]
    pub kv_events_endpoint: Option<String>,
    /// The topic (first frame) of the KV event messages [default: empty, as vLLM's].
    #[arg(long, env = "HEDDLE_KV_EVENTS_TOPIC", requires = "kv_events_endpoint")]
    pub kv_events_topic: Option<String>,
}

/// `--device`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

/// `--quantization`: how a GPU model's projections are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantizationKind {
    /// FP8 E4M3, one scale a matrix.
    Fp8,
}

/// `--kv-cache-dtype`: what a GPU model's KV cache holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvCacheDtypeKind {
    /// The model's dtype.
    Auto,
    /// FP8 E4M3 with scale 1.
    Fp8,
}

/// The resolved configuration the server runs with.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    pub models: Vec<ModelSpec>,
    pub memory_budget: Option<u64>,
    /// Keys for /v1; admin keys open /admin (and /v1, /metrics); metrics keys /metrics.
    pub api_keys: Vec<ApiKey>,
    pub admin_api_keys: Vec<String>,
    pub metrics_api_keys: Vec<String>,
    /// /admin without a key; only on a loopback bind address.
    pub admin_on_loopback: bool,
    /// Serve /v1 without API keys on a non-loopback address.
    pub allow_unauthenticated: bool,
    pub max_body_bytes: usize,
    /// Connection limits and timeouts.
    pub http: HttpLimits,
    pub shutdown_grace: Duration,
    /// Every engine's scheduler; `max_model_len` is also capped per model.
    pub scheduler: SchedulerConfig,
    pub device: Device,
    /// The Batch API's database folder; None keeps batches in memory only (embedding and
    /// tests: nothing survives the process). `heddle serve` always has one.
    pub data_dir: Option<PathBuf>,
    /// Most batch lines in flight per model.
    pub batch_lines_in_flight: usize,
    /// Where KV-cache events are published; None publishes none.
    pub kv_events: Option<KvEventsConfig>,
}

impl ServerConfig {
    /// Defaults around the given models (for tests and embedding).
    pub fn with_models(models: Vec<ModelSpec>) -> Self {
        ServerConfig {
            host: "127.0.0.1".into(),
            port: 8080,
            models,
            memory_budget: None,
            api_keys: Vec::new(),
            admin_api_keys: Vec::new(),
            metrics_api_keys: Vec::new(),
            admin_on_loopback: false,
            allow_unauthenticated: false,
            max_body_bytes: 4 * 1024 * 1024,
            http: HttpLimits::default(),
            shutdown_grace: Duration::from_secs(30),
            scheduler: SchedulerConfig {
                max_running: 32,
                num_blocks: 1024,
                queue_capacity: Some(256),
                ..SchedulerConfig::default()
            },
            device: Device::Cpu,
            data_dir: None,
            batch_lines_in_flight: 8,
            kv_events: None,
        }
    }

    /// Flags (with their environment variables) over the TOML file over defaults.
    pub fn resolve(args: &ServeArgs) -> anyhow::Result<Self> {
        let file = match &args.config {
            Some(path) => FileConfig::read(path)?,
            None => FileConfig::default(),
        };
        let mut config = ServerConfig::with_models(Vec::new());
        config.device = resolve_device(&file.gpu.clone().unwrap_or_default().under(args))?;
        if matches!(config.device, Device::Cuda { .. }) {
            // A GPU step is cheap per token only in large batches.
            config.scheduler.max_running = 256;
            config.scheduler.max_batched_tokens = 8192;
        }
        let file_scheduler = file.scheduler.unwrap_or_default();
        let s = &mut config.scheduler;
        s.max_running = pick(args.max_running, file_scheduler.max_running, s.max_running);
        s.max_batched_tokens = pick(
            args.max_batched_tokens,
            file_scheduler.max_batched_tokens,
            s.max_batched_tokens,
        );
        s.prefill_chunk = pick(None, file_scheduler.prefill_chunk, s.prefill_chunk);
        s.num_blocks = pick(args.kv_blocks, file_scheduler.kv_blocks, s.num_blocks);
        s.block_size = pick(args.block_size, file_scheduler.block_size, s.block_size);
        s.queue_capacity = args
            .queue_capacity
            .or(file_scheduler.queue_capacity)
            .or(s.queue_capacity);
        s.max_model_len = pick(
            args.max_model_len,
            file_scheduler.max_model_len,
            s.max_model_len,
        );
        s.aging_rate = pick(args.aging_rate, file_scheduler.aging_rate, s.aging_rate);
        s.enable_prefix_cache = pick(
            args.prefix_cache,
            file_scheduler.prefix_cache,
            s.enable_prefix_cache,
        );
        s.validate().context("invalid scheduler settings")?;

        config.host = pick(args.host.clone(), file.host, config.host);
        config.port = pick(args.port, file.port, config.port);
        config.max_body_bytes = pick(
            args.max_body_bytes,
            file.max_body_bytes,
            config.max_body_bytes,
        );
        let grace = pick(
            args.shutdown_grace_secs,
            file.shutdown_grace_secs,
            config.shutdown_grace.as_secs_f64(),
        );
        config.shutdown_grace = Duration::try_from_secs_f64(grace)
            .context("shutdown grace must be a non-negative number of seconds")?;
        let http = &mut config.http;
        http.max_connections = pick(
            args.max_connections,
            file.max_connections,
            http.max_connections,
        );
        if http.max_connections == 0 {
            bail!("max_connections must be at least 1");
        }
        http.header_read_timeout = timeout(
            "header_read_timeout_secs",
            args.header_read_timeout_secs
                .or(file.header_read_timeout_secs),
            http.header_read_timeout,
        )?;
        http.body_read_timeout = timeout(
            "body_read_timeout_secs",
            args.body_read_timeout_secs.or(file.body_read_timeout_secs),
            http.body_read_timeout,
        )?;
        http.idle_timeout = timeout(
            "idle_timeout_secs",
            args.idle_timeout_secs.or(file.idle_timeout_secs),
            http.idle_timeout,
        )?;
        config.memory_budget = match (&args.memory_budget, file.memory_budget) {
            (Some(text), _) => Some(parse_byte_size(text)?),
            (None, Some(ByteSize::Text(text))) => Some(parse_byte_size(&text)?),
            (None, Some(ByteSize::Bytes(bytes))) => Some(bytes),
            (None, None) => None,
        };

        config.models = if args.dummy_weights {
            let path = args
                .model_config
                .clone()
                .context("--dummy-weights needs --model-config")?;
            vec![ModelSpec {
                id: id_from_path(&path)?,
                path,
                pinned: true,
                aliases: Vec::new(),
            }]
        } else if !args.models.is_empty() {
            args.models
                .iter()
                .map(|m| parse_model_flag(m))
                .collect::<anyhow::Result<_>>()?
        } else if !file.models.is_empty() {
            file.models
                .into_iter()
                .map(FileModel::into_spec)
                .collect::<anyhow::Result<_>>()?
        } else {
            vec![ModelSpec {
                id: default_model_id(),
                path: heddle_model::embedded_model_path()?,
                pinned: true,
                aliases: Vec::new(),
            }]
        };
        for id in &args.pinned {
            match config.models.iter_mut().find(|m| &m.id == id) {
                Some(model) => model.pinned = true,
                None => bail!("--pin {id}: no model has that id"),
            }
        }
        if !args.served_model_names.is_empty() {
            name_the_served_model(&mut config.models, &args.served_model_names)?;
        }
        check_models(&config.models)?;
        config.kv_events = args
            .kv_events_endpoint
            .as_ref()
            .map(|endpoint| KvEventsConfig {
                endpoint: endpoint.clone(),
                topic: args.kv_events_topic.clone().unwrap_or_default(),
            });

        config.api_keys = if !args.api_keys.is_empty() {
            args.api_keys
                .iter()
                .map(|k| parse_key_flag(k))
                .collect::<anyhow::Result<_>>()?
        } else {
            file.api_keys
                .into_iter()
                .map(FileApiKey::into_key)
                .collect::<anyhow::Result<_>>()?
        };
        config.admin_api_keys = pick_keys(&args.admin_api_keys, file.admin_api_keys);
        config.metrics_api_keys = pick_keys(&args.metrics_api_keys, file.metrics_api_keys);
        config.admin_on_loopback =
            args.admin_on_loopback || file.admin_on_loopback.unwrap_or(false);
        config.allow_unauthenticated =
            args.allow_unauthenticated || file.allow_unauthenticated.unwrap_or(false);
        config.check_keys()?;
        config.data_dir = Some(match args.data_dir.clone().or(file.data_dir) {
            Some(dir) => dir,
            None => default_data_dir()?,
        });
        config.batch_lines_in_flight = pick(
            args.batch_lines_in_flight,
            file.batch_lines_in_flight,
            config.batch_lines_in_flight,
        );
        if config.batch_lines_in_flight == 0 {
            bail!("batch_lines_in_flight must be at least 1");
        }
        Ok(config)
    }

    /// Every key is non-empty and opens one thing.
    fn check_keys(&self) -> anyhow::Result<()> {
        let all = self
            .api_keys
            .iter()
            .map(|k| k.key.as_str())
            .chain(self.admin_api_keys.iter().map(String::as_str))
            .chain(self.metrics_api_keys.iter().map(String::as_str));
        let mut seen = std::collections::HashSet::new();
        for key in all {
            if key.is_empty() {
                bail!("an API key must not be empty");
            }
            if !seen.insert(key) {
                bail!("an API key is configured twice (keys are listed once, by role)");
            }
        }
        Ok(())
    }

    /// Refuses what would expose more than the configuration says: /v1 without keys on a
    /// non-loopback address (unless `allow_unauthenticated`), and `admin_on_loopback`
    /// anywhere but on loopback or next to admin keys. Warns about what stays open.
    pub fn check_exposure(&self, address: SocketAddr) -> anyhow::Result<()> {
        let loopback = address.ip().is_loopback();
        if self.admin_on_loopback {
            if !loopback {
                bail!(
                    "--admin-on-loopback: {address} is not a loopback address; use \
                     --admin-api-key to reach admin routes from other machines"
                );
            }
            if !self.admin_api_keys.is_empty() {
                bail!("--admin-on-loopback and --admin-api-key: choose one");
            }
        }
        if loopback {
            return Ok(());
        }
        if self.api_keys.is_empty() {
            if !self.allow_unauthenticated {
                bail!(
                    "refusing to serve the /v1 API without API keys on {address}, which \
                     other machines can reach: set --api-key (HEDDLE_API_KEYS), or pass \
                     --allow-unauthenticated to serve it open"
                );
            }
            tracing::warn!(
                %address,
                "serving the /v1 API WITHOUT API KEYS to anyone who can reach this address \
                 (--allow-unauthenticated)"
            );
        }
        if self.metrics_api_keys.is_empty() {
            tracing::warn!(
                %address,
                "/metrics needs no key; set --metrics-api-key to protect it"
            );
        }
        Ok(())
    }

    pub fn bind_address(&self) -> anyhow::Result<SocketAddr> {
        use std::net::ToSocketAddrs;
        (self.host.as_str(), self.port)
            .to_socket_addrs()
            .with_context(|| format!("resolving {}:{}", self.host, self.port))?
            .next()
            .with_context(|| format!("{} resolves to no address", self.host))
    }
}

fn resolve_device(args: &ServeArgs) -> anyhow::Result<Device> {
    let fraction = args.gpu_memory_fraction.unwrap_or(0.9);
    let tensor_parallel_size = args.tensor_parallel_size.unwrap_or(1);
    if tensor_parallel_size == 0 {
        bail!("--tensor-parallel-size must be at least 1");
    }
    let fp8_kv_cache = args.kv_cache_dtype == Some(KvCacheDtypeKind::Fp8);
    match args.device.unwrap_or(DeviceKind::Cpu) {
        DeviceKind::Cpu => {
            if args.dummy_weights {
                bail!("--dummy-weights needs --device cuda");
            }
            if tensor_parallel_size > 1 {
                bail!("--tensor-parallel-size needs --device cuda");
            }
            if args.quantization.is_some() {
                bail!(
                    "--quantization needs --device cuda (on the CPU a GGUF file's own \
                     quantization is used)"
                );
            }
            if fp8_kv_cache {
                bail!("--kv-cache-dtype fp8 needs --device cuda");
            }
            if args.overlap_steps {
                bail!("--overlap-steps needs --device cuda (the CPU runner computes one step at a time)");
            }
            Ok(Device::Cpu)
        }
        DeviceKind::Cuda if !cfg!(feature = "cuda") => {
            bail!(
                "--device cuda: this heddle was built without cuda (build with `--features cuda`)"
            )
        }
        DeviceKind::Cuda => {
            if !(fraction > 0.0 && fraction <= 1.0) {
                bail!("--gpu-memory-fraction must be in (0, 1], got {fraction}");
            }
            // Without a GPU, real weights are served on the CPU, with the CPU's batch
            // sizes (random weights exist only on the GPU); a model asked to be split over
            // several GPUs is not quietly served on none.
            if !args.dummy_weights {
                if let Err(why) = crate::pool::cuda_device() {
                    if tensor_parallel_size > 1 {
                        bail!("--tensor-parallel-size {tensor_parallel_size}: {why:#}");
                    }
                    if args.quantization.is_some() {
                        bail!("--quantization fp8: {why:#}");
                    }
                    if fp8_kv_cache {
                        bail!("--kv-cache-dtype fp8: {why:#}");
                    }
                    tracing::warn!(
                        "--device cuda: {why:#}; serving on the CPU, with the CPU's defaults"
                    );
                    return Ok(Device::Cpu);
                }
            }
            Ok(Device::Cuda {
                gpu_memory_fraction: fraction,
                dummy_weights: args.dummy_weights,
                batch_invariant: args.batch_invariant,
                overlap_steps: args.overlap_steps,
                tensor_parallel_size,
                fp8: args.quantization == Some(QuantizationKind::Fp8),
                fp8_kv_cache,
            })
        }
    }
}

/// `heddle` in the user's data directory: $XDG_DATA_HOME, else ~/.local/share.
fn default_data_dir() -> anyhow::Result<PathBuf> {
    let non_empty = |name| std::env::var_os(name).filter(|value| !value.is_empty());
    let base = match non_empty("XDG_DATA_HOME") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(
            non_empty("HOME").context("neither XDG_DATA_HOME nor HOME is set: pass --data-dir")?,
        )
        .join(".local/share"),
    };
    Ok(base.join("heddle"))
}

fn pick<T>(flag: Option<T>, file: Option<T>, default: T) -> T {
    flag.or(file).unwrap_or(default)
}

/// The flag's keys when given, else the file's.
fn pick_keys(flag: &[String], file: Option<Vec<String>>) -> Vec<String> {
    if flag.is_empty() {
        file.unwrap_or_default()
    } else {
        flag.to_vec()
    }
}

/// A timeout in seconds, which must be positive.
fn timeout(name: &str, seconds: Option<f64>, default: Duration) -> anyhow::Result<Duration> {
    let Some(seconds) = seconds else {
        return Ok(default);
    };
    match Duration::try_from_secs_f64(seconds) {
        Ok(duration) if !duration.is_zero() => Ok(duration),
        _ => bail!("{name} must be a positive number of seconds, got {seconds}"),
    }
}

/// `--served-model-name`: the first name becomes the model's id, the others its aliases.
fn name_the_served_model(models: &mut [ModelSpec], names: &[String]) -> anyhow::Result<()> {
    let [model] = models else {
        bail!(
            "--served-model-name names the one model served, but {} are configured; \
             name each with --model ID=PATH instead",
            models.len()
        );
    };
    let names: Vec<String> = names.iter().map(|n| n.trim().to_string()).collect();
    model.id = names[0].clone();
    model.aliases = names[1..].to_vec();
    Ok(())
}

fn check_models(models: &[ModelSpec]) -> anyhow::Result<()> {
    let mut ids = std::collections::HashSet::new();
    for model in models {
        for name in std::iter::once(&model.id).chain(&model.aliases) {
            if name.is_empty() {
                bail!("a model id must not be empty");
            }
            if !ids.insert(name.as_str()) {
                bail!("model id {name:?} is configured twice");
            }
        }
        if !model.path.exists() {
            bail!(
                "model {:?}: {} does not exist",
                model.id,
                model.path.display()
            );
        }
    }
    Ok(())
}

/// `ID=PATH`, or `PATH` with the id taken from the file name.
fn parse_model_flag(text: &str) -> anyhow::Result<ModelSpec> {
    let (id, path) = match text.split_once('=') {
        Some((id, path)) => (id.trim().to_string(), PathBuf::from(path.trim())),
        None => {
            let path = PathBuf::from(text.trim());
            (id_from_path(&path)?, path)
        }
    };
    Ok(ModelSpec {
        id,
        path,
        pinned: false,
        aliases: Vec::new(),
    })
}

fn id_from_path(path: &Path) -> anyhow::Result<String> {
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .with_context(|| format!("cannot name a model after {}", path.display()))?;
    Ok(stem.to_lowercase())
}

/// `KEY` (any priority) or `KEY:TIER`.
fn parse_key_flag(text: &str) -> anyhow::Result<ApiKey> {
    let (key, tier) = match text.rsplit_once(':') {
        Some((key, tier)) => {
            let priority: Priority = tier
                .parse()
                .with_context(|| format!("API key tier {tier:?}"))?;
            (key, KeyTier::at(priority))
        }
        None => (text, KeyTier::any()),
    };
    Ok(ApiKey {
        key: key.to_string(),
        tier,
    })
}

/// Bytes, or a number with a unit: K/KB = 1000, KiB = 1024, and so on up to T.
pub fn parse_byte_size(text: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .with_context(|| format!("{text:?} is not a size such as 4GiB or 500MB"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => bail!("unknown size unit {other:?} in {text:?}"),
    };
    Ok((number * scale).round() as u64)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    gpu: Option<FileGpu>,
    host: Option<String>,
    port: Option<u16>,
    memory_budget: Option<ByteSize>,
    max_body_bytes: Option<usize>,
    shutdown_grace_secs: Option<f64>,
    max_connections: Option<usize>,
    header_read_timeout_secs: Option<f64>,
    body_read_timeout_secs: Option<f64>,
    idle_timeout_secs: Option<f64>,
    scheduler: Option<FileScheduler>,
    #[serde(default)]
    models: Vec<FileModel>,
    #[serde(default)]
    api_keys: Vec<FileApiKey>,
    admin_api_keys: Option<Vec<String>>,
    metrics_api_keys: Option<Vec<String>>,
    admin_on_loopback: Option<bool>,
    allow_unauthenticated: Option<bool>,
    data_dir: Option<PathBuf>,
    batch_lines_in_flight: Option<usize>,
}

impl FileConfig {
    fn read(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// The `[gpu]` section: the device flags' values when the flags are not given.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileGpu {
    device: Option<DeviceKind>,
    gpu_memory_fraction: Option<f64>,
    batch_invariant: Option<bool>,
    overlap_steps: Option<bool>,
    tensor_parallel_size: Option<usize>,
    quantization: Option<QuantizationKind>,
    kv_cache_dtype: Option<KvCacheDtypeKind>,
}

impl FileGpu {
    /// `args` with the device flags it leaves unset taken from this section.
    fn under(self, args: &ServeArgs) -> ServeArgs {
        ServeArgs {
            device: args.device.or(self.device),
            gpu_memory_fraction: args.gpu_memory_fraction.or(self.gpu_memory_fraction),
            batch_invariant: args.batch_invariant || self.batch_invariant.unwrap_or(false),
            overlap_steps: args.overlap_steps || self.overlap_steps.unwrap_or(false),
            tensor_parallel_size: args.tensor_parallel_size.or(self.tensor_parallel_size),
            quantization: args.quantization.or(self.quantization),
            kv_cache_dtype: args.kv_cache_dtype.or(self.kv_cache_dtype),
            ..args.clone()
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ByteSize {
    Bytes(u64),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileScheduler {
    max_running: Option<usize>,
    max_batched_tokens: Option<usize>,
    prefill_chunk: Option<usize>,
    kv_blocks: Option<usize>,
    block_size: Option<usize>,
    queue_capacity: Option<usize>,
    max_model_len: Option<usize>,
    aging_rate: Option<f64>,
    prefix_cache: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileModel {
    id: String,
    /// None: the embedded model.
    path: Option<PathBuf>,
    #[serde(default)]
    pinned: bool,
}

impl FileModel {
    fn into_spec(self) -> anyhow::Result<ModelSpec> {
        let path = match self.path {
            Some(path) => path,
            None => heddle_model::embedded_model_path()?,
        };
        Ok(ModelSpec {
            id: self.id,
            path,
            pinned: self.pinned,
            aliases: Vec::new(),
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileApiKey {
    key: String,
    priority: Option<String>,
    allowed_priorities: Option<Vec<String>>,
}

impl FileApiKey {
    fn into_key(self) -> anyhow::Result<ApiKey> {
        let default_priority: Priority = match &self.priority {
            Some(p) => p.parse().context("api_keys.priority")?,
            None => Priority::Normal,
        };
        let mut tier = KeyTier::at(default_priority);
        if let Some(allowed) = &self.allowed_priorities {
            tier.allowed = allowed
                .iter()
                .map(|p| p.parse::<Priority>())
                .collect::<Result<_, _>>()
                .context("api_keys.allowed_priorities")?;
            if !tier.allowed.contains(&default_priority) {
                tier.allowed.push(default_priority);
            }
        }
        Ok(ApiKey {
            key: self.key,
            tier,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(name: &str, contents: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("heddle-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn the_embedded_model_has_a_lowercase_id() {
        assert_eq!(default_model_id(), "smollm2-135m-instruct");
    }

    #[test]
    fn served_model_names_rename_the_one_model_and_add_aliases() {
        let weights = temp_file("served.gguf", "not really a model");
        let one = ServeArgs {
            models: vec![format!("x={}", weights.display())],
            served_model_names: vec!["meta/llama".into(), "llama".into()],
            data_dir: Some(std::env::temp_dir()),
            ..ServeArgs::default()
        };
        let config = ServerConfig::resolve(&one).unwrap();
        assert_eq!(config.models[0].id, "meta/llama");
        assert_eq!(config.models[0].aliases, vec!["llama".to_string()]);
        assert!(config.models[0].answers_to("llama"));
        assert!(!config.models[0].answers_to("x"));

        let two = ServeArgs {
            models: vec![
                format!("a={}", weights.display()),
                format!("b={}", weights.display()),
            ],
            ..one.clone()
        };
        let error = ServerConfig::resolve(&two).unwrap_err().to_string();
        assert!(error.contains("--served-model-name"), "{error}");

        let repeated = ServeArgs {
            served_model_names: vec!["same".into(), "same".into()],
            ..one.clone()
        };
        assert!(ServerConfig::resolve(&repeated).is_err());
    }

    #[test]
    fn kv_events_are_off_unless_an_endpoint_is_given() {
        let weights = temp_file("events.gguf", "not really a model");
        let args = ServeArgs {
            models: vec![format!("m={}", weights.display())],
            data_dir: Some(std::env::temp_dir()),
            ..ServeArgs::default()
        };
        assert_eq!(ServerConfig::resolve(&args).unwrap().kv_events, None);
        let on = ServeArgs {
            kv_events_endpoint: Some("tcp://*:5557".into()),
            ..args
        };
        assert_eq!(
            ServerConfig::resolve(&on).unwrap().kv_events,
            Some(KvEventsConfig {
                endpoint: "tcp://*:5557".into(),
                topic: String::new(),
            })
        );
    }

    #[test]
    fn sizes_parse_with_decimal_and_binary_units() {
        assert_eq!(parse_byte_size("1024").unwrap(), 1024);
        assert_eq!(parse_byte_size("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_byte_size("1.5 GiB").unwrap(), 1_610_612_736);
        assert!(parse_byte_size("12 parsecs").is_err());
        assert!(parse_byte_size("GiB").is_err());
    }

    #[test]
    fn flags_win_over_the_file_which_wins_over_defaults() {
        let weights = temp_file("w.gguf", "not really a model");
        let file = temp_file(
            "flags.toml",
            &format!(
                r#"
                port = 9000
                host = "0.0.0.0"
                memory_budget = "1GiB"
                [scheduler]
                kv_blocks = 77
                max_running = 3
                [[models]]
                id = "a"
                path = "{0}"
                [[models]]
                id = "b"
                path = "{0}"
                pinned = true
                [[api_keys]]
                key = "sk-low"
                priority = "low"
                "#,
                weights.display()
            ),
        );
        let args = ServeArgs {
            config: Some(file),
            port: Some(9100),
            max_running: Some(5),
            ..ServeArgs::default()
        };
        let config = ServerConfig::resolve(&args).unwrap();
        assert_eq!(config.port, 9100);
        assert_eq!(config.host, "0.0.0.0");
        assert_eq!(config.memory_budget, Some(1 << 30));
        assert_eq!(config.scheduler.max_running, 5);
        assert_eq!(config.scheduler.num_blocks, 77);
        assert_eq!(config.scheduler.block_size, 16);
        let ids: Vec<(&str, bool)> = config
            .models
            .iter()
            .map(|m| (m.id.as_str(), m.pinned))
            .collect();
        assert_eq!(ids, [("a", false), ("b", true)]);
        assert_eq!(config.api_keys[0].tier.default_priority, Priority::Low);
        assert_eq!(config.api_keys[0].tier.allowed, [Priority::Low]);
        assert!(config.data_dir.is_some_and(|dir| dir.ends_with("heddle")));
        assert_eq!(config.batch_lines_in_flight, 8);
    }

    #[test]
    fn the_batch_settings_come_from_flags_or_the_file() {
        let weights = temp_file("batch.gguf", "x");
        let file = temp_file(
            "batch.toml",
            &format!(
                "data_dir = \"/srv/heddle\"\nbatch_lines_in_flight = 3\n[[models]]\nid = \"m\"\npath = \"{}\"\n",
                weights.display()
            ),
        );
        let from_file = ServeArgs {
            config: Some(file),
            ..ServeArgs::default()
        };
        let config = ServerConfig::resolve(&from_file).unwrap();
        assert_eq!(config.data_dir.as_deref(), Some(Path::new("/srv/heddle")));
        assert_eq!(config.batch_lines_in_flight, 3);
        let flags = ServeArgs {
            data_dir: Some("/tmp/elsewhere".into()),
            batch_lines_in_flight: Some(1),
            ..from_file.clone()
        };
        let config = ServerConfig::resolve(&flags).unwrap();
        assert_eq!(
            config.data_dir.as_deref(),
            Some(Path::new("/tmp/elsewhere"))
        );
        assert_eq!(config.batch_lines_in_flight, 1);
        let none = ServeArgs {
            batch_lines_in_flight: Some(0),
            ..from_file
        };
        assert!(ServerConfig::resolve(&none).is_err());
    }

    #[test]
    fn model_and_key_flags_parse() {
        let weights = temp_file("SmolThing.gguf", "x");
        let args = ServeArgs {
            models: vec![
                format!("x={}", weights.display()),
                weights.display().to_string(),
            ],
            pinned: vec!["smolthing".into()],
            api_keys: vec!["sk-any".into(), "sk-batch:low".into()],
            ..ServeArgs::default()
        };
        let config = ServerConfig::resolve(&args).unwrap();
        assert_eq!(config.models[0].id, "x");
        assert_eq!(config.models[1].id, "smolthing");
        assert!(config.models[1].pinned && !config.models[0].pinned);
        assert_eq!(config.api_keys[0].tier, KeyTier::any());
        assert_eq!(config.api_keys[1].key, "sk-batch");
        assert_eq!(config.api_keys[1].tier, KeyTier::at(Priority::Low));
    }

    #[test]
    fn keys_of_each_role_and_connection_limits_come_from_flags_or_the_file() {
        let weights = temp_file("k.gguf", "x");
        let file = temp_file(
            "keys.toml",
            &format!(
                r#"
                admin_api_keys = ["sk-admin"]
                metrics_api_keys = ["sk-scraper"]
                admin_on_loopback = false
                max_connections = 50
                header_read_timeout_secs = 2.5
                idle_timeout_secs = 30
                [[models]]
                id = "m"
                path = "{}"
                [[api_keys]]
                key = "sk-app"
                "#,
                weights.display()
            ),
        );
        let from_file = ServeArgs {
            config: Some(file.clone()),
            body_read_timeout_secs: Some(9.0),
            ..ServeArgs::default()
        };
        let config = ServerConfig::resolve(&from_file).unwrap();
        assert_eq!(config.admin_api_keys, ["sk-admin"]);
        assert_eq!(config.metrics_api_keys, ["sk-scraper"]);
        assert_eq!(config.api_keys[0].tier, KeyTier::at(Priority::Normal));
        assert_eq!(
            config.http,
            HttpLimits {
                max_connections: 50,
                header_read_timeout: Duration::from_millis(2500),
                body_read_timeout: Duration::from_secs(9),
                idle_timeout: Duration::from_secs(30),
            }
        );
        let flags = ServeArgs {
            admin_api_keys: vec!["sk-root".into()],
            ..from_file.clone()
        };
        assert_eq!(
            ServerConfig::resolve(&flags).unwrap().admin_api_keys,
            ["sk-root"]
        );
        let twice = ServeArgs {
            metrics_api_keys: vec!["sk-app".into()],
            ..from_file.clone()
        };
        let err = ServerConfig::resolve(&twice).unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
        let no_wait = ServeArgs {
            idle_timeout_secs: Some(0.0),
            ..from_file
        };
        assert!(ServerConfig::resolve(&no_wait).is_err());
        // Admin rights are the admin key's alone: the old per-key flag is an error.
        let old_style = temp_file(
            "old-keys.toml",
            "[[api_keys]]\nkey = \"sk-x\"\nadmin = true\n",
        );
        let old = ServeArgs {
            config: Some(old_style),
            models: vec![format!("m={}", weights.display())],
            ..ServeArgs::default()
        };
        assert!(ServerConfig::resolve(&old).is_err());
    }

    #[test]
    fn exposed_addresses_need_api_keys_and_admin_on_loopback_needs_loopback() {
        let exposed: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let local_v6: SocketAddr = "[::1]:8080".parse().unwrap();
        let open = ServerConfig::with_models(Vec::new());
        assert!(open.check_exposure(local).is_ok());
        assert!(open.check_exposure(local_v6).is_ok());
        let err = open.check_exposure(exposed).unwrap_err();
        assert!(err.to_string().contains("--allow-unauthenticated"), "{err}");
        let allowed = ServerConfig {
            allow_unauthenticated: true,
            ..open.clone()
        };
        assert!(allowed.check_exposure(exposed).is_ok());
        let keyed = ServerConfig {
            api_keys: vec![parse_key_flag("sk-app").unwrap()],
            ..open.clone()
        };
        assert!(keyed.check_exposure(exposed).is_ok());
        let admin_open = ServerConfig {
            admin_on_loopback: true,
            ..keyed.clone()
        };
        assert!(admin_open.check_exposure(local).is_ok());
        assert!(admin_open.check_exposure(exposed).is_err());
        let both = ServerConfig {
            admin_api_keys: vec!["sk-admin".into()],
            ..admin_open
        };
        assert!(both.check_exposure(local).is_err());
    }

    #[test]
    fn mistakes_are_reported() {
        let weights = temp_file("m.gguf", "x");
        let model = format!("m={}", weights.display());
        let twice = ServeArgs {
            models: vec![model.clone(), model.clone()],
            ..ServeArgs::default()
        };
        assert!(ServerConfig::resolve(&twice).is_err());
        let unknown_pin = ServeArgs {
            models: vec![model.clone()],
            pinned: vec!["other".into()],
            ..ServeArgs::default()
        };
        assert!(ServerConfig::resolve(&unknown_pin).is_err());
        let missing = ServeArgs {
            models: vec!["m=/nonexistent/model.gguf".into()],
            ..ServeArgs::default()
        };
        assert!(ServerConfig::resolve(&missing).is_err());
        let typo = ServeArgs {
            config: Some(temp_file("typo.toml", "prot = 1\n")),
            models: vec![model],
            ..ServeArgs::default()
        };
        assert!(ServerConfig::resolve(&typo).is_err());
    }

    #[test]
    fn the_gpu_section_of_the_file_is_read_under_the_flags() {
        let on_cpu_split = ServeArgs {
            config: Some(temp_file(
                "gpu.toml",
                "[gpu]\ndevice = \"cpu\"\ntensor_parallel_size = 2\n",
            )),
            ..ServeArgs::default()
        };
        let err = ServerConfig::resolve(&on_cpu_split).unwrap_err();
        assert!(
            err.to_string()
                .contains("--tensor-parallel-size needs --device cuda"),
            "{err}"
        );
        // A flag wins over the file.
        let overridden = ServeArgs {
            tensor_parallel_size: Some(1),
            ..on_cpu_split
        };
        assert_eq!(
            ServerConfig::resolve(&overridden).unwrap().device,
            Device::Cpu
        );
        let fp8_on_cpu = ServeArgs {
            config: Some(temp_file("gpu-fp8.toml", "[gpu]\nquantization = \"fp8\"\n")),
            ..ServeArgs::default()
        };
        let err = ServerConfig::resolve(&fp8_on_cpu).unwrap_err();
        assert!(err.to_string().contains("--quantization needs"), "{err}");
        let fp8_kv_on_cpu = ServeArgs {
            config: Some(temp_file(
                "gpu-fp8-kv.toml",
                "[gpu]\nkv_cache_dtype = \"fp8\"\n",
            )),
            ..ServeArgs::default()
        };
        let err = ServerConfig::resolve(&fp8_kv_on_cpu).unwrap_err();
        assert!(
            err.to_string().contains("--kv-cache-dtype fp8 needs"),
            "{err}"
        );
        let overlap_on_cpu = ServeArgs {
            config: Some(temp_file(
                "gpu-overlap.toml",
                "[gpu]\noverlap_steps = true\n",
            )),
            ..ServeArgs::default()
        };
        let err = ServerConfig::resolve(&overlap_on_cpu).unwrap_err();
        assert!(
            err.to_string()
                .contains("--overlap-steps needs --device cuda"),
            "{err}"
        );
        let typo = ServeArgs {
            config: Some(temp_file("gpu-typo.toml", "[gpu]\ndevise = \"cuda\"\n")),
            ..ServeArgs::default()
        };
        assert!(ServerConfig::resolve(&typo).is_err());
    }

    #[test]
    fn the_device_flags_resolve_or_say_why_not() {
        let model_config = temp_file("llama-tiny.json", "{}");
        let dummy = ServeArgs {
            device: Some(DeviceKind::Cuda),
            dummy_weights: true,
            model_config: Some(model_config.clone()),
            ..ServeArgs::default()
        };
        let on_cpu = ServeArgs {
            device: Some(DeviceKind::Cpu),
            ..dummy.clone()
        };
        let err = ServerConfig::resolve(&on_cpu).unwrap_err();
        assert!(err.to_string().contains("--device cuda"), "{err}");
        let split_on_cpu = ServeArgs {
            device: Some(DeviceKind::Cpu),
            tensor_parallel_size: Some(2),
            ..ServeArgs::default()
        };
        let err = ServerConfig::resolve(&split_on_cpu).unwrap_err();
        assert!(err.to_string().contains("needs --device cuda"), "{err}");
        let fp8_on_cpu = ServeArgs {
            device: Some(DeviceKind::Cpu),
            quantization: Some(QuantizationKind::Fp8),
            ..ServeArgs::default()
        };
        let err = ServerConfig::resolve(&fp8_on_cpu).unwrap_err();
        assert!(err.to_string().contains("--quantization needs"), "{err}");
        let fp8_kv_on_cpu = ServeArgs {
            device: Some(DeviceKind::Cpu),
            kv_cache_dtype: Some(KvCacheDtypeKind::Fp8),
            ..ServeArgs::default()
        };
        let err = ServerConfig::resolve(&fp8_kv_on_cpu).unwrap_err();
        assert!(
            err.to_string().contains("--kv-cache-dtype fp8 needs"),
            "{err}"
        );
        let auto_kv_on_cpu = ServeArgs {
            device: Some(DeviceKind::Cpu),
            kv_cache_dtype: Some(KvCacheDtypeKind::Auto),
            ..ServeArgs::default()
        };
        assert_eq!(
            ServerConfig::resolve(&auto_kv_on_cpu).unwrap().device,
            Device::Cpu
        );
        let no_ranks = ServeArgs {
            tensor_parallel_size: Some(0),
            ..dummy.clone()
        };
        let err = ServerConfig::resolve(&no_ranks).unwrap_err();
        assert!(err.to_string().contains("at least 1"), "{err}");
        if cfg!(feature = "cuda") {
            let config = ServerConfig::resolve(&dummy).unwrap();
            assert_eq!(
                config.device,
                Device::Cuda {
                    gpu_memory_fraction: 0.9,
                    dummy_weights: true,
                    batch_invariant: false,
                    overlap_steps: false,
                    tensor_parallel_size: 1,
                    fp8: false,
                    fp8_kv_cache: false,
                }
            );
            let fp8_kv = ServeArgs {
                kv_cache_dtype: Some(KvCacheDtypeKind::Fp8),
                ..dummy.clone()
            };
            assert!(matches!(
                ServerConfig::resolve(&fp8_kv).unwrap().device,
                Device::Cuda {
                    fp8_kv_cache: true,
                    ..
                }
            ));
            let fp8 = ServeArgs {
                quantization: Some(QuantizationKind::Fp8),
                ..dummy.clone()
            };
            assert!(matches!(
                ServerConfig::resolve(&fp8).unwrap().device,
                Device::Cuda { fp8: true, .. }
            ));
            let split = ServeArgs {
                tensor_parallel_size: Some(2),
                ..dummy.clone()
            };
            assert!(matches!(
                ServerConfig::resolve(&split).unwrap().device,
                Device::Cuda {
                    tensor_parallel_size: 2,
                    ..
                }
            ));
            // The model is the config file, named after it; GPU batch sizes by default.
            assert_eq!(config.models.len(), 1);
            assert_eq!(config.models[0].id, "llama-tiny");
            assert_eq!(config.models[0].path, model_config);
            assert_eq!(
                (
                    config.scheduler.max_running,
                    config.scheduler.max_batched_tokens
                ),
                (256, 8192)
            );
            let bad_fraction = ServeArgs {
                gpu_memory_fraction: Some(1.5),
                ..dummy
            };
            assert!(ServerConfig::resolve(&bad_fraction).is_err());
        } else {
            let err = ServerConfig::resolve(&dummy).unwrap_err();
            assert!(err.to_string().contains("built without cuda"), "{err}");
        }
    }

    #[test]
    fn a_cuda_build_without_a_gpu_serves_on_the_cpu_with_its_defaults() {
        if !cfg!(feature = "cuda") || crate::pool::cuda_device().is_ok() {
            return;
        }
        let args = ServeArgs {
            device: Some(DeviceKind::Cuda),
            models: vec![format!("m={}", temp_file("m.gguf", "").display())],
            ..ServeArgs::default()
        };
        let config = ServerConfig::resolve(&args).unwrap();
        assert_eq!(config.device, Device::Cpu);
        // Asked for several GPUs, it refuses instead.
        let split = ServeArgs {
            tensor_parallel_size: Some(2),
            ..args.clone()
        };
        let err = ServerConfig::resolve(&split).unwrap_err();
        assert!(
            err.to_string().contains("--tensor-parallel-size 2"),
            "{err}"
        );
        let cpu = ServerConfig::with_models(Vec::new()).scheduler;
        assert_eq!(
            (
                config.scheduler.max_running,
                config.scheduler.max_batched_tokens
            ),
            (cpu.max_running, cpu.max_batched_tokens)
        );
    }
}
