//! The device: a CUDA context and stream, the compiled kernels, cuBLAS, and device memory
//! addressed by raw pointers (one stream, so no per-buffer event tracking is needed).

use std::sync::Arc;

use anyhow::Context;
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};

use crate::fp8::{Accumulation, Fp8Gemms, Fp8Tensor, ScaleMode};
use crate::kernels::{DType, KernelShape, DECODE_KERNELS, KERNEL_NAMES};
use crate::pinned_gemm::PinnedGemms;

/// A device allocation and its address (kernels and cuBLAS take raw pointers).
pub struct DeviceBuffer {
    _memory: CudaSlice<u8>,
    pub ptr: u64,
    pub bytes: usize,
}

/// Page-locked host words that copies to the GPU start from (see [`Gpu::write_staged`]).
pub struct StagingBuffer {
    words: cudarc::driver::PinnedHostSlice<i32>,
}

impl StagingBuffer {
    pub fn len(&self) -> usize {
        self.words.len()
    }

    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// The first `len` words, to fill before [`Gpu::write_staged`].
    pub fn words(&mut self, len: usize) -> anyhow::Result<&mut [i32]> {
        let words = self.words.as_mut_slice().context("page-locked memory")?;
        words.get_mut(..len).context("staging buffer too small")
    }
}

/// The compiled kernels, by name.
pub struct Kernels {
    functions: Vec<(&'static str, CudaFunction)>,
}

impl Kernels {
    pub fn get(&self, name: &str) -> &CudaFunction {
        &self
            .functions
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("kernel {name} is not compiled"))
            .1
    }
}

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub kernels: Kernels,
    blas: CudaBlas,
    /// Set in batch-invariant mode: GEMMs go to cuBLASLt with pinned algorithms.
    pinned: Option<PinnedGemms>,
    /// Set with `--quantization fp8`: the FP8 GEMMs of the quantized projections.
    fp8: Option<Fp8Gemms>,
    pub dtype: DType,
    pub name: String,
    pub multiprocessors: usize,
    /// (major, minor).
    pub compute_capability: (i32, i32),
}

/// Compiles the kernels for `shape` with NVRTC into PTX for `arch` (e.g. "sm_90"). Needs
/// NVRTC only, no GPU.
pub fn compile_kernels(shape: &KernelShape, arch: &str) -> anyhow::Result<Ptx> {
    let options = CompileOptions {
        options: vec![format!("--gpu-architecture={arch}"), "-std=c++17".into()],
        ..Default::default()
    };
    compile_ptx_with_opts(shape.source(), options)
        .map_err(|e| anyhow::anyhow!("compiling the CUDA kernels for {arch}: {e:?}"))
}

/// Opens GPU `ordinal`. Fails with a message that says what is missing when there is no
/// driver, no NVRTC or cuBLAS library, or no such device (cudarc loads the libraries at run
/// time, and would panic on first use of a missing one, so they are looked for first).
pub fn open_device(ordinal: usize) -> anyhow::Result<Arc<CudaContext>> {
    check_libraries()?;
    CudaContext::new(ordinal).map_err(|e| anyhow::anyhow!("no usable CUDA device {ordinal}: {e}"))
}

/// How many CUDA devices this process sees (after CUDA_VISIBLE_DEVICES).
pub fn device_count() -> anyhow::Result<usize> {
    check_libraries()?;
    let count = CudaContext::device_count()
        .map_err(|e| anyhow::anyhow!("counting the CUDA devices: {e}"))?;
    Ok(count.max(0) as usize)
}

