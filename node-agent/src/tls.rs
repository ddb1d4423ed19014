//! Serving /metrics over TLS, with certificate files that rotate under a running agent.
//!
//! Certificates on Kubernetes are Secrets mounted as files that the kubelet swaps atomically; the
//! agent notices a change of either file and serves the new pair to new connections. A pair that
//! fails to load (a half-written rotation) is logged and the old one kept.
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

/// How often the files are checked: two stat calls, far below any scrape's cost.
const RELOAD_CHECK: Duration = Duration::from_secs(2);

/// A certificate chain or key is a few KiB; anything past this is the wrong file (a device, a
/// log), and reading it whole would take the agent's memory with it.
pub const MAX_FILE_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A file named by a flag that cannot be used; the message names the flag and the path.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{flag} {}: {source}", path.display())]
    Io {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{flag} {}: not a regular file (expected a PEM file)", path.display())]
    NotRegular { flag: &'static str, path: PathBuf },
    #[error("{flag} {}: larger than {} KiB (expected a PEM file of a few KiB)", path.display(), MAX_FILE_BYTES / 1024)]
    TooLarge { flag: &'static str, path: PathBuf },
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("loading TLS certificate: {0}")]
    File(#[from] FileError),
    #[error("loading TLS certificate: {flag} {}: {detail}", path.display())]
    Pem {
        flag: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("loading TLS certificate: --tls-cert-file {} / --tls-key-file {}: {source}", cert.display(), key.display())]
    Rustls {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
}

/// Reads a flag's file with a size cap. Opened non-blocking so a FIFO given by mistake is an
/// error instead of a hang; only regular files (or symlinks to them, as Secret mounts are) pass.
pub fn read_bounded(flag: &'static str, path: &Path) -> Result<Vec<u8>, FileError> {
    let io = |source| FileError::Io {
        flag,
        path: path.to_owned(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(io)?;
    if !file.metadata().map_err(io)?.is_file() {
        return Err(FileError::NotRegular {
            flag,
            path: path.to_owned(),
        });
    }
    let mut data = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut data)
        .map_err(io)?;
    if data.len() as u64 > MAX_FILE_BYTES {
        return Err(FileError::TooLarge {
            flag,
            path: path.to_owned(),
        });
    }
    Ok(data)
}

/// The certificate pair being served; swapped whole when the files change, so a handshake sees
/// either the old pair or the new one.
#[derive(Clone)]
pub struct ServerTls(Arc<RwLock<Arc<ServerConfig>>>);

impl ServerTls {
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(
            self.0
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }

    fn replace(&self, config: Arc<ServerConfig>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = config;
    }
}

pub fn load(files: &TlsFiles) -> Result<ServerTls, TlsError> {
    // kube's client uses the process-wide provider; installing it twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    Ok(ServerTls(Arc::new(RwLock::new(build(files)?))))
}

fn build(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let pem_error = |flag, path: &Path, e: pem::Error| TlsError::Pem {
        flag,
        path: path.to_owned(),
        detail: e.to_string(),
    };
    let cert_pem = read_bounded("--tls-cert-file", &files.cert)?;
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error("--tls-cert-file", &files.cert, e))?;
    if certs.is_empty() {
        return Err(pem_error(
            "--tls-cert-file",
            &files.cert,
            pem::Error::NoItemsFound,
        ));
    }
    let key_pem = read_bounded("--tls-key-file", &files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| pem_error("--tls-key-file", &files.key, e))?;
    let rustls_error = |source| TlsError::Rustls {
        cert: files.cert.clone(),
        key: files.key.clone(),
        source,
    };
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(rustls_error)?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(rustls_error)?;
    // The server speaks HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Watches the files and swaps the served pair when either changes; runs until the process ends.
pub async fn reload_on_change(tls: ServerTls, files: TlsFiles) {
    let stamp = |f: &TlsFiles| (modified(&f.cert), modified(&f.key));
    let mut seen = stamp(&files);
    let mut tick = tokio::time::interval(RELOAD_CHECK);
    loop {
        tick.tick().await;
        let now = stamp(&files);
        if now == seen {
            continue;
        }
        match build(&files) {
            Ok(config) => {
                tls.replace(config);
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
