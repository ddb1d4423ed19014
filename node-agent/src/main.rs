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
mod unobserved;
mod volumes;

use std::path::PathBuf;
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

use cli::{Command, ServeArgs};
use devices::DeviceFilter;

/// Exit codes: 1 for runtime failures, 2 for bad command-line input (like clap's own).
const EXIT_FAILURE: u8 = 1;
const EXIT_USAGE: u8 = 2;

/// What is left of the runtime after serve() returned gets this long.
const RUNTIME_SHUTDOWN: std::time::Duration = std::time::Duration::from_millis(500);

fn main() -> ExitCode {
    let cli = cli::parse();
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
    // Dropping the runtime would wait for every blocking task (a scrape stuck in a read): the
    // shutdown deadline has passed and the programs are detached, so do not wait long.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
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
    #[error(transparent)]
    NodeName(#[from] NodeNameError),
    #[error("--kubelet-root {}: {problem} (--pv-labels finds pod volumes there; pass the kubelet's root directory as mounted in this container)", path.display())]
    KubeletRoot { path: PathBuf, problem: String },
    #[error("--pv-labels needs the Kubernetes API (in-cluster ServiceAccount or KUBECONFIG): {0}")]
    PvLabels(String),
    #[error("{0}")]
    Other(String),
}

impl AgentError {
    fn exit_code(&self) -> u8 {
        match self {
            AgentError::Usage(_) | AgentError::NodeName(_) | AgentError::KubeletRoot { .. } => {
                EXIT_USAGE
            }
            _ => EXIT_FAILURE,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeNameError {
    #[error("--node-name is empty (NODE_NAME unset or empty?): pass the node's name, e.g. from the downward API's spec.nodeName, or leave the flag out to use this host's name")]
    Empty,
    #[error("--node-name {0:?} holds an unexpanded $(VAR) reference: the pod spec must define that variable (the operator's DaemonSet sets NODE_NAME from spec.nodeName)")]
    Unexpanded(String),
}

/// The `node` label. Falling back to the host name on an empty flag would be silent and wrong
/// in a pod (its host name is the pod's name unless hostNetwork), so only a missing flag does.
fn node_name(flag: Option<String>) -> Result<String, NodeNameError> {
    match flag {
        Some(n) if n.trim().is_empty() => Err(NodeNameError::Empty),
        Some(n) if n.contains("$(") => Err(NodeNameError::Unexpanded(n)),
        Some(n) => Ok(n),
        None => Ok(std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into())),
    }
}

/// With --pv-labels, the kubelet root must be a directory now: the DaemonSet mounts it as a
/// hostPath of type Directory, which the kubelet already created, so a missing one is a wrong
/// path (k0s and MicroK8s use others) that would otherwise just leave every PV label empty.
fn check_kubelet_root(args: &cli::VolumeArgs) -> Result<(), AgentError> {
    if !args.pv_labels {
        return Ok(());
    }
    let problem = match std::fs::metadata(&args.kubelet_root) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => "not a directory".to_string(),
        Err(e) => e.to_string(),
    };
    Err(AgentError::KubeletRoot {
        path: args.kubelet_root.clone(),
        problem,
    })
}

async fn serve(args: ServeArgs) -> Result<(), AgentError> {
    let filter = DeviceFilter::new(&args.devices.include, &args.devices.exclude)?;
    let node = node_name(args.node_name)?;
    check_kubelet_root(&args.volumes)?;
    let tls_files = match (args.tls_cert_file, args.tls_key_file) {
        (Some(cert), Some(key)) => Some(tls::TlsFiles { cert, key }),
        _ => None,
    };
    let tls = tls_files.as_ref().map(tls::load).transpose()?;
    let listener = http::bind(args.listen).await?;
    let state = http::AppState::default();
    let auth_on = args.auth == auth::AuthMode::Kubernetes;
    let auth = auth::setup(args.auth).await?;
    let app = http::router(state.clone(), auth);
    let scheme = if tls.is_some() { "https" } else { "http" };
    if auth_on && tls.is_none() {
        tracing::warn!("--auth=kubernetes without TLS: bearer tokens travel in clear");
    }
    if let (Some(tls), Some(files)) = (&tls, tls_files) {
        tokio::spawn(tls::reload_on_change(tls.clone(), files));
    }
    let limits = http::Limits {
        max_connections: args.max_connections as usize,
        header_timeout: args.header_timeout,
        shutdown_timeout: args.shutdown_timeout,
    };
    let server = tokio::spawn(http::serve(listener, app, tls, limits, shutdown_signal()));
    tracing::info!(listen = %args.listen, %scheme, node = %node, max_connections = limits.max_connections,
        header_timeout = ?limits.header_timeout, "serving /metrics, /healthz, /readyz");

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

    // Returns within --shutdown-timeout of the signal, whatever the clients do.
    let served = server.await;
    // Detach before reporting: the programs must be gone once the process says it stopped.
    attached.detach();
    tracing::info!("BPF programs detached; exiting");
    served.map_err(|e| AgentError::Other(format!("HTTP server task failed: {e}")))
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
