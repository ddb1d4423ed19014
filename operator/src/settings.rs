//! Operator-wide settings that are not part of a BioMonitor, passed to the
//! builders explicitly so tests (and integration tests) can pick any names.

use std::{collections::BTreeSet, time::Duration};

/// Agent image of the same release as this operator.
pub const DEFAULT_AGENT_IMAGE: &str = concat!(
    "ghcr.io/bio-exporter/node-agent:",
    env!("CARGO_PKG_VERSION")
);

// The defaults below are written once: `Settings::default()` and the
// command line's defaults (`bio-operator --help`) both come from them.
// Durations are in the command line's syntax, as a user would type them.

/// ClusterRole (and, by the chart's naming, ClusterRoleBinding) for the agents.
pub const DEFAULT_AGENT_CLUSTER_ROLE: &str = "bio-exporter-agent";
/// ClusterRole for agents with `auth: kubernetes`.
pub const DEFAULT_AGENT_AUTH_CLUSTER_ROLE: &str = "bio-exporter-agent-auth";
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";
pub const DEFAULT_RESYNC_INTERVAL: &str = "5m";
pub const DEFAULT_CRD_RETRY_INTERVAL: &str = "1m";
pub const DEFAULT_AGENT_CHECK_INTERVAL: &str = "30s";
/// 90 days.
pub const DEFAULT_SERVING_CERT_VALIDITY: &str = "2160h";
/// 5 years.
pub const DEFAULT_CA_VALIDITY: &str = "43800h";

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("{0:?} is not a duration like 15s, 2m or 1h30m: {1}")]
    Syntax(String, String),
    #[error("{0:?} is negative")]
    Negative(String),
}

/// A duration as Kubernetes writes them (`15s`, `1m30s`, `500ms`).
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let d: kube::core::Duration = s.parse().map_err(|e: kube::core::duration::ParseError| {
        DurationError::Syntax(s.to_string(), e.to_string())
    })?;
    if d.is_negative() {
        return Err(DurationError::Negative(s.to_string()));
    }
    Ok(d.into())
}

/// One of the built-in defaults above; the unit test
/// `every_default_duration_parses` keeps them valid.
pub(crate) fn default_duration(text: &str) -> Duration {
    parse_duration(text).unwrap_or_else(|e| panic!("built-in default: {e}"))
}

#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Agent image used when a BioMonitor does not set `agent.image`.
    pub agent_image: String,
    /// ClusterRole (shipped by the chart) the agents are bound to.
    pub agent_cluster_role: String,
    /// Periodic re-reconcile, which also picks up node label/taint changes
    /// for the conflict rule and drift in unwatched children.
    pub resync_interval: Duration,
    /// Retry period while the ServiceMonitor CRD is missing.
    pub crd_missing_retry: Duration,
    /// While a DaemonSet is not ready: how often its agent pods are listed
    /// (at most) to report failing agents.
    pub agent_check_interval: Duration,
    /// ClusterRole (shipped by the chart) allowing TokenReviews and
    /// SubjectAccessReviews, bound only to agents with `auth: kubernetes`.
    pub agent_auth_cluster_role: String,
    /// DNS suffix of Services, for the serving certificate's names.
    pub cluster_domain: String,
    /// Lifetimes of the certificates the operator issues itself.
    pub cert_lifetimes: crate::resources::tls::Lifetimes,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            agent_image: DEFAULT_AGENT_IMAGE.into(),
            agent_cluster_role: DEFAULT_AGENT_CLUSTER_ROLE.into(),
            resync_interval: default_duration(DEFAULT_RESYNC_INTERVAL),
            crd_missing_retry: default_duration(DEFAULT_CRD_RETRY_INTERVAL),
            agent_check_interval: default_duration(DEFAULT_AGENT_CHECK_INTERVAL),
            agent_auth_cluster_role: DEFAULT_AGENT_AUTH_CLUSTER_ROLE.into(),
            cluster_domain: DEFAULT_CLUSTER_DOMAIN.into(),
            cert_lifetimes: crate::resources::tls::Lifetimes::default(),
        }
    }
}

/// Environment variable naming the namespaces BioMonitors may live in,
/// comma-separated (the chart sets it from `operator.watchNamespaces`).
/// Unset means every namespace, which needs the namespaced rights
/// cluster-wide; the chart never grants that.
pub const WATCH_NAMESPACES_ENV: &str = "BIO_OPERATOR_WATCH_NAMESPACES";

/// Reason of a refused BioMonitor's conditions.
pub const NAMESPACE_NOT_ALLOWED: &str = "NamespaceNotAllowed";

