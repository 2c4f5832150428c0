//! heddle's CUDA kernels compile, as a runner compiles them at start, for every kind of
//! shape the runner accepts (head sizes 32, 64 and 128; grouped, multi-head and wide-group
//! attention; bf16, bf16 with the FP8 KV cache, and f32) for Ampere and Hopper — on
//! machines without a GPU too, since NVRTC is a library: scripts/nvrtc.sh fetches it and
//! scripts/test.sh puts it on the library path. A GPU machine meets a kernel's compile
//! error only when a runner starts; this test meets it in CI.

use heddle_cuda::gpu::compile_kernels;
use heddle_cuda::kernels::{KernelShape, KvCacheDtype};
use heddle_cuda::DType;

#[test]
fn kernels_compile_for_every_kind_of_supported_shape() {
    // SAFETY: only tries to open the library.
    let present = unsafe { cudarc::nvrtc::sys::is_culib_present() };
    assert!(
        present,
        "NVRTC (libnvrtc.so) is not on the library path: run `bash scripts/nvrtc.sh` and put \
         the directory it prints on LD_LIBRARY_PATH (scripts/test.sh does both)"
    );
    // (head_dim, heads, KV heads): Llama-3.1-8B, Llama-3.2-1B, SmolLM2-135M, the self-test's
    // tiny model, Qwen2-7B (groups of 7), multi-head, and a group too wide for the decode
    // kernel (16 heads a KV head); then one rank's slice under tensor parallelism:
    // Llama-3.1-8B over 2, 4 and 8 ranks (down to one KV head a rank) and the tiny model
    // over 2.
    let shapes = [
        (128, 32, 8),
        (64, 32, 8),
        (64, 9, 3),
        (32, 4, 2),
        (128, 28, 4),
        (128, 16, 16),
        (128, 32, 2),
        (128, 16, 4),
        (128, 8, 2),
        (128, 4, 1),
        (32, 2, 1),
    ];
    // The FP8 KV cache is read by the bf16 kernels only.
    let kinds = [
        (DType::Bf16, KvCacheDtype::Auto),
        (DType::Bf16, KvCacheDtype::Fp8),
        (DType::F32, KvCacheDtype::Auto),
    ];
    for (head_dim, num_heads, num_kv_heads) in shapes {
        for (dtype, kv_cache) in kinds {
            let shape = KernelShape {
                head_dim,
                num_heads,
                num_kv_heads,
                block_size: 16,
                dtype,
                kv_cache,
            };
            for arch in ["sm_80", "sm_90"] {
                if let Err(e) = compile_kernels(&shape, arch) {
                    panic!("{shape:?} for {arch}: {e:#}");
                }
            }
        }
    }
}
