//! `wasm-infer serve` with `isolation = "process"`: every run in a locked-down worker process.
//! The answers and fuel equal the in-process ones, the engine settings reach the workers, and
//! a storm of killed workers costs only the requests they were running (503 `worker_lost`,
//! their fuel reservation refunded) while the server stays up.

mod support;

use std::path::PathBuf;
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{
    assert_golden, cache_dir, case, cosine, hostile_wasm, minilm_wasm, reference, Reply,
};
use wasm_infer::{Input, Limits, Model, Output, Runtime, RuntimeConfig};

const START_TIMEOUT: Duration = Duration::from_secs(300);
const KEY: &str = "sk-test-workers";

/// A running `wasm-infer serve`, killed on drop.
struct Server {
    child: Child,
    base: String,
    log: Arc<Mutex<Vec<String>>>,
    dir: PathBuf,
}

impl Server {
    /// `wasm-infer serve --config CONFIG ARGS...` (the config listens on port 0), with the
    /// test cache, once it listens.
    fn start(config: &str, args: &[&str]) -> Self {
        use std::sync::atomic::AtomicU64;
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "wasm-infer-serve-workers-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let config_path = dir.join("serve.toml");
        std::fs::write(&config_path, format!("listen = \"127.0.0.1:0\"\n{config}")).unwrap();
        // Flags ride where the models would: spawn_serve passes its paths as arguments.
        let args: Vec<PathBuf> = args.iter().map(PathBuf::from).collect();
        let support::ServeProcess { child, base, log } =
            support::spawn_serve(&config_path, &args, START_TIMEOUT);
        Self {
            child,
            base,
            log,
            dir,
        }
    }

    fn post(&self, path: &str, key: Option<&str>, body: &Value) -> Reply {
        let mut request =
            ureq::post(&format!("{}{path}", self.base)).set("Content-Type", "application/json");
        if let Some(key) = key {
            request = request.set("Authorization", &format!("Bearer {key}"));
        }
        Reply::from(request.send_string(&body.to_string()))
    }

    fn get(&self, path: &str) -> Reply {
        Reply::from(ureq::get(&format!("{}{path}", self.base)).call())
    }

    fn infer(&self, key: Option<&str>, model: &str, command: &str) -> Value {
        let reply = self.post(
            "/v1/infer",
            key,
            &json!({"model": model, "input": {"text": command}}),
        );
        assert_eq!(reply.status, 200, "{}", reply.text);
        reply.json()
    }

