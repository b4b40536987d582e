//! `wasm-infer serve` over loopback: real server processes (each on a port the OS picked,
//! killed when its test ends), real HTTP. Embeddings against the reference fixture, every
//! refusal's status and body shape, exact quotas, backpressure, drain, metrics.

mod support;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use support::{cache_dir, cosine, hostile, hostile_wasm, minilm_wasm, reference, text, Reply};
use wasm_infer::Limits;

/// How long a server may take to load its models and listen (a first, uncached compile of
/// MiniLM included).
const START_TIMEOUT: Duration = Duration::from_secs(300);
/// Keys of the test tenants (their SHA-256 go in the configs).
const KEY_A: &str = "sk-test-tenant-a";
const KEY_B: &str = "sk-test-tenant-b";

/// A running `wasm-infer serve`, killed on drop.
struct Server {
    child: Child,
    base: String,
    log: Arc<Mutex<Vec<String>>>,
    _dir: support::TempDir,
}

impl Server {
    /// Starts a server with `config` (TOML; `listen` is set here) serving `models`.
    fn start(config: &str, models: &[PathBuf]) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "wasm-infer-serve-test-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let config_path = dir.join("serve.toml");
        std::fs::write(&config_path, format!("listen = \"127.0.0.1:0\"\n{config}")).unwrap();
        let support::ServeProcess { child, base, log } =
            support::spawn_serve(&config_path, models, START_TIMEOUT);
        Self {
            child,
            base,
            log,
            _dir: support::TempDir(dir),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn get(&self, path: &str, key: Option<&str>) -> Reply {
        let mut request = ureq::get(&self.url(path));
        if let Some(key) = key {
            request = request.set("Authorization", &format!("Bearer {key}"));
        }
        Reply::from(request.call())
    }

    fn post(&self, path: &str, key: Option<&str>, body: &Value) -> Reply {
        self.post_raw(path, key, &body.to_string())
    }

    fn post_raw(&self, path: &str, key: Option<&str>, body: &str) -> Reply {
        let mut request = ureq::post(&self.url(path)).set("Content-Type", "application/json");
        if let Some(key) = key {
            request = request.set("Authorization", &format!("Bearer {key}"));
        }
        Reply::from(request.send_string(body))
    }

    fn infer(&self, key: Option<&str>, model: &str, command: &str) -> Reply {
        self.post(
            "/v1/infer",
            key,
            &json!({"model": model, "input": {"text": command}}),
        )
    }

    /// The value of one sample of `/metrics` (0 if absent).
    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = self.get("/metrics", None).text;
        support::metric_value(&text, name, labels)
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on the child's own pid.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
    }

    fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn tenant(name: &str, key: &str, extra: &str) -> String {
    format!(
        "[[tenants]]\nname = \"{name}\"\nkey_sha256 = \"{}\"\n{extra}\n",
        wasm_infer::serve::hash_key(key)
    )
}

/// The fuel `command` consumes on the hostile guest (deterministic: the same in the server).
fn hostile_fuel(command: &str) -> u64 {
    hostile()
        .run(text(command), &Limits::default())
        .expect("a hostile run")
        .usage
        .fuel_consumed
}

#[test]
fn embeddings_equal_the_reference_as_float_and_as_base64() {
    let server = Server::start("", &[minilm_wasm()]);
    let models = server.get("/v1/models", None).json();
    let name = models["data"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(name, "all-MiniLM-L6-v2");
    let cases = &reference().cases;
    let texts: Vec<&str> = cases.iter().map(|c| c.text.as_str()).collect();
    let float = server.post(
        "/v1/embeddings",
        None,
        &json!({"model": name, "input": texts, "user": "someone"}),
    );
    assert_eq!(float.status, 200, "{}", float.text);
    assert!(float.header("x-request-id").is_some());
    assert_eq!(
        float.header("x-wasm-infer-answered-by"),
        Some(name.as_str())
    );
    let float = float.json();
    assert_eq!(float["object"], "list");
    assert_eq!(float["model"], name.as_str());
    let data = float["data"].as_array().unwrap();
    assert_eq!(data.len(), cases.len());
    let vectors: Vec<Vec<f32>> = data
        .iter()
        .enumerate()
        .map(|(i, item)| {
            assert_eq!(item["object"], "embedding");
            assert_eq!(item["index"], i);
            serde_json::from_value(item["embedding"].clone()).unwrap()
        })
        .collect();
    for (case, vector) in cases.iter().zip(&vectors) {
        assert_eq!(vector.len(), 384);
        let similarity = cosine(vector, &case.embedding);
        assert!(similarity >= 0.9999, "{}: cosine {similarity}", case.name);
    }
    assert!(float["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    assert_eq!(
        float["usage"]["prompt_tokens"],
        float["usage"]["total_tokens"]
    );

    let encoded = server
        .post(
            "/v1/embeddings",
            None,
            &json!({"model": name, "input": texts, "encoding_format": "base64"}),
        )
        .json();
    for (item, vector) in encoded["data"].as_array().unwrap().iter().zip(&vectors) {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(item["embedding"].as_str().unwrap())
            .unwrap();
        let decoded: Vec<u32> = bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let bits: Vec<u32> = vector.iter().map(|x| x.to_bits()).collect();
        assert_eq!(decoded, bits, "base64 is the same little-endian f32 bits");
    }

    // One string is one embedding, the batch's first (a batch does not change a vector).
    let one = server
        .post(
            "/v1/embeddings",
            None,
            &json!({"model": name, "input": texts[0], "dimensions": 384}),
        )
        .json();
    let single: Vec<f32> = serde_json::from_value(one["data"][0]["embedding"].clone()).unwrap();
    assert!(cosine(&single, &vectors[0]) >= 0.99999);

    assert_eq!(server.get("/healthz", None).status, 200);
    let ready = server.get("/readyz", None);
    assert_eq!(ready.status, 200, "{}", ready.text);
    assert_eq!(ready.json()["ready"], true);
}

#[test]
fn each_refusal_has_its_status_and_the_openai_error_shape() {
    let fuel_cap = 5_000_000u64;
    let config = format!(
        "max_body = \"64KiB\"\n[limits]\nmax_input = \"16KiB\"\nwall_time = \"500ms\"\n\
         [[models]]\nname = \"hostile\"\npath = \"{}\"\n\
         {}{}",
        hostile_wasm().display(),
        tenant("a", KEY_A, &format!("[tenants.limits]\nfuel = {fuel_cap}")),
        tenant(
            "b",
            KEY_B,
            "[tenants.rates]\nrequests_per_second = 0.01\nrequests_burst = 1"
        ),
    );
    let server = Server::start(&config, &[]);

    // 401: no key, a wrong key; health and metrics need none.
    server
        .infer(None, "hostile", "echo:x")
        .assert_error(401, "invalid_api_key");
    server
        .infer(Some("sk-wrong"), "hostile", "echo:x")
        .assert_error(401, "invalid_api_key");
    assert_eq!(server.get("/v1/models", None).status, 401);
    assert_eq!(server.get("/healthz", None).status, 200);
    assert_eq!(server.get("/metrics", None).status, 200);
    let ok = server.infer(Some(KEY_A), "hostile", "echo:hello");
    assert_eq!(ok.status, 200, "{}", ok.text);
    assert_eq!(ok.json()["output"], json!({"text": "hello"}));

    // 404 names the models there are.
    let error = server
        .infer(Some(KEY_A), "gpt-4", "echo:x")
        .assert_error(404, "model_not_found");
    assert_eq!(error["param"], "model");
    assert_eq!(error["available"], json!(["hostile"]));

    // 400: not JSON; token ids; embeddings from a model that makes none.
    server
        .post_raw("/v1/infer", Some(KEY_A), "{not json")
        .assert_error(400, "invalid_json");
    let tokens = server.post(
        "/v1/embeddings",
        Some(KEY_A),
        &json!({"model": "hostile", "input": [[101, 102]]}),
    );
    assert_eq!(tokens.status, 400);
    assert_eq!(tokens.json()["error"]["param"], "input");

    // 413: a body over max_body (before parsing), an input over max_input (before running).
    // Refused from the declared length, before the body: sent by hand, since a client still
    // writing the body when the server answers and closes may see a reset instead.
    let mut huge = raw(&server);
    write!(
        huge,
        "POST /v1/infer HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {KEY_A}\r\n\
         Content-Length: {}\r\n\r\n",
        70 << 10
    )
    .unwrap();
    let head = read_head(&mut huge).expect("an answer");
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    let error = server
        .infer(Some(KEY_A), "hostile", &"x".repeat(20 << 10))
        .assert_error(413, "input");
    assert_eq!(
        error["limit"],
        json!({"kind": "input", "limit": 16 << 10, "size": 20 << 10})
    );

    // 422: the tenant's fuel cap, with the figures; the server's wall time.
    let error = server
        .infer(Some(KEY_A), "hostile", "spin")
        .assert_error(422, "fuel");
    assert_eq!(error["type"], "limit_exceeded");
    assert_eq!(error["limit"]["limit"], fuel_cap);
    assert!(error["limit"]["consumed"].as_u64().unwrap() > fuel_cap);
    assert_eq!(error["usage"]["fuel_consumed"], error["limit"]["consumed"]);
    let error = server
        .infer(Some(KEY_B), "hostile", "sleep")
        .assert_error(422, "wall_time");
    assert_eq!(error["limit"]["limit_us"], 500_000);

    // 429: tenant b's burst of one request is spent (by the sleep above).
    let limited = server.infer(Some(KEY_B), "hostile", "echo:x");
    let error = limited.assert_error(429, "rate_limit_exceeded");
    assert_eq!(error["type"], "requests");
    assert_eq!(limited.header("retry-after"), Some("100"));
    assert_eq!(
        limited.header("ratelimit-policy"),
        Some("\"requests\";q=1;w=100")
    );
    assert_eq!(limited.header("ratelimit"), Some("\"requests\";r=0;t=100"));
}

/// A config serving the hostile guest to tenant `a` (key [`KEY_A`]) with `tenant_extra`
/// (its rates or limits), after the server-wide settings `top`.
fn hostile_for_tenant_a(top: &str, tenant_extra: &str) -> String {
    format!(
        "{top}[[models]]\nname = \"hostile\"\npath = \"{}\"\n{}",
        hostile_wasm().display(),
        tenant("a", KEY_A, tenant_extra),
    )
}

#[test]
fn a_request_quota_admits_its_burst_then_429_until_retry_after() {
    let config = hostile_for_tenant_a(
        "",
        "[tenants.rates]\nrequests_per_second = 0.5\nrequests_burst = 3",
    );
    let server = Server::start(&config, &[]);
    for n in 0..3 {
        let ok = server.infer(Some(KEY_A), "hostile", "echo:x");
        assert_eq!(ok.status, 200, "request {n}: {}", ok.text);
        assert_eq!(
            ok.header("ratelimit"),
            Some(format!("\"requests\";r={};t={}", 2 - n, 2 * (n + 1)).as_str()),
            "request {n}"
        );
        assert_eq!(ok.header("ratelimit-policy"), Some("\"requests\";q=3;w=6"));
    }
    let limited = server.infer(Some(KEY_A), "hostile", "echo:x");
    limited.assert_error(429, "rate_limit_exceeded");
    let retry_after: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert_eq!(retry_after, 2, "one request every 2 s");
    std::thread::sleep(Duration::from_secs(retry_after));
    let again = server.infer(Some(KEY_A), "hostile", "echo:x");
    assert_eq!(again.status, 200, "{}", again.text);
}

#[test]
fn a_token_quota_counts_the_estimated_tokens_of_each_input() {
    // "echo:abc" is 8 bytes: 2 + 8 / 4 = 4 estimated tokens, so a burst of 10 admits two.
    let config = hostile_for_tenant_a(
        "",
        "[tenants.rates]\ntokens_per_second = 0.01\ntokens_burst = 10",
    );
    let server = Server::start(&config, &[]);
    for n in 0..2 {
        let ok = server.infer(Some(KEY_A), "hostile", "echo:abc");
        assert_eq!(ok.status, 200, "request {n}: {}", ok.text);
    }
    let limited = server.infer(Some(KEY_A), "hostile", "echo:abc");
    let error = limited.assert_error(429, "rate_limit_exceeded");
    assert_eq!(error["type"], "tokens");
    assert_eq!(
        limited.header("ratelimit-policy"),
        Some("\"tokens\";q=10;w=1000")
    );
    // Two tokens are left: a 1-byte input (3 tokens) does not fit either, and nothing ran.
    assert_eq!(server.infer(Some(KEY_A), "hostile", "e").status, 429);
}

#[test]
fn a_fuel_quota_admits_fewer_long_runs_than_short_ones_by_the_predicted_count() {
    // Each request reserves the tenant's fuel cap and gets back what it did not burn, so a
    // quota of `burst` admits requests while `cap` still fits: 1 + (burst - cap) / consumed.
    let (short, long) = ("work:1000", "work:200000");
    let (short_fuel, long_fuel) = (hostile_fuel(short), hostile_fuel(long));
    assert!(long_fuel > 10 * short_fuel, "{short_fuel} vs {long_fuel}");
    let cap = 4 * long_fuel;
    // Half a long run of slack past the third, so neither count sits on a boundary.
    let burst = cap + 3 * long_fuel + long_fuel / 2;
    let predicted = |consumed: u64| 1 + (burst - cap) / consumed;
    let rates = format!(
        "[tenants.limits]\nfuel = {cap}\n[tenants.rates]\nfuel_per_second = 1\nfuel_burst = {burst}"
    );
    let config = format!(
        "[[models]]\nname = \"hostile\"\npath = \"{}\"\n{}{}",
        hostile_wasm().display(),
        tenant("short", KEY_A, &rates),
        tenant("long", KEY_B, &rates),
    );
    let server = Server::start(&config, &[]);
    let admitted = |key: &str, command: &str, most: u64| {
        for passed in 0..most {
            let reply = server.infer(Some(key), "hostile", command);
            if reply.status == 429 {
                assert_eq!(reply.json()["error"]["type"], "fuel");
                return passed;
            }
            assert_eq!(reply.status, 200, "{}", reply.text);
        }
        panic!("no 429 after {most} requests");
    };
    let long_passed = admitted(KEY_B, long, 100);
    assert_eq!(long_passed, predicted(long_fuel));
    assert_eq!(long_passed, 4);
    let short_passed = admitted(KEY_A, short, predicted(short_fuel) + 5);
    assert_eq!(short_passed, predicted(short_fuel));
    assert!(short_passed > long_passed);
}

#[test]
fn a_full_queue_answers_503_with_retry_after_at_once() {
    // Tenant a's runs stop at 2 s; tenant b may wait (and run) up to the server's 30 s.
    let config = format!(
        "[limits]\nwall_time = \"30s\"\n[[models]]\nname = \"hostile\"\npath = \"{}\"\n\
         max_concurrent = 1\nqueue = 1\n{}{}",
        hostile_wasm().display(),
        tenant("a", KEY_A, "[tenants.limits]\nwall_time = \"2s\""),
        tenant("b", KEY_B, ""),
    );
    let server = Arc::new(Server::start(&config, &[]));
    let running = {
        let server = server.clone();
        std::thread::spawn(move || server.infer(Some(KEY_A), "hostile", "sleep").status)
    };
    wait_for(|| server.metric("wasm_infer_in_flight", &[("model", "hostile")]) == 1.0);
    let queued = {
        let server = server.clone();
        std::thread::spawn(move || server.infer(Some(KEY_B), "hostile", "echo:queued").status)
    };
    wait_for(|| server.metric("wasm_infer_queue_depth", &[("model", "hostile")]) == 1.0);
    let start = Instant::now();
    let full = server.infer(Some(KEY_B), "hostile", "echo:x");
    full.assert_error(503, "overloaded");
    assert_eq!(full.header("retry-after"), Some("1"));
    assert!(start.elapsed() < Duration::from_secs(2), "refused at once");
    assert_eq!(
        running.join().unwrap(),
        422,
        "the sleeper hits its wall time"
    );
    assert_eq!(queued.join().unwrap(), 200, "the queued one runs after it");
}

#[test]
fn sigterm_lets_eight_in_flight_requests_finish_refuses_new_ones_and_exits_zero() {
    // Runs of a second or more of CPU each, so eight of them outlast the signal.
    let command = "work:200000000";
    let config = format!(
        "drain_deadline = \"60s\"\n[[models]]\nname = \"hostile\"\npath = \"{}\"\n\
         max_concurrent = 8\n",
        hostile_wasm().display(),
    );
    let mut server = Server::start(&config, &[]);
    let shared = Arc::new(server.base.clone());
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let base = shared.clone();
            std::thread::spawn(move || {
                let reply = Reply::from(ureq::post(&format!("{base}/v1/infer")).send_string(
                    &json!({"model": "hostile", "input": {"text": command}}).to_string(),
                ));
                reply.status
            })
        })
        .collect();
    wait_for(|| server.metric("wasm_infer_in_flight", &[("model", "hostile")]) == 8.0);
    server.signal(libc::SIGTERM);
    wait_for(|| server.log().contains("draining"));
    server
        .infer(None, "hostile", "echo:late")
        .assert_error(503, "draining");
    assert_eq!(server.get("/readyz", None).status, 503);
    let statuses: Vec<u16> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    assert_eq!(
        statuses,
        vec![200; 8],
        "all eight in-flight requests complete"
    );
    let status = server
        .wait(Duration::from_secs(30))
        .expect("the server exits");
    assert_eq!(status.code(), Some(0), "{}", server.log());
}

#[test]
fn sigterm_waits_until_a_slow_readers_answer_is_written_whole() {
    use std::io::Read;
    // 8,000,000 bytes of 7 are "[7,7,...]": 16,000,001 bytes of output in the JSON answer, far
    // more than loopback's socket buffers hold, so the server is still writing when signalled.
    let config = format!(
        "drain_deadline = \"60s\"\n[[models]]\nname = \"hostile\"\npath = \"{}\"\n",
        hostile_wasm().display(),
    );
    let mut server = Server::start(&config, &[]);
    let mut stream = raw(&server);
    let body = json!({"model": "hostile", "input": {"text": "bytes:8000000"}}).to_string();
    write!(
        stream,
        "POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let head = read_head(&mut stream).expect("an answer");
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(str::to_string)
        })
        .expect("a content-length")
        .parse()
        .unwrap();
    assert!(length > 16_000_000, "{length}");
    server.signal(libc::SIGTERM);
    wait_for(|| server.log().contains("draining"));
    // Read slowly: 256 KiB every 20 ms, about 13 MB/s.
    let mut answer = Vec::with_capacity(length);
    let mut chunk = vec![0u8; 256 << 10];
    loop {
        let n = stream.read(&mut chunk).expect("the answer, not a reset");
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&chunk[..n]);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        answer.len(),
        length,
        "the whole answer arrived before the close"
    );
    let answer: Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(
        answer["output"]["bytes"].as_array().unwrap().len(),
        8_000_000
    );
    let status = server
        .wait(Duration::from_secs(30))
        .expect("the server exits");
    assert_eq!(status.code(), Some(0), "{}", server.log());
}

