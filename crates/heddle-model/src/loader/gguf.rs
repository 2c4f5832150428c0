//! GGUF files through candle's reader; the blocks are handed to [`Linear`] as they are.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, TensorInfo};
use candle_core::quantized::QTensor;
use candle_core::Device;

use super::{OpenedModel, RopeLayout, TensorSource};
use crate::config::{Architecture, ModelConfig};
use crate::error::{ModelError, Result};
use crate::qmatmul::Linear;

/// Reads a GGUF header: metadata (tokenizer, chat template, hyper-parameters) and the
/// tensor directory, without the tensor data.
pub fn read_gguf(path: &Path) -> Result<Content> {
    let mut file = open_file(path)?;
    Content::read(&mut file).map_err(|e| {
        ModelError::Config(format!(
            "{} is not a readable GGUF file: {e}",
            path.display()
        ))
    })
}

fn open_file(path: &Path) -> Result<BufReader<File>> {
    File::open(path)
        .map(BufReader::new)
        .map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })
}

/// How a GGUF file of this architecture lays out the RoPE pairs of Q and K.
pub fn gguf_rope_layout(architecture: Architecture) -> RopeLayout {
    match architecture {
        Architecture::Llama => RopeLayout::Interleaved,
        Architecture::Qwen2 => RopeLayout::Halves,
    }
}

pub(super) fn open(path: &Path) -> Result<OpenedModel> {
    let content = read_gguf(path)?;
    let config = ModelConfig::from_gguf(&content)?;
    // The source needs only the tensor directory; the header goes back to the caller.
    let tensors = open_tensors(path, &content)?;
    Ok(OpenedModel {
        rope_layout: gguf_rope_layout(config.architecture),
        config,
        tensors: Box::new(tensors),
        gguf: Some(content),
    })
}

/// The tensors of the GGUF file at `path`, whose header is `content`, read one at a time.
pub fn open_tensors(path: &Path, content: &Content) -> Result<GgufTensors> {
    Ok(GgufTensors {
        file: open_file(path)?,
        infos: content
            .tensor_infos
            .iter()
            .map(|(name, t)| {
                let info = TensorInfo {
                    ggml_dtype: t.ggml_dtype,
                    shape: t.shape.clone(),
                    offset: t.offset,
                };
                (name.clone(), info)
            })
            .collect(),
        data_offset: content.tensor_data_offset,
    })
}

/// A GGUF file's tensors by name.
pub struct GgufTensors {
    file: BufReader<File>,
    infos: HashMap<String, TensorInfo>,
    data_offset: u64,
}

impl GgufTensors {
    fn read(&mut self, name: &str) -> Result<QTensor> {
        let info = self
            .infos
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        Ok(info.read(&mut self.file, self.data_offset, &Device::Cpu)?)
    }

    /// A tensor dequantized to f32 (any GGUF type candle reads: F32/F16/BF16, Q4_0,
    /// Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants), with its row-major shape.
    pub fn read_f32(&mut self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let t = self.read(name)?;
        let shape = t.shape().dims().to_vec();
        let values = t
            .dequantize(&Device::Cpu)?
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok((shape, values))
    }
}

impl TensorSource for GgufTensors {
    fn contains(&self, name: &str) -> bool {
        self.infos.contains_key(name)
    }

    fn matrix(&mut self, name: &str) -> Result<Linear> {
        Linear::from_qtensor(name, &self.read(name)?)
    }

    fn vector(&mut self, name: &str) -> Result<Vec<f32>> {
        let t = self.read(name)?;
        Ok(t.dequantize(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    use super::{open_tensors, read_gguf};

    /// Every quantization the GPU loader is promised to read, written to a GGUF file and
    /// read back dequantized: values within each format's rounding of the originals.
    #[test]
    fn quantized_tensors_read_back_as_f32_within_their_rounding() {
        let (rows, cols) = (4usize, 512usize);
        let original: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i / cols) as f32))
            .collect();
        let tensor = Tensor::from_vec(original.clone(), (rows, cols), &Device::Cpu).unwrap();
        let formats = [
            (GgmlDType::F16, 1e-3),
            (GgmlDType::Q8_0, 1e-2),
            (GgmlDType::Q6K, 2e-2),
            (GgmlDType::Q4_0, 0.12),
            (GgmlDType::Q4_1, 0.12),
            (GgmlDType::Q4K, 0.12),
        ];
        let quantized: Vec<(String, QTensor)> = formats
            .iter()
            .map(|(dtype, _)| {
                (
                    format!("{dtype:?}.weight"),
                    QTensor::quantize(&tensor, *dtype).unwrap(),
                )
            })
            .collect();
        let path = std::env::temp_dir().join(format!("heddle-quants-{}.gguf", std::process::id()));
        let mut file = std::fs::File::create(&path).unwrap();
        let arch = gguf_file::Value::String("llama".into());
        let named: Vec<(&str, &QTensor)> = quantized.iter().map(|(n, t)| (n.as_str(), t)).collect();
        gguf_file::write(&mut file, &[("general.architecture", &arch)], &named).unwrap();
        drop(file);

        let content = read_gguf(&path).unwrap();
        let mut tensors = open_tensors(&path, &content).unwrap();
        for ((name, _), (dtype, limit)) in quantized.iter().zip(formats) {
            let (shape, values) = tensors.read_f32(name).unwrap();
            assert_eq!(shape, vec![rows, cols], "{name}");
            let (mut diff, mut norm) = (0f64, 0f64);
            for (v, o) in values.iter().zip(&original) {
                diff += ((v - o) as f64).powi(2);
                norm += (*o as f64).powi(2);
            }
            let error = (diff / norm).sqrt();
            assert!(
                error < limit,
                "{dtype:?}: relative error {error} over {limit}"
            );
        }
        let _ = std::fs::remove_file(&path);
    }
}
