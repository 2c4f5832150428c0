//! The two loading paths agree: a small random model written as a Hugging Face checkpoint
//! (config.json, sharded safetensors in bf16 and f32) and as a GGUF file the way
//! llama.cpp's converter writes it (Llama's Q and K rows permuted for its RoPE layout)
//! give the same logits. This checks the safetensors reader, the shard index, the tensor
//! name mapping, the dtype conversion, the two RoPE layouts, tied and untied heads, and
//! Qwen2's attention biases.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use heddle_model::kv_cache::KvDtype;
use heddle_model::llama::Llama;

const VOCAB: usize = 96;
const HIDDEN: usize = 64;
const FFN: usize = 96;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;

/// A deterministic pseudo-random tensor with values in [-scale, scale) around `center`.
fn random(shape: &[usize], seed: u64, center: f32, scale: f32) -> Tensor {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let n = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            center + scale * ((s >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// The model's tensors by HF name, rounded through bf16 so both files hold equal values.
fn weights(qwen2: bool) -> Vec<(String, Tensor)> {
    let mut seed = 0;
    let mut t = |name: String, shape: &[usize], center: f32, scale: f32| {
        seed += 1;
        let w = random(shape, seed, center, scale)
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        (name, w)
    };
    let (q, kv) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    let mut all = vec![t(
        "model.embed_tokens.weight".into(),
        &[VOCAB, HIDDEN],
        0.0,
        1.0,
    )];
    for l in 0..LAYERS {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        all.push(t(p("input_layernorm.weight"), &[HIDDEN], 1.0, 0.2));
        all.push(t(p("self_attn.q_proj.weight"), &[q, HIDDEN], 0.0, 0.3));
        all.push(t(p("self_attn.k_proj.weight"), &[kv, HIDDEN], 0.0, 0.3));
        all.push(t(p("self_attn.v_proj.weight"), &[kv, HIDDEN], 0.0, 0.3));
        all.push(t(p("self_attn.o_proj.weight"), &[HIDDEN, q], 0.0, 0.2));
        if qwen2 {
            all.push(t(p("self_attn.q_proj.bias"), &[q], 0.0, 0.5));
            all.push(t(p("self_attn.k_proj.bias"), &[kv], 0.0, 0.5));
            all.push(t(p("self_attn.v_proj.bias"), &[kv], 0.0, 0.5));
        }
        all.push(t(p("post_attention_layernorm.weight"), &[HIDDEN], 1.0, 0.2));
        all.push(t(p("mlp.gate_proj.weight"), &[FFN, HIDDEN], 0.0, 0.3));
        all.push(t(p("mlp.up_proj.weight"), &[FFN, HIDDEN], 0.0, 0.3));
        all.push(t(p("mlp.down_proj.weight"), &[HIDDEN, FFN], 0.0, 0.2));
    }
    all.push(t("model.norm.weight".into(), &[HIDDEN], 1.0, 0.2));
    if qwen2 {
        all.push(t("lm_head.weight".into(), &[VOCAB, HIDDEN], 0.0, 0.5));
    }
    all
}

fn hf_config(qwen2: bool) -> String {
    format!(
        r#"{{"model_type": "{}", "vocab_size": {VOCAB}, "hidden_size": {HIDDEN},
        "intermediate_size": {FFN}, "num_hidden_layers": {LAYERS},
        "num_attention_heads": {HEADS}, "num_key_value_heads": {KV_HEADS},
        "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 128,
        "tie_word_embeddings": {}}}"#,
        if qwen2 { "qwen2" } else { "llama" },
        !qwen2
    )
}

/// Writes config.json and two shards (the first in bf16, the second in f32) with their
/// index.
fn write_hf(dir: &Path, weights: &[(String, Tensor)], qwen2: bool) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), hf_config(qwen2)).unwrap();
    let (first, second) = weights.split_at(weights.len() / 2);
    let mut index = serde_json::Map::new();
    for (file, part, dtype) in [
        ("model-00001-of-00002.safetensors", first, DType::BF16),
        ("model-00002-of-00002.safetensors", second, DType::F32),
    ] {
        let tensors: HashMap<String, Tensor> = part
            .iter()
            .map(|(n, t)| (n.clone(), t.to_dtype(dtype).unwrap()))
            .collect();
        candle_core::safetensors::save(&tensors, dir.join(file)).unwrap();
        for (n, _) in part {
            index.insert(n.clone(), file.into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": index });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

/// llama.cpp's converter permutation of Llama's Q/K rows: within each head, rows
/// (i, i + d/2) become rows (2i, 2i + 1).
fn permute_rows(t: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = t.dims2().unwrap();
    let d = rows / heads;
    t.reshape((heads, 2, d / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

fn gguf_name(hf: &str) -> String {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, rest) = rest.split_once('.').unwrap();
    let (part, suffix) = rest.rsplit_once('.').unwrap();
    let part = match part {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        other => panic!("unexpected tensor {other}"),
    };
    format!("blk.{layer}.{part}.{suffix}")
}

fn write_gguf(path: &Path, weights: &[(String, Tensor)], qwen2: bool) {
    use gguf_file::Value;
    let arch = if qwen2 { "qwen2" } else { "llama" };
    let key = |k: &str| format!("{arch}.{k}");
    let metadata = [
        (
            "general.architecture".to_string(),
            Value::String(arch.into()),
        ),
        (key("context_length"), Value::U32(128)),
        (key("embedding_length"), Value::U32(HIDDEN as u32)),
        (key("feed_forward_length"), Value::U32(FFN as u32)),
        (key("block_count"), Value::U32(LAYERS as u32)),
        (key("attention.head_count"), Value::U32(HEADS as u32)),
        (key("attention.head_count_kv"), Value::U32(KV_HEADS as u32)),
        (key("attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        (key("rope.freq_base"), Value::F32(10_000.0)),
        (key("vocab_size"), Value::U32(VOCAB as u32)),
    ];
    let tensors: Vec<(String, QTensor)> = weights
        .iter()
        .map(|(name, t)| {
            let t = match (qwen2, name.as_str()) {
                (false, n) if n.ends_with("q_proj.weight") => permute_rows(t, HEADS),
                (false, n) if n.ends_with("k_proj.weight") => permute_rows(t, KV_HEADS),
                _ => t.clone(),
            };
            (
                gguf_name(name),
                QTensor::quantize(&t, GgmlDType::F32).unwrap(),
            )
        })
        .collect();
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &metadata, &tensors).unwrap();
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("heddle-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn both_formats_agree(qwen2: bool) {
    let dir = scratch_dir(if qwen2 { "qwen2" } else { "llama" });
    let weights = weights(qwen2);
    write_hf(&dir.join("hf"), &weights, qwen2);
    write_gguf(&dir.join("model.gguf"), &weights, qwen2);

    let (hf, gguf_header) = Llama::load(&dir.join("hf")).unwrap();
    assert!(gguf_header.is_none());
    let (gguf, gguf_header) = Llama::load(&dir.join("model.gguf")).unwrap();
    assert!(gguf_header.is_some());
    assert_eq!(hf.config(), gguf.config());
    assert_eq!(hf.config().tie_word_embeddings, !qwen2);
    assert_eq!(hf.config().attention_bias, qwen2);

    let tokens: Vec<u32> = (0..40).map(|i| (i * 37 + 5) % VOCAB as u32).collect();
    let a = hf.forward_all_logits(&tokens, KvDtype::F32).unwrap();
    let b = gguf.forward_all_logits(&tokens, KvDtype::F32).unwrap();
    let mut worst = 0f32;
    for (a, b) in a.iter().flatten().zip(b.iter().flatten()) {
        worst = worst.max((a - b).abs() / (1.0 + b.abs()));
    }
    // Same f32 weights and arithmetic; only the order of the per-head dimensions in
    // the attention dot products differs (permuted pairs), so the logits differ by f32
    // rounding alone.
    assert!(worst < 1e-4, "logits differ by {worst}");
    // And the model is not degenerate: positions give different distributions.
    assert_ne!(a[0], a[39]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn llama_from_safetensors_equals_llama_from_gguf() {
    both_formats_agree(false);
}

#[test]
fn qwen2_from_safetensors_equals_qwen2_from_gguf() {
    both_formats_agree(true);
}

#[test]
fn missing_tensors_and_bad_files_are_named() {
    let dir = scratch_dir("broken");
    let mut weights = weights(false);
    weights.retain(|(n, _)| n != "model.layers.1.mlp.up_proj.weight");
    write_hf(&dir, &weights, false);
    let err = Llama::load(&dir).err().unwrap().to_string();
    assert!(err.contains("model.layers.1.mlp.up_proj.weight"), "{err}");

    std::fs::write(
        dir.join("config.json"),
        hf_config(false).replace("llama", "gpt2"),
    )
    .unwrap();
    let err = Llama::load(&dir).err().unwrap().to_string();
    assert!(err.contains("gpt2"), "{err}");

    let junk = dir.join("junk.gguf");
    std::fs::write(&junk, b"not a gguf file").unwrap();
    let err = Llama::load(&junk).err().unwrap().to_string();
    assert!(err.contains("junk.gguf"), "{err}");

    let err = Llama::load(&dir.join("absent.gguf"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("absent.gguf"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `w` [n, k] as FP8 E4M3 codes and the scales that widen them back, in one of the three
/// layouts checkpoints use: one scale (`layout` 0), one per output row (1), or one per
/// block of 32 × 32 (2). Each scale maps its group's largest magnitude to 448.
fn fp8_encode(w: &Tensor, layout: usize) -> (Tensor, Tensor) {
    let (n, k) = w.dims2().unwrap();
    let values = w.to_vec2::<f32>().unwrap();
    let (rows, cols, bn, bk) = match layout {
        0 => (1, 1, n, k),
        1 => (n, 1, 1, k),
        _ => (n.div_ceil(32), k.div_ceil(32), 32, 32),
    };
    let mut scales = vec![0f32; rows * cols];
    for (r, row) in values.iter().enumerate() {
        for (c, v) in row.iter().enumerate() {
            let s = &mut scales[(r / bn) * cols + c / bk];
            *s = s.max(v.abs() / 448.0);
        }
    }
    let scaled: Vec<f32> = values
        .iter()
        .enumerate()
        .flat_map(|(r, row)| {
            let scales = &scales;
            row.iter()
                .enumerate()
                .map(move |(c, v)| v / scales[(r / bn) * cols + c / bk])
        })
        .collect();
    let codes = Tensor::from_vec(scaled, (n, k), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F8E4M3)
        .unwrap();
    let scale_shape: Vec<usize> = match layout {
        0 => vec![],
        1 => vec![n, 1],
        _ => vec![rows, cols],
    };
    let scales = Tensor::from_vec(scales, scale_shape, &Device::Cpu).unwrap();
    (codes, scales)
}

#[test]
fn an_fp8_checkpoint_gives_the_logits_of_its_widened_weights() {
    let dir = scratch_dir("fp8");
    let weights = weights(false);
    let mut fp8_file = HashMap::new();
    let mut widened = Vec::new();
    let mut layout = 0;
    for (name, w) in &weights {
        if name.contains("_proj.weight") {
            let (codes, scales) = fp8_encode(w, layout % 3);
            // Every other weight's scales in bf16, as some checkpoints store them.
            let scales = if layout % 2 == 0 {
                scales
            } else {
                scales
                    .to_dtype(DType::BF16)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
            };
            // The values the checkpoint means: codes times scales.
            let (n, k) = w.dims2().unwrap();
            let mut values = codes
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let flat = scales.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            heddle_model::loader::fp8_scales::apply_scales(
                name,
                &mut values,
                n,
                k,
                &flat,
                scales.dims(),
            )
            .unwrap();
            widened.push((
                name.clone(),
                Tensor::from_vec(values, (n, k), &Device::Cpu).unwrap(),
            ));
            fp8_file.insert(format!("{name}_scale"), scales);
            fp8_file.insert(name.clone(), codes);
            layout += 1;
        } else {
            widened.push((name.clone(), w.clone()));
            fp8_file.insert(name.clone(), w.clone());
        }
    }
    let fp8_dir = dir.join("fp8");
    std::fs::create_dir_all(&fp8_dir).unwrap();
    let config = hf_config(false).replacen(
        '{',
        r#"{"quantization_config": {"quant_method": "fp8", "fmt": "e4m3"}, "#,
        1,
    );
    std::fs::write(fp8_dir.join("config.json"), config).unwrap();
    candle_core::safetensors::save(&fp8_file, fp8_dir.join("model.safetensors")).unwrap();
    // The widened values in f32 (write_hf's bf16 shard would round them).
    let widened_dir = dir.join("widened");
    std::fs::create_dir_all(&widened_dir).unwrap();
    std::fs::write(widened_dir.join("config.json"), hf_config(false)).unwrap();
    let widened: HashMap<String, Tensor> = widened.into_iter().collect();
    candle_core::safetensors::save(&widened, widened_dir.join("model.safetensors")).unwrap();

    let (fp8, _) = Llama::load(&fp8_dir).unwrap();
    let (reference, _) = Llama::load(&widened_dir).unwrap();
    assert!(fp8.config().fp8_checkpoint);
    assert!(!reference.config().fp8_checkpoint);
    let tokens: Vec<u32> = (0..24).map(|i| (i * 29 + 3) % VOCAB as u32).collect();
    let a = fp8.forward_all_logits(&tokens, KvDtype::F32).unwrap();
    let b = reference.forward_all_logits(&tokens, KvDtype::F32).unwrap();
    // The same f32 values through the same arithmetic.
    assert!(
        a == b,
        "the FP8 checkpoint's logits differ from its widened weights'"
    );
    // And the codes are a coarse copy of the original weights, not a corruption of them.
    let (original, _) = {
        write_hf(&dir.join("original"), &weights, false);
        Llama::load(&dir.join("original")).unwrap()
    };
    let c = original.forward_all_logits(&tokens, KvDtype::F32).unwrap();
    let (mut diff, mut norm) = (0f64, 0f64);
    for (a, c) in a.iter().flatten().zip(c.iter().flatten()) {
        diff += ((a - c) as f64).powi(2);
        norm += (*c as f64).powi(2);
    }
    let relative = (diff / norm).sqrt();
    assert!(
        relative > 1e-4 && relative < 0.2,
        "FP8 logits off by {relative}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
