//! A model's shape and hyper-parameters, read from a Hugging Face `config.json` or from
//! GGUF metadata.

use std::collections::HashMap;

use candle_core::quantized::gguf_file;
use serde::Deserialize;

use crate::error::{ModelError, Result};

/// The model families the CPU runner implements. Both are decoder-only transformers with
/// RMSNorm, RoPE, grouped-query attention and a SwiGLU MLP; Qwen2 adds biases to the Q, K
/// and V projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2/3, Mistral, SmolLM and other `LlamaForCausalLM` shapes.
    Llama,
    /// Qwen2 and Qwen2.5.
    Qwen2,
}

impl Architecture {
    /// Maps a GGUF `general.architecture` or an HF `model_type` onto a family.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "llama" | "mistral" => Ok(Architecture::Llama),
            "qwen2" => Ok(Architecture::Qwen2),
            other => Err(ModelError::UnsupportedArchitecture(other.to_string())),
        }
    }
}

/// How RoPE frequencies are rescaled for contexts longer than the model was trained on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor` (every frequency divided by it).
    Linear { factor: f32 },
    /// Llama 3.1's: low frequencies divided by `factor`, high ones kept, a smooth ramp
    /// between, decided by wavelength against the original context length.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f32,
    pub rope_scaling: Option<RopeScaling>,
    pub rms_norm_eps: f32,
    /// The context length: the most positions a sequence may use.
    pub max_position_embeddings: usize,
    /// The output head is the token embedding table.
    pub tie_word_embeddings: bool,
    /// Q, K and V projections carry biases.
    pub attention_bias: bool,
    /// The checkpoint stores its projections as FP8 E4M3 codes with scales
    /// (`quantization_config`, see `loader::fp8_scales`); the loaders widen them.
    pub fp8_checkpoint: bool,
}

/// The fields of an HF `config.json` the runner reads.
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rope_theta: Option<f32>,
    rope_scaling: Option<serde_json::Value>,
    rms_norm_eps: Option<f32>,
    max_position_embeddings: Option<usize>,
    sliding_window: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    quantization_config: Option<HfQuantization>,
}

/// The fields of `quantization_config` that tell FP8 checkpoints from the others.
#[derive(Debug, Deserialize)]
struct HfQuantization {
    #[serde(default)]
    quant_method: String,
    /// `quant_method: "fp8"`: the FP8 format (E4M3 when absent).
    fmt: Option<String>,
    /// compressed-tensors: how the weights are stored, and each group's scheme.
    #[serde(default)]
    format: String,
    #[serde(default)]
    config_groups: HashMap<String, HfQuantizationGroup>,
}

#[derive(Debug, Deserialize)]
struct HfQuantizationGroup {
    weights: Option<HfQuantizationScheme>,
}

