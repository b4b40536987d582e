//! `just load`: a bounded loopback load test of `wasm-infer serve`. Starts the server (the
//! release binary) on a free loopback port, once on the accelerator path and once in the
//! sandbox, sends `REQUESTS` embeddings of one short sentence at 1, 2, 8 and 32 concurrent
//! clients, and compares the throughput with a native candle loop on the same cores. Markdown
//! table on stdout.
//!
//! Then the process hop: the same server with `isolation = "process"` (the default) and
//! `"in_process"`: the median of `HOP_REQUESTS` tiny requests (the hostile guest's `echo`) from
//! one client, and MiniLM's throughput at 1, 2 and 8 clients.
//!
//! Then fairness: a victim tenant's p99 alone, and again while a flooder tenant sends
//! spin-to-its-fuel-cap requests to the hostile test guest from 16 connections (its fuel quota
//! answers most of them with 429).
//!
//! `cargo run --release --example load -- target/release/wasm-infer minilm.wasm hostile.wasm`

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Requests per concurrency level (bounded: the whole run stays within minutes).
const REQUESTS: usize = 64;
const CLIENTS: [usize; 4] = [1, 2, 8, 32];
/// Tiny requests per isolation for the hop's median.
const HOP_REQUESTS: usize = 1000;
const TEXT: &str = "WebAssembly sandboxes keep untrusted models in check.";

struct Server(Child, String);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(binary: &Path, model: &Path, accel: &str) -> Server {
    start_with(binary, &[model], accel, None)
}

fn start_with(binary: &Path, models: &[&Path], accel: &str, config: Option<&Path>) -> Server {
    let mut command = Command::new(binary);
    command.args(["serve", "--listen", "127.0.0.1:0", "--accel", accel]);
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    let mut child = command
        .args(models)
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
    drive_as(base, clients, None)
}

fn drive_as(base: &str, clients: usize, key: Option<&str>) -> (f64, Duration, Duration) {
    let key = key.map(|k| format!("Bearer {k}"));
    let body = serde_json::json!({"model": "all-MiniLM-L6-v2", "input": TEXT}).to_string();
    let url = format!("{base}/v1/embeddings");
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (url, body, next, key) = (url.clone(), body.clone(), next.clone(), key.clone());
            std::thread::spawn(move || {
                let agent = ureq::agent();
                let mut latencies = Vec::new();
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < REQUESTS {
                    let t = Instant::now();
                    let mut request = agent.post(&url);
                    if let Some(key) = &key {
                        request = request.set("Authorization", key);
                    }
                    let reply = request.send_string(&body).expect("a 200");
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
    let (binary, model, hostile) = (
        Path::new(&args[1]),
        Path::new(&args[2]),
        Path::new(&args[3]),
    );
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
    hop(binary, model, hostile);
    fairness(binary, model, hostile);
}

/// The median latency of `HOP_REQUESTS` `echo` requests to the hostile guest from one client.
fn echo_p50(base: &str) -> Duration {
    let agent = ureq::agent();
    let url = format!("{base}/v1/infer");
    let body = r#"{"model":"hostile","input":{"text":"echo:x"}}"#;
    let mut latencies: Vec<Duration> = (0..HOP_REQUESTS)
        .map(|_| {
            let t = Instant::now();
            let reply = agent.post(&url).send_string(body).expect("a 200");
            let _ = reply.into_string();
            t.elapsed()
        })
        .collect();
    latencies.sort();
    latencies[latencies.len() / 2]
}

/// Workers vs in-process: the hop's cost per request and the throughput.
fn hop(binary: &Path, model: &Path, hostile: &Path) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut rows = Vec::new();
    for isolation in ["in_process", "process"] {
        let config =
            std::env::temp_dir().join(format!("wasm-infer-hop-{}.toml", std::process::id()));
        std::fs::write(&config, format!("isolation = \"{isolation}\"\n")).unwrap();
        let server = start_with(binary, &[model, hostile], "cpu", Some(&config));
        let _ = std::fs::remove_file(&config);
        echo_p50(&server.1); // warm up
        let echo = echo_p50(&server.1);
        drive(&server.1, 1); // warm up
        let rps: Vec<f64> = [1, 2, 8].map(|c| drive(&server.1, c).0).to_vec();
        rows.push((isolation, echo, rps));
    }
    println!();
    println!(
        "| isolation | `echo` p50, 1 client | MiniLM req/s, 1 client | 2 clients | 8 clients |"
    );
    println!("|---|---|---|---|---|");
    for (isolation, echo, rps) in &rows {
        println!(
            "| {isolation} | {:.3} ms | {:.1} | {:.1} | {:.1} |",
            ms(*echo),
            rps[0],
            rps[1],
            rps[2]
        );
    }
    println!(
        "| process hop | +{:.3} ms a request | | | |",
        ms(rows[1].1) - ms(rows[0].1)
    );
}

/// The victim's p50/p99 alone and under a spin flood from another tenant.
fn fairness(binary: &Path, model: &Path, hostile: &Path) {
    let hash = |key: &str| wasm_infer::serve::hash_key(key);
    let config = std::env::temp_dir().join(format!("wasm-infer-load-{}.toml", std::process::id()));
    std::fs::write(
        &config,
        format!(
            "[[tenants]]\nname = \"victim\"\nkey_sha256 = \"{}\"\n\
             [[tenants]]\nname = \"flooder\"\nkey_sha256 = \"{}\"\n\
             [tenants.limits]\nfuel = \"50M\"\n\
             [tenants.rates]\nfuel_per_second = \"100M\"\nfuel_burst = \"200M\"\n",
            hash("victim-key"),
            hash("flooder-key")
        ),
    )
    .unwrap();
    let server = start_with(binary, &[model, hostile], "cpu", Some(&config));
    drive_as(&server.1, 1, Some("victim-key"));
    let (_, alone_p50, alone_p99) = drive_as(&server.1, 1, Some("victim-key"));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let counts = Arc::new([(); 2].map(|_| std::sync::atomic::AtomicU64::new(0)));
    let flooders: Vec<_> = (0..16)
        .map(|_| {
            let (url, stop, counts) = (
                format!("{}/v1/infer", server.1),
                stop.clone(),
                counts.clone(),
            );
            std::thread::spawn(move || {
                let agent = ureq::agent();
                let body = r#"{"model":"hostile","input":{"text":"spin"}}"#;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let status = match agent
                        .post(&url)
                        .set("Authorization", "Bearer flooder-key")
                        .send_string(body)
                    {
                        Ok(r) => r.status(),
                        Err(ureq::Error::Status(code, _)) => code,
                        Err(_) => 0,
                    };
                    let slot = usize::from(status == 429);
                    counts[slot].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let (_, flood_p50, flood_p99) = drive_as(&server.1, 1, Some("victim-key"));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for f in flooders {
        f.join().unwrap();
    }
    let _ = std::fs::remove_file(&config);
    println!();
    println!("| victim (accelerator path) | p50 | p99 | flooder requests answered | of them 429 |");
    println!("|---|---|---|---|---|");
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "| alone | {:.1} ms | {:.1} ms | | |",
        ms(alone_p50),
        ms(alone_p99)
    );
    let (other, limited) = (
        counts[0].load(std::sync::atomic::Ordering::Relaxed),
        counts[1].load(std::sync::atomic::Ordering::Relaxed),
    );
    println!(
        "| under a 16-connection spin flood | {:.1} ms | {:.1} ms ({:.2}x) | {} | {} |",
        ms(flood_p50),
        ms(flood_p99),
        flood_p99.as_secs_f64() / alone_p99.as_secs_f64(),
        other + limited,
        limited
    );
}