#[test]
fn an_answer_whose_json_passes_max_answer_is_refused_and_one_under_it_is_served_whole() {
    // bytes:N is N sevens: "[7,7,...]" is 2N + 1 bytes of the answer's JSON.
    let config = format!(
        "max_answer = \"1MiB\"\n[[models]]\nname = \"hostile\"\npath = \"{}\"\n",
        hostile_wasm().display(),
    );
    let server = Server::start(&config, &[]);
    let refused = server.infer(None, "hostile", "bytes:600000");
    let error = refused.assert_error(422, "answer_too_large");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("more than max_answer (1048576 bytes)"),
        "{error}"
    );
    let served = server.infer(None, "hostile", "bytes:400000");
    assert_eq!(served.status, 200);
    assert_eq!(
        served
            .header("content-length")
            .unwrap()
            .parse::<usize>()
            .unwrap(),
        served.text.len()
    );
    let body = served.json();
    assert_eq!(body["output"]["bytes"].as_array().unwrap().len(), 400_000);
}

#[test]
fn metrics_after_a_scripted_mix_equal_what_was_sent() {
    let config = hostile_for_tenant_a(
        "metrics_listen = \"127.0.0.1:0\"\n",
        "[tenants.limits]\nfuel = 1000000",
    );
    let server = Server::start(&config, &[]);
    let mut fuel = 0;
    for _ in 0..3 {
        let ok = server.infer(Some(KEY_A), "hostile", "work:1000");
        assert_eq!(ok.status, 200);
        fuel += ok.json()["usage"]["fuel_consumed"].as_u64().unwrap();
    }
    for _ in 0..2 {
        assert_eq!(server.infer(Some(KEY_A), "nope", "echo:x").status, 404);
    }
    assert_eq!(server.infer(None, "hostile", "echo:x").status, 401);
    let trip = server.infer(Some(KEY_A), "hostile", "spin");
    assert_eq!(trip.status, 422);
    fuel += trip.json()["error"]["usage"]["fuel_consumed"]
        .as_u64()
        .unwrap();

    // With metrics_listen set, /metrics is served there only.
    assert_eq!(server.get("/metrics", None).status, 404);
    let separate = Reply::from(ureq::get(&metrics_url(&server)).call());
    assert_eq!(separate.status, 200);
    let text = separate.text;
    let requests = |status: &str, tenant: &str| {
        support::metric_value(
            &text,
            "wasm_infer_requests_total",
            &[
                ("route", "/v1/infer"),
                ("status", status),
                ("tenant", tenant),
            ],
        )
    };
    assert_eq!(requests("200", "a"), 3.0);
    assert_eq!(requests("404", "a"), 2.0);
    assert_eq!(requests("401", "-"), 1.0);
    assert_eq!(requests("422", "a"), 1.0);
    assert_eq!(
        support::metric_value(&text, "wasm_infer_limit_trips_total", &[("kind", "fuel")]),
        1.0
    );
    assert_eq!(
        support::metric_value(&text, "wasm_infer_fuel_consumed_total", &[("tenant", "a")]),
        fuel as f64
    );
    assert_eq!(
        support::metric_value(
            &text,
            "wasm_infer_run_wall_seconds_count",
            &[("tenant", "a")]
        ),
        4.0
    );
    assert_eq!(
        support::metric_value(&text, "wasm_infer_in_flight", &[]),
        0.0
    );
}

