//! Putting worker processes in a cgroup with a memory ceiling (swap included), a pids cap and
//! an optional CPU quota, where this process may manage one: a cgroup v2 subtree delegated to
//! it, or the v1 `memory`, `pids` and `cpu` hierarchies (a directory below the cgroup this
//! process is in). Where it may not, [`Cgroup::create`] says why and the workers run with
//! their rlimits only. Nothing here needs root unless the machine's cgroups do.
//!
//! A worker is placed in the group between fork and exec ([`Cgroup::place_before_exec`]):
//! its first instruction already runs, and its first page is already charged, inside it.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Memory a worker is allowed beyond its guest's linear-memory ceiling and its device budget
/// in the default cgroup ceiling ([`CgroupLimits::for_workers`]): wasmtime's code and
/// instance, the runtime, the copies of inputs and outputs a run makes (at most 3 × the
/// output limit + 1 MiB, 49 MiB by default) and the allocator's slack.
pub const WORKER_MEMORY_OVERHEAD: u64 = 512 << 20;

/// Processes and threads a worker is allowed beyond candle's CPU threads in the default
/// pids cap: its main thread and the few a runtime starts (a locked worker starts none:
/// `RLIMIT_NPROC` 0).
pub const WORKER_EXTRA_PIDS: u64 = 16;

/// The limits of the workers' cgroup (all workers together).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CgroupLimits {
    /// Memory ceiling of all workers together, in bytes, swap included (v1
    /// `memory.memsw.limit_in_bytes` equal to `memory.limit_in_bytes`; v2 `memory.swap.max`
    /// 0).
    #[serde(with = "crate::units::serde::size")]
    pub memory: u64,
    /// CPU time per period: `cpus` CPUs' worth (1.0 = one core), or unlimited.
    pub cpus: Option<f64>,
    /// Most processes and threads.
    pub pids: Option<u64>,
}

impl CgroupLimits {
    /// The default group for `workers` workers: each may hold `guest_memory` (the runs'
    /// linear-memory ceiling), `device_memory` (its own device budget) and
    /// [`WORKER_MEMORY_OVERHEAD`], and run candle's CPU threads plus [`WORKER_EXTRA_PIDS`];
    /// no CPU quota (the pool's size already bounds the CPUs used).
    pub fn for_workers(workers: u32, guest_memory: u64, device_memory: u64) -> Self {
        let per_worker = guest_memory
            .saturating_add(device_memory)
            .saturating_add(WORKER_MEMORY_OVERHEAD);
        let threads = candle_core::utils::get_num_threads() as u64;
        Self {
            memory: per_worker.saturating_mul(u64::from(workers)),
            cpus: None,
            pids: Some(
                threads
                    .saturating_add(WORKER_EXTRA_PIDS)
                    .saturating_mul(u64::from(workers)),
            ),
        }
    }
}

/// A cgroup the workers are put in, in one or more hierarchies; removed when dropped (after
/// its processes have left).
#[derive(Debug)]
pub struct Cgroup {
    /// The directories, one per hierarchy (v1) or one (v2).
    dirs: Vec<PathBuf>,
    /// Each directory's `cgroup.procs`, open for writing (close-on-exec), for children to
    /// join between fork and exec.
    procs: Vec<OwnedFd>,
}

/// The CPU-quota period: 100 ms, the kernel's default.
const CPU_PERIOD: Duration = Duration::from_millis(100);

/// Where the cgroup hierarchies are mounted and where a process is in them: what
/// [`Cgroup::create_at`] works from. [`CgroupRoot::of_this_process`] is the real one; a test
/// may lay out a directory like either hierarchy and name it here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupRoot {
    /// The mount point: one unified hierarchy (v2, recognised by its `cgroup.controllers`)
    /// or a directory per v1 controller.
    pub mount: PathBuf,
    /// The process's cgroups, as `/proc/self/cgroup` lists them (`ID:CONTROLLERS:PATH` a
    /// line; v2's line is `0::PATH`).
    pub proc_self_cgroup: String,
}

impl CgroupRoot {
    /// `/sys/fs/cgroup` and this process's `/proc/self/cgroup`.
    pub fn of_this_process() -> Self {
        Self {
            mount: PathBuf::from("/sys/fs/cgroup"),
            proc_self_cgroup: std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default(),
        }
    }

