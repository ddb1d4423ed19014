//! Serving /metrics over TLS, with certificate files that rotate under a running agent.
//!
//! Certificates on Kubernetes are Secrets mounted as files that the kubelet swaps atomically; the
//! agent notices a change of either file and serves the new pair to new connections. A pair that
//! fails to load (a half-written rotation) is logged and the old one kept.
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use axum_server::tls_rustls::RustlsConfig;

/// How often the files are checked: two stat calls, far below any scrape's cost.
const RELOAD_CHECK: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
#[error("loading TLS certificate {cert} / key {key}: {source}")]
pub struct TlsError {
    cert: PathBuf,
    key: PathBuf,
    source: std::io::Error,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

pub async fn load(files: &TlsFiles) -> Result<RustlsConfig, TlsError> {
    // One process-wide provider (ring, as kube's client uses); installing twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    RustlsConfig::from_pem_file(&files.cert, &files.key)
        .await
        .map_err(|source| TlsError {
            cert: files.cert.clone(),
            key: files.key.clone(),
            source,
        })
}

/// Watches the files and reloads `config` when either changes; runs until the process ends.
pub async fn reload_on_change(config: RustlsConfig, files: TlsFiles) {
    let stamp = |f: &TlsFiles| (modified(&f.cert), modified(&f.key));
    let mut seen = stamp(&files);
    let mut tick = tokio::time::interval(RELOAD_CHECK);
    loop {
        tick.tick().await;
        let now = stamp(&files);
        if now == seen {
            continue;
        }
        match config.reload_from_pem_file(&files.cert, &files.key).await {
            Ok(()) => {
                seen = now;
                tracing::info!(cert = %files.cert.display(), "TLS certificate reloaded");
            }
            // Leave `seen` alone: the next check retries, e.g. once the key has been written too.
            Err(e) => {
                tracing::warn!(error = %e, "TLS files changed but do not load; keeping the previous certificate")
            }
        }
    }
}
