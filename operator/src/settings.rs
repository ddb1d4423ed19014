//! Operator-wide settings that are not part of a BioMonitor, passed to the
//! builders explicitly so tests (and integration tests) can pick any names.

use std::time::Duration;

/// Agent image of the same release as this operator.
pub const DEFAULT_AGENT_IMAGE: &str = concat!(
    "ghcr.io/bio-exporter/node-agent:",
    env!("CARGO_PKG_VERSION")
);

#[derive(Clone, Debug)]
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
            agent_cluster_role: "bio-exporter-agent".into(),
            resync_interval: Duration::from_secs(300),
            crd_missing_retry: Duration::from_secs(60),
            agent_check_interval: Duration::from_secs(30),
            agent_auth_cluster_role: "bio-exporter-agent-auth".into(),
            cluster_domain: "cluster.local".into(),
            cert_lifetimes: crate::resources::tls::Lifetimes::default(),
        }
    }
}
