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
use cudarc::cublaslt::sys;

use crate::lt_matmul::{layouts, Layout, LtMatmul};

/// What an algorithm is chosen for: the weight's shape and the output type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Problem {
    n: usize,
    k: usize,
    f32_out: bool,
}

pub struct PinnedGemms {
    matmul: LtMatmul,
    data: sys::cudaDataType,
    /// Rows the algorithms are chosen for: the runner's largest step.
    reference_rows: usize,
    algorithms: Mutex<HashMap<Problem, sys::cublasLtMatmulAlgo_t>>,
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
        Ok(PinnedGemms {
            matmul: LtMatmul::new(workspace, workspace_bytes)?,
            data: if bf16 {
                sys::cudaDataType::CUDA_R_16BF
            } else {
                sys::cudaDataType::CUDA_R_32F
            },
            reference_rows: reference_rows.max(1),
            algorithms: Mutex::new(HashMap::new()),
        })
    }

    fn layouts(&self, problem: Problem, rows: usize) -> anyhow::Result<[Layout; 3]> {
        let out = if problem.f32_out {
            sys::cudaDataType::CUDA_R_32F
        } else {
            self.data
        };
        layouts(self.data, self.data, out, rows, problem.n, problem.k)
    }

    /// The algorithm for `problem`: cuBLASLt's first choice for `reference_rows` rows
    /// among those without a split-K reduction, found on first use.
    fn algorithm(&self, problem: Problem) -> anyhow::Result<sys::cublasLtMatmulAlgo_t> {
        let mut algorithms = self.algorithms.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(algo) = algorithms.get(&problem) {
            return Ok(*algo);
        }
        let layouts = self.layouts(problem, self.reference_rows)?;
        let algo = self
            .matmul
            .first_algorithm(&layouts, true)
            .with_context(|| {
                format!(
                    "cuBLASLt has no split-K-free algorithm for {}x{}x{}",
                    self.reference_rows, problem.n, problem.k
                )
            })?;
        tracing::debug!(n = problem.n, k = problem.k, "pinned a cuBLASLt algorithm");
        algorithms.insert(problem, algo);
        Ok(algo)
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
        let layouts = self.layouts(problem, rows)?;
        // SAFETY: the pointers address live buffers of the stated shapes; the workspace is
        // the runner's and outlives the call.
        unsafe {
            self.matmul
                .run(&algo, &layouts, w, x, y, stream as sys::cudaStream_t)
        }
        .with_context(|| format!("cuBLASLt GEMM {rows}x{n}x{k} with the pinned algorithm"))
    }
}
