//! Inputs, outputs, infos and errors of the `model` world, to and from candle tensors.
//!
//! The WIT types are the crate's own (generated in [`crate::bindings`]), so the conversions are
//! methods on them: `input.texts(name)?`, `Output::embeddings(&tensor)?`,
//! `ModelError::invalid_input(..)`, `ModelInfo::embeddings(..)`.

use candle_core::{Device, Tensor};

use crate::{DataKind, ErrorCode, Input, ModelError, ModelInfo, Output, WitTensor};

impl Input {
    /// The texts of a `text` (one) or `texts` (a batch) input, in order; any other kind is
    /// `unsupported-input`, naming `model`.
    pub fn texts(self, model: &str) -> Result<Vec<String>, ModelError> {
        match self {
            Input::Text(text) => Ok(vec![text]),
            Input::Texts(texts) => Ok(texts),
            Input::Bytes(_) | Input::Tensor(_) => Err(ModelError::unsupported_input(format!(
                "{model} takes text or a batch of texts"
            ))),
        }
    }

    /// A `tensor` input as an f32 candle tensor on the CPU; any other kind is
    /// `unsupported-input`, a shape that does not match the data `invalid-input`.
    pub fn tensor(self, model: &str) -> Result<Tensor, ModelError> {
        match self {
            Input::Tensor(t) => t.to_candle(),
            _ => Err(ModelError::unsupported_input(format!(
                "{model} takes a tensor"
            ))),
        }
    }
}

impl WitTensor {
    /// This tensor as a candle tensor (`invalid-input` when `data` is not `shape`'s size).
    pub fn to_candle(self) -> Result<Tensor, ModelError> {
        let dims: Vec<usize> = self.shape.iter().map(|&d| d as usize).collect();
        let elements = dims
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| ModelError::invalid_input("tensor shape overflows".to_string()))?;
        if elements != self.data.len() {
            return Err(ModelError::invalid_input(format!(
                "tensor shape {:?} holds {elements} values, data has {}",
                self.shape,
                self.data.len()
            )));
        }
        Ok(Tensor::from_vec(self.data, dims, &Device::Cpu)?)
    }

    /// A candle tensor's values (as f32, row-major) and shape.
    pub fn from_candle(t: &Tensor) -> candle_core::Result<Self> {
        Ok(Self {
            shape: t.dims().iter().map(|&d| d as u32).collect(),
            data: t
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()?,
        })
    }
}

impl Output {
    /// One embedding per row of `t`: [texts, dimension], or one [dimension] vector.
    pub fn embeddings(t: &Tensor) -> candle_core::Result<Self> {
        let t = t.to_dtype(candle_core::DType::F32)?;
        Ok(Output::Embeddings(match t.rank() {
            1 => vec![t.to_vec1()?],
            _ => t.to_vec2()?,
        }))
    }

    /// A tensor output.
    pub fn tensor(t: &Tensor) -> candle_core::Result<Self> {
        Ok(Output::Tensor(WitTensor::from_candle(t)?))
    }
}

impl ModelInfo {
    /// The info of a model that maps `text` and `texts` to `dimension`-long embeddings; set
    /// `version` and `max_input_tokens` on the result where they apply.
    pub fn embeddings(name: &str, description: &str, dimension: u32) -> Self {
        Self {
            name: name.to_string(),
            version: String::new(),
            description: description.to_string(),
            inputs: vec![DataKind::Text, DataKind::Texts],
            output: DataKind::Embeddings,
            output_dimension: dimension,
            max_input_tokens: 0,
        }
    }
}

impl ModelError {
    /// The input kind is not one this model takes.
    pub fn unsupported_input(message: String) -> Self {
        Self {
            code: ErrorCode::UnsupportedInput,
            message,
        }
    }

    /// The input is of the right kind but unusable.
    pub fn invalid_input(message: String) -> Self {
        Self {
            code: ErrorCode::InvalidInput,
            message,
        }
    }

    /// The model's own state or computation is broken.
    pub fn internal(message: String) -> Self {
        Self {
            code: ErrorCode::Internal,
            message,
        }
    }
}

/// A failed candle operation is the model's own failure.
impl From<candle_core::Error> for ModelError {
    fn from(e: candle_core::Error) -> Self {
        Self::internal(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_takes_text_and_batches_and_refuses_the_rest() {
        assert_eq!(Input::Text("a".into()).texts("m").unwrap(), ["a"]);
        let batch = Input::Texts(vec!["a".into(), "b".into()]);
        assert_eq!(batch.texts("m").unwrap(), ["a", "b"]);
        let refused = Input::Bytes(vec![1]).texts("m").unwrap_err();
        assert_eq!(refused.code, ErrorCode::UnsupportedInput);
        assert_eq!(refused.message, "m takes text or a batch of texts");
    }

    #[test]
    fn tensors_round_trip_and_a_wrong_size_is_invalid_input() {
        let t = WitTensor {
            shape: vec![2, 3],
            data: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        };
        let candle = Input::Tensor(t).tensor("m").unwrap();
        assert_eq!(candle.to_vec2::<f32>().unwrap()[1], [4.0, 5.0, 6.0]);
        let back = WitTensor::from_candle(&candle).unwrap();
        assert_eq!((back.shape, back.data.len()), (vec![2, 3], 6));
        let bad = WitTensor {
            shape: vec![4],
            data: vec![1.0],
        };
        assert_eq!(bad.to_candle().unwrap_err().code, ErrorCode::InvalidInput);
    }

    #[test]
    fn embeddings_are_one_vector_per_row() {
        let t = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        match Output::embeddings(&t).unwrap() {
            Output::Embeddings(v) => assert_eq!(v, [[1.0, 2.0], [3.0, 4.0]]),
            _ => panic!("not embeddings"),
        }
        let row = Tensor::new(&[5f32, 6.0], &Device::Cpu).unwrap();
        match Output::embeddings(&row).unwrap() {
            Output::Embeddings(v) => assert_eq!(v, [[5.0, 6.0]]),
            _ => panic!("not embeddings"),
        }
    }
}
