//! The library's own input, output and model-info types, and their mapping to the WIT ABI.

use serde::{Deserialize, Serialize};

use crate::bindings::wasm_infer::model::types as wit;
use crate::error::{Error, LimitExceeded, ModelErrorCode};

/// What each item of a list of lists costs, on top of its own bytes, in the input size (each
/// text of a batch) and the output size (each vector of an embeddings output): 8, the size of
/// the `(pointer, length)` pair the canonical ABI lays down for it in guest memory. A batch of
/// a million empty strings is therefore 8 MB of input, and ten million empty vectors 80 MB of
/// output, not 0.
pub const BATCH_ITEM_OVERHEAD_BYTES: u64 = 8;

/// What a model is asked to process (mirrors the WIT `input` variant).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Input {
    /// One text.
    Text(String),
    /// A batch of texts.
    Texts(Vec<String>),
    /// Raw bytes.
    Bytes(Vec<u8>),
    /// A dense row-major tensor.
    Tensor {
        /// Dimensions.
        shape: Vec<u32>,
        /// Values.
        data: Vec<f32>,
    },
}

impl Input {
    /// The size the input limit is checked against: the UTF-8 bytes of the texts (plus
    /// [`BATCH_ITEM_OVERHEAD_BYTES`] per item of a batch), the raw bytes, or 4 bytes per tensor
    /// value and dimension.
    pub fn payload_bytes(&self) -> u64 {
        match self {
            Self::Text(text) => text.len() as u64,
            Self::Texts(texts) => texts
                .iter()
                .map(|t| t.len() as u64 + BATCH_ITEM_OVERHEAD_BYTES)
                .sum(),
            Self::Bytes(bytes) => bytes.len() as u64,
            Self::Tensor { shape, data } => 4 * (shape.len() + data.len()) as u64,
        }
    }

    /// Decodes a text file's bytes (what the CLI reads from `@file` or stdin) as a batch: one
    /// text per line (`\n` or `\r\n`), no trailing empty text. Fails on bytes that are not
    /// UTF-8.
    pub fn from_lines(bytes: Vec<u8>) -> Result<Self, std::string::FromUtf8Error> {
        let text = String::from_utf8(bytes)?;
        Ok(Self::Texts(text.lines().map(str::to_string).collect()))
    }

    /// Reads a batch, one text per line, from `reader` (a file, stdin), never more than
    /// `max_input + 1` bytes of it, so a huge input is refused without being read. Too large:
    /// [`LimitExceeded::Input`] with the bytes read so far as a lower bound of the size; not
    /// readable or not UTF-8: [`Error::InputRead`].
    pub fn read_lines(reader: impl std::io::Read, max_input: u64) -> Result<Self, Error> {
        use std::io::Read;
        let mut bytes = Vec::new();
        reader
            .take(max_input.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|e| Error::InputRead(e.to_string()))?;
        if bytes.len() as u64 > max_input {
            return Err(LimitExceeded::Input {
                limit: max_input,
                size: bytes.len() as u64,
            }
            .into());
        }
        Self::from_lines(bytes).map_err(|e| Error::InputRead(format!("not UTF-8 text ({e})")))
    }

    pub(crate) fn into_wit(self) -> wit::Input {
        match self {
            Self::Text(text) => wit::Input::Text(text),
            Self::Texts(texts) => wit::Input::Texts(texts),
            Self::Bytes(bytes) => wit::Input::Bytes(bytes),
            Self::Tensor { shape, data } => wit::Input::Tensor(wit::Tensor { shape, data }),
        }
    }
}

/// What a model returned (mirrors the WIT `output` variant).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Output {
    /// One vector per input text.
    Embeddings(Vec<Vec<f32>>),
    /// Text.
    Text(String),
    /// Raw bytes.
    Bytes(Vec<u8>),
    /// A dense row-major tensor.
    Tensor {
        /// Dimensions.
        shape: Vec<u32>,
        /// Values.
        data: Vec<f32>,
    },
}

