//! The API address's edge: the connection limit (an axum [`Listener`] that holds one permit per
//! open connection and accepts only while a permit is free), and each connection served by
//! hyper's HTTP/1 with a capped read buffer and a watchdog that closes it when its head is slow
//! or it sits idle ([`serve`]).
//!
//! Past `max_connections` the listener **waits** rather than accepting and closing at once:
//! the kernel completes the handshake and keeps the connection in the listen backlog, and it is
//! served as soon as another closes. A client at the limit sees latency, not a reset it would
//! have to tell apart from a crash (and retry at once, adding load); the file descriptors and
//! per-connection buffers the process holds stay bounded either way, and the backlog itself is
//! bounded by the kernel (beyond it, new handshakes are dropped and retried by the client's TCP).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::serve::Listener;
use axum::Router;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tower::ServiceExt;

use super::metrics::CloseLabels;

/// A TCP listener that keeps at most `max` connections open.
pub struct Limited {
    listener: TcpListener,
    permits: Arc<Semaphore>,
    open: Gauge,
}

impl Limited {
    /// `listener`, accepting while fewer than `max` of its connections are open; `open` counts
    /// them.
    pub fn new(listener: TcpListener, max: u32, open: Gauge) -> Limited {
        Limited {
            listener,
            permits: Arc::new(Semaphore::new(max as usize)),
            open,
        }
    }
}

impl Listener for Limited {
    type Io = Counted;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Counted, SocketAddr) {
        // The semaphore is never closed.
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the connection semaphore is never closed");
        let (io, addr) = Listener::accept(&mut self.listener).await;
        self.open.inc();
        let open = self.open.clone();
        (
            Counted {
                io,
                _permit: permit,
                open,
                activity: Arc::new(Activity::new()),
            },
            addr,
        )
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// An accepted connection: its permit and its place in the gauge are given back when hyper
/// drops it; its reads and writes are recorded in its [`Activity`].
pub struct Counted {
    io: TcpStream,
    _permit: OwnedSemaphorePermit,
    open: Gauge,
    activity: Arc<Activity>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.read();
        }
        polled
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.wrote();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.wrote();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The edge's settings for each connection (from the serve config).
#[derive(Debug, Clone, Copy)]
pub struct Edge {
    /// From a head's first byte to its last.
    pub header_read_timeout: Duration,
    /// No request open and no byte moving.
    pub idle_timeout: Duration,
    /// hyper's read buffer cap: a head that does not fit is 431.
    pub max_read_buffer: usize,
}

/// What a connection's watchdog reads: whether a request is open, when bytes last moved, and
/// when the head being read (if any) began. Updated by the connection's reads and writes and
/// by the service around each request.
pub struct Activity {
    state: Mutex<ActivityState>,
    /// Woken when a head starts or a request ends: the deadline to watch changes.
    changed: Notify,
}

#[derive(Debug, Clone, Copy)]
struct ActivityState {
    /// Requests whose head hyper parsed and whose answer is not yet produced.
    open: usize,
    /// Bytes last read or written (or a request last began or ended).
    last: Instant,
    /// The first byte read while no request was open: a head being read since then.
    head_started: Option<Instant>,
}

/// Why the watchdog closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    HeaderTimeout,
    IdleTimeout,
}

impl Close {
    fn as_str(self) -> &'static str {
        match self {
            Close::HeaderTimeout => "header_timeout",
            Close::IdleTimeout => "idle_timeout",
        }
    }
}

impl ActivityState {
    /// When the connection is to be closed, and why; `None` while a request is open (its body
    /// has its own timeout, and the answer's writing counts as activity once it is produced).
    fn deadline(&self, edge: &Edge) -> Option<(Instant, Close)> {
        if self.open > 0 {
            return None;
        }
        Some(match self.head_started {
            Some(started) => (started + edge.header_read_timeout, Close::HeaderTimeout),
            None => (self.last + edge.idle_timeout, Close::IdleTimeout),
        })
    }
}

