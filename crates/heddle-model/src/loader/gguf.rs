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
use crate::weights::Linear;

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
