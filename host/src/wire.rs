//! The one wire protocol between this process and its children (the load children of
//! [`crate::isolate`] and the run workers of [`crate::worker`]): how a child is started, how
//! messages are framed, and how an error crosses.
//!
//! - **Start** ([`child_command`], [`spawn`]): the `wasm-infer` binary in a hidden mode, with
//!   an empty environment but the variables named here, stdin and stdout piped, stderr
//!   nowhere. The caller adds its limits (rlimits, a cgroup) between fork and exec.
//! - **Frames**: a little-endian `u32` length, then that many bytes: JSON for a message
//!   ([`write_frame`], [`read_frame`]), raw bytes for code and components ([`write_raw_frame`],
//!   [`read_raw_frame`]).
//! - **The parent's end** ([`Channel`]): every write and read has a deadline and every frame
//!   read a bound, so a child that stops answering, answers slowly or answers without end
//!   costs its request, never the parent's thread.
//! - **Errors** ([`WireError`]): an [`Error`] as it crosses, by kind, with its figures.
//!
//! The child trusts its parent (what it reads is bounded by the parent's own input limits);
//! the parent trusts nothing its child says.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::error::{Error, InvalidModel, LimitExceeded, ModelErrorCode};

/// Most bytes a frame a child reads may have: any length the prefix can say.
pub(crate) const MAX_REQUEST_FRAME: u64 = u32::MAX as u64;

/// Bytes a reply frame may have beyond its payload: usage reports, error messages and the
/// tail of the guest's stderr a trap carries (4 KiB before escaping).
pub(crate) const FRAME_MARGIN: u64 = 1 << 20;

/// The command that starts `binary` in its hidden child mode `mode` (`__load-worker`,
/// `__run-worker`). Nothing of this process's environment (secrets, proxies, `LD_*`) reaches
/// the child: it reads no variable but those named here (its settings come in its first
/// frame; its stderr goes nowhere, so no logging variable either).
pub(crate) fn child_command(binary: &Path, mode: &str) -> Command {
    let mut command = Command::new(binary);
    command
        .arg(mode)
        .env_clear()
        // candle and the compiler size their threads from this, not from /proc or /sys,
        // which a locked-down child may not open.
        .env(
            "RAYON_NUM_THREADS",
            candle_core::utils::get_num_threads().to_string(),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    pass_escape_drill(&mut command);
    crate::cgroup::pass_cgroup_probe(&mut command);
    pass_library_path(&mut command);
    command
}

/// Starts `command` ([`child_command`] with the caller's limits) and opens the parent's end of
/// its channel. `what` names the child in errors. A binary that is missing or not executable
/// is a setting to fix ([`Error::Config`]); anything else (no file descriptors, memory or
/// processes left) is the host's resource failing ([`Error::Internal`]).
pub(crate) fn spawn(mut command: Command, what: &str) -> Result<(Child, Channel), Error> {
    let mut child = command.spawn().map_err(|e| {
        let message = format!(
            "cannot start the {what} {}: {e}",
            Path::new(command.get_program()).display()
        );
        match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
                Error::Config(message)
            }
            _ => Error::Internal(format!("the host ran out of a resource: {message}")),
        }
    })?;
    let channel = Channel::new(
        child.stdin.take().expect("piped stdin"),
        child.stdout.take().expect("piped stdout"),
    );
    match channel {
        Ok(channel) => Ok((child, channel)),
        Err(e) => {
            end(&mut child);
            Err(Error::Internal(format!("the {what}'s channel: {e}")))
        }
    }
}

/// Kills `child` (if it still runs) and reaps it, so that no zombie is left.
pub(crate) fn end(child: &mut Child) -> Option<std::process::ExitStatus> {
    let _ = child.kill();
    child.wait().ok()
}

