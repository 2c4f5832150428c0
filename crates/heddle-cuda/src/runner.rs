//! The CUDA model runner: a Llama-family forward pass over a flat batch of prefill chunks
//! and decode tokens, the paged KV cache in GPU memory, and sampling on the device.
//!
//! One step is: one host→device copy of the step's packed metadata, the kernels and GEMMs
//! of every layer queued on one stream, the sampler, and one device→host copy of the
//! sampled ids (and log-probabilities when asked for), which is the step's only wait.
//! A step whose logits are adjusted (logit biases, grammar masks) queues the forward
//! pass, waits on the host for the masks while the GPU runs it, then copies them and
//! queues the sampler: still one wait. Prompt tokens scored for requests that ask for
//! prompt log-probabilities are scored after the sampler, a piece of rows at a time
//! through the logits buffer, and copied back after the sampled ids.
//!
//! Under tensor parallelism (tensor_parallel.rs) the model is split over ranks, each with
//! its slice of the weights and of the KV cache (its KV heads), and each step runs on every
//! rank: the host queues the part of the step up to the next collective on each rank in
//! turn, then the collective (collective.rs), and so on through the layers; with
//! peer-to-peer sums (peer_sums.rs) the collective is inside the next norm, queued on every
//! rank before any rank's next work. The logits are gathered on rank 0, which samples,
//! scores and copies the results back (plain greedy steps with peer-to-peer sums instead
//! pick each row's token from the ranks' own slices); the scheduler and the step's metadata
//! are the same for every rank.
//!
//! Steps can also be queued one behind another (overlap.rs): the host plans and queues
//! step N + 1 while the GPU computes step N, and a token that step N samples reaches step
//! N + 1's input on the GPU.

mod overlap;

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use heddle_core::{ScheduledBatch, SequenceTokens};
use heddle_model::logits_processing::{PendingAdjustments, StepAdjustments};
use heddle_model::runner::{
    BatchLimits, ModelRunner, OverlappedSteps, PromptTokenLogprobs, SampledOutput,
};
use heddle_model::{ModelConfig, ModelError};

use crate::collective::{Collective, Part};
use crate::fp8::Fp8Tensor;
use crate::gpu::{grid, DeviceBuffer, Gpu, StagingBuffer};
use crate::kernels::{
    decode_splits, DType, KernelShape, KvCacheDtype, ATTENTION_THREADS, MAX_TOP_LOGPROBS,
    SAMPLE_THREADS, SCORE_WORDS,
};
use crate::memory::{blocks_for_fraction, kv_bytes_per_block};
use crate::peer_sums::{PeerSums, Slot};
use crate::plan::{Padding, SampledRow, StepPlan};
use crate::tensor_parallel::{AllReduce, Partition, RankPlacement, TensorParallel};
use crate::weights::{Dims, Matrix, Weights};

/// Where the weights come from.
#[derive(Debug, Clone, PartialEq)]
pub enum WeightSource {
    /// An HF checkpoint directory (config.json and safetensors).
    Checkpoint(PathBuf),
    /// A GGUF file (dequantized on load).
    Gguf(PathBuf),
    /// Random weights made on the GPU, for benchmarks.
    Dummy { seed: u64 },
}

/// How much KV cache to allocate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvBudget {
    /// Blocks fill what is left of this fraction of GPU memory after weights and buffers.
    MemoryFraction(f64),
    /// Exactly this many blocks.
    Blocks(usize),
}

#[derive(Debug, Clone, PartialEq)]
pub struct CudaOptions {
    pub dtype: DType,
    pub block_size: usize,
    /// Most tokens in one step (the scheduler's max_batched_tokens).
    pub max_batched_tokens: usize,
    /// Most sequences in one step (the scheduler's max_running).
    pub max_running: usize,
    pub kv: KvBudget,
    /// Replay decode steps as CUDA graphs (one per padded batch size), which saves the
    /// host most of a step's ~10 launches per layer.
    pub cuda_graphs: bool,
    /// Make a request's results independent of what else is in its steps: GEMM
    /// algorithms pinned per weight shape (cuBLASLt, no split-K), and every attention
    /// tile through the one kernel whose per-row order does not depend on the tiling (no
    /// decode kernel, so no batch-dependent split of contexts). Costs speed; see
    /// docs/CUDA.md.
    pub batch_invariant: bool,
    /// Offer overlapped steps ([`ModelRunner::overlapped`]): the engine then queues each
    /// step behind the one in flight (runner/overlap.rs). Off by default until measured
    /// on a GPU.
    pub overlap_steps: bool,
    /// How many ranks the model is split over, and where they run (one rank by default).
    pub tensor_parallel: TensorParallel,
    /// How the layers' projections are stored and multiplied.
    pub quantization: Quantization,
    /// What the KV cache holds.
    pub kv_cache_dtype: KvCacheDtype,
}

/// How the layers' projections (Q·K·V, O, gate·up, down) are stored and multiplied; the
/// embeddings, norms and LM head stay in the runner's dtype.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Quantization {
    /// As loaded, in the runner's dtype.
    #[default]
    None,
    /// FP8 E4M3, each weight matrix with one scale, quantized at load; a step's activations
    /// quantized with one scale before each projection (`--quantization fp8`; compute
    /// capability 8.9+).
    Fp8,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            dtype: DType::Bf16,
            block_size: 16,
            max_batched_tokens: 8192,
            max_running: 256,
            kv: KvBudget::MemoryFraction(0.9),
            cuda_graphs: true,
            batch_invariant: false,
            overlap_steps: false,
            tensor_parallel: TensorParallel::default(),
            quantization: Quantization::None,
            kv_cache_dtype: KvCacheDtype::Auto,
        }
    }
}

/// Where steps' wall time went, summed until taken: the host's packing and queueing of
/// the work, and the wait for the GPU to finish it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTimes {
    pub steps: usize,
    pub host_seconds: f64,
    /// Of the host's time: planning the steps and copying their metadata to the GPUs
    /// (the rest is queueing the work: launches, or graph launches).
    pub pack_seconds: f64,
    pub wait_seconds: f64,
}

/// One rank's activations of a step, sized for the largest step.
struct Buffers {
    /// The residual stream in f32: [tokens, hidden].
    residual: DeviceBuffer,
    /// Normalised activations: [tokens, hidden].
    normed: DeviceBuffer,
    qkv: DeviceBuffer,
    attention: DeviceBuffer,
    /// Output of the attention and MLP output projections: [tokens, hidden].
    projected: DeviceBuffer,
    gate_up: DeviceBuffer,
    activated: DeviceBuffer,
    inv_freq: DeviceBuffer,
    /// Decode attention's per-range results when contexts are split.
    partials: DeviceBuffer,
    /// With several ranks, the f32 logits of the rank's vocabulary slice, [rows, vocab /
    /// ranks], before they are gathered; one rank writes the runner's logits directly.
    vocab_logits: Option<DeviceBuffer>,
}

