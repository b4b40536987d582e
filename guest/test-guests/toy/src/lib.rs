//! The smallest model on the guest SDK: three features of each text (bytes, words, upper-case
//! letters) through one linear layer whose weights are embedded safetensors (see build.rs).
use wasm_infer_guest::candle_core::{Device, Tensor};
use wasm_infer_guest::{export_model, weights, Accel, Ids, Input, Linear, Linears, Model};
use wasm_infer_guest::{ModelError, ModelInfo, Output};

static WEIGHTS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/toy.safetensors"));

pub struct Toy {
    proj: Linear,
}

impl Model for Toy {
    fn load() -> Result<Self, ModelError> {
        let vb = weights::safetensors(WEIGHTS)?;
        let proj = Linear::load(vb.pp("proj"), 3, 4, &mut Ids::default())?;
        Ok(Self { proj })
    }

    fn info() -> ModelInfo {
        ModelInfo::embeddings("toy", "bytes, words, capitals and a mix of them", 4)
    }

    fn infer(&self, input: Input, accel: &mut Accel) -> Result<Output, ModelError> {
        let texts = input.texts("toy")?;
        let features = |t: &String| {
            let capitals = t.chars().filter(|c| c.is_uppercase()).count();
            [t.len(), t.split_whitespace().count(), capitals].map(|n| n as f32)
        };
        let x: Vec<f32> = texts.iter().flat_map(features).collect();
        let x = Tensor::from_vec(x, (texts.len(), 3), &Device::Cpu)?;
        let y = accel.forward(|d| d.linear(&self.proj, &x), |s| s.linear(&self.proj, &x))?;
        Ok(Output::embeddings(&y)?)
    }
}

export_model!(Toy);