fn check_libraries() -> anyhow::Result<()> {
    // SAFETY: these only try to open the shared libraries.
    let (driver, nvrtc, cublas) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
            cudarc::cublas::sys::is_culib_present(),
        )
    };
    anyhow::ensure!(
        driver,
        "no CUDA driver: libcuda.so could not be loaded (no NVIDIA GPU or driver here)"
    );
    anyhow::ensure!(
        nvrtc,
        "NVRTC (libnvrtc.so) could not be loaded: put the CUDA toolkit's lib64 on LD_LIBRARY_PATH"
    );
    anyhow::ensure!(
        cublas,
        "cuBLAS (libcublas.so) could not be loaded: put the CUDA toolkit's lib64 on \
         LD_LIBRARY_PATH"
    );
    Ok(())
}

impl Gpu {
    /// Opens GPU 0, compiles the kernels for `shape` with NVRTC and starts cuBLAS.
    pub fn new(shape: &KernelShape) -> anyhow::Result<Self> {
        Self::on_device(0, shape)
    }

    /// Opens GPU `ordinal`, compiles the kernels for `shape` with NVRTC and starts cuBLAS.
    pub fn on_device(ordinal: usize, shape: &KernelShape) -> anyhow::Result<Self> {
        let ctx = open_device(ordinal)?;
        // One stream: ordering is the stream's, so cudarc need not record events per buffer.
        // SAFETY: no buffer is used on another stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().context("creating a CUDA stream")?;
        let (major, minor) = ctx.compute_capability()?;
        let name = ctx.name()?;
        let multiprocessors = ctx.attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )? as usize;
        anyhow::ensure!(
            major >= 8 || shape.dtype == DType::F32,
            "{name} (compute capability {major}.{minor}) has no bf16 tensor cores: the CUDA \
             runner needs compute capability 8.0 (Ampere) or newer"
        );
        let started = std::time::Instant::now();
        let compiled = compile_kernels(shape, &format!("sm_{major}{minor}"))?;
        let module = ctx
            .load_module(compiled)
            .context("loading the CUDA kernels")?;
        let functions = KERNEL_NAMES
            .iter()
            .filter(|n| shape.has_decode_kernel() || !DECODE_KERNELS.contains(n))
            .chain(&crate::peer_sums::KERNEL_NAMES)
            .map(|&n| Ok((n, module.load_function(n)?)))
            .collect::<Result<_, cudarc::driver::DriverError>>()
            .context("finding the CUDA kernels")?;
        tracing::info!(
            device = %name,
            ordinal,
            compute_capability = format!("{major}.{minor}"),
            ms = started.elapsed().as_millis() as u64,
            "CUDA kernels compiled"
        );
        let blas = CudaBlas::new(stream.clone()).context("starting cuBLAS")?;
        Ok(Gpu {
            ctx,
            stream,
            kernels: Kernels { functions },
            blas,
            pinned: None,
            fp8: None,
            dtype: shape.dtype,
            name,
            multiprocessors,
            compute_capability: (major, minor),
        })
    }

    /// Whether the GPU converts to and multiplies FP8 (E4M3): compute capability 8.9 (Ada)
    /// or newer.
    pub fn has_fp8(&self) -> bool {
        self.compute_capability >= (8, 9)
    }

    /// Refuses `what` (a flag) unless the GPU has FP8.
    pub fn ensure_fp8(&self, what: &str) -> anyhow::Result<()> {
        let (major, minor) = self.compute_capability;
        anyhow::ensure!(
            self.has_fp8(),
            "{} (compute capability {major}.{minor}) has no FP8: {what} needs compute \
             capability 8.9 (Ada) or newer",
            self.name
        );
        Ok(())
    }

    /// Zeroed device memory.
    pub fn alloc(&self, bytes: usize) -> anyhow::Result<DeviceBuffer> {
        let memory = self
            .stream
            .alloc_zeros::<u8>(bytes.max(16))
            .with_context(|| format!("allocating {} MiB on the GPU", bytes >> 20))?;
        let ptr = memory.device_ptr(&self.stream).0;
        Ok(DeviceBuffer {
            _memory: memory,
            ptr,
            bytes,
        })
    }

    /// Device memory holding `data`.
    pub fn upload<T: cudarc::driver::DeviceRepr>(
        &self,
        data: &[T],
    ) -> anyhow::Result<DeviceBuffer> {
        let bytes = std::mem::size_of_val(data);
        let buffer = self.alloc(bytes)?;
        // SAFETY: the buffer holds at least `bytes` bytes; the copy is ordered on the stream.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(buffer.ptr, data, self.stream.cu_stream())
        }
        .context("copying to the GPU")?;
        Ok(buffer)
    }

    /// Page-locked host memory for `len` i32 words, for [`Self::write_staged`].
    pub fn alloc_staging(&self, len: usize) -> anyhow::Result<StagingBuffer> {
        // SAFETY: the words are written before any copy reads them.
        let words = unsafe { self.ctx.alloc_pinned::<i32>(len.max(1)) }
            .with_context(|| format!("allocating {} KiB of page-locked memory", len >> 8))?;
        Ok(StagingBuffer { words })
    }

    /// Page-locked host memory for `len` i32 words that copies from the GPU land in, for
    /// [`Self::read_staged`]: cached, unlike [`Self::alloc_staging`]'s write-combined
    /// words, which the host reads slowly.
    pub fn alloc_readback(&self, len: usize) -> anyhow::Result<StagingBuffer> {
        // SAFETY: the words are only read after a copy into them has completed.
        let words = unsafe { self.ctx.alloc_pinned_with_flags::<i32>(len.max(1), 0) }
            .with_context(|| format!("allocating {} KiB of page-locked memory", len >> 8))?;
        Ok(StagingBuffer { words })
    }

    /// Queues a copy of the first `len` words of `buffer` into `staging` and returns at
    /// once: the words hold the copy once the stream has passed it (an event recorded
    /// after it has completed).
    pub fn read_staged(
        &self,
        buffer: &DeviceBuffer,
        staging: &mut StagingBuffer,
        len: usize,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(len * 4 <= buffer.bytes, "buffer too small");
        let words = staging.words(len)?;
        self.bind()?;
        // SAFETY: checked above; the caller reads the words only after the copy is done.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(words, buffer.ptr, self.stream.cu_stream())
        }
        .context("copying from the GPU")
    }

    /// Queues a copy of the first `len` words of `staging` to the start of `buffer` and
    /// returns at once: a copy from page-locked memory needs no wait, where one from
    /// ordinary memory first waits for the stream's queued work. `staging` must not be
    /// written again before the stream has passed this copy (the runner's metadata takes
    /// two staging buffers in turn, and writes one only once the step that used it last
    /// is done).
    pub fn write_staged(
        &self,
        staging: &mut StagingBuffer,
        len: usize,
        buffer: &DeviceBuffer,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(len * 4 <= buffer.bytes, "buffer too small");
        let words = staging.words(len)?;
        self.bind()?;
        // SAFETY: checked above; the staging words stay untouched until the copy is done.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(buffer.ptr, &*words, self.stream.cu_stream())
        }
        .context("copying to the GPU")
    }

    /// Copies `data` to the start of `buffer`.
    pub fn write<T: cudarc::driver::DeviceRepr>(
        &self,
        buffer: &DeviceBuffer,
        data: &[T],
    ) -> anyhow::Result<()> {
        anyhow::ensure!(
            std::mem::size_of_val(data) <= buffer.bytes,
            "buffer too small"
        );
        self.bind()?;
        // SAFETY: checked above; the host data is staged before the call returns.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(buffer.ptr, data, self.stream.cu_stream())
        }
        .context("copying to the GPU")?;
        Ok(())
    }

    /// Copies the start of `buffer` into `out` and waits for it (the step's one sync).
    pub fn read<T: cudarc::driver::DeviceRepr>(
        &self,
        buffer: &DeviceBuffer,
        out: &mut [T],
    ) -> anyhow::Result<()> {
        anyhow::ensure!(
            std::mem::size_of_val(out) <= buffer.bytes,
            "buffer too small"
        );
        self.bind()?;
        // SAFETY: checked above; the stream is synchronised before `out` is read.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(out, buffer.ptr, self.stream.cu_stream())
        }
        .context("copying from the GPU")?;
        self.stream.synchronize().context("waiting for the GPU")?;
        Ok(())
    }

    /// Launches `name` with `args` (pushed in order) on the stream.
    pub fn launch(
        &self,
        name: &str,
        config: LaunchConfig,
        args: &[&dyn KernelArg],
    ) -> anyhow::Result<()> {
        let function = self.kernels.get(name);
        let mut builder = self.stream.launch_builder(function);
        for arg in args {
            arg.push(&mut builder);
        }
        // SAFETY: each kernel's arguments match its C signature (checked by the GPU
        // self-test); pointers come from live `DeviceBuffer`s.
        unsafe { builder.launch(config) }.with_context(|| format!("launching {name}"))?;
        Ok(())
    }

    /// y[rows, n] = x[rows, k] · w[n, k]ᵀ, all row-major; x and w in the runner's dtype,
    /// y in it too or in f32 (`f32_out`), accumulated in f32.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        y: u64,
        f32_out: bool,
        x: u64,
        w: u64,
        rows: usize,
        n: usize,
        k: usize,
    ) -> anyhow::Result<()> {
        if rows == 0 {
            return Ok(());
        }
        // cuBLAS handles belong to the device that was current when they were made.
        self.bind()?;
        if let Some(pinned) = &self.pinned {
            return pinned.gemm(self.stream.cu_stream(), y, f32_out, x, w, rows, n, k);
        }
        let data = match self.dtype {
            DType::Bf16 => blas_sys::cudaDataType::CUDA_R_16BF,
            DType::F32 => blas_sys::cudaDataType::CUDA_R_32F,
        };
        let out = if f32_out {
            blas_sys::cudaDataType::CUDA_R_32F
        } else {
            data
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        // Column-major view: yᵀ[n, rows] = w[n, k] (stored as wᵀ, k-major) · xᵀ[k, rows].
        // SAFETY: the pointers address live buffers of the stated shapes.
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                rows as i32,
                k as i32,
                (&alpha) as *const f32 as *const _,
                w as *const _,
                data,
                k as i32,
                x as *const _,
                data,
                k as i32,
                (&beta) as *const f32 as *const _,
                y as *mut _,
                out,
                n as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| anyhow::anyhow!("cuBLAS GEMM {rows}x{n}x{k}: {e:?}"))
    }

    /// From now on, every GEMM's algorithm is fixed per weight shape (chosen for
    /// `reference_rows` rows, without split-K), so that a row's result does not depend on
    /// how many rows the step has. `workspace` must outlive the GPU's use.
    pub fn pin_gemm_algorithms(
        &mut self,
        reference_rows: usize,
        workspace: &DeviceBuffer,
    ) -> anyhow::Result<()> {
        self.pinned = Some(PinnedGemms::new(
            self.dtype == DType::Bf16,
            reference_rows,
            workspace.ptr,
            workspace.bytes,
        )?);
        Ok(())
    }

    /// From now on, FP8 projections (`Matrix::Fp8`) can be multiplied here; refused on GPUs
    /// without FP8 tensor cores. `workspace` must outlive the GPU's use.
    pub fn enable_fp8(&mut self, workspace: &DeviceBuffer) -> anyhow::Result<()> {
        self.ensure_fp8("--quantization fp8")?;
        self.bind()?;
        self.fp8 = Some(Fp8Gemms::new(
            ScaleMode::PerTensor,
            Accumulation::Fast,
            workspace.ptr,
            workspace.bytes,
        )?);
        Ok(())
    }

    /// Times the FP8 GEMM's candidates for `w` at `rows` rows (see
    /// [`Fp8Gemms::time_choice`]); `activations` holds at least `rows` × `k` codes and `y`
    /// room for `rows` × `n` outputs. Waits for the stream.
    pub fn time_fp8_choice(
        &self,
        y: &DeviceBuffer,
        activations: &Fp8Tensor,
        w: &Fp8Tensor,
        rows: usize,
        n: usize,
        k: usize,
    ) -> anyhow::Result<()> {
        let gemms = self
            .fp8
            .as_ref()
            .context("timing FP8 GEMMs on a GPU whose FP8 GEMMs were not enabled")?;
        anyhow::ensure!(
            rows * k <= activations.codes.bytes && rows * n * 2 <= y.bytes,
            "FP8 GEMM timing: {rows} rows of {n}x{k} do not fit the buffers"
        );
        self.bind()?;
        // SAFETY: the buffers are live and large enough (checked); the runner times its
        // choices before it captures or runs any step.
        unsafe { gemms.time_choice(&self.stream, y.ptr, activations, w, (rows, n, k)) }
    }

    /// y[rows, n] = x[rows, k] · w[n, k]ᵀ for an FP8 weight: x (the runner's dtype) is
    /// quantized into `activations` first; y is in the runner's dtype.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_fp8(
        &self,
        y: u64,
        x: u64,
        activations: &Fp8Tensor,
        w: &Fp8Tensor,
        rows: usize,
        n: usize,
        k: usize,
    ) -> anyhow::Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let gemms = self
            .fp8
            .as_ref()
            .context("an FP8 projection on a GPU whose FP8 GEMMs were not enabled")?;
        activations.quantize(self, x, rows * k)?;
        self.bind()?;
        gemms.gemm(
            &self.stream,
            y,
            false,
            activations.codes.ptr,
            activations.scale.ptr,
            w.codes.ptr,
            w.scale.ptr,
            rows,
            n,
            k,
        )
    }

    /// Gives cuBLAS its workspace, so that it allocates nothing while a graph is captured.
    pub fn set_blas_workspace(&self, workspace: &DeviceBuffer) -> anyhow::Result<()> {
        // SAFETY: the buffer outlives the handle's use (the runner owns both).
        let status = unsafe {
            blas_sys::cublasSetWorkspace_v2(
                *self.blas.handle(),
                workspace.ptr as *mut _,
                workspace.bytes,
            )
        };
        anyhow::ensure!(
            status == blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS,
            "setting cuBLAS's workspace: {status:?}"
        );
        Ok(())
    }

    /// Makes this GPU's context the calling thread's current one: the raw copies and the
    /// cuBLAS calls act on the current context, and a runner with several GPUs switches
    /// between them (cudarc's own launches and allocations bind by themselves).
    pub fn bind(&self) -> anyhow::Result<()> {
        self.ctx
            .bind_to_thread()
            .context("making the GPU's context current")
    }

    /// Queues the zeroing of `bytes` bytes at `dst` on this GPU.
    pub fn zero(&self, dst: u64, bytes: usize) -> anyhow::Result<()> {
        self.bind()?;
        // SAFETY: the caller passes the address of a live buffer of at least `bytes` bytes;
        // the write is ordered on the stream.
        unsafe { cudarc::driver::result::memset_d8_async(dst, 0, bytes, self.stream.cu_stream()) }
            .context("zeroing GPU memory")
    }

    /// Queues a copy of `bytes` bytes from `src` to `dst`, both on this GPU.
    pub fn copy(&self, dst: u64, src: u64, bytes: usize) -> anyhow::Result<()> {
        self.bind()?;
        // SAFETY: the caller passes addresses of live buffers of at least `bytes` bytes;
        // the copy is ordered on the stream.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream())
        }
        .context("copying on the GPU")
    }

    /// Queues a copy of a `rows` × `row_bytes` block from `src` (rows `src_pitch` bytes
    /// apart) to `dst` (rows `dst_pitch` bytes apart), both on this GPU: one rank's
    /// columns of a matrix into the whole matrix.
    pub fn copy_block(
        &self,
        dst: u64,
        dst_pitch: usize,
        src: u64,
        src_pitch: usize,
        row_bytes: usize,
        rows: usize,
    ) -> anyhow::Result<()> {
        if rows == 0 {
            return Ok(());
        }
        use cudarc::driver::sys;
        self.bind()?;
        let copy = sys::CUDA_MEMCPY2D {
            srcXInBytes: 0,
            srcY: 0,
            srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            srcHost: std::ptr::null(),
            srcDevice: src,
            srcArray: std::ptr::null_mut(),
            srcPitch: src_pitch,
            dstXInBytes: 0,
            dstY: 0,
            dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            dstHost: std::ptr::null_mut(),
            dstDevice: dst,
            dstArray: std::ptr::null_mut(),
            dstPitch: dst_pitch,
            WidthInBytes: row_bytes,
            Height: rows,
        };
        // SAFETY: the caller passes addresses of live device buffers that hold the blocks;
        // the descriptor lives through the call, and the copy is ordered on the stream.
        unsafe { sys::cuMemcpy2DAsync_v2(&copy, self.stream.cu_stream()) }
            .result()
            .context("copying a block on the GPU")
    }

    /// (free, total) device memory in bytes.
    pub fn memory(&self) -> anyhow::Result<(usize, usize)> {
        Ok(self.ctx.mem_get_info()?)
    }
}