/// One rank: its slice of the model, its activations and its slice of the KV cache (its
/// KV heads of every block).
struct Rank {
    /// Its place among the ranks.
    index: usize,
    /// Its GPU, in `CudaRunner::gpus`.
    device: usize,
    /// The first token id of its vocabulary slice.
    first_token: usize,
    weights: Weights,
    buffers: Buffers,
    k_cache: DeviceBuffer,
    v_cache: DeviceBuffer,
    /// With FP8 projections: a step's activations quantized before each projection.
    fp8_activations: Option<Fp8Tensor>,
    /// On a GPU other than rank 0's: the ids that greedy sampling over the ranks' slices
    /// writes here too, where the next overlapped step takes its pending tokens from.
    sampled_ids: Option<DeviceBuffer>,
}

pub struct CudaRunner {
    /// Captured decode steps by layout, one graph per GPU; they bake in the buffers'
    /// addresses, so they are dropped whenever a buffer is reallocated.
    /// The sampler is in a graph unless the step's logits are adjusted first.
    /// Keyed by layout, whether the sampler runs, and whether it samples greedily over the
    /// ranks' logits slices.
    graphs: HashMap<(Padding, bool, bool), Vec<DecodeGraph>>,
    collective: Collective,
    /// The GPUs the ranks run on, rank 0's first: it samples and holds the step's results.
    gpus: Vec<Gpu>,
    ranks: Vec<Rank>,
    /// The whole model.
    config: ModelConfig,
    /// The part of it each rank holds (the whole model with one rank).
    shard: ModelConfig,
    /// The shard's kernel shape.
    shape: KernelShape,
    options: CudaOptions,
    num_blocks: usize,
    plan: StepPlan,
    /// The step's packed metadata, one copy per GPU; grows as needed.
    metadata: Vec<DeviceBuffer>,
    /// Page-locked copies of the metadata that the copies to the GPUs start from, two per
    /// GPU taken in turn: a step may be queued while the one before it still waits for
    /// its copy (overlapped stepping).
    metadata_staging: Vec<[StagingBuffer; 2]>,
    staging_turn: usize,
    /// Steps launched and not yet collected (overlapped stepping).
    overlap: overlap::Launched,
    /// The rest is on rank 0's GPU. The f32 logits of the sampled (or scored) rows,
    /// [rows, vocab].
    logits: DeviceBuffer,
    /// Sampler output: ids, log-probabilities, top log-probabilities.
    sampled: DeviceBuffer,
    /// The penalised tokens' original logits; grows as needed.
    originals: DeviceBuffer,
    /// The step's logit biases and grammar masks (see crate::adjustments); grows as
    /// needed. Only steps with adjustments read it, and their sampler runs outside any
    /// graph, so growing it never invalidates one.
    adjustments: DeviceBuffer,
    /// Where the adjustments are packed and copied from: page-locked, so that the copy
    /// is queued behind the forward pass instead of waiting for it.
    adjustments_staging: StagingBuffer,
    host_sampled: Vec<i32>,
    /// The scored prompt tokens' log-probabilities (see `score_tokens`); grows as needed.
    scores: DeviceBuffer,
    host_scores: Vec<i32>,
    /// The prompt log-probabilities of the last step, until the engine takes them.
    prompt_logprobs: Vec<PromptTokenLogprobs>,
    times: StepTimes,
    /// cuBLAS's workspaces (one per GPU), set explicitly so that GEMMs can be captured in
    /// graphs.
    _blas_workspaces: Vec<DeviceBuffer>,
}

/// A captured decode step.
struct DecodeGraph(cudarc::driver::CudaGraph);

// SAFETY: CUDA graph handles may be used from any thread, one thread at a time; a graph
// is only used through its runner's `&mut self`, so by one thread at a time.
unsafe impl Send for DecodeGraph {}

/// Metadata words and penalty entries the buffers hold at first; they grow on demand.
const INITIAL_METADATA_WORDS: usize = 1 << 20;
const INITIAL_PENALTIES: usize = 1 << 18;
const BLAS_WORKSPACE_BYTES: usize = 32 << 20;
/// Steps of up to this many tokens (or `max_running`, if more) sum peer-to-peer under
/// tensor parallelism over more than two ranks (`AllReduce`); larger ones through NCCL,
/// whose ring moves fewer bytes for large messages there.
const PEER_SUM_MIN_TOKENS: usize = 512;

/// Words the sampler writes per row besides the id: log-prob and top (id, log-prob) pairs.
const SAMPLED_WORDS_PER_ROW: usize = 2 + 2 * MAX_TOP_LOGPROBS;