#[derive(Debug, Deserialize)]
struct HfQuantizationScheme {
    num_bits: Option<u32>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// Accepts a `quantization_config` of FP8 E4M3 weights with scales (the only quantized
/// checkpoints heddle reads); any other scheme is refused by name rather than misread.
fn check_fp8_checkpoint(q: &HfQuantization) -> Result<()> {
    let refuse = |why: String| {
        Err(ModelError::Config(format!(
            "config.json: quantization_config {why}; heddle reads FP8 (E4M3) checkpoints \
             (quant_method \"fp8\", or \"compressed-tensors\" in its float-quantized format)"
        )))
    };
    match q.quant_method.as_str() {
        "fp8" => match q.fmt.as_deref() {
            None | Some("e4m3") => Ok(()),
            Some(other) => refuse(format!("fmt {other:?}")),
        },
        "compressed-tensors" => {
            let fp8_weights = |group: &HfQuantizationGroup| {
                group
                    .weights
                    .as_ref()
                    .is_some_and(|w| w.kind.as_deref() == Some("float") && w.num_bits == Some(8))
            };
            if q.format == "float-quantized"
                && !q.config_groups.is_empty()
                && q.config_groups.values().all(fp8_weights)
            {
                Ok(())
            } else {
                refuse(format!(
                    "compressed-tensors format {:?} with weights other than 8-bit floats",
                    q.format
                ))
            }
        }
        other => refuse(format!("quant_method {other:?}")),
    }
}

impl ModelConfig {
    /// Parses the text of an HF `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let hf: HfConfig = serde_json::from_str(text)
            .map_err(|e| ModelError::Config(format!("config.json: {e}")))?;
        let arch_name = match (&hf.model_type, hf.architectures.first()) {
            (Some(t), _) => t.clone(),
            (None, Some(a)) => match a.as_str() {
                "LlamaForCausalLM" => "llama".to_string(),
                "MistralForCausalLM" => "mistral".to_string(),
                "Qwen2ForCausalLM" => "qwen2".to_string(),
                other => other.to_string(),
            },
            (None, None) => {
                return Err(ModelError::Config(
                    "config.json names neither model_type nor architectures".into(),
                ))
            }
        };
        let architecture = Architecture::from_name(&arch_name)?;
        let num_kv_heads = hf.num_key_value_heads.unwrap_or(hf.num_attention_heads);
        let head_dim = hf
            .head_dim
            .unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1));
        let mut max_position_embeddings = hf.max_position_embeddings.unwrap_or(2048);
        // Mistral's sliding window is not implemented: full attention equals it only up to
        // the window, so the window bounds the context.
        if arch_name == "mistral" {
            if let Some(window) = hf.sliding_window {
                max_position_embeddings = max_position_embeddings.min(window);
            }
        }
        let config = ModelConfig {
            architecture,
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads,
            head_dim,
            rope_theta: hf.rope_theta.unwrap_or(10_000.0),
            rope_scaling: hf
                .rope_scaling
                .as_ref()
                .map(hf_rope_scaling)
                .transpose()?
                .flatten(),
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            max_position_embeddings,
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            attention_bias: architecture == Architecture::Qwen2
                || hf.attention_bias.unwrap_or(false),
            fp8_checkpoint: match &hf.quantization_config {
                Some(q) => check_fp8_checkpoint(q).map(|()| true)?,
                None => false,
            },
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads the `{arch}.*` metadata of a GGUF file. Tying and biases are not metadata in
    /// GGUF: they follow from which tensors the file holds.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let md = &content.metadata;
        let arch_name = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| ModelError::Config("GGUF has no general.architecture".into()))?
            .clone();
        let architecture = Architecture::from_name(&arch_name)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let int = |k: &str| gguf_usize(md, &key(k));
        let float = |k: &str| gguf_f32(md, &key(k));
        let need =
            |k: &str| int(k)?.ok_or_else(|| ModelError::Config(format!("GGUF lacks {}", key(k))));

        let hidden_size = need("embedding_length")?;
        let num_heads = need("attention.head_count")?;
        let vocab_size = match int("vocab_size")? {
            Some(v) => v,
            None => match md
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.to_vec().ok())
            {
                Some(tokens) => tokens.len(),
                None => content
                    .tensor_infos
                    .get("token_embd.weight")
                    .map(|t| t.shape.dims()[0])
                    .ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?,
            },
        };
        let rope_scaling = match md
            .get(&key("rope.scaling.type"))
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
        {
            None | Some("none") => None,
            Some("linear") => Some(RopeScaling::Linear {
                factor: float("rope.scaling.factor")?.unwrap_or(1.0),
            }),
            Some(other) => {
                return Err(ModelError::Config(format!(
                    "unsupported rope scaling type {other:?}"
                )))
            }
        };
        let config = ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: need("feed_forward_length")?,
            num_layers: need("block_count")?,
            num_heads,
            num_kv_heads: int("attention.head_count_kv")?.unwrap_or(num_heads),
            head_dim: match int("attention.key_length")? {
                Some(d) => d,
                None => int("rope.dimension_count")?.unwrap_or(hidden_size / num_heads.max(1)),
            },
            rope_theta: float("rope.freq_base")?.unwrap_or(10_000.0),
            rope_scaling,
            rms_norm_eps: float("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
            max_position_embeddings: need("context_length")?,
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
            attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            fp8_checkpoint: false,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(ModelError::Config(what));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(format!("{name} must be > 0"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "{} attention heads cannot be shared evenly by {} KV heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if !(self.rope_theta > 0.0 && self.rms_norm_eps >= 0.0) {
            return bad("rope_theta must be > 0 and rms_norm_eps >= 0".into());
        }
        Ok(())
    }
}

fn hf_rope_scaling(v: &serde_json::Value) -> Result<Option<RopeScaling>> {
    if v.is_null() {
        return Ok(None);
    }
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let num = |name: &str| -> Result<f64> {
        v.get(name)
            .and_then(|x| x.as_f64())
            .ok_or_else(|| ModelError::Config(format!("rope_scaling.{name} is missing")))
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: num("factor")? as f32,
        })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: num("factor")? as f32,
            low_freq_factor: num("low_freq_factor")? as f32,
            high_freq_factor: num("high_freq_factor")? as f32,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        })),
        other => Err(ModelError::Config(format!(
            "unsupported rope scaling type {other:?} (heddle handles linear and llama3)"
        ))),
    }
}