/// The variable that arms the escape drill: `<stage>:<call>`, where stage is `run` (a run
/// worker), `preinit` (a pre-initialisation child) or `compile` (a compile child) and call one
/// of `worker::lockdown::forbidden`'s. It exists for the tests: right after its lock-down, where
/// the first guest instruction (or, for the compile child, the compiler) would run, the
/// process makes that call itself, standing in for native code that escaped wasmtime there;
/// the filter must kill it (`SIGSYS`). A call the filter let through ends the process with
/// `worker::ESCAPE_SURVIVED`. `preinit:poison-<kind>` is the poison drill instead: the
/// pre-initialisation child tampers with the snapshot it hands back (`segment`, `memory`,
/// `global`, `code`, `digest`), as such code could, and the parent must refuse it
/// ([`InvalidModel::PoisonedSnapshot`]). Parents pass the variable on to their children by
/// name; it can only make a worker end itself or a load fail.
pub const ESCAPE_VAR: &str = "WASM_INFER_TEST_ESCAPE";

/// Passes the escape drill's variable, if this process has it, on to a child.
fn pass_escape_drill(command: &mut Command) {
    if let Some(drill) = std::env::var_os(ESCAPE_VAR) {
        command.env(ESCAPE_VAR, drill);
    }
}

/// A binary built with the `cuda` feature links the CUDA libraries, which its children (the
/// same binary) find, as this process found them, through `LD_LIBRARY_PATH`: without it they
/// cannot start (the loader exits 127). Only that variable, and only in such a build; no other
/// `LD_*` variable reaches a child.
fn pass_library_path(command: &mut Command) {
    #[cfg(feature = "cuda")]
    if let Some(path) = std::env::var_os("LD_LIBRARY_PATH") {
        command.env("LD_LIBRARY_PATH", path);
    }
    #[cfg(not(feature = "cuda"))]
    let _ = command;
}

/// Writes `message` as one JSON frame and flushes.
pub(crate) fn write_frame<T: Serialize>(out: &mut impl Write, message: &T) -> std::io::Result<()> {
    out.write_all(&encode_frame(message)?)?;
    out.flush()
}

/// Writes `bytes` as one raw frame and flushes (more than 4 GiB cannot be framed).
pub(crate) fn write_raw_frame(out: &mut impl Write, bytes: &[u8]) -> std::io::Result<()> {
    out.write_all(&raw_prefix(bytes)?)?;
    out.write_all(bytes)?;
    out.flush()
}

pub(crate) fn encode_frame<T: Serialize>(message: &T) -> std::io::Result<Vec<u8>> {
    let bytes = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    let mut frame = raw_prefix(&bytes)?.to_vec();
    frame.extend_from_slice(&bytes);
    Ok(frame)
}

fn raw_prefix(bytes: &[u8]) -> std::io::Result<[u8; 4]> {
    let len = u32::try_from(bytes.len()).map_err(|_| {
        std::io::Error::other(format!(
            "{} bytes are more than one frame holds (4 GiB)",
            bytes.len()
        ))
    })?;
    Ok(len.to_le_bytes())
}

/// Reads a raw frame of at most `max` bytes (a longer one is refused before it is read).
pub(crate) fn read_raw_frame(input: &mut impl Read, max: u64) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    input.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len);
    if u64::from(len) > max {
        return Err(FrameTooLong { len, max }.into());
    }
    let mut bytes = vec![0u8; len as usize];
    input.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// Reads a JSON frame of at most `max` bytes.
pub(crate) fn read_frame<T: DeserializeOwned>(
    input: &mut impl Read,
    max: u64,
) -> std::io::Result<T> {
    let bytes = read_raw_frame(input, max)?;
    serde_json::from_slice(&bytes).map_err(std::io::Error::other)
}

/// A frame longer than its reader's bound: out of protocol, read no further.
#[derive(Debug, thiserror::Error)]
#[error("a frame of {len} bytes, above the bound of {max}")]
pub(crate) struct FrameTooLong {
    len: u32,
    max: u64,
}

impl From<FrameTooLong> for std::io::Error {
    fn from(e: FrameTooLong) -> Self {
        std::io::Error::other(e)
    }
}

/// Whether `e` is a frame over its bound ([`FrameTooLong`]).
pub(crate) fn is_too_long(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<FrameTooLong>())
}

