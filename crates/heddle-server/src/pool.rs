//! The model pool and its manager: model id → the engine serving it.
//!
//! Models come from the configuration and are loaded on first use; concurrent first
//! requests wait for one load (loads are serialized by one lock, and whoever gets it
//! second finds the model loaded). Pinned models are loaded at start and never evicted.
//! When loading a model would exceed the memory budget, unpinned models are unloaded
//! least recently used first — idle ones before busy ones, so that evicting rarely cuts
//! running requests short; if that cannot make room the request gets 503.
//!
//! A model's memory is estimated before loading as its weight files plus its whole KV
//! cache (`kv_blocks × block_size` positions of every layer's K and V).
//!
//! Unloading (admin call, eviction, shutdown) removes the model from the pool at once,
//! cancels its in-flight requests (their clients see the cancellation, see `api`), and
//! waits for the engine thread to stop, which frees the weights and the cache.
//!
//! Engines supervise themselves: one that panics fails its requests and reloads its
//! runner (see `engine`). One that could not reload has stopped; the pool replaces it
//! with a fresh load on the model's next use, so a model never stays dead.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use heddle_core::{RequestId, SchedulerConfig};
use heddle_model::chat_template::ChatTemplate;
use heddle_model::cpu_model::kv_bytes_per_block;
use heddle_model::tokenizer::TokenizerBundle;
use heddle_model::{load_cpu, KvSize, ModelRunner};

use crate::engine::{Engine, EngineHandle, EngineHealth, EngineOptions, RunnerFactory};
use crate::faults::FaultInjection;
use crate::kv_events::KvEventSink;
use crate::metrics::Metrics;

/// How long an unload waits for the engine thread to finish its cancelled requests.
const ENGINE_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the pool's models run.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// The first NVIDIA GPU (builds with the `cuda` feature). The KV cache takes what is
    /// left of `gpu_memory_fraction` of its memory after the weights. With
    /// `dummy_weights`, a model's path is an HF config.json-format file and its weights are
    /// random (benchmarks).
    Cuda {
        gpu_memory_fraction: f64,
        dummy_weights: bool,
        /// Each request's output independent of its batch (docs/CUDA.md).
        batch_invariant: bool,
        /// Each step queued behind the one in flight (docs/CUDA.md "Overlapped steps").
        overlap_steps: bool,
        /// GPUs each model is split over (tensor parallelism, docs/DEPLOY.md).
        tensor_parallel_size: usize,
        /// The layers' projections in FP8 (`--quantization fp8`, docs/CUDA.md).
        fp8: bool,
        /// The KV cache in FP8 (`--kv-cache-dtype fp8`, docs/CUDA.md).
        fp8_kv_cache: bool,
    },
}

/// A model the server can serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    pub id: String,
    /// A GGUF file or a Hugging Face checkpoint directory.
    pub path: PathBuf,
    /// Loaded at start and never evicted.
    pub pinned: bool,
    /// Other names requests may use for it (`--served-model-name`'s names after the
    /// first); responses and metrics use `id`.
    pub aliases: Vec<String>,
}

impl ModelSpec {
    /// Whether a request naming `name` means this model.
    pub fn answers_to(&self, name: &str) -> bool {
        self.id == name || self.aliases.iter().any(|alias| alias == name)
    }
}

/// Why the pool cannot hand out a model.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PoolError {
    #[error("the model `{0}` does not exist")]
    UnknownModel(String),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error(
        "not enough memory to load model `{model}`: it needs {needed} bytes, the budget is \
         {budget} bytes and {held} bytes are held by models that cannot be evicted (pinned)"
    )]
    OverBudget {
        model: String,
        needed: u64,
        budget: u64,
        held: u64,
    },
    #[error("model `{model}` failed to load: {reason}")]
    LoadFailed { model: String, reason: String },
}