/// An integer metadata value of any width, or None when absent.
fn gguf_usize(md: &HashMap<String, gguf_file::Value>, key: &str) -> Result<Option<usize>> {
    use gguf_file::Value as V;
    let Some(v) = md.get(key) else {
        return Ok(None);
    };
    let n: i128 = match v {
        V::U8(x) => *x as i128,
        V::I8(x) => *x as i128,
        V::U16(x) => *x as i128,
        V::I16(x) => *x as i128,
        V::U32(x) => *x as i128,
        V::I32(x) => *x as i128,
        V::U64(x) => *x as i128,
        V::I64(x) => *x as i128,
        other => {
            return Err(ModelError::Config(format!(
                "GGUF {key} should be an integer, is {other:?}"
            )))
        }
    };
    usize::try_from(n)
        .map(Some)
        .map_err(|_| ModelError::Config(format!("GGUF {key} = {n} is out of range")))
}

fn gguf_f32(md: &HashMap<String, gguf_file::Value>, key: &str) -> Result<Option<f32>> {
    use gguf_file::Value as V;
    match md.get(key) {
        None => Ok(None),
        Some(V::F32(x)) => Ok(Some(*x)),
        Some(V::F64(x)) => Ok(Some(*x as f32)),
        Some(other) => Err(ModelError::Config(format!(
            "GGUF {key} should be a float, is {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2_CONFIG: &str = r#"{
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
        "rms_norm_eps": 1e-05, "rope_theta": 100000, "max_position_embeddings": 8192,
        "tie_word_embeddings": true, "rope_scaling": null, "torch_dtype": "bfloat16"
    }"#;

    #[test]
    fn parses_an_hf_llama_config() {
        let c = ModelConfig::from_hf_json(SMOLLM2_CONFIG).unwrap();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (9, 3, 64));
        assert_eq!((c.num_layers, c.intermediate_size), (30, 1536));
        assert_eq!(c.rope_theta, 100_000.0);
        assert!(c.tie_word_embeddings && !c.attention_bias && c.rope_scaling.is_none());
    }

    #[test]
    fn fp8_checkpoints_are_recognised_and_other_quantizations_refused() {
        let with = |q: &str| {
            ModelConfig::from_hf_json(&format!(
                r#"{{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 10,
                "quantization_config": {q}}}"#
            ))
        };
        let block =
            with(r#"{"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}"#);
        assert!(block.unwrap().fp8_checkpoint);
        let compressed = with(
            r#"{"quant_method": "compressed-tensors", "format": "float-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
            "input_activations": {"num_bits": 8, "type": "float", "dynamic": true}}},
            "ignore": ["lm_head"]}"#,
        );
        assert!(compressed.unwrap().fp8_checkpoint);
        let gptq = with(r#"{"quant_method": "gptq", "bits": 4}"#).unwrap_err();
        assert!(gptq.to_string().contains("quant_method \"gptq\""), "{gptq}");
        let int8 = with(
            r#"{"quant_method": "compressed-tensors", "format": "int-quantized",
            "config_groups": {"g": {"weights": {"num_bits": 8, "type": "int"}}}}"#,
        )
        .unwrap_err();
        assert!(int8.to_string().contains("int-quantized"), "{int8}");
        let e5m2 = with(r#"{"quant_method": "fp8", "fmt": "e5m2"}"#).unwrap_err();
        assert!(e5m2.to_string().contains("e5m2"), "{e5m2}");
    }

    #[test]
    fn parses_qwen2_and_llama3_rope_scaling() {
        let qwen = r#"{"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
            "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
            "vocab_size": 151936, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
            "tie_word_embeddings": true}"#;
        let c = ModelConfig::from_hf_json(qwen).unwrap();
        assert_eq!(c.architecture, Architecture::Qwen2);
        assert!(c.attention_bias);
        assert_eq!(c.head_dim, 64);

        let llama3 = r#"{"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
            "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
            "vocab_size": 128256, "rope_theta": 500000.0, "max_position_embeddings": 131072,
            "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3"}}"#;
        let c = ModelConfig::from_hf_json(llama3).unwrap();
        assert_eq!(
            c.rope_scaling,
            Some(RopeScaling::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192
            })
        );
    }

    #[test]
    fn unsupported_architectures_and_bad_shapes_are_named() {
        let gpt2 = SMOLLM2_CONFIG.replace("\"llama\"", "\"gpt2\"");
        let err = ModelConfig::from_hf_json(&gpt2).unwrap_err();
        assert!(err.to_string().contains("gpt2"), "{err}");

        let uneven =
            SMOLLM2_CONFIG.replace("\"num_key_value_heads\": 3", "\"num_key_value_heads\": 4");
        let err = ModelConfig::from_hf_json(&uneven).unwrap_err();
        assert!(err.to_string().contains("KV heads"), "{err}");

        let yarn = SMOLLM2_CONFIG.replace("null", r#"{"type": "yarn", "factor": 4.0}"#);
        let err = ModelConfig::from_hf_json(&yarn).unwrap_err();
        assert!(err.to_string().contains("yarn"), "{err}");
    }
}
