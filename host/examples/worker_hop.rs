//! What the process hop costs: the same small request (the hostile guest's `work:1000`) run
//! in-process and through a locked-down worker, many times each. Prints a Markdown table.
//!
//! cargo run --release -p wasm-infer --example worker_hop -- target/release/wasm-infer \
//!     target/wasm32-wasip2/release/hostile.wasm

use std::path::PathBuf;
use std::time::{Duration, Instant};

use wasm_infer::worker::{WorkerPool, WorkerPoolConfig};
use wasm_infer::{Input, Limits, Model, Runtime, RuntimeConfig};

const RUNS: u32 = 2_000;

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let binary = PathBuf::from(args.next().ok_or("usage: worker_hop BINARY MODEL")?);
    let model_path = PathBuf::from(args.next().ok_or("usage: worker_hop BINARY MODEL")?);
    let cache = std::env::temp_dir().join("wasm-infer-worker-hop");
    let runtime = Runtime::with_config(RuntimeConfig {
        cache_dir: Some(cache.clone()),
        ..RuntimeConfig::default()
    })?;
    let model = Model::load(&runtime, &model_path)?;
    let input = || Input::Text("work:1000".into());
    let limits = Limits::default();
    let mut local = Vec::new();
    for _ in 0..RUNS {
        let started = Instant::now();
        model.run(input(), &limits)?;
        local.push(started.elapsed());
    }
    let mut config = WorkerPoolConfig::new(1, binary, vec![model_path]);
    config.cache_dir = Some(cache);
    let pool = WorkerPool::start(config)?;
    let mut hop = Vec::new();
    for _ in 0..RUNS {
        let started = Instant::now();
        pool.run_blocking(0, input(), &limits)?;
        hop.push(started.elapsed());
    }
    let (local, hop) = (median(local), median(hop));
    println!("| request (`work:1000`, median of {RUNS}) | time |");
    println!("|---|---|");
    println!(
        "| in-process (`Model::run`) | {:.3} ms |",
        local.as_secs_f64() * 1e3
    );
    println!(
        "| through a locked-down worker (`WorkerPool::run_blocking`) | {:.3} ms |",
        hop.as_secs_f64() * 1e3
    );
    println!(
        "| added by the process hop | {:.3} ms |",
        (hop.saturating_sub(local)).as_secs_f64() * 1e3
    );
    Ok(())
}
