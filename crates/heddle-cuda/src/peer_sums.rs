//! The all-reduces of decode-sized steps over NVLink peer-to-peer, fused with the residual
//! add and the RMSNorm that follows each one (kernels in peer_sums.cu, whose header says
//! how the GPUs synchronise).
//!
//! NCCL sums a decode step's 8 KB rows in tens of microseconds: 65 times a token at the
//! Llama-3.1-8B shape. Here one process drives every GPU, so once peer access is enabled
//! a kernel reads the other GPUs' memory directly: each rank's row-parallel projection
//! writes its partial output into its exchange buffer, and the next norm on every rank
//! reads every rank's buffer, adds them to its residual in rank order and normalises, in
//! one kernel with one NVLink read, replayable from CUDA graphs. Steps larger than the
//! exchange buffers keep NCCL (`AllReduce` says which fit: every step with two ranks,
//! where one read of the peer's message moves what NCCL's ring moves and ran faster at
//! prefill sizes too; decode-sized ones with more ranks, where each GPU would read N − 1
//! whole messages).
//!
//! The exchange buffers and signal words are allocated with `cuMemAlloc`, not from the
//! stream-ordered pool the rest of the runner uses: peer access enabled per context
//! covers `cuMemAlloc` memory, while pool memory would need its own access grants.

use std::sync::Arc;

use anyhow::Context;
use cudarc::driver::sys;

use crate::gpu::{DeviceBuffer, Gpu};
use crate::kernels::DType;

/// peer_sums.cu, appended to the kernels' source.
pub const SOURCE: &str = include_str!("peer_sums.cu");

/// Its kernels, by their `extern "C"` names.
pub const KERNEL_NAMES: [&str; 3] = ["peer_add_rmsnorm", "peer_embed_rmsnorm", "peer_greedy"];

/// `PEER_MAX_RANKS`, `PEER_MAX_BLOCKS`, `PEER_THREADS`, `PEER_ELEMS` and `PEER_MAX_CHUNKS`.
const MAX_RANKS: usize = 8;
const MAX_BLOCKS: usize = 256;
const THREADS: usize = 512;
const ELEMS_PER_THREAD: usize = 8;
const MAX_CHUNKS: usize = 4;
/// u32 words of a rank's signal area: `arrived[MAX_BLOCKS][MAX_RANKS]`, `epoch[MAX_BLOCKS]`.
const SIGNAL_WORDS: usize = MAX_BLOCKS * MAX_RANKS + MAX_BLOCKS;

/// Which partial result a rank's exchange buffer holds. The two layer slots alternate, so
/// a rank never overwrites a slot its peers may still be reading (peer_sums.cu).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// The attention block's output projection (the runner's dtype).
    Attention = 0,
    /// The MLP's down projection (the runner's dtype).
    Mlp = 1,
    /// The vocabulary-parallel embedding (f32).
    Embedding = 2,
}

/// The slot greedy sampling exchanges each rank's best (value, token) of each row in.
const GREEDY_SLOT: usize = 3;
/// `PEER_SLOTS`: the sums' and the greedy one.
const SLOTS: usize = 4;

/// Device memory from `cuMemAlloc` on one GPU, freed with its context current.
struct PeerMemory {
    ctx: Arc<cudarc::driver::CudaContext>,
    ptr: u64,
}

impl PeerMemory {
    /// `bytes` of zeroed memory on `gpu`.
    fn zeroed(gpu: &Gpu, bytes: usize) -> anyhow::Result<Self> {
        gpu.bind()?;
        // SAFETY: the memory is zeroed before it is used; it is freed once, on drop.
        let ptr = unsafe { cudarc::driver::result::malloc_sync(bytes) }
            .with_context(|| format!("allocating {} MiB of peer-shared memory", bytes >> 20))?;
        let memory = PeerMemory {
            ctx: gpu.ctx.clone(),
            ptr,
        };
        // SAFETY: the allocation holds `bytes` bytes.
        unsafe { cudarc::driver::result::memset_d8_sync(ptr, 0, bytes) }
            .context("zeroing peer-shared memory")?;
        Ok(memory)
    }
}

impl Drop for PeerMemory {
    fn drop(&mut self) {
        let freed = self.ctx.bind_to_thread().and_then(|_| {
            // SAFETY: allocated by malloc_sync in this context; no kernel uses it any more
            // (the runner's streams are synchronised before the runner is dropped).
            unsafe { cudarc::driver::result::free_sync(self.ptr) }
        });
        if let Err(e) = freed {
            tracing::warn!("freeing peer-shared memory: {e}");
        }
    }
}

/// One rank's side: its exchange slots and signal words (read and written by its peers)
/// and its copy of the table of every rank's addresses.
struct PeerRank {
    _shared: PeerMemory,
    slot_ptrs: [u64; SLOTS],
    table: DeviceBuffer,
}