#[test]
fn pool_slots_free_is_read_from_the_runtime_while_runs_hold_slots() {
    // Four pooled slots; two sleepers hold one each until their 3 s wall time trips. The
    // server's own slots are what runs hold in process (workers hold their own).
    const SLOTS: f64 = 4.0;
    const HELD: usize = 2;
    let config = format!(
        "pool_slots = 4\nisolation = \"in_process\"\n[limits]\nwall_time = \"3s\"\n\
         [[models]]\nname = \"hostile\"\npath = \"{}\"\n",
        hostile_wasm().display(),
    );
    let server = Arc::new(Server::start(&config, &[]));
    let free = |server: &Server| server.metric("wasm_infer_pool_slots_free", &[]);
    assert_eq!(free(&server), SLOTS);
    let sleepers: Vec<_> = (0..HELD)
        .map(|_| {
            let server = server.clone();
            std::thread::spawn(move || server.infer(None, "hostile", "sleep").status)
        })
        .collect();
    // A run takes its slot when its store is made, just after it counts as in flight.
    wait_for(|| free(&server) <= SLOTS - HELD as f64);
    assert_eq!(free(&server), SLOTS - HELD as f64);
    for sleeper in sleepers {
        assert_eq!(
            sleeper.join().unwrap(),
            422,
            "the sleeper hits its wall time"
        );
    }
    wait_for(|| free(&server) == SLOTS);
}

/// Sends `GET path` on a kept-alive connection and reads one answer (head and a
/// Content-Length body); `Err` when none comes (the stream's read timeout).
fn get_on(stream: &mut std::net::TcpStream, path: &str) -> std::io::Result<String> {
    use std::io::Read;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n")?;
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        answer.push(byte[0]);
    }
    let head = String::from_utf8(answer).unwrap();
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().unwrap())
        })
        .expect("a content-length");
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body)?;
    Ok(head + &String::from_utf8(body).unwrap())
}

#[test]
fn past_max_connections_the_longest_idle_connection_is_closed_for_a_new_one_and_busy_ones_wait() {
    // Heads are never old enough to be closed here (the next test has that).
    let config = format!(
        "max_connections = 2\nslow_head_eviction = \"1h\"\nmetrics_listen = \"127.0.0.1:0\"\n\
         [[models]]\nname = \"hostile\"\npath = \"{}\"\n",
        hostile_wasm().display(),
    );
    let server = Server::start(&config, &[]);
    let metrics_url = metrics_url(&server);
    let metric = |name: &str, labels: &[(&str, &str)]| {
        support::metric_value(
            &Reply::from(ureq::get(&metrics_url).call()).text,
            name,
            labels,
        )
    };
    let open = || metric("wasm_infer_connections_open", &[]);
    // Two idle keep-alive connections, each answered once, then held open: `first` idle
    // longer.
    let mut first = raw(&server);
    assert!(get_on(&mut first, "/healthz")
        .unwrap()
        .starts_with("HTTP/1.1 200"));
    std::thread::sleep(Duration::from_millis(50));
    let mut second = raw(&server);
    assert!(get_on(&mut second, "/healthz")
        .unwrap()
        .starts_with("HTTP/1.1 200"));
    assert_eq!(open(), 2.0);
    // A third is served at once: the longest-idle one (`first`) is closed for it.
    let mut third = raw(&server);
    assert!(get_on(&mut third, "/healthz")
        .unwrap()
        .starts_with("HTTP/1.1 200"));
    assert_eq!(
        read_head(&mut first),
        None,
        "the longest-idle one is closed"
    );
    assert!(get_on(&mut second, "/healthz")
        .unwrap()
        .starts_with("HTTP/1.1 200"));
    assert_eq!(
        metric(
            "wasm_infer_connections_closed_total",
            &[("reason", "evicted_idle")]
        ),
        1.0
    );
    // With both slots busy (a head being read on each), a new connection waits: nothing is
    // closed for it.
    second
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: te")
        .unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: te")
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let mut fourth = raw(&server);
    fourth
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let waiting = get_on(&mut fourth, "/healthz").unwrap_err();
    assert!(
        matches!(
            waiting.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{waiting}"
    );
    assert_eq!(open(), 2.0);
    // Finishing `second`'s head answers it; closing it admits `fourth`, whose request,
    // already sent, is answered.
    second.write_all(b"st\r\n\r\n").unwrap();
    assert!(read_head(&mut second).unwrap().starts_with("HTTP/1.1 200"));
    drop(second);
    fourth
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(read_head(&mut fourth).unwrap().starts_with("HTTP/1.1 200"));
    assert_eq!(
        metric(
            "wasm_infer_connections_closed_total",
            &[("reason", "evicted_idle")]
        ),
        1.0
    );
    drop(third);
    drop(fourth);
    wait_for(|| open() == 0.0);
}

#[test]
fn past_max_connections_with_none_idle_the_oldest_slow_head_is_closed_for_a_new_one() {
    let config = format!(
        "max_connections = 2\nslow_head_eviction = \"300ms\"\nmetrics_listen = \"127.0.0.1:0\"\n\
         [[models]]\nname = \"hostile\"\npath = \"{}\"\n",
        hostile_wasm().display(),
    );
    let server = Server::start(&config, &[]);
    let metrics_url = metrics_url(&server);
    let closed = |reason: &str| {
        support::metric_value(
            &Reply::from(ureq::get(&metrics_url).call()).text,
            "wasm_infer_connections_closed_total",
            &[("reason", reason)],
        )
    };
    // Both slots hold a head that never ends; `older` began first.
    let mut older = raw(&server);
    older.write_all(b"GET /healthz HTTP/1.1\r\nHo").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let mut younger = raw(&server);
    younger.write_all(b"GET /healthz HTTP/1.1\r\nHo").unwrap();
    // A new client is served: once the older head is past 300 ms, it is closed for it.
    let mut new = raw(&server);
    new.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert!(get_on(&mut new, "/healthz")
        .unwrap()
        .starts_with("HTTP/1.1 200"));
    assert_eq!(read_head(&mut older), None, "the oldest head is closed");
    assert_eq!(closed("evicted_slow_head"), 1.0);
    assert_eq!(closed("evicted_idle"), 0.0);
    // The younger head is still open and can finish its request.
    younger.write_all(b"st: x\r\n\r\n").unwrap();
    assert!(read_head(&mut younger).unwrap().starts_with("HTTP/1.1 200"));
}

#[test]
fn a_fuel_trip_is_retried_once_with_the_fallback_and_the_answer_says_so() {
    // work:N burns fuel in proportion to N: cut to 8 bytes, "work:200000000" is "work:200".
    let config = format!(
        "[limits]\nfuel = 5000000\n[[models]]\nname = \"hostile\"\npath = \"{}\"\n\
         [models.fallback]\ntruncate = 8\n",
        hostile_wasm().display(),
    );
    let server = Server::start(&config, &[]);
    let reply = server.infer(None, "hostile", "work:200000000");
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.header("x-wasm-infer-answered-by"), Some("hostile"));
    let body = reply.json();
    assert_eq!(body["fallback"], "truncated to 8 bytes");
    // Both runs' fuel: the first ran to its 5,000,000 cap, the fallback ran "work:200".
    let tripped = hostile()
        .run(
            text("work:200000000"),
            &Limits {
                fuel: Some(5_000_000),
                ..Limits::default()
            },
        )
        .expect_err("a fuel trip")
        .usage
        .fuel_consumed;
    assert_eq!(
        body["usage"]["fuel_consumed"],
        tripped + hostile_fuel("work:200")
    );
    assert!(body["output"]["text"].as_str().unwrap().starts_with("200 "));
    // A run that fits is answered by the model itself.
    let direct = server.infer(None, "hostile", "work:300").json();
    assert_eq!(direct["fallback"], Value::Null);
    assert_eq!(
        server.metric("wasm_infer_fallbacks_total", &[("model", "hostile")]),
        1.0
    );
    assert_eq!(
        server.metric("wasm_infer_limit_trips_total", &[("kind", "fuel")]),
        1.0
    );
}

