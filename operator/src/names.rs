//! Names and labels shared by the builders and the controller. Changing a
//! selector label orphans running DaemonSets (selectors are immutable), so
//! these are part of the upgrade contract.

use std::collections::BTreeMap;

use kube::ResourceExt;

use crate::crd::BioMonitor;

/// Field manager for every server-side apply, so ownership is stable across
/// operator versions and replicas.
pub const FIELD_MANAGER: &str = "bio-operator";

/// Guards the agent's subject entries in the cluster-scoped
/// ClusterRoleBindings, which owner references cannot remove.
pub const FINALIZER: &str = "bioexporter.io/cluster-resources";

pub const APP_NAME: &str = "bio-exporter-agent";
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
pub const LABEL_PART_OF: &str = "app.kubernetes.io/part-of";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";

/// Name of the agent container; also what `kubectl logs -c` needs.
pub const AGENT_CONTAINER: &str = "agent";
/// Name of the metrics port on the container, the Service and in the ServiceMonitor.
pub const METRICS_PORT_NAME: &str = "metrics";

/// Name shared by the namespaced children (DaemonSet, ServiceAccount, Service, ServiceMonitor).
pub fn child_name(bm: &BioMonitor) -> String {
    format!("{}-agent", bm.name_any())
}

/// The chart names each agent ClusterRoleBinding after its ClusterRole
/// (different kinds may share a name), so the operator needs no second name
/// per role.
pub fn agent_binding_name(cluster_role: &str) -> String {
    cluster_role.to_string()
}

/// The operator's own CA for this BioMonitor (the CA key lives only here).
pub fn ca_secret_name(bm: &BioMonitor) -> String {
    format!("{}-ca", child_name(bm))
}

/// Serving certificate issued by the operator: `tls.crt`, `tls.key`, `ca.crt`.
pub fn serving_secret_name(bm: &BioMonitor) -> String {
    format!("{}-tls", child_name(bm))
}

/// Serving certificate issued by cert-manager. A different name from the
/// operator's own, so switching issuers never has two writers on one Secret.
pub fn cert_manager_secret_name(bm: &BioMonitor) -> String {
    format!("{}-cert-manager-tls", child_name(bm))
}

/// The Secret the agents serve from and Prometheus takes `ca.crt` from:
/// cert-manager's when the BioMonitor names an issuer, else the operator's.
pub fn tls_secret_name(bm: &BioMonitor) -> String {
    if bm.spec.metrics_endpoint.tls.issuer_ref.is_some() {
        cert_manager_secret_name(bm)
    } else {
        serving_secret_name(bm)
    }
}

/// The names Prometheus may know the agents by: the Service's DNS names.
/// The ServiceMonitor verifies against `<svc>.<ns>.svc`, whatever pod IP it scrapes.
pub fn service_dns_names(bm: &BioMonitor, cluster_domain: &str) -> Vec<String> {
    let svc = child_name(bm);
    let ns = bm.namespace().unwrap_or_default();
    vec![
        svc.clone(),
        format!("{svc}.{ns}"),
        format!("{svc}.{ns}.svc"),
        format!("{svc}.{ns}.svc.{cluster_domain}"),
    ]
}

/// The name the ServiceMonitor checks the serving certificate against.
pub fn tls_server_name(bm: &BioMonitor) -> String {
    format!(
        "{}.{}.svc",
        child_name(bm),
        bm.namespace().unwrap_or_default()
    )
}

/// Labels the DaemonSet selects its pods by and the Service selects endpoints by.
pub fn selector_labels(bm: &BioMonitor) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_NAME.to_string(), APP_NAME.to_string()),
        (LABEL_INSTANCE.to_string(), bm.name_any()),
    ])
}

/// Labels on every child.
pub fn common_labels(bm: &BioMonitor) -> BTreeMap<String, String> {
    let mut labels = selector_labels(bm);
    labels.insert(LABEL_COMPONENT.into(), "node-agent".into());
    labels.insert(LABEL_PART_OF.into(), "bio-exporter".into());
    labels.insert(LABEL_MANAGED_BY.into(), FIELD_MANAGER.into());
    labels
}
