//! Putting worker processes in a cgroup with a memory ceiling, a CPU quota and a pids cap,
//! where this process may manage one: a cgroup v2 subtree delegated to it, or the v1
//! `memory`, `cpu` and `pids` hierarchies (a directory below the cgroup this process is in).
//! Where it may not, [`Cgroup::create`] says why and the workers run with their rlimits only.
//! Nothing here needs root unless the machine's cgroups do.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The limits of the workers' cgroup (all workers together).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CgroupLimits {
    /// Memory ceiling of all workers together, in bytes.
    #[serde(with = "crate::units::serde::size")]
    pub memory: u64,
    /// CPU time per period: `cpus` CPUs' worth (1.0 = one core), or unlimited.
    pub cpus: Option<f64>,
    /// Most processes and threads.
    pub pids: Option<u64>,
}

/// A cgroup the workers are put in, in one or more hierarchies; removed when dropped (after
/// its processes have left).
#[derive(Debug)]
pub struct Cgroup {
    /// The directories, one per hierarchy (v1) or one (v2).
    dirs: Vec<PathBuf>,
}

/// The CPU-quota period: 100 ms, the kernel's default.
const CPU_PERIOD: Duration = Duration::from_millis(100);

fn own_path(controller: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
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

impl Cgroup {
    /// Creates `name` below this process's cgroups with `limits`, or says why it cannot.
    pub fn create(name: &str, limits: &CgroupLimits) -> Result<Self, String> {
        let root = Path::new("/sys/fs/cgroup");
        // v2 (unified): one directory, controllers in the subtree.
        if root.join("cgroup.controllers").is_file() {
            let own = own_path("").ok_or("no cgroup v2 entry in /proc/self/cgroup")?;
            let dir = root.join(own.trim_start_matches('/')).join(name);
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let group = Self {
                dirs: vec![dir.clone()],
            };
            write(&dir, "memory.max", &limits.memory.to_string())?;
            if let Some(cpus) = limits.cpus {
                let quota = (cpus * CPU_PERIOD.as_micros() as f64) as u64;
                write(
                    &dir,
                    "cpu.max",
                    &format!("{quota} {}", CPU_PERIOD.as_micros()),
                )?;
            }
            if let Some(pids) = limits.pids {
                write(&dir, "pids.max", &pids.to_string())?;
            }
            return Ok(group);
        }
        // v1: the memory hierarchy is required, cpu and pids are used where writable.
        let mut group = Self { dirs: Vec::new() };
        let memory = Self::v1_dir(root, "memory", name)?;
        write(&memory, "memory.limit_in_bytes", &limits.memory.to_string())?;
        group.dirs.push(memory);
        // The CPU quota and the pids cap where those hierarchies are writable too; without
        // them the memory ceiling still holds, and the log says what is missing.
        if let Some(cpus) = limits.cpus {
            let quota = (cpus * CPU_PERIOD.as_micros() as f64) as u64;
            let cpu = Self::v1_dir(root, "cpu", name).and_then(|dir| {
                write(
                    &dir,
                    "cpu.cfs_period_us",
                    &CPU_PERIOD.as_micros().to_string(),
                )?;
                write(&dir, "cpu.cfs_quota_us", &quota.to_string())?;
                Ok(dir)
            });
            match cpu {
                Ok(dir) => group.dirs.push(dir),
                Err(why) => tracing::warn!("workers run without a CPU quota: {why}"),
            }
        }
        if let Some(pids) = limits.pids {
            let dir = Self::v1_dir(root, "pids", name).and_then(|dir| {
                write(&dir, "pids.max", &pids.to_string())?;
                Ok(dir)
            });
            match dir {
                Ok(dir) => group.dirs.push(dir),
                Err(why) => tracing::warn!("workers run without a pids cap: {why}"),
            }
        }
        Ok(group)
    }

    fn v1_dir(root: &Path, controller: &str, name: &str) -> Result<PathBuf, String> {
        let own = own_path(controller).ok_or(format!("no cgroup v1 {controller} hierarchy"))?;
        let dir = root
            .join(controller)
            .join(own.trim_start_matches('/'))
            .join(name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(dir)
    }

    /// Moves process `pid` into the cgroup (every hierarchy).
    pub fn add(&self, pid: u32) -> Result<(), String> {
        for dir in &self.dirs {
            write(dir, "cgroup.procs", &pid.to_string())?;
        }
        Ok(())
    }

    /// The cgroup's directories.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for dir in &self.dirs {
            // Fails while processes remain; the kernel keeps an empty group harmlessly.
            let _ = std::fs::remove_dir(dir);
        }
    }
}
