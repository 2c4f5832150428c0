//! Tensor parallelism: how one model is split over several ranks, Megatron-style.
//!
//! Each rank holds a slice of every layer: the query heads `[r·H/N, (r+1)·H/N)` and the
//! KV heads their group shares (so attention needs no communication), the same slice of
//! the MLP's intermediate rows, and a slice of the vocabulary. The Q·K·V and gate·up
//! projections are split by output rows (column-parallel: each rank computes its heads'
//! or its intermediate slice's outputs from the whole input), the output and down
//! projections by input columns (row-parallel: each rank's product is a partial sum of
//! the whole output, summed over ranks by an all-reduce). The embedding table and the LM
//! head are split by vocabulary rows: a rank embeds only the tokens in its slice (zeros
//! elsewhere, so the all-reduce assembles each token's row), and computes the logits of
//! its slice, which are gathered on rank 0 for the sampler. Norm weights are whole on
//! every rank, and so is the residual stream.

use std::borrow::Cow;
use std::ops::Range;

use heddle_model::ModelConfig;

/// How many ranks, where they run, and how their partial results are summed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorParallel {
    pub size: usize,
    pub placement: RankPlacement,
    pub all_reduce: AllReduce,
}

impl TensorParallel {
    /// One rank per GPU: `--tensor-parallel-size size`.
    pub fn across_gpus(size: usize) -> Self {
        TensorParallel {
            size,
            placement: RankPlacement::OneGpuEach,
            all_reduce: AllReduce::default(),
        }
    }
}

/// How the ranks' partial sums are added up (with one rank per GPU; the test placement
/// always sums by kernel on its one stream).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AllReduce {
    /// Each rank reads its peers' partial results over NVLink, summed inside the next
    /// norm (peer_sums.rs): with two ranks for every step (exchange buffers for
    /// `max_batched_tokens` tokens, 16 bytes a token per hidden unit and GPU), where it
    /// moves what NCCL's ring moves and was measured faster at prefill sizes too
    /// (docs/PERFORMANCE_GPU.md); with more, as `PeerToPeerForSmallSteps` (each GPU would
    /// read N − 1 whole messages, against the ring's 2(N − 1)/N). GPUs without peer access
    /// to each other go through NCCL.
    #[default]
    PeerToPeer,
    /// Steps of up to `max_running` or 512 tokens (decode, small prefill chunks) peer-to-
    /// peer; larger ones through NCCL.
    PeerToPeerForSmallSteps,
    /// Every all-reduce through NCCL.
    Nccl,
    /// No all-reduce or logits gather at all: wrong results, to time what the collectives
    /// cost (`heddle-cuda bench --all-reduce skip-for-timing`), never a way to serve.
    SkippedForTiming,
}

impl Default for TensorParallel {
    fn default() -> Self {
        TensorParallel::across_gpus(1)
    }
}

/// Where the ranks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RankPlacement {
    /// Rank r on GPU r, all-reduces and the logits gather through NCCL: the serving mode.
    OneGpuEach,
    /// Every rank on the first GPU and on one stream, summed by a kernel (NCCL refuses two
    /// ranks on one GPU). A test mode: it checks every shard's arithmetic on a machine with
    /// one GPU, and is slower than one rank, never a way to serve.
    AllOnFirstGpu,
}

impl TensorParallel {
    /// The device ordinal of each rank, when `visible` GPUs are present; a refusal when
    /// there are too few.
    pub fn devices(&self, visible: usize) -> anyhow::Result<Vec<usize>> {
        anyhow::ensure!(
            self.size >= 1,
            "the tensor parallel size must be at least 1"
        );
        match self.placement {
            RankPlacement::OneGpuEach => {
                anyhow::ensure!(
                    self.size <= visible,
                    "tensor parallel size {} needs {} GPUs; {visible} visible here",
                    self.size,
                    self.size
                );
                Ok((0..self.size).collect())
            }
            RankPlacement::AllOnFirstGpu => {
                anyhow::ensure!(visible >= 1, "no GPU visible here");
                Ok(vec![0; self.size])
            }
        }
    }
}

