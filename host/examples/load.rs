//! `just load`: a bounded loopback load test of `wasm-infer serve`. Starts the server (the
//! release binary) on a free loopback port, once on the accelerator path and once in the
//! sandbox, sends `REQUESTS` embeddings of one short sentence at 1, 2, 8 and 32 concurrent
//! clients, and compares the throughput with a native candle loop on the same cores. Markdown
//! table on stdout.
//!
//! `cargo run --release --example load -- target/release/wasm-infer minilm.wasm`

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Requests per concurrency level (bounded: the whole run stays within minutes).
const REQUESTS: usize = 64;
const CLIENTS: [usize; 4] = [1, 2, 8, 32];
const TEXT: &str = "WebAssembly sandboxes keep untrusted models in check.";

struct Server(Child, String);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(binary: &Path, model: &Path, accel: &str) -> Server {
    let mut child = Command::new(binary)
        .args(["serve", "--listen", "127.0.0.1:0", "--accel", accel])
        .arg(model)
        .env("WASM_INFER_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the server");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(base) = line.strip_prefix("listening on ") {
                let _ = tx.send(base.to_string());
            }
        }
    });
    let base = rx
        .recv_timeout(Duration::from_secs(300))
        .expect("the server did not start");
    Server(child, base)
}

/// Throughput (requests/s), p50 and p99 latency of `REQUESTS` requests over `clients`.
fn drive(base: &str, clients: usize) -> (f64, Duration, Duration) {
    let body = serde_json::json!({"model": "all-MiniLM-L6-v2", "input": TEXT}).to_string();
    let url = format!("{base}/v1/embeddings");
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (url, body, next) = (url.clone(), body.clone(), next.clone());
            std::thread::spawn(move || {
                let agent = ureq::agent();
                let mut latencies = Vec::new();
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < REQUESTS {
                    let t = Instant::now();
                    let reply = agent.post(&url).send_string(&body).expect("a 200");
                    let _ = reply.into_string();
                    latencies.push(t.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies: Vec<Duration> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    let elapsed = start.elapsed();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    (REQUESTS as f64 / elapsed.as_secs_f64(), pct(0.5), pct(0.99))
}

fn model_dir() -> PathBuf {
    std::env::var_os("WASM_INFER_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/wasm-infer/model")
        })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (binary, model) = (Path::new(&args[1]), Path::new(&args[2]));
    let native = minilm::Embedder::load_dir(&model_dir()).expect("loading the native model");
    native.embed(TEXT).unwrap();
    let t = Instant::now();
    for _ in 0..REQUESTS {
        native.embed(TEXT).unwrap();
    }
    let native_rps = REQUESTS as f64 / t.elapsed().as_secs_f64();
    println!("| path | clients | requests/s | p50 | p99 | vs native loop |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| native candle loop (all cores) | 1 | {native_rps:.1} | {:.1} ms | | 1.00x |",
        1e3 / native_rps
    );
    for (label, accel) in [("accelerator (cpu)", "cpu"), ("in-sandbox", "off")] {
        let server = start(binary, model, accel);
        drive(&server.1, 1); // warm up
        for clients in CLIENTS {
            let (rps, p50, p99) = drive(&server.1, clients);
            println!(
                "| serve, {label} | {clients} | {rps:.1} | {:.1} ms | {:.1} ms | {:.2}x |",
                p50.as_secs_f64() * 1e3,
                p99.as_secs_f64() * 1e3,
                rps / native_rps
            );
        }
    }
}
