//! Locking a worker process down once it has loaded its models: no core dumps, few file
//! descriptors, no new processes, no capabilities, not dumpable or ptrace-able, no new
//! privileges, and a seccomp-bpf allow-list of the system calls a run needs. Anything else
//! (opening a file, a socket, `execve`, `ptrace`, `fork`, a signal to another process,
//! `PR_SET_DUMPABLE 1`) kills the worker with `SIGSYS`; its supervisor replaces it.
//!
//! What is allowed, and why (SECURITY.md has the table): memory management (`mmap`,
//! `munmap`, `mprotect`, `madvise`, `mremap`, `brk`: wasmtime's linear memories and the
//! allocator; `mmap` and `mprotect` only without `PROT_EXEC`: the code is mapped before the
//! lock-down, and no new executable memory after it), threads and their synchronisation
//! (`clone` with `CLONE_THREAD` only: a new process is refused; `clone3`, whose flags a
//! filter cannot read, answers `ENOSYS` so that glibc falls back to `clone`; `futex`,
//! `set_robust_list`, `rseq`, `sched_yield`, `sched_getaffinity`, `membarrier`), signals (`rt_sigaction`, `rt_sigprocmask`,
//! `rt_sigreturn`, `sigaltstack`, `gettid`, `getpid`, and `tgkill` to its own process only:
//! wasmtime turns traps into signals and back), time (`clock_gettime`, `clock_nanosleep`,
//! `nanosleep`: the epoch ticker; `restart_syscall`, which resumes a sleep interrupted by
//! `SIGSTOP`/`SIGCONT`), `getrandom`, reading and writing the already-open channel (`read`,
//! `write`, `writev`, `close`, `fstat`, `statx`, `lseek`, `poll`, `ppoll`, and `fcntl` for
//! a few flag queries), `prctl` to name threads, and leaving (`exit`, `exit_group`).

use std::collections::BTreeMap;

use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

/// File descriptors a locked worker may hold: its channel, stdio, the cached code it mapped and
/// a little slack. A leak or an attempt to open more fails instead of growing.
pub const MAX_WORKER_FILES: u64 = 64;

/// `RLIMIT_NPROC` of a locked worker: 0, no new process or thread for an unprivileged
/// worker (its threads are all started before lock-down; `fork` is refused by the filter as
/// well). The count is per user, and the kernel exempts the root user from it altogether,
/// so this is a second check for unprivileged deployments only.
pub const MAX_WORKER_NEW_PROCESSES: u64 = 0;

/// How long the `pause` self-test sleeps: long enough for a test to stop and continue it.
const PAUSE: std::time::Duration = std::time::Duration::from_secs(2);

/// The system calls a locked worker may make with any arguments (see the module docs and
/// SECURITY.md's table); those allowed only with certain arguments are in [`lock_down`].
const ALLOWED: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_readv,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_munmap,
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
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_restart_syscall,
    libc::SYS_getrandom,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// `prctl` options a locked worker uses: Rust's standard library names every thread it
/// starts (`PR_SET_NAME`); `PR_GET_NAME` reads it back. Anything else (`PR_SET_DUMPABLE`,
/// `PR_SET_PDEATHSIG`, `PR_SET_PTRACER`, `PR_CAPBSET_*`, `PR_SET_SECCOMP`) could undo a
/// lock-down step or reach another process.
const PRCTL_OPTIONS: &[libc::c_int] = &[libc::PR_SET_NAME, libc::PR_GET_NAME];

/// `fcntl` commands a locked worker may use: none was seen in a traced worker's runs
/// (`strace -f`: model runs, traps, fuel trips), but the standard library reads and sets
/// descriptor flags (`F_GETFD`, `F_SETFD`) and status flags (`F_GETFL`) and duplicates with
/// close-on-exec (`F_DUPFD_CLOEXEC`, bounded by `RLIMIT_NOFILE`) on paths a run could take.
/// Refused: `F_SETOWN`/`F_SETOWN_EX`/`F_SETSIG` (with `O_ASYNC`, the kernel would signal a
/// process the worker names), `F_SETFL`, locks and leases. `ioctl` is refused outright: no
/// run makes one (device and terminal control, `TIOCSTI`, `FIOASYNC` are all out of reach).
const FCNTL_COMMANDS: &[libc::c_int] = &[
    libc::F_GETFD,
    libc::F_SETFD,
    libc::F_GETFL,
    libc::F_DUPFD_CLOEXEC,
];

