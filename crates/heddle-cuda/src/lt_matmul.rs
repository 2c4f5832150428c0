//! cuBLASLt plumbing shared by the pinned GEMMs (batch-invariant mode) and the FP8 GEMMs:
//! a handle with one matmul descriptor for y = x · wᵀ, the matrix layouts, the heuristic's
//! candidates, their timing, and the call.
//!
//! In cuBLAS's column-major view a row-major weight [n, k] is a k × n matrix used
//! transposed (A), the activations [rows, k] are k × rows (B), and the output [rows, n] is
//! n × rows (C and D).

use anyhow::Context;
use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::{sys::CUevent_flags, CudaStream};

/// A matrix layout, destroyed when dropped.
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

/// The layouts of y[rows, n] = x[rows, k] · w[n, k]ᵀ: A (the weight), B (x), C = D (y).
pub(crate) fn layouts(
    weights: sys::cudaDataType,
    activations: sys::cudaDataType,
    out: sys::cudaDataType,
    rows: usize,
    n: usize,
    k: usize,
) -> anyhow::Result<[Layout; 3]> {
    Ok([
        Layout::new(weights, k, n)?,
        Layout::new(activations, k, rows)?,
        Layout::new(out, n, rows)?,
    ])
}

/// A cuBLASLt handle and a matmul descriptor (f32 compute and scale, A transposed, B not),
/// destroyed when dropped. The handle belongs to the device current when it was made.
pub(crate) struct LtMatmul {
    handle: sys::cublasLtHandle_t,
    pub(crate) desc: sys::cublasLtMatmulDesc_t,
    workspace: u64,
    workspace_bytes: usize,
}

// SAFETY: the handle and descriptor are used through `&self` by one thread at a time (the
// runner's), on its one stream; cuBLASLt handles may move between threads.
unsafe impl Send for LtMatmul {}
unsafe impl Sync for LtMatmul {}