/// A model the pool serves: its engine, chat template and bookkeeping.
pub struct ServedModel {
    pub id: String,
    pub engine: EngineHandle,
    pub chat_template: ChatTemplate,
    /// Token ids of prompts must be below it.
    pub vocab_size: usize,
    /// Longest prompt + output a request may have.
    pub max_sequence_len: usize,
    pub memory_bytes: u64,
    pub pinned: bool,
    last_used: Mutex<Instant>,
    in_flight: Mutex<HashSet<RequestId>>,
    /// Set once the pool let go of it: its requests are being cancelled.
    unloading: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl ServedModel {
    /// Registers an accepted request, so that unloading and shutdown can cancel it and
    /// dropping the returned guard (a client that left) cancels it at once.
    pub fn track(self: &Arc<Self>, id: RequestId) -> InFlight {
        self.in_flight_ids().insert(id);
        self.touch();
        InFlight {
            model: self.clone(),
            id,
            finished: false,
        }
    }

    /// Whether the pool unloaded it (eviction, admin, shutdown) while requests ran.
    pub fn is_unloading(&self) -> bool {
        self.unloading.load(Ordering::Acquire)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight_ids().len()
    }

    pub fn idle_for(&self) -> Duration {
        self.last_used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
    }

    fn touch(&self) {
        *self.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    fn in_flight_ids(&self) -> std::sync::MutexGuard<'_, HashSet<RequestId>> {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cancel_all(&self) {
        let ids: Vec<RequestId> = self.in_flight_ids().iter().copied().collect();
        for id in ids {
            self.engine.cancel(id);
        }
    }
}

/// An accepted request. Dropping it before [`InFlight::finish`] — the client left, the
/// handler's future or the response stream was dropped — cancels the request in the
/// engine right away, rather than when the engine next notices the closed channel.
pub struct InFlight {
    model: Arc<ServedModel>,
    id: RequestId,
    finished: bool,
}

impl InFlight {
    /// The engine sent the request's last event: nothing to cancel.
    pub fn finish(&mut self) {
        self.finished = true;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.model.in_flight_ids().remove(&self.id);
        self.model.touch();
        if !self.finished {
            self.model.engine.cancel(self.id);
        }
    }
}

/// What the admin list shows of a model.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelStatus {
    pub id: String,
    pub path: String,
    pub pinned: bool,
    pub loaded: bool,
    pub memory_bytes: Option<u64>,
    pub in_flight: usize,
    pub idle_seconds: Option<f64>,
    /// How many times the model was loaded since the server started.
    pub loads: u64,
}

/// Model ids → engines, with lazy loading and LRU eviction under a memory budget.
pub struct ModelPool {
    specs: Vec<ModelSpec>,
    scheduler: SchedulerConfig,
    device: Device,
    memory_budget: Option<u64>,
    loaded: Mutex<HashMap<String, Arc<ServedModel>>>,
    /// Serializes loads and evictions, so the budget is checked against a stable set.
    load_lock: tokio::sync::Mutex<()>,
    loads: Mutex<HashMap<String, u64>>,
    shutting_down: AtomicBool,
    metrics: Arc<Metrics>,
    faults: Arc<FaultInjection>,
    kv_events: Option<KvEventSink>,
}

impl ModelPool {
    /// `scheduler` is the configuration of every engine; its `max_model_len` is further
    /// capped by each model's own context length.
    pub fn new(
        specs: Vec<ModelSpec>,
        scheduler: SchedulerConfig,
        memory_budget: Option<u64>,
    ) -> Self {
        ModelPool {
            specs,
            scheduler,
            device: Device::Cpu,
            memory_budget,
            loaded: Mutex::new(HashMap::new()),
            load_lock: tokio::sync::Mutex::new(()),
            loads: Mutex::new(HashMap::new()),
            shutting_down: AtomicBool::new(false),
            metrics: Arc::new(Metrics::default()),
            faults: Arc::new(FaultInjection::default()),
            kv_events: None,
        }
    }

    /// Publishes every engine's prefix-cache changes through `sink`.
    pub fn with_kv_events(mut self, sink: KvEventSink) -> Self {
        self.kv_events = Some(sink);
        self
    }

    /// Every model's request metrics, recorded by their engines.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Faults for tests to arm in this pool's engines (see [`crate::faults`]).
    pub fn faults(&self) -> &Arc<FaultInjection> {
        &self.faults
    }

    /// The first pinned model that is not serving now (not loaded, restarting or
    /// stopped), if any: the server is not ready while there is one.
    pub fn pinned_model_not_serving(&self) -> Option<String> {
        let loaded = self.loaded_map();
        self.specs
            .iter()
            .filter(|spec| spec.pinned)
            .find(|spec| {
                loaded
                    .get(&spec.id)
                    .is_none_or(|m| m.engine.health() != EngineHealth::Running)
            })
            .map(|spec| spec.id.clone())
    }