impl CudaRunner {
    /// Opens the GPUs, compiles the kernels, loads or makes the weights (each rank's
    /// slice), and sizes the KV cache. Refuses a tensor-parallel size the model's shape or
    /// the machine's GPUs do not allow.
    pub fn new(
        config: ModelConfig,
        source: &WeightSource,
        mut options: CudaOptions,
    ) -> anyhow::Result<Self> {
        let started = std::time::Instant::now();
        let parallel = options.tensor_parallel;
        let partition = Partition::new(&config, parallel.size)?;
        let shard = partition.shard_config(&config);
        let shape = KernelShape {
            kv_cache: options.kv_cache_dtype,
            ..KernelShape::new(&shard, options.block_size, options.dtype)?
        };
        anyhow::ensure!(
            options.kv_cache_dtype == KvCacheDtype::Auto || options.dtype == DType::Bf16,
            "--kv-cache-dtype fp8 runs with bf16 activations"
        );
        let rank_ordinals = parallel.devices(crate::gpu::device_count()?)?;
        // One `Gpu` per device, in order of first use: rank 0's is first.
        let mut ordinals: Vec<usize> = Vec::new();
        for &ordinal in &rank_ordinals {
            if !ordinals.contains(&ordinal) {
                ordinals.push(ordinal);
            }
        }
        let mut gpus = ordinals
            .iter()
            .map(|&ordinal| Gpu::on_device(ordinal, &shape))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let rank_devices: Vec<usize> = rank_ordinals
            .iter()
            .map(|o| ordinals.iter().position(|p| p == o).unwrap_or(0))
            .collect();
        let rank_gpus: Vec<&Gpu> = rank_devices.iter().map(|&g| &gpus[g]).collect();
        // An FP8 checkpoint is served in FP8 where the GPU and the mode allow it (its
        // projections requantized with one scale each, as `--quantization fp8` does:
        // fused Q·K·V and gate·up take one scale for what the file scaled apart);
        // elsewhere its widened values run in the runner's dtype.
        if config.fp8_checkpoint && options.quantization == Quantization::None {
            let fp8_capable = gpus.iter().all(Gpu::has_fp8);
            if fp8_capable && options.dtype == DType::Bf16 && !options.batch_invariant {
                tracing::info!("an FP8 checkpoint: its projections run in FP8");
                options.quantization = Quantization::Fp8;
            } else {
                tracing::warn!(
                    "an FP8 checkpoint widened to {:?}: FP8 projections need bf16, compute \
                     capability 8.9 and no batch-invariant mode",
                    options.dtype
                );
            }
        }
        anyhow::ensure!(
            options.quantization == Quantization::None
                || (options.dtype == DType::Bf16 && !options.batch_invariant),
            "--quantization fp8 runs with bf16 activations and without the batch-invariant mode"
        );
        if options.kv_cache_dtype == KvCacheDtype::Fp8 {
            for gpu in &gpus {
                gpu.ensure_fp8("--kv-cache-dtype fp8")?;
            }
        }
        let mut weights = match source {
            WeightSource::Checkpoint(dir) => Weights::load(&rank_gpus, &config, &partition, dir)?,
            WeightSource::Gguf(path) => {
                let content = heddle_model::loader::read_gguf(path)?;
                Weights::load_gguf(&rank_gpus, &config, &partition, path, &content)?
            }
            WeightSource::Dummy { seed } => rank_gpus
                .iter()
                .enumerate()
                .map(|(rank, gpu)| Weights::dummy(gpu, &config, &partition, rank, *seed))
                .collect::<anyhow::Result<Vec<_>>>()?,
        };
        if options.quantization == Quantization::Fp8 {
            for (w, gpu) in weights.iter_mut().zip(&rank_gpus) {
                w.quantize_fp8(gpu, &shard)?;
            }
        }
        let weights_bytes: usize = weights.iter().map(Weights::size_in_bytes).sum();
        let ranks_buffers = rank_gpus
            .iter()
            .zip(&weights)
            .map(|(gpu, w)| Self::buffers_for(gpu, &shape, &shard, &options, w, parallel.size))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let first = &gpus[0];
        let rows = options.max_running.min(options.max_batched_tokens);
        let logits = first.alloc(rows * config.vocab_size * 4)?;
        let sampled = first.alloc(rows * SAMPLED_WORDS_PER_ROW * 4)?;
        let metadata = gpus
            .iter()
            .map(|gpu| gpu.alloc(INITIAL_METADATA_WORDS * 4))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let originals = first.alloc(INITIAL_PENALTIES * 4)?;
        let adjustments = first.alloc(4096)?;
        let scores = first.alloc(4096)?;
        let adjustments_staging = first.alloc_staging(1024)?;
        let mut blas_workspaces = Vec::with_capacity(gpus.len());
        for gpu in &mut gpus {
            let workspace = gpu.alloc(BLAS_WORKSPACE_BYTES)?;
            gpu.set_blas_workspace(&workspace)?;
            if options.batch_invariant {
                gpu.pin_gemm_algorithms(options.max_batched_tokens, &workspace)?;
            }
            if options.quantization == Quantization::Fp8 {
                gpu.enable_fp8(&workspace)?;
            }
            blas_workspaces.push(workspace);
        }
        let collective = match (parallel.size, parallel.placement, parallel.all_reduce) {
            (1, _, _) => Collective::Single,
            (_, _, AllReduce::SkippedForTiming) => Collective::SkippedForTiming,
            (_, RankPlacement::AllOnFirstGpu, _) => Collective::SameStream,
            (ranks, RankPlacement::OneGpuEach, all_reduce) => {
                // Rank 0 receives the other ranks' logits slices before placing them.
                let gather_bytes = (ranks - 1) * rows * shard.vocab_size * 4;
                let gpus: Vec<&Gpu> = gpus.iter().collect();
                let mut collective = Collective::nccl(&gpus, gather_bytes)?;
                // Every decode step (at most `rows` tokens) and small prefill chunks; with
                // two ranks, every step (see `AllReduce::PeerToPeer`).
                let small_steps = rows.max(PEER_SUM_MIN_TOKENS);
                let peer_tokens = match all_reduce {
                    AllReduce::PeerToPeer if ranks == 2 => Some(options.max_batched_tokens),
                    AllReduce::PeerToPeer | AllReduce::PeerToPeerForSmallSteps => Some(small_steps),
                    AllReduce::Nccl | AllReduce::SkippedForTiming => None,
                };
                if let Some(tokens) = peer_tokens {
                    let tokens = tokens.min(options.max_batched_tokens);
                    let peer = PeerSums::new(&gpus, config.hidden_size, tokens, options.dtype)?;
                    if let Some(peer) = peer {
                        collective.add_peer_sums(peer)?;
                    }
                }
                collective
            }
        };
        // The KV cache: the same number of blocks on every rank, as many as the GPU with
        // the least room holds (all ranks' slices, where they share a GPU).
        let per_block = kv_bytes_per_block(&shard, options.block_size, shape.kv_element_bytes());
        let mut tightest = None;
        for (g, gpu) in gpus.iter().enumerate() {
            let ranks_here = rank_devices.iter().filter(|&&d| d == g).count();
            let (free, total) = gpu.memory()?;
            let blocks = match options.kv {
                KvBudget::Blocks(n) => n,
                KvBudget::MemoryFraction(f) => {
                    blocks_for_fraction(free, total, f, per_block * ranks_here)
                }
            };
            if tightest.is_none_or(|(fewest, _, _, _)| blocks < fewest) {
                tightest = Some((blocks, free, total, gpu.ctx.ordinal()));
            }
        }
        let (num_blocks, free, total, ordinal) = tightest.context("no GPU")?;
        anyhow::ensure!(
            num_blocks > 0,
            "no GPU memory left for the KV cache ({} MiB free of {} MiB on GPU {ordinal} after \
             {} MiB of weights); raise --gpu-memory-fraction or lower --max-batched-tokens",
            free >> 20,
            total >> 20,
            weights_bytes >> 20
        );
        // One block more than the scheduler gets: the scratch block that the stand-in
        // sequences of padded decode steps write to.
        let half_cache = (num_blocks + 1) * per_block / 2;
        let mut ranks = Vec::with_capacity(parallel.size);
        let placed = weights.into_iter().zip(ranks_buffers).zip(&rank_devices);
        for (index, ((weights, buffers), &device)) in placed.enumerate() {
            let gpu = &gpus[device];
            ranks.push(Rank {
                index,
                device,
                first_token: partition.vocab_rows(index).start,
                weights,
                buffers,
                k_cache: gpu.alloc(half_cache).context("allocating the KV cache")?,
                v_cache: gpu.alloc(half_cache).context("allocating the KV cache")?,
                fp8_activations: match options.quantization {
                    Quantization::None => None,
                    Quantization::Fp8 => {
                        let d = Dims::of(&shard);
                        let widest = d.hidden.max(d.q).max(d.ffn);
                        Some(Fp8Tensor::alloc(gpu, options.max_batched_tokens * widest)?)
                    }
                },
                sampled_ids: match device {
                    0 => None,
                    _ => Some(gpu.alloc(rows * 4)?),
                },
            });
        }
        if options.quantization == Quantization::Fp8 {
            let timing = std::time::Instant::now();
            for rank in &ranks {
                time_fp8_choices(&gpus[rank.device], rank, &shard, options.max_batched_tokens)?;
            }
            tracing::info!(
                seconds = timing.elapsed().as_secs_f64(),
                "timed the FP8 GEMMs' kernels for prefill-sized steps"
            );
        }
        for gpu in &gpus {
            gpu.stream.synchronize().context("preparing the GPU")?;
        }
        tracing::info!(
            device = %gpus[0].name,
            dtype = ?options.dtype,
            kv_cache_dtype = ?options.kv_cache_dtype,
            seconds = started.elapsed().as_secs_f64(),
            weights_mib = weights_bytes >> 20,
            kv_blocks = num_blocks,
            block_size = options.block_size,
            kv_cache_mib = (2 * half_cache * parallel.size) >> 20,
            kv_tokens = num_blocks * options.block_size,
            gpu_total_mib = total >> 20,
            batch_invariant = options.batch_invariant,
            tensor_parallel = parallel.size,
            ?rank_ordinals,
            "CUDA runner ready"
        );
        let metadata_staging = gpus
            .iter()
            .map(|gpu| {
                Ok([
                    gpu.alloc_staging(INITIAL_METADATA_WORDS)?,
                    gpu.alloc_staging(INITIAL_METADATA_WORDS)?,
                ])
            })
            .collect::<anyhow::Result<_>>()?;
        let overlap = overlap::Launched::new(&gpus[0], rows * SAMPLED_WORDS_PER_ROW)?;
        Ok(CudaRunner {
            graphs: HashMap::new(),
            collective,
            gpus,
            ranks,
            config,
            shard,
            shape,
            options,
            num_blocks,
            plan: StepPlan::default(),
            metadata,
            metadata_staging,
            staging_turn: 0,
            overlap,
            logits,
            sampled,
            originals,
            adjustments,
            adjustments_staging,
            host_sampled: Vec::new(),
            scores,
            host_scores: Vec::new(),
            prompt_logprobs: Vec::new(),
            times: StepTimes::default(),
            _blas_workspaces: blas_workspaces,
        })
    }