/// The peer-to-peer all-reduces of ranks on distinct GPUs (one per GPU, in rank order).
pub struct PeerSums {
    ranks: Vec<PeerRank>,
    /// Rows each slot holds: steps of more tokens go through NCCL.
    capacity_rows: usize,
    hidden: usize,
    /// The grid's limit, the same on every rank (the ranks' block counters must agree):
    /// the fewest multiprocessors of the GPUs, so that every block of a call is resident
    /// at once and no block waits on a peer block that cannot start.
    max_blocks: usize,
}

impl PeerSums {
    /// Enables peer access between `gpus` (rank order, one rank each) and allocates the
    /// exchange buffers for steps of up to `capacity_rows` tokens of `hidden` values.
    /// `Ok(None)`, logged with the reason, when it cannot work here (a GPU cannot reach
    /// another, too many ranks, a hidden size the kernels do not handle): the caller
    /// keeps NCCL for every step.
    pub fn new(
        gpus: &[&Gpu],
        hidden: usize,
        capacity_rows: usize,
        dtype: DType,
    ) -> anyhow::Result<Option<Self>> {
        if let Err(why) = Self::supported(gpus, hidden) {
            tracing::warn!("peer-to-peer all-reduce off, every all-reduce through NCCL: {why}");
            return Ok(None);
        }
        enable_peer_access(gpus)?;
        let slot_bytes = capacity_rows.max(1) * hidden * 4;
        let bytes = SLOTS * slot_bytes + SIGNAL_WORDS * 4;
        let shared = gpus
            .iter()
            .map(|gpu| PeerMemory::zeroed(gpu, bytes))
            .collect::<anyhow::Result<Vec<_>>>()?;
        // The table (peer_sums.cu: PeerTable): partials[slot][rank], then signals[rank].
        let mut table = vec![0u64; SLOTS * MAX_RANKS + MAX_RANKS];
        for (rank, memory) in shared.iter().enumerate() {
            for slot in 0..SLOTS {
                table[slot * MAX_RANKS + rank] = memory.ptr + (slot * slot_bytes) as u64;
            }
            table[SLOTS * MAX_RANKS + rank] = memory.ptr + (SLOTS * slot_bytes) as u64;
        }
        let mut ranks = Vec::with_capacity(gpus.len());
        for (gpu, memory) in gpus.iter().zip(shared) {
            let slot_ptrs = std::array::from_fn(|slot| memory.ptr + (slot * slot_bytes) as u64);
            ranks.push(PeerRank {
                _shared: memory,
                slot_ptrs,
                table: gpu.upload(&table)?,
            });
        }
        for gpu in gpus {
            gpu.stream
                .synchronize()
                .context("uploading the peer table")?;
        }
        let max_blocks = gpus
            .iter()
            .map(|g| g.multiprocessors)
            .min()
            .unwrap_or(1)
            .min(MAX_BLOCKS);
        tracing::info!(
            ranks = gpus.len(),
            capacity_rows,
            ?dtype,
            "peer-to-peer all-reduce ready for steps of up to {capacity_rows} tokens (NCCL \
             for larger ones)"
        );
        Ok(Some(PeerSums {
            ranks,
            capacity_rows,
            hidden,
            max_blocks,
        }))
    }

