//! Where the REST API runs: its own OS thread with its own single-threaded runtime, so no
//! flood of requests can take time from the lease keeper, the fence or the HA loop (the
//! agent's runtime is single-threaded too); at most `MAX_CONNECTIONS` connections at a time,
//! each closed when it sends nothing within `FIRST_BYTE_WITHIN` or lives longer than
//! `CONNECTION_LIFETIME` (idle or trickling clients give their slot back soon); optional
//! TLS, whose handshakes run in their own tasks so a slow one never holds up the next
//! `accept`.
//!
//! Handlers that talk to etcd hand that work to the agent's runtime (see `api::Handle`):
//! the etcd clients live there, not on this thread.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

/// Connections served at once; more wait in the kernel's accept queue.
pub const MAX_CONNECTIONS: usize = 256;
/// A connection that has sent nothing by then is closed (health checks send at once).
pub const FIRST_BYTE_WITHIN: Duration = Duration::from_secs(3);
/// A connection's longest life (health checks take milliseconds; keep-alive clients
/// reconnect).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// The longest a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Start the API thread: bind `addr` (retrying until it can), serve `app` forever.
pub fn spawn(addr: String, app: axum::Router, tls: Option<Arc<rustls::ServerConfig>>) {
    let started = std::thread::Builder::new()
        .name("rest-api".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the REST API's runtime");
                    return;
                }
            };
            runtime.block_on(serve_forever(addr, app, tls));
        });
    if let Err(e) = started {
        tracing::error!(error = %e, "cannot start the REST API's thread");
    }
}

async fn serve_forever(addr: String, app: axum::Router, tls: Option<Arc<rustls::ServerConfig>>) {
    loop {
        match TcpListener::bind(&addr).await {
            Ok(listener) => {
                tracing::info!(%addr, tls = tls.is_some(), "REST API listening");
                let limited = Limited::new(listener, tls.clone());
                if let Err(e) = axum::serve(limited, app.clone()).await {
                    tracing::error!(error = %e, "REST API stopped");
                }
            }
            Err(e) => tracing::error!(%addr, error = %e, "cannot bind the REST API; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// A listener that admits at most `MAX_CONNECTIONS` and, with TLS, hands out only
/// connections whose handshake finished.
struct Limited {
    ready: mpsc::Receiver<(Conn, std::net::SocketAddr)>,
    local: io::Result<std::net::SocketAddr>,
}

impl Limited {
    fn new(listener: TcpListener, tls: Option<Arc<rustls::ServerConfig>>) -> Limited {
        let local = listener.local_addr();
        let (tx, ready) = mpsc::channel(MAX_CONNECTIONS);
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        tokio::spawn(async move {
            loop {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors and the like: breathe, then go on.
                        tracing::warn!(error = %e, "REST API accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let tx = tx.clone();
                match &acceptor {
                    None => {
                        if tx
                            .send((Conn::new(Stream::Plain(tcp), permit), peer))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Some(acceptor) => {
                        let acceptor = acceptor.clone();
                        tokio::spawn(async move {
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                                .await
                            {
                                Ok(Ok(s)) => {
                                    let conn = Conn::new(Stream::Tls(Box::new(s)), permit);
                                    let _ = tx.send((conn, peer)).await;
                                }
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, error = %e, "REST API TLS handshake failed");
                                }
                                Err(_) => {
                                    tracing::debug!(%peer, "REST API TLS handshake timed out");
                                }
                            }
                        });
                    }
                }
            }
        });
        Limited { ready, local }
    }
}

impl axum::serve::Listener for Limited {
    type Io = Conn;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Conn, std::net::SocketAddr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The acceptor task ended (its runtime is going away): never hand out more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        match &self.local {
            Ok(a) => Ok(*a),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        }
    }
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// One admitted connection: its slot is given back when it is dropped, and it fails its
/// reads and writes once its lifetime is over.
pub struct Conn {
    stream: Stream,
    _slot: OwnedSemaphorePermit,
    expiry: Pin<Box<tokio::time::Sleep>>,
    /// Until the client's first byte arrives.
    silence: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Conn {
    fn new(stream: Stream, slot: OwnedSemaphorePermit) -> Conn {
        Conn {
            stream,
            _slot: slot,
            expiry: Box::pin(tokio::time::sleep(CONNECTION_LIFETIME)),
            silence: Some(Box::pin(tokio::time::sleep(FIRST_BYTE_WITHIN))),
        }
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.expiry.as_mut().poll(cx).is_ready()
            || self
                .silence
                .as_mut()
                .is_some_and(|s| s.as_mut().poll(cx).is_ready())
    }
}

fn expired_error() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "connection lifetime over")
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.expired(cx) {
            return Poll::Ready(Err(expired_error()));
        }
        let before = buf.filled().len();
        let polled = match &mut this.stream {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        if buf.filled().len() > before {
            this.silence = None;
        }
        polled
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.expired(cx) {
            return Poll::Ready(Err(expired_error()));
        }
        match &mut this.stream {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
