//! Names and labels shared by the builders and the controller. Changing a
//! selector label orphans running DaemonSets (selectors are immutable), so
//! these are part of the upgrade contract.

use std::collections::BTreeMap;

use kube::ResourceExt;

use crate::crd::BioMonitor;

/// Field manager for every server-side apply, so ownership is stable across
/// operator versions and replicas.
pub const FIELD_MANAGER: &str = "bio-operator";

/// Guards the cluster-scoped ClusterRoleBinding, which owner references cannot.
pub const FINALIZER: &str = "bioexporter.io/cluster-resources";

pub const APP_NAME: &str = "bio-exporter-agent";
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
pub const LABEL_PART_OF: &str = "app.kubernetes.io/part-of";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// On cluster-scoped children, which cannot point back with an owner reference.
pub const LABEL_OWNER_NAMESPACE: &str = "bioexporter.io/biomonitor-namespace";
pub const LABEL_OWNER_NAME: &str = "bioexporter.io/biomonitor";

/// Name of the agent container; also what `kubectl logs -c` needs.
pub const AGENT_CONTAINER: &str = "agent";
/// Name of the metrics port on the container, the Service and in the ServiceMonitor.
pub const METRICS_PORT_NAME: &str = "metrics";

/// Name shared by the namespaced children (DaemonSet, ServiceAccount, Service, ServiceMonitor).
pub fn child_name(bm: &BioMonitor) -> String {
    format!("{}-agent", bm.name_any())
}

/// ClusterRoleBinding names are global: namespace and name keep them unique.
pub fn cluster_role_binding_name(bm: &BioMonitor) -> String {
    format!(
        "bio-exporter-agent:{}:{}",
        bm.namespace().unwrap_or_default(),
        bm.name_any()
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
