//! The soak test (`just soak`; ignored by the default run): thousands of hostile runs mixed with
//! good ones on several threads, then the host must be back where it started: resident memory
//! within a small margin, the same open file descriptors, the precompiled cache intact, and
//! every good run bit-identical to the reference run.
//!
//! Figures are printed for docs/benchmarks.md (`just soak` shows them).

mod support;

use std::time::Instant;

use support::{case, hostile, minilm, runtime};
use wasm_infer::{CodeSource, Input, Limits, Model, Output};

/// Runs per thread (one in ten is a good MiniLM run).
const RUNS_PER_THREAD: usize = 2500;
const THREADS: usize = 4;
/// Resident memory may end this much above where it started (allocator caches, lazily
/// initialised host state); a leak of one instance per hostile run would be gigabytes.
const RSS_MARGIN: u64 = 64 << 20;

fn status_field(name: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

/// Resident memory after asking glibc to return its free lists to the OS: the accelerator
/// path's host-side tensors come and go in the host's allocator, whose per-thread arenas keep
/// freed memory cached. Trimming measures what is still *in use*.
fn trimmed_rss() -> u64 {
    // SAFETY: malloc_trim only releases free memory held by the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
    status_field("VmRSS:")
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn cache_listing() -> Vec<(String, u64, std::time::SystemTime)> {
    let mut entries: Vec<_> = std::fs::read_dir(support::cache_dir())
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                meta.len(),
                meta.modified().unwrap(),
            )
        })
        .collect();
    entries.sort();
    entries
}

fn bits(output: &Output) -> Vec<u32> {
    output.embeddings().unwrap()[0]
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

#[test]
#[ignore = "slow: run with `just soak`"]
fn thousands_of_hostile_runs_leave_the_host_as_it_was() {
    let good_input = Input::Text(case("short_bench").text);
    let reference = minilm()
        .run(good_input.clone(), &Limits::default())
        .unwrap();
    let table_bomb = Model::from_bytes(runtime(), &support::table_bomb_wasm()).unwrap();
    let div_zero = Model::from_bytes(runtime(), &support::div_zero_wasm()).unwrap();
    let fuel = |n| Limits::default().fuel(n);
    let attacks: Vec<(&str, Limits)> = vec![
        ("spin", fuel(2_000_000)),
        ("host-loop", fuel(2_000_000)),
        ("grow", Limits::default().memory(24 << 20)),
        ("grow-pages:65536", Limits::default()),
        ("recurse", Limits::default()),
        ("panic", Limits::default()),
        ("abort", Limits::default()),
        ("print:2000", Limits::default()),
        ("read-file:/etc/passwd", Limits::default()),
        ("connect:127.0.0.1:22", Limits::default()),
        ("env", Limits::default()),
        ("bytes:100000", Limits::default().max_output(1000)),
        ("echo:fine", Limits::default()),
    ];

    // Warm up every path once, so lazily built host state is not counted as growth.
    for (command, limits) in &attacks {
        let _ = hostile().run(Input::Text(command.to_string()), limits);
    }
    let _ = table_bomb.run(Input::Text("x".into()), &Limits::default());
    let _ = div_zero.run(Input::Text("x".into()), &Limits::default());
    let cache_before = cache_listing();
    let rss_start = trimmed_rss();
    let fds_start = open_fds();
    let started = Instant::now();

    let (good_runs, bad_runs) = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|thread| {
                let (attacks, reference, good_input) = (&attacks, &reference, &good_input);
                let (table_bomb, div_zero) = (&table_bomb, &div_zero);
                scope.spawn(move || {
                    let (mut good, mut bad) = (0usize, 0usize);
                    for i in 0..RUNS_PER_THREAD {
                        let pick = i * THREADS + thread;
                        if pick.is_multiple_of(10) {
                            let outcome = minilm()
                                .run(good_input.clone(), &Limits::default())
                                .expect("a good run during the soak");
                            assert_eq!(bits(&outcome.output), bits(&reference.output));
                            assert_eq!(outcome.usage.fuel_consumed, reference.usage.fuel_consumed);
                            good += 1;
                            continue;
                        }
                        match pick % (attacks.len() + 2) {
                            n if n == attacks.len() => {
                                assert!(table_bomb
                                    .run(Input::Text("x".into()), &Limits::default())
                                    .is_err())
                            }
                            n if n == attacks.len() + 1 => {
                                assert!(div_zero
                                    .run(Input::Text("x".into()), &Limits::default())
                                    .is_err())
                            }
                            n => {
                                let (command, limits) = &attacks[n];
                                let _ = hostile().run(Input::Text(command.to_string()), limits);
                            }
                        }
                        bad += 1;
                    }
                    (good, bad)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("no soak thread may panic"))
            .fold((0, 0), |acc, (g, b)| (acc.0 + g, acc.1 + b))
    });
    let elapsed = started.elapsed();

    let rss_untrimmed = status_field("VmRSS:");
    let rss_end = trimmed_rss();
    let rss_peak = status_field("VmHWM:");
    let fds_end = open_fds();
    println!(
        "soak: {} runs ({good_runs} good, {bad_runs} hostile) on {THREADS} threads in {:.1} s; \
         RSS start {} MiB, peak {} MiB, end {} MiB ({} MiB before malloc_trim); open fds \
         {fds_start} -> {fds_end}",
        good_runs + bad_runs,
        elapsed.as_secs_f64(),
        rss_start >> 20,
        rss_peak >> 20,
        rss_end >> 20,
        rss_untrimmed >> 20,
    );
    assert_eq!(good_runs + bad_runs, THREADS * RUNS_PER_THREAD);
    assert!(
        rss_end <= rss_start + RSS_MARGIN,
        "resident memory grew from {rss_start} to {rss_end} bytes"
    );
    assert_eq!(fds_end, fds_start, "file descriptors leaked");

    // The cache is as it was, and a fresh load from it gives the reference result.
    assert_eq!(cache_listing(), cache_before);
    let reloaded = Model::load(runtime(), support::minilm_wasm()).unwrap();
    assert_eq!(reloaded.load_report().code, CodeSource::Cached);
    let again = reloaded.run(good_input, &Limits::default()).unwrap();
    assert_eq!(bits(&again.output), bits(&reference.output));
    assert_eq!(again.usage.fuel_consumed, reference.usage.fuel_consumed);
}
