//! Pure builders: a `BioMonitor` (plus operator settings) in, the objects the
//! cluster should contain out. No I/O here, so everything the operator would
//! write can be asserted on in unit tests.

pub mod certificate;
pub mod daemonset;
pub mod rbac;
pub mod service;
pub mod servicemonitor;
pub mod tls;

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Service, ServiceAccount},
        rbac::v1::Subject,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::{Resource, ResourceExt};

use crate::{crd::BioMonitor, names, settings::Settings, Error, Result};

pub use certificate::Certificate;
pub use servicemonitor::ServiceMonitor;

/// Everything one BioMonitor should own. `None` means "should not exist".
#[derive(Clone, Debug, PartialEq)]
pub struct Children {
    pub service_account: ServiceAccount,
    /// The agent ServiceAccount, as listed in the agent ClusterRoleBindings.
    pub agent_subject: Subject,
    /// Which of the chart's agent ClusterRoleBindings list the agent.
    pub agent_bindings: [rbac::AgentBinding; 2],
    pub daemonset: DaemonSet,
    pub service: Service,
    pub service_monitor: Option<ServiceMonitor>,
    /// cert-manager Certificate (TLS with an issuerRef only). The operator's
    /// own certificates are not pure; see [`tls::plan`].
    pub certificate: Option<Certificate>,
}

/// The desired children of `bm`. Fails only on objects the API server would
/// never hand out (no name, namespace or uid), never on user input.
pub fn desired(bm: &BioMonitor, settings: &Settings) -> Result<Children> {
    Ok(Children {
        service_account: rbac::service_account(bm)?,
        agent_subject: rbac::agent_subject(bm)?,
        agent_bindings: rbac::agent_bindings(bm, settings),
        daemonset: daemonset::daemonset(bm, settings)?,
        service: service::service(bm)?,
        service_monitor: servicemonitor::service_monitor(bm)?,
        certificate: certificate::certificate(bm, settings)?,
    })
}

/// Controller owner reference, so garbage collection removes namespaced
/// children with their BioMonitor and `owns()` watches map back to it.
/// `blockOwnerDeletion` (as controller-runtime sets it) makes a foreground
/// deletion of the BioMonitor wait until its children are gone.
pub fn owner_reference(bm: &BioMonitor) -> Result<OwnerReference> {
    let mut owner = bm
        .controller_owner_ref(&())
        .ok_or(Error::MissingField("metadata.uid"))?;
    owner.block_owner_deletion = Some(true);
    Ok(owner)
}

/// Metadata of a namespaced child named `name`.
pub fn child_meta(bm: &BioMonitor, name: String) -> Result<ObjectMeta> {
    let namespace = bm
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    Ok(ObjectMeta {
        name: Some(name),
        namespace: Some(namespace),
        labels: Some(names::common_labels(bm)),
        owner_references: Some(vec![owner_reference(bm)?]),
        ..ObjectMeta::default()
    })
}

#[cfg(test)]
pub(crate) mod test_support {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use crate::crd::{BioMonitor, BioMonitorSpec};

    /// A BioMonitor as the API server would return it (name, namespace, uid set).
    pub fn monitor(name: &str, spec: BioMonitorSpec) -> BioMonitor {
        BioMonitor {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("monitoring".into()),
                uid: Some(format!("uid-{name}")),
                generation: Some(1),
                ..ObjectMeta::default()
            },
            spec,
            status: None,
        }
    }

    /// The kubelet's expansion of container args (k8s.io/kubernetes
    /// third_party/forked/golang/expansion): `$$` is a literal `$`, `$(NAME)` the variable's
    /// value (left as written when undefined), `$(` without `)` and any other `$` stay.
    pub fn kubelet_expand(arg: &str, env: &BTreeMap<&str, &str>) -> String {
        let mut out = String::new();
        let mut rest = arg;
        while let Some(i) = rest.find('$') {
            out.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            if let Some(tail) = after.strip_prefix('$') {
                out.push('$');
                rest = tail;
            } else if let Some((name, tail)) = after
                .strip_prefix('(')
                .and_then(|reference| reference.split_once(')'))
            {
                match env.get(name) {
                    Some(value) => out.push_str(value),
                    None => out.push_str(&format!("$({name})")),
                }
                rest = tail;
            } else {
                // `$(` without a closing `)`, a lone `$` before anything else, or at the end.
                out.push('$');
                rest = after;
            }
        }
        out.push_str(rest);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::{test_support::monitor, *};
    use crate::crd::BioMonitorSpec;

    #[test]
    fn every_namespaced_child_is_owned_by_the_monitor() {
        let bm = monitor("disks", BioMonitorSpec::default());
        let children = desired(&bm, &Settings::default()).unwrap();
        let metas = [
            &children.service_account.metadata,
            &children.daemonset.metadata,
            &children.service.metadata,
            &children.service_monitor.as_ref().unwrap().metadata,
        ];
        for meta in metas {
            assert_eq!(meta.namespace.as_deref(), Some("monitoring"));
            let owners = meta.owner_references.as_ref().unwrap();
            assert_eq!(owners.len(), 1);
            assert_eq!(owners[0].kind, "BioMonitor");
            assert_eq!(owners[0].api_version, "bioexporter.io/v1alpha1");
            assert_eq!(owners[0].uid, "uid-disks");
            assert_eq!(owners[0].controller, Some(true));
            assert_eq!(owners[0].block_owner_deletion, Some(true));
        }
    }

    #[test]
    fn missing_uid_is_an_error_not_a_panic() {
        let mut bm = monitor("disks", BioMonitorSpec::default());
        bm.metadata.uid = None;
        assert!(matches!(
            desired(&bm, &Settings::default()),
            Err(Error::MissingField(_))
        ));
    }
}
