//! Model weights on the GPU: read from HF safetensors (bf16, f16 or f32, or FP8 E4M3
//! codes with scales, widened on the host; one file or sharded) or from a GGUF file (any quantization candle reads, dequantized on load), or
//! made up on the device for benchmarks. Q, K and V are stored as one fused
//! matrix, and so are the MLP's gate and up projections: one GEMM each instead of three
//! and two.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context};
use half::{bf16, f16};
use heddle_model::loader::fp8_scales;
use heddle_model::ModelConfig;
use safetensors::{Dtype as StDtype, SafeTensors};

use crate::fp8::{e4m3_to_f32, Fp8Tensor};
use crate::gpu::{grid, DeviceBuffer, Gpu};
use crate::kernels::DType;
use crate::tensor_parallel::{matrix_columns, matrix_rows, Partition};

pub struct LayerWeights {
    pub attn_norm: DeviceBuffer,
    /// [q_dim + 2 kv_dim, hidden]: Q, K and V projections stacked.
    pub qkv: Matrix,
    /// [q_dim + 2 kv_dim] (Qwen2).
    pub qkv_bias: Option<DeviceBuffer>,
    pub o: Matrix,
    pub ffn_norm: DeviceBuffer,
    /// [2 intermediate, hidden]: gate then up.
    pub gate_up: Matrix,
    pub down: Matrix,
}

/// A projection's weights [n, k]: as loaded (the runner's dtype), or quantized to FP8 with
/// one scale (`--quantization fp8`).
pub enum Matrix {
    Dense(DeviceBuffer),
    Fp8(Fp8Tensor),
}

impl Matrix {
    pub fn size_in_bytes(&self) -> usize {
        match self {
            Matrix::Dense(w) => w.bytes,
            Matrix::Fp8(w) => w.codes.bytes + w.scale.bytes,
        }
    }

    /// This matrix [n, k] in FP8 (a dense one is quantized on the device and freed).
    fn into_fp8(self, gpu: &Gpu, n: usize, k: usize) -> anyhow::Result<Self> {
        Ok(match self {
            Matrix::Dense(w) => Matrix::Fp8(Fp8Tensor::of_weight(gpu, &w, n * k)?),
            fp8 => fp8,
        })
    }
}

pub struct Weights {
    pub embed: DeviceBuffer,
    pub final_norm: DeviceBuffer,
    /// None when tied to the embeddings.
    pub lm_head: Option<DeviceBuffer>,
    pub layers: Vec<LayerWeights>,
    /// Per-frequency RoPE divisors some GGUF files carry (`rope_freqs.weight`).
    pub rope_freq_factors: Option<Vec<f32>>,
}

impl Weights {
    /// The output head: its own matrix, or the embedding table when tied.
    pub fn head(&self) -> u64 {
        self.lm_head.as_ref().unwrap_or(&self.embed).ptr
    }

