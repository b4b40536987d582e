//! `POST /v1/chat/completions` on `wasm-infer serve` with SmolLM2 in worker processes: the
//! official `openai` client gets, streamed and not, the tokens and fuel the library generates
//! in this process; the tokens quota is charged the guest's own counts; a fuel cap reached
//! mid-generation ends the answer with `finish_reason: "length"`, the limit's figures and
//! exactly the tokens before it (an HTTP error when not one token came through); a client that
//! goes away mid-stream stops its generation.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{metric_value, smollm2_wasm, Reply, ServeProcess};
use wasm_infer::{
    GenerateRequest, Generation, GenerationError, LimitExceeded, Limits, Message, Model, Prompt,
};

const START_TIMEOUT: Duration = Duration::from_secs(300);
const MODEL: &str = "SmolLM2-135M-Instruct";
const PROMPT: &str = "Write a haiku about sandboxes";
const KEY: &str = "sk-test-chat";

/// A running `wasm-infer serve` with SmolLM2 and MiniLM in one worker, killed on drop.
struct Server {
    process: ServeProcess,
    _dir: support::TempDir,
}

impl Server {
    /// With `config` after `listen` and one worker (each worker maps SmolLM2's 316 MiB).
    fn start(config: &str) -> Self {
        let dir = support::TempDir::new("chat");
        let path = dir.0.join("serve.toml");
        std::fs::write(
            &path,
            format!("listen = \"127.0.0.1:0\"\nworkers = 1\n{config}"),
        )
        .unwrap();
        // SmolLM2's compilation needs more than the default 2 GiB (docs/generation.md).
        let args: Vec<PathBuf> = ["--compile-mem", "6G"]
            .iter()
            .map(PathBuf::from)
            .chain([smollm2_wasm(), support::minilm_wasm()])
            .collect();
        let process = support::spawn_serve(&path, &args, START_TIMEOUT);
        Self { process, _dir: dir }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.process.base)
    }

    fn chat(&self, body: &Value) -> Reply {
        Reply::from(
            ureq::post(&self.url("/v1/chat/completions"))
                .set("Content-Type", "application/json")
                .set("Authorization", &format!("Bearer {KEY}"))
                .send_string(&body.to_string()),
        )
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = Reply::from(ureq::get(&self.url("/metrics")).call()).text;
        metric_value(&text, name, labels)
    }

    fn log(&self) -> String {
        self.process.log.lock().unwrap().join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.process.child.kill();
        let _ = self.process.child.wait();
    }
}

fn tenant(rates: &str) -> String {
    format!(
        "[[tenants]]\nname = \"chat\"\nkey_sha256 = \"{}\"\n{rates}\n",
        wasm_infer::serve::hash_key(KEY)
    )
}

fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| Model::load(support::runtime(), smollm2_wasm()).expect("smollm2.wasm"))
}

/// The request the server makes of a one-message chat (temperature 0: greedy).
fn request(max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        prompt: Prompt::Chat(vec![Message {
            role: "user".into(),
            content: PROMPT.into(),
        }]),
        temperature: 0.0,
        ..GenerateRequest::new("", max_tokens)
    }
}

fn body(max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    })
}

/// The `data:` events of a server-sent-events body.
fn events(text: &str) -> Vec<&str> {
    text.split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .collect()
}

/// The text of a stream's content deltas.
fn streamed_text(events: &[&str]) -> String {
    events
        .iter()
        .filter(|e| **e != "[DONE]")
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|e| {
            e["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect()
}

const OPENAI_CHAT: &str = r#"
import json, sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1] + "/v1", api_key=sys.argv[2], max_retries=0)
messages = [{"role": "user", "content": sys.argv[3]}]
whole = client.chat.completions.create(model=sys.argv[4], messages=messages, max_tokens=8, temperature=0)
chunks = list(client.chat.completions.create(model=sys.argv[4], messages=messages, max_tokens=8,
    temperature=0, stream=True, stream_options={"include_usage": True}))
print(json.dumps({
    "text": whole.choices[0].message.content,
    "finish": whole.choices[0].finish_reason,
    "usage": whole.usage.model_dump(),
    "streamed": "".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
    "streamed_finish": [c.choices[0].finish_reason for c in chunks if c.choices][-1],
    "streamed_usage": chunks[-1].usage.model_dump(),
    "models": sorted(m.id for m in client.models.list()),
}))
"#;