    /// One rank's activation buffers, for a rank holding `shard` (of `ranks`).
    fn buffers_for(
        gpu: &Gpu,
        shape: &KernelShape,
        shard: &ModelConfig,
        options: &CudaOptions,
        weights: &Weights,
        ranks: usize,
    ) -> anyhow::Result<Buffers> {
        // Contexts are split only while blocks < 2 per multiprocessor, so blocks × splits
        // stays under 4 per multiprocessor.
        let partial_words = shape.decode_partial_words(4 * gpu.multiprocessors, 1);
        let d = Dims::of(shard);
        let (t, e) = (options.max_batched_tokens, options.dtype.size_in_bytes());
        let rows = options.max_running.min(t);
        let inv_freq =
            heddle_model::rope::rope_frequencies(shard, weights.rope_freq_factors.as_deref());
        Ok(Buffers {
            residual: gpu.alloc(t * d.hidden * 4)?,
            normed: gpu.alloc(t * d.hidden * e)?,
            qkv: gpu.alloc(t * d.qkv * e)?,
            attention: gpu.alloc(t * d.q * e)?,
            projected: gpu.alloc(t * d.hidden * e)?,
            gate_up: gpu.alloc(t * 2 * d.ffn * e)?,
            activated: gpu.alloc(t * d.ffn * e)?,
            inv_freq: gpu.upload(&inv_freq)?,
            partials: gpu.alloc(partial_words * 4)?,
            vocab_logits: if ranks > 1 {
                Some(gpu.alloc(rows * shard.vocab_size * 4)?)
            } else {
                None
            },
        })
    }