/// The slice of the model each of `ranks` ranks holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    pub ranks: usize,
    heads: usize,
    kv_heads: usize,
    ffn: usize,
    vocab: usize,
    head_dim: usize,
}

impl Partition {
    /// Splits `config` over `ranks`, or says why it cannot be split so: every rank needs
    /// whole heads and whole KV heads (a KV head is not replicated), and equal slices of
    /// the intermediate size and of the vocabulary.
    pub fn new(config: &ModelConfig, ranks: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(ranks >= 1, "the tensor parallel size must be at least 1");
        let divides = |what: &str, n: usize| {
            anyhow::ensure!(
                n.is_multiple_of(ranks),
                "tensor parallel size {ranks} does not divide the model's {what} ({n}); \
                 choose a size that does"
            );
            Ok(())
        };
        divides("attention heads", config.num_heads)?;
        divides("KV heads", config.num_kv_heads)?;
        divides("intermediate size", config.intermediate_size)?;
        divides("vocabulary size", config.vocab_size)?;
        Ok(Partition {
            ranks,
            heads: config.num_heads / ranks,
            kv_heads: config.num_kv_heads / ranks,
            ffn: config.intermediate_size / ranks,
            vocab: config.vocab_size / ranks,
            head_dim: config.head_dim,
        })
    }

    /// The model one rank holds, as a model of its own: its heads, KV heads, intermediate
    /// rows and vocabulary slice (the kernels are compiled for this shape).
    pub fn shard_config(&self, config: &ModelConfig) -> ModelConfig {
        ModelConfig {
            num_heads: self.heads,
            num_kv_heads: self.kv_heads,
            intermediate_size: self.ffn,
            vocab_size: self.vocab,
            ..config.clone()
        }
    }

    /// Rows of the Q projection (and its bias) that `rank` holds.
    pub fn query_rows(&self, rank: usize) -> Range<usize> {
        slice(rank, self.heads * self.head_dim)
    }

    /// Rows of the K or V projection (and bias) that `rank` holds.
    pub fn kv_rows(&self, rank: usize) -> Range<usize> {
        slice(rank, self.kv_heads * self.head_dim)
    }

    /// Rows of the gate or up projection, and columns of the down projection.
    pub fn ffn_rows(&self, rank: usize) -> Range<usize> {
        slice(rank, self.ffn)
    }

    /// Rows of the embedding table and LM head: the token ids `rank` embeds and scores.
    pub fn vocab_rows(&self, rank: usize) -> Range<usize> {
        slice(rank, self.vocab)
    }
}

fn slice(rank: usize, per_rank: usize) -> Range<usize> {
    rank * per_rank..(rank + 1) * per_rank
}

/// Rows `rows` of a row-major matrix whose rows are `row_bytes` long.
pub fn matrix_rows(bytes: &[u8], row_bytes: usize, rows: Range<usize>) -> &[u8] {
    &bytes[rows.start * row_bytes..rows.end * row_bytes]
}