    /// Runs the models on `device` instead of the CPU.
    pub fn with_device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// The configuration every engine's scheduler starts from.
    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler
    }

    pub fn specs(&self) -> &[ModelSpec] {
        &self.specs
    }

    /// The model a request naming `name` (its id or an alias) means.
    pub fn spec(&self, name: &str) -> Option<&ModelSpec> {
        self.specs.iter().find(|s| s.answers_to(name))
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// The loaded models, in no particular order.
    pub fn loaded_models(&self) -> Vec<Arc<ServedModel>> {
        self.loaded_map().values().cloned().collect()
    }

    /// The model's engine, loading the model first if needed.
    pub async fn acquire(&self, id: &str) -> Result<Arc<ServedModel>, PoolError> {
        if self.is_shutting_down() {
            return Err(PoolError::ShuttingDown);
        }
        let spec = self
            .spec(id)
            .ok_or_else(|| PoolError::UnknownModel(id.to_string()))?;
        let id = spec.id.as_str();
        if let Some(model) = self.serving(id) {
            return Ok(model);
        }
        let _load = self.load_lock.lock().await;
        if self.is_shutting_down() {
            return Err(PoolError::ShuttingDown);
        }
        if let Some(model) = self.serving(id) {
            return Ok(model);
        }
        // Loaded but stopped: its engine could not restart after a panic.
        if self.unload_locked(id).await {
            tracing::warn!(model = %id, "replacing a stopped engine with a fresh load");
        }
        self.load_locked(spec).await
    }

    /// Loads every pinned model; the server is ready once they are.
    pub async fn load_pinned(&self) -> Result<(), PoolError> {
        for spec in self.specs.iter().filter(|s| s.pinned) {
            self.acquire(&spec.id).await?;
        }
        Ok(())
    }

    /// Unloads a model (admin call); false if it was not loaded.
    pub async fn unload(&self, name: &str) -> Result<bool, PoolError> {
        let Some(spec) = self.spec(name) else {
            return Err(PoolError::UnknownModel(name.to_string()));
        };
        let _load = self.load_lock.lock().await;
        Ok(self.unload_locked(&spec.id).await)
    }

    /// Refuses new requests from now on (they get 503).
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    /// Cancels every in-flight request of every model (end of the shutdown grace period).
    pub fn cancel_all_requests(&self) {
        for model in self.loaded_models() {
            model.cancel_all();
        }
    }

    /// In-flight requests over all models.
    pub fn in_flight(&self) -> usize {
        self.loaded_models().iter().map(|m| m.in_flight()).sum()
    }

    /// Stops every engine (after shutdown).
    pub async fn unload_all(&self) {
        let _load = self.load_lock.lock().await;
        let ids: Vec<String> = self.loaded_map().keys().cloned().collect();
        for id in ids {
            self.unload_locked(&id).await;
        }
    }

    pub fn status(&self) -> Vec<ModelStatus> {
        let loaded = self.loaded_map().clone();
        let loads = self.loads.lock().unwrap_or_else(|e| e.into_inner()).clone();
        self.specs
            .iter()
            .map(|spec| {
                let model = loaded.get(&spec.id);
                ModelStatus {
                    id: spec.id.clone(),
                    path: spec.path.display().to_string(),
                    pinned: spec.pinned,
                    loaded: model.is_some(),
                    memory_bytes: model.map(|m| m.memory_bytes),
                    in_flight: model.map_or(0, |m| m.in_flight()),
                    idle_seconds: model.map(|m| m.idle_for().as_secs_f64()),
                    loads: loads.get(&spec.id).copied().unwrap_or(0),
                }
            })
            .collect()
    }

    /// Memory held by loaded models, by the pool's estimate.
    pub fn loaded_bytes(&self) -> u64 {
        self.loaded_map().values().map(|m| m.memory_bytes).sum()
    }

    pub fn memory_budget(&self) -> Option<u64> {
        self.memory_budget
    }

    /// The loaded model `id`, unless its engine has stopped.
    fn serving(&self, id: &str) -> Option<Arc<ServedModel>> {
        let model = self.loaded_map().get(id)?.clone();
        if model.engine.health() == EngineHealth::Stopped {
            return None;
        }
        model.touch();
        Some(model)
    }

    fn loaded_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<ServedModel>>> {
        self.loaded.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn load_locked(&self, spec: &ModelSpec) -> Result<Arc<ServedModel>, PoolError> {
        let load_failed = |error: anyhow::Error| PoolError::LoadFailed {
            model: spec.id.clone(),
            reason: format!("{error:#}"),
        };
        let (path, scheduler) = (spec.path.clone(), self.scheduler.clone());
        // The budget is host memory; a GPU model's weights and cache live on the device.
        let needed = match self.device {
            Device::Cpu => run_blocking(move || estimate_memory(&path, &scheduler))
                .await
                .map_err(load_failed)?,
            Device::Cuda { .. } => 0,
        };
        if let Some(budget) = self.memory_budget {
            let residents: Vec<Resident> = self
                .loaded_map()
                .values()
                .map(|m| Resident {
                    id: m.id.clone(),
                    bytes: m.memory_bytes,
                    pinned: m.pinned,
                    busy: m.in_flight() > 0,
                    idle_for: m.idle_for(),
                })
                .collect();
            let victims = choose_evictions(&residents, needed, budget).ok_or_else(|| {
                PoolError::OverBudget {
                    model: spec.id.clone(),
                    needed,
                    budget,
                    held: residents.iter().filter(|r| r.pinned).map(|r| r.bytes).sum(),
                }
            })?;
            for victim in victims {
                tracing::info!(model = %victim, for_model = %spec.id, "evicting model to make room");
                self.unload_locked(&victim).await;
            }
        }

        tracing::info!(model = %spec.id, path = %spec.path.display(), bytes = needed, "loading model");
        let started = Instant::now();
        let (owned_spec, scheduler, device) = (spec.clone(), self.scheduler.clone(), self.device);
        let options = EngineOptions {
            metrics: self.metrics.model(&spec.id),
            faults: self.faults.clone(),
            reload: Some(reloader(spec.clone(), self.scheduler.clone(), device)),
            kv_events: self.kv_events.clone(),
        };
        let model =
            run_blocking(move || load_model(&owned_spec, &scheduler, device, needed, options))
                .await
                .map_err(load_failed)?;
        tracing::info!(
            model = %spec.id,
            seconds = started.elapsed().as_secs_f64(),
            max_sequence_len = model.max_sequence_len,
            "model loaded"
        );
        let model = Arc::new(model);
        self.loaded_map().insert(spec.id.clone(), model.clone());
        *self
            .loads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(spec.id.clone())
            .or_default() += 1;
        Ok(model)
    }

    async fn unload_locked(&self, id: &str) -> bool {
        let Some(model) = self.loaded_map().remove(id) else {
            return false;
        };
        tracing::info!(model = %id, in_flight = model.in_flight(), "unloading model");
        model.unloading.store(true, Ordering::Release);
        model.cancel_all();
        let thread = model
            .thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        // The engine stops once the last handle is gone: ours now, the handlers' as
        // their cancelled requests end.
        drop(model);
        if let Some(thread) = thread {
            let joined = tokio::time::timeout(
                ENGINE_STOP_TIMEOUT,
                tokio::task::spawn_blocking(move || thread.join()),
            )
            .await;
            if joined.is_err() {
                tracing::warn!(model = %id, "engine still running after unload; continuing");
            }
        }
        true
    }
}

async fn run_blocking<T: Send + 'static>(
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .context("the loading task panicked")?
}

