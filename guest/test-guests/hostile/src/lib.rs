//! A test guest of the `model` world whose `infer` does what its text input commands, so each
//! limit and failure path can be driven from a test:
//!
//! | input            | behaviour                                                    |
//! |------------------|--------------------------------------------------------------|
//! | `echo:TEXT`      | returns `TEXT` (a well-behaved run)                          |
//! | `work:N`         | N iterations of a small loop, then returns N (exact fuel)    |
//! | `spin`           | loops forever without calling anything                       |
//! | `grow`           | allocates 1 MiB blocks forever (the allocator aborts on OOM) |
//! | `grow-pages:N`   | one `memory.grow` of N pages; returns the old size or -1     |
//! | `recurse`        | unbounded recursion (stack overflow)                         |
//! | `panic`          | panics with a message on stderr                              |
//! | `bytes:N`        | returns N bytes of output                                    |
//! | `print:N`        | writes N lines to stdout, then returns                       |
//! | `sleep`          | sleeps for an hour in a host call                            |
//! | `host-loop`      | calls a cheap import (the monotonic clock) forever           |
//! | `clock:N`        | reads both clocks N times; reports what it saw               |
//! | `env`            | counts environment variables and arguments                   |
//! | `read-file:PATH` | tries to read PATH; reports the error                        |
//! | `list-dir:PATH`  | tries to list PATH; reports the error                        |
//! | `connect:ADDR`   | tries a TCP connection to ADDR; reports the error            |
//! | `resolve:HOST`   | tries a DNS lookup of HOST; reports the error                |
//! | `abort`          | `std::process::abort()`                                      |
//! | `stdin`          | reads stdin to the end; reports how much it got              |

wit_bindgen::generate!({
    world: "model",
    path: "../../../wit",
});

use std::hint::black_box;

use wasm_infer::model::types::{DataKind, ErrorCode};

struct Hostile;

fn number(arg: &str) -> u64 {
    arg.parse().expect("numeric argument")
}

#[allow(unconditional_recursion)] // the point: it never returns, the stack overflows
fn recurse(depth: u64) -> u64 {
    // black_box keeps this a real call chain rather than a loop.
    black_box(depth) + recurse(black_box(depth + 1))
}

impl Guest for Hostile {
    fn info() -> ModelInfo {
        ModelInfo {
            name: "hostile".into(),
            version: "0".into(),
            description: "misbehaves on command, for tests".into(),
            inputs: vec![DataKind::Text],
            output: DataKind::Text,
            output_dimension: 0,
            max_input_tokens: 0,
        }
    }

    fn infer(input: Input) -> Result<Output, ModelError> {
        let Input::Text(command) = input else {
            return Err(ModelError {
                code: ErrorCode::UnsupportedInput,
                message: "hostile takes one text".into(),
            });
        };
        let (verb, arg) = command.split_once(':').unwrap_or((&command, ""));
        match verb {
            "echo" => Ok(Output::Text(arg.to_string())),
            "work" => {
                let mut acc = 0u64;
                for i in 0..number(arg) {
                    acc = black_box(acc.wrapping_mul(31).wrapping_add(i));
                }
                Ok(Output::Text(format!("{} {acc}", number(arg))))
            }
            "spin" => loop {
                black_box(());
            },
            "grow" => {
                let mut blocks = Vec::new();
                loop {
                    blocks.push(black_box(vec![1u8; 1 << 20]));
                }
            }
            "grow-pages" => {
                let old = core::arch::wasm32::memory_grow(0, number(arg) as usize);
                Ok(Output::Text(format!("{}", old as isize)))
            }
            "recurse" => Ok(Output::Text(recurse(0).to_string())),
            "panic" => panic!("hostile guest panicked on purpose"),
            "bytes" => Ok(Output::Bytes(vec![7u8; number(arg) as usize])),
            "print" => {
                for i in 0..number(arg) {
                    println!("line {i} of guest output");
                }
                Ok(Output::Text("printed".into()))
            }
            "sleep" => {
                std::thread::sleep(std::time::Duration::from_secs(3600));
                Ok(Output::Text("woke".into()))
            }
            "host-loop" => loop {
                black_box(std::time::Instant::now());
            },
            "clock" => {
                let wall = std::time::SystemTime::now();
                let start = std::time::Instant::now();
                let mut advanced = false;
                for _ in 0..number(arg) {
                    advanced |= black_box(std::time::Instant::now()) != start;
                }
                let secs = wall
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                Ok(Output::Text(format!(
                    "wall={secs} monotonic_advanced={advanced}"
                )))
            }
            "env" => Ok(Output::Text(format!(
                "vars={} args={} cwd={:?}",
                std::env::vars_os().count(),
                std::env::args_os().count(),
                std::env::current_dir().ok()
            ))),
            "read-file" => Ok(Output::Text(match std::fs::read(arg) {
                Ok(bytes) => format!("read {} bytes", bytes.len()),
                Err(e) => format!("denied: {:?}", e.kind()),
            })),
            "list-dir" => Ok(Output::Text(match std::fs::read_dir(arg) {
                Ok(entries) => format!("listed {} entries", entries.count()),
                Err(e) => format!("denied: {:?}", e.kind()),
            })),
            "connect" => Ok(Output::Text(match std::net::TcpStream::connect(arg) {
                Ok(_) => "connected".to_string(),
                Err(e) => format!("denied: {:?}", e.kind()),
            })),
            "resolve" => Ok(Output::Text(
                match std::net::ToSocketAddrs::to_socket_addrs(&(arg, 80)) {
                    Ok(addrs) => format!("resolved {} addresses", addrs.count()),
                    Err(e) => format!("denied: {:?}", e.kind()),
                },
            )),
            "abort" => std::process::abort(),
            "stdin" => {
                let mut buf = Vec::new();
                let result = std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf);
                Ok(Output::Text(format!(
                    "stdin: {} bytes, {:?}",
                    buf.len(),
                    result.is_ok()
                )))
            }
            _ => Err(ModelError {
                code: ErrorCode::InvalidInput,
                message: format!("unknown command {verb:?}"),
            }),
        }
    }
}

export!(Hostile);
