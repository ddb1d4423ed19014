//! The agent's identity: a ServiceAccount per BioMonitor, listed as a
//! subject of the chart's agent ClusterRoleBindings only when the spec needs
//! that role: read PersistentVolumes (PV labels), create TokenReviews and
//! SubjectAccessReviews (`auth: kubernetes`).
//!
//! The chart creates one ClusterRoleBinding per agent ClusterRole, with the
//! role's name, and the operator only adds and removes subjects in those two
//! (RBAC `resourceNames`): it cannot create, delete or touch any other
//! binding. Per-BioMonitor bindings would need create and delete on every
//! ClusterRoleBinding in the cluster.

use k8s_openapi::api::{
    core::v1::ServiceAccount,
    rbac::v1::{ClusterRoleBinding, Subject},
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

/// The agent ServiceAccount as a binding subject.
pub fn agent_subject(bm: &BioMonitor) -> Result<Subject> {
    let namespace = bm
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    Ok(Subject {
        kind: "ServiceAccount".into(),
        name: names::child_name(bm),
        namespace: Some(namespace),
        ..Subject::default()
    })
}

/// One of the chart's agent ClusterRoleBindings, and whether this
/// BioMonitor's agent belongs in its subjects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentBinding {
    /// The ClusterRoleBinding (named like its ClusterRole by the chart).
    pub name: String,
    /// The ClusterRole it must refer to; any other is refused.
    pub role: String,
    pub wanted: bool,
}

/// Both agent bindings: PV read access only for PV labels, token and access
/// reviews only with `auth: kubernetes`.
pub fn agent_bindings(bm: &BioMonitor, settings: &Settings) -> [AgentBinding; 2] {
    [
        AgentBinding {
            name: names::agent_binding_name(&settings.agent_cluster_role),
            role: settings.agent_cluster_role.clone(),
            wanted: bm.spec.persistent_volume_labels,
        },
        AgentBinding {
            name: names::agent_binding_name(&settings.agent_auth_cluster_role),
            role: settings.agent_auth_cluster_role.clone(),
            wanted: bm.spec.metrics_endpoint.auth_enabled(),
        },
    ]
}

/// Both agent bindings without this agent: what deletion leaves.
pub fn no_agent_bindings(settings: &Settings) -> [AgentBinding; 2] {
    [
        &settings.agent_cluster_role,
        &settings.agent_auth_cluster_role,
    ]
    .map(|role| AgentBinding {
        name: names::agent_binding_name(role),
        role: role.clone(),
        wanted: false,
    })
}

fn same_subject(a: &Subject, b: &Subject) -> bool {
    a.kind == b.kind && a.name == b.name && a.namespace == b.namespace
}

/// The subjects `current` should become so that `subject` is listed exactly
/// once (`wanted`) or not at all; `None` when nothing needs writing. Other
/// subjects keep their order, so concurrent BioMonitors only ever add or
/// remove their own entry.
pub fn subjects_with(current: &[Subject], subject: &Subject, wanted: bool) -> Option<Vec<Subject>> {
    let present = current.iter().filter(|s| same_subject(s, subject)).count();
    if (wanted && present == 1) || (!wanted && present == 0) {
        return None;
    }
    let mut next: Vec<Subject> = current
        .iter()
        .filter(|s| !same_subject(s, subject))
        .cloned()
        .collect();
    if wanted {
        next.push(subject.clone());
    }
    Some(next)
}

/// Adding a subject to a binding that grants some other role would hand the
/// agents rights nobody meant them to have.
pub fn check_role_ref(crb: &ClusterRoleBinding, binding: &AgentBinding) -> Result<()> {
    let role_ref = &crb.role_ref;
    if role_ref.kind == "ClusterRole"
        && role_ref.api_group.as_deref() == Some("rbac.authorization.k8s.io")
        && role_ref.name == binding.role
    {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "ClusterRoleBinding {} refers to {} {}, not to ClusterRole {} (--agent-cluster-role / --agent-auth-cluster-role): not adding agents to it",
            binding.name, role_ref.kind, role_ref.name, binding.role
        )))
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::rbac::v1::RoleRef;

    use super::*;
    use crate::{crd::BioMonitorSpec, resources::test_support::monitor};

    fn sa(name: &str, ns: &str) -> Subject {
        Subject {
            kind: "ServiceAccount".into(),
            name: name.into(),
            namespace: Some(ns.into()),
            ..Subject::default()
        }
    }

    #[test]
    fn subject_is_the_agent_service_account() {
        let bm = monitor("disks", BioMonitorSpec::default());
        assert_eq!(agent_subject(&bm).unwrap(), sa("disks-agent", "monitoring"));
        let account = service_account(&bm).unwrap();
        assert_eq!(account.metadata.name.as_deref(), Some("disks-agent"));
    }

    #[test]
    fn bindings_follow_the_spec_and_the_configured_roles() {
        let settings = Settings {
            agent_cluster_role: "rel-agent".into(),
            agent_auth_cluster_role: "rel-agent-auth".into(),
            ..Settings::default()
        };
        let mut spec = BioMonitorSpec::default();
        let [pv, auth] = agent_bindings(&monitor("disks", spec.clone()), &settings);
        assert_eq!(
            (pv.name.as_str(), pv.role.as_str(), pv.wanted),
            ("rel-agent", "rel-agent", true)
        );
        assert_eq!((auth.name.as_str(), auth.wanted), ("rel-agent-auth", false));

        spec.persistent_volume_labels = false;
        spec.metrics_endpoint.tls.enabled = true;
        spec.metrics_endpoint.auth = crate::crd::AuthMode::Kubernetes;
        let [pv, auth] = agent_bindings(&monitor("disks", spec), &settings);
        assert!(!pv.wanted && auth.wanted);
        assert!(no_agent_bindings(&settings).iter().all(|b| !b.wanted));
    }

    #[test]
    fn adds_and_removes_only_its_own_subject() {
        let me = sa("disks-agent", "monitoring");
        let others = vec![sa("a-agent", "monitoring"), sa("disks-agent", "team-b")];
        let added = subjects_with(&others, &me, true).unwrap();
        assert_eq!(added[..2], others[..]);
        assert_eq!(added[2], me);
        assert_eq!(subjects_with(&added, &me, true), None);
        assert_eq!(subjects_with(&added, &me, false).unwrap(), others);
        assert_eq!(subjects_with(&others, &me, false), None);
        // A duplicate (written by hand) is folded into one entry.
        let twice = vec![me.clone(), others[0].clone(), me.clone()];
        assert_eq!(
            subjects_with(&twice, &me, true).unwrap(),
            vec![others[0].clone(), me.clone()]
        );
        assert_eq!(subjects_with(&[], &me, true).unwrap(), vec![me]);
    }

    #[test]
    fn refuses_a_binding_to_another_role() {
        let binding = AgentBinding {
            name: "rel-agent".into(),
            role: "rel-agent".into(),
            wanted: true,
        };
        let mut crb = ClusterRoleBinding {
            role_ref: RoleRef {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: "ClusterRole".into(),
                name: "rel-agent".into(),
            },
            ..ClusterRoleBinding::default()
        };
        assert!(check_role_ref(&crb, &binding).is_ok());
        crb.role_ref.name = "cluster-admin".into();
        let err = check_role_ref(&crb, &binding).unwrap_err().to_string();
        assert!(
            err.contains("cluster-admin") && err.contains("rel-agent"),
            "{err}"
        );
    }
}