impl Drop for LtMatmul {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once here.
        unsafe {
            let _ = lt::destroy_matmul_desc(self.desc);
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

impl LtMatmul {
    /// `workspace`: device memory of `workspace_bytes` the GEMMs may use (the runner's,
    /// shared with cuBLAS on its one stream).
    pub(crate) fn new(workspace: u64, workspace_bytes: usize) -> anyhow::Result<Self> {
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
        let matmul = LtMatmul {
            handle,
            desc,
            workspace,
            workspace_bytes,
        };
        use sys::cublasLtMatmulDescAttributes_t as A;
        // SAFETY: the descriptor is live; the values are i32 as the attributes want.
        unsafe {
            matmul.set(A::CUBLASLT_MATMUL_DESC_TRANSA, 1i32)?;
            matmul.set(A::CUBLASLT_MATMUL_DESC_TRANSB, 0i32)?;
        }
        Ok(matmul)
    }

    /// Sets one attribute of the descriptor.
    ///
    /// # Safety
    /// `T` must be the attribute's type, and no call may be using the descriptor meanwhile.
    pub(crate) unsafe fn set<T>(
        &self,
        attribute: sys::cublasLtMatmulDescAttributes_t,
        value: T,
    ) -> anyhow::Result<()> {
        lt::set_matmul_desc_attribute(
            self.desc,
            attribute,
            (&value) as *const T as *const _,
            std::mem::size_of::<T>(),
        )
        .map_err(|e| anyhow::anyhow!("cuBLASLt attribute {attribute:?}: {e}"))
    }

    /// cuBLASLt's first choice for `layouts` within the workspace, among the algorithms
    /// without a split-K reduction when `without_split_k`.
    pub(crate) fn first_algorithm(
        &self,
        layouts: &[Layout; 3],
        without_split_k: bool,
    ) -> anyhow::Result<sys::cublasLtMatmulAlgo_t> {
        self.candidates(layouts, without_split_k, 1)?
            .into_iter()
            .next()
            .context("cuBLASLt's heuristic returned no algorithm")
    }

    /// Up to `max` algorithms for `layouts` within the workspace, in the order cuBLASLt's
    /// heuristic ranks them (without a split-K reduction when `without_split_k`).
    pub(crate) fn candidates(
        &self,
        layouts: &[Layout; 3],
        without_split_k: bool,
        max: usize,
    ) -> anyhow::Result<Vec<sys::cublasLtMatmulAlgo_t>> {
        let [a, b, c] = layouts;
        let pref = lt::create_matmul_pref().map_err(|e| anyhow::anyhow!("{e}"))?;
        let workspace = self.workspace_bytes as u64;
        let no_reduction = sys::cublasLtReductionScheme_t::CUBLASLT_REDUCTION_SCHEME_NONE as u32;
        // SAFETY: all zeros is a valid bit pattern of this plain C struct; the heuristic
        // overwrites the entries it returns.
        let mut results: Vec<sys::cublasLtMatmulHeuristicResult_t> =
            vec![unsafe { std::mem::zeroed() }; max.max(1)];
        let mut returned = 0i32;
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        // SAFETY: the preference and layouts are live; the values have the attributes'
        // types; `results` has room for the count asked for.
        let found = unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&workspace) as *const u64 as *const _,
                8,
            )
            .and_then(|()| {
                if without_split_k {
                    lt::set_matmul_pref_attribute(
                        pref,
                        P::CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                        (&no_reduction) as *const u32 as *const _,
                        4,
                    )
                } else {
                    Ok(())
                }
            })
            .and_then(|()| {
                sys::cublasLtMatmulAlgoGetHeuristic(
                    self.handle,
                    self.desc,
                    a.0,
                    b.0,
                    c.0,
                    c.0,
                    pref,
                    results.len() as i32,
                    results.as_mut_ptr(),
                    &mut returned,
                )
                .result()
            })
        };
        // SAFETY: created above, destroyed once.
        unsafe {
            let _ = lt::destroy_matmul_pref(pref);
        }
        found.map_err(|e| anyhow::anyhow!("{e:?}"))?;
        Ok(results
            .iter()
            .take(returned.max(0) as usize)
            .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .map(|r| r.algo)
            .collect())
    }

    /// Whether `algo` (chosen for another row count) runs the problem of `layouts`.
    pub(crate) fn supports(&self, algo: &sys::cublasLtMatmulAlgo_t, layouts: &[Layout; 3]) -> bool {
        let [a, b, c] = layouts;
        // SAFETY: zeroed plain C struct, written by the check.
        let mut result: sys::cublasLtMatmulHeuristicResult_t = unsafe { std::mem::zeroed() };
        // SAFETY: the handle, descriptor and layouts are live.
        let status = unsafe {
            sys::cublasLtMatmulAlgoCheck(
                self.handle,
                self.desc,
                a.0,
                b.0,
                c.0,
                c.0,
                algo,
                &mut result,
            )
        };
        status == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
            && result.workspaceSize <= self.workspace_bytes
    }

    /// Microseconds `algo` takes for one GEMM of `layouts`, timed on the GPU with events
    /// over `repeats` runs after one untimed run (which loads its kernel); waits for the
    /// stream. The output buffer is overwritten.
    ///
    /// # Safety
    /// As for [`Self::run`]; the stream must not be capturing.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn time(
        &self,
        algo: &sys::cublasLtMatmulAlgo_t,
        layouts: &[Layout; 3],
        w: u64,
        x: u64,
        y: u64,
        stream: &CudaStream,
        repeats: usize,
    ) -> anyhow::Result<f64> {
        let raw = stream.cu_stream() as sys::cudaStream_t;
        self.run(algo, layouts, w, x, y, raw)?;
        let timed = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let start = stream.record_event(timed)?;
        for _ in 0..repeats {
            self.run(algo, layouts, w, x, y, raw)?;
        }
        let end = stream.record_event(timed)?;
        Ok(start.elapsed_ms(&end)? as f64 * 1e3 / repeats as f64)
    }

    /// y = x · wᵀ with `algo`, on `stream`.
    ///
    /// # Safety
    /// The pointers must address live buffers of the layouts' shapes and types, and the
    /// descriptor's other attributes (scale pointers) must be valid for the call.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn run(
        &self,
        algo: &sys::cublasLtMatmulAlgo_t,
        layouts: &[Layout; 3],
        w: u64,
        x: u64,
        y: u64,
        stream: sys::cudaStream_t,
    ) -> anyhow::Result<()> {
        let [a, b, c] = layouts;
        let (alpha, beta) = (1.0f32, 0.0f32);
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
            algo,
            self.workspace as *mut _,
            self.workspace_bytes,
            stream,
        )
        .context("cuBLASLt matmul")
    }
}