    /// Why the kernels cannot serve these GPUs and this hidden size, if they cannot.
    fn supported(gpus: &[&Gpu], hidden: usize) -> Result<(), String> {
        if gpus.len() > MAX_RANKS {
            return Err(format!("{} ranks; at most {MAX_RANKS}", gpus.len()));
        }
        if !hidden.is_multiple_of(ELEMS_PER_THREAD)
            || hidden > THREADS * ELEMS_PER_THREAD * MAX_CHUNKS
        {
            return Err(format!(
                "hidden size {hidden}: the kernels need a multiple of {ELEMS_PER_THREAD} up to {}",
                THREADS * ELEMS_PER_THREAD * MAX_CHUNKS
            ));
        }
        for a in gpus {
            for b in gpus {
                let (da, db) = (a.ctx.cu_device(), b.ctx.cu_device());
                if da == db {
                    if !std::ptr::eq(*a, *b) {
                        return Err("two ranks on one GPU".into());
                    }
                    continue;
                }
                let mut can = 0;
                // SAFETY: writes one int.
                let asked = unsafe { sys::cuDeviceCanAccessPeer(&mut can, da, db) }.result();
                if asked.is_err() || can == 0 {
                    return Err(format!(
                        "GPU {} cannot access GPU {}'s memory directly",
                        a.ctx.ordinal(),
                        b.ctx.ordinal()
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether a step of `tokens` tokens fits the exchange buffers.
    pub fn covers(&self, tokens: usize) -> bool {
        tokens <= self.capacity_rows
    }

    /// Where `rank` writes its partial result for `slot` ([tokens, hidden], f32 for the
    /// embedding, the runner's dtype otherwise).
    pub fn partial(&self, rank: usize, slot: Slot) -> u64 {
        self.ranks[rank].slot_ptrs[slot as usize]
    }

    /// Queues on `rank`'s GPU: residual (+)= Σ over ranks of their `slot` partials (the
    /// embedding's replaces the residual), written back when `write_back`, and
    /// out[row] = RMSNorm(residual[src]) × weight, for `num_rows` rows whose source rows
    /// are listed at `rows` (0: row i is source row i). Every rank must queue the same
    /// calls, in the same order, with the same rows.
    #[allow(clippy::too_many_arguments)]
    pub fn sum_rmsnorm(
        &self,
        gpu: &Gpu,
        rank: usize,
        slot: Slot,
        residual: u64,
        weight: u64,
        out: u64,
        rows: u64,
        num_rows: usize,
        eps: f32,
        write_back: bool,
    ) -> anyhow::Result<()> {
        if num_rows == 0 {
            return Ok(());
        }
        let threads = (self.hidden / ELEMS_PER_THREAD)
            .next_multiple_of(32)
            .min(THREADS);
        let config = crate::gpu::grid(num_rows.min(self.max_blocks), threads as u32);
        let table = self.ranks[rank].table.ptr;
        let (hidden, rank, ranks) = (self.hidden as i32, rank as i32, self.ranks.len() as i32);
        let (slot_index, num_rows) = (slot as i32, num_rows as i32);
        match slot {
            Slot::Embedding => {
                anyhow::ensure!(
                    rows == 0 && write_back,
                    "the embedding's sum covers every token and writes the residual"
                );
                gpu.launch(
                    "peer_embed_rmsnorm",
                    config,
                    &[
                        &residual,
                        &table,
                        &slot_index,
                        &weight,
                        &out,
                        &num_rows,
                        &hidden,
                        &eps,
                        &rank,
                        &ranks,
                    ],
                )
            }
            Slot::Attention | Slot::Mlp => gpu.launch(
                "peer_add_rmsnorm",
                config,
                &[
                    &residual,
                    &table,
                    &slot_index,
                    &weight,
                    &out,
                    &rows,
                    &num_rows,
                    &hidden,
                    &eps,
                    &(write_back as i32),
                    &rank,
                    &ranks,
                ],
            ),
        }
    }

    /// Queues greedy sampling over vocabulary slices on `rank`'s GPU: `logits` holds
    /// `num_rows` rows of the rank's `vocab` tokens from `first_token` on, f32; rank 0
    /// writes each row's token to `out` (the others pass 0). Only for steps whose rows are
    /// all plain greedy (`StepPlan::plain_greedy`); every rank must queue it.
    #[allow(clippy::too_many_arguments)]
    pub fn greedy(
        &self,
        gpu: &Gpu,
        rank: usize,
        logits: u64,
        vocab: usize,
        first_token: usize,
        out: u64,
        num_rows: usize,
    ) -> anyhow::Result<()> {
        if num_rows == 0 {
            return Ok(());
        }
        let blocks = num_rows.min(self.max_blocks);
        anyhow::ensure!(
            num_rows.div_ceil(blocks) <= crate::kernels::SAMPLE_THREADS as usize
                && 2 * num_rows <= self.capacity_rows.max(1) * self.hidden,
            "{num_rows} rows are too many for the greedy exchange"
        );
        gpu.launch(
            "peer_greedy",
            crate::gpu::grid(blocks, crate::kernels::SAMPLE_THREADS),
            &[
                &logits,
                &(vocab as i32),
                &(first_token as i32),
                &self.ranks[rank].table.ptr,
                &(GREEDY_SLOT as i32),
                &out,
                &(num_rows as i32),
                &(rank as i32),
                &(self.ranks.len() as i32),
            ],
        )
    }
}

/// Lets every GPU of `gpus` read and write every other's `cuMemAlloc` memory.
fn enable_peer_access(gpus: &[&Gpu]) -> anyhow::Result<()> {
    for a in gpus {
        for b in gpus {
            if a.ctx.cu_device() == b.ctx.cu_device() {
                continue;
            }
            a.bind()?;
            // SAFETY: both contexts are live; access is granted to the current one.
            let enabled = unsafe { sys::cuCtxEnablePeerAccess(b.ctx.cu_ctx(), 0) };
            match enabled {
                sys::CUresult::CUDA_SUCCESS
                | sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => {}
                e => anyhow::bail!(
                    "enabling GPU {}'s access to GPU {}: {e:?}",
                    a.ctx.ordinal(),
                    b.ctx.ordinal()
                ),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_constants_match_the_kernels() {
        for (name, value) in [
            ("PEER_MAX_RANKS", MAX_RANKS),
            ("PEER_MAX_BLOCKS", MAX_BLOCKS),
            ("PEER_THREADS", THREADS),
            ("PEER_ELEMS", ELEMS_PER_THREAD),
            ("PEER_MAX_CHUNKS", MAX_CHUNKS),
        ] {
            assert!(
                SOURCE.contains(&format!("#define {name} {value}\n")),
                "{name} is not {value} in peer_sums.cu"
            );
        }
        assert!(SOURCE.contains(&format!("#define PEER_SLOTS {SLOTS}\n")));
        assert!(SOURCE.contains("unsigned long long partials[PEER_SLOTS][PEER_MAX_RANKS];"));
        for name in KERNEL_NAMES {
            assert!(SOURCE.contains(&format!("\n{name}(")), "{name}");
        }
    }
}
