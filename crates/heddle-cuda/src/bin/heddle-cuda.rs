//! `heddle-cuda`: the GPU runner's checks and its in-process benchmark, for the GPU
//! machine (scripts/gpu/check-and-bench.sh runs both).

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use heddle_cuda::bench::{self, Load};
use heddle_cuda::gpu::Gpu;
use heddle_cuda::kernels::KernelShape;
use heddle_cuda::{
    decode_case, dummy, fp8_check, gemm_bench, gguf_reference, invariance, parallel_checks,
    reference, selftest, AllReduce, CudaOptions, CudaRunner, DType, KvBudget, KvCacheDtype,
    Quantization, RankPlacement, TensorParallel, WeightSource,
};
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
    /// Every kernel and the runner against CPU references, and CUDA graph replay.
    Selftest,
    /// Teacher-forced logits and greedy continuations of a job's prompts on an HF
    /// checkpoint, for scripts/gpu/reference/check_reference.py: writes OUT.bin (f32
    /// logits rows) and OUT.json.
    Reference {
        /// The checkpoint directory (config.json, safetensors).
        #[arg(long)]
        model: PathBuf,
        /// The job: {"prompts": [[ids]], "teacher_from": [n], "generate": n, "chunk": n}.
        #[arg(long)]
        job: PathBuf,
        #[arg(long, value_parser = ["f32", "bf16"])]
        dtype: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        batch_invariant: bool,
        /// The layers' projections in FP8 (`fp8`) or as loaded (`none`).
        #[arg(long, value_enum, default_value_t = QuantizationArg::None)]
        quantization: QuantizationArg,
        /// The KV cache in FP8 (`fp8`) or in the runner's dtype (`auto`).
        #[arg(long, value_enum, default_value_t = KvCacheArg::Auto)]
        kv_cache_dtype: KvCacheArg,
    },
    /// A GGUF model on the GPU against the committed float64 reference outputs of the same
    /// file: every case's greedy tokens.
    Gguf {
        #[arg(long)]
        model: PathBuf,
        /// crates/heddle-model/tests/data/llamacpp_reference.json
        #[arg(long)]
        reference: PathBuf,
        #[arg(long, value_parser = ["f32", "bf16"])]
        dtype: String,
    },
    /// Batch invariance on random weights at a real shape: one request alone and inside
    /// batches of 7, 64 and 256, in the default and in the batch-invariant mode.
    Invariance {
        /// An HF config.json-format file giving the model's shape.
        #[arg(long)]
        config: PathBuf,
    },
    /// Tensor parallelism at a real shape on random weights: the model split over `--size`
    /// ranks against one rank (f32: greedy tokens identical; bf16: logits errors), and
    /// CUDA graph replay against direct launches at that size.
    TensorParallel {
        /// An HF config.json-format file giving the model's shape.
        #[arg(long)]
        config: PathBuf,
        #[arg(long, default_value_t = 2)]
        size: usize,
        #[command(flatten)]
        placement: PlacementArg,
        /// How the ranks' partial results are summed.
        #[arg(long, value_enum, default_value_t = AllReduceArg::PeerToPeer)]
        all_reduce: AllReduceArg,
    },
    /// NCCL on its own: all-reduces (f32, bf16, direct and from CUDA graphs) and the logits
    /// gather over `--ranks` communicators, checked exactly; with one rank per GPU, also
    /// the peer-to-peer all-reduce fused with the norm, against the exact sums.
    Nccl {
        #[arg(long, default_value_t = 1)]
        ranks: usize,
        #[command(flatten)]
        placement: PlacementArg,
    },
    /// Throughput on random weights: N requests at once, greedy, ignore_eos.
    Bench(BenchArgs),
    /// The weight GEMMs of one layer and the LM head alone: microseconds, weight-read
    /// bandwidth and TFLOP/s in bf16, and the projections in FP8 (first choice, fast
    /// accumulation, the fastest timed candidate) where the GPU has FP8 tensor cores.
    Gemm {
        /// An HF config.json-format file giving the model's shape.
        #[arg(long)]
        config: PathBuf,
        /// Row counts to time (comma-separated).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "1,16,64,256,512,1024,2048,8192"
        )]
        rows: Vec<usize>,
    },
    /// Whether this GPU runs heddle's FP8 path: device quantization against the CPU's,
    /// FP8 GEMMs (per-row and per-tensor scales) against f64, and FP8 against bf16 timings
    /// at the config's layer shapes.
    Fp8 {
        /// An HF config.json-format file giving the model's shape.
        #[arg(long)]
        config: PathBuf,
    },
    /// Decode attention alone (bf16, block size 16) at a model's shape: one decode token
    /// per sequence over random caches, for each SEQUENCESxCONTEXT case; prints its time,
    /// the K/V bytes it read per second, and the device-to-device copy bandwidth.
    Attention {
        /// An HF config.json-format file giving the model's shape.
        #[arg(long)]
        config: PathBuf,
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "256x576,64x576,16x2048,1x576,1x4096"
        )]
        cases: Vec<String>,
        /// The cache in FP8 (`fp8`) or bf16 (`auto`).
        #[arg(long, value_enum, default_value_t = KvCacheArg::Auto)]
        kv_cache_dtype: KvCacheArg,
    },
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
struct PlacementArg {
    /// Test mode: every rank on the first GPU, summed by a kernel instead of NCCL. It checks
    /// the sharding with one GPU; it is slower than one rank, not a way to serve.
    #[arg(long)]
    ranks_on_first_gpu: bool,
}