    /// The sum of the samples of `name` whose labels include `labels` (`route="/metrics"`).
    fn metric_where(&self, name: &str, labels: &str) -> f64 {
        self.get("/metrics")
            .text
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
                (metric == name && rest.contains(labels))
                    .then(|| value.parse::<f64>().ok())
                    .flatten()
            })
            .sum()
    }

    fn metric(&self, name: &str) -> f64 {
        self.metric_where(name, "")
    }

    /// The server's child processes: its workers.
    fn workers(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        let tasks = format!("/proc/{}/task", self.child.id());
        for task in std::fs::read_dir(tasks).into_iter().flatten().flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            pids.extend(
                children
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
        pids
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn models(isolation: &str) -> String {
    format!(
        "isolation = \"{isolation}\"\nworkers = 2\n[[models]]\nname = \"minilm\"\npath = \"{}\"\n\
         [[models]]\nname = \"hostile\"\npath = \"{}\"\n",
        minilm_wasm().display(),
        hostile_wasm().display(),
    )
}

/// The embeddings of every reference case, and the fuel of the short one and of a hostile run.
fn answers(server: &Server) -> (Vec<Vec<u32>>, u64, u64) {
    let texts: Vec<&str> = reference().cases.iter().map(|c| c.text.as_str()).collect();
    let reply = server.post(
        "/v1/embeddings",
        None,
        &json!({"model": "minilm", "input": texts}),
    );
    assert_eq!(reply.status, 200, "{}", reply.text);
    let body = reply.json();
    let vectors: Vec<Vec<f32>> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| serde_json::from_value(item["embedding"].clone()).unwrap())
        .collect();
    assert_eq!(vectors.len(), reference().cases.len());
    for (case, vector) in reference().cases.iter().zip(&vectors) {
        let similarity = cosine(vector, &case.embedding);
        assert!(similarity >= 0.9999, "{}: cosine {similarity}", case.name);
    }
    let short = server.infer(None, "minilm", &case("short_bench").text);
    let work = server.infer(None, "hostile", "work:1000");
    let bits = vectors
        .iter()
        .map(|v| v.iter().map(|x| x.to_bits()).collect())
        .collect();
    (
        bits,
        short["usage"]["fuel_consumed"].as_u64().unwrap(),
        work["usage"]["fuel_consumed"].as_u64().unwrap(),
    )
}

#[test]
fn with_workers_embeddings_and_fuel_equal_the_reference_golden_figures_and_in_process() {
    let workers = Server::start(&models("process"), &[]);
    assert_eq!(workers.workers().len(), 2, "{}", workers.log());
    let (bits, short_fuel, work_fuel) = answers(&workers);
    assert_golden("minilm_short_bench", short_fuel);
    assert_golden("hostile_work_1000", work_fuel);
    let ready = workers.get("/readyz");
    assert_eq!(ready.status, 200, "{}", ready.text);
    assert_eq!(workers.metric("wasm_infer_workers"), 2.0);
    assert_eq!(workers.metric("wasm_infer_workers_started_total"), 2.0);
    assert_eq!(workers.metric("wasm_infer_workers_lost_total"), 0.0);

    let in_process = Server::start(&models("in_process"), &[]);
    assert!(in_process.workers().is_empty());
    assert_eq!(
        answers(&in_process),
        (bits, short_fuel, work_fuel),
        "the same bits and fuel in a worker as in the server"
    );
}

/// The hostile guest's `nans` report in this process, under `nan_canonicalization`.
fn nan_report(nan_canonicalization: bool) -> String {
    let runtime = Runtime::with_config(RuntimeConfig {
        nan_canonicalization,
        cache_dir: Some(cache_dir()),
        ..RuntimeConfig::default()
    })
    .unwrap();
    let model = Model::load(&runtime, hostile_wasm()).unwrap();
    match model
        .run(Input::Text("nans".into()), &Limits::default())
        .unwrap()
        .output
    {
        Output::Text(text) => text,
        other => panic!("expected text, got {other:?}"),
    }
}

#[test]
fn nan_canonicalization_and_the_accel_mode_reach_the_workers() {
    let (canonical, raw) = (nan_report(true), nan_report(false));
    assert_ne!(canonical, raw, "the report tells the two settings apart");
    let config = format!(
        "isolation = \"process\"\nworkers = 1\n[[models]]\nname = \"hostile\"\npath = \"{}\"\n",
        hostile_wasm().display()
    );
    let on = Server::start(&config, &["--nan-canonicalization", "on", "--accel", "off"]);
    assert_eq!(
        on.infer(None, "hostile", "nans")["output"]["text"],
        canonical
    );
    let none = on.infer(None, "hostile", "accel-info")["output"]["text"].clone();
    assert!(
        none.as_str().unwrap().starts_with("kind=DeviceKind::None "),
        "{none}"
    );
    let off = Server::start(
        &config,
        &["--nan-canonicalization", "off", "--accel", "cpu"],
    );
    assert_eq!(off.infer(None, "hostile", "nans")["output"]["text"], raw);
    let device = off.infer(None, "hostile", "accel-info")["output"]["text"].clone();
    assert!(
        device
            .as_str()
            .unwrap()
            .starts_with("kind=DeviceKind::Cpu budget="),
        "{device}"
    );
}

#[test]
fn a_kill_storm_costs_only_the_requests_it_hits_and_their_fuel_comes_back() {
    const CLIENTS: usize = 8;
    const STORM: Duration = Duration::from_secs(10);
    const KILL_EVERY: Duration = Duration::from_millis(100);
    // A fuel cap per request, a burst for thousands, and a refill of one unit a second: what
    // the quota holds after the storm is the burst less what the answered runs burnt, give
    // or take the seconds elapsed; one reservation kept by a lost request would be `CAP` less.
    const CAP: u64 = 200_000_000;
    const BURST: u64 = 1_000_000_000_000;
    let config = format!(
        "isolation = \"process\"\nworkers = 2\n[[models]]\nname = \"minilm\"\npath = \"{}\"\n\
         [[tenants]]\nname = \"storm\"\nkey_sha256 = \"{}\"\n[tenants.limits]\nfuel = {CAP}\n\
         [tenants.rates]\nfuel_per_second = 1\nfuel_burst = {BURST}\n",
        minilm_wasm().display(),
        wasm_infer::serve::hash_key(KEY),
    );
    let server = Arc::new(Server::start(&config, &[]));
    let started = Instant::now();
    let text = case("short_bench");
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (server, stop, text) = (server.clone(), stop.clone(), text.clone());
            std::thread::spawn(move || {
                let (mut ok, mut lost, mut fuel) = (0u64, 0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let reply = server.post(
                        "/v1/embeddings",
                        Some(KEY),
                        &json!({"model": "minilm", "input": text.text}),
                    );
                    match reply.status {
                        200 => {
                            let body = reply.json();
                            let vector: Vec<f32> =
                                serde_json::from_value(body["data"][0]["embedding"].clone())
                                    .unwrap();
                            let similarity = cosine(&vector, &text.embedding);
                            assert!(similarity >= 0.9999, "cosine {similarity}");
                            fuel += body["usage"]["fuel"].as_u64().unwrap();
                            ok += 1;
                        }
                        503 => {
                            assert_eq!(
                                reply.json()["error"]["code"],
                                "worker_lost",
                                "{}",
                                reply.text
                            );
                            assert_eq!(reply.header("retry-after"), Some("1"));
                            lost += 1;
                        }
                        other => panic!("status {other}: {}", reply.text),
                    }
                }
                (ok, lost, fuel)
            })
        })
        .collect();
    let mut killed = 0u64;
    let storm = Instant::now();
    let mut turn = 0usize;
    while storm.elapsed() < STORM {
        std::thread::sleep(KILL_EVERY);
        let workers = server.workers();
        if let Some(&pid) = workers.get(turn % workers.len().max(1)) {
            // SAFETY: kill(2) on a child of the server this test started.
            if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
                killed += 1;
            }
        }
        turn += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut lost, mut fuel) = (0, 0, 0);
    for client in clients {
        let (o, l, f) = client.join().expect("a client thread");
        ok += o;
        lost += l;
        fuel += f;
    }
    // A kill lands every 100 ms on whichever worker is there; while both places are being
    // replaced there may be none for a moment.
    assert!(killed >= 20, "only {killed} kills");
    assert!(ok > 0 && lost > 0, "ok {ok}, lost {lost}");
    // Every request sent was answered, and counted by the server as such.
    let requests = server.metric_where("wasm_infer_requests_total", "route=\"/v1/embeddings\"");
    assert_eq!(requests, (ok + lost) as f64, "{}", server.log());
    assert_eq!(server.metric("wasm_infer_workers_lost_total"), lost as f64);
    // The server is up, its workers replaced, and the next request is answered.
    wait_for(|| server.workers().len() == 2);
    assert_eq!(server.get("/readyz").status, 200);
    let probe = server.post(
        "/v1/embeddings",
        Some(KEY),
        &json!({"model": "minilm", "input": text.text}),
    );
    assert_eq!(probe.status, 200, "{}", probe.text);
    // Its `RateLimit` header says what the quota held at its admission, its own cap taken.
    let remaining: u64 = probe
        .header("ratelimit")
        .and_then(|h| h.split(";r=").nth(1))
        .and_then(|r| r.split(';').next())
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no fuel remaining in {:?}", probe.header("ratelimit")));
    let expected = BURST - fuel - CAP;
    let refilled = started.elapsed().as_secs() + 2;
    assert!(
        (expected..=expected + refilled).contains(&remaining),
        "{remaining} fuel left; the burst less the {ok} answered runs' {fuel} and the probe's \
         cap is {expected} (plus at most {refilled} refilled)"
    );
}