/// Where the operator has rights to create agents. A BioMonitor elsewhere is
/// refused (status only), so a namespace the operator cannot write in never
/// turns into a reconcile that fails forever.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchScope {
    All,
    Namespaces(BTreeSet<String>),
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error(
        "{WATCH_NAMESPACES_ENV} is set but names no namespace; unset it to watch every namespace"
    )]
    Empty,
    #[error("{WATCH_NAMESPACES_ENV}: {0:?} is not a namespace name (lowercase letters, digits and '-', at most 63 characters)")]
    BadName(String),
    #[error("{WATCH_NAMESPACES_ENV} is not valid UTF-8")]
    NotUnicode,
}

impl WatchScope {
    /// `None` (unset) is every namespace; otherwise a comma-separated list.
    pub fn parse(value: Option<&str>) -> Result<Self, ScopeError> {
        let Some(value) = value else {
            return Ok(Self::All);
        };
        let mut names = BTreeSet::new();
        for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if !is_dns1123_label(name) {
                return Err(ScopeError::BadName(name.to_string()));
            }
            names.insert(name.to_string());
        }
        if names.is_empty() {
            return Err(ScopeError::Empty);
        }
        Ok(Self::Namespaces(names))
    }

    pub fn from_env() -> Result<Self, ScopeError> {
        match std::env::var(WATCH_NAMESPACES_ENV) {
            Ok(v) => Self::parse(Some(&v)),
            Err(std::env::VarError::NotPresent) => Self::parse(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(ScopeError::NotUnicode),
        }
    }

    pub fn allows(&self, namespace: &str) -> bool {
        match self {
            Self::All => true,
            Self::Namespaces(names) => names.contains(namespace),
        }
    }

    /// Why a BioMonitor in `namespace` is refused, for its status.
    pub fn refusal(&self, namespace: &str) -> String {
        let allowed = match self {
            Self::All => "every namespace".to_string(),
            Self::Namespaces(names) => names.iter().cloned().collect::<Vec<_>>().join(", "),
        };
        format!(
            "the operator has no rights in namespace {namespace}: it manages BioMonitors only in {allowed} \
             (chart value operator.watchNamespaces, {WATCH_NAMESPACES_ENV})"
        )
    }
}

fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_default_duration_parses() {
        for text in [
            DEFAULT_RESYNC_INTERVAL,
            DEFAULT_CRD_RETRY_INTERVAL,
            DEFAULT_AGENT_CHECK_INTERVAL,
            DEFAULT_SERVING_CERT_VALIDITY,
            DEFAULT_CA_VALIDITY,
        ] {
            assert!(parse_duration(text).is_ok(), "{text}");
        }
        assert_eq!(
            Settings::default().cert_lifetimes.serving,
            Duration::from_secs(90 * 86400)
        );
    }

    #[test]
    fn durations_parse_like_kubernetes() {
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(matches!(
            parse_duration("soon"),
            Err(DurationError::Syntax(..))
        ));
        assert_eq!(
            parse_duration("-5s"),
            Err(DurationError::Negative("-5s".into()))
        );
    }

    #[test]
    fn unset_is_every_namespace() {
        assert_eq!(WatchScope::parse(None), Ok(WatchScope::All));
        assert!(WatchScope::All.allows("kube-system"));
    }

    #[test]
    fn list_allows_only_its_namespaces() {
        let scope = WatchScope::parse(Some(" agents, team-b ,,agents")).unwrap();
        assert_eq!(
            scope,
            WatchScope::Namespaces(["agents".into(), "team-b".into()].into())
        );
        assert!(scope.allows("agents") && scope.allows("team-b"));
        assert!(!scope.allows("kube-system") && !scope.allows("default"));
        let why = scope.refusal("kube-system");
        assert!(why.contains("kube-system") && why.contains("agents, team-b"));
        assert!(why.contains(WATCH_NAMESPACES_ENV));
    }

    #[test]
    fn bad_values_are_errors_naming_the_variable() {
        assert_eq!(WatchScope::parse(Some(" , ")), Err(ScopeError::Empty));
        let err = WatchScope::parse(Some("agents,Kube_System")).unwrap_err();
        assert_eq!(err, ScopeError::BadName("Kube_System".into()));
        assert!(err.to_string().contains(WATCH_NAMESPACES_ENV));
        assert!(WatchScope::parse(Some("-a")).is_err());
        assert!(WatchScope::parse(Some(&"a".repeat(64))).is_err());
    }
}