/// The parent's end of a child's channel: every read and write has a deadline, and every
/// frame read a bound.
pub(crate) struct Channel {
    stdin: ChildStdin,
    pub(crate) stdout: ChildStdout,
}

impl Channel {
    fn new(stdin: ChildStdin, stdout: ChildStdout) -> std::io::Result<Self> {
        // Writes to a child that does not read would otherwise block once the pipe is full.
        let fd = stdin.as_raw_fd();
        // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no memory is passed.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(Self { stdin, stdout })
    }

    /// Sends `message` as a JSON frame.
    pub(crate) fn send<T: Serialize>(
        &mut self,
        message: &T,
        deadline: Instant,
    ) -> std::io::Result<()> {
        self.send_bytes(&encode_frame(message)?, deadline)
    }

    /// Sends `bytes` as a raw frame.
    pub(crate) fn send_raw(&mut self, bytes: &[u8], deadline: Instant) -> std::io::Result<()> {
        self.send_bytes(&raw_prefix(bytes)?, deadline)?;
        self.send_bytes(bytes, deadline)
    }

    fn send_bytes(&mut self, bytes: &[u8], deadline: Instant) -> std::io::Result<()> {
        let mut sent = 0;
        while sent < bytes.len() {
            match self.stdin.write(&bytes[sent..]) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    wait_for(self.stdin.as_raw_fd(), libc::POLLOUT, deadline)?
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Receives a JSON frame of at most `max` bytes.
    pub(crate) fn receive<T: DeserializeOwned>(
        &mut self,
        max: u64,
        deadline: Instant,
    ) -> std::io::Result<T> {
        read_frame(&mut self.reader(deadline), max)
    }

    /// Receives a raw frame of at most `max` bytes.
    pub(crate) fn receive_raw(&mut self, max: u64, deadline: Instant) -> std::io::Result<Vec<u8>> {
        read_raw_frame(&mut self.reader(deadline), max)
    }

    fn reader(&mut self, deadline: Instant) -> ReadBy<'_> {
        ReadBy {
            stdout: &mut self.stdout,
            deadline,
        }
    }
}

/// A reader that waits for data no later than its deadline.
struct ReadBy<'a> {
    stdout: &'a mut ChildStdout,
    deadline: Instant,
}

impl Read for ReadBy<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        wait_for(self.stdout.as_raw_fd(), libc::POLLIN, self.deadline)?;
        self.stdout.read(buf)
    }
}

/// The instant `wait` from now; a wait too long for the clock (a wall-time limit of
/// `Duration::MAX`) is cut to a year, which no run reaches.
pub(crate) fn deadline_after(wait: Duration) -> Instant {
    const LONGEST: Duration = Duration::from_secs(365 * 24 * 3600);
    Instant::now() + wait.min(LONGEST)
}

/// Waits until `fd` is ready for `events` (or closed), or fails with `TimedOut` at `deadline`.
pub(crate) fn wait_for(fd: RawFd, events: libc::c_short, deadline: Instant) -> std::io::Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        let mut poll = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        // Rounded up, so that a wait never ends just before the deadline and spins.
        let millis = left
            .as_millis()
            .saturating_add(1)
            .min(libc::c_int::MAX as u128);
        // SAFETY: poll reads and writes the one pollfd we pass.
        match unsafe { libc::poll(&mut poll, 1, millis as libc::c_int) } {
            n if n > 0 => return Ok(()),
            0 => {}
            _ => {
                let error = std::io::Error::last_os_error();
                if error.kind() != std::io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
        }
    }
}

/// An [`Error`] as it crosses the process boundary.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum WireError {
    Limit(LimitExceeded),
    InvalidModel(InvalidModel),
    Trap {
        code: Option<String>,
        message: String,
        guest_stderr: String,
    },
    Model {
        code: ModelErrorCode,
        message: String,
    },
    /// Initialisation failed with the inner error.
    Init(Box<WireError>),
    Other {
        kind: String,
        message: String,
    },
}

