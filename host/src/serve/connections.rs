//! The connection limit on the API address: an axum [`Listener`] that holds one permit per open
//! connection and accepts only while a permit is free.
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
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::serve::Listener;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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
            },
            addr,
        )
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// An accepted connection: its permit and its place in the gauge are given back when hyper
/// drops it.
pub struct Counted {
    io: TcpStream,
    _permit: OwnedSemaphorePermit,
    open: Gauge,
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
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
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