/// The mode to capture CUDA graphs in when `streams` streams are captured at once (one per
/// GPU). Thread-local mode refuses, while this thread captures, calls that are unsafe in a
/// capture; instantiating one stream's graph is one, so with several streams, whose
/// captures end one after the other, the first instantiation would be refused while the
/// others still capture. Those are captured in relaxed mode. What they capture is the same
/// step code that one stream captures in thread-local mode (one GPU, or every rank on one),
/// so an unsafe call in it is still caught there.
fn capture_mode(streams: usize) -> cudarc::driver::sys::CUstreamCaptureMode {
    use cudarc::driver::sys::CUstreamCaptureMode;
    if streams > 1 {
        CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED
    } else {
        CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
    }
}

/// Captures what `queue` puts on the GPUs' streams as one graph per GPU. Every stream
/// captures at once (with NCCL a collective queues every rank's part together), and every
/// capture begun is ended whatever happened, so that no stream is left capturing. A
/// GPU's graph is None when its capture holds nothing.
pub fn capture_graphs(
    gpus: &[&Gpu],
    queue: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<Vec<Option<cudarc::driver::CudaGraph>>> {
    let mut capturing = 0;
    let mut queued = Ok(());
    for gpu in gpus {
        if let Err(e) = gpu.stream.begin_capture(capture_mode(gpus.len())) {
            queued = Err(anyhow::Error::new(e).context("starting a CUDA graph capture"));
            break;
        }
        capturing += 1;
    }
    if queued.is_ok() {
        queued = queue();
    }
    let graphs: Vec<_> = gpus[..capturing]
        .iter()
        .map(|gpu| {
            gpu.stream
                .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))
        })
        .collect();
    queued?;
    graphs
        .into_iter()
        .map(|graph| graph.context("capturing a CUDA graph"))
        .collect()
}

/// A kernel argument: plain values (pointers as u64) pushed by reference.
pub trait KernelArg {
    fn push<'a>(&'a self, builder: &mut cudarc::driver::LaunchArgs<'a>);
}

macro_rules! kernel_arg {
    ($($t:ty),*) => {$(
        impl KernelArg for $t {
            fn push<'a>(&'a self, builder: &mut cudarc::driver::LaunchArgs<'a>) {
                builder.arg(self);
            }
        }
    )*};
}
kernel_arg!(i32, u32, i64, u64, f32);

/// A 1-D launch of `blocks` blocks of `threads`.
pub fn grid(blocks: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}