/// A loaded model as eviction sees it.
#[derive(Debug, Clone)]
struct Resident {
    id: String,
    bytes: u64,
    pinned: bool,
    busy: bool,
    idle_for: Duration,
}

/// The models to unload so that `needed` more bytes fit in `budget`: unpinned ones, idle
/// before busy, least recently used first. None when even evicting all of them is not
/// enough.
fn choose_evictions(residents: &[Resident], needed: u64, budget: u64) -> Option<Vec<String>> {
    let mut used: u64 = residents.iter().map(|r| r.bytes).sum();
    if used.saturating_add(needed) <= budget {
        return Some(Vec::new());
    }
    let mut candidates: Vec<&Resident> = residents.iter().filter(|r| !r.pinned).collect();
    candidates.sort_by(|a, b| a.busy.cmp(&b.busy).then(b.idle_for.cmp(&a.idle_for)));
    let mut victims = Vec::new();
    for candidate in candidates {
        used -= candidate.bytes;
        victims.push(candidate.id.clone());
        if used.saturating_add(needed) <= budget {
            return Some(victims);
        }
    }
    None
}

/// A model's memory before loading it: its weight files plus its KV cache.
pub fn estimate_memory(path: &Path, scheduler: &SchedulerConfig) -> anyhow::Result<u64> {
    let weights = weight_bytes(path)?;
    let config = heddle_model::loader::open(path)
        .with_context(|| format!("reading {}", path.display()))?
        .config;
    let kv_cache = scheduler.num_blocks * kv_bytes_per_block(&config, scheduler.block_size);
    Ok(weights + kv_cache as u64)
}