    /// KV blocks in the cache: the scheduler's `num_blocks`.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn options(&self) -> &CudaOptions {
        &self.options
    }

    /// Rank 0's GPU.
    pub fn device_name(&self) -> &str {
        &self.gpus[0].name
    }

    /// How many decode layouts have been captured as CUDA graphs (and are kept).
    pub fn captured_graphs(&self) -> usize {
        self.graphs.len()
    }

    /// The step times summed since the last call.
    pub fn take_step_times(&mut self) -> StepTimes {
        std::mem::take(&mut self.times)
    }

    /// Checks a batch against the runner's sizes and every runner's limits; pending tokens
    /// only with `pending_allowed` (overlapped launches).
    fn check(&self, batch: &ScheduledBatch, pending_allowed: bool) -> Result<(), ModelError> {
        let bad = |why: String| Err(ModelError::InvalidBatch(why));
        let tokens = batch.num_tokens();
        if tokens > self.options.max_batched_tokens {
            return bad(format!(
                "{tokens} tokens in one step; the CUDA runner was sized for {}",
                self.options.max_batched_tokens
            ));
        }
        let rows = batch.seqs.iter().filter(|s| s.needs_logits).count();
        if rows
            > self
                .options
                .max_running
                .min(self.options.max_batched_tokens)
        {
            return bad(format!("{rows} sampled sequences in one step is too many"));
        }
        // Each sequence as every runner checks it.
        let limits = BatchLimits::new(&self.config, self.options.block_size, self.num_blocks);
        if !pending_allowed {
            return limits.check_batch(batch);
        }
        for (i, s) in batch.seqs.iter().enumerate() {
            limits.check_sequence(i, &s.tokens, s.start_position, &s.block_table)?;
        }
        Ok(())
    }

    /// Whether single-token tiles go to the decode attention kernel.
    fn uses_decode_kernel(&self) -> bool {
        self.shape.has_decode_kernel() && !self.options.batch_invariant
    }

    /// The fixed layout a pure decode step is padded to for graph replay: the batch size
    /// rounded up to a power of two, the block tables' length likewise.
    fn graph_padding(&self, batch: &ScheduledBatch) -> Option<Padding> {
        let eligible = self.options.cuda_graphs
            && self.shape.has_decode_kernel()
            && batch
                .seqs
                .iter()
                .all(|s| s.tokens.len() == 1 && s.needs_logits);
        let rows = batch.seqs.len().next_power_of_two();
        let max_rows = self
            .options
            .max_running
            .min(self.options.max_batched_tokens);
        if !eligible || rows > max_rows {
            return None;
        }
        let table_entries: usize = batch.seqs.iter().map(|s| s.block_table.len()).sum();
        Some(Padding {
            rows,
            block_capacity: (table_entries + rows).next_power_of_two().max(64),
            scratch_block: self.num_blocks as u32,
        })
    }

    /// Packs the step's metadata and uploads it (growing the buffers if needed). With
    /// `adjusted`, the sampler reads each row's biases and mask from the adjustment words,
    /// which must be uploaded before it runs.
    fn pack(
        &mut self,
        batch: &ScheduledBatch,
        history: &dyn SequenceTokens,
        padding: Option<Padding>,
        adjusted: bool,
    ) -> anyhow::Result<()> {
        let packing = std::time::Instant::now();
        self.plan.build(
            batch,
            history,
            self.options.block_size,
            self.shape.tokens_per_tile(),
            self.uses_decode_kernel(),
            self.config.vocab_size,
            padding,
        );
        if adjusted {
            self.plan.mark_adjusted();
        }
        let words = &self.plan.words;
        let score_bytes = self.plan.scored.len() * SCORE_WORDS * 4;
        let grows = words.len() * 4 > self.metadata[0].bytes
            || score_bytes > self.scores.bytes
            || self.plan.num_penalties * 4 > self.originals.bytes;
        if grows {
            // A launched step may still read the buffers about to be replaced.
            self.overlap.wait_for_gpus(&self.gpus)?;
        }
        if words.len() * 4 > self.metadata[0].bytes {
            self.graphs.clear();
            let bytes = (words.len() * 4).next_power_of_two();
            self.metadata = self
                .gpus
                .iter()
                .map(|gpu| gpu.alloc(bytes))
                .collect::<anyhow::Result<_>>()?;
        }
        let first = &self.gpus[0];
        if score_bytes > self.scores.bytes {
            // Scoring runs outside graphs: no graph holds this buffer's address.
            self.scores = first.alloc(score_bytes.next_power_of_two())?;
        }
        if self.plan.num_penalties * 4 > self.originals.bytes {
            self.graphs.clear();
            self.originals = first.alloc((self.plan.num_penalties * 4).next_power_of_two())?;
        }
        // The other turn's copy may belong to a step still queued; this turn's step is
        // done (at most two steps are in flight, and the older was collected).
        let turn = self.staging_turn;
        self.staging_turn ^= 1;
        let copies = self.gpus.iter().zip(&self.metadata);
        for ((gpu, metadata), staging) in copies.zip(&mut self.metadata_staging) {
            let staging = &mut staging[turn];
            if staging.len() < words.len() {
                *staging = gpu.alloc_staging(words.len().next_power_of_two())?;
            }
            staging.words(words.len())?.copy_from_slice(words);
            gpu.write_staged(staging, words.len(), metadata)?;
        }
        self.times.pack_seconds += packing.elapsed().as_secs_f64();
        Ok(())
    }

    /// Runs a padded decode step from its graphs (with the sampler when `sample`),
    /// capturing them on first use.
    fn replay(&mut self, padding: Padding, sample: bool) -> anyhow::Result<()> {
        let key = (padding, sample, self.greedy_by_slices(sample).is_some());
        if !self.graphs.contains_key(&key) {
            let graphs = self.capture(sample)?;
            tracing::debug!(
                rows = padding.rows,
                blocks = padding.block_capacity,
                sample,
                "captured a decode step"
            );
            self.graphs.insert(key, graphs);
        }
        for graph in &self.graphs[&key] {
            graph
                .0
                .launch()
                .context("launching a decode step's graph")?;
        }
        Ok(())
    }

    /// Captures the step as queued by [`Self::enqueue`]: one graph per GPU, each GPU's
    /// stream captured at once (with NCCL, a collective's calls for every rank are queued
    /// together, so every stream must be capturing).
    fn capture(&self, sample: bool) -> anyhow::Result<Vec<DecodeGraph>> {
        let gpus: Vec<&Gpu> = self.gpus.iter().collect();
        crate::gpu::capture_graphs(&gpus, || self.enqueue(sample))
            .context("capturing a decode step")?
            .into_iter()
            .map(|graph| {
                Ok(DecodeGraph(
                    graph.context("the decode step's capture is empty")?,
                ))
            })
            .collect()
    }

    /// Queues the forward pass up to the logits of the sampled rows, and the sampler when
    /// `sample`: each rank's part up to the next collective in turn, then the collective.
    fn enqueue(&self, sample: bool) -> anyhow::Result<()> {
        let tokens = self.plan.num_tokens * self.config.hidden_size;
        for rank in &self.ranks {
            self.enqueue_embedding(rank)?;
        }
        self.all_reduce(|b| b.residual.ptr, tokens, DType::F32)?;
        for l in 0..self.config.num_layers {
            let incoming = if l == 0 { Slot::Embedding } else { Slot::Mlp };
            self.enqueue_norms(incoming, |w| w.layers[l].attn_norm.ptr, None)?;
            for rank in &self.ranks {
                self.enqueue_attention(rank, l)?;
            }
            self.all_reduce(|b| b.projected.ptr, tokens, self.options.dtype)?;
            self.enqueue_norms(Slot::Attention, |w| w.layers[l].ffn_norm.ptr, None)?;
            for rank in &self.ranks {
                self.enqueue_mlp(rank, l)?;
            }
            self.all_reduce(|b| b.projected.ptr, tokens, self.options.dtype)?;
        }
        let rows = self.plan.sampled_rows;
        if rows > 0 {
            if let Some(peer) = self.greedy_by_slices(sample) {
                return self.enqueue_greedy_by_slices(peer);
            }
            self.enqueue_logits(self.plan.offsets.logit_rows, rows)?;
            if sample {
                self.enqueue_sampler()?;
            }
        }
        Ok(())
    }

    /// Every rank's residual norm (`enqueue_residual_norm`), queued before any rank's next
    /// work: with peer-to-peer sums each is a barrier across the GPUs, and a host call
    /// that waits for its GPU to go idle (cuBLAS loading a kernel on its first use does),
    /// queued between two ranks' barriers, would wait for a barrier that the ranks not yet
    /// queued never reach.
    fn enqueue_norms(
        &self,
        incoming: Slot,
        weight: impl Fn(&Weights) -> u64,
        rows: Option<(usize, usize)>,
    ) -> anyhow::Result<()> {
        for rank in &self.ranks {
            self.enqueue_residual_norm(rank, incoming, weight(&rank.weights), rows)?;
        }
        Ok(())
    }

    /// The address of `offset` words into the step's metadata on `rank`'s GPU.
    fn metadata_at(&self, rank: &Rank, offset: usize) -> u64 {
        self.metadata[rank.device].ptr + 4 * offset as u64
    }

    /// Sums a buffer of every rank's over the ranks (nothing with one rank, nor when the
    /// step's sums are peer-to-peer, inside the norms).
    fn all_reduce(
        &self,
        buffer: fn(&Buffers) -> u64,
        count: usize,
        dtype: DType,
    ) -> anyhow::Result<()> {
        // One rank has nothing to sum (and no list to build, 65 times a step).
        if self.ranks.len() == 1 || self.peer_sums().is_some() {
            return Ok(());
        }
        let parts: Vec<Part> = self
            .ranks
            .iter()
            .map(|rank| Part {
                gpu: &self.gpus[rank.device],
                ptr: buffer(&rank.buffers),
            })
            .collect();
        self.collective.all_reduce_sum(&parts, count, dtype)
    }

    /// The peer-to-peer all-reduces, when they take this step's sums (see collective.rs).
    fn peer_sums(&self) -> Option<&PeerSums> {
        self.collective.peer_sums(self.plan.num_tokens)
    }

    /// Where `rank` writes its partial result for `slot`: `local`, unless the step's sums
    /// are peer-to-peer, which read it from the rank's exchange slot.
    fn partial_output(&self, rank: &Rank, slot: Slot, local: u64) -> u64 {
        self.peer_sums()
            .map_or(local, |peer| peer.partial(rank.index, slot))
    }

    /// The residual connection and RMSNorm by `weight` into `normed`, on `rank`: the
    /// residual plus the ranks' summed partial result `incoming` (the embedding is already
    /// the residual), written back, for every token; or, with `rows`, for the `rows.1`
    /// rows listed at metadata word `rows.0`, not written back. With peer-to-peer sums,
    /// the all-reduce of `incoming` happens here.
    fn enqueue_residual_norm(
        &self,
        rank: &Rank,
        incoming: Slot,
        weight: u64,
        rows: Option<(usize, usize)>,
    ) -> anyhow::Result<()> {
        let (gpu, b) = (&self.gpus[rank.device], &rank.buffers);
        let (row_list, num_rows) = match rows {
            Some((offset, count)) => (self.metadata_at(rank, offset), count),
            None => (0, self.plan.num_tokens),
        };
        let eps = self.config.rms_norm_eps;
        if let Some(peer) = self.peer_sums() {
            return peer.sum_rmsnorm(
                gpu,
                rank.index,
                incoming,
                b.residual.ptr,
                weight,
                b.normed.ptr,
                row_list,
                num_rows,
                eps,
                rows.is_none(),
            );
        }
        let delta = match incoming {
            Slot::Embedding => 0u64,
            Slot::Attention | Slot::Mlp => b.projected.ptr,
        };
        gpu.launch(
            "add_rmsnorm",
            grid(num_rows, self.norm_threads()),
            &[
                &b.residual.ptr,
                &delta,
                &weight,
                &b.normed.ptr,
                &row_list,
                &(self.config.hidden_size as i32),
                &eps,
                &(rows.is_none() as i32),
            ],
        )
    }

    /// The embeddings of the step's tokens in the rank's vocabulary slice (zeros for the
    /// others) into its residual stream (or its exchange slot).
    fn enqueue_embedding(&self, rank: &Rank) -> anyhow::Result<()> {
        let out = self.partial_output(rank, Slot::Embedding, rank.buffers.residual.ptr);
        self.gpus[rank.device].launch(
            "embed_gather",
            grid(self.plan.num_tokens, 256),
            &[
                &self.metadata_at(rank, self.plan.offsets.tokens),
                &rank.weights.embed.ptr,
                &out,
                &(self.config.hidden_size as i32),
                &(rank.first_token as i32),
                &(self.shard.vocab_size as i32),
            ],
        )
    }

    /// Threads of an RMSNorm block over the hidden size.
    fn norm_threads(&self) -> u32 {
        1024.min(self.config.hidden_size.next_power_of_two())
            .max(32) as u32
    }

    /// Layer `l`'s attention block on one rank, from the normed residual (`enqueue_norms`)
    /// up to its (partial) output projection: its heads' Q·K·V, RoPE and the cache write of
    /// its KV heads, attention.
    fn enqueue_attention(&self, rank: &Rank, l: usize) -> anyhow::Result<()> {
        let (gpu, b, layer) = (
            &self.gpus[rank.device],
            &rank.buffers,
            &rank.weights.layers[l],
        );
        let d = Dims::of(&self.shard);
        let o = self.plan.offsets;
        let t = self.plan.num_tokens;
        let null = 0u64;
        self.project(
            rank,
            b.qkv.ptr,
            b.normed.ptr,
            &layer.qkv,
            t,
            d.qkv,
            d.hidden,
        )?;
        let layer_cache = rank.k_cache.bytes / self.config.num_layers;
        let k_cache = rank.k_cache.ptr + (l * layer_cache) as u64;
        let v_cache = rank.v_cache.ptr + (l * layer_cache) as u64;
        let bias = layer.qkv_bias.as_ref().map_or(null, |b| b.ptr);
        gpu.launch(
            "rope_kv_write",
            grid(t, 128),
            &[
                &b.qkv.ptr,
                &bias,
                &b.inv_freq.ptr,
                &self.metadata_at(rank, o.positions),
                &self.metadata_at(rank, o.slots),
                &k_cache,
                &v_cache,
            ],
        )?;
        launch_attention(
            gpu,
            &self.shape,
            &AttentionArgs {
                qkv: b.qkv.ptr,
                k_cache,
                v_cache,
                out: b.attention.ptr,
                tiles: self.metadata_at(rank, o.tiles),
                num_tiles: self.plan.num_tiles,
                num_decode_tiles: self.plan.num_decode_tiles,
                block_tables: self.metadata_at(rank, o.block_tables),
                table_offsets: self.metadata_at(rank, o.table_offsets),
                scale: 1.0 / (self.config.head_dim as f32).sqrt(),
                partials: b.partials.ptr,
                splits: None,
            },
        )?;
        self.project(
            rank,
            self.partial_output(rank, Slot::Attention, b.projected.ptr),
            b.attention.ptr,
            &layer.o,
            t,
            d.hidden,
            d.q,
        )
    }

    /// Layer `l`'s MLP on one rank, from the normed residual (`enqueue_norms`) up to its
    /// (partial) down projection: its slice of gate·up, SiLU.
    fn enqueue_mlp(&self, rank: &Rank, l: usize) -> anyhow::Result<()> {
        let (gpu, b, layer) = (
            &self.gpus[rank.device],
            &rank.buffers,
            &rank.weights.layers[l],
        );
        let d = Dims::of(&self.shard);
        let t = self.plan.num_tokens;
        self.project(
            rank,
            b.gate_up.ptr,
            b.normed.ptr,
            &layer.gate_up,
            t,
            2 * d.ffn,
            d.hidden,
        )?;
        let n = (t * d.ffn) as i64;
        gpu.launch(
            "silu_mul",
            grid((n as usize).div_ceil(256).min(65_536), 256),
            &[&b.gate_up.ptr, &b.activated.ptr, &(d.ffn as i32), &n],
        )?;
        self.project(
            rank,
            self.partial_output(rank, Slot::Mlp, b.projected.ptr),
            b.activated.ptr,
            &layer.down,
            t,
            d.hidden,
            d.ffn,
        )
    }

    /// y[rows, n] = x[rows, k] · w[n, k]ᵀ on `rank`'s GPU, through the matrix's own path.
    #[allow(clippy::too_many_arguments)]
    fn project(
        &self,
        rank: &Rank,
        y: u64,
        x: u64,
        w: &Matrix,
        rows: usize,
        n: usize,
        k: usize,
    ) -> anyhow::Result<()> {
        let gpu = &self.gpus[rank.device];
        match w {
            Matrix::Dense(w) => gpu.gemm(y, false, x, w.ptr, rows, n, k),
            Matrix::Fp8(w) => {
                let activations = rank
                    .fp8_activations
                    .as_ref()
                    .context("an FP8 projection without FP8 activation buffers")?;
                gpu.gemm_fp8(y, x, activations, w, rows, n, k)
            }
        }
    }

    /// The f32 logits of `rows` rows, listed at metadata word `row_list`, into the
    /// runner's logits buffer: each rank's final norm of the rows and its slice of the LM
    /// head, then the slices gathered on rank 0.
    fn enqueue_logits(&self, row_list: usize, rows: usize) -> anyhow::Result<()> {
        let parts = self.enqueue_slice_logits(row_list, rows)?;
        self.collective
            .gather_columns(&parts, self.logits.ptr, rows, self.shard.vocab_size)
    }

    /// Each rank's final norm of `rows` rows listed at metadata word `row_list`, and its
    /// slice of the LM head: where each rank's f32 logits slices are.
    fn enqueue_slice_logits(&self, row_list: usize, rows: usize) -> anyhow::Result<Vec<Part<'_>>> {
        let hidden = self.config.hidden_size;
        self.enqueue_norms(Slot::Mlp, |w| w.final_norm.ptr, Some((row_list, rows)))?;
        let mut parts = Vec::with_capacity(self.ranks.len());
        for rank in &self.ranks {
            let (gpu, b, w) = (&self.gpus[rank.device], &rank.buffers, &rank.weights);
            let out = b.vocab_logits.as_ref().map_or(self.logits.ptr, |l| l.ptr);
            gpu.gemm(
                out,
                true,
                b.normed.ptr,
                w.head(),
                rows,
                self.shard.vocab_size,
                hidden,
            )?;
            parts.push(Part { gpu, ptr: out });
        }
        Ok(parts)
    }

    /// The peer-to-peer sums, when the step samples (`sample`) rows that are all plain
    /// greedy: each rank then finds the best token of its own logits slices, and rank 0
    /// picks among the ranks' (see `PeerSums::greedy`), instead of gathering whole rows
    /// for the sampler.
    fn greedy_by_slices(&self, sample: bool) -> Option<&PeerSums> {
        self.peer_sums()
            .filter(|_| sample && self.plan.plain_greedy())
    }

    /// Queues the logits slices of the step's sampled rows and greedy sampling over them.
    fn enqueue_greedy_by_slices(&self, peer: &PeerSums) -> anyhow::Result<()> {
        let rows = self.plan.sampled_rows;
        let parts = self.enqueue_slice_logits(self.plan.offsets.logit_rows, rows)?;
        for (rank, part) in self.ranks.iter().zip(&parts) {
            let out = match (rank.index, &rank.sampled_ids) {
                (0, _) => self.sampled.ptr,
                (_, Some(ids)) => ids.ptr,
                (_, None) => 0,
            };
            peer.greedy(
                part.gpu,
                rank.index,
                part.ptr,
                self.shard.vocab_size,
                rank.first_token,
                out,
                rows,
            )?;
        }
        Ok(())
    }

    /// Queues the sampler over the step's logits rows.
    fn enqueue_sampler(&self) -> anyhow::Result<()> {
        let o = self.plan.offsets;
        let rank = &self.ranks[0];
        let rows = self.plan.sampled_rows;
        self.gpus[0].launch(
            "sample",
            grid(rows, SAMPLE_THREADS),
            &[
                &self.logits.ptr,
                &(self.config.vocab_size as i32),
                &self.metadata_at(rank, o.sample_params),
                &self.metadata_at(rank, o.penalties),
                &self.originals.ptr,
                &self.adjustments.ptr,
                &self.sampled.ptr,
                &(rows as i32),
            ],
        )
    }

    /// Queues the scoring of the step's scored prompt tokens, behind the sampler (it reuses
    /// the logits buffer): per piece of rows, the logits of the rows that predict the
    /// tokens, and `score_tokens`.
    fn enqueue_scoring(&self) -> anyhow::Result<()> {
        let o = self.plan.offsets;
        let rank = &self.ranks[0];
        let piece = self
            .options
            .max_running
            .min(self.options.max_batched_tokens);
        let scored = self.plan.scored.len();
        for start in (0..scored).step_by(piece) {
            let rows = piece.min(scored - start);
            self.enqueue_logits(o.score_rows + start, rows)?;
            self.gpus[0].launch(
                "score_tokens",
                grid(rows, SAMPLE_THREADS),
                &[
                    &self.logits.ptr,
                    &(self.config.vocab_size as i32),
                    &self.metadata_at(rank, o.score_targets + start),
                    &self.metadata_at(rank, o.score_tops + start),
                    &(self.scores.ptr + (4 * start * SCORE_WORDS) as u64),
                ],
            )?;
        }
        Ok(())
    }

    /// Copies the scored prompt tokens' log-probabilities back (after the step's wait).
    fn read_scores(&mut self) -> anyhow::Result<()> {
        let words = self.plan.scored.len() * SCORE_WORDS;
        self.host_scores.resize(words, 0);
        self.gpus[0].read(&self.scores, &mut self.host_scores)?;
        let out = &self.host_scores;
        self.prompt_logprobs = self
            .plan
            .scored
            .iter()
            .zip(out.chunks_exact(SCORE_WORDS))
            .map(|(t, words)| PromptTokenLogprobs {
                id: t.id,
                position: t.position,
                logprob: f32::from_bits(words[0] as u32),
                top_logprobs: words[1..]
                    .chunks_exact(2)
                    .take(t.top_logprobs.min(MAX_TOP_LOGPROBS))
                    .map(|p| (p[0] as u32, f32::from_bits(p[1] as u32)))
                    .collect(),
            })
            .collect();
        Ok(())
    }

    /// Queues the step's prompt scoring, waits for the sampled tokens and reads both back.
    fn finish_step(&mut self, started: std::time::Instant) -> anyhow::Result<Vec<SampledOutput>> {
        if !self.plan.scored.is_empty() {
            self.enqueue_scoring()?;
        }
        let sampled = self.read_sampled(started)?;
        if !self.plan.scored.is_empty() {
            self.read_scores()?;
        }
        self.wait_for_other_gpus()?;
        Ok(sampled)
    }

    /// Waits for the GPUs besides rank 0's, so that their errors surface in the step. Rank
    /// 0's results follow every rank's work of the step (the logits gather), so by now
    /// they are done or nearly.
    fn wait_for_other_gpus(&self) -> anyhow::Result<()> {
        for gpu in &self.gpus[1..] {
            gpu.bind()?;
            gpu.stream.synchronize().context("waiting for the GPU")?;
        }
        Ok(())
    }

    /// Runs one step and returns the f32 logits of its sampled rows, [rows × vocab],
    /// without sampling (for checking against the CPU runner).
    pub fn step_logits(
        &mut self,
        batch: &ScheduledBatch,
        history: &dyn SequenceTokens,
    ) -> Result<Vec<f32>, ModelError> {
        self.check(batch, false)?;
        self.pack(batch, history, None, false)
            .map_err(device_error)?;
        self.enqueue(false).map_err(device_error)?;
        let mut logits = vec![0f32; self.plan.rows.len() * self.config.vocab_size];
        self.gpus[0]
            .read(&self.logits, &mut logits)
            .map_err(device_error)?;
        self.wait_for_other_gpus().map_err(device_error)?;
        Ok(logits)
    }

    /// Packs the step's adjustments and copies them behind the queued forward pass.
    fn upload_adjustments(&mut self, adjustments: &StepAdjustments) -> anyhow::Result<()> {
        let words = crate::adjustments::packed_len(&self.plan.rows, adjustments);
        let first = &self.gpus[0];
        if words * 4 > self.adjustments.bytes {
            self.adjustments = first.alloc((words * 4).next_power_of_two())?;
        }
        if words > self.adjustments_staging.len() {
            self.adjustments_staging = first.alloc_staging(words.next_power_of_two())?;
        }
        let staged = self.adjustments_staging.words(words)?;
        crate::adjustments::pack(&self.plan.rows, adjustments, staged);
        first.write_staged(&mut self.adjustments_staging, words, &self.adjustments)
    }

    /// Copies the sampled ids (and log-probabilities if asked for) back: the step's wait.
    fn read_sampled(&mut self, started: std::time::Instant) -> anyhow::Result<Vec<SampledOutput>> {
        let rows = self.plan.sampled_rows;
        if rows == 0 {
            // Nothing to copy back; wait so that the step's errors surface in it.
            self.gpus[0].bind()?;
            self.gpus[0]
                .stream
                .synchronize()
                .context("waiting for the GPU")?;
            return Ok(Vec::new());
        }
        let words = if self.plan.wants_logprobs() {
            rows * SAMPLED_WORDS_PER_ROW
        } else {
            self.plan.rows.len()
        };
        self.host_sampled.resize(words, 0);
        let queued = std::time::Instant::now();
        self.gpus[0].read(&self.sampled, &mut self.host_sampled)?;
        self.times.steps += 1;
        self.times.host_seconds += (queued - started).as_secs_f64();
        self.times.wait_seconds += queued.elapsed().as_secs_f64();
        Ok(sampled_outputs(&self.plan.rows, rows, &self.host_sampled))
    }
}

