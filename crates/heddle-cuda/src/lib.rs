//! heddle-cuda: the GPU model runner. Llama-family models (Llama, Qwen2) in bf16 on an
//! NVIDIA GPU, behind [`heddle_model::ModelRunner`].
//!
//! The CUDA driver, NVRTC, cuBLAS and (for tensor parallelism over several GPUs) NCCL are
//! loaded at run time (cudarc's dynamic loading), so this crate builds anywhere without a
//! CUDA toolkit; the kernels (kernels.cu) are compiled by NVRTC for the GPU at hand when a
//! runner starts. See docs/CUDA.md.

pub mod adjustments;
pub mod bench;
pub mod collective;
pub mod decode_case;
pub mod dummy;
pub mod fp8;
pub mod fp8_check;
pub mod gemm_bench;
pub mod gguf_reference;
pub mod gpu;
pub mod invariance;
pub mod kernels;
pub mod lt_matmul;
pub mod memory;
pub mod parallel_checks;
pub mod peer_sums;
pub mod pinned_gemm;
pub mod plan;
pub mod reference;
pub mod runner;
pub mod selftest;
pub mod tensor_parallel;
pub mod weights;
pub mod xorshift;

pub use kernels::{DType, KvCacheDtype};
pub use runner::{CudaOptions, CudaRunner, KvBudget, Quantization, WeightSource};
pub use tensor_parallel::{AllReduce, RankPlacement, TensorParallel};

/// Whether a CUDA device can be opened here, or why not.
pub fn probe_device() -> anyhow::Result<String> {
    let ctx = gpu::open_device(0)?;
    Ok(ctx.name()?)
}