/// Sets both the soft and the hard limit to `value`, or to the hard limit the process already
/// has where that is lower (a limit can only be lowered without privilege, and lowering is the
/// point).
fn set_rlimit(resource: libc::__rlimit_resource_t, value: u64) -> std::io::Result<()> {
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass and nothing else.
    if unsafe { libc::getrlimit(resource, &mut current) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let value = (value as libc::rlim_t).min(current.rlim_max);
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit reads the struct we pass and nothing else.
    if unsafe { libc::setrlimit(resource, &limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn prctl(option: libc::c_int, arg: libc::c_ulong) -> std::io::Result<libc::c_int> {
    // SAFETY: the options used here (PR_SET_NO_NEW_PRIVS, PR_SET_DUMPABLE, PR_CAPBSET_READ,
    // PR_CAPBSET_DROP, PR_CAP_AMBIENT) take integers and write no memory.
    let answer = unsafe { libc::prctl(option, arg, 0, 0, 0) };
    if answer < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(answer)
}

/// `capget`/`capset`'s header and data (linux/capability.h, version 3: two 32-bit words).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAPABILITY_VERSION_3: u32 = 0x2008_0522;
/// The capability `PR_CAPBSET_DROP` needs.
const CAP_SETPCAP: u32 = 8;

/// Drops every capability: the bounding set (so that nothing, not even an `execve` of a
/// set-uid or file-capability binary, could bring one back), the ambient set, then the
/// effective, permitted and inheritable sets. A worker started as root would otherwise keep
/// `CAP_KILL`, `CAP_SYS_ADMIN` and the rest (it could signal any process on the host). An
/// unprivileged worker holds none: its bounding set, which only matters at `execve`, is left
/// as it is (dropping from it needs `CAP_SETPCAP`).
pub fn drop_capabilities() -> Result<(), String> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes two CapData into `data`, the size version 3 asks for.
    if unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut CapHeader,
            data.as_mut_ptr(),
        )
    } != 0
    {
        return Err(format!("capget: {}", std::io::Error::last_os_error()));
    }
    if data[0].effective & (1 << CAP_SETPCAP) != 0 {
        // PR_CAPBSET_READ fails with EINVAL past the kernel's last capability.
        let mut cap = 0;
        while prctl(libc::PR_CAPBSET_READ, cap).is_ok() {
            prctl(libc::PR_CAPBSET_DROP, cap).map_err(|e| format!("PR_CAPBSET_DROP {cap}: {e}"))?;
            cap += 1;
        }
    }
    // Kernels before 4.3 have no ambient set (EINVAL): nothing to clear there.
    if let Err(e) = prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
    ) {
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(format!("PR_CAP_AMBIENT_CLEAR_ALL: {e}"));
        }
    }
    let empty = [CapData::default(); 2];
    // SAFETY: capset reads the header and two CapData; dropping capabilities always succeeds.
    if unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            empty.as_ptr(),
        )
    } != 0
    {
        return Err(format!("capset: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// A rule allowing a call when argument `index` (a 32-bit integer) equals one of `values`.
fn one_of(index: u8, values: impl IntoIterator<Item = u64>) -> Result<Vec<SeccompRule>, String> {
    values
        .into_iter()
        .map(|value| {
            rule(vec![condition(
                index,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                value,
            )?])
        })
        .collect()
}

/// The limits and process attributes both lock-downs set before their filter.
fn limit_process() -> Result<(), String> {
    set_rlimit(libc::RLIMIT_CORE, 0).map_err(|e| format!("RLIMIT_CORE: {e}"))?;
    set_rlimit(libc::RLIMIT_NOFILE, MAX_WORKER_FILES).map_err(|e| format!("RLIMIT_NOFILE: {e}"))?;
    set_rlimit(libc::RLIMIT_NPROC, MAX_WORKER_NEW_PROCESSES)
        .map_err(|e| format!("RLIMIT_NPROC: {e}"))?;
    drop_capabilities()?;
    prctl(libc::PR_SET_DUMPABLE, 0).map_err(|e| format!("PR_SET_DUMPABLE: {e}"))?;
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1).map_err(|e| format!("PR_SET_NO_NEW_PRIVS: {e}"))?;
    Ok(())
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, String> {
    SeccompRule::new(conditions).map_err(|e| format!("seccomp rule: {e}"))
}

fn condition(
    index: u8,
    len: SeccompCmpArgLen,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompCondition, String> {
    SeccompCondition::new(index, len, op, value).map_err(|e| format!("seccomp condition: {e}"))
}

/// The rules common to both filters: `clone` for threads only, `prctl` and `fcntl` with the
/// listed options only.
fn common_rules(allowed: &mut BTreeMap<i64, Vec<SeccompRule>>) -> Result<(), String> {
    let thread = libc::CLONE_THREAD as u64;
    let only_threads = rule(vec![condition(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(thread),
        thread,
    )?])?;
    allowed.insert(libc::SYS_clone, vec![only_threads]);
    allowed.insert(libc::SYS_clone3, Vec::new());
    allowed.insert(
        libc::SYS_prctl,
        one_of(0, PRCTL_OPTIONS.iter().map(|&o| o as u64))?,
    );
    allowed.insert(
        libc::SYS_fcntl,
        one_of(1, FCNTL_COMMANDS.iter().map(|&c| c as u64))?,
    );
    Ok(())
}

/// Installs `allowed` (anything else kills the process), with `clone3` answered `ENOSYS`.
fn install(allowed: BTreeMap<i64, Vec<SeccompRule>>) -> Result<(), String> {
    let arch: seccompiler::TargetArch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| format!("seccomp: unsupported architecture: {e:?}"))?;
    let compile = |rules, mismatch, matched| -> Result<seccompiler::BpfProgram, String> {
        SeccompFilter::new(rules, mismatch, matched, arch)
            .map_err(|e| format!("seccomp filter: {e}"))?
            .try_into()
            .map_err(|e| format!("seccomp program: {e:?}"))
    };
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

/// Locks the calling process down (all its threads: the filter is synchronised to every
/// thread) before it runs guest code: run workers and the pre-initialisation child.
/// Irreversible.
pub fn lock_down() -> Result<(), String> {
    limit_process()?;
    let mut allowed: BTreeMap<i64, Vec<SeccompRule>> = ALLOWED
        .iter()
        .map(|&syscall| (syscall, Vec::new()))
        .collect();
    common_rules(&mut allowed)?;
    // Signals to its own threads only (wasmtime and the standard library use tgkill for
    // that): the process id is fixed into the filter, so any other target kills the worker.
    // SAFETY: getpid has no failure mode.
    let pid = unsafe { libc::getpid() } as u32;
    allowed.insert(libc::SYS_tgkill, one_of(0, [u64::from(pid)])?);
    // No new executable memory: the code was linked (mapped executable) before the lock-down,
    // and wasmtime, running precompiled code, makes no more; native code that escaped could
    // not write and then run a payload of its own this way.
    allowed.insert(libc::SYS_mmap, no_exec()?);
    allowed.insert(libc::SYS_mprotect, no_exec()?);
    install(allowed)
}

/// A rule allowing `mmap`/`mprotect` only without `PROT_EXEC` in their protection (argument 2).
fn no_exec() -> Result<Vec<SeccompRule>, String> {
    let exec = libc::PROT_EXEC as u64;
    Ok(vec![rule(vec![condition(
        2,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(exec),
        0,
    )?])?])
}

/// The system calls the compile child may make with any arguments: [`ALLOWED`] less what only
/// running code needs (sleeping, the channel's `poll`) and less
/// `mmap`/`mprotect`, which it may make only without `PROT_EXEC` (see [`lock_down_compiler`]).
const ALLOWED_COMPILER: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_munmap,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_clock_gettime,
    libc::SYS_restart_syscall,
    libc::SYS_getrandom,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Locks the compile child down before it compiles (it runs no guest code, only the compiler
/// on untrusted input): the same limits as [`lock_down`], and a tighter filter: no sleeping,
/// no polling, signals to itself only (`abort`), and no executable memory at all (`mmap` and
/// `mprotect` with `PROT_EXEC` kill): precompiling writes code as data, never maps it to run.
pub fn lock_down_compiler() -> Result<(), String> {
    limit_process()?;
    let mut allowed: BTreeMap<i64, Vec<SeccompRule>> = ALLOWED_COMPILER
        .iter()
        .map(|&syscall| (syscall, Vec::new()))
        .collect();
    common_rules(&mut allowed)?;
    // `abort` (what a failed allocation under RLIMIT_DATA ends in) signals itself.
    // SAFETY: getpid has no failure mode.
    let pid = unsafe { libc::getpid() } as u32;
    allowed.insert(libc::SYS_tgkill, one_of(0, [u64::from(pid)])?);
    allowed.insert(libc::SYS_mmap, no_exec()?);
    allowed.insert(libc::SYS_mprotect, no_exec()?);
    install(allowed)
}

/// What a lock-down self-test tries after locking down (`wasm-infer __lockdown-selftest`),
/// standing in for native code that escaped wasmtime: each must kill the process with
/// `SIGSYS`. `none` tries nothing (the control: a locked process that stays within the
/// allow-list lives on); `pause` writes `locked` on stdout and sleeps for a while, to be
/// stopped and continued (the interrupted sleep resumes through `restart_syscall`).
/// `tgkill:PID` signals another process, `dumpable` undoes `PR_SET_DUMPABLE 0`, `setown`
/// asks for I/O signals to be sent to a process of its choosing, `ioctl` makes a harmless
/// `FIONREAD` on stdin (every `ioctl` is refused), `mmap_exec` maps executable
/// memory and `mprotect_exec` makes writable memory executable (both refused to every locked
/// process: code is mapped before the lock-down, and precompiled code needs no more).
pub fn forbidden(what: &str) -> Result<(), String> {
    match what {
        "none" => return Ok(()),
        "pause" => {
            use std::io::Write;
            let mut stdout = std::io::stdout();
            stdout
                .write_all(b"locked\n")
                .and_then(|()| stdout.flush())
                .map_err(|e| e.to_string())?;
            std::thread::sleep(PAUSE);
            return Ok(());
        }
        "dumpable" => {
            let _ = prctl(libc::PR_SET_DUMPABLE, 1);
        }
        "setown" => {
            // SAFETY: F_SETOWN on stdout takes an integer; nothing is read or written.
            let _ = unsafe { libc::fcntl(1, libc::F_SETOWN, 1) };
        }
        "ioctl" => {
            let mut pending: libc::c_int = 0;
            // SAFETY: FIONREAD writes one int, to a local that outlives the call.
            let _ = unsafe { libc::ioctl(0, libc::FIONREAD, &mut pending) };
        }
        other if other.starts_with("tgkill:") => {
            let pid: libc::pid_t = other["tgkill:".len()..]
                .parse()
                .map_err(|e| format!("{other:?}: {e}"))?;
            // SAFETY: a plain system call; SIGKILL is what an attacker would send.
            let _ = unsafe { libc::syscall(libc::SYS_tgkill, pid, pid, libc::SIGKILL) };
        }
        "mmap_exec" => {
            // SAFETY: an anonymous mapping nobody uses; unmapped if it was made.
            unsafe {
                let at = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                if at != libc::MAP_FAILED {
                    libc::munmap(at, 4096);
                }
            }
        }
        "mprotect_exec" => {
            // SAFETY: an anonymous mapping nobody uses, unmapped again.
            unsafe {
                let at = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                if at != libc::MAP_FAILED {
                    libc::mprotect(at, 4096, libc::PROT_READ | libc::PROT_EXEC);
                    libc::munmap(at, 4096);
                }
            }
        }
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
