//! Locking a worker process down once it has loaded its models: no core dumps, few file
//! descriptors, not dumpable or ptrace-able, no new privileges, and a seccomp-bpf allow-list
//! of the system calls a run needs. Anything else (opening a file, a socket, `execve`,
//! `ptrace`, `fork`) kills the worker with `SIGSYS`; its supervisor replaces it.
//!
//! What is allowed, and why: memory management (`mmap`, `munmap`, `mprotect`, `madvise`,
//! `mremap`, `brk`: wasmtime's linear memories and the allocator), threads and their
//! synchronisation (`clone` with `CLONE_THREAD` only, for the accelerator's worker threads:
//! a new process is refused; `clone3`, whose flags a filter cannot read, answers `ENOSYS` so
//! that glibc falls back to `clone`; `futex`,
//! `set_robust_list`, `rseq`, `sched_yield`, `sched_getaffinity`, `membarrier`), signals
//! (`rt_sigaction`, `rt_sigprocmask`, `rt_sigreturn`, `sigaltstack`, `tgkill`, `gettid`,
//! `getpid`: wasmtime turns traps into signals and back), time (`clock_gettime`,
//! `clock_nanosleep`, `nanosleep`: the epoch ticker), `getrandom`, reading and writing the
//! already-open channel (`read`, `write`, `writev`, `close`, `fcntl`, `fstat`, `statx`,
//! `lseek`, `poll`, `ppoll`, `ioctl`), and leaving (`exit`, `exit_group`).

use std::collections::BTreeMap;

use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

/// File descriptors a locked worker may hold: its channel, stdio, the cached code it mapped and
/// a little slack. A leak or an attempt to open more fails instead of growing.
pub const MAX_WORKER_FILES: u64 = 64;

/// The system calls a locked worker may make (see the module docs).
const ALLOWED: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_readv,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_ioctl,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_membarrier,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_prctl,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

fn set_rlimit(resource: libc::__rlimit_resource_t, value: u64) -> std::io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: value as libc::rlim_t,
        rlim_max: value as libc::rlim_t,
    };
    // SAFETY: setrlimit reads the struct we pass and nothing else.
    if unsafe { libc::setrlimit(resource, &limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn prctl(option: libc::c_int, arg: libc::c_ulong) -> std::io::Result<()> {
    // SAFETY: PR_SET_NO_NEW_PRIVS and PR_SET_DUMPABLE take one integer argument.
    if unsafe { libc::prctl(option, arg, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Locks the calling process down (all its threads: the filter is synchronised to every
/// thread). Irreversible.
pub fn lock_down() -> Result<(), String> {
    set_rlimit(libc::RLIMIT_CORE, 0).map_err(|e| format!("RLIMIT_CORE: {e}"))?;
    set_rlimit(libc::RLIMIT_NOFILE, MAX_WORKER_FILES).map_err(|e| format!("RLIMIT_NOFILE: {e}"))?;
    prctl(libc::PR_SET_DUMPABLE, 0).map_err(|e| format!("PR_SET_DUMPABLE: {e}"))?;
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1).map_err(|e| format!("PR_SET_NO_NEW_PRIVS: {e}"))?;
    let arch: seccompiler::TargetArch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| format!("seccomp: unsupported architecture: {e:?}"))?;
    let compile = |rules, mismatch, matched| -> Result<seccompiler::BpfProgram, String> {
        SeccompFilter::new(rules, mismatch, matched, arch)
            .map_err(|e| format!("seccomp filter: {e}"))?
            .try_into()
            .map_err(|e| format!("seccomp program: {e:?}"))
    };
    let thread = libc::CLONE_THREAD as u64;
    let only_threads = SeccompRule::new(vec![SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(thread),
        thread,
    )
    .map_err(|e| format!("seccomp condition: {e}"))?])
    .map_err(|e| format!("seccomp rule: {e}"))?;
    let mut allowed: BTreeMap<i64, Vec<SeccompRule>> = ALLOWED
        .iter()
        .map(|&syscall| (syscall, Vec::new()))
        .collect();
    allowed.insert(libc::SYS_clone, vec![only_threads]);
    allowed.insert(libc::SYS_clone3, Vec::new());
    let main = compile(allowed, SeccompAction::KillProcess, SeccompAction::Allow)?;
    // Stacked filters: the strictest answer wins, so clone3 gets ENOSYS.
    let no_clone3 = compile(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
    )?;
    // The main filter last: it does not allow installing another.
    seccompiler::apply_filter_all_threads(&no_clone3).map_err(|e| format!("seccomp: {e}"))?;
    seccompiler::apply_filter_all_threads(&main).map_err(|e| format!("seccomp: {e}"))?;
    Ok(())
}

/// What a lock-down self-test tries after locking down (`wasm-infer __lockdown-selftest`):
/// each must kill the process with `SIGSYS`; `none` tries nothing (the control: a locked
/// process that stays within the allow-list lives on).
pub fn forbidden(what: &str) -> Result<(), String> {
    match what {
        "none" => return Ok(()),
        "open" => {
            let _ = std::fs::File::open("/etc/hostname");
        }
        "socket" => {
            let _ = std::net::UdpSocket::bind("127.0.0.1:0");
        }
        "execve" => {
            use std::os::unix::process::CommandExt;
            let _ = std::process::Command::new("/bin/true").exec();
        }
        "fork" => {
            // SAFETY: the child, if there were one, would only exit.
            if unsafe { libc::fork() } == 0 {
                unsafe { libc::_exit(0) };
            }
        }
        other => return Err(format!("unknown forbidden call {other:?}")),
    }
    Err(format!("{what} was allowed after lock-down"))
}
