//! Runs in supervised, locked-down worker processes: a dead worker costs only its request, a
//! forbidden system call kills a worker, workers are recycled, and runs in them give the same
//! outputs and fuel as in-process runs.

mod support;

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use support::{assert_golden, case, cosine, hostile_wasm, minilm_wasm, text};
use wasm_infer::worker::cgroup::{Cgroup, CgroupLimits, CgroupRoot};
use wasm_infer::worker::{WorkerAffinity, WorkerPool, WorkerPoolConfig};
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
    for call in [
        "open",
        "socket",
        "execve",
        "fork",
        "ioctl",
        "mmap_exec",
        "mprotect_exec",
    ] {
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
    // The replacement starts in the background, after the lost request was answered.
    let started = Instant::now();
    while pool.idle_pids().len() < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no replacement"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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

/// One worker, runs of two tenants: with `WorkerAffinity::Tenant` no worker process runs a
/// second tenant's request (a switch kills the worker and a fresh one takes the request; the
/// same tenant again reuses its worker), with `Shared` the one worker serves both; either way
/// every answer is the reference embedding with its golden fuel.
#[test]
fn with_tenant_affinity_no_worker_serves_two_tenants_and_shared_workers_serve_both() {
    let short = case("short_bench");
    let tenants = ["a", "b", "a", "a", "b"];
    for affinity in [WorkerAffinity::Tenant, WorkerAffinity::Shared] {
        let mut config = config(1);
        config.affinity = affinity;
        let pool = WorkerPool::start(config).unwrap();
        let first = pool.idle_pids()[0];
        let mut served = Vec::new();
        for tenant in tenants {
            let outcome = pool
                .run_for_tenant_blocking(
                    tenant,
                    1,
                    Input::Text(short.text.clone()),
                    &Limits::default(),
                )
                .unwrap();
            let vector = &outcome.output.embeddings().unwrap()[0];
            assert!(cosine(vector, &short.embedding) >= 0.9999, "{affinity:?}");
            assert_golden("minilm_short_bench", outcome.usage.fuel_consumed);
            // One worker: the one idle now is the one that ran the request.
            let idle = pool.idle_tenants();
            assert_eq!(idle.len(), 1, "{affinity:?}: {idle:?}");
            let (pid, bound) = idle[0].clone();
            let expected = (affinity == WorkerAffinity::Tenant).then(|| tenant.to_string());
            assert_eq!(bound, expected, "{affinity:?}");
            served.push(pid);
        }
        let stats = pool.stats();
        match affinity {
            WorkerAffinity::Tenant => {
                // a (the first worker), b (a fresh one), a (fresh), a (the same), b (fresh).
                let [p1, p2, p3, p4, p5] = served[..] else {
                    unreachable!()
                };
                assert_eq!(p1, first);
                assert_eq!(p4, p3);
                let distinct: std::collections::BTreeSet<u32> = [p1, p2, p3, p5].into();
                assert_eq!(distinct.len(), 4, "{served:?}");
                // The worker a tenant switch replaced is gone, not parked.
                assert!(!std::path::Path::new(&format!("/proc/{p1}")).exists());
                assert_eq!(stats.recycled_tenant, 3);
                assert_eq!(stats.recycled, 3);
                assert_eq!(stats.started, 4);
                // A run for no tenant (a readiness probe) takes the idle worker and binds
                // nothing new: no recycle, the worker still `b`'s.
                pool.run_blocking(0, text("work:1000"), &Limits::default())
                    .unwrap();
                assert_eq!(pool.idle_tenants(), vec![(p5, Some("b".to_string()))]);
                assert_eq!(pool.stats().recycled, 3);
                assert_eq!(pool.stats().started, 4);
            }
            WorkerAffinity::Shared => {
                assert_eq!(served, vec![first; tenants.len()]);
                assert_eq!(stats.recycled, 0);
                assert_eq!(stats.started, 1);
            }
        }
        assert_eq!(stats.lost, 0);
    }
}

/// A scratch directory laid out as a cgroup hierarchy by the test, removed on drop.
struct FakeHierarchy(PathBuf);

impl FakeHierarchy {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "wasm-infer-fake-cgroup-{tag}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn put(&self, file: &str, text: &str) {
        let path = self.0.join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.0.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
    }

    fn root(&self, proc_self_cgroup: &str) -> CgroupRoot {
        CgroupRoot {
            mount: self.0.clone(),
            proc_self_cgroup: proc_self_cgroup.to_string(),
        }
    }
}