#[test]
fn the_openai_client_gets_the_librarys_tokens_and_fuel_streamed_and_not_and_pays_real_tokens() {
    let Some(python) = support::openai_python() else {
        return;
    };
    // 100 tokens, refilled at 1 per 1,000 s: the two calls' real tokens (45 each) leave 10.
    let server = Server::start(&tenant(
        "[tenants.rates]\ntokens_per_second = 0.001\ntokens_burst = 100",
    ));
    let got = support::python_json(
        &python,
        OPENAI_CHAT,
        &[&server.process.base, KEY, PROMPT, MODEL],
        || server.log(),
    );
    let expected: Generation = model()
        .generate(request(8), &Limits::default())
        .expect("the library's generation");
    assert_eq!(expected.completion_tokens, 8);
    for (text, finish, usage) in [
        (&got["text"], &got["finish"], &got["usage"]),
        (
            &got["streamed"],
            &got["streamed_finish"],
            &got["streamed_usage"],
        ),
    ] {
        assert_eq!(
            text.as_str(),
            Some(expected.generated.text.as_str()),
            "{got}"
        );
        assert_eq!(finish, "length", "{got}");
        assert_eq!(usage["prompt_tokens"], expected.prompt_tokens, "{got}");
        assert_eq!(usage["completion_tokens"], 8, "{got}");
        assert_eq!(usage["fuel"], expected.usage.fuel_consumed, "{got}");
        assert_eq!(
            usage["fuel_to_first_token"],
            json!(expected.token_fuel.to_first_token),
            "{got}"
        );
    }
    assert_eq!(
        got["models"],
        json!(["SmolLM2-135M-Instruct", "all-MiniLM-L6-v2"])
    );
    // Each call reserved its estimate (14 for the prompt, plus 8) and was settled to the
    // guest's count (prompt and completion): 100 - 2 x 45 = 10 are left, short of the next
    // call's 22. Charged the estimates only, 56 would be left and it would pass.
    let real = u64::from(expected.prompt_tokens + expected.completion_tokens);
    assert_eq!(
        real, 45,
        "the prompt's tokens under SmolLM2's chat template"
    );
    let refused = server.chat(&body(8, false));
    let error = refused.assert_error(429, "rate_limit_exceeded");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.starts_with("Rate limit reached for tokens: this request needs 22, 10"),
        "{error}"
    );
}

/// The library's generation of `request(max_tokens)` under a fuel cap of `cap`.
fn capped(max_tokens: u32, cap: u64) -> Box<GenerationError> {
    let limits = Limits {
        fuel: Some(cap),
        ..Limits::default()
    };
    model()
        .generate(request(max_tokens), &limits)
        .expect_err("the cap stops it")
}

#[test]
fn a_fuel_cap_mid_generation_ends_the_answer_with_length_the_limit_and_the_tokens_before_it() {
    // The smallest cap that lets the second token through (the library's own figure): the
    // third needs more, so the answer holds exactly two tokens.
    let two = model()
        .generate(request(2), &Limits::default())
        .expect("two tokens");
    let cap = two.token_fuel.to_last_token.expect("two tokens");
    let first = two.token_fuel.to_first_token.expect("a first token");
    let partial = capped(8, cap);
    assert_eq!(partial.partial.tokens, two.generated.tokens);
    assert_eq!(partial.partial.text, two.generated.text);
    assert_eq!(
        partial.error.error.limit(),
        Some(&LimitExceeded::Fuel {
            limit: cap,
            consumed: cap + 1
        })
    );
    let limit = json!({"kind": "fuel", "limit": cap, "consumed": cap + 1});

    let server = Server::start(&format!("{}[limits]\nfuel = {cap}\n", tenant("")));
    let whole = server.chat(&body(8, false));
    assert_eq!(whole.status, 200, "{}", whole.text);
    let answer = whole.json();
    let choice = &answer["choices"][0];
    assert_eq!(choice["message"]["content"], two.generated.text, "{answer}");
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(choice["limit"], limit, "{answer}");
    assert_eq!(answer["usage"]["completion_tokens"], 2);
    assert_eq!(answer["usage"]["prompt_tokens_estimated"], true);
    assert_eq!(answer["usage"]["fuel"], cap + 1);

    let streamed = server.chat(&body(8, true));
    assert_eq!(streamed.status, 200, "{}", streamed.text);
    assert_eq!(streamed.header("content-type"), Some("text/event-stream"));
    let events = events(&streamed.text);
    assert_eq!(streamed_text(&events), two.generated.text);
    assert_eq!(events.last(), Some(&"[DONE]"));
    let last: Value = serde_json::from_str(events[events.len() - 2]).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length", "{last}");
    assert_eq!(last["choices"][0]["limit"], limit, "{last}");
    drop(server);

    // One unit short of the first token: not one token, so the answer is the limit's error,
    // streamed or not.
    let server = Server::start(&format!("{}[limits]\nfuel = {}\n", tenant(""), first - 1));
    for stream in [false, true] {
        let refused = server.chat(&body(8, stream));
        let error = refused.assert_error(422, "fuel");
        assert_eq!(
            error["limit"],
            json!({"kind": "fuel", "limit": first - 1, "consumed": first}),
            "{error}"
        );
    }
}

#[test]
fn a_client_that_goes_away_mid_stream_stops_its_generation() {
    let server = Server::start(&tenant(""));
    let address = server
        .process
        .base
        .trim_start_matches("http://")
        .to_string();
    let request = body(400, true).to_string();
    let mut stream = std::net::TcpStream::connect(&address).unwrap();
    write!(
        stream,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{request}",
        request.len()
    )
    .unwrap();
    // Read until the first content chunk, then hang up.
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    let started = Instant::now();
    loop {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the stream ended");
        if line.contains("\"content\":\"") && !line.contains("\"content\":\"\"") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120));
    }
    drop(reader);
    stream.shutdown(std::net::Shutdown::Both).unwrap();
    drop(stream);
    // Its worker is stopped (and replaced): no fuel is spent on the dead connection, and a run
    // that never reported is not counted as consumed.
    let started = Instant::now();
    let stopped = || {
        server.metric(
            "wasm_infer_workers_recycled_total",
            &[("reason", "stopped")],
        ) == 1.0
            && server.metric("wasm_infer_in_flight", &[]) == 0.0
    };
    while !stopped() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the generation was not stopped:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        server.metric("wasm_infer_fuel_consumed_total", &[("model", MODEL)]),
        0.0
    );
    // The replacement serves the next request.
    let next = server.chat(&body(1, false));
    assert_eq!(next.status, 200, "{}", next.text);
    assert_eq!(next.json()["usage"]["completion_tokens"], 1);
}