impl PlacementArg {
    fn placement(&self) -> RankPlacement {
        if self.ranks_on_first_gpu {
            RankPlacement::AllOnFirstGpu
        } else {
            RankPlacement::OneGpuEach
        }
    }
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
    /// Queue each step behind the one in flight (`heddle serve --overlap-steps`; see
    /// docs/CUDA.md "Overlapped steps") instead of running one step at a time.
    #[arg(long)]
    overlap: bool,
    /// The batch-invariant mode (pinned GEMM algorithms, no decode attention kernel).
    #[arg(long)]
    batch_invariant: bool,
    /// Ranks the model is split over (one per GPU).
    #[arg(long, default_value_t = 1)]
    tensor_parallel_size: usize,
    #[command(flatten)]
    placement: PlacementArg,
    /// How the ranks' partial results are summed; `skip-for-timing` sums nothing (wrong
    /// tokens) to show what the collectives cost.
    #[arg(long, value_enum, default_value_t = AllReduceArg::PeerToPeer)]
    all_reduce: AllReduceArg,
    /// The layers' projections in FP8 (`fp8`) or as loaded (`none`).
    #[arg(long, value_enum, default_value_t = QuantizationArg::None)]
    quantization: QuantizationArg,
    /// The KV cache in FP8 (`fp8`) or in the runner's dtype (`auto`).
    #[arg(long, value_enum, default_value_t = KvCacheArg::Auto)]
    kv_cache_dtype: KvCacheArg,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum AllReduceArg {
    /// Peer-to-peer over NVLink (every step with two ranks; decode-sized steps with more).
    PeerToPeer,
    /// Peer-to-peer for steps of up to 512 tokens (or max-running), NCCL for larger ones.
    PeerToPeerSmallSteps,
    /// NCCL for every step.
    Nccl,
    /// None (timing only: the results are wrong).
    SkipForTiming,
}

impl From<AllReduceArg> for AllReduce {
    fn from(a: AllReduceArg) -> Self {
        match a {
            AllReduceArg::PeerToPeer => AllReduce::PeerToPeer,
            AllReduceArg::PeerToPeerSmallSteps => AllReduce::PeerToPeerForSmallSteps,
            AllReduceArg::Nccl => AllReduce::Nccl,
            AllReduceArg::SkipForTiming => AllReduce::SkippedForTiming,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum QuantizationArg {
    None,
    Fp8,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum KvCacheArg {
    Auto,
    Fp8,
}

impl From<KvCacheArg> for KvCacheDtype {
    fn from(k: KvCacheArg) -> Self {
        match k {
            KvCacheArg::Auto => KvCacheDtype::Auto,
            KvCacheArg::Fp8 => KvCacheDtype::Fp8,
        }
    }
}

impl From<QuantizationArg> for Quantization {
    fn from(q: QuantizationArg) -> Self {
        match q {
            QuantizationArg::None => Quantization::None,
            QuantizationArg::Fp8 => Quantization::Fp8,
        }
    }
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
                let (limit, verdict) = match c.limit {
                    Some(l) if c.passed() => (format!("{l:.1e}"), "ok"),
                    Some(l) => (format!("{l:.1e}"), "FAIL"),
                    None => ("-".to_string(), "reported"),
                };
                println!("{:<92} {:>12.3e} {:>10}  {verdict}", c.name, c.error, limit);
            }
            let counted = checks.iter().filter(|c| c.limit.is_some()).count();
            let failed = checks.iter().filter(|c| !c.passed()).count();
            if failed > 0 {
                bail!("{failed} of {counted} checks failed");
            }
            println!(
                "all {counted} checks passed ({} figures reported without a limit)",
                checks.len() - counted
            );
            Ok(())
        }
        Command::Reference {
            model,
            job,
            dtype,
            out,
            batch_invariant,
            quantization,
            kv_cache_dtype,
        } => {
            let job = reference::Job::from_json(&std::fs::read_to_string(&job)?)?;
            let config = heddle_model::ModelConfig::from_hf_json(&std::fs::read_to_string(
                model.join("config.json"),
            )?)?;
            let block_size = 16;
            let options = CudaOptions {
                dtype: if dtype == "f32" {
                    DType::F32
                } else {
                    DType::Bf16
                },
                block_size,
                max_batched_tokens: job.max_step_tokens(),
                max_running: job.prompts.len().next_power_of_two(),
                kv: KvBudget::Blocks(job.blocks_needed(block_size)),
                cuda_graphs: true,
                batch_invariant,
                tensor_parallel: TensorParallel::default(),
                quantization: quantization.into(),
                kv_cache_dtype: kv_cache_dtype.into(),
                ..CudaOptions::default()
            };
            let mut runner = CudaRunner::new(config, &WeightSource::Checkpoint(model), options)?;
            let output = reference::run(&mut runner, &job)?;
            let bytes: Vec<u8> = output.logits.iter().flat_map(|v| v.to_le_bytes()).collect();
            std::fs::write(out.with_extension("bin"), bytes)?;
            std::fs::write(out.with_extension("json"), output.summary(&job).to_string())?;
            Ok(())
        }
        Command::Gguf {
            model,
            reference,
            dtype,
        } => {
            let content = heddle_model::loader::read_gguf(&model)?;
            let config = heddle_model::ModelConfig::from_gguf(&content)?;
            let cases = gguf_reference::read_cases(&std::fs::read_to_string(&reference)?)?;
            let exact = dtype == "f32";
            let options = CudaOptions {
                dtype: if exact { DType::F32 } else { DType::Bf16 },
                max_batched_tokens: 2048,
                max_running: 16,
                kv: KvBudget::Blocks(1024),
                ..CudaOptions::default()
            };
            let mut runner = CudaRunner::new(config, &WeightSource::Gguf(model), options)?;
            let agreements = gguf_reference::run(&mut runner, &cases)?;
            let mut failed = 0;
            for a in &agreements {
                let verdict = match a.parted_at {
                    None => "equal",
                    Some(_) if !exact && a.margin <= gguf_reference::NEAR_TIE_NATS => "near-tie",
                    Some(_) => {
                        failed += 1;
                        "FAIL"
                    }
                };
                println!(
                    "RESULT gguf dtype={dtype} case={} parted_at={} margin_nats={:.3} {verdict}",
                    a.name,
                    a.parted_at.map_or("-".to_string(), |k| k.to_string()),
                    a.margin
                );
            }
            let equal = agreements.iter().filter(|a| a.parted_at.is_none()).count();
            println!(
                "RESULT gguf dtype={dtype} equal={equal}/{} failed={failed}",
                agreements.len()
            );
            if failed > 0 {
                bail!("{failed} cases part from the float64 reference beyond a near-tie");
            }
            Ok(())
        }
        Command::Invariance { config } => {
            let config = dummy::read_config(&config)?;
            let mut failed = false;
            for batch_invariant in [false, true] {
                let mut runner = CudaRunner::new(
                    config.clone(),
                    &WeightSource::Dummy { seed: 0 },
                    CudaOptions {
                        batch_invariant,
                        ..CudaOptions::default()
                    },
                )?;
                let alone = invariance::watched_outputs(&mut runner, 1)?;
                let repeat = invariance::watched_outputs(&mut runner, 1)?;
                let mode = if batch_invariant {
                    "batch-invariant"
                } else {
                    "default"
                };
                let mut rows = vec![invariance::compare(1, &alone, &repeat)];
                for batch in [7, 64, 256] {
                    let inside = invariance::watched_outputs(&mut runner, batch)?;
                    rows.push(invariance::compare(batch, &alone, &inside));
                }
                for c in rows {
                    // The batch-invariant mode must give identical results; the default
                    // mode is reported (it is not invariant by design).
                    let verdict = match (batch_invariant, c.identical()) {
                        (_, true) => "identical",
                        (true, false) => {
                            failed = true;
                            "FAIL"
                        }
                        (false, false) => "differs",
                    };
                    println!(
                        "RESULT invariance mode={mode} batch={} tokens_differing={}/{} \
                         max_logprob_difference={:.3e} {verdict}",
                        c.batch, c.tokens_differing, c.tokens, c.max_logprob_difference
                    );
                }
            }
            if failed {
                bail!("the batch-invariant mode is not invariant");
            }
            Ok(())
        }
        Command::TensorParallel {
            config,
            size,
            placement,
            all_reduce,
        } => {
            anyhow::ensure!(
                all_reduce != AllReduceArg::SkipForTiming,
                "the checks need the sums: --all-reduce skip-for-timing is for bench"
            );
            let config = dummy::read_config(&config)?;
            let source = WeightSource::Dummy { seed: 0 };
            let parallel = TensorParallel {
                size,
                placement: placement.placement(),
                all_reduce: all_reduce.into(),
            };
            let where_ = match parallel.placement {
                RankPlacement::OneGpuEach => "one-gpu-each",
                RankPlacement::AllOnFirstGpu => "all-on-first-gpu",
            };
            let job = parallel_checks::random_job(config.vocab_size, [200, 333, 77], 64);
            let run =
                |dtype, parallel| parallel_checks::run_job(&config, &source, dtype, parallel, &job);
            let one_f32 = run(DType::F32, TensorParallel::default())?;
            let split_f32 = run(DType::F32, parallel)?;
            let one_bf16 = run(DType::Bf16, TensorParallel::default())?;
            let split_bf16 = run(DType::Bf16, parallel)?;
            let mut failed = false;
            // f32: the same tokens, and logits equal but for the order of the sums.
            let c = parallel_checks::compare(&one_f32, &split_f32);
            let passed = c.tokens_differing == 0 && c.relative_error <= 1e-4;
            failed |= !passed;
            println!(
                "RESULT tensor_parallel size={size} placement={where_} dtype=f32 \
                 tokens_differing={}/{} logits_max_abs_error={:.3e} \
                 logits_relative_error={:.3e} {}",
                c.tokens_differing,
                c.tokens,
                c.max_abs_error,
                c.relative_error,
                if passed { "ok" } else { "FAIL" }
            );
            // bf16: the split must be about as accurate as one rank, judged against one
            // rank's f32 logits. It rounds each row-parallel projection's partial sums to
            // bf16 before adding them, which at worst multiplies that rounding by √2; the
            // other roundings are the same. A near-tie may flip a greedy token.
            let c = parallel_checks::compare(&one_bf16, &split_bf16);
            let one_off = selftest::relative_error(&one_bf16.logits, &one_f32.logits);
            let split_off = selftest::relative_error(&split_bf16.logits, &one_f32.logits);
            let passed = split_off <= 1.5 * one_off;
            failed |= !passed;
            println!(
                "RESULT tensor_parallel size={size} placement={where_} dtype=bf16 \
                 tokens_differing={}/{} logits_max_abs_error={:.3e} \
                 logits_relative_error={:.3e} vs_f32_one_rank={one_off:.3e} \
                 vs_f32_split={split_off:.3e} {}",
                c.tokens_differing,
                c.tokens,
                c.max_abs_error,
                c.relative_error,
                if passed { "ok" } else { "FAIL" }
            );
            let split = CudaOptions {
                tensor_parallel: parallel,
                ..CudaOptions::default()
            };
            let (differing, tokens, captured) =
                parallel_checks::graphs_against_launches(&config, &source, split.clone())?;
            let passed = differing == 0 && captured > 0;
            failed |= !passed;
            println!(
                "RESULT tensor_parallel_graphs size={size} placement={where_} dtype=bf16 \
                 tokens_differing={differing}/{tokens} layouts_captured={captured} {}",
                if passed { "ok" } else { "FAIL" }
            );
            let (differing, tokens) =
                parallel_checks::overlapped_against_single(&config, &source, split)?;
            let passed = differing == 0;
            failed |= !passed;
            println!(
                "RESULT tensor_parallel_overlap size={size} placement={where_} dtype=bf16 \
                 tokens_differing={differing}/{tokens} (overlapped steps against one at a \
                 time) {}",
                if passed { "ok" } else { "FAIL" }
            );
            if failed {
                bail!("tensor parallelism at {size} ranks departs from one rank");
            }
            Ok(())
        }
        Command::Nccl { ranks, placement } => {
            let checks = parallel_checks::nccl_checks(ranks, placement.placement())?;
            for c in &checks {
                println!(
                    "RESULT nccl {}: {:.3e} {}",
                    c.name,
                    c.error,
                    if c.passed() { "ok" } else { "FAIL" }
                );
            }
            let failed = checks.iter().filter(|c| !c.passed()).count();
            if failed > 0 {
                bail!("{failed} of {} NCCL checks failed", checks.len());
            }
            Ok(())
        }
        Command::Gemm { config: path, rows } => {
            let config = dummy::read_config(&path)?;
            let name = path.file_stem().unwrap_or_default().to_string_lossy();
            println!(
                "{:<8} {:>5} {:>7} {:>6} {:>8} {:>7} {:>7} | FP8 us: {:>7} {:>7} {:>7} {:>7}",
                "weight",
                "rows",
                "n",
                "k",
                "bf16 us",
                "GB/s",
                "TFLOP/s",
                "first",
                "fast",
                "timed",
                "TFLOP/s"
            );
            let dtype = DType::Bf16;
            for t in gemm_bench::run(&config, dtype, &rows)? {
                let fp8 = match t.fp8 {
                    Some(f) => format!(
                        "{:>7.1} {:>7.1} {:>7.1} {:>7.0}",
                        f.first,
                        f.first_fast,
                        f.timed,
                        t.tflop_per_s() * t.us / f.timed
                    ),
                    None => "-".into(),
                };
                println!(
                    "{:<8} {:>5} {:>7} {:>6} {:>8.1} {:>7.0} {:>7.1} | {fp8}",
                    t.name,
                    t.rows,
                    t.n,
                    t.k,
                    t.us,
                    t.weight_gb_per_s(dtype),
                    t.tflop_per_s()
                );
                print!(
                    "RESULT gemm model={name} weight={} rows={} us={:.2}",
                    t.name, t.rows, t.us
                );
                match t.fp8 {
                    Some(f) => println!(
                        " fp8_first_us={:.2} fp8_fast_us={:.2} fp8_timed_us={:.2}",
                        f.first, f.first_fast, f.timed
                    ),
                    None => println!(),
                }
            }
            Ok(())
        }
        Command::Fp8 { config } => {
            let findings = fp8_check::run(&dummy::read_config(&config)?)?;
            for f in &findings {
                let verdict = match f.passed {
                    Some(true) => "ok",
                    Some(false) => "FAIL",
                    None => "",
                };
                println!("{:<64} {} {verdict}", f.what, f.value);
            }
            let failed = findings.iter().filter(|f| f.passed == Some(false)).count();
            if failed > 0 {
                bail!("{failed} FP8 checks failed");
            }
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
        Command::Attention {
            config,
            cases,
            kv_cache_dtype,
        } => {
            let config = dummy::read_config(&config)?;
            let shape = KernelShape {
                kv_cache: kv_cache_dtype.into(),
                ..KernelShape::new(&config, 16, DType::Bf16)?
            };
            let gpu = Gpu::new(&shape)?;
            let cases = cases
                .iter()
                .map(|c| {
                    let (n, context) = c.split_once('x').context("a case is SEQUENCESxCONTEXT")?;
                    Ok((n.parse()?, context.parse()?))
                })
                .collect::<anyhow::Result<Vec<(usize, usize)>>>()?;
            let copy = decode_case::copy_bandwidth(&gpu, 1 << 30)?;
            println!(
                "RESULT attention device={} copy_GB_s={:.0}",
                gpu.name,
                copy / 1e9
            );
            for t in decode_case::time_cases(&gpu, &shape, &cases)? {
                let rate = t.kv_bytes as f64 / (t.micros * 1e-6);
                println!(
                    "RESULT attention kv={} sequences={} context={} splits={} us={:.1} \
                     kv_MB={:.1} kv_GB_s={:.0} of_copy={:.2}",
                    if shape.kv_cache == KvCacheDtype::Fp8 {
                        "fp8"
                    } else {
                        "bf16"
                    },
                    t.sequences,
                    t.context,
                    t.splits,
                    t.micros,
                    t.kv_bytes as f64 / 1e6,
                    rate / 1e9,
                    rate / copy,
                );
            }
            Ok(())
        }
        Command::Bench(args) => {
            let config = dummy::read_config(&args.config)?;
            let options = CudaOptions {
                max_batched_tokens: args.max_batched_tokens,
                max_running: args.max_running,
                kv: KvBudget::MemoryFraction(args.gpu_memory_fraction),
                cuda_graphs: !args.no_cuda_graphs,
                batch_invariant: args.batch_invariant,
                tensor_parallel: TensorParallel {
                    size: args.tensor_parallel_size,
                    placement: args.placement.placement(),
                    all_reduce: args.all_reduce.into(),
                },
                quantization: args.quantization.into(),
                kv_cache_dtype: args.kv_cache_dtype.into(),
                ..CudaOptions::default()
            };
            let mut runner = CudaRunner::new(config, &WeightSource::Dummy { seed: 0 }, options)?;
            let name = args
                .config
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string()
                + if args.batch_invariant {
                    "+invariant"
                } else {
                    ""
                }
                + &match (args.tensor_parallel_size, args.placement.placement()) {
                    (1, _) => String::new(),
                    (n, RankPlacement::OneGpuEach) => format!("+tp{n}"),
                    (n, RankPlacement::AllOnFirstGpu) => format!("+tp{n}onegpu"),
                }
                + match (args.tensor_parallel_size, args.all_reduce) {
                    (1, _) | (_, AllReduceArg::PeerToPeer) => "",
                    (_, AllReduceArg::PeerToPeerSmallSteps) => "+p2psmall",
                    (_, AllReduceArg::Nccl) => "+nccl",
                    (_, AllReduceArg::SkipForTiming) => "+nosums",
                }
                + if args.quantization == QuantizationArg::Fp8 {
                    "+fp8"
                } else {
                    ""
                }
                + if args.kv_cache_dtype == KvCacheArg::Fp8 {
                    "+fp8kv"
                } else {
                    ""
                }
                + if args.overlap { "+overlap" } else { "" };
            let load = Load {
                requests: args.requests,
                prompt_len: args.prompt_len,
                output_len: args.output_len,
                max_running: args.max_running,
                max_batched_tokens: args.max_batched_tokens,
                seed: 1,
                overlap: args.overlap,
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
                 mean_decode_step_ms={:.2} (runner host {:.2} + GPU wait {:.2}; packing {:.2} \
                 of the host's)",
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
                m.mean_decode_pack * 1e3,
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
                     (runner host {:.2} + GPU wait {:.2}; packing {:.2} of the host's)",
                    single.mean_decode_step * 1e3,
                    single.seconds,
                    single.mean_decode_host * 1e3,
                    single.mean_decode_wait * 1e3,
                    single.mean_decode_pack * 1e3,
                );
            }
            Ok(())
        }
    }
}