impl Output {
    /// The size the output limit is checked against: 4 bytes per float (plus
    /// [`BATCH_ITEM_OVERHEAD_BYTES`] per embedding vector), the text's or the raw bytes, 4 bytes
    /// per tensor value and dimension.
    pub fn payload_bytes(&self) -> u64 {
        match self {
            Self::Embeddings(vectors) => vectors
                .iter()
                .map(|v| 4 * v.len() as u64 + BATCH_ITEM_OVERHEAD_BYTES)
                .sum(),
            Self::Text(text) => text.len() as u64,
            Self::Bytes(bytes) => bytes.len() as u64,
            Self::Tensor { shape, data } => 4 * (shape.len() + data.len()) as u64,
        }
    }

    /// The embeddings, if this is an embeddings output.
    pub fn embeddings(&self) -> Option<&[Vec<f32>]> {
        match self {
            Self::Embeddings(vectors) => Some(vectors),
            _ => None,
        }
    }

    pub(crate) fn from_wit(output: wit::Output) -> Self {
        match output {
            wit::Output::Embeddings(vectors) => Self::Embeddings(vectors),
            wit::Output::Text(text) => Self::Text(text),
            wit::Output::Bytes(bytes) => Self::Bytes(bytes),
            wit::Output::Tensor(t) => Self::Tensor {
                shape: t.shape,
                data: t.data,
            },
        }
    }
}

/// Kinds of data a model takes or returns (mirrors the WIT `data-kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataKind {
    /// One text.
    Text,
    /// A batch of texts.
    Texts,
    /// Raw bytes.
    Bytes,
    /// A tensor.
    Tensor,
    /// Embedding vectors.
    Embeddings,
}

impl From<wit::DataKind> for DataKind {
    fn from(kind: wit::DataKind) -> Self {
        match kind {
            wit::DataKind::Text => Self::Text,
            wit::DataKind::Texts => Self::Texts,
            wit::DataKind::Bytes => Self::Bytes,
            wit::DataKind::Tensor => Self::Tensor,
            wit::DataKind::Embeddings => Self::Embeddings,
        }
    }
}

/// Static facts a model reports about itself (the WIT `model-info`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Short name.
    pub name: String,
    /// Version or revision.
    pub version: String,
    /// One-line description.
    pub description: String,
    /// Input kinds `infer` accepts.
    pub inputs: Vec<DataKind>,
    /// Output kind.
    pub output: DataKind,
    /// Length of each output vector (0 when not applicable).
    pub output_dimension: u32,
    /// Longest input looked at, in tokens (0 if unbounded).
    pub max_input_tokens: u32,
}

impl std::fmt::Display for ModelInfo {
    /// One line per field, labelled, as `wasm-infer inspect` prints them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "name:        {}", self.name)?;
        writeln!(f, "version:     {}", self.version)?;
        writeln!(f, "description: {}", self.description)?;
        writeln!(f, "inputs:      {:?}", self.inputs)?;
        writeln!(
            f,
            "output:      {:?} (dimension {})",
            self.output, self.output_dimension
        )?;
        write!(f, "max tokens:  {}", self.max_input_tokens)
    }
}

impl From<wit::ModelInfo> for ModelInfo {
    fn from(info: wit::ModelInfo) -> Self {
        Self {
            name: info.name,
            version: info.version,
            description: info.description,
            inputs: info.inputs.into_iter().map(DataKind::from).collect(),
            output: info.output.into(),
            output_dimension: info.output_dimension,
            max_input_tokens: info.max_input_tokens,
        }
    }
}

impl From<wit::ErrorCode> for ModelErrorCode {
    fn from(code: wit::ErrorCode) -> Self {
        match code {
            wit::ErrorCode::UnsupportedInput => Self::UnsupportedInput,
            wit::ErrorCode::InvalidInput => Self::InvalidInput,
            wit::ErrorCode::Internal => Self::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_decode_as_a_batch() {
        let input = Input::from_lines(b"one\r\ntwo\n\nfour".to_vec()).unwrap();
        assert_eq!(
            input,
            Input::Texts(vec!["one".into(), "two".into(), "".into(), "four".into()])
        );
        assert_eq!(input.payload_bytes(), 10 + 4 * BATCH_ITEM_OVERHEAD_BYTES);
        assert_eq!(Input::from_lines(Vec::new()).unwrap(), Input::Texts(vec![]));
        assert!(Input::from_lines(vec![b'a', 0xff]).is_err());
    }
}
