//! Hugging Face checkpoints: `config.json` plus safetensors, one file or sharded. Weights
//! in f32, f16 or bf16 become f32 (the CPU kernels' dense format), and so do FP8 ones,
//! times their scales.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::{fp8_scales, OpenedModel, RopeLayout, TensorSource};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::qmatmul::Linear;

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })
}

pub(super) fn open_dir(dir: &Path) -> Result<OpenedModel> {
    open_files(dir, weight_files(dir)?)
}

/// The safetensors files of an HF checkpoint directory: the shards listed in
/// `model.safetensors.index.json`, or `model.safetensors`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    Ok(if index.exists() {
        let json: serde_json::Value = serde_json::from_str(&read_text(&index)?)
            .map_err(|e| ModelError::Config(format!("{}: {e}", index.display())))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::Config(format!("{} has no weight_map", index.display())))?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|f| f.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        files
    } else {
        vec![dir.join("model.safetensors")]
    })
}

pub(super) fn open_files(dir: &Path, files: Vec<PathBuf>) -> Result<OpenedModel> {
    let config = ModelConfig::from_hf_json(&read_text(&dir.join("config.json"))?)?;
    let mut tensors = HashMap::new();
    for file in &files {
        if !file.exists() {
            return Err(ModelError::Io {
                path: file.clone(),
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        tensors.extend(candle_core::safetensors::load(file, &Device::Cpu)?);
    }
    Ok(OpenedModel {
        config,
        rope_layout: RopeLayout::Halves,
        tensors: Box::new(HfTensors { tensors }),
        gguf: None,
    })
}

/// The HF name of a tensor given by its GGUF name.
pub fn hf_name(gguf: &str) -> String {
    match gguf {
        "token_embd.weight" => return "model.embed_tokens.weight".into(),
        "output_norm.weight" => return "model.norm.weight".into(),
        "output.weight" => return "lm_head.weight".into(),
        _ => {}
    }
    let Some(rest) = gguf.strip_prefix("blk.") else {
        return gguf.to_string();
    };
    let Some((layer, rest)) = rest.split_once('.') else {
        return gguf.to_string();
    };
    let Some((part, suffix)) = rest.rsplit_once('.') else {
        return gguf.to_string();
    };
    let part = match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        other => other,
    };
    format!("model.layers.{layer}.{part}.{suffix}")
}

struct HfTensors {
    tensors: HashMap<String, Tensor>,
}

impl HfTensors {
    /// Removes the tensor (each is read once) and converts it to f32; FP8 codes are
    /// multiplied by the scale tensor beside them.
    fn take(&mut self, gguf: &str) -> Result<(String, Tensor)> {
        let name = hf_name(gguf);
        let t = self
            .tensors
            .remove(&name)
            .ok_or_else(|| ModelError::MissingTensor(name.clone()))?;
        match t.dtype() {
            DType::F32 | DType::F16 | DType::BF16 => {
                let t = t.to_dtype(DType::F32)?;
                Ok((name, t))
            }
            DType::F8E4M3 => {
                let t = self.widen_fp8(&name, t)?;
                Ok((name, t))
            }
            other => Err(ModelError::UnsupportedDtype {
                name,
                dtype: format!("{other:?}"),
            }),
        }
    }

    /// An FP8 weight's values: its codes times its scales (`fp8_scales`).
    fn widen_fp8(&mut self, name: &str, codes: Tensor) -> Result<Tensor> {
        let &[n, k] = codes.dims() else {
            return Err(ModelError::BadShape {
                name: name.to_string(),
                expected: vec![0, 0],
                actual: codes.dims().to_vec(),
            });
        };
        let scale = fp8_scales::scale_names(name)
            .into_iter()
            .find_map(|s| self.tensors.remove(&s))
            .ok_or_else(|| ModelError::MissingTensor(format!("{name}_scale")))?;
        let mut values = codes
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let scales = scale
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        fp8_scales::apply_scales(name, &mut values, n, k, &scales, scale.dims())?;
        Ok(Tensor::from_vec(values, (n, k), &Device::Cpu)?)
    }
}

impl TensorSource for HfTensors {
    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(&hf_name(name))
    }

    fn matrix(&mut self, name: &str) -> Result<Linear> {
        let (name, t) = self.take(name)?;
        let &[n, k] = t.dims() else {
            return Err(ModelError::BadShape {
                name,
                expected: vec![0, 0],
                actual: t.dims().to_vec(),
            });
        };
        Linear::from_f32(&name, n, k, t.flatten_all()?.to_vec1::<f32>()?)
    }

    fn vector(&mut self, name: &str) -> Result<Vec<f32>> {
        let (_, t) = self.take(name)?;
        Ok(t.flatten_all()?.to_vec1::<f32>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::hf_name;

    #[test]
    fn gguf_names_map_to_hf_names() {
        assert_eq!(hf_name("token_embd.weight"), "model.embed_tokens.weight");
        assert_eq!(
            hf_name("blk.12.attn_q.bias"),
            "model.layers.12.self_attn.q_proj.bias"
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight"),
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert_eq!(hf_name("output.weight"), "lm_head.weight");
    }
}