fn weight_bytes(path: &Path) -> anyhow::Result<u64> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if !meta.is_dir() {
        return Ok(meta.len());
    }
    let mut total = 0;
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        if entry.path().extension().is_some_and(|e| e == "safetensors") {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}

/// A runner ready for an engine, with its tokenizer and KV block count.
struct Runner {
    runner: Box<dyn ModelRunner>,
    text: TokenizerBundle,
    num_blocks: usize,
}

fn load_runner(spec: &ModelSpec, base: &SchedulerConfig, device: Device) -> anyhow::Result<Runner> {
    #[cfg(not(feature = "cuda"))]
    if let Device::Cuda { .. } = device {
        anyhow::bail!("this heddle was built without cuda (rebuild with `--features cuda`)");
    }
    #[cfg(feature = "cuda")]
    if let Device::Cuda {
        dummy_weights,
        tensor_parallel_size,
        fp8,
        fp8_kv_cache,
        ..
    } = device
    {
        // Only a model asked for nothing the CPU cannot do falls back to it.
        let cpu_can_serve = !dummy_weights && tensor_parallel_size == 1 && !fp8 && !fp8_kv_cache;
        match cuda::load(spec, base, device) {
            Ok(runner) => return Ok(runner),
            Err(cuda::LoadError::NoDevice(why)) if cpu_can_serve => {
                tracing::warn!(model = %spec.id, "{why:#}; running on the CPU instead");
            }
            Err(cuda::LoadError::NoDevice(error) | cuda::LoadError::Failed(error)) => {
                return Err(error)
            }
        }
    }
    let loaded = load_cpu(&spec.path, KvSize::Blocks(base.num_blocks), base.block_size)?;
    Ok(Runner {
        runner: Box::new(loaded.runner),
        text: loaded.text,
        num_blocks: loaded.num_blocks,
    })
}

/// How an engine reloads its runner after a panic: as the pool first loaded it.
fn reloader(spec: ModelSpec, base: SchedulerConfig, device: Device) -> RunnerFactory {
    Box::new(move || {
        tracing::info!(model = %spec.id, "reloading model");
        let loaded = load_runner(&spec, &base, device)?;
        Ok((loaded.runner, loaded.num_blocks))
    })
}

fn load_model(
    spec: &ModelSpec,
    base: &SchedulerConfig,
    device: Device,
    memory_bytes: u64,
    options: EngineOptions,
) -> anyhow::Result<ServedModel> {
    let loaded = load_runner(spec, base, device)?;
    let model_config = loaded.runner.config();
    let scheduler = SchedulerConfig {
        max_model_len: base.max_model_len.min(model_config.max_position_embeddings),
        num_blocks: loaded.num_blocks,
        ..base.clone()
    };
    let max_sequence_len = scheduler.max_sequence_len();
    let vocab_size = model_config.vocab_size;
    let (engine, thread) = Engine::spawn_with(
        &spec.id,
        loaded.runner,
        Arc::new(loaded.text.tokenizer),
        scheduler,
        options,
    )?;
    Ok(ServedModel {
        id: spec.id.clone(),
        engine,
        chat_template: loaded.text.chat_template,
        vocab_size,
        max_sequence_len,
        memory_bytes,
        pinned: spec.pinned,
        last_used: Mutex::new(Instant::now()),
        in_flight: Mutex::new(HashSet::new()),
        unloading: AtomicBool::new(false),
        thread: Mutex::new(Some(thread)),
    })
}

/// The GPU's name, or why `--device cuda` cannot use one here.
pub fn cuda_device() -> anyhow::Result<String> {
    #[cfg(feature = "cuda")]
    return heddle_cuda::probe_device();
    #[cfg(not(feature = "cuda"))]
    anyhow::bail!("this heddle was built without cuda (rebuild with `--features cuda`)")
}

/// Loading on the GPU, or saying why not.
#[cfg(feature = "cuda")]
mod cuda {
    use super::{Device, ModelSpec, Runner, SchedulerConfig};

    pub enum LoadError {
        /// No GPU, driver or CUDA library here.
        NoDevice(anyhow::Error),
        Failed(anyhow::Error),
    }

