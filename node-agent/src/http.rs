//! The HTTP side: /metrics read from the kernel maps at scrape time, plus health endpoints, and
//! the one accept loop (plain or TLS) that bounds what a client can hold: connections, header
//! bytes, header time and shutdown time.
use std::collections::BTreeMap;
use std::future::Future;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tower::ServiceExt;
use tower_http::compression::CompressionLayer;

use crate::metrics::wants_protobuf;
use crate::scrape::Source;
use crate::tls::ServerTls;

#[derive(Clone, Default)]
pub struct AppState {
    ready: Arc<AtomicBool>,
    source: Arc<std::sync::OnceLock<Source>>,
}

impl AppState {
    pub fn set_source(&self, source: Source) {
        if self.source.set(source).is_ok() {
            self.ready.store(true, Ordering::Release);
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}{hint}")]
pub struct BindError {
    addr: SocketAddr,
    source: std::io::Error,
    hint: &'static str,
}

/// Binds first, so a port in use is reported before any BPF work.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr).await.map_err(|source| {
        let hint = match source.kind() {
            std::io::ErrorKind::AddrInUse => {
                " (another process uses this port; choose one with --listen)"
            }
            std::io::ErrorKind::PermissionDenied => " (ports below 1024 need CAP_NET_BIND_SERVICE)",
            _ => "",
        };
        BindError { addr, source, hint }
    })
}

pub fn router(state: AppState, auth: Option<Arc<crate::auth::KubeAuth>>) -> Router {
    // Only the data is protected: probes (/healthz, /readyz) stay open, as kube-rbac-proxy does.
    let mut scrape = Router::new().route("/metrics", get(metrics));
    if let Some(auth) = auth {
        scrape = crate::auth::protect(scrape, auth);
    }
    // Prometheus asks for gzip; a text scrape of many devices shrinks ~20x.
    let scrape = scrape.layer(CompressionLayer::new());
    Router::new()
        .merge(scrape)
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route(
            "/",
            get(|| async { "bio-exporter node-agent: see /metrics\n" }),
        )
        .with_state(state)
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "BPF programs not attached yet\n",
        )
            .into_response()
    }
}

async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if state.source.get().is_none() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "BPF programs not attached yet\n",
        )
            .into_response();
    }
    let protobuf = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(wants_protobuf);
    // Map reads, sysfs and kubelet-directory scans are syscalls: keep them off the async workers.
    let rendered = tokio::task::spawn_blocking(move || {
        state.source.get().expect("checked above").render(protobuf)
    })
    .await;
    match rendered {
        Ok(Ok((content_type, body))) => {
            ([(header::CONTENT_TYPE, content_type)], body).into_response()
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "scrape failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading BPF maps failed: {e}\n"),
            )
                .into_response()
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("scrape task failed: {e}\n"),
        )
            .into_response(),
    }
}

/// Request line plus headers of one request. A Prometheus scrape sends < 2 KiB; a bearer token
/// may be 16 KiB (auth::MAX_TOKEN_LEN). hyper answers 431 when a head is still incomplete past
/// this; it checks between reads, so one read can take the buffer up to twice this (a head
/// arriving whole may be a little longer). hyper's default (~400 KiB) let 1,500 unfinished
/// heads take 600 MB.
const MAX_HEAD_BYTES: usize = 32 * 1024;

/// What one client may hold; set from the command line.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once (handshaking, reading a request, or serving one).
    pub max_connections: usize,
    /// For the TLS handshake, for each request's head from the moment the server waits for it
    /// (so it also ends idle keep-alive connections), and for a response write that makes no
    /// progress.
    pub header_timeout: Duration,
    /// After the shutdown signal, how long responses in progress may take to finish.
    pub shutdown_timeout: Duration,
}

/// One open connection's entry in [`Slots`].
#[derive(Default)]
struct Slot {
    /// Wakes the connection's task to drop the connection.
    evict: Notify,
    /// Set once the client has sent a whole request head: it is a client, not a slow loris.
    proven: AtomicBool,
}

/// The open connections, oldest first. When all slots are taken, a new connection takes the slot
/// of the oldest one that has not yet sent a whole request: a scraper sends its head at once, so
/// a flood of unfinished heads cannot lock it out (they only evict each other), while memory stays
/// bounded by the cap. Only when every slot is serving real requests is a new connection refused.
#[derive(Default)]
struct Slots {
    open: Mutex<BTreeMap<u64, Arc<Slot>>>,
    next_id: AtomicU64,
}

/// A claimed slot; freed when the connection's task ends.
struct SlotGuard {
    slots: Arc<Slots>,
    id: u64,
    slot: Arc<Slot>,
}