/// One worker and two tenants taking turns: with `worker_affinity = "tenant"` each turn is
/// served by a worker process no other tenant's request reached (the server's one child,
/// read from /proc after each answer, is a new process at every switch, and counted as a
/// `tenant` recycle); with the default (`shared`) the same process serves both. Every
/// answer is the reference embedding with its golden fuel.
#[test]
fn with_tenant_affinity_a_worker_process_never_serves_a_second_tenant() {
    const KEYS: [(&str, &str); 2] = [("alpha", "sk-alpha"), ("beta", "sk-beta")];
    let short = case("short_bench");
    for affinity in ["tenant", "shared"] {
        let mut config = format!(
            "isolation = \"process\"\nworkers = 1\nworker_affinity = \"{affinity}\"\n\
             [[models]]\nname = \"minilm\"\npath = \"{}\"\n",
            minilm_wasm().display()
        );
        for (name, key) in KEYS {
            config.push_str(&format!(
                "[[tenants]]\nname = \"{name}\"\nkey_sha256 = \"{}\"\n",
                wasm_infer::serve::hash_key(key)
            ));
        }
        let server = Server::start(&config, &[]);
        let mut served: Vec<(i32, &str)> = Vec::new();
        for turn in 0..4 {
            let (tenant, key) = KEYS[turn % 2];
            let answer = server.infer(Some(key), "minilm", &short.text);
            let vector: Vec<f32> =
                serde_json::from_value(answer["output"]["embeddings"][0].clone()).unwrap();
            assert!(cosine(&vector, &short.embedding) >= 0.9999, "{affinity}");
            assert_golden(
                "minilm_short_bench",
                answer["usage"]["fuel_consumed"].as_u64().unwrap(),
            );
            let workers = server.workers();
            assert_eq!(
                workers.len(),
                1,
                "{affinity}: {workers:?}\n{}",
                server.log()
            );
            served.push((workers[0], tenant));
        }
        let recycled =
            server.metric_where("wasm_infer_workers_recycled_total", "reason=\"tenant\"");
        if affinity == "tenant" {
            for (pid, tenant) in &served {
                assert!(
                    served.iter().all(|(p, t)| p != pid || t == tenant),
                    "worker {pid} served two tenants: {served:?}"
                );
            }
            let pids: std::collections::BTreeSet<i32> = served.iter().map(|(p, _)| *p).collect();
            assert_eq!(pids.len(), 4, "{served:?}");
            assert_eq!(recycled, 3.0);
            assert_eq!(server.metric("wasm_infer_workers_started_total"), 4.0);
        } else {
            assert!(served.iter().all(|(p, _)| *p == served[0].0), "{served:?}");
            assert_eq!(recycled, 0.0);
            assert_eq!(server.metric("wasm_infer_workers_started_total"), 1.0);
        }
        assert_eq!(server.metric("wasm_infer_workers_lost_total"), 0.0);
    }
}

fn wait_for(mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "condition not met in 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