impl Drop for FakeHierarchy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The cgroup v2 branch, against a directory laid out as a unified hierarchy (these machines
/// are v1): the controllers the parent offers but does not pass down are enabled in its
/// `cgroup.subtree_control` in one write, the limits land in `memory.max`, `memory.swap.max`,
/// `pids.max` and `cpu.max` with exact contents, a child placed before exec writes `0` (itself)
/// to `cgroup.procs`, and a parent that offers no memory controller is refused with the reason.
/// What the kernel does with these writes is not tested here (docs/security.md).
#[test]
fn the_cgroup_v2_files_hold_the_exact_limits_in_a_v2_layout() {
    let fake = FakeHierarchy::new("v2");
    fake.put(
        "cgroup.controllers",
        "cpuset cpu io memory hugetlb pids rdma misc\n",
    );
    fake.put("svc/cgroup.controllers", "cpu memory pids\n");
    fake.put("svc/cgroup.subtree_control", "\n");
    // The kernel makes a group's interface files at mkdir; the fake has them made first.
    fake.put("svc/g1/cgroup.procs", "");
    let limits = CgroupLimits {
        memory: 3 << 30,
        cpus: Some(1.5),
        pids: Some(77),
    };
    let root = fake.root("0::/svc\n");
    let group = Cgroup::create_at(&root, "g1", &limits).unwrap();
    assert_eq!(group.dirs(), [fake.0.join("svc/g1")]);
    assert_eq!(
        fake.read("svc/cgroup.subtree_control"),
        "+memory +pids +cpu"
    );
    assert_eq!(fake.read("svc/g1/memory.max"), "3221225472");
    assert_eq!(fake.read("svc/g1/memory.swap.max"), "0");
    assert_eq!(fake.read("svc/g1/pids.max"), "77");
    assert_eq!(fake.read("svc/g1/cpu.max"), "150000 100000");
    let mut child = Command::new("true");
    group.place_before_exec(&mut child);
    assert!(child.status().unwrap().success());
    assert_eq!(fake.read("svc/g1/cgroup.procs"), "0");
    fake.put(
        "svc/g1/memory.events",
        "low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\n",
    );
    assert_eq!(group.oom_kills(), Some(2));
    drop(group);

    // Controllers already passed down are not written again; one not offered (cpu) is left
    // out, with a warning, and its file not made.
    fake.put("svc/cgroup.controllers", "memory pids\n");
    fake.put("svc/cgroup.subtree_control", "memory pids\n");
    fake.put("svc/g2/cgroup.procs", "");
    let group = Cgroup::create_at(&root, "g2", &limits).unwrap();
    assert_eq!(fake.read("svc/cgroup.subtree_control"), "memory pids\n");
    assert_eq!(fake.read("svc/g2/memory.max"), "3221225472");
    assert_eq!(fake.read("svc/g2/pids.max"), "77");
    assert!(!fake.0.join("svc/g2/cpu.max").exists());
    drop(group);

    // No memory controller to pass down: no group, and why.
    fake.put("svc/cgroup.controllers", "cpu pids\n");
    fake.put("svc/cgroup.subtree_control", "\n");
    let error = Cgroup::create_at(&root, "g3", &limits).unwrap_err();
    assert_eq!(
        error,
        format!(
            "{} offers no memory controller (its cgroup.controllers: \"cpu pids\"): this \
             subtree is not delegated with it",
            fake.0.join("svc").display()
        )
    );
    assert!(!fake.0.join("svc/g3").exists());
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Groups made three times where swap accounting and the pids hierarchy are missing (a fake
/// v1 layout with only `memory`): each missing piece is said once, not once per group (the
/// load children make a group per model loaded).
#[test]
fn a_missing_swap_limit_or_pids_controller_is_warned_once_per_process() {
    let fake = FakeHierarchy::new("v1");
    fake.put("memory/svc/memory.limit_in_bytes", "9223372036854771712\n");
    let root = fake.root("5:memory:/svc\n0::/\n");
    let limits = CgroupLimits {
        memory: 1 << 30,
        cpus: None,
        pids: Some(40),
    };
    let log = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer({
            let log = log.clone();
            move || log.clone()
        })
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        for name in ["g1", "g2", "g3"] {
            fake.put(&format!("memory/svc/{name}/cgroup.procs"), "");
            let group = Cgroup::create_at(&root, name, &limits).unwrap();
            assert_eq!(
                fake.read(&format!("memory/svc/{name}/memory.limit_in_bytes")),
                "1073741824"
            );
            drop(group);
        }
    });
    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    let count = |needle: &str| text.lines().filter(|l| l.contains(needle)).count();
    assert_eq!(count("the workers' swap is not limited"), 1, "{text}");
    assert_eq!(
        count("workers run without a pids cap: no cgroup v1 pids hierarchy"),
        1,
        "{text}"
    );
}

/// Whether this process may make cgroups here (root, as on these machines and in CI); where
/// it may not, the pool says why and runs on rlimits, and the cgroup tests say so and stop.
fn may_make_cgroups() -> bool {
    // SAFETY: geteuid has no failure mode.
    let root = unsafe { libc::geteuid() } == 0;
    root && std::path::Path::new("/sys/fs/cgroup").is_dir()
}

/// The hierarchy a cgroup directory belongs to and its path within it, as `/proc/PID/cgroup`
/// names it: `/sys/fs/cgroup/memory/a/b` → (`memory`, `/a/b`).
fn hierarchy_and_path(dir: &std::path::Path) -> (String, String) {
    let rest = dir.strip_prefix("/sys/fs/cgroup").unwrap();
    let mut parts = rest.components();
    let controller = parts
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy()
        .to_string();
    (controller, format!("/{}", parts.as_path().display()))
}

#[test]
fn the_default_pool_config_asks_for_a_cgroup_with_memory_and_pids_per_worker() {
    let config = WorkerPoolConfig::new(3, binary(), vec![hostile_wasm()]);
    let threads = candle_core::utils::get_num_threads() as u64;
    // Per worker: the default 1 GiB guest ceiling, the default 2 GiB device budget and
    // 512 MiB for the runtime; candle's threads and 16.
    assert_eq!(
        config.cgroup,
        Some(CgroupLimits {
            memory: 3 * (3584 << 20),
            cpus: None,
            pids: Some(3 * (threads + 16)),
        })
    );
}

#[test]
fn a_worker_is_in_its_cgroup_from_its_first_instruction() {
    // The probe (a directory in `CGROUP_PROBE_VAR`) makes each worker copy its
    // `/proc/self/cgroup` there as the first thing it does; it runs in a child test process
    // so that no other test's workers see it.
    let dir = support::target_dir().join(format!("cgroup-probe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "probe_pool_cgroup", "--ignored", "--nocapture"])
        .env(wasm_infer::worker::CGROUP_PROBE_VAR, &dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("1 passed"), "{stdout}");
    if may_make_cgroups() {
        // Two workers and the one that replaced a recycled worker (load children, if the
        // pool compiled anything, write `load-<pid>` probes of their own).
        let workers = std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| {
                !e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("load-")
            })
            .count();
        assert_eq!(workers, 3, "{stdout}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "run by a_worker_is_in_its_cgroup_from_its_first_instruction, probe armed"]
fn probe_pool_cgroup() {
    let Some(probes) = std::env::var_os(wasm_infer::worker::CGROUP_PROBE_VAR) else {
        return;
    };
    let probes = PathBuf::from(probes);
    let mut config = config(2);
    config.recycle_after_runs = Some(1);
    config.cgroup = Some(CgroupLimits {
        memory: 3 << 30,
        cpus: None,
        pids: Some(77),
    });
    let pool = WorkerPool::start(config).unwrap();
    let dirs = match pool.cgroup() {
        Ok(dirs) => dirs.to_vec(),
        Err(why) => {
            assert!(!may_make_cgroups(), "no cgroup as root: {why}");
            eprintln!("no cgroup here: {why}");
            return;
        }
    };
    let read = |dir: &PathBuf, file: &str| {
        std::fs::read_to_string(dir.join(file))
            .unwrap_or_else(|e| panic!("{}/{file}: {e}", dir.display()))
            .trim()
            .to_string()
    };
    let by_controller = |name: &str| {
        dirs.iter()
            .find(|d| hierarchy_and_path(d).0 == name)
            .unwrap_or_else(|| panic!("no {name} group in {dirs:?}"))
    };
    // v1 here (a directory per hierarchy); v2 has one directory with every controller.
    let v2 = dirs.len() == 1 && dirs[0].join("memory.max").exists();
    // The limit files hold the configured figures (v1: memory and swap together in memsw;
    // v2: memory.max and memory.swap.max 0).
    if v2 {
        assert_eq!(read(&dirs[0], "memory.max"), (3u64 << 30).to_string());
        assert_eq!(read(&dirs[0], "memory.swap.max"), "0");
        assert_eq!(read(&dirs[0], "pids.max"), "77");
    } else {
        let memory = by_controller("memory");
        assert_eq!(
            read(memory, "memory.limit_in_bytes"),
            (3u64 << 30).to_string()
        );
        assert_eq!(
            read(memory, "memory.memsw.limit_in_bytes"),
            (3u64 << 30).to_string()
        );
        assert_eq!(read(by_controller("pids"), "pids.max"), "77");
    }
    // What each worker saw of itself at its first instruction: every hierarchy of the group.
    let check = |pid: u32| {
        let probe = std::fs::read_to_string(probes.join(pid.to_string()))
            .unwrap_or_else(|e| panic!("no probe from worker {pid}: {e}"));
        for dir in &dirs {
            let (controller, expected) = if v2 {
                let path = dir.strip_prefix("/sys/fs/cgroup").unwrap();
                (String::new(), format!("/{}", path.display()))
            } else {
                hierarchy_and_path(dir)
            };
            let seen = probe
                .lines()
                .find_map(|l| {
                    let mut parts = l.splitn(3, ':');
                    let controllers = parts.nth(1)?;
                    let matches = if v2 {
                        controllers.is_empty()
                    } else {
                        controllers.split(',').any(|c| c == controller)
                    };
                    matches.then(|| parts.next().unwrap_or("").to_string())
                })
                .unwrap_or_else(|| panic!("no {controller} line in {probe}"));
            assert_eq!(seen, expected, "worker {pid}, {controller}");
        }
    };
    let mut first: Vec<u32> = pool.idle_pids();
    first.sort();
    assert_eq!(first.len(), 2);
    first.iter().copied().for_each(check);
    let mut procs: Vec<u32> = read(
        if v2 {
            &dirs[0]
        } else {
            by_controller("memory")
        },
        "cgroup.procs",
    )
    .lines()
    .map(|l| l.parse().unwrap())
    .collect();
    procs.sort();
    assert_eq!(procs, first);
    // A worker started later (the replacement of one recycled after its run) joins the same way.
    let outcome = pool
        .run_blocking(0, text("work:1000"), &Limits::default())
        .unwrap();
    assert_golden("hostile_work_1000", outcome.usage.fuel_consumed);
    let started = Instant::now();
    let replacement = loop {
        let idle = pool.idle_pids();
        if let Some(&pid) = idle.iter().find(|p| !first.contains(p)) {
            break pid;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no replacement"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    check(replacement);
    assert_eq!(pool.stats().recycled, 1);
    // The group goes with the pool.
    drop(pool);
    for dir in &dirs {
        assert!(!dir.exists(), "{} is left", dir.display());
    }
}

#[test]
fn a_pool_removes_the_empty_groups_of_processes_that_are_gone() {
    // A server killed with SIGKILL leaves its (empty) group behind; the next pool removes it,
    // and leaves a living process's group alone.
    let mut gone = Command::new("true").spawn().unwrap();
    let gone_pid = gone.id();
    gone.wait().unwrap();
    let first = WorkerPool::start(config(1)).unwrap();
    let Ok(dirs) = first.cgroup() else {
        assert!(!may_make_cgroups(), "no cgroup as root");
        return;
    };
    let parents: Vec<PathBuf> = dirs
        .iter()
        .map(|d| d.parent().unwrap().to_path_buf())
        .collect();
    drop(first);
    let stale: Vec<PathBuf> = parents
        .iter()
        .map(|p| p.join(format!("wasm-infer-workers-{gone_pid}-0")))
        .collect();
    let living: Vec<PathBuf> = parents
        .iter()
        .map(|p| p.join(format!("wasm-infer-workers-{}-999999", std::process::id())))
        .collect();
    for dir in stale.iter().chain(&living) {
        std::fs::create_dir(dir).unwrap();
    }
    let pool = WorkerPool::start(config(1)).unwrap();
    for dir in &stale {
        assert!(!dir.exists(), "{} is left", dir.display());
    }
    for dir in &living {
        assert!(dir.exists(), "{} was removed", dir.display());
        std::fs::remove_dir(dir).unwrap();
    }
    drop(pool);
}

#[test]
fn a_worker_past_its_cgroup_memory_ceiling_is_killed_and_only_its_request_lost() {
    let mut config = config(1);
    config.models = vec![hostile_wasm()];
    config.cgroup = Some(CgroupLimits {
        memory: 192 << 20,
        cpus: None,
        pids: Some(64),
    });
    let pool = WorkerPool::start(config).unwrap();
    let Ok(dirs) = pool.cgroup() else {
        assert!(!may_make_cgroups(), "no cgroup as root");
        return;
    };
    let memory = dirs
        .iter()
        .find(|d| d.join("memory.limit_in_bytes").exists() || d.join("memory.max").exists())
        .unwrap()
        .clone();
    // The guest may grow to 1 GiB by its own limit; the group stops the process at 192 MiB.
    let lost = pool
        .run_blocking(0, text("grow"), &Limits::default().memory(1 << 30))
        .unwrap_err();
    match &lost.error {
        Error::WorkerLost { reason } => assert!(reason.ends_with("signal 9"), "{reason}"),
        other => panic!("expected WorkerLost, got {other}"),
    }
    let oom = std::fs::read_to_string(memory.join("memory.oom_control"))
        .or_else(|_| std::fs::read_to_string(memory.join("memory.events")))
        .unwrap();
    let kills: u64 = oom
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(kills, 1, "{oom}");
    // Its replacement, in the same group, serves the next request.
    let started = Instant::now();
    let next = loop {
        match pool.run_blocking(0, text("work:1000"), &Limits::default()) {
            Ok(outcome) => break outcome,
            Err(e) => {
                assert!(started.elapsed() < Duration::from_secs(60), "{}", e.error);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    assert_golden("hostile_work_1000", next.usage.fuel_consumed);
    assert_eq!(pool.stats().lost, 1);
}

/// The state letter of process `pid` (`S` sleeping in a system call, `T` stopped, ...).
fn state(pid: u32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit_once(") ").unwrap().1.chars().next().unwrap()
}

/// Waits (polling /proc, without a fixed sleep) until `pid` is in `wanted`.
fn wait_for_state(pid: u32, wanted: char) {
    let started = Instant::now();
    while state(pid) != wanted {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{pid} never reached state {wanted}"
        );
        std::thread::yield_now();
    }
}

fn signal(pid: u32, signal: i32) {
    // SAFETY: sending a signal to a child process of this test.
    assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0);
}

#[test]
fn a_locked_process_cannot_signal_another_process() {
    let mut victim = Command::new("sleep").arg("60").spawn().unwrap();
    let status = Command::new(binary())
        .args(["__lockdown-selftest", &format!("tgkill:{}", victim.id())])
        .status()
        .unwrap();
    let victim_alive = victim.try_wait().unwrap().is_none();
    let _ = victim.kill();
    let _ = victim.wait();
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status}");
    assert!(victim_alive, "the locked process killed another process");
}

#[test]
fn a_locked_process_cannot_undo_its_lock_down_or_arrange_signals() {
    // `PR_SET_DUMPABLE 1` would make it ptrace-able and its memory readable again;
    // `F_SETOWN` (then `O_ASYNC`) would have the kernel signal a process of its choosing.
    for call in ["dumpable", "setown"] {
        let status = Command::new(binary())
            .args(["__lockdown-selftest", call])
            .status()
            .unwrap();
        assert_eq!(status.signal(), Some(libc::SIGSYS), "{call}: {status}");
    }
}

#[test]
fn a_locked_process_stopped_and_continued_in_a_sleep_lives_on() {
    // What `docker pause` or the cgroup freezer does to a worker: the interrupted sleep is
    // resumed through `restart_syscall`.
    let mut child = Command::new(binary())
        .args(["__lockdown-selftest", "pause"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line, "locked\n");
    let pid = child.id();
    wait_for_state(pid, 'S');
    signal(pid, libc::SIGSTOP);
    wait_for_state(pid, 'T');
    signal(pid, libc::SIGCONT);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status}");
}

#[test]
fn an_idle_worker_stopped_and_continued_serves_its_next_request() {
    let pool = WorkerPool::start(config(1)).unwrap();
    let pid = pool.idle_pids()[0];
    signal(pid, libc::SIGSTOP);
    wait_for_state(pid, 'T');
    signal(pid, libc::SIGCONT);
    let outcome = pool
        .run_blocking(0, text("work:1000"), &Limits::default())
        .unwrap();
    assert_golden("hostile_work_1000", outcome.usage.fuel_consumed);
    assert_eq!(pool.idle_pids(), vec![pid]);
    assert_eq!(pool.stats().lost, 0);
}

#[test]
fn a_worker_sees_only_the_environment_it_is_given() {
    // A secret in the supervisor's environment (an API key, a database URL) is not the
    // worker's to read.
    std::env::set_var("WASM_INFER_TEST_SECRET", "hunter2");
    let pool = WorkerPool::start(config(1)).unwrap();
    let pid = pool.idle_pids()[0];
    let names = support::environ_names(format!("/proc/{pid}/environ"));
    assert_eq!(names, ["RAYON_NUM_THREADS"]);
}

/// A field of /proc/PID/status, e.g. `CapEff`.
fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap();
    line.split_whitespace().nth(1).unwrap().to_string()
}

#[test]
fn a_worker_holds_no_capabilities_and_may_start_no_process() {
    let pool = WorkerPool::start(config(1)).unwrap();
    let pid = pool.idle_pids()[0];
    for field in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(pid, field), "0000000000000000", "{field}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let nproc = limits
        .lines()
        .find(|l| l.starts_with("Max processes"))
        .unwrap();
    let figures: Vec<&str> = nproc.split_whitespace().skip(2).take(2).collect();
    assert_eq!(figures, ["0", "0"], "{nproc}");
    // Still a working worker.
    let outcome = pool
        .run_blocking(0, text("work:1000"), &Limits::default())
        .unwrap();
    assert_golden("hostile_work_1000", outcome.usage.fuel_consumed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_never_answers_is_killed_at_its_deadline() {
    let pool = WorkerPool::start(config(1)).unwrap();
    let pid = pool.idle_pids()[0];
    // A stopped worker reads nothing and answers nothing, as a wedged or hostile one would.
    signal(pid, libc::SIGSTOP);
    wait_for_state(pid, 'T');
    let wall_time = Duration::from_secs(1);
    let limits = Limits::default().wall_time(wall_time);
    let started = Instant::now();
    let answer = tokio::time::timeout(
        Duration::from_secs(60),
        pool.run(0, text("work:1000"), &limits),
    )
    .await;
    let elapsed = started.elapsed();
    let Ok(answer) = answer else {
        signal(pid, libc::SIGKILL);
        panic!("no answer after {elapsed:?}: the supervisor waits forever");
    };
    let lost = answer.unwrap_err();
    match &lost.error {
        Error::WorkerLost { reason } => assert!(reason.contains("no answer"), "{reason}"),
        other => panic!("expected WorkerLost, got {other}"),
    }
    let deadline = wall_time + wasm_infer::worker::EXCHANGE_MARGIN;
    assert!(
        elapsed >= deadline && elapsed < deadline + Duration::from_secs(5),
        "{elapsed:?} for a deadline of {deadline:?}"
    );
    assert_eq!(state_or_gone(pid), None, "the wedged worker was not killed");
    assert_eq!(pool.stats().lost, 1);
    let next = pool
        .run(0, text("work:1000"), &Limits::default())
        .await
        .unwrap();
    assert_golden("hostile_work_1000", next.usage.fuel_consumed);
}

/// The state of `pid`, or `None` once it is gone (reaped, or a zombie).
fn state_or_gone(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let state = stat.rsplit_once(") ")?.1.chars().next()?;
    (state != 'Z').then_some(state)
}

#[test]
fn a_worker_whose_guest_trapped_is_replaced() {
    let pool = WorkerPool::start(config(1)).unwrap();
    let first = pool.idle_pids()[0];
    let failure = pool
        .run_blocking(0, text("panic"), &Limits::default())
        .unwrap_err();
    assert!(
        matches!(failure.error, Error::Trap { .. }),
        "{}",
        failure.error
    );
    assert_eq!(pool.stats().recycled, 1);
    // The replacement starts in the background, after the trapped request was answered.
    let started = Instant::now();
    while pool.idle_pids().is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no replacement"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_ne!(pool.idle_pids(), vec![first]);
    // A fuel trip is a run ending as designed: its worker stays.
    let second = pool.idle_pids()[0];
    let _ = pool
        .run_blocking(0, text("spin"), &Limits::default().fuel(1_000_000))
        .unwrap_err();
    assert_eq!(pool.idle_pids(), vec![second]);
    assert_eq!(pool.stats().recycled, 1);
}

#[test]
fn a_run_worker_is_locked_down_before_its_first_guest_instruction() {
    // Each drill runs `drill_pool_start` in a child test process with the drill armed (the
    // variable reaches that process's workers, never this one's other tests' workers). In
    // the worker it fires right after the lock-down, where the models' first guest code (their
    // `info`) would run, standing in for that code escaped: an `openat` and the rest must kill.
    // `mmap_exec`/`mprotect_exec`: no new executable memory once the code is linked.
    for call in [
        "open",
        "socket",
        "execve",
        "fork",
        "dumpable",
        "setown",
        "mmap_exec",
        "mprotect_exec",
    ] {
        let output = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "drill_pool_start", "--ignored", "--nocapture"])
            .env(wasm_infer::worker::ESCAPE_VAR, format!("run:{call}"))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{call}: {stdout}");
        assert!(stdout.contains("1 passed"), "{call}: {stdout}");
    }
}

#[test]
#[ignore = "run by a_run_worker_is_locked_down_before_its_first_guest_instruction, drill armed"]
fn drill_pool_start() {
    let Ok(drill) = std::env::var(wasm_infer::worker::ESCAPE_VAR) else {
        return;
    };
    let error = WorkerPool::start(config(1)).unwrap_err();
    let message = error.to_string();
    assert!(
        message.starts_with("internal error: a worker could not start: worker ")
            && message.ends_with(" killed by signal 31"),
        "{drill}: {message}"
    );
}

#[test]
fn a_tampered_cache_entry_reaches_no_worker_and_is_refused_at_the_next_start() {
    let dir = support::target_dir().join(format!("workers-tamper-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut config = WorkerPoolConfig::new(1, binary(), vec![hostile_wasm()]);
    config.cache_dir = Some(dir.clone());
    config.accel = wasm_infer::AccelMode::Cpu;
    // Every run in a fresh worker: the second run below is a replacement's first.
    config.recycle_after_runs = Some(1);
    let pool = WorkerPool::start(config.clone()).unwrap();
    let entries = support::cache_entries(&dir);
    assert_eq!(entries.len(), 1);
    support::flip_middle_byte(&entries[0]);
    let echo = |pool: &WorkerPool, said: &str| {
        let outcome = pool
            .run_blocking(0, text(&format!("echo:{said}")), &Limits::default())
            .unwrap();
        assert_eq!(outcome.output, wasm_infer::Output::Text(said.into()));
    };
    // The running worker holds its own copy of the code, not the file.
    echo(&pool, "running");
    // Its replacement gets the code the parent verified at start.
    echo(&pool, "replacement");
    assert_eq!(pool.stats().recycled, 2);
    // A new pool's parent reads the entry again: refused, naming the cache, removed.
    let error = WorkerPool::start(config.clone()).unwrap_err();
    support::assert_cache_refusal(&error, &dir, &entries[0]);
    assert!(!entries[0].exists(), "the tampered entry was kept");
    // The next start compiles it again.
    let pool = WorkerPool::start(config).unwrap();
    echo(&pool, "recompiled");
    assert!(entries[0].exists());
    drop(pool);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(wasm_infer::cache::key_path(&dir));
}

/// The compiled-cache entries in `dir`, by name.
fn entries(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn fuel_metering_off_reaches_the_workers() {
    let runtime = wasm_infer::Runtime::with_config(wasm_infer::RuntimeConfig {
        meter_fuel: false,
        cache_dir: Some(support::cache_dir()),
        ..wasm_infer::RuntimeConfig::default()
    })
    .unwrap();
    Model::load(&runtime, hostile_wasm()).unwrap();
    let mut unmetered = WorkerPoolConfig::new(1, binary(), vec![hostile_wasm()]);
    unmetered.cache_dir = Some(support::cache_dir());
    unmetered.engine = runtime.config().engine_settings();
    let pool = WorkerPool::start(unmetered).unwrap();
    let limits = Limits {
        fuel: None,
        ..Limits::default()
    };
    // Metered, this run consumes the golden 21723 units (see
    // `runs_in_locked_down_workers_give_the_in_process_outputs_and_fuel`).
    let outcome = pool.run_blocking(0, text("work:1000"), &limits).unwrap();
    assert_eq!(outcome.usage.fuel_consumed, 0);
    // A fuel cap needs metering: the worker refuses it as this process's runtime would.
    let capped = pool
        .run_blocking(0, text("work:1000"), &Limits::default().fuel(1_000_000))
        .unwrap_err();
    let here = Model::load(&runtime, hostile_wasm())
        .unwrap()
        .run(text("work:1000"), &Limits::default().fuel(1_000_000))
        .unwrap_err();
    // (The worker's usage error crosses as an internal one carrying its message.)
    assert!(
        capped.error.to_string().contains(&here.error.to_string()),
        "{} / {}",
        capped.error,
        here.error
    );
}

#[test]
fn baseline_cpu_features_reach_the_workers() {
    // A cache of its own: the parent compiles the hostile guest for the baseline into it;
    // workers whose engine asked for the host's features would miss that entry, compile
    // their own and store it beside.
    let dir =
        std::env::temp_dir().join(format!("wasm-infer-baseline-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let runtime = wasm_infer::Runtime::with_config(wasm_infer::RuntimeConfig {
        cpu_features: wasm_infer::CpuFeatures::Baseline,
        cache_dir: Some(dir.clone()),
        ..wasm_infer::RuntimeConfig::default()
    })
    .unwrap();
    Model::load(&runtime, hostile_wasm()).unwrap();
    let compiled = entries(&dir);
    assert!(!compiled.is_empty());
    let mut baseline = WorkerPoolConfig::new(1, binary(), vec![hostile_wasm()]);
    baseline.cache_dir = Some(dir.clone());
    baseline.engine = runtime.config().engine_settings();
    let pool = WorkerPool::start(baseline).unwrap();
    let outcome = pool
        .run_blocking(0, text("work:1000"), &Limits::default())
        .unwrap();
    assert_golden("hostile_work_1000", outcome.usage.fuel_consumed);
    assert_eq!(
        entries(&dir),
        compiled,
        "the worker loaded the parent's entry"
    );
    drop(pool);
    // The control: a worker with the host's features does add its own entry.
    let mut host = WorkerPoolConfig::new(1, binary(), vec![hostile_wasm()]);
    host.cache_dir = Some(dir.clone());
    drop(WorkerPool::start(host).unwrap());
    assert!(entries(&dir).len() > compiled.len(), "{:?}", entries(&dir));
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(wasm_infer::cache::key_path(&dir));
}