impl Slots {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Slot>>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    fn claim(self: &Arc<Self>, max: usize) -> Option<SlotGuard> {
        let mut open = self.lock();
        if open.len() >= max {
            let victim = open
                .iter()
                .find(|(_, s)| !s.proven.load(Ordering::Acquire))
                .map(|(id, _)| *id)?;
            if let Some(evicted) = open.remove(&victim) {
                // notify_one keeps the wake-up if the task is not waiting yet.
                evicted.evict.notify_one();
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot::default());
        open.insert(id, slot.clone());
        Some(SlotGuard {
            slots: self.clone(),
            id,
            slot,
        })
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.slots.lock().remove(&self.id);
    }
}

/// Serves `app` on `listener` (over TLS when `tls` is given) until `shutdown` completes, then
/// stops accepting, lets responses in progress finish for at most `limits.shutdown_timeout`, and
/// returns regardless: the caller detaches the BPF programs whatever the clients do.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<ServerTls>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Slots::default());
    let (stop, stopped) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and the like: pause rather than spin; clients wait in the backlog.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(guard) = slots.claim(limits.max_connections) else {
            tracing::debug!(%peer, max = limits.max_connections, "refused: every connection is serving a request");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (app, tls, stopped) = (app.clone(), tls.clone(), stopped.clone());
        tokio::spawn(async move {
            match tls {
                None => connection(tcp, app, &guard.slot, limits, stopped).await,
                Some(tls) => handshake(tcp, tls, app, &guard.slot, limits, stopped).await,
            }
            drop(guard);
        });
    }
    drop(listener);
    let _ = stop.send(true);
    let deadline = tokio::time::Instant::now() + limits.shutdown_timeout;
    while slots.len() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = slots.len();
    if left > 0 {
        tracing::warn!(
            connections = left,
            timeout = ?limits.shutdown_timeout,
            "shutdown timeout passed; closing the connections still open"
        );
    }
}

async fn handshake(
    tcp: tokio::net::TcpStream,
    tls: ServerTls,
    app: Router,
    slot: &Slot,
    limits: Limits,
    mut stopped: watch::Receiver<bool>,
) {
    let accept = tokio::time::timeout(limits.header_timeout, tls.acceptor().accept(tcp));
    let stream = tokio::select! {
        r = accept => r,
        _ = slot.evict.notified() => return,
        _ = stopped.wait_for(|s| *s) => return,
    };
    match stream {
        Ok(Ok(stream)) => connection(stream, app, slot, limits, stopped).await,
        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!(timeout = ?limits.header_timeout, "TLS handshake timed out"),
    }
}

async fn connection<I>(
    io: I,
    app: Router,
    slot: &Slot,
    limits: Limits,
    mut stopped: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let proven = &slot.proven;
    let service = hyper::service::service_fn(|request| {
        // hyper calls the service once a whole head has arrived.
        proven.store(true, Ordering::Release);
        app.clone().oneshot(request)
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD_BYTES);
    let io = WriteStall::new(io, limits.header_timeout);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let finished = tokio::select! {
        r = conn.as_mut() => Some(r),
        _ = slot.evict.notified() => return,
        _ = stopped.wait_for(|s| *s) => None,
    };
    let result = match finished {
        Some(r) => r,
        None => {
            // Closes a connection between requests now, and one mid-response after it.
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                r = conn.as_mut() => r,
                _ = slot.evict.notified() => return,
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Fails a write that has made no progress for `limit`. A client that sends requests (so its
/// connection is never evicted) but stops reading the responses would otherwise hold its slot
/// for ever once the socket buffers are full.
struct WriteStall<I> {
    io: I,
    limit: Duration,
    stalled_since: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<I> WriteStall<I> {
    fn new(io: I, limit: Duration) -> Self {
        Self {
            io,
            limit,
            stalled_since: None,
        }
    }

    /// Passes a write's outcome on, turning a `Pending` that lasted `limit` into an error.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if poll.is_ready() {
            self.stalled_since = None;
            return poll;
        }
        let limit = self.limit;
        let timer = self
            .stalled_since
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client stopped reading its response",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for WriteStall<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for WriteStall<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_flush(cx);
        self.watch(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_shutdown(cx);
        self.watch(cx, poll)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_table_evicts_the_oldest_unproven_connection_and_refuses_when_all_are_proven() {
        let slots = Arc::new(Slots::default());
        let first = slots.claim(2).unwrap();
        let second = slots.claim(2).unwrap();
        first.slot.proven.store(true, Ordering::Release);
        // `second` is the oldest that has not sent a request: it goes, `first` stays.
        let third = slots.claim(2).unwrap();
        assert_eq!(slots.len(), 2);
        let open: Vec<u64> = slots.lock().keys().copied().collect();
        assert_eq!(open, vec![first.id, third.id]);
        // The evicted task is woken even though it was not waiting yet.
        assert!(futures::FutureExt::now_or_never(second.slot.evict.notified()).is_some());
        third.slot.proven.store(true, Ordering::Release);
        assert!(slots.claim(2).is_none());
        drop(first);
        assert_eq!(slots.len(), 1);
        assert!(slots.claim(2).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_that_makes_no_progress_fails_after_the_limit() {
        use tokio::io::AsyncWriteExt;
        let (pipe, _reader_that_never_reads) = tokio::io::duplex(64);
        let mut io = WriteStall::new(pipe, Duration::from_secs(2));
        io.write_all(&[0; 64]).await.unwrap();
        let err = tokio::time::timeout(Duration::from_secs(60), io.write_all(&[0; 1]))
            .await
            .expect("a write stalled for 60 s was never cut")
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_but_steady_reader_is_not_cut() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (pipe, mut reader) = tokio::io::duplex(64);
        let mut io = WriteStall::new(pipe, Duration::from_secs(2));
        let read = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut chunk = [0; 64];
            while got.len() < 640 {
                // Each wait is shorter than the limit; together they are far longer.
                tokio::time::sleep(Duration::from_secs(1)).await;
                let n = reader.read(&mut chunk).await.unwrap();
                got.extend_from_slice(&chunk[..n]);
            }
            got.len()
        });
        io.write_all(&[1; 640]).await.unwrap();
        assert_eq!(read.await.unwrap(), 640);
    }
}
