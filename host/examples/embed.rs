//! Embed the library: load a model once, run inputs under limits, handle each kind of failure.
//!
//! `cargo run --release --example embed -- target/wasm32-wasip2/release/minilm.wasm "some text"`

use std::time::Duration;

use wasm_infer::{Error, Input, LimitExceeded, Limits, Model, Runtime};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: embed MODEL.wasm TEXT")?;
    let text = args.next().unwrap_or_else(|| "hello, sandbox".into());

    let runtime = Runtime::new()?; // one per process: engine, epoch ticker, compiled-code cache
    let model = Model::load(&runtime, &path)?; // compiled once (or loaded from the cache)
    let limits = Limits::default()
        .fuel(5_000_000_000)
        .memory(512 << 20)
        .wall_time(Duration::from_secs(5));

    match model.run(Input::Text(text), &limits) {
        Ok(outcome) => {
            let vector = &outcome
                .output
                .embeddings()
                .ok_or("not an embedding model")?[0];
            println!("{} dims, first {:?}", vector.len(), &vector[..4]);
            println!("usage: {}", outcome.usage);
        }
        Err(failure) => {
            match &failure.error {
                Error::Limit(LimitExceeded::Fuel { limit, .. }) => {
                    eprintln!("needs more than {limit} fuel")
                }
                Error::Limit(LimitExceeded::Memory { requested, .. }) => {
                    eprintln!("wanted {requested} bytes")
                }
                Error::Limit(other) => eprintln!("limit: {other}"),
                Error::Trap { message, .. } => eprintln!("guest crashed: {message}"),
                Error::Model { code, message } => {
                    eprintln!("model refused input ({code}): {message}")
                }
                other => eprintln!("{other}"),
            }
            eprintln!("usage before it stopped: {}", failure.usage);
            std::process::exit(1);
        }
    }
    Ok(())
}