#[test]
fn a_fallback_charges_and_reports_the_fuel_of_both_runs() {
    // The first run trips at the cap; the fallback ("work:200") runs after it. The quota holds
    // two caps (the first run's reservation and the fallback's) and half a fallback more.
    let cap: u64 = 5_000_000;
    let tripped = hostile()
        .run(
            text("work:200000000"),
            &Limits {
                fuel: Some(cap),
                ..Limits::default()
            },
        )
        .expect_err("a fuel trip")
        .usage
        .fuel_consumed;
    let fallback = hostile_fuel("work:200");
    let burst = 2 * cap + fallback / 2;
    let config = hostile_for_tenant_a(
        "",
        &format!(
            "[tenants.limits]\nfuel = {cap}\n[tenants.rates]\nfuel_per_second = 1\n\
             fuel_burst = {burst}\n"
        ),
    )
    .replace(
        "[[tenants]]",
        "[models.fallback]\ntruncate = 8\n[[tenants]]",
    );
    let server = Server::start(&config, &[]);
    let reply = server.infer(Some(KEY_A), "hostile", "work:200000000");
    assert_eq!(reply.status, 200, "{}", reply.text);
    let body = reply.json();
    assert_eq!(body["fallback"], "truncated to 8 bytes");
    assert_eq!(body["usage"]["fuel_consumed"], tripped + fallback);
    // Both runs were charged: what is left is less than one cap, so the next request is 429.
    let limited = server.infer(Some(KEY_A), "hostile", "work:1");
    assert_eq!(
        limited.assert_error(429, "rate_limit_exceeded")["type"],
        "fuel"
    );
    // What is left: the burst less both runs, plus the 1 fuel a second the quota regains over
    // the test's few seconds (before the fix it was the burst less the fallback alone, about
    // two caps).
    let left = limited.header("ratelimit").unwrap();
    let r: u64 = left
        .strip_prefix("\"fuel\";r=")
        .and_then(|rest| rest.split(';').next())
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("{left}"));
    let expected = burst - tripped - fallback;
    assert!((expected..expected + 60).contains(&r), "{r} vs {expected}");
}

#[test]
fn a_device_memory_trip_is_retried_in_the_sandbox_when_configured_and_is_a_422_when_not() {
    // 1,000,000 floats are 4 MB on the device, over the 1 MiB device budget.
    const COMMAND: &str = "accel-or-sandbox:1000000";
    let config = |fallback: &str| {
        format!(
            "[limits]\ndevice_memory = \"1MiB\"\n[[models]]\nname = \"hostile\"\npath = \"{}\"\n\
             {fallback}",
            hostile_wasm().display(),
        )
    };
    let server = Server::start(&config("[models.fallback]\nin_sandbox = true\n"), &[]);
    let reply = server.infer(None, "hostile", COMMAND);
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.header("x-wasm-infer-answered-by"), Some("hostile"));
    assert_eq!(reply.header("x-wasm-infer-fallback"), Some("in-sandbox"));
    let body = reply.json();
    assert_eq!(body["fallback"], "in-sandbox");
    assert_eq!(body["output"]["text"], "sandbox 500000");
    assert_eq!(
        server.metric("wasm_infer_limit_trips_total", &[("kind", "device_memory")]),
        1.0
    );
    assert_eq!(
        server.metric("wasm_infer_fallbacks_total", &[("model", "hostile")]),
        1.0
    );
    // A run that fits on the device is answered there, with no fallback.
    let direct = server.infer(None, "hostile", "accel-or-sandbox:1000");
    assert_eq!(direct.header("x-wasm-infer-fallback"), None);
    let direct = direct.json();
    assert_eq!(direct["output"]["text"], "device 1000");
    assert_eq!(direct["fallback"], Value::Null);
    drop(server);

    // Without the fallback the same request is the documented device-memory 422.
    let server = Server::start(&config(""), &[]);
    let refused = server.infer(None, "hostile", COMMAND);
    let error = refused.assert_error(422, "device_memory");
    assert_eq!(error["type"], "limit_exceeded", "{error}");
}

/// The client script: two embeddings calls, the second one refused with 429 + Retry-After
/// and retried by the client itself. Prints the vectors as JSON.
const OPENAI_SCRIPT: &str = r#"
import json, sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1] + "/v1", api_key=sys.argv[2], max_retries=2)
texts = json.loads(sys.argv[3])
first = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)
second = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts[0])
print(json.dumps({
    "first": [d.embedding for d in first.data],
    "second": second.data[0].embedding,
    "model": first.model,
}))
"#;

#[test]
fn the_official_openai_client_gets_the_same_vectors_and_honours_retry_after() {
    let Some(python) = support::openai_python() else {
        return;
    };
    // One request per second, burst one: the client's second call gets 429 with Retry-After 1
    // and only a retry after that wait can pass.
    let config = tenant(
        "a",
        KEY_A,
        "[tenants.rates]\nrequests_per_second = 1.0\nrequests_burst = 1",
    );
    let server = Server::start(&config, &[minilm_wasm()]);
    let texts: Vec<&str> = reference()
        .cases
        .iter()
        .take(3)
        .map(|c| c.text.as_str())
        .collect();
    let texts = serde_json::to_string(&texts).unwrap();
    let got = support::python_json(
        &python,
        OPENAI_SCRIPT,
        &[&server.base, KEY_A, &texts],
        || server.log(),
    );
    assert_eq!(got["model"], "all-MiniLM-L6-v2");
    let first: Vec<Vec<f32>> = serde_json::from_value(got["first"].clone()).unwrap();
    for (vector, case) in first.iter().zip(&reference().cases) {
        assert!(cosine(vector, &case.embedding) >= 0.9999, "{}", case.name);
    }
    let second: Vec<f32> = serde_json::from_value(got["second"].clone()).unwrap();
    assert!(cosine(&second, &first[0]) >= 0.99999);
    let answered = |status: &str| {
        server.metric(
            "wasm_infer_requests_total",
            &[("route", "/v1/embeddings"), ("status", status)],
        )
    };
    assert_eq!(answered("429"), 1.0, "the second call was refused once");
    assert_eq!(answered("200"), 2.0, "and its retry passed");
}

