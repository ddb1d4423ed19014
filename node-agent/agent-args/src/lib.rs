//! The node-agent's command line, defined once: the agent parses it with [`Cli`], and the
//! operator writes a DaemonSet's container args from a [`ServeArgs`] value with
//! [`ServeArgs::flags`], so a renamed or retyped flag changes both or fails to build. Kept to
//! clap (and, for the operator's CRD, serde and schemars): no BPF stack comes with it.

mod modes;

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

pub use modes::{AttachMode, AuthMode, LogLevel};

/// The long names of the serve flags, used by the parser and by [`ServeArgs::flags`].
pub mod flag {
    pub const LISTEN: &str = "listen";
    pub const NODE_NAME: &str = "node-name";
    pub const DEVICE_INCLUDE: &str = "device-include";
    pub const DEVICE_EXCLUDE: &str = "device-exclude";
    pub const ATTACH: &str = "attach";
    pub const PV_LABELS: &str = "pv-labels";
    pub const KUBELET_ROOT: &str = "kubelet-root";
    pub const HOST_KUBELET_ROOT: &str = "host-kubelet-root";
    pub const TLS_CERT_FILE: &str = "tls-cert-file";
    pub const TLS_KEY_FILE: &str = "tls-key-file";
    pub const MAX_CONNECTIONS: &str = "max-connections";
    pub const HEADER_TIMEOUT: &str = "header-timeout";
    pub const SHUTDOWN_TIMEOUT: &str = "shutdown-timeout";
    pub const AUTH: &str = "auth";
    pub const LOG_LEVEL: &str = "log-level";
    pub const LOG_JSON: &str = "log-json";
}

/// Port of /metrics, /healthz and /readyz.
pub const DEFAULT_PORT: u16 = 9435;
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, DEFAULT_PORT));
pub const DEFAULT_MAX_CONNECTIONS: u32 = 64;
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_KUBELET_ROOT: &str = "/var/lib/kubelet";

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

#[derive(Debug, Clone, PartialEq, Args)]
pub struct ServeArgs {
    /// Address to serve /metrics, /healthz and /readyz on.
    #[arg(long = flag::LISTEN, env = "BIO_LISTEN", default_value_t = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Value of the `node` label on every series [default: this host's name]. An empty value is
    /// an error: it is what an unset NODE_NAME gives, and the host name is not the node name then.
    #[arg(long = flag::NODE_NAME, env = "NODE_NAME")]
    pub node_name: Option<String>,

    #[command(flatten)]
    pub devices: DeviceArgs,

    #[command(flatten)]
    pub bpf: BpfArgs,

    #[command(flatten)]
    pub volumes: VolumeArgs,

    /// Serve over TLS with this PEM certificate (chain); reloaded when the file changes.
    #[arg(long = flag::TLS_CERT_FILE, env = "BIO_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,

    /// PEM private key for --tls-cert-file.
    #[arg(long = flag::TLS_KEY_FILE, env = "BIO_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,

    /// Most client connections open at once (a Prometheus uses one or two). When all are taken,
    /// a new connection replaces the oldest one that has not sent a whole request yet.
    #[arg(long = flag::MAX_CONNECTIONS, env = "BIO_MAX_CONNECTIONS",
          default_value_t = DEFAULT_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_connections: u32,

    /// Time a client has for the TLS handshake and for each request's headers; also how long an
    /// idle keep-alive connection stays open, and how long a response write may make no progress.
    #[arg(long = flag::HEADER_TIMEOUT, env = "BIO_HEADER_TIMEOUT", default_value = "10s",
          value_parser = parse_duration)]
    pub header_timeout: Duration,

    /// On SIGTERM/SIGINT, how long responses in progress may take to finish; then the agent
    /// closes what is left, detaches its BPF programs and exits.
    #[arg(long = flag::SHUTDOWN_TIMEOUT, env = "BIO_SHUTDOWN_TIMEOUT", default_value = "5s",
          value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Who may read /metrics.
    #[arg(long = flag::AUTH, value_enum, env = "BIO_AUTH", default_value_t = AuthMode::None)]
    pub auth: AuthMode,

    /// Log filter: error, warn, info, debug, trace, or a tracing directive
    /// (e.g. info,node_agent=debug).
    #[arg(long = flag::LOG_LEVEL, env = "BIO_LOG_LEVEL", default_value = LogLevel::Info.as_str())]
    pub log_level: String,

    /// Log as JSON lines instead of text.
    #[arg(long = flag::LOG_JSON)]
    pub log_json: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Args)]
pub struct DeviceArgs {
    /// Export only devices whose kernel name matches one of these regexes (repeatable)
    /// [default: all devices].
    ///
    /// Device filters are unanchored regexes searched for anywhere in the kernel name, like grep
    /// and node_exporter's `--collector.diskstats.device-exclude`: `^loop` matches loop0 and
    /// loop12 but not xloop0, and `loop1` matches loop1 and loop10; anchor both ends
    /// (`^loop1$`) to name exactly one device. Exclude wins over include. The syntax is the Rust
    /// `regex` crate's, so node_exporter's default exclude pattern works as is.
    #[arg(long = flag::DEVICE_INCLUDE, value_name = "REGEX")]
    pub include: Vec<String>,

    /// Never export devices whose kernel name matches one of these regexes (repeatable); wins
    /// over --device-include.
    ///
    /// Same syntax as --device-include: unanchored, so `^loop` excludes loop0, loop1, ...
    #[arg(long = flag::DEVICE_EXCLUDE, value_name = "REGEX")]
    pub exclude: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Args)]
