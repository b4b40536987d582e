//! Weights embedded in the component with `include_bytes!`.
//!
//! A component carries its weights in its data segment: it then needs no filesystem (no
//! authority to grant, no path convention) and pre-initialisation can build the model without
//! calling an import. The readers here work on the embedded `&'static [u8]` in place: nothing
//! is copied up front, and each tensor is copied once, into candle's storage, only when the
//! model asks for it (candle's CPU tensors own their storage, so that one copy is the least
//! candle allows; a weight the model never reads is never materialised).
//!
//! ```ignore
//! static WEIGHTS: &[u8] = include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/model.safetensors"));
//! let vb = wasm_infer_guest::weights::safetensors(WEIGHTS)?;
//! let layer = candle_nn::linear(384, 10, vb.pp("classifier"))?;
//! ```

use std::io::Cursor;

use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

/// A [`VarBuilder`] over a safetensors file's bytes, f32 on the CPU. Names are looked up in
/// the file's header; a tensor's values are converted from the file's dtype when fetched.
pub fn safetensors(bytes: &'static [u8]) -> candle_core::Result<VarBuilder<'static>> {
    VarBuilder::from_slice_safetensors(bytes, DType::F32, &Device::Cpu)
}

/// A GGUF file's metadata and tensor index, read from its bytes; [`Gguf::tensor`] reads one
/// (still quantized) tensor.
pub struct Gguf {
    /// The header: metadata (architecture, tokenizer, hyper-parameters) and tensor infos.
    pub content: gguf_file::Content,
    bytes: &'static [u8],
}

impl Gguf {
    /// Parses the header of the GGUF file `bytes`.
    pub fn read(bytes: &'static [u8]) -> candle_core::Result<Self> {
        let content = gguf_file::Content::read(&mut Cursor::new(bytes))?;
        Ok(Self { content, bytes })
    }

    /// The tensor `name`, in its stored quantization, on the CPU.
    pub fn tensor(&self, name: &str) -> candle_core::Result<QTensor> {
        self.content
            .tensor(&mut Cursor::new(self.bytes), name, &Device::Cpu)
    }

    /// The whole file as a reader, for candle-transformers' `from_gguf` constructors.
    pub fn reader(&self) -> Cursor<&'static [u8]> {
        Cursor::new(self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file written by hand (8-byte header length, JSON header, raw data), so
    /// the reader is checked against the format, not against itself.
    fn file() -> &'static [u8] {
        let header = br#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"F16","shape":[2],"data_offsets":[16,20]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        for v in [1f32, 2.0, 3.0, 4.0] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        // 0.5 and -2.0 in IEEE half precision.
        bytes.extend_from_slice(&[0x00, 0x38, 0x00, 0xc0]);
        Box::leak(bytes.into_boxed_slice())
    }

    #[test]
    fn safetensors_reads_named_tensors_as_f32() {
        let vb = safetensors(file()).unwrap();
        let w = vb.get((2, 2), "w").unwrap();
        assert_eq!(w.to_vec2::<f32>().unwrap(), [[1.0, 2.0], [3.0, 4.0]]);
        let b = vb.get(2, "b").unwrap();
        assert_eq!(b.dtype(), DType::F32);
        assert_eq!(b.to_vec1::<f32>().unwrap(), [0.5, -2.0]);
        assert!(vb.get(3, "b").is_err(), "a wrong shape is an error");
        assert!(vb.get(2, "missing").is_err());
    }
}