/// The trap codes a child reports by name.
const TRAPS: [wasmtime::Trap; 12] = [
    wasmtime::Trap::StackOverflow,
    wasmtime::Trap::MemoryOutOfBounds,
    wasmtime::Trap::HeapMisaligned,
    wasmtime::Trap::TableOutOfBounds,
    wasmtime::Trap::IndirectCallToNull,
    wasmtime::Trap::BadSignature,
    wasmtime::Trap::IntegerOverflow,
    wasmtime::Trap::IntegerDivisionByZero,
    wasmtime::Trap::BadConversionToInteger,
    wasmtime::Trap::UnreachableCodeReached,
    wasmtime::Trap::Interrupt,
    wasmtime::Trap::OutOfFuel,
];

impl From<Error> for WireError {
    fn from(error: Error) -> Self {
        match error {
            Error::Limit(limit) => Self::Limit(limit),
            Error::InvalidModel(reason) => Self::InvalidModel(reason),
            Error::Trap {
                code,
                message,
                guest_stderr,
            } => Self::Trap {
                code: code.map(|c| format!("{c:?}")),
                message,
                guest_stderr,
            },
            Error::Model { code, message } => Self::Model { code, message },
            Error::Init(inner) => Self::Init(Box::new((*inner).into())),
            // An internal error's own text: the parent makes it an internal error again,
            // whose display adds the "internal error: " this one's would have carried.
            Error::Internal(message) => Self::Other {
                kind: "internal".into(),
                message,
            },
            other => Self::Other {
                kind: other.kind().as_str().to_string(),
                message: other.to_string(),
            },
        }
    }
}

impl From<WireError> for Error {
    fn from(error: WireError) -> Self {
        match error {
            WireError::Limit(limit) => Error::Limit(limit),
            WireError::InvalidModel(reason) => Error::InvalidModel(reason),
            WireError::Trap {
                code,
                message,
                guest_stderr,
            } => Error::Trap {
                code: code.and_then(|name| TRAPS.into_iter().find(|t| format!("{t:?}") == name)),
                message,
                guest_stderr,
            },
            WireError::Model { code, message } => Error::Model { code, message },
            WireError::Init(inner) => Error::Init(Box::new((*inner).into())),
            WireError::Other { kind, message } => {
                Error::Internal(format!("in a worker ({kind}): {message}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_over_its_bound_is_refused_before_it_is_read() {
        let mut frame = Vec::new();
        write_raw_frame(&mut frame, &[7u8; 100]).unwrap();
        assert_eq!(frame.len(), 104);
        assert_eq!(
            read_raw_frame(&mut frame.as_slice(), 100).unwrap(),
            vec![7u8; 100]
        );
        let refused = read_raw_frame(&mut frame.as_slice(), 99).unwrap_err();
        assert!(is_too_long(&refused), "{refused}");
        assert_eq!(
            refused.to_string(),
            "a frame of 100 bytes, above the bound of 99"
        );
        // A truncated frame is an error, never a short answer.
        let cut = read_raw_frame(&mut &frame[..50], 100).unwrap_err();
        assert_eq!(cut.kind(), std::io::ErrorKind::UnexpectedEof);
        assert!(!is_too_long(&cut));
    }

    #[test]
    fn errors_cross_whole() {
        let limit = LimitExceeded::Fuel {
            limit: 10,
            consumed: 11,
        };
        let init = Error::Init(Box::new(Error::Trap {
            code: Some(wasmtime::Trap::UnreachableCodeReached),
            message: "unreachable".into(),
            guest_stderr: "panicked".into(),
        }));
        let cases = [
            Error::Limit(limit.clone()),
            Error::Init(Box::new(Error::Limit(limit))),
            init,
        ];
        for error in cases {
            let want = format!("{error:?}");
            let json = serde_json::to_vec(&WireError::from(error)).unwrap();
            let back: WireError = serde_json::from_slice(&json).unwrap();
            assert_eq!(format!("{:?}", Error::from(back)), want);
        }
        let internal = Error::from(WireError::from(Error::Internal("no fds".into())));
        assert_eq!(
            internal.to_string(),
            "internal error: in a worker (internal): no fds"
        );
    }
}