impl Activity {
    fn new() -> Self {
        Self {
            state: Mutex::new(ActivityState {
                open: 0,
                last: Instant::now(),
                head_started: None,
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        // Nothing panics while holding it; a poisoned state is still a valid one.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) {
        let mut state = self.lock();
        state.last = Instant::now();
        if state.open == 0 && state.head_started.is_none() {
            state.head_started = Some(state.last);
            drop(state);
            self.changed.notify_one();
        }
    }

    fn wrote(&self) {
        self.lock().last = Instant::now();
    }

    /// A request's head was parsed: it is open until the guard drops (its answer produced).
    fn begin(self: &Arc<Self>) -> RequestOpen {
        let mut state = self.lock();
        state.open += 1;
        state.head_started = None;
        state.last = Instant::now();
        RequestOpen(self.clone())
    }
}

/// One open request of a connection.
struct RequestOpen(Arc<Activity>);

impl Drop for RequestOpen {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.open -= 1;
        state.last = Instant::now();
        drop(state);
        self.0.changed.notify_one();
    }
}

/// A connection that can be asked to finish what it started and close.
trait Graceful: std::future::Future {
    /// Finish the request in progress (its answer written out), then close; close at once
    /// when idle.
    fn shut_down(self: Pin<&mut Self>);
}

impl<I, B, S> Graceful for hyper::server::conn::http1::Connection<I, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn shut_down(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Serves `app` on `listener`'s connections until `shutdown` turns true, then stops accepting,
/// lets each connection finish the answer it is writing (and close), and returns when all have
/// closed. Dropping the returned future drops every connection at once. HTTP/1 only: a client
/// speaking HTTP/2 gets a parse error.
pub async fn serve(
    mut listener: Limited,
    app: Router,
    edge: Edge,
    closed: Family<CloseLabels, Counter>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        // hyper's own timer also runs while a keep-alive connection waits for its next
        // request, which would make the idle timeout the header timeout: the watchdog keeps
        // the two apart.
        .header_read_timeout(None)
        .max_buf_size(edge.max_read_buffer);
    let mut connections = tokio::task::JoinSet::new();
    let mut stop = shutdown.clone();
    loop {
        tokio::select! {
            (io, _peer) = listener.accept() => {
                let activity = io.activity.clone();
                let service = {
                    let activity = activity.clone();
                    let app = app.clone();
                    hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                        let open = activity.begin();
                        let answer = app.clone().oneshot(request.map(axum::body::Body::new));
                        async move {
                            let answer = answer.await;
                            drop(open);
                            answer
                        }
                    })
                };
                let connection = http.serve_connection(hyper_util::rt::TokioIo::new(io), service);
                let closed = closed.clone();
                let shutdown = shutdown.clone();
                connections.spawn(async move {
                    if let Some(reason) = watch(connection, &activity, &edge, shutdown).await {
                        tracing::debug!(reason = reason.as_str(), "connection closed");
                        closed
                            .get_or_create(&CloseLabels {
                                reason: reason.as_str().into(),
                            })
                            .inc();
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = stopped(&mut stop) => break,
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// Returns once `shutdown` is true (never, if its sender is gone without saying so).
async fn stopped(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    if shutdown.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Drives `connection` until it ends on its own (`None`) or its head or idle deadline passes
/// (the connection is dropped, which closes it, and the reason returned). Once `shutdown` turns
/// true the connection is asked to finish its answer and close.
async fn watch<F: Graceful>(
    connection: F,
    activity: &Activity,
    edge: &Edge,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Option<Close> {
    tokio::pin!(connection);
    let mut shutting_down = false;
    loop {
        let changed = activity.changed.notified();
        let deadline = activity.lock().deadline(edge);
        let wake = match deadline {
            Some((at, reason)) if at <= Instant::now() => return Some(reason),
            Some((at, _)) => at,
            // A request is open: look again when it ends (or after a while).
            None => Instant::now() + edge.idle_timeout,
        };
        tokio::select! {
            _ = &mut connection => return None,
            () = tokio::time::sleep_until(wake) => {}
            () = changed => {}
            () = stopped(&mut shutdown), if !shutting_down => {
                shutting_down = true;
                connection.as_mut().shut_down();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EDGE: Edge = Edge {
        header_read_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        max_read_buffer: 64 << 10,
    };

    #[test]
    fn a_head_has_the_header_timeout_an_idle_connection_the_idle_timeout_and_a_request_none() {
        let t0 = Instant::now();
        let idle = ActivityState {
            open: 0,
            last: t0,
            head_started: None,
        };
        assert_eq!(
            idle.deadline(&EDGE),
            Some((t0 + Duration::from_secs(60), Close::IdleTimeout))
        );
        let head = ActivityState {
            head_started: Some(t0 + Duration::from_secs(5)),
            last: t0 + Duration::from_secs(9),
            ..idle
        };
        // Bytes trickling in do not move the head's deadline.
        assert_eq!(
            head.deadline(&EDGE),
            Some((t0 + Duration::from_secs(15), Close::HeaderTimeout))
        );
        let open = ActivityState { open: 1, ..head };
        assert_eq!(open.deadline(&EDGE), None);
    }
}