/// Columns `columns` of a row-major matrix of `num_columns` elements of `element_bytes`
/// per row; borrowed when that is every column.
pub fn matrix_columns(
    bytes: &[u8],
    num_columns: usize,
    element_bytes: usize,
    columns: Range<usize>,
) -> Cow<'_, [u8]> {
    if columns == (0..num_columns) {
        return Cow::Borrowed(bytes);
    }
    let row_bytes = num_columns * element_bytes;
    let (from, to) = (columns.start * element_bytes, columns.end * element_bytes);
    Cow::Owned(
        bytes
            .chunks_exact(row_bytes)
            .flat_map(|row| &row[from..to])
            .copied()
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama_8b() -> ModelConfig {
        ModelConfig::from_hf_json(include_str!("../../../configs/llama-3.1-8b.json")).unwrap()
    }

    #[test]
    fn llama_8b_splits_over_two_ranks_into_equal_halves() {
        let config = llama_8b();
        let p = Partition::new(&config, 2).unwrap();
        let shard = p.shard_config(&config);
        assert_eq!(
            (
                shard.num_heads,
                shard.num_kv_heads,
                shard.intermediate_size,
                shard.vocab_size
            ),
            (16, 4, 7168, 64128)
        );
        // Everything else is the model's: the residual width, depth, head size, RoPE.
        assert_eq!(
            (shard.hidden_size, shard.num_layers, shard.head_dim),
            (4096, 32, 128)
        );
        assert_eq!(shard.rope_scaling, config.rope_scaling);
        // Rank 1 holds the second half of every split dimension.
        assert_eq!(p.query_rows(1), 2048..4096);
        assert_eq!(p.kv_rows(1), 512..1024);
        assert_eq!(p.ffn_rows(1), 7168..14336);
        assert_eq!(p.vocab_rows(1), 64128..128256);
        // The query heads of a rank are the groups of its KV heads: 4 per KV head.
        assert_eq!(
            p.query_rows(1).len() / p.kv_rows(1).len(),
            config.num_heads / config.num_kv_heads
        );
    }

    #[test]
    fn one_rank_holds_the_whole_model() {
        let config = llama_8b();
        let p = Partition::new(&config, 1).unwrap();
        assert_eq!(p.shard_config(&config), config);
        assert_eq!(p.query_rows(0), 0..4096);
        assert_eq!(p.vocab_rows(0), 0..128256);
    }

    #[test]
    fn sizes_that_do_not_divide_the_heads_are_refused() {
        let config = llama_8b();
        // 8 KV heads: 16 ranks would need to replicate them, which is not supported.
        let err = Partition::new(&config, 16).unwrap_err().to_string();
        assert!(err.contains("KV heads (8)"), "{err}");
        let err = Partition::new(&config, 3).unwrap_err().to_string();
        assert!(err.contains("attention heads (32)"), "{err}");
        assert!(Partition::new(&config, 0).is_err());
        for ranks in [1, 2, 4, 8] {
            assert!(Partition::new(&config, ranks).is_ok(), "{ranks}");
        }
    }

    #[test]
    fn the_vocabulary_and_intermediate_size_must_divide_too() {
        let mut config = llama_8b();
        config.vocab_size = 32001;
        let err = Partition::new(&config, 2).unwrap_err().to_string();
        assert!(err.contains("vocabulary size (32001)"), "{err}");
        let mut config = llama_8b();
        config.intermediate_size = 14335;
        let err = Partition::new(&config, 2).unwrap_err().to_string();
        assert!(err.contains("intermediate size (14335)"), "{err}");
    }

    #[test]
    fn ranks_go_one_per_gpu_or_all_on_the_first() {
        assert_eq!(TensorParallel::across_gpus(2).devices(2).unwrap(), [0, 1]);
        assert_eq!(TensorParallel::across_gpus(2).devices(8).unwrap(), [0, 1]);
        let err = TensorParallel::across_gpus(4)
            .devices(2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs 4 GPUs; 2 visible"), "{err}");
        let same = TensorParallel {
            size: 2,
            placement: RankPlacement::AllOnFirstGpu,
            all_reduce: AllReduce::default(),
        };
        assert_eq!(same.devices(1).unwrap(), [0, 0]);
        assert!(same.devices(0).is_err());
        assert!(TensorParallel::across_gpus(0).devices(1).is_err());
    }

    #[test]
    fn matrices_are_sliced_by_rows_and_by_columns() {
        // A 3 × 4 matrix of 2-byte elements: element (r, c) holds bytes [10r + c, 0].
        let m: Vec<u8> = (0..3)
            .flat_map(|r| (0..4).flat_map(move |c| [10 * r + c, 0]))
            .collect();
        assert_eq!(matrix_rows(&m, 8, 1..2), &[10, 0, 11, 0, 12, 0, 13, 0]);
        let cols = matrix_columns(&m, 4, 2, 2..4);
        assert_eq!(&cols[..], &[2, 0, 3, 0, 12, 0, 13, 0, 22, 0, 23, 0]);
        assert!(matches!(matrix_columns(&m, 4, 2, 0..4), Cow::Borrowed(_)));
    }
}