/// The outputs of a step's sampled `rows` from the sampler's words: `sampled_rows` ids
/// (padding included), then as many log-probabilities, then the top pairs of each row
/// (those two parts only when some row asked for log-probabilities).
fn sampled_outputs(rows: &[SampledRow], sampled_rows: usize, out: &[i32]) -> Vec<SampledOutput> {
    rows.iter()
        .enumerate()
        .map(|(i, row)| {
            let top = &out
                .get(2 * sampled_rows + i * 2 * MAX_TOP_LOGPROBS..)
                .unwrap_or(&[]);
            SampledOutput {
                id: row.id,
                token: out[i] as u32,
                logprob: row
                    .logprob
                    .then(|| f32::from_bits(out[sampled_rows + i] as u32)),
                top_logprobs: top
                    .chunks_exact(2)
                    .take(row.top_logprobs.min(MAX_TOP_LOGPROBS))
                    .map(|p| (p[0] as u32, f32::from_bits(p[1] as u32)))
                    .collect(),
            }
        })
        .collect()
}

fn device_error(e: anyhow::Error) -> ModelError {
    ModelError::Device(format!("{e:#}"))
}

impl ModelRunner for CudaRunner {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn step(
        &mut self,
        batch: &ScheduledBatch,
        history: &dyn SequenceTokens,
    ) -> Result<Vec<SampledOutput>, ModelError> {
        self.prompt_logprobs.clear();
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let started = std::time::Instant::now();
        self.check(batch, false)?;
        let padding = self.graph_padding(batch);
        self.pack(batch, history, padding, false)
            .map_err(device_error)?;
        match padding {
            Some(padding) => self.replay(padding, true),
            None => self.enqueue(true),
        }
        .map_err(device_error)?;
        self.finish_step(started).map_err(device_error)
    }

