//! The agent's enumerated settings. Each is defined here once: the agent parses it, the
//! operator's BioMonitor carries it (feature `crd`), and the names are the same in both.

use std::fmt;

/// How the agent attaches its BPF programs to the block layer (`--attach`; a BioMonitor's
/// `spec.attach`). Modes are chosen by probing the kernel, never by its version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
#[cfg_attr(
    feature = "crd",
    derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema),
    serde(rename_all = "snake_case")
)]
pub enum AttachMode {
    /// Try tp_btf, raw_tp, tracepoint and kprobe in this order; keep the first that attaches.
    #[default]
    Auto,
    /// BTF-typed tracepoints with direct loads, the cheapest; needs kernel BTF (kernel 5.5+).
    #[value(name = "tp_btf")]
    TpBtf,
    /// Raw tracepoints with CO-RE reads; needs kernel BTF too.
    #[value(name = "raw_tp")]
    RawTp,
    /// Classic tracepoints: no kernel BTF needed, but tracefs at /sys/kernel/tracing; operations
    /// only as the rwbs string names them, and bio-based disks (zram, dm, md) are not measured.
    Tracepoint,
    /// Kprobes on blk_mq_start_request and blk_update_request, the seed's method (kernel
    /// CONFIG_KPROBES); bio-based disks are not measured.
    Kprobe,
}

impl AttachMode {
    /// The value of `--attach`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::TpBtf => "tp_btf",
            Self::RawTp => "raw_tp",
            Self::Tracepoint => "tracepoint",
            Self::Kprobe => "kprobe",
        }
    }

    /// Classic tracepoints take their ids and field offsets from tracefs, and `auto` may fall
    /// back to them.
    pub fn needs_tracefs(self) -> bool {
        matches!(self, Self::Auto | Self::Tracepoint)
    }
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who may read /metrics (`--auth`; a BioMonitor's `spec.metricsEndpoint.auth`). /healthz and
/// /readyz stay open either way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, clap::ValueEnum)]
#[cfg_attr(
    feature = "crd",
    derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema),
    serde(rename_all = "lowercase")
)]
pub enum AuthMode {
    /// Anyone who can reach the port.
    #[default]
    None,
    /// A bearer token that the API server authenticates (TokenReview) and authorizes for `get`
    /// on the non-resource URL /metrics (SubjectAccessReview), like kube-rbac-proxy.
    Kubernetes,
}

impl AuthMode {
    /// The value of `--auth`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Kubernetes => "kubernetes",
        }
    }
}

impl fmt::Display for AuthMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The levels a BioMonitor's `spec.agent.logLevel` offers. The agent's `--log-level` takes
/// these and, beyond them, any tracing filter directive (`info,node_agent=debug`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, clap::ValueEnum)]
#[cfg_attr(
    feature = "crd",
    derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema),
    serde(rename_all = "lowercase")
)]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    /// The value of `--log-level`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Warn => "warn",
            Self::Info => "info",
            Self::Debug => "debug",
            Self::Trace => "trace",
        }
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use clap::ValueEnum;

    use super::*;

    /// `as_str` is what the operator writes; clap's name is what the agent parses.
    fn clap_names_are_as_str<T: ValueEnum + Copy>(as_str: fn(T) -> &'static str) {
        for v in T::value_variants() {
            let possible = v.to_possible_value().expect("no variant is skipped");
            assert_eq!(possible.get_name(), as_str(*v));
        }
    }

    #[test]
    fn the_agent_parses_the_names_the_operator_writes() {
        clap_names_are_as_str(AttachMode::as_str);
        clap_names_are_as_str(AuthMode::as_str);
        clap_names_are_as_str(LogLevel::as_str);
    }

    /// The BioMonitor's values are the agent's values.
    #[cfg(feature = "crd")]
    #[test]
    fn serde_names_are_as_str() {
        fn check<T: ValueEnum + Copy + serde::Serialize>(as_str: fn(T) -> &'static str) {
            for v in T::value_variants() {
                assert_eq!(serde_json::to_value(v).unwrap(), as_str(*v));
            }
        }
        check(AttachMode::as_str);
        check(AuthMode::as_str);
        check(LogLevel::as_str);
    }
}
