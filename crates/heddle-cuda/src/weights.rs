//! Model weights on the GPU: read from HF safetensors (bf16, f16 or f32, one file or
//! sharded) or made up on the device for benchmarks. Q, K and V are stored as one fused
//! matrix, and so are the MLP's gate and up projections: one GEMM each instead of three
//! and two.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context};
use half::{bf16, f16};
use heddle_model::ModelConfig;
use safetensors::{Dtype as StDtype, SafeTensors};

use crate::gpu::{grid, DeviceBuffer, Gpu};
use crate::kernels::DType;

pub struct LayerWeights {
    pub attn_norm: DeviceBuffer,
    /// [q_dim + 2 kv_dim, hidden]: Q, K and V projections stacked.
    pub qkv: DeviceBuffer,
    /// [q_dim + 2 kv_dim] (Qwen2).
    pub qkv_bias: Option<DeviceBuffer>,
    pub o: DeviceBuffer,
    pub ffn_norm: DeviceBuffer,
    /// [2 intermediate, hidden]: gate then up.
    pub gate_up: DeviceBuffer,
    pub down: DeviceBuffer,
}

pub struct Weights {
    pub embed: DeviceBuffer,
    pub final_norm: DeviceBuffer,
    /// None when tied to the embeddings.
    pub lm_head: Option<DeviceBuffer>,
    pub layers: Vec<LayerWeights>,
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
                    + l.qkv.bytes
                    + l.qkv_bias.as_ref().map_or(0, |b| b.bytes)
                    + l.o.bytes
                    + l.ffn_norm.bytes
                    + l.gate_up.bytes
                    + l.down.bytes
            })
            .sum();
        layers
            + self.embed.bytes
            + self.final_norm.bytes
            + self.lm_head.as_ref().map_or(0, |h| h.bytes)
    }

    /// Random weights at the model's shape, generated on the GPU (no host transfer):
    /// matrices with standard deviation about 0.02 (as initialisers use), norm weights
    /// near 1, so activations stay finite through any depth.
    pub fn dummy(gpu: &Gpu, config: &ModelConfig, seed: u64) -> anyhow::Result<Self> {
        let mut next_seed = seed;
        let mut tensor = |len: usize, center: f32, scale: f32| -> anyhow::Result<DeviceBuffer> {
            next_seed = next_seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let buffer = gpu.alloc(len * gpu.dtype.size_in_bytes())?;
            let blocks = len.div_ceil(256).clamp(1, 65_536);
            gpu.launch(
                "init_random",
                grid(blocks, 256),
                &[&buffer.ptr, &(len as u64), &next_seed, &center, &scale],
            )?;
            Ok(buffer)
        };
        // init_random's triangular values on (-s, s) have standard deviation s/√6.
        let (w, norm, bias) = (0.049, 0.05, 0.01);
        let d = Dims::of(config);
        let mut layers = Vec::with_capacity(config.num_layers);
        for _ in 0..config.num_layers {
            layers.push(LayerWeights {
                attn_norm: tensor(d.hidden, 1.0, norm)?,
                qkv: tensor(d.qkv * d.hidden, 0.0, w)?,
                qkv_bias: if config.attention_bias {
                    Some(tensor(d.qkv, 0.0, bias)?)
                } else {
                    None
                },
                o: tensor(d.hidden * d.q, 0.0, w)?,
                ffn_norm: tensor(d.hidden, 1.0, norm)?,
                gate_up: tensor(2 * d.ffn * d.hidden, 0.0, w)?,
                down: tensor(d.hidden * d.ffn, 0.0, w)?,
            });
        }
        let weights = Weights {
            embed: tensor(config.vocab_size * d.hidden, 0.0, w)?,
            final_norm: tensor(d.hidden, 1.0, norm)?,
            lm_head: if config.tie_word_embeddings {
                None
            } else {
                Some(tensor(config.vocab_size * d.hidden, 0.0, w)?)
            },
            layers,
        };
        gpu.stream
            .synchronize()
            .context("initialising dummy weights")?;
        Ok(weights)
    }

    /// Reads an HF checkpoint directory's safetensors, converting to the runner's dtype.
    pub fn load(gpu: &Gpu, config: &ModelConfig, dir: &Path) -> anyhow::Result<Self> {
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
        let dtype = gpu.dtype;
        let read = |name: &str, shape: &[usize]| -> anyhow::Result<Vec<u8>> {
            let file = *by_name
                .get(name)
                .with_context(|| format!("tensor {name:?} is missing from {}", dir.display()))?;
            let view = parsed[file].tensor(name)?;
            if view.shape() != shape {
                bail!(
                    "tensor {name:?} has shape {:?}, expected {shape:?}",
                    view.shape()
                );
            }
            convert(name, view.dtype(), view.data(), dtype)
        };
        let d = Dims::of(config);
        let h = d.hidden;
        let mut layers = Vec::with_capacity(config.num_layers);
        for l in 0..config.num_layers {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            let mut qkv = read(&p("self_attn.q_proj.weight"), &[d.q, h])?;
            qkv.extend(read(&p("self_attn.k_proj.weight"), &[d.kv, h])?);
            qkv.extend(read(&p("self_attn.v_proj.weight"), &[d.kv, h])?);
            let qkv_bias = if config.attention_bias {
                let mut b = read(&p("self_attn.q_proj.bias"), &[d.q])?;
                b.extend(read(&p("self_attn.k_proj.bias"), &[d.kv])?);
                b.extend(read(&p("self_attn.v_proj.bias"), &[d.kv])?);
                Some(gpu.upload(&b)?)
            } else {
                None
            };
            let mut gate_up = read(&p("mlp.gate_proj.weight"), &[d.ffn, h])?;
            gate_up.extend(read(&p("mlp.up_proj.weight"), &[d.ffn, h])?);
            layers.push(LayerWeights {
                attn_norm: gpu.upload(&read(&p("input_layernorm.weight"), &[h])?)?,
                qkv: gpu.upload(&qkv)?,
                qkv_bias,
                o: gpu.upload(&read(&p("self_attn.o_proj.weight"), &[h, d.q])?)?,
                ffn_norm: gpu.upload(&read(&p("post_attention_layernorm.weight"), &[h])?)?,
                gate_up: gpu.upload(&gate_up)?,
                down: gpu.upload(&read(&p("mlp.down_proj.weight"), &[h, d.ffn])?)?,
            });
        }
        let vocab = config.vocab_size;
        let lm_head = if config.tie_word_embeddings && !by_name.contains_key("lm_head.weight") {
            None
        } else {
            Some(gpu.upload(&read("lm_head.weight", &[vocab, h])?)?)
        };
        let weights = Weights {
            embed: gpu.upload(&read("model.embed_tokens.weight", &[vocab, h])?)?,
            final_norm: gpu.upload(&read("model.norm.weight", &[h])?)?,
            lm_head,
            layers,
        };
        gpu.stream.synchronize().context("uploading weights")?;
        Ok(weights)
    }
}

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
    let values: Box<dyn Iterator<Item = f32>> = match from {
        StDtype::BF16 if to == DType::Bf16 => return Ok(data.to_vec()),
        StDtype::F32 if to == DType::F32 => return Ok(data.to_vec()),
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
        other => bail!("tensor {name:?} has unsupported type {other:?} (bf16, f16 or f32)"),
    };
    Ok(match to {
        DType::Bf16 => values
            .flat_map(|v| bf16::from_f32(v).to_le_bytes())
            .collect(),
        DType::F32 => values.flat_map(f32::to_le_bytes).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
