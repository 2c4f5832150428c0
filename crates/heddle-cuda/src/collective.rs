//! Combining the ranks' partial results under tensor parallelism (see tensor_parallel.rs):
//! the all-reduce (sum) after each row-parallel projection and after the
//! vocabulary-parallel embedding, and the gather of the vocabulary-parallel logits into
//! whole rows on rank 0, where the sampler runs.
//!
//! How depends on where the ranks run:
//! - one rank: there is nothing to combine;
//! - every rank on one GPU and one stream (the test mode): a kernel adds the other ranks'
//!   buffers into rank 0's and the sum is copied back to them. The runner queues each
//!   rank's part of the step in turn on that one stream, so stream order alone makes
//!   every partial result ready before it is summed, and the sum ready before any rank
//!   reads it;
//! - one rank per GPU: NCCL, one communicator per rank, all made at once by
//!   `ncclCommInitAll`. One thread drives every rank, so each collective's calls for the
//!   ranks are grouped (`ncclGroupStart` … `ncclGroupEnd`), as NCCL requires of a thread
//!   that drives several ranks (each call would otherwise wait for the others'). The
//!   calls are queued on the ranks' streams like kernels, so CUDA graphs capture them.
//!   Where the GPUs can reach each other, steps that fit the exchange buffers (every step
//!   with two ranks, decode-sized ones with more: `AllReduce`) leave their all-reduces to
//!   peer_sums.rs (NVLink peer-to-peer, inside the norms): the runner asks
//!   [`Collective::peer_sums`] and then calls `all_reduce_sum` for none of that step's;
//! - none (`AllReduce::SkippedForTiming`): wrong results, to time the rest.

use std::ffi::CStr;

use anyhow::Context;
use cudarc::nccl::{result as nccl, sys as nccl_sys};

use crate::gpu::{grid, DeviceBuffer, Gpu};
use crate::kernels::DType;
use crate::peer_sums::PeerSums;

/// One rank's side of a collective: its GPU and the address of its buffer there.
#[derive(Clone, Copy)]
pub struct Part<'a> {
    pub gpu: &'a Gpu,
    pub ptr: u64,
}

/// How the ranks' results are combined.
pub enum Collective {
    /// One rank.
    Single,
    /// Every rank on one GPU and one stream: sums by kernel.
    SameStream,
    /// One rank per GPU: NCCL.
    Nccl(NcclRanks),
    /// Nothing is summed or gathered: for timing only.
    SkippedForTiming,
}

/// The NCCL communicators of the ranks, in rank order, and rank 0's landing buffer for
/// the other ranks' logits.
pub struct NcclRanks {
    communicators: Vec<Communicator>,
    /// [ranks − 1][rows][columns] f32, received from ranks 1.. before they are placed.
    received: DeviceBuffer,
    /// The peer-to-peer all-reduces of decode-sized steps, where the GPUs allow them.
    peer_sums: Option<PeerSums>,
}