    fn applies_logits_adjustments(&self) -> bool {
        true
    }

    fn computes_prompt_logprobs(&self) -> bool {
        true
    }

    fn take_prompt_logprobs(&mut self) -> Vec<PromptTokenLogprobs> {
        std::mem::take(&mut self.prompt_logprobs)
    }

    fn overlapped(&mut self) -> Option<&mut dyn OverlappedSteps> {
        if self.options.overlap_steps {
            Some(self)
        } else {
            None
        }
    }

    /// The forward pass is queued first; the host then waits for the masks while the GPU
    /// runs it, copies them on the same stream, and queues the sampler behind the copy.
    fn step_adjusted(
        &mut self,
        batch: &ScheduledBatch,
        history: &dyn SequenceTokens,
        adjustments: PendingAdjustments<'_>,
    ) -> Result<Vec<SampledOutput>, ModelError> {
        self.prompt_logprobs.clear();
        if batch.is_empty() {
            adjustments().map_err(ModelError::LogitsProcessing)?;
            return Ok(Vec::new());
        }
        let started = std::time::Instant::now();
        self.check(batch, false)?;
        let padding = self.graph_padding(batch);
        self.pack(batch, history, padding, true)
            .map_err(device_error)?;
        match padding {
            Some(padding) => self.replay(padding, false),
            None => self.enqueue(false),
        }
        .map_err(device_error)?;
        let adjustments = adjustments().map_err(ModelError::LogitsProcessing)?;
        self.upload_adjustments(&adjustments)
            .map_err(device_error)?;
        self.enqueue_sampler().map_err(device_error)?;
        self.finish_step(started).map_err(device_error)
    }
}