#[test]
fn an_invalid_model_refuses_to_start_with_the_clis_exit_status() {
    let dir = std::env::temp_dir().join(format!("wasm-infer-serve-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.wasm");
    std::fs::write(&bad, b"not wasm").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_wasm-infer"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .arg(&bad)
        .env("WASM_INFER_CACHE_DIR", cache_dir())
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        output.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn hash_key_prints_the_sha256_of_the_key_on_stdin() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wasm-infer"))
        .args(["serve", "hash-key"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"test\n").unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8(output.stdout).unwrap().trim(),
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    );
}

/// Polls `condition` (a server-side state reached asynchronously) for up to 60 s.
fn wait_for(mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A raw connection to `server`'s API address, reads timing out after 10 s.
fn raw(server: &Server) -> std::net::TcpStream {
    let addr = server.base.strip_prefix("http://").unwrap();
    let stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// Reads one answer's head (through the blank line); `None` if the server closed first.
fn read_head(stream: &mut std::net::TcpStream) -> Option<String> {
    use std::io::Read;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream
            .read(&mut byte)
            .expect("an answer or a close in time")
            == 0
        {
            return None;
        }
        head.push(byte[0]);
    }
    Some(String::from_utf8(head).unwrap())
}

/// Reads until the server closes the connection; how long that took.
fn time_to_close(stream: &mut std::net::TcpStream) -> Duration {
    use std::io::Read;
    let start = Instant::now();
    let mut sink = [0u8; 4096];
    while stream
        .read(&mut sink)
        .expect("closed before the read timeout")
        > 0
    {}
    start.elapsed()
}

fn metrics_url(server: &Server) -> String {
    server
        .log()
        .lines()
        .find_map(|line| line.strip_prefix("metrics on ").map(str::to_string))
        .expect("the metrics address is printed")
}

#[test]
fn half_a_head_is_closed_after_the_header_timeout_and_an_idle_connection_after_the_idle_timeout() {
    let config = format!(
        "header_read_timeout = \"1s\"\nidle_timeout = \"3s\"\n[[models]]\nname = \"hostile\"\n\
         path = \"{}\"\n",
        hostile_wasm().display(),
    );
    let server = Server::start(&config, &[]);
    // Half a head, then nothing: closed at the header timeout, unanswered.
    let mut half = raw(&server);
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: te")
        .unwrap();
    let waited = time_to_close(&mut half);
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    // A head trickled a byte every 200 ms does not reset the header timeout.
    let mut trickle = raw(&server);
    let start = Instant::now();
    for byte in b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Slow: " {
        if trickle.write_all(&[*byte]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        if start.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    let closed_after = start.elapsed() + time_to_close(&mut trickle);
    assert!(closed_after < Duration::from_secs(4), "{closed_after:?}");
    // A kept-alive connection after its answer: the idle timeout (3 s), not the header one.
    let mut idle = raw(&server);
    assert!(get_on(&mut idle, "/healthz")
        .unwrap()
        .starts_with("HTTP/1.1 200"));
    let waited = time_to_close(&mut idle);
    assert!(
        waited >= Duration::from_millis(2800) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    let text = server.get("/metrics", None).text;
    let closed = |reason| {
        support::metric_value(
            &text,
            "wasm_infer_connections_closed_total",
            &[("reason", reason)],
        )
    };
    assert_eq!(closed("header_timeout"), 2.0);
    assert!(closed("idle_timeout") >= 1.0);
}

#[test]
fn a_head_larger_than_the_read_buffer_is_431_and_a_slow_body_is_408() {
    let config = format!(
        "max_read_buffer = \"16KiB\"\nbody_read_timeout = \"1s\"\n[[models]]\nname = \"hostile\"\n\
         path = \"{}\"\n",
        hostile_wasm().display(),
    );
    let server = Server::start(&config, &[]);
    let mut big = raw(&server);
    let filler = "a".repeat(20 << 10);
    // The server may answer and close before the whole head is written.
    let _ = write!(
        big,
        "GET /healthz HTTP/1.1\r\nHost: test\r\nX-Filler: {filler}\r\n\r\n"
    );
    let head = read_head(&mut big).expect("an answer");
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");
    // Just under the cap is served.
    let mut fits = raw(&server);
    let filler = "a".repeat(12 << 10);
    write!(
        fits,
        "GET /healthz HTTP/1.1\r\nHost: test\r\nX-Filler: {filler}\r\n\r\n"
    )
    .unwrap();
    assert!(read_head(&mut fits).unwrap().starts_with("HTTP/1.1 200"));
    // A body declared 100 bytes, 10 sent: 408 at the body-read timeout.
    let mut slow = raw(&server);
    let start = Instant::now();
    write!(
        slow,
        "POST /v1/infer HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
         Content-Length: 100\r\n\r\n{{\"model\":"
    )
    .unwrap();
    let head = read_head(&mut slow).expect("an answer");
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
}

#[test]
fn the_key_and_the_declared_length_are_checked_before_100_continue_or_any_body_byte() {
    let config = hostile_for_tenant_a("max_body = \"64KiB\"\n", "");
    let server = Server::start(&config, &[]);
    let head = |key: &str, length: u64| {
        format!(
            "POST /v1/infer HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nContent-Length: {length}\r\n\
             Expect: 100-continue\r\n\r\n"
        )
    };
    // A wrong key declaring 10 GiB: 401, not 100 Continue, and no body byte sent.
    let mut wrong = raw(&server);
    wrong
        .write_all(head("sk-wrong", 10 << 30).as_bytes())
        .unwrap();
    let answer = read_head(&mut wrong).expect("an answer");
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    // The right key declaring 10 GiB: 413 at once.
    let mut huge = raw(&server);
    let start = Instant::now();
    huge.write_all(head(KEY_A, 10 << 30).as_bytes()).unwrap();
    let answer = read_head(&mut huge).expect("an answer");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(start.elapsed() < Duration::from_secs(2));
    // The right key and a length within max_body: 100 Continue, then the answer.
    let body = json!({"model": "hostile", "input": {"text": "echo:hi"}}).to_string();
    let mut ok = raw(&server);
    ok.write_all(head(KEY_A, body.len() as u64).as_bytes())
        .unwrap();
    let answer = read_head(&mut ok).expect("100 Continue");
    assert!(answer.starts_with("HTTP/1.1 100"), "{answer}");
    ok.write_all(body.as_bytes()).unwrap();
    let answer = read_head(&mut ok).expect("an answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[test]
fn malformed_bodies_spend_the_request_quota_like_any_other() {
    let config = hostile_for_tenant_a(
        "",
        "[tenants.rates]\nrequests_per_second = 0.01\nrequests_burst = 3",
    );
    let server = Server::start(&config, &[]);
    for n in 0..3 {
        let bad = server.post_raw("/v1/infer", Some(KEY_A), "{not json");
        bad.assert_error(400, "invalid_json");
        assert_eq!(
            bad.header("ratelimit"),
            Some(format!("\"requests\";r={};t={}", 2 - n, 100 * (n + 1)).as_str()),
            "request {n}"
        );
    }
    let limited = server.infer(Some(KEY_A), "hostile", "echo:x");
    let error = limited.assert_error(429, "rate_limit_exceeded");
    assert_eq!(error["type"], "requests");
}

#[test]
fn readyz_called_twenty_times_at_once_probes_the_models_once() {
    let config = format!(
        "readiness_interval = \"1h\"\n[[models]]\nname = \"hostile\"\npath = \"{}\"\n",
        hostile_wasm().display(),
    );
    let server = Arc::new(Server::start(&config, &[]));
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let server = server.clone();
            std::thread::spawn(move || {
                (0..5)
                    .map(|_| server.get("/readyz", None).status)
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for caller in callers {
        assert_eq!(caller.join().unwrap(), vec![200; 5]);
    }
    assert_eq!(server.get("/readyz", None).json()["ready"], true);
    assert_eq!(server.metric("wasm_infer_readiness_probes_total", &[]), 1.0);
}

#[test]
fn a_long_or_unsafe_request_id_is_replaced_and_refusals_log_no_client_string() {
    let config = format!(
        "[[models]]\nname = \"hostile\"\npath = \"{}\"\n",
        hostile_wasm().display(),
    );
    let server = Server::start(&config, &[]);
    let id_of = |id: &str| {
        Reply::from(
            ureq::get(&server.url("/healthz"))
                .set("x-request-id", id)
                .call(),
        )
        .header("x-request-id")
        .unwrap()
        .to_string()
    };
    let plain = "trace-0123.abc_DEF";
    assert_eq!(id_of(plain), plain);
    for bad in [
        "x".repeat(65),
        "x".repeat(10 << 10),
        "a/b".into(),
        "a b".into(),
    ] {
        let id = id_of(&bad);
        assert!(
            id.starts_with("req-") && id.len() == 12,
            "{} -> {id}",
            bad.len()
        );
    }
    // Refusals carrying long client strings: no line of the log holds one.
    let long = "m".repeat(100 << 10);
    let before = server.log().len();
    server
        .infer(None, &long, "echo:x")
        .assert_error(404, "model_not_found");
    let status = server
        .post(
            "/v1/embeddings",
            None,
            &json!({"model": "hostile", "input": "x", "encoding_format": long}),
        )
        .status;
    assert_eq!(status, 400);
    std::thread::sleep(Duration::from_millis(200));
    let logged = server.log().len() - before;
    assert!(logged < 4096, "{logged} bytes of log for two refusals");
}

#[test]
fn a_batch_past_2048_items_is_refused_with_its_count() {
    let config = format!(
        "[[models]]\nname = \"hostile\"\npath = \"{}\"\n",
        hostile_wasm().display()
    );
    let server = Server::start(&config, &[]);
    // 500,000 one-letter texts: 2 MB of JSON, counted, not kept.
    let texts = vec!["x"; 500_000];
    let reply = server.post(
        "/v1/embeddings",
        None,
        &json!({"model": "hostile", "input": texts}),
    );
    assert_eq!(reply.status, 400, "{}", reply.text);
    let error = &reply.json()["error"];
    assert_eq!(
        error["message"],
        "input may hold at most 2048 items, not 500000."
    );
    assert_eq!(error["param"], "input");
    // /v1/infer: the same cap on `texts`, a parse error naming it.
    let reply = server.post(
        "/v1/infer",
        None,
        &json!({"model": "hostile", "input": {"texts": vec!["x"; 2049]}}),
    );
    let error = reply.assert_error(400, "invalid_json");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("texts may hold at most 2048 items"),
        "{error}"
    );
}

#[test]
fn with_metrics_listen_metrics_is_not_served_on_the_api_address() {
    let config = format!(
        "metrics_listen = \"127.0.0.1:0\"\n[[models]]\nname = \"hostile\"\npath = \"{}\"\n",
        hostile_wasm().display(),
    );
    let server = Server::start(&config, &[]);
    assert_eq!(server.get("/metrics", None).status, 404);
    let metrics = Reply::from(ureq::get(&metrics_url(&server)).call());
    assert_eq!(metrics.status, 200);
    assert!(metrics.text.contains("wasm_infer_connections_open"));
}

/// Whether the server closed `stream` without answering (EOF or a reset, no byte).
fn closed_unanswered(stream: &mut std::net::TcpStream) -> bool {
    use std::io::Read;
    let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n");
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
    }
}

/// A GET of `/healthz` with `X-Forwarded-For: xff` on its own connection: its status and
/// Retry-After.
fn healthz_from(server: &Server, xff: Option<&str>) -> (u16, Option<String>, String) {
    let mut request = ureq::get(&server.url("/healthz"));
    if let Some(xff) = xff {
        request = request.set("X-Forwarded-For", xff);
    }
    let reply = Reply::from(request.call());
    (
        reply.status,
        reply.headers.get("retry-after").cloned(),
        reply.text,
    )
}

#[test]
fn a_peer_past_its_connection_cap_is_closed_unanswered_and_past_its_rate_gets_429() {
    // 0.01 requests/s: the burst of 3, then one per 100 s.
    let config = format!(
        "max_connections_per_peer = 2\npeer_requests_per_second = 0.01\n\
         peer_requests_burst = 3\nmetrics_listen = \"127.0.0.1:0\"\n[[models]]\n\
         name = \"hostile\"\npath = \"{}\"\n",
        hostile_wasm().display(),
    );
    let server = Server::start(&config, &[]);
    let metrics_url = metrics_url(&server);
    let refused = |reason: &str| {
        support::metric_value(
            &Reply::from(ureq::get(&metrics_url).call()).text,
            "wasm_infer_peer_refused_total",
            &[("reason", reason)],
        )
    };
    // Two connections from 127.0.0.1, each answered (2 of the burst of 3).
    let mut a = raw(&server);
    let mut b = raw(&server);
    for stream in [&mut a, &mut b] {
        assert!(get_on(stream, "/healthz")
            .unwrap()
            .starts_with("HTTP/1.1 200"));
    }
    // A third from the same address is closed at once, unanswered.
    let mut c = raw(&server);
    assert!(closed_unanswered(&mut c));
    assert_eq!(refused("connections"), 1.0);
    // The burst's last request, then 429 with Retry-After (about 100 s: one period).
    assert!(get_on(&mut a, "/healthz")
        .unwrap()
        .starts_with("HTTP/1.1 200"));
    let log_before = server.log().len();
    let limited = get_on(&mut a, "/healthz").unwrap();
    assert!(limited.starts_with("HTTP/1.1 429"), "{limited}");
    let retry_after: u64 = limited
        .lines()
        .find_map(|l| l.strip_prefix("retry-after: "))
        .expect("a Retry-After")
        .trim()
        .parse()
        .unwrap();
    assert!((90..=100).contains(&retry_after), "{retry_after}");
    assert!(
        limited.contains("\"code\":\"rate_limit_exceeded\""),
        "{limited}"
    );
    // An untrusted peer's X-Forwarded-For is ignored: still this address's quota. Closing a
    // connection gives its place back (once the server has seen it close).
    drop(b);
    wait_for(|| {
        use std::io::Read;
        let mut d = raw(&server);
        let _ = d.write_all(
            b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Forwarded-For: 198.51.100.7\r\n\r\n",
        );
        let mut answer = [0u8; 12];
        d.read_exact(&mut answer).is_ok() && &answer == b"HTTP/1.1 429"
    });
    assert_eq!(refused("requests"), 2.0);
    // The refusals wrote no log line.
    assert_eq!(server.log().len(), log_before, "{}", server.log());
}

#[test]
fn behind_a_trusted_proxy_the_rate_is_per_forwarded_client_and_connections_are_not_capped() {
    let config = format!(
        "max_connections_per_peer = 1\npeer_requests_per_second = 0.01\n\
         peer_requests_burst = 2\ntrusted_proxies = [\"127.0.0.0/8\"]\n[[models]]\n\
         name = \"hostile\"\npath = \"{}\"\n",
        hostile_wasm().display(),
    );
    let server = Server::start(&config, &[]);
    // The proxy's connections are not capped at 1.
    let mut held: Vec<_> = (0..3).map(|_| raw(&server)).collect();
    for stream in &mut held {
        write!(
            stream,
            "GET /healthz HTTP/1.1\r\nHost: test\r\nX-Forwarded-For: 192.0.2.50\r\n\r\n"
        )
        .unwrap();
    }
    let mut statuses: Vec<String> = held
        .iter_mut()
        .map(|s| read_head(s).unwrap()[..12].to_string())
        .collect();
    statuses.sort();
    // Client 192.0.2.50's burst is 2: one of its three requests is refused.
    assert_eq!(statuses, ["HTTP/1.1 200", "HTTP/1.1 200", "HTTP/1.1 429"]);
    // Another client behind the same proxy has its own quota; a forged entry left of the
    // proxy's does not move the charge (the rightmost untrusted address is the client).
    assert_eq!(healthz_from(&server, Some("192.0.2.51")).0, 200);
    assert_eq!(healthz_from(&server, Some("192.0.2.77, 192.0.2.51")).0, 200);
    let (status, retry_after, body) = healthz_from(&server, Some("192.0.2.78, 192.0.2.51"));
    assert_eq!(status, 429, "{body}");
    assert!(retry_after.is_some());
    // No header: the proxy itself is the client.
    assert_eq!(healthz_from(&server, None).0, 200);
}

#[test]
fn a_body_slower_than_min_body_rate_is_408_after_the_grace_and_its_connection_closed() {
    let config = format!(
        "min_body_rate = \"1KiB\"\nbody_rate_grace = \"1s\"\n[[models]]\nname = \"hostile\"\n\
         path = \"{}\"\n",
        hostile_wasm().display(),
    );
    let server = Server::start(&config, &[]);
    // 512 KiB declared, 600 bytes sent at once and then nothing: due by 1 s + 600/1024 s, long
    // before the 30 s body-read timeout.
    let mut slow = raw(&server);
    let start = Instant::now();
    write!(
        slow,
        "POST /v1/infer HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{}",
        512 << 10,
        " ".repeat(600)
    )
    .unwrap();
    let head = read_head(&mut slow).expect("an answer");
    let waited = start.elapsed();
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(waited < Duration::from_secs(8), "{waited:?}");
    let mut rest = String::new();
    {
        use std::io::Read;
        let _ = slow.read_to_string(&mut rest);
    }
    assert!(rest.contains("\"code\":\"body_too_slow\""), "{rest}");
    assert!(rest.contains("600 bytes"), "{rest}");
    // read_to_string returned: the server closed the connection.
    // A body that keeps up (4 KiB every 250 ms: 16 KiB/s) for 2.5 s is read and answered.
    let body = format!(
        "{}{}",
        json!({"model": "hostile", "input": {"text": "echo:kept-up"}}),
        " ".repeat(40 << 10)
    );
    let mut steady = raw(&server);
    write!(
        steady,
        "POST /v1/infer HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    for chunk in body.as_bytes().chunks(4 << 10) {
        steady.write_all(chunk).unwrap();
        std::thread::sleep(Duration::from_millis(250));
    }
    let head = read_head(&mut steady).expect("an answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

/// The `r=` figure of the `fuel` item of a `RateLimit` header.
fn fuel_remaining(reply: &Reply) -> u64 {
    let header = reply.header("ratelimit").expect("a RateLimit header");
    let item = header
        .split(", ")
        .find(|item| item.starts_with("\"fuel\";"))
        .unwrap_or_else(|| panic!("no fuel item in {header}"));
    item.split(';')
        .find_map(|part| part.strip_prefix("r="))
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no r= in {item}"))
}

#[test]
fn a_model_profile_refuses_a_predicted_overrun_with_the_quota_untouched_and_charges_what_runs_use()
{
    use wasm_infer::profile::{Bound, Profile, Suggested};
    use wasm_infer::{Error, LimitExceeded, PredictedLimit};
    // A profile predicting 1,000,000 fuel per input byte (and no memory) for the hostile guest:
    // `work:1000` (9 bytes) is predicted 9,000,000, under the tenant's cap of 10,000,000;
    // `work:100000` (11 bytes) 11,000,000, over it.
    let (under, over) = ("work:1000", "work:100000");
    let cap: u64 = 10_000_000;
    let burst = 3 * cap;
    let flat = |per_byte: f64| Bound {
        intercept: 0.0,
        per_byte,
        per_byte_squared: 0.0,
        shift: 0.0,
    };
    let profile = Profile {
        schema_version: wasm_infer::profile::PROFILE_SCHEMA_VERSION,
        component_sha256: hostile().load_report().component_sha256.clone(),
        engine: hostile().runtime().fingerprint(),
        model: "hostile".into(),
        inputs: 1,
        max_input_bytes: 11,
        fuel: flat(1_000_000.0),
        peak_memory: flat(0.0),
        suggested: Suggested {
            margin_percent: 10,
            fuel: cap,
            memory: 64 << 10,
        },
        tokens: None,
    };
    assert_eq!(profile.predict(&text(under)).0, 9_000_000);
    assert_eq!(profile.predict(&text(over)).0, 11_000_000);
    let dir = support::scratch("profile");
    let profile_path = dir.join("hostile.profile.json");
    profile.write(&profile_path).unwrap();
    let config = format!(
        "[[models]]\nname = \"hostile\"\npath = \"{}\"\nprofile = \"{}\"\n{}",
        hostile_wasm().display(),
        profile_path.display(),
        tenant(
            "a",
            KEY_A,
            &format!(
                "[tenants.limits]\nfuel = {cap}\n[tenants.rates]\nfuel_per_second = 1\n\
                 fuel_burst = {burst}"
            )
        ),
    );
    let server = Server::start(&config, &[]);
    let started = Instant::now();

    // Predicted over the cap: the fuel limit's status and body, as serve maps the library's
    // `LimitExceeded::Predicted`; nothing ran.
    let refused = server.infer(Some(KEY_A), "hostile", over);
    let predicted = Error::Limit(LimitExceeded::Predicted {
        limit: cap,
        predicted: 11_000_000,
        resource: PredictedLimit::Fuel,
    });
    assert_eq!(refused.status, 422, "{}", refused.text);
    let error = &refused.json()["error"];
    assert_eq!(error["message"], predicted.to_string());
    assert_eq!(error["type"], "limit_exceeded");
    assert_eq!(error["code"], "fuel");
    assert_eq!(error["param"], serde_json::Value::Null);
    assert_eq!(error["limit"]["limit"], cap);
    assert_eq!(error["limit"]["predicted"], 11_000_000);
    // The bucket was full: the admission reserved the cap, nothing more.
    assert_eq!(fuel_remaining(&refused), burst - cap);

    // Under the cap: it runs, and its admission finds the quota full again (the refused
    // request's reservation was given back whole; the bucket cannot refill past full).
    let consumed = hostile_fuel(under);
    let ran = server.infer(Some(KEY_A), "hostile", under);
    assert_eq!(ran.status, 200, "{}", ran.text);
    assert_eq!(ran.json()["usage"]["fuel_consumed"], consumed);
    assert_eq!(fuel_remaining(&ran), burst - cap);

    // The run was charged what it consumed, exactly (its prediction held while it ran, the
    // difference refunded after): the next admission finds `burst - consumed - cap`, plus at
    // most one fuel unit per second since then (the quota refills at 1/s).
    let next = server.infer(Some(KEY_A), "hostile", under);
    assert_eq!(next.status, 200, "{}", next.text);
    let refill = started.elapsed().as_secs() + 1;
    let remaining = fuel_remaining(&next);
    let floor = burst - consumed - cap;
    assert!(
        (floor..=floor + refill).contains(&remaining),
        "remaining {remaining}, expected {floor} + at most {refill} of refill"
    );
    assert_eq!(
        server.metric("wasm_infer_fuel_consumed_total", &[("tenant", "a")]),
        (2 * consumed) as f64
    );
}
