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

pub(super) fn open(path: &Path) -> Result<OpenedModel> {
    let content = read_gguf(path)?;
    let config = ModelConfig::from_gguf(&content)?;
    let rope_layout = match config.architecture {
        Architecture::Llama => RopeLayout::Interleaved,
        Architecture::Qwen2 => RopeLayout::Halves,
    };
    // The source needs only the tensor directory; the header goes back to the caller.
    let tensors = GgufTensors {
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
    };
    Ok(OpenedModel {
        config,
        rope_layout,
        tensors: Box::new(tensors),
        gguf: Some(content),
    })
}

struct GgufTensors {
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
