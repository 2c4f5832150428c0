//! GEMMs whose every output row is computed the same way whatever the number of rows:
//! cuBLASLt with one algorithm per weight shape, chosen once (for the largest step) and
//! used for every step, with split-K reductions excluded.
//!
//! cuBLAS picks its kernel per call from the problem's shape, so the same row multiplied
//! in a batch of 1, 7 or 256 can be summed in different orders (different tiles, split-K)
//! and round differently. A fixed kernel without split-K sums each output element over K
//! in one fixed order, so a request's activations no longer depend on its neighbours.

use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::Context;
use cudarc::cublaslt::{result as lt, sys};

/// What an algorithm is chosen for: the weight's shape and the output type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Problem {
    n: usize,
    k: usize,
    f32_out: bool,
}

pub struct PinnedGemms {
    handle: sys::cublasLtHandle_t,
    /// f32 compute and scale, A (the weight) transposed, B not.
    desc: sys::cublasLtMatmulDesc_t,
    data: sys::cudaDataType,
    /// Rows the algorithms are chosen for: the runner's largest step.
    reference_rows: usize,
    workspace: u64,
    workspace_bytes: usize,
    algorithms: Mutex<HashMap<Problem, sys::cublasLtMatmulAlgo_t>>,
}

// SAFETY: the handle and descriptor are only used through `&self` from the runner's one
// thread at a time, on its one stream; cuBLASLt handles may move between threads.
unsafe impl Send for PinnedGemms {}
unsafe impl Sync for PinnedGemms {}

impl Drop for PinnedGemms {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once here.
        unsafe {
            let _ = lt::destroy_matmul_desc(self.desc);
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

/// A matrix layout destroyed when dropped.
pub(crate) struct Layout(pub(crate) sys::cublasLtMatrixLayout_t);

impl Layout {
    /// Column-major `rows` × `cols` with leading dimension `rows`.
    pub(crate) fn new(data: sys::cudaDataType, rows: usize, cols: usize) -> anyhow::Result<Self> {
        Ok(Layout(
            lt::create_matrix_layout(data, rows as u64, cols as u64, rows as i64)
                .map_err(|e| anyhow::anyhow!("cuBLASLt layout: {e}"))?,
        ))
    }
}

impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once here.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.0);
        }
    }
}

impl PinnedGemms {
    /// `bf16` selects bf16 operands (else f32); `workspace` is device memory of
    /// `workspace_bytes` that the GEMMs may use (shared with cuBLAS: one stream).
    pub fn new(
        bf16: bool,
        reference_rows: usize,
        workspace: u64,
        workspace_bytes: usize,
    ) -> anyhow::Result<Self> {
        // SAFETY: only tries to open the library.
        anyhow::ensure!(
            unsafe { sys::is_culib_present() },
            "cuBLASLt (libcublasLt.so) could not be loaded: put the CUDA toolkit's lib64 on \
             LD_LIBRARY_PATH"
        );
        let handle = lt::create_handle().map_err(|e| anyhow::anyhow!("starting cuBLASLt: {e}"))?;
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .map_err(|e| anyhow::anyhow!("cuBLASLt matmul descriptor: {e}"))?;
        for (attr, value) in [
            (
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                1i32,
            ),
            (
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                0i32,
            ),
        ] {
            // SAFETY: the descriptor is live; the value is an i32 as the attribute wants.
            unsafe {
                lt::set_matmul_desc_attribute(desc, attr, (&value) as *const i32 as *const _, 4)
            }
            .map_err(|e| anyhow::anyhow!("cuBLASLt transpose attribute: {e}"))?;
        }
        Ok(PinnedGemms {
            handle,
            desc,
            data: if bf16 {
                sys::cudaDataType::CUDA_R_16BF
            } else {
                sys::cudaDataType::CUDA_R_32F
            },
            reference_rows: reference_rows.max(1),
            workspace,
            workspace_bytes,
            algorithms: Mutex::new(HashMap::new()),
        })
    }

    fn layouts(&self, problem: Problem, rows: usize) -> anyhow::Result<[Layout; 3]> {
        let out = if problem.f32_out {
            sys::cudaDataType::CUDA_R_32F
        } else {
            self.data
        };
        // Column-major: the weight is stored [n, k] row-major = k × n column-major, used
        // transposed; x is k × rows; y is n × rows.
        Ok([
            Layout::new(self.data, problem.k, problem.n)?,
            Layout::new(self.data, problem.k, rows)?,
            Layout::new(out, problem.n, rows)?,
        ])
    }

    /// The algorithm for `problem`: cuBLASLt's first choice for `reference_rows` rows
    /// among those without a split-K reduction, found on first use.
    fn algorithm(&self, problem: Problem) -> anyhow::Result<sys::cublasLtMatmulAlgo_t> {
        let mut algorithms = self.algorithms.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(algo) = algorithms.get(&problem) {
            return Ok(*algo);
        }
        let [a, b, c] = self.layouts(problem, self.reference_rows)?;
        let pref = lt::create_matmul_pref().map_err(|e| anyhow::anyhow!("{e}"))?;
        let found = (|| {
            let workspace = self.workspace_bytes as u64;
            let no_reduction =
                sys::cublasLtReductionScheme_t::CUBLASLT_REDUCTION_SCHEME_NONE as u32;
            // SAFETY: the preference is live; the values have the attributes' types.
            unsafe {
                lt::set_matmul_pref_attribute(
                    pref,
                    sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    (&workspace) as *const u64 as *const _,
                    8,
                )?;
                lt::set_matmul_pref_attribute(
                    pref,
                    sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                    (&no_reduction) as *const u32 as *const _,
                    4,
                )?;
                lt::get_matmul_algo_heuristic(self.handle, self.desc, a.0, b.0, c.0, c.0, pref)
            }
        })();
        // SAFETY: created above, destroyed once.
        unsafe {
            let _ = lt::destroy_matmul_pref(pref);
        }
        let heuristic = found.map_err(|e| {
            anyhow::anyhow!(
                "cuBLASLt has no split-K-free algorithm for {}x{}x{}: {e}",
                self.reference_rows,
                problem.n,
                problem.k
            )
        })?;
        tracing::debug!(n = problem.n, k = problem.k, "pinned a cuBLASLt algorithm");
        algorithms.insert(problem, heuristic.algo);
        Ok(heuristic.algo)
    }

    /// y[rows, n] = x[rows, k] · w[n, k]ᵀ (row-major), accumulated in f32, with the
    /// algorithm pinned for (n, k).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        stream: cudarc::driver::sys::CUstream,
        y: u64,
        f32_out: bool,
        x: u64,
        w: u64,
        rows: usize,
        n: usize,
        k: usize,
    ) -> anyhow::Result<()> {
        let problem = Problem { n, k, f32_out };
        let algo = self.algorithm(problem)?;
        let [a, b, c] = self.layouts(problem, rows)?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the pointers address live buffers of the stated shapes; the workspace is
        // the runner's and outlives the call.
        unsafe {
            lt::matmul(
                self.handle,
                self.desc,
                (&alpha) as *const f32 as *const _,
                (&beta) as *const f32 as *const _,
                w as *const _,
                a.0,
                x as *const _,
                b.0,
                y as *const _,
                c.0,
                y as *mut _,
                c.0,
                &algo,
                self.workspace as *mut _,
                self.workspace_bytes,
                stream as sys::cudaStream_t,
            )
        }
        .with_context(|| format!("cuBLASLt GEMM {rows}x{n}x{k} with the pinned algorithm"))
    }
}