/// Where one step's attention reads and writes.
pub struct AttentionArgs {
    pub qkv: u64,
    pub k_cache: u64,
    pub v_cache: u64,
    pub out: u64,
    /// `num_tiles` tiles for the general kernel, then `num_decode_tiles` single-token ones.
    pub tiles: u64,
    pub num_tiles: usize,
    pub num_decode_tiles: usize,
    pub block_tables: u64,
    pub table_offsets: u64,
    pub scale: f32,
    pub partials: u64,
    /// Context ranges per decode block; by default [`decode_splits`] of the batch.
    pub splits: Option<usize>,
}

/// Queues attention for every tile: multi-token tiles to the general kernel, single-token
/// ones to the decode kernel (split and merged when the batch is too small to fill the GPU).
pub fn launch_attention(gpu: &Gpu, shape: &KernelShape, a: &AttentionArgs) -> anyhow::Result<()> {
    let grid_y = shape.attention_grid_y();
    let config = |x: usize, z: usize| cudarc::driver::LaunchConfig {
        grid_dim: (x as u32, grid_y as u32, z as u32),
        block_dim: (ATTENTION_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    if a.num_tiles > 0 {
        gpu.launch(
            "attention",
            config(a.num_tiles, 1),
            &[
                &a.qkv,
                &a.k_cache,
                &a.v_cache,
                &a.out,
                &a.tiles,
                &a.block_tables,
                &a.table_offsets,
                &a.scale,
            ],
        )?;
    }
    if a.num_decode_tiles > 0 {
        let tiles = a.tiles + 16 * a.num_tiles as u64;
        let splits = a
            .splits
            .unwrap_or_else(|| decode_splits(a.num_decode_tiles * grid_y, gpu.multiprocessors));
        gpu.launch(
            "attention_decode",
            config(a.num_decode_tiles, splits),
            &[
                &a.qkv,
                &a.k_cache,
                &a.v_cache,
                &a.out,
                &tiles,
                &a.block_tables,
                &a.table_offsets,
                &a.scale,
                &a.partials,
            ],
        )?;
        if splits > 1 {
            gpu.launch(
                "attention_merge",
                config(a.num_decode_tiles, 1),
                &[&a.partials, &tiles, &a.out, &(splits as i32)],
            )?;
        }
    }
    Ok(())
}

/// Row counts from which the FP8 GEMMs' timed choices beat cuBLASLt's first (8B shape,
/// H200: within 3 % below 1,024 rows, up to 15 % faster at 2,048–8,192).
const FP8_TIMED_FROM_ROWS: usize = 1024;

/// Times each FP8 projection's kernel candidates for every power-of-two class of step
/// sizes from [`FP8_TIMED_FROM_ROWS`] up to `max_tokens` (every layer has the same shapes,
/// so the first layer's weights stand for all). The activation codes are zeroed first:
/// timing needs no real values, only finite ones.
fn time_fp8_choices(
    gpu: &Gpu,
    rank: &Rank,
    shard: &ModelConfig,
    max_tokens: usize,
) -> anyhow::Result<()> {
    let (Some(activations), Some(layer)) = (&rank.fp8_activations, rank.weights.layers.first())
    else {
        return Ok(());
    };
    gpu.zero(activations.codes.ptr, activations.codes.bytes)?;
    gpu.zero(activations.scale.ptr, 4)?;
    let d = Dims::of(shard);
    let shapes = [
        (&layer.qkv, d.qkv, d.hidden),
        (&layer.o, d.hidden, d.q),
        (&layer.gate_up, 2 * d.ffn, d.hidden),
        (&layer.down, d.hidden, d.ffn),
    ];
    let mut class = FP8_TIMED_FROM_ROWS;
    while class < max_tokens * 2 {
        let rows = class.min(max_tokens);
        for (matrix, n, k) in shapes {
            if let Matrix::Fp8(w) = matrix {
                gpu.time_fp8_choice(&rank.buffers.gate_up, activations, w, rows, n, k)?;
            }
        }
        class *= 2;
    }
    Ok(())
}
