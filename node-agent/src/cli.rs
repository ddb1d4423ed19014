//! Command line of the node-agent.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::bpf::AttachMode;

/// Block-IO latency and size histograms from eBPF, served as Prometheus metrics.
///
/// Without a subcommand the agent loads its BPF programs and serves /metrics, /healthz and /readyz.
#[derive(Debug, Parser)]
#[command(name = "node-agent", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print bcc-style ASCII log2 histograms, from the kernel or from a running agent.
    Histogram(HistogramArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to serve /metrics, /healthz and /readyz on.
    #[arg(long, env = "BIO_LISTEN", default_value = "0.0.0.0:9435")]
    pub listen: SocketAddr,

    /// Value of the `node` label on every series [default: this host's name]. An empty value is
    /// an error: it is what an unset NODE_NAME gives, and the host name is not the node name then.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    #[command(flatten)]
    pub devices: DeviceArgs,

    #[command(flatten)]
    pub bpf: BpfArgs,

    #[command(flatten)]
    pub volumes: VolumeArgs,

    /// Serve over TLS with this PEM certificate (chain); reloaded when the file changes.
    #[arg(long, env = "BIO_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,

    /// PEM private key for --tls-cert-file.
    #[arg(long, env = "BIO_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,

    /// Most client connections open at once (a Prometheus uses one or two). When all are taken,
    /// a new connection replaces the oldest one that has not sent a whole request yet.
    #[arg(long, env = "BIO_MAX_CONNECTIONS", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_connections: u32,

    /// Time a client has for the TLS handshake and for each request's headers; also how long an
    /// idle keep-alive connection stays open, and how long a response write may make no progress.
    #[arg(long, env = "BIO_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,

    /// On SIGTERM/SIGINT, how long responses in progress may take to finish; then the agent
    /// closes what is left, detaches its BPF programs and exits.
    #[arg(long, env = "BIO_SHUTDOWN_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Who may read /metrics: `kubernetes` requires a bearer token that the API server
    /// authenticates (TokenReview) and authorizes for `get` on the non-resource URL /metrics
    /// (SubjectAccessReview), like kube-rbac-proxy. /healthz and /readyz stay open.
    #[arg(long, value_enum, env = "BIO_AUTH", default_value = "none")]
    pub auth: crate::auth::AuthMode,

    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    #[arg(long, env = "BIO_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log as JSON lines instead of text.
    #[arg(long)]
    pub log_json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct DeviceArgs {
    /// Export only devices whose kernel name matches one of these regexes (repeatable)
    /// [default: all devices]. Unanchored, like grep: `^nvme` matches nvme0n1, `loop1` also
    /// matches loop10; write `^loop1$` for exactly one name.
    #[arg(long = "device-include", value_name = "REGEX")]
    pub include: Vec<String>,

    /// Never export devices whose kernel name matches one of these regexes (repeatable;
    /// unanchored, like grep: `^loop` excludes loop0, loop1, ...); wins over --device-include.
    #[arg(long = "device-exclude", value_name = "REGEX")]
    pub exclude: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct VolumeArgs {
    /// Label devices that back a PersistentVolume with persistentvolume, persistentvolumeclaim
    /// and namespace (needs read access to PersistentVolumes: in-cluster config or KUBECONFIG).
    #[arg(long, env = "BIO_PV_LABELS", default_value_t = false, action = clap::ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    pub pv_labels: bool,

    /// The kubelet's root directory as the agent sees it, where pod volume mounts are found
    /// (mount it read-only with HostToContainer propagation). With --pv-labels it must exist.
    #[arg(long, env = "BIO_KUBELET_ROOT", default_value = "/var/lib/kubelet")]
    pub kubelet_root: PathBuf,

    /// The same directory's path on the host, if the agent mounts it elsewhere: the kubelet's
    /// block-volume symlinks point into it. Default: --kubelet-root.
    #[arg(long, env = "BIO_HOST_KUBELET_ROOT", value_name = "PATH")]
    pub host_kubelet_root: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct BpfArgs {
    /// How to attach to the block layer; auto probes tp_btf, raw_tp, tracepoint, kprobe in turn.
    #[arg(long, value_enum, env = "BIO_ATTACH", default_value = "auto")]
    pub attach: AttachMode,
}

#[derive(Debug, Args)]
pub struct HistogramArgs {
    /// Show only this device (kernel name, e.g. sda or loop0).
    #[arg(long)]
    pub device: Option<String>,

    /// Time between prints.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,

    /// Number of prints before exiting [default: until interrupted].
    #[arg(long)]
    pub count: Option<u64>,

    /// Read a running agent's /metrics at this URL instead of loading BPF programs.
    #[arg(long, value_name = "URL")]
    pub from: Option<String>,

    #[command(flatten)]
    pub bpf: BpfArgs,
}

/// Parses "250ms", "1s", "2m" or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 1s, 500ms"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => {
            return Err(format!(
                "invalid duration unit {unit:?} in {s:?}: use ms, s or m"
            ))
        }
    };
    if !seconds.is_finite() || seconds <= 0.0 {
        return Err(format!("duration {s:?} must be positive"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("1h").is_err());
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn accepts_the_operators_daemonset_args() {
        // Mirrors operator/src/resources/daemonset.rs agent_args(): a flag the agent lacks would
        // crash-loop every agent pod.
        let cli = Cli::try_parse_from([
            "node-agent",
            "--listen=0.0.0.0:9500",
            "--node-name=$(NODE_NAME)",
            "--attach=raw_tp",
            "--device-include=^nvme",
            "--device-exclude=^loop",
            "--log-level=debug",
            "--kubelet-root=/var/lib/kubelet",
            "--pv-labels=false",
        ])
        .unwrap();
        assert!(!cli.serve.volumes.pv_labels);
        assert_eq!(cli.serve.bpf.attach, AttachMode::RawTp);
        let on = Cli::try_parse_from(["node-agent", "--pv-labels"]).unwrap();
        assert!(on.serve.volumes.pv_labels);
    }

    #[test]
    fn defaults_match_the_seed_port() {
        let cli = Cli::try_parse_from(["node-agent"]).unwrap();
        assert_eq!(cli.serve.listen.port(), 9435);
        assert_eq!(cli.serve.bpf.attach, AttachMode::Auto);
        assert_eq!(cli.serve.max_connections, 64);
        assert_eq!(cli.serve.header_timeout, Duration::from_secs(10));
        assert_eq!(cli.serve.shutdown_timeout, Duration::from_secs(5));
    }

    #[test]
    fn zero_connections_is_refused() {
        let err = Cli::try_parse_from(["node-agent", "--max-connections=0"]).unwrap_err();
        assert!(err.to_string().contains("--max-connections"), "{err}");
    }
}
