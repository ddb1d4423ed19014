//! The agent's identity: a ServiceAccount per BioMonitor, bound to the
//! ClusterRoles the chart ships, each only when the spec needs it: read
//! PersistentVolumes (PV labels), create TokenReviews and
//! SubjectAccessReviews (`auth: kubernetes`).

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        core::v1::ServiceAccount,
        rbac::v1::{ClusterRoleBinding, RoleRef, Subject},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::ResourceExt;

use super::child_meta;
use crate::{crd::BioMonitor, names, settings::Settings, Error, Result};

pub fn service_account(bm: &BioMonitor) -> Result<ServiceAccount> {
    Ok(ServiceAccount {
        metadata: child_meta(bm, names::child_name(bm))?,
        ..ServiceAccount::default()
    })
}

/// Only agents that label series with PersistentVolumes need API access.
/// Cluster-scoped, so no owner reference: the controller's finalizer deletes it.
pub fn cluster_role_binding(
    bm: &BioMonitor,
    settings: &Settings,
) -> Result<Option<ClusterRoleBinding>> {
    if !bm.spec.persistent_volume_labels {
        return Ok(None);
    }
    binding(
        bm,
        names::cluster_role_binding_name(bm),
        &settings.agent_cluster_role,
    )
    .map(Some)
}

/// The agent checks scrapers' tokens itself with the API server only with
/// `auth: kubernetes`; no other agent gets to create reviews.
pub fn auth_cluster_role_binding(
    bm: &BioMonitor,
    settings: &Settings,
) -> Result<Option<ClusterRoleBinding>> {
    if !bm.spec.metrics_endpoint.auth_enabled() {
        return Ok(None);
    }
    binding(
        bm,
        names::auth_cluster_role_binding_name(bm),
        &settings.agent_auth_cluster_role,
    )
    .map(Some)
}

fn binding(bm: &BioMonitor, name: String, role: &str) -> Result<ClusterRoleBinding> {
    let namespace = bm
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let mut labels: BTreeMap<String, String> = names::common_labels(bm);
    labels.insert(names::LABEL_OWNER_NAMESPACE.into(), namespace.clone());
    labels.insert(names::LABEL_OWNER_NAME.into(), bm.name_any());
    Ok(ClusterRoleBinding {
        metadata: ObjectMeta {
            name: Some(name),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "ClusterRole".into(),
            name: role.to_string(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: names::child_name(bm),
            namespace: Some(namespace),
            ..Subject::default()
        }]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{crd::BioMonitorSpec, resources::test_support::monitor};

    #[test]
    fn binds_the_agent_service_account_to_the_configured_role() {
        let settings = Settings {
            agent_cluster_role: "my-agent-role".into(),
            ..Settings::default()
        };
        let bm = monitor("disks", BioMonitorSpec::default());
        let crb = cluster_role_binding(&bm, &settings).unwrap().unwrap();
        assert_eq!(
            crb.metadata.name.as_deref(),
            Some("bio-exporter-agent:monitoring:disks")
        );
        assert_eq!(crb.role_ref.name, "my-agent-role");
        assert_eq!(crb.role_ref.kind, "ClusterRole");
        let subject = &crb.subjects.unwrap()[0];
        assert_eq!(subject.kind, "ServiceAccount");
        assert_eq!(subject.name, "disks-agent");
        assert_eq!(subject.namespace.as_deref(), Some("monitoring"));
        let labels = crb.metadata.labels.unwrap();
        assert_eq!(labels.get(names::LABEL_OWNER_NAME).unwrap(), "disks");
        assert_eq!(
            labels.get(names::LABEL_OWNER_NAMESPACE).unwrap(),
            "monitoring"
        );

        let sa = service_account(&bm).unwrap();
        assert_eq!(sa.metadata.name.as_deref(), Some("disks-agent"));
    }

    #[test]
    fn auth_binding_only_with_auth() {
        let settings = Settings {
            agent_auth_cluster_role: "my-auth-role".into(),
            ..Settings::default()
        };
        let mut spec = BioMonitorSpec::default();
        assert!(
            auth_cluster_role_binding(&monitor("disks", spec.clone()), &settings)
                .unwrap()
                .is_none()
        );
        spec.metrics_endpoint.tls.enabled = true;
        spec.metrics_endpoint.auth = crate::crd::AuthMode::Kubernetes;
        let bm = monitor("disks", spec);
        let crb = auth_cluster_role_binding(&bm, &settings).unwrap().unwrap();
        assert_eq!(
            crb.metadata.name.as_deref(),
            Some("bio-exporter-agent-auth:monitoring:disks")
        );
        assert_eq!(crb.role_ref.name, "my-auth-role");
        assert_eq!(crb.subjects.unwrap()[0].name, "disks-agent");
        let labels = crb.metadata.labels.unwrap();
        assert_eq!(labels.get(names::LABEL_OWNER_NAME).unwrap(), "disks");
        // Independent of the PV binding.
        let pv = cluster_role_binding(&bm, &settings).unwrap().unwrap();
        assert_ne!(pv.metadata.name, Some(crb.metadata.name.unwrap()));
    }

    #[test]
    fn no_binding_without_pv_labels() {
        let spec = BioMonitorSpec {
            persistent_volume_labels: false,
            ..BioMonitorSpec::default()
        };
        let bm = monitor("disks", spec);
        assert!(cluster_role_binding(&bm, &Settings::default())
            .unwrap()
            .is_none());
    }
}