pub struct VolumeArgs {
    /// Label devices that back a PersistentVolume with persistentvolume, persistentvolumeclaim
    /// and namespace (needs read access to PersistentVolumes: in-cluster config or KUBECONFIG).
    #[arg(long = flag::PV_LABELS, env = "BIO_PV_LABELS", default_value_t = false,
          action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub pv_labels: bool,

    /// The kubelet's root directory as the agent sees it, where pod volume mounts are found
    /// (mount it read-only with HostToContainer propagation). With --pv-labels it must exist.
    #[arg(long = flag::KUBELET_ROOT, env = "BIO_KUBELET_ROOT", default_value = DEFAULT_KUBELET_ROOT)]
    pub kubelet_root: PathBuf,

    /// The same directory's path on the host, if the agent mounts it elsewhere: the kubelet's
    /// block-volume symlinks point into it. Default: --kubelet-root.
    #[arg(long = flag::HOST_KUBELET_ROOT, env = "BIO_HOST_KUBELET_ROOT", value_name = "PATH")]
    pub host_kubelet_root: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, PartialEq, Args)]
pub struct BpfArgs {
    /// How to attach to the block layer.
    #[arg(long = flag::ATTACH, value_enum, env = "BIO_ATTACH", default_value_t = AttachMode::Auto)]
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

/// What the agent runs with when given no flag (and no BIO_* or NODE_NAME variable).
impl Default for ServeArgs {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN,
            node_name: None,
            devices: DeviceArgs::default(),
            bpf: BpfArgs::default(),
            volumes: VolumeArgs::default(),
            tls_cert_file: None,
            tls_key_file: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            auth: AuthMode::None,
            log_level: LogLevel::Info.as_str().to_string(),
            log_json: false,
        }
    }
}

impl Default for VolumeArgs {
    fn default() -> Self {
        Self {
            pv_labels: false,
            kubelet_root: PathBuf::from(DEFAULT_KUBELET_ROOT),
            host_kubelet_root: None,
        }
    }
}

/// One argument of the command line: `--flag=value`, or `--flag` alone for a switch. Always
/// with `=`, so a value that starts with `-` (a regex) is not taken for a flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arg {
    pub flag: &'static str,
    pub value: Option<String>,
}

impl fmt::Display for Arg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(value) => write!(f, "--{}={value}", self.flag),
            None => write!(f, "--{}", self.flag),
        }
    }
}

impl ServeArgs {
    /// The arguments that make [`Cli`] parse back to `self` (with no BIO_* variable set). Listen
    /// address, attach mode, log level, kubelet root and --pv-labels are always written, the
    /// rest only when set or not at their default: that is the DaemonSet's args as they have
    /// always been, and a change there would restart every agent on an operator upgrade.
    pub fn flags(&self) -> Vec<Arg> {
        let mut args = Vec::new();
        let mut push = |flag, value: String| {
            args.push(Arg {
                flag,
                value: Some(value),
            })
        };
        push(flag::LISTEN, self.listen.to_string());
        if let Some(name) = &self.node_name {
            push(flag::NODE_NAME, name.clone());
        }
        push(flag::ATTACH, self.bpf.attach.as_str().to_string());
        for re in &self.devices.include {
            push(flag::DEVICE_INCLUDE, re.clone());
        }
        for re in &self.devices.exclude {
            push(flag::DEVICE_EXCLUDE, re.clone());
        }
        push(flag::LOG_LEVEL, self.log_level.clone());
        push(flag::KUBELET_ROOT, path_arg(&self.volumes.kubelet_root));
        push(flag::PV_LABELS, self.volumes.pv_labels.to_string());
        if let Some(cert) = &self.tls_cert_file {
            push(flag::TLS_CERT_FILE, path_arg(cert));
        }
        if let Some(key) = &self.tls_key_file {
            push(flag::TLS_KEY_FILE, path_arg(key));
        }
        if self.auth != AuthMode::None {
            push(flag::AUTH, self.auth.as_str().to_string());
        }
        if let Some(root) = &self.volumes.host_kubelet_root {
            push(flag::HOST_KUBELET_ROOT, path_arg(root));
        }
        if self.max_connections != DEFAULT_MAX_CONNECTIONS {
            push(flag::MAX_CONNECTIONS, self.max_connections.to_string());
        }
        if self.header_timeout != DEFAULT_HEADER_TIMEOUT {
            push(flag::HEADER_TIMEOUT, duration_arg(self.header_timeout));
        }
        if self.shutdown_timeout != DEFAULT_SHUTDOWN_TIMEOUT {
            push(flag::SHUTDOWN_TIMEOUT, duration_arg(self.shutdown_timeout));
        }
        if self.log_json {
            args.push(Arg {
                flag: flag::LOG_JSON,
                value: None,
            });
        }
        args
    }

    /// [`Self::flags`] as strings.
    pub fn to_args(&self) -> Vec<String> {
        self.flags().iter().map(Arg::to_string).collect()
    }
}

/// Paths here are the operator's own constants or come from a command line: UTF-8.
fn path_arg(path: &std::path::Path) -> String {
    path.display().to_string()
}

/// Seconds as the shortest decimal that reads back as the same f64, which is how
/// [`parse_duration`] reads it.
fn duration_arg(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
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
mod tests;