    /// Loads `spec` on the GPU as `device` (a `Device::Cuda`) says.
    pub fn load(
        spec: &ModelSpec,
        base: &SchedulerConfig,
        device: Device,
    ) -> Result<Runner, LoadError> {
        use anyhow::Context;
        use heddle_cuda::{
            dummy, CudaOptions, CudaRunner, KvBudget, KvCacheDtype, Quantization, TensorParallel,
            WeightSource,
        };
        let Device::Cuda {
            gpu_memory_fraction,
            dummy_weights,
            batch_invariant,
            overlap_steps,
            tensor_parallel_size,
            fp8,
            fp8_kv_cache,
        } = device
        else {
            return Err(LoadError::Failed(anyhow::anyhow!(
                "not a GPU device: {device:?}"
            )));
        };
        use heddle_model::tokenizer::TokenizerBundle;
        use heddle_model::ModelConfig;

        heddle_cuda::probe_device().map_err(LoadError::NoDevice)?;
        let prepare = || -> anyhow::Result<Runner> {
            let (config, source, text) = if dummy_weights {
                let config = dummy::read_config(&spec.path)?;
                let text = dummy::tokenizer_bundle(config.vocab_size)?;
                (config, WeightSource::Dummy { seed: 0 }, text)
            } else if !spec.path.is_dir() {
                // A GGUF file (the embedded model among them): dequantized on load, its
                // own tokenizer and chat template.
                let content = heddle_model::loader::read_gguf(&spec.path)?;
                let config = ModelConfig::from_gguf(&content)?;
                let text = TokenizerBundle::from_gguf(&content)?;
                (config, WeightSource::Gguf(spec.path.clone()), text)
            } else {
                let config_path = spec.path.join("config.json");
                let text = std::fs::read_to_string(&config_path)
                    .with_context(|| format!("reading {}", config_path.display()))?;
                let config = ModelConfig::from_hf_json(&text)?;
                let bundle = TokenizerBundle::from_hf_dir(&spec.path)?;
                (config, WeightSource::Checkpoint(spec.path.clone()), bundle)
            };
            let runner = CudaRunner::new(
                config,
                &source,
                CudaOptions {
                    block_size: base.block_size,
                    max_batched_tokens: base.max_batched_tokens,
                    max_running: base.max_running,
                    kv: KvBudget::MemoryFraction(gpu_memory_fraction),
                    batch_invariant,
                    overlap_steps,
                    tensor_parallel: TensorParallel::across_gpus(tensor_parallel_size),
                    quantization: if fp8 {
                        Quantization::Fp8
                    } else {
                        Quantization::None
                    },
                    kv_cache_dtype: if fp8_kv_cache {
                        KvCacheDtype::Fp8
                    } else {
                        KvCacheDtype::Auto
                    },
                    ..CudaOptions::default()
                },
            )?;
            Ok(Runner {
                num_blocks: runner.num_blocks(),
                runner: Box::new(runner),
                text,
            })
        };
        prepare().map_err(LoadError::Failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resident(id: &str, bytes: u64, pinned: bool, busy: bool, idle_secs: u64) -> Resident {
        Resident {
            id: id.into(),
            bytes,
            pinned,
            busy,
            idle_for: Duration::from_secs(idle_secs),
        }
    }

    #[test]
    fn nothing_is_evicted_when_the_model_fits() {
        let residents = [resident("a", 40, false, false, 5)];
        assert_eq!(choose_evictions(&residents, 60, 100), Some(vec![]));
    }

    #[test]
    fn the_least_recently_used_go_first_and_only_as_many_as_needed() {
        let residents = [
            resident("recent", 40, false, false, 1),
            resident("old", 40, false, false, 100),
            resident("older", 10, false, false, 200),
        ];
        assert_eq!(
            choose_evictions(&residents, 40, 100),
            Some(vec!["older".to_string(), "old".to_string()])
        );
    }

    #[test]
    fn idle_models_go_before_busy_ones_and_pinned_never() {
        let residents = [
            resident("busy", 50, false, true, 300),
            resident("idle", 30, false, false, 1),
            resident("pinned", 20, true, false, 900),
        ];
        assert_eq!(
            choose_evictions(&residents, 30, 100),
            Some(vec!["idle".to_string()])
        );
        assert_eq!(
            choose_evictions(&residents, 60, 100),
            Some(vec!["idle".to_string(), "busy".to_string()])
        );
        assert_eq!(choose_evictions(&residents, 90, 100), None);
    }
}