/// One rank's NCCL communicator.
struct Communicator(nccl_sys::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread as long as no two threads use
// it at once; it is only used through its runner, by one thread at a time.
unsafe impl Send for Communicator {}

impl Drop for Communicator {
    fn drop(&mut self) {
        // SAFETY: the communicator was made by ncclCommInitAll and is destroyed once. As in
        // NCCL's example of one thread driving several GPUs, each is destroyed in turn.
        if let Err(e) = unsafe { nccl::comm_destroy(self.0) } {
            tracing::warn!("destroying an NCCL communicator: {}", nccl_message(&e));
        }
    }
}

impl Collective {
    /// NCCL communicators for ranks on `gpus` (one per rank, in rank order), with a
    /// landing buffer of `gather_bytes` on rank 0 for the other ranks' logits. Fails with
    /// what is missing when NCCL cannot be loaded, and with NCCL's reason when it refuses
    /// the ranks (two of them on one GPU, say).
    pub fn nccl(gpus: &[&Gpu], gather_bytes: usize) -> anyhow::Result<Self> {
        // SAFETY: only tries to open the shared library.
        anyhow::ensure!(
            unsafe { nccl_sys::is_culib_present() },
            "NCCL (libnccl.so) could not be loaded; tensor parallelism over several GPUs \
             needs it: install NCCL, or put the folder holding libnccl.so on \
             LD_LIBRARY_PATH (where only libnccl.so.2 is there, as in PyTorch's \
             nvidia-nccl wheel, link libnccl.so to it; docs/DEPLOY.md)"
        );
        keep_nvlink_multicast_off();
        let ordinals: Vec<i32> = gpus.iter().map(|g| g.ctx.ordinal() as i32).collect();
        let mut raw = vec![std::ptr::null_mut(); gpus.len()];
        // SAFETY: `raw` has room for one communicator per device listed.
        unsafe { nccl::comm_init_all(raw.as_mut_ptr(), raw.len() as i32, ordinals.as_ptr()) }
            .map_err(|e| {
                anyhow::anyhow!(
                    "NCCL refused communicators for GPUs {ordinals:?}: {}",
                    nccl_message(&e)
                )
            })?;
        let communicators: Vec<Communicator> = raw.into_iter().map(Communicator).collect();
        let version = nccl::get_nccl_version().map_err(|e| anyhow::anyhow!(nccl_message(&e)))?;
        tracing::info!(
            ranks = gpus.len(),
            ?ordinals,
            nccl_version = version,
            nvls = std::env::var("NCCL_NVLS_ENABLE").unwrap_or_default(),
            "NCCL communicators ready"
        );
        let received = gpus[0]
            .alloc(gather_bytes)
            .context("allocating the logits gather buffer")?;
        Ok(Collective::Nccl(NcclRanks {
            communicators,
            received,
            peer_sums: None,
        }))
    }

    /// Hands decode-sized steps' all-reduces to `peer_sums` (over NCCL ranks only).
    pub fn add_peer_sums(&mut self, peer_sums: PeerSums) -> anyhow::Result<()> {
        match self {
            Collective::Nccl(ranks) => {
                ranks.peer_sums = Some(peer_sums);
                Ok(())
            }
            _ => anyhow::bail!("peer-to-peer all-reduces need one rank per GPU"),
        }
    }

    /// The peer-to-peer all-reduces, when a step of `tokens` tokens uses them: its
    /// row-parallel outputs then go to their exchange slots and are summed by the norms,
    /// and `all_reduce_sum` is not called for that step.
    pub fn peer_sums(&self, tokens: usize) -> Option<&PeerSums> {
        match self {
            Collective::Nccl(ranks) => ranks.peer_sums.as_ref().filter(|p| p.covers(tokens)),
            _ => None,
        }
    }

    /// Sums `count` elements of `dtype` over the ranks' buffers, in place: afterwards
    /// every rank's buffer holds the sum.
    pub fn all_reduce_sum(&self, parts: &[Part], count: usize, dtype: DType) -> anyhow::Result<()> {
        if count == 0 {
            return Ok(());
        }
        match self {
            Collective::Single | Collective::SkippedForTiming => Ok(()),
            Collective::SameStream => {
                let (gpu, sum) = (parts[0].gpu, parts[0].ptr);
                let kernel = match dtype {
                    DType::F32 => "add_into_f32",
                    DType::Bf16 => "add_into_bf16",
                };
                let blocks = count.div_ceil(256).min(65_536);
                for part in &parts[1..] {
                    gpu.launch(
                        kernel,
                        grid(blocks, 256),
                        &[&sum, &part.ptr, &(count as i64)],
                    )?;
                }
                for part in &parts[1..] {
                    gpu.copy(part.ptr, sum, count * dtype.size_in_bytes())?;
                }
                Ok(())
            }
            Collective::Nccl(ranks) => grouped(|| {
                for (communicator, part) in ranks.communicators.iter().zip(parts) {
                    part.gpu.bind()?;
                    // SAFETY: the buffer holds `count` elements of `dtype` on the
                    // communicator's GPU; the sum is queued on that rank's stream.
                    unsafe {
                        nccl::all_reduce(
                            part.ptr as *const _,
                            part.ptr as *mut _,
                            count,
                            nccl_type(dtype),
                            nccl_sys::ncclRedOp_t::ncclSum,
                            communicator.0,
                            part.gpu.stream.cu_stream() as _,
                        )
                    }
                    .map_err(|e| anyhow::anyhow!("NCCL all-reduce: {}", nccl_message(&e)))?;
                }
                Ok(())
            }),
        }
    }

    /// Assembles the ranks' logits: `parts[r]` holds [rows][columns] f32 (rank r's slice of
    /// the vocabulary), and the whole [rows][ranks × columns] matrix `whole` on rank 0's
    /// GPU gets each slice in its columns. With one rank the slice is already `whole`.
    pub fn gather_columns(
        &self,
        parts: &[Part],
        whole: u64,
        rows: usize,
        columns: usize,
    ) -> anyhow::Result<()> {
        let (gpu, slice_bytes) = (parts[0].gpu, columns * 4);
        let row_bytes = parts.len() * slice_bytes;
        let place = |rank: usize, from: u64| {
            let at = whole + (rank * slice_bytes) as u64;
            gpu.copy_block(at, row_bytes, from, slice_bytes, slice_bytes, rows)
        };
        match self {
            Collective::Single | Collective::SkippedForTiming => Ok(()),
            Collective::SameStream => {
                for (rank, part) in parts.iter().enumerate() {
                    place(rank, part.ptr)?;
                }
                Ok(())
            }
            Collective::Nccl(ranks) => {
                let count = rows * columns;
                anyhow::ensure!(
                    (parts.len() - 1) * count * 4 <= ranks.received.bytes,
                    "{rows} rows of logits do not fit the gather buffer"
                );
                let landing = |rank: usize| ranks.received.ptr + ((rank - 1) * count * 4) as u64;
                grouped(|| {
                    let first = &ranks.communicators[0];
                    for (rank, (communicator, part)) in
                        ranks.communicators.iter().zip(parts).enumerate().skip(1)
                    {
                        let f32_type = nccl_type(DType::F32);
                        part.gpu.bind()?;
                        // SAFETY: the slice holds `count` f32 on rank `rank`'s GPU, the
                        // landing place as many on rank 0's; both are queued on their
                        // ranks' streams.
                        unsafe {
                            nccl::send(
                                part.ptr as *const _,
                                count,
                                f32_type,
                                0,
                                communicator.0,
                                part.gpu.stream.cu_stream() as _,
                            )
                        }
                        .map_err(|e| anyhow::anyhow!("NCCL send: {}", nccl_message(&e)))?;
                        gpu.bind()?;
                        // SAFETY: as above.
                        unsafe {
                            nccl::recv(
                                landing(rank) as *mut _,
                                count,
                                f32_type,
                                rank as i32,
                                first.0,
                                gpu.stream.cu_stream() as _,
                            )
                        }
                        .map_err(|e| anyhow::anyhow!("NCCL receive: {}", nccl_message(&e)))?;
                    }
                    Ok(())
                })?;
                place(0, parts[0].ptr)?;
                for rank in 1..parts.len() {
                    place(rank, landing(rank))?;
                }
                Ok(())
            }
        }
    }
}

/// Runs `calls` between ncclGroupStart and ncclGroupEnd (the end runs even if a call
/// failed, so that NCCL's group state is left clean).
fn grouped(calls: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    nccl::group_start().map_err(|e| anyhow::anyhow!("NCCL group: {}", nccl_message(&e)))?;
    let queued = calls();
    let ended = nccl::group_end().map_err(|e| anyhow::anyhow!("NCCL group: {}", nccl_message(&e)));
    queued.and(ended.map(|_| ()))
}

fn nccl_type(dtype: DType) -> nccl_sys::ncclDataType_t {
    match dtype {
        DType::F32 => nccl_sys::ncclDataType_t::ncclFloat32,
        DType::Bf16 => nccl_sys::ncclDataType_t::ncclBfloat16,
    }
}

/// NCCL's words for an error, and its last message (which names the cause).
fn nccl_message(e: &nccl::NcclError) -> String {
    // SAFETY: NCCL returns static, NUL-terminated strings (or null, handled).
    let text = |p: *const std::ffi::c_char| {
        if p.is_null() {
            String::new()
        } else {
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    let (what, last) = unsafe {
        (
            text(nccl_sys::ncclGetErrorString(e.0)),
            text(nccl_sys::ncclGetLastError(std::ptr::null_mut())),
        )
    };
    format!(
        "{what} ({:?}){}",
        e.0,
        if last.is_empty() {
            String::new()
        } else {
            format!(": {last}")
        }
    )
}

/// NVLink SHARP (NCCL's multicast all-reduce, NVLS) stays off unless the user set
/// NCCL_NVLS_ENABLE: heddle's all-reduces are a few activation rows, where it gains little,
/// and multicast objects on shared or virtualised hosts have left GPUs out of service.
/// NCCL reads the variable when its first communicator is made, so this runs just before.
fn keep_nvlink_multicast_off() {
    if std::env::var_os("NCCL_NVLS_ENABLE").is_none() {
        std::env::set_var("NCCL_NVLS_ENABLE", "0");
    }
}