    pub fn size_in_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.attn_norm.bytes
                    + l.qkv.size_in_bytes()
                    + l.qkv_bias.as_ref().map_or(0, |b| b.bytes)
                    + l.o.size_in_bytes()
                    + l.ffn_norm.bytes
                    + l.gate_up.size_in_bytes()
                    + l.down.size_in_bytes()
            })
            .sum();
        layers
            + self.embed.bytes
            + self.final_norm.bytes
            + self.lm_head.as_ref().map_or(0, |h| h.bytes)
    }

    /// Quantizes every layer's projections to FP8, one scale a matrix, freeing the
    /// dense ones layer by layer. `shard` is the model this rank holds. The embeddings,
    /// norms and LM head stay as they are.
    pub fn quantize_fp8(&mut self, gpu: &Gpu, shard: &ModelConfig) -> anyhow::Result<()> {
        let d = Dims::of(shard);
        let layers = std::mem::take(&mut self.layers);
        self.layers = layers
            .into_iter()
            .map(|layer| {
                let LayerWeights {
                    attn_norm,
                    qkv,
                    qkv_bias,
                    o,
                    ffn_norm,
                    gate_up,
                    down,
                } = layer;
                Ok(LayerWeights {
                    attn_norm,
                    qkv: qkv.into_fp8(gpu, d.qkv, d.hidden)?,
                    qkv_bias,
                    o: o.into_fp8(gpu, d.hidden, d.q)?,
                    ffn_norm,
                    gate_up: gate_up.into_fp8(gpu, 2 * d.ffn, d.hidden)?,
                    down: down.into_fp8(gpu, d.hidden, d.ffn)?,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(())
    }

    /// Random weights at the model's shape, generated on the GPU (no host transfer):
    /// matrices with standard deviation about 0.02 (as initialisers use), norm weights
    /// near 1, so activations stay finite through any depth. Rank `rank` of `partition`
    /// gets its slice of the same tensors (each element is a function of the seed and its
    /// place in the whole tensor), so any number of ranks holds the same model.
    pub fn dummy(
        gpu: &Gpu,
        config: &ModelConfig,
        partition: &Partition,
        rank: usize,
        seed: u64,
    ) -> anyhow::Result<Self> {
        let mut next_seed = seed;
        // Each whole tensor takes the next seed, whatever part of it this rank holds.
        let mut tensor = |windows: &[Window], center: f32, scale: f32| {
            next_seed = next_seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
            random_tensor(gpu, windows, next_seed, center, scale)
        };
        // init_random's triangular values on (-s, s) have standard deviation s/√6.
        let (w, norm, bias) = (0.049, 0.05, 0.01);
        let h = config.hidden_size;
        let slices = RankSlices::of(config, partition, rank);
        let whole = |len: usize| [Window::rows(len, 0..1)];
        let mut layers = Vec::with_capacity(config.num_layers);
        for _ in 0..config.num_layers {
            layers.push(LayerWeights {
                attn_norm: tensor(&whole(h), 1.0, norm)?,
                qkv: Matrix::Dense(tensor(&slices.qkv, 0.0, w)?),
                qkv_bias: if config.attention_bias {
                    Some(tensor(&slices.qkv_bias, 0.0, bias)?)
                } else {
                    None
                },
                o: Matrix::Dense(tensor(&slices.o, 0.0, w)?),
                ffn_norm: tensor(&whole(h), 1.0, norm)?,
                gate_up: Matrix::Dense(tensor(&slices.gate_up, 0.0, w)?),
                down: Matrix::Dense(tensor(&slices.down, 0.0, w)?),
            });
        }
        let weights = Weights {
            embed: tensor(&slices.vocab, 0.0, w)?,
            final_norm: tensor(&whole(h), 1.0, norm)?,
            lm_head: if config.tie_word_embeddings {
                None
            } else {
                Some(tensor(&slices.vocab, 0.0, w)?)
            },
            layers,
            rope_freq_factors: None,
        };
        gpu.stream
            .synchronize()
            .context("initialising dummy weights")?;
        Ok(weights)
    }

    /// Reads an HF checkpoint directory's safetensors, converting to the runner's dtype;
    /// one `Weights` per rank of `partition`, each on its GPU (`gpus[rank]`).
    pub fn load(
        gpus: &[&Gpu],
        config: &ModelConfig,
        partition: &Partition,
        dir: &Path,
    ) -> anyhow::Result<Vec<Self>> {
        let files = heddle_model::loader::weight_files(dir)?;
        let maps = files
            .iter()
            .map(|f| {
                let file =
                    std::fs::File::open(f).with_context(|| format!("opening {}", f.display()))?;
                // SAFETY: the file is only read, and not expected to change while loading.
                unsafe { memmap2::Mmap::map(&file) }
                    .with_context(|| format!("mapping {}", f.display()))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let parsed = maps
            .iter()
            .zip(&files)
            .map(|(m, f)| {
                SafeTensors::deserialize(m).with_context(|| format!("parsing {}", f.display()))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut by_name = HashMap::new();
        for (i, st) in parsed.iter().enumerate() {
            for name in st.names() {
                by_name.insert(name.to_string(), i);
            }
        }
        let dtype = gpus[0].dtype;
        let mut source = |gguf_name: &str, shape: &[usize]| -> anyhow::Result<Option<Vec<u8>>> {
            let name = heddle_model::loader::hf_name(gguf_name);
            let Some(&file) = by_name.get(&name) else {
                return Ok(None);
            };
            let view = parsed[file].tensor(&name)?;
            if view.shape() != shape {
                bail!(
                    "tensor {name:?} has shape {:?}, expected {shape:?}",
                    view.shape()
                );
            }
            if view.dtype() != StDtype::F8_E4M3 {
                return convert(&name, view.dtype(), view.data(), dtype).map(Some);
            }
            // FP8 codes, widened with the scales beside them (`fp8_scales`).
            let &[n, k] = shape else {
                bail!("tensor {name:?}: FP8 codes outside a projection matrix");
            };
            let scale = fp8_scales::scale_names(&name)
                .into_iter()
                .find_map(|s| by_name.get(&s).map(|&f| parsed[f].tensor(&s)))
                .with_context(|| format!("FP8 tensor {name:?} has no {name}_scale beside it"))??;
            let scales = float_values(&name, scale.dtype(), scale.data())?;
            let mut values: Vec<f32> = view.data().iter().map(|&c| e4m3_to_f32(c)).collect();
            fp8_scales::apply_scales(&name, &mut values, n, k, &scales, scale.shape())?;
            Ok(Some(to_dtype_bytes(values.into_iter(), dtype)))
        };
        let origin = dir.display().to_string();
        Self::assemble(gpus, config, partition, &mut source, &origin)
    }

    /// Reads a GGUF file: every tensor dequantized to f32 on the host, then converted to
    /// the runner's dtype. GGUF Llama files store Q and K with the rows of each head
    /// permuted for RoPE on adjacent pairs; they are put back in the HF order that the
    /// kernels rotate (pairs i, i + head_dim/2). One `Weights` per rank, as [`Self::load`].
    pub fn load_gguf(
        gpus: &[&Gpu],
        config: &ModelConfig,
        partition: &Partition,
        path: &Path,
        content: &heddle_model::loader::GgufContent,
    ) -> anyhow::Result<Vec<Self>> {
        use heddle_model::loader::{gguf_rope_layout, open_tensors, RopeLayout, TensorSource};
        let mut tensors = open_tensors(path, content)?;
        let unpermute = gguf_rope_layout(config.architecture) == RopeLayout::Interleaved;
        let (hd, heads, kv_heads) = (config.head_dim, config.num_heads, config.num_kv_heads);
        let dtype = gpus[0].dtype;
        let mut source = |name: &str, shape: &[usize]| -> anyhow::Result<Option<Vec<u8>>> {
            if !tensors.contains(name) {
                return Ok(None);
            }
            let (stored, mut values) = tensors.read_f32(name)?;
            if stored.iter().product::<usize>() != shape.iter().product::<usize>()
                || stored.first() != shape.first()
            {
                bail!("tensor {name:?} has shape {stored:?}, expected {shape:?}");
            }
            let rotated_heads = if name.contains(".attn_q.") {
                heads
            } else if name.contains(".attn_k.") {
                kv_heads
            } else {
                0
            };
            if unpermute && rotated_heads > 0 {
                values = unpermute_rope_rows(&values, rotated_heads, hd);
            }
            Ok(Some(to_dtype_bytes(values.into_iter(), dtype)))
        };
        let origin = path.display().to_string();
        let mut weights = Self::assemble(gpus, config, partition, &mut source, &origin)?;
        if tensors.contains("rope_freqs.weight") {
            let factors = tensors.read_f32("rope_freqs.weight")?.1;
            for rank in &mut weights {
                rank.rope_freq_factors = Some(factors.clone());
            }
        }
        Ok(weights)
    }

    /// Uploads a model's tensors, each asked of `source` by its GGUF name with the shape
    /// it must have (None when the source lacks it), each rank's slice to its GPU.
    fn assemble(
        gpus: &[&Gpu],
        config: &ModelConfig,
        partition: &Partition,
        source: &mut TensorReader<'_>,
        origin: &str,
    ) -> anyhow::Result<Vec<Self>> {
        let d = Dims::of(config);
        let (h, vocab) = (d.hidden, config.vocab_size);
        let e = gpus[0].dtype.size_in_bytes();
        let row = h * e;
        let lm_head = match source("output.weight", &[vocab, h])? {
            Some(head) => Some(head),
            None if config.tie_word_embeddings => None,
            None => bail!("tensor \"output.weight\" (lm_head) is missing from {origin}"),
        };
        let mut read = |name: &str, shape: &[usize]| -> anyhow::Result<Vec<u8>> {
            source(name, shape)?
                .with_context(|| format!("tensor {name:?} is missing from {origin}"))
        };
        let mut layers: Vec<Vec<LayerWeights>> = gpus
            .iter()
            .map(|_| Vec::with_capacity(config.num_layers))
            .collect();
        for l in 0..config.num_layers {
            let p = |s: &str| format!("blk.{l}.{s}");
            let q = read(&p("attn_q.weight"), &[d.q, h])?;
            let k = read(&p("attn_k.weight"), &[d.kv, h])?;
            let v = read(&p("attn_v.weight"), &[d.kv, h])?;
            let qkv_bias = if config.attention_bias {
                Some([
                    read(&p("attn_q.bias"), &[d.q])?,
                    read(&p("attn_k.bias"), &[d.kv])?,
                    read(&p("attn_v.bias"), &[d.kv])?,
                ])
            } else {
                None
            };
            let gate = read(&p("ffn_gate.weight"), &[d.ffn, h])?;
            let up = read(&p("ffn_up.weight"), &[d.ffn, h])?;
            let attn_norm = read(&p("attn_norm.weight"), &[h])?;
            let o = read(&p("attn_output.weight"), &[h, d.q])?;
            let ffn_norm = read(&p("ffn_norm.weight"), &[h])?;
            let down = read(&p("ffn_down.weight"), &[h, d.ffn])?;
            for (rank, gpu) in gpus.iter().enumerate() {
                let (q_rows, kv_rows) = (partition.query_rows(rank), partition.kv_rows(rank));
                let ffn_rows = partition.ffn_rows(rank);
                // Q, K and V rows of this rank's heads, stacked; likewise gate and up rows.
                let stacked = |parts: [(&[u8], usize, &std::ops::Range<usize>); 3]| {
                    parts
                        .iter()
                        .flat_map(|(m, row_bytes, rows)| {
                            matrix_rows(m, *row_bytes, (*rows).clone()).iter().copied()
                        })
                        .collect::<Vec<u8>>()
                };
                let qkv = stacked([(&q, row, &q_rows), (&k, row, &kv_rows), (&v, row, &kv_rows)]);
                let bias = qkv_bias
                    .as_ref()
                    .map(|[qb, kb, vb]| {
                        gpu.upload(&stacked([
                            (qb, e, &q_rows),
                            (kb, e, &kv_rows),
                            (vb, e, &kv_rows),
                        ]))
                    })
                    .transpose()?;
                let mut gate_up = matrix_rows(&gate, row, ffn_rows.clone()).to_vec();
                gate_up.extend_from_slice(matrix_rows(&up, row, ffn_rows.clone()));
                layers[rank].push(LayerWeights {
                    attn_norm: gpu.upload(&attn_norm)?,
                    qkv: Matrix::Dense(gpu.upload(&qkv)?),
                    qkv_bias: bias,
                    o: Matrix::Dense(gpu.upload(&matrix_columns(&o, d.q, e, q_rows))?),
                    ffn_norm: gpu.upload(&ffn_norm)?,
                    gate_up: Matrix::Dense(gpu.upload(&gate_up)?),
                    down: Matrix::Dense(gpu.upload(&matrix_columns(&down, d.ffn, e, ffn_rows))?),
                });
            }
        }
        let embed = read("token_embd.weight", &[vocab, h])?;
        let final_norm = read("output_norm.weight", &[h])?;
        let mut weights = Vec::with_capacity(gpus.len());
        for ((rank, gpu), layers) in gpus.iter().enumerate().zip(layers) {
            let vocab_rows = partition.vocab_rows(rank);
            weights.push(Weights {
                embed: gpu.upload(matrix_rows(&embed, row, vocab_rows.clone()))?,
                final_norm: gpu.upload(&final_norm)?,
                lm_head: lm_head
                    .as_ref()
                    .map(|head| gpu.upload(matrix_rows(head, row, vocab_rows.clone())))
                    .transpose()?,
                layers,
                rope_freq_factors: None,
            });
            gpu.stream.synchronize().context("uploading weights")?;
        }
        Ok(weights)
    }
}

/// The parts of the model's whole tensors one rank holds, as windows (see
/// tensor_parallel.rs): its Q, K and V rows of the fused Q·K·V matrix and of its bias (a
/// matrix one element wide), its columns of the output projection, its gate and up rows,
/// its columns of the down projection, and its rows of the embedding table and LM head.
struct RankSlices {
    qkv: [Window; 3],
    qkv_bias: [Window; 3],
    o: [Window; 1],
    gate_up: [Window; 2],
    down: [Window; 1],
    vocab: [Window; 1],
}

impl RankSlices {
    fn of(config: &ModelConfig, partition: &Partition, rank: usize) -> Self {
        let d = Dims::of(config);
        let h = d.hidden;
        let (q, kv, ffn) = (
            partition.query_rows(rank),
            partition.kv_rows(rank),
            partition.ffn_rows(rank),
        );
        let shifted = |rows: &std::ops::Range<usize>, by: usize| rows.start + by..rows.end + by;
        let qkv_rows = |width: usize| {
            [
                Window::rows(width, q.clone()),
                Window::rows(width, shifted(&kv, d.q)),
                Window::rows(width, shifted(&kv, d.q + d.kv)),
            ]
        };
        RankSlices {
            qkv: qkv_rows(h),
            qkv_bias: qkv_rows(1),
            o: [Window::columns(h, d.q, q.clone())],
            gate_up: [
                Window::rows(h, ffn.clone()),
                Window::rows(h, shifted(&ffn, d.ffn)),
            ],
            down: [Window::columns(h, d.ffn, ffn.clone())],
            vocab: [Window::rows(h, partition.vocab_rows(rank))],
        }
    }
}

/// A window of a whole tensor seen as a matrix with `full_columns` columns: `rows` ×
/// `columns` elements from row `first_row`, column `first_column` (see `init_random`).
#[derive(Debug, Clone)]
struct Window {
    len: usize,
    columns: usize,
    full_columns: usize,
    offset: usize,
}

impl Window {
    /// Whole rows `rows` of a matrix `width` elements wide.
    fn rows(width: usize, rows: std::ops::Range<usize>) -> Self {
        Window {
            len: rows.len() * width,
            columns: width,
            full_columns: width,
            offset: rows.start * width,
        }
    }

    /// Columns `columns` of every one of `rows` rows of a matrix `width` elements wide.
    fn columns(rows: usize, width: usize, columns: std::ops::Range<usize>) -> Self {
        Window {
            len: rows * columns.len(),
            columns: columns.len(),
            full_columns: width,
            offset: columns.start,
        }
    }
}

/// A device tensor holding `windows` of one random tensor (drawn from `seed`), one after
/// the other.
fn random_tensor(
    gpu: &Gpu,
    windows: &[Window],
    seed: u64,
    center: f32,
    scale: f32,
) -> anyhow::Result<DeviceBuffer> {
    let e = gpu.dtype.size_in_bytes();
    let len: usize = windows.iter().map(|w| w.len).sum();
    let buffer = gpu.alloc(len * e)?;
    let mut at = buffer.ptr;
    for w in windows {
        fill_window(gpu, at, w, seed, center, scale)?;
        at += (w.len * e) as u64;
    }
    Ok(buffer)
}

/// Fills `len` elements of the GPU's dtype at `ptr` with the whole random tensor drawn
/// from `seed` (values `center` ± `scale`, see `init_random`).
pub fn fill_random(
    gpu: &Gpu,
    ptr: u64,
    len: usize,
    seed: u64,
    center: f32,
    scale: f32,
) -> anyhow::Result<()> {
    fill_window(gpu, ptr, &Window::rows(len, 0..1), seed, center, scale)
}

fn fill_window(
    gpu: &Gpu,
    at: u64,
    w: &Window,
    seed: u64,
    center: f32,
    scale: f32,
) -> anyhow::Result<()> {
    gpu.launch(
        "init_random",
        grid(w.len.div_ceil(256).clamp(1, 65_536), 256),
        &[
            &at,
            &(w.len as u64),
            &(w.columns as u64),
            &(w.full_columns as u64),
            &(w.offset as u64),
            &seed,
            &center,
            &scale,
        ],
    )
}

/// Rows of a Q or K projection (or bias) of `heads` heads, from GGUF Llama's order (row
/// 2i + j of a head is RoPE pair i's j-th element) back to HF's (row j·head_dim/2 + i).
pub fn unpermute_rope_rows(values: &[f32], heads: usize, head_dim: usize) -> Vec<f32> {
    let cols = values.len() / (heads * head_dim);
    let half = head_dim / 2;
    let mut out = vec![0f32; values.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let from = (h * head_dim + 2 * i + j) * cols;
                let to = (h * head_dim + j * half + i) * cols;
                out[to..to + cols].copy_from_slice(&values[from..from + cols]);
            }
        }
    }
    out
}

/// Gives a tensor's bytes in the runner's dtype, asked for by its GGUF name and the shape it
/// must have; None when the checkpoint lacks it.
type TensorReader<'a> = dyn FnMut(&str, &[usize]) -> anyhow::Result<Option<Vec<u8>>> + 'a;

/// The widths the weights are made of.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub hidden: usize,
    pub q: usize,
    pub kv: usize,
    pub qkv: usize,
    pub ffn: usize,
}

impl Dims {
    pub fn of(c: &ModelConfig) -> Self {
        let q = c.num_heads * c.head_dim;
        let kv = c.num_kv_heads * c.head_dim;
        Dims {
            hidden: c.hidden_size,
            q,
            kv,
            qkv: q + 2 * kv,
            ffn: c.intermediate_size,
        }
    }
}

/// A tensor's little-endian bytes in `to`.
fn convert(name: &str, from: StDtype, data: &[u8], to: DType) -> anyhow::Result<Vec<u8>> {
    match (from, to) {
        (StDtype::BF16, DType::Bf16) | (StDtype::F32, DType::F32) => Ok(data.to_vec()),
        _ => Ok(to_dtype_bytes(
            float_values(name, from, data)?.into_iter(),
            to,
        )),
    }
}

/// A bf16, f16 or f32 tensor's values.
fn float_values(name: &str, from: StDtype, data: &[u8]) -> anyhow::Result<Vec<f32>> {
    let values: Box<dyn Iterator<Item = f32>> = match from {
        StDtype::BF16 => Box::new(
            data.chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        StDtype::F16 => Box::new(
            data.chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        StDtype::F32 => Box::new(
            data.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        other => bail!(
            "tensor {name:?} has unsupported type {other:?} (bf16, f16, f32, or FP8 E4M3 with \
             scales)"
        ),
    };
    Ok(values.collect())
}

/// f32 values as little-endian bytes of `to`.
fn to_dtype_bytes(values: impl Iterator<Item = f32>, to: DType) -> Vec<u8> {
    match to {
        DType::Bf16 => values
            .flat_map(|v| bf16::from_f32(v).to_le_bytes())
            .collect(),
        DType::F32 => values.flat_map(f32::to_le_bytes).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The places in the whole tensor of a rank's elements, in the order it stores them
    /// (what `init_random` computes for each element).
    fn places(windows: &[Window]) -> Vec<usize> {
        windows
            .iter()
            .flat_map(|w| {
                (0..w.len).map(|i| w.offset + (i / w.columns) * w.full_columns + i % w.columns)
            })
            .collect()
    }

    #[test]
    fn random_slices_cut_the_same_tensors_for_any_number_of_ranks() {
        let config = ModelConfig::from_hf_json(
            r#"{"model_type": "llama", "hidden_size": 8, "intermediate_size": 12,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 2, "vocab_size": 10}"#,
        )
        .unwrap();
        let d = Dims::of(&config);
        let one = RankSlices::of(&config, &Partition::new(&config, 1).unwrap(), 0);
        // One rank holds every tensor whole, in order: what the model had before sharding.
        for (windows, len) in [
            (&one.qkv[..], d.qkv * d.hidden),
            (&one.qkv_bias[..], d.qkv),
            (&one.o[..], d.hidden * d.q),
            (&one.gate_up[..], 2 * d.ffn * d.hidden),
            (&one.down[..], d.hidden * d.ffn),
            (&one.vocab[..], 10 * d.hidden),
        ] {
            assert_eq!(places(windows), (0..len).collect::<Vec<_>>());
        }
        let two = Partition::new(&config, 2).unwrap();
        let [r0, r1] = [0, 1].map(|r| RankSlices::of(&config, &two, r));
        // Rank 1's Q rows are heads 2 and 3 (rows 4..8 of 8 wide), its K rows head 1 of K.
        assert_eq!(places(&r1.qkv[..1])[0], 4 * 8);
        assert_eq!(places(&r1.qkv[1..2])[0], (8 + 2) * 8);
        // Rank 1's columns of the output projection: 4..8 of each of the 8 rows.
        assert_eq!(&places(&r1.o)[..5], &[4, 5, 6, 7, 12]);
        // Together the two ranks hold every element of every tensor exactly once.
        let tensors = |s: &RankSlices| {
            [
                s.qkv.to_vec(),
                s.qkv_bias.to_vec(),
                s.o.to_vec(),
                s.gate_up.to_vec(),
                s.down.to_vec(),
                s.vocab.to_vec(),
            ]
        };
        for ((whole, a), b) in tensors(&one).iter().zip(tensors(&r0)).zip(tensors(&r1)) {
            let mut both = places(&a);
            both.extend(places(&b));
            both.sort_unstable();
            assert_eq!(both, places(whole));
        }
    }

    #[test]
    fn gguf_rope_rows_go_back_to_the_hf_order() {
        // One head of 4 dimensions, 2 columns: GGUF rows are pairs (0, 2), (1, 3) of HF.
        let hf = [[0.0f32, 0.5], [1.0, 1.5], [2.0, 2.5], [3.0, 3.5]];
        let gguf: Vec<f32> = [0, 2, 1, 3].iter().flat_map(|&r| hf[r]).collect();
        let back = unpermute_rope_rows(&gguf, 1, 4);
        assert_eq!(back, hf.concat());
        // Heads are permuted each on its own; a bias is a matrix of one column.
        let two_heads: Vec<f32> = [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0].to_vec();
        assert_eq!(
            unpermute_rope_rows(&two_heads, 2, 4),
            (0..8).map(|v| v as f32).collect::<Vec<_>>()
        );
    }

    #[test]
    fn conversions_round_trip_the_stored_values() {
        let values = [1.5f32, -0.25, 3.0e-3];
        let bf: Vec<u8> = values
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect();
        let as_f32 = convert("t", StDtype::BF16, &bf, DType::F32).unwrap();
        let back: Vec<f32> = as_f32
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        for (a, b) in values.iter().zip(&back) {
            assert!((a - b).abs() <= a.abs() / 128.0, "{a} vs {b}");
        }
        assert_eq!(convert("t", StDtype::BF16, &bf, DType::Bf16).unwrap(), bf);
        let f16s: Vec<u8> = values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect();
        assert_eq!(
            convert("t", StDtype::F16, &f16s, DType::Bf16)
                .unwrap()
                .len(),
            6
        );
        let err = convert("t", StDtype::I64, &[0; 8], DType::Bf16).unwrap_err();
        assert!(err.to_string().contains("unsupported type"), "{err}");
    }
}
