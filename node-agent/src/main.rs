//! node-agent: block-IO latency and size histograms from eBPF, served to Prometheus.
mod auth;
mod bpf;
mod cli;
mod devices;
mod histogram_view;
mod http;
mod metrics;
mod ops;
mod scrape;
mod series_epochs;
mod snapshot;
mod tls;
mod volumes;

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use cli::{Cli, Command, ServeArgs};
use devices::DeviceFilter;

/// Exit codes: 1 for runtime failures, 2 for bad command-line input (like clap's own).
const EXIT_FAILURE: u8 = 1;
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.serve.log_level, cli.serve.log_json);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let result = match cli.command {
        Some(Command::Histogram(args)) => runtime.block_on(histogram_view::run(args)),
        None => runtime.block_on(serve(cli.serve)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// kube's client logs every failed connection attempt at ERROR; the PV watch already reports
/// each change of its health once, so during an API outage these would only repeat it.
const QUIET_KUBE_CLIENT: &str = "kube_client::client::builder=off";

fn init_logging(level: &str, json: bool) {
    let directives = if level.contains("kube_client") {
        level.to_string()
    } else {
        format!("{level},{QUIET_KUBE_CLIENT}")
    };
    let filter = EnvFilter::try_new(&directives).unwrap_or_else(|e| {
        eprintln!("warning: invalid --log-level {level:?} ({e}); using info");
        EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Usage(#[from] devices::InvalidDeviceRegex),
    #[error(transparent)]
    Bind(#[from] http::BindError),
    #[error(transparent)]
    Bpf(#[from] bpf::BpfError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Auth(#[from] auth::AuthSetupError),
    #[error("--pv-labels needs the Kubernetes API (in-cluster ServiceAccount or KUBECONFIG): {0}")]
    PvLabels(String),
    #[error("{0}")]
    Other(String),
}

impl AgentError {
    fn exit_code(&self) -> u8 {
        match self {
            AgentError::Usage(_) => EXIT_USAGE,
            _ => EXIT_FAILURE,
        }
    }
}

fn node_name(flag: Option<String>) -> String {
    flag.filter(|n| !n.is_empty()).unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into())
    })
}

async fn serve(args: ServeArgs) -> Result<(), AgentError> {
    let filter = DeviceFilter::new(&args.devices.include, &args.devices.exclude)?;
    let node = node_name(args.node_name);
    let listener = http::bind(args.listen).await?;
    let state = http::AppState::default();
    let auth_on = args.auth == auth::AuthMode::Kubernetes;
    let auth = auth::setup(args.auth).await?;
    let app = http::router(state.clone(), auth);
    let tls_files = match (args.tls_cert_file, args.tls_key_file) {
        (Some(cert), Some(key)) => Some(tls::TlsFiles { cert, key }),
        _ => None,
    };
    let scheme = if tls_files.is_some() { "https" } else { "http" };
    if auth_on && tls_files.is_none() {
        tracing::warn!("--auth=kubernetes without TLS: bearer tokens travel in clear");
    }
    let server = match tls_files {
        None => tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown_signal())
                .await
        }),
        Some(files) => {
            let config = tls::load(&files).await?;
            tokio::spawn(tls::reload_on_change(config.clone(), files));
            let handle = axum_server::Handle::new();
            let on_signal = handle.clone();
            tokio::spawn(async move {
                shutdown_signal().await;
                on_signal.graceful_shutdown(Some(std::time::Duration::from_secs(5)));
            });
            let std_listener = listener
                .into_std()
                .map_err(|e| AgentError::Other(e.to_string()))?;
            tokio::spawn(async move {
                axum_server::from_tcp_rustls(std_listener, config)
                    .handle(handle)
                    .serve(app.into_make_service())
                    .await
            })
        }
    };
    tracing::info!(listen = %args.listen, %scheme, node = %node, "serving /metrics, /healthz, /readyz");

    let volumes = match args.volumes.pv_labels {
        true => Some(start_volume_labels(&args.volumes).await?),
        false => None,
    };
    let attached = std::sync::Arc::new(bpf::attach(args.bpf.attach)?);
    if let Some(labeler) = &volumes {
        // Usually long done by now: attaching takes longer than a PV list.
        if !labeler.wait_synced(PV_LIST_GRACE).await {
            tracing::warn!(
                "PersistentVolumes not listed yet; devices are labelled by PV name only until they are"
            );
        }
    }
    let labels = metrics::Labels {
        node,
        attach_mode: attached.mode.to_string(),
    };
    state.set_source(scrape::Source::new(
        attached.clone(),
        filter,
        labels,
        volumes,
    ));
    tracing::info!(mode = %attached.mode, "BPF programs attached; ready");

    let served = server.await;
    // Detach before reporting: the programs must be gone once the process says it stopped.
    attached.detach();
    tracing::info!("BPF programs detached; exiting");
    match served {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(AgentError::Other(format!("HTTP server failed: {e}"))),
        Err(e) => Err(AgentError::Other(format!("HTTP server task failed: {e}"))),
    }
}

/// How long the first scrape may wait for the PV list; beyond it /metrics serves without claims
/// rather than not at all.
const PV_LIST_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

async fn start_volume_labels(args: &cli::VolumeArgs) -> Result<volumes::VolumeLabeler, AgentError> {
    let config = kube::Config::infer()
        .await
        .map_err(|e| AgentError::PvLabels(e.to_string()))?;
    let client = kube::Client::try_from(config).map_err(|e| AgentError::PvLabels(e.to_string()))?;
    let host_kubelet_root = args
        .host_kubelet_root
        .clone()
        .unwrap_or_else(|| args.kubelet_root.clone());
    tracing::info!(
        kubelet_root = %args.kubelet_root.display(),
        host_kubelet_root = %host_kubelet_root.display(),
        "labelling devices with the PersistentVolumes they back"
    );
    Ok(volumes::VolumeLabeler::start(
        client,
        volumes::VolumeConfig {
            kubelet_root: args.kubelet_root.clone(),
            host_kubelet_root,
            ..volumes::VolumeConfig::default()
        },
    )
    .await)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM; stop with SIGINT");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
}
