//! Runs in supervised, locked-down worker processes: a dead worker costs only its request, a
//! forbidden system call kills a worker, workers are recycled, and runs in them give the same
//! outputs and fuel as in-process runs.

mod support;

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use support::{assert_golden, case, cosine, hostile_wasm, minilm_wasm, text};
use wasm_infer::worker::cgroup::CgroupLimits;
use wasm_infer::worker::{WorkerPool, WorkerPoolConfig};
use wasm_infer::{Error, Input, Limits, Model};

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_wasm-infer"))
}

/// A pool over the hostile guest (model 0) and MiniLM (model 1), compiled into the test
/// cache first so that workers start from it.
fn config(workers: u32) -> WorkerPoolConfig {
    Model::load(support::runtime(), hostile_wasm()).unwrap();
    Model::load(support::runtime(), minilm_wasm()).unwrap();
    let mut config = WorkerPoolConfig::new(workers, binary(), vec![hostile_wasm(), minilm_wasm()]);
    config.cache_dir = Some(support::cache_dir());
    config.accel = wasm_infer::AccelMode::Cpu;
    config
}

#[test]
fn forbidden_system_calls_kill_a_locked_down_process() {
    for call in ["open", "socket", "execve", "fork"] {
        let status = Command::new(binary())
            .args(["__lockdown-selftest", call])
            .status()
            .unwrap();
        assert_eq!(status.signal(), Some(libc::SIGSYS), "{call}: {status}");
    }
    // The control: locked down, but making no forbidden call, the process exits normally.
    let status = Command::new(binary())
        .args(["__lockdown-selftest", "none"])
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(0), "{status}");
}

#[test]
fn a_hidden_device_stays_hidden_in_a_worker_process() {
    let pool = WorkerPool::start(config(1)).unwrap();
    let offered = Limits::default().device_memory(3 << 20);
    let run = |limits: &Limits| {
        let outcome = pool.run_blocking(0, text("accel-info"), limits).unwrap();
        match outcome.output {
            wasm_infer::Output::Text(text) => text,
            other => panic!("expected text, got {other:?}"),
        }
    };
    assert_eq!(
        run(&offered.clone().hide_device()),
        "kind=DeviceKind::None budget=0 used=0"
    );
    assert_eq!(run(&offered), "kind=DeviceKind::Cpu budget=3145728 used=0");
}

#[test]
fn runs_in_locked_down_workers_give_the_in_process_outputs_and_fuel() {
    let pool = WorkerPool::start(config(1)).unwrap();
    let work = pool
        .run_blocking(0, text("work:1000"), &Limits::default())
        .unwrap();
    assert_golden("hostile_work_1000", work.usage.fuel_consumed);
    let short = case("short_bench");
    let embedded = pool
        .run_blocking(1, Input::Text(short.text), &Limits::default())
        .unwrap();
    assert!(cosine(&embedded.output.embeddings().unwrap()[0], &short.embedding) >= 0.9999);
    assert_golden("minilm_short_bench", embedded.usage.fuel_consumed);
    // Limit trips come back typed.
    let failure = pool
        .run_blocking(0, text("spin"), &Limits::default().fuel(1_000_000))
        .unwrap_err();
    assert!(matches!(
        failure.error,
        Error::Limit(wasm_infer::LimitExceeded::Fuel {
            limit: 1_000_000,
            ..
        })
    ));
    assert_eq!(pool.stats().lost, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_costs_only_its_request_and_is_replaced() {
    let pool = WorkerPool::start(config(3)).unwrap();
    // One request that holds its worker (blocked in a host call for up to 60 s)...
    let sleeper = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let limits = Limits::default().wall_time(Duration::from_secs(60));
            pool.run(0, text("sleep"), &limits).await
        })
    };
    let started = Instant::now();
    let victim = loop {
        if let Some(&pid) = pool.busy_pids().first() {
            break pid;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the request never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // ... and 20 others on the remaining workers while it is killed.
    let others: Vec<_> = (0..20)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.run(0, text("work:1000"), &Limits::default()).await })
        })
        .collect();
    // SAFETY: sending a signal to a child process of this test.
    assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0);
    let lost = sleeper.await.unwrap().unwrap_err();
    match &lost.error {
        Error::WorkerLost { reason } => assert!(reason.contains("signal 9"), "{reason}"),
        other => panic!("expected WorkerLost, got {other}"),
    }
    assert_eq!(lost.kind(), wasm_infer::ErrorKind::WorkerLost);
    for other in others {
        let outcome = other
            .await
            .unwrap()
            .expect("the other requests are unaffected");
        assert_golden("hostile_work_1000", outcome.usage.fuel_consumed);
    }
    assert_eq!(pool.stats().lost, 1);
    // The replacement serves the next request.
    let next = pool
        .run(0, text("work:1000"), &Limits::default())
        .await
        .unwrap();
    assert_golden("hostile_work_1000", next.usage.fuel_consumed);
    assert!(!pool.idle_pids().contains(&victim));
    assert_eq!(pool.stats().started, 4);
}

#[test]
fn a_worker_is_recycled_after_its_run_count_with_unchanged_results() {
    let mut config = config(1);
    config.recycle_after_runs = Some(3);
    let pool = WorkerPool::start(config).unwrap();
    let first_pid = pool.idle_pids()[0];
    let mut fuels = Vec::new();
    for _ in 0..4 {
        let outcome = pool
            .run_blocking(0, text("work:1000"), &Limits::default())
            .unwrap();
        fuels.push(outcome.usage.fuel_consumed);
    }
    assert_eq!(pool.stats().recycled, 1);
    assert_ne!(pool.idle_pids()[0], first_pid);
    assert!(fuels.iter().all(|&f| f == fuels[0]), "{fuels:?}");
    assert_golden("hostile_work_1000", fuels[3]);
}

#[test]
fn workers_join_a_cgroup_with_the_memory_ceiling_where_one_can_be_made() {
    let mut config = config(1);
    config.cgroup = Some(CgroupLimits {
        memory: 2 << 30,
        cpus: None,
        pids: None,
    });
    let pool = WorkerPool::start(config).unwrap();
    match pool.cgroup() {
        Ok(dirs) => {
            let memory = dirs
                .iter()
                .find(|d| d.join("memory.limit_in_bytes").exists() || d.join("memory.max").exists())
                .expect("a memory cgroup");
            let limit = std::fs::read_to_string(memory.join("memory.limit_in_bytes"))
                .or_else(|_| std::fs::read_to_string(memory.join("memory.max")))
                .unwrap();
            assert_eq!(limit.trim(), (2u64 << 30).to_string());
            let procs = std::fs::read_to_string(memory.join("cgroup.procs")).unwrap();
            let pid = pool.idle_pids()[0];
            assert!(
                procs.lines().any(|l| l.trim() == pid.to_string()),
                "{procs}"
            );
        }
        // Where cgroups cannot be managed, the pool says why and runs on rlimits.
        Err(why) => eprintln!("no cgroup here: {why}"),
    }
    let outcome = pool
        .run_blocking(0, text("work:1000"), &Limits::default())
        .unwrap();
    assert_golden("hostile_work_1000", outcome.usage.fuel_consumed);
}
