//! `wasm-infer inspect`: what a model says about itself and how it was loaded, without a run.

use std::path::PathBuf;

use clap::Args;

use crate::exit;
use crate::load::LoadArgs;

/// The world every model implements.
const WORLD: &str = "wasm-infer:model/model@0.1.0";
/// The world a text generator implements (the model world plus `generate`).
const GENERATOR_WORLD: &str = "wasm-infer:model/generator@0.1.0";

#[derive(Args)]
pub struct Opts {
    /// The model component (.wasm).
    model: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    load: LoadArgs,
}

pub fn run(opts: &Opts) -> u8 {
    let model = match opts.load.model(&opts.model, opts.json) {
        Ok(model) => model,
        Err(status) => return status,
    };
    let (kind, name) = model.runtime().device();
    let generator = model.generator_info();
    let (world, model_kind) = match generator {
        Some(_) => (GENERATOR_WORLD, "text-generation"),
        None => (WORLD, "model"),
    };
    if opts.json {
        let value = serde_json::json!({
            "world": world,
            "kind": model_kind,
            "generator": generator,
            "info": model.info(),
            "component": model.load_report(),
            "accel": { "kind": kind, "name": name },
        });
        println!("{value}");
    } else {
        println!("world:       {world}");
        println!("kind:        {model_kind}");
        println!("{}", model.info());
        if let Some(generator) = generator {
            println!("context:     {} tokens", generator.context_length);
            println!("chat template: {}", generator.chat_template);
        }
        println!("{}", model.load_report());
        println!("accel:       {kind} ({name})");
    }
    exit::OK
}