    /// The process's path in the hierarchy of `controller` (`""`: the unified one).
    fn own_path(&self, controller: &str) -> Option<String> {
        own_path(&self.proc_self_cgroup, controller)
    }
}

/// Logs `message` unless a warning of this `kind` about this `place` was logged before by
/// this process: a missing controller is a fact of the machine, said once, not at every
/// group made (the load children get one per model loaded).
fn warn_once(kind: &str, place: &Path, message: impl std::fmt::Display) {
    static WARNED: Mutex<BTreeSet<(String, PathBuf)>> = Mutex::new(BTreeSet::new());
    let first = WARNED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert((kind.to_string(), place.to_path_buf()));
    if first {
        tracing::warn!("{message}");
    }
}

fn own_path(text: &str, controller: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = if controller.is_empty() {
            controllers.is_empty()
        } else {
            controllers.split(',').any(|c| c == controller)
        };
        matches.then(|| path.to_string())
    })
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), String> {
    std::fs::write(dir.join(file), value).map_err(|e| format!("{}/{file}: {e}", dir.display()))
}

fn open_procs(dir: &Path) -> Result<OwnedFd, String> {
    let path = dir.join("cgroup.procs");
    let name = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| format!("{}: a NUL in the path", path.display()))?;
    // SAFETY: a NUL-terminated path; the descriptor returned is owned by the OwnedFd.
    let fd = unsafe { libc::open(name.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(format!(
            "{}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: a descriptor just opened here and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// How the workers' groups are named: this prefix, the creating process's id, a counter.
const PREFIX: &str = "wasm-infer-workers-";

/// A name no other pool of this process (tests start many at once) or earlier process uses.
pub fn unique_name() -> String {
    static POOLS: AtomicU64 = AtomicU64::new(0);
    format!(
        "{PREFIX}{}-{}",
        std::process::id(),
        POOLS.fetch_add(1, Ordering::Relaxed)
    )
}

/// Removes the empty groups left in `parent` by processes that are gone (a server killed with
/// SIGKILL drops nothing). A group whose process still lives, or that still holds processes,
/// stays (the kernel refuses to remove a group that is not empty).
fn remove_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = std::fs::remove_dir(entry.path());
        }
    }
}

impl Cgroup {
    /// Creates `name` below this process's cgroups with `limits`, or says why it cannot.
    /// The memory ceiling (swap included) is required; the pids cap and the CPU quota are
    /// set where their controller is available, with a warning (once per process) where not.
    pub fn create(name: &str, limits: &CgroupLimits) -> Result<Self, String> {
        Self::create_at(&CgroupRoot::of_this_process(), name, limits)
    }

    /// [`Cgroup::create`] in the hierarchies `root` describes.
    pub fn create_at(root: &CgroupRoot, name: &str, limits: &CgroupLimits) -> Result<Self, String> {
        if root.mount.join("cgroup.controllers").is_file() {
            return Self::create_v2(root, name, limits);
        }
        Self::create_v1(root, name, limits)
    }

    /// v2 (unified): one directory below this process's group, whose controllers the parent
    /// must pass down: those missing from the parent's `cgroup.subtree_control` are enabled
    /// there (one write, `+memory +pids …`) if its `cgroup.controllers` offers them. The
    /// kernel refuses that write where the parent itself holds processes (v2's "no internal
    /// processes" rule, `EBUSY`), unless it is the root: the error says so, and the workers
    /// run on rlimits. Then `memory.max`, `memory.swap.max` 0, `pids.max`, `cpu.max`.
    fn create_v2(root: &CgroupRoot, name: &str, limits: &CgroupLimits) -> Result<Self, String> {
        let own = root
            .own_path("")
            .ok_or("no cgroup v2 entry in /proc/self/cgroup")?;
        let parent = root.mount.join(own.trim_start_matches('/'));
        let read_list = |file: &str| {
            std::fs::read_to_string(parent.join(file))
                .map(|text| {
                    text.split_whitespace()
                        .map(str::to_string)
                        .collect::<Vec<_>>()
                })
                .map_err(|e| format!("{}/{file}: {e}", parent.display()))
        };
        let offered = read_list("cgroup.controllers")?;
        let enabled = read_list("cgroup.subtree_control")?;
        let mut wanted = vec![("memory", true)];
        if limits.pids.is_some() {
            wanted.push(("pids", false));
        }
        if limits.cpus.is_some() {
            wanted.push(("cpu", false));
        }
        let mut enable = Vec::new();
        let mut usable = Vec::new();
        for (controller, required) in wanted {
            if enabled.iter().any(|c| c == controller) {
                usable.push(controller);
            } else if offered.iter().any(|c| c == controller) {
                enable.push(format!("+{controller}"));
                usable.push(controller);
            } else if required {
                return Err(format!(
                    "{} offers no {controller} controller (its cgroup.controllers: {:?}): \
                     this subtree is not delegated with it",
                    parent.display(),
                    offered.join(" ")
                ));
            }
        }
        if !enable.is_empty() {
            write(&parent, "cgroup.subtree_control", &enable.join(" ")).map_err(|why| {
                format!(
                    "{why} (enabling controllers for the workers' group; the kernel refuses \
                     while this process's own group holds processes, unless it is the root)"
                )
            })?;
        }
        remove_stale(&parent);
        let dir = parent.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut group = Self {
            dirs: vec![dir.clone()],
            procs: Vec::new(),
        };
        write(&dir, "memory.max", &limits.memory.to_string())?;
        if let Err(why) = write(&dir, "memory.swap.max", "0") {
            warn_once(
                "swap",
                &parent,
                format_args!("the workers' swap is not limited: {why}"),
            );
        }
        if let Some(pids) = limits.pids {
            if usable.contains(&"pids") {
                write(&dir, "pids.max", &pids.to_string())?;
            } else {
                warn_once(
                    "pids",
                    &parent,
                    format_args!(
                        "workers run without a pids cap: {} offers no pids controller",
                        parent.display()
                    ),
                );
            }
        }
        if let Some(cpus) = limits.cpus {
            if usable.contains(&"cpu") {
                let quota = (cpus * CPU_PERIOD.as_micros() as f64) as u64;
                write(
                    &dir,
                    "cpu.max",
                    &format!("{quota} {}", CPU_PERIOD.as_micros()),
                )?;
            } else {
                warn_once(
                    "cpu",
                    &parent,
                    format_args!(
                        "workers run without a CPU quota: {} offers no cpu controller",
                        parent.display()
                    ),
                );
            }
        }
        group.procs.push(open_procs(&dir)?);
        Ok(group)
    }

    /// v1: the memory hierarchy is required, cpu and pids are used where writable.
    fn create_v1(root: &CgroupRoot, name: &str, limits: &CgroupLimits) -> Result<Self, String> {
        let mut group = Self {
            dirs: Vec::new(),
            procs: Vec::new(),
        };
        let memory = Self::v1_dir(root, "memory", name)?;
        group.dirs.push(memory.clone());
        Self::v1_memory(&memory, limits.memory)?;
        // The CPU quota and the pids cap where those hierarchies are writable too; without
        // them the memory ceiling still holds, and the log says what is missing.
        if let Some(cpus) = limits.cpus {
            let quota = (cpus * CPU_PERIOD.as_micros() as f64) as u64;
            let cpu = Self::v1_optional(root, "cpu", name, |dir| {
                write(
                    dir,
                    "cpu.cfs_period_us",
                    &CPU_PERIOD.as_micros().to_string(),
                )?;
                write(dir, "cpu.cfs_quota_us", &quota.to_string())
            });
            match cpu {
                Ok(dir) => group.dirs.push(dir),
                Err(why) => warn_once(
                    "cpu",
                    &root.mount,
                    format_args!("workers run without a CPU quota: {why}"),
                ),
            }
        }
        if let Some(pids) = limits.pids {
            let dir = Self::v1_optional(root, "pids", name, |dir| {
                write(dir, "pids.max", &pids.to_string())
            });
            match dir {
                Ok(dir) => group.dirs.push(dir),
                Err(why) => warn_once(
                    "pids",
                    &root.mount,
                    format_args!("workers run without a pids cap: {why}"),
                ),
            }
        }
        for dir in &group.dirs {
            group.procs.push(open_procs(dir)?);
        }
        Ok(group)
    }

    /// Sets a v1 memory group's ceiling, swap included: `memory.memsw.limit_in_bytes` (RAM
    /// and swap together) equal to `memory.limit_in_bytes`. The kernel keeps the first at or
    /// above the second at every step, so the order depends on which way they move.
    fn v1_memory(dir: &Path, memory: u64) -> Result<(), String> {
        let value = memory.to_string();
        if !dir.join("memory.memsw.limit_in_bytes").exists() {
            let hierarchy = dir.parent().unwrap_or(dir);
            warn_once(
                "swap",
                hierarchy,
                format_args!(
                    "the workers' swap is not limited: {} has no memory.memsw.limit_in_bytes \
                     (swap accounting is off)",
                    hierarchy.display()
                ),
            );
            return write(dir, "memory.limit_in_bytes", &value);
        }
        write(dir, "memory.limit_in_bytes", &value)
            .and_then(|()| write(dir, "memory.memsw.limit_in_bytes", &value))
            .or_else(|_| {
                write(dir, "memory.memsw.limit_in_bytes", &value)
                    .and_then(|()| write(dir, "memory.limit_in_bytes", &value))
            })
    }

    /// A v1 group in an optional hierarchy, set up by `set`; removed again if that fails.
    fn v1_optional(
        root: &CgroupRoot,
        controller: &str,
        name: &str,
        set: impl FnOnce(&Path) -> Result<(), String>,
    ) -> Result<PathBuf, String> {
        let dir = Self::v1_dir(root, controller, name)?;
        match set(&dir) {
            Ok(()) => Ok(dir),
            Err(why) => {
                let _ = std::fs::remove_dir(&dir);
                Err(why)
            }
        }
    }

    fn v1_dir(root: &CgroupRoot, controller: &str, name: &str) -> Result<PathBuf, String> {
        let own = root
            .own_path(controller)
            .ok_or(format!("no cgroup v1 {controller} hierarchy"))?;
        let parent = root
            .mount
            .join(controller)
            .join(own.trim_start_matches('/'));
        remove_stale(&parent);
        let dir = parent.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(dir)
    }

    /// Makes `command`'s child join the group (every hierarchy) between fork and exec, by
    /// writing `0` (the writer itself) to each `cgroup.procs` this group holds open: the
    /// child's first instruction runs inside the group. A child that cannot join is not
    /// started (the spawn fails with the error).
    pub fn place_before_exec(&self, command: &mut Command) {
        use std::os::unix::process::CommandExt;
        let fds: Vec<RawFd> = self.procs.iter().map(AsRawFd::as_raw_fd).collect();
        // SAFETY: between fork and exec only async-signal-safe calls are made (write), and
        // the closure allocates nothing (the descriptors were collected before the fork).
        // The descriptors stay open while `self` lives, which outlasts the spawn.
        unsafe {
            command.pre_exec(move || {
                for &fd in &fds {
                    if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }

    /// How many times the kernel's OOM killer killed a process of this group (v1
    /// `memory.oom_control`, v2 `memory.events`), if the group says.
    pub fn oom_kills(&self) -> Option<u64> {
        self.dirs.iter().find_map(|dir| {
            ["memory.events", "memory.oom_control"]
                .iter()
                .find_map(|file| std::fs::read_to_string(dir.join(file)).ok())
                .and_then(|text| {
                    text.lines().find_map(|line| {
                        line.strip_prefix("oom_kill ")
                            .and_then(|n| n.trim().parse().ok())
                    })
                })
        })
    }

    /// The cgroup's directories.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        self.procs.clear();
        for dir in &self.dirs {
            // Fails while processes remain; the kernel keeps an empty group harmlessly.
            if let Err(e) = std::fs::remove_dir(dir) {
                tracing::warn!(error = %e, dir = %dir.display(), "the workers' cgroup stays");
            }
        }
    }
}

/// The variable that arms the cgroup probe, for the tests: a directory into which a run
/// worker, as the first thing it does (before it reads anything from its parent), copies its
/// `/proc/self/cgroup` as a file named by its pid. Parents pass it on to their workers by name,
/// like the escape drill's variable; it only makes a worker write what it may read anyway.
pub const CGROUP_PROBE_VAR: &str = "WASM_INFER_TEST_CGROUP_PROBE";

/// Passes the cgroup probe (when armed) on to a child.
pub(crate) fn pass_cgroup_probe(command: &mut Command) {
    if let Some(dir) = std::env::var_os(CGROUP_PROBE_VAR) {
        command.env(CGROUP_PROBE_VAR, dir);
    }
}
