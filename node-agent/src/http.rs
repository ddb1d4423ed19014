//! The HTTP side: /metrics read from the kernel maps at scrape time, plus health endpoints.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tower_http::compression::CompressionLayer;

use crate::metrics::wants_protobuf;
use crate::scrape::Source;

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
