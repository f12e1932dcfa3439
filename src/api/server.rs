//! The HTTP/1 server loop: connections with bounded lifetimes and a bounded count.
//!
//! - **Header-read timeout** (`SPOOL_HEADER_TIMEOUT_MS`): a connection must deliver a whole
//!   request head within this time of being opened, and, kept alive, within this time of its
//!   previous response ending; otherwise it is closed. This ends both slow-header clients and idle
//!   keep-alive connections. A response in progress — an attach stream — is not affected.
//! - **Write deadline** (`SPOOL_SLOW_CLIENT_TIMEOUT_MS`, see `slow_clients`): a client that stops
//!   reading is cut.
//! - **Connection cap** (`SPOOL_MAX_CONNECTIONS`): at the cap, a new connection evicts the oldest
//!   connection that is not serving a request (still sending its head, or idle between
//!   requests), so health checks and the API keep answering however many such connections
//!   pile up; when every connection is serving a request, the new one gets `503` and is closed.
//!   The process raises its open-file limit to the hard limit at start and keeps the cap below it.
//!
//! On shutdown the server stops accepting, lets every connection finish its request in progress
//! and closes it (the caller bounds this with the grace period).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::slow_clients::WriteDeadline;
use crate::executor::Metrics;

/// Limits of the server's connections.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    /// Write deadline (see `slow_clients`).
    pub write_timeout: Duration,
}

/// One connection, as the accept loop sees it.
struct Conn {
    /// Serving a request (from its head until its response body is dropped).
    busy: AtomicBool,
    evict: CancellationToken,
    closed: AtomicBool,
}

/// Raises the soft limit on open files to the hard limit; returns the soft limit now in force.
pub fn raise_open_files_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return Some(hard);
    }
    Some(soft)
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains (see the module docs).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    let conns: Arc<Mutex<VecDeque<Arc<Conn>>>> = Arc::default();
    let draining = CancellationToken::new();
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, _addr) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // out of file descriptors, most likely: let connections close
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await; // backoff
                    continue;
                }
            },
        };
        while tasks.try_join_next().is_some() {}
        let _ = stream.set_nodelay(true);
        if !make_room(&conns, limits.max_connections, &metrics) {
            metrics.connections_refused.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(refuse(stream));
            continue;
        }
        let conn = Arc::new(Conn {
            busy: AtomicBool::new(false),
            evict: CancellationToken::new(),
            closed: AtomicBool::new(false),
        });
        conns.lock().unwrap().push_back(conn.clone());
        let io = TokioIo::new(WriteDeadline::new(
            stream,
            limits.write_timeout,
            metrics.clone(),
        ));
        tasks.spawn(serve_connection(
            io,
            app.clone(),
            conn,
            limits.header_timeout,
            draining.clone(),
        ));
    }
    drop(listener);
    draining.cancel();
    while tasks.join_next().await.is_some() {}
}

/// Below the cap, or made so by evicting the oldest connection that serves no request; false
/// when every connection is serving one.
fn make_room(conns: &Mutex<VecDeque<Arc<Conn>>>, max: usize, metrics: &Metrics) -> bool {
    let mut conns = conns.lock().unwrap();
    conns.retain(|c| !c.closed.load(Ordering::Relaxed));
    if conns.len() < max {
        return true;
    }
    let Some(i) = conns.iter().position(|c| !c.busy.load(Ordering::Relaxed)) else {
        return false;
    };
    let victim = conns.remove(i).expect("found");
    victim.evict.cancel();
    metrics.connections_evicted.fetch_add(1, Ordering::Relaxed);
    true
}

async fn refuse(mut stream: tokio::net::TcpStream) {
    let body = r#"{"error":{"code":"too_many_connections","message":"the server is at its connection cap; retry shortly"}}"#;
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        stream.write_all(response.as_bytes()),
    )
    .await;
}

async fn serve_connection(
    io: TokioIo<WriteDeadline>,
    app: Router,
    conn: Arc<Conn>,
    header_timeout: Duration,
    draining: CancellationToken,
) {
    let service_conn = conn.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        service_conn.busy.store(true, Ordering::Relaxed);
        let guard = BusyGuard(service_conn.clone());
        let app = app.clone();
        async move {
            let response = app
                .oneshot(request.map(Body::new))
                .await
                .unwrap_or_else(|never| match never {});
            Ok::<_, std::convert::Infallible>(response.map(|body| {
                Body::new(Guarded {
                    inner: body,
                    _guard: guard,
                })
            }))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let mut shutting_down = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::trace!(error = %e, "connection ended");
                }
                break;
            }
            _ = conn.evict.cancelled() => break,
            _ = draining.cancelled(), if !shutting_down => {
                shutting_down = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
    conn.closed.store(true, Ordering::Relaxed);
}

/// Marks its connection as serving a request until dropped (with the response body).
struct BusyGuard(Arc<Conn>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::Relaxed);
    }
}

/// A response body that keeps its connection marked busy while it is being sent.
struct Guarded {
    inner: Body,
    _guard: BusyGuard,
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
