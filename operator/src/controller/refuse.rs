//! BioMonitors in namespaces outside the operator's scope: status only.

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    api::{Api, Patch, PatchParams},
    runtime::{controller::Action, reflector::ObjectRef},
    ResourceExt,
};
use serde_json::json;

use super::{bindings::sync_agent_subject, Context};
use crate::{
    conditions::{
        self, compute_status, AgentsState, DaemonSetState, Observation, ServiceMonitorState,
        TlsState,
    },
    crd::{BioMonitor, BioMonitorStatus},
    resources::rbac,
    settings::NAMESPACE_NOT_ALLOWED,
    Error, Result,
};

/// A BioMonitor in a namespace outside the scope: nothing is created, the
/// status says why. Its agent is taken out of the agent bindings in case the
/// namespace was in scope before (the rest went with the owner references
/// or stays until the BioMonitor is deleted).
pub(super) async fn refuse(bm: &BioMonitor, ctx: &Context) -> Result<Action> {
    let namespace = bm
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let subject = rbac::agent_subject(bm)?;
    for binding in &rbac::no_agent_bindings(&ctx.settings) {
        sync_agent_subject(ctx, binding, &subject).await?;
    }
    let message = ctx.scope.refusal(&namespace);
    let now = Time(
        Timestamp::from_second(Timestamp::now().as_second()).unwrap_or_else(|_| Timestamp::now()),
    );
    let status = refused_status(bm, &message, &now);
    if bm.status.as_ref() != Some(&status) {
        tracing::info!(biomonitor = %ObjectRef::from_obj(bm), "refused: namespace outside the operator's scope");
        ctx.fence.check()?;
        let api: Api<BioMonitor> = Api::namespaced(ctx.client.clone(), &namespace);
        api.patch_status(
            &bm.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await?;
    }
    // The scope only changes with a restart, which reconciles everything.
    Ok(Action::await_change())
}

/// Every condition False with the refusal, and Ready's reason naming it.
fn refused_status(bm: &BioMonitor, message: &str, now: &Time) -> BioMonitorStatus {
    let not_rolled_out = || DaemonSetState::NotRolledOut {
        reason: NAMESPACE_NOT_ALLOWED,
        message: message.to_string(),
    };
    let observation = Observation {
        generation: bm.metadata.generation,
        invalid_spec: None,
        apply_rejected: None,
        node_conflict: None,
        daemonset: not_rolled_out(),
        service_monitor: ServiceMonitorState::NotRolledOut {
            reason: NAMESPACE_NOT_ALLOWED,
            message: message.to_string(),
        },
        tls: TlsState::Failed(message.to_string()),
        agents: AgentsState::NotChecked,
    };
    let mut status = compute_status(bm.status.as_ref(), &observation, now);
    // compute_status reports the first False condition as Ready's reason;
    // the cause here is the namespace, whatever that is. Ready is False
    // either way, so its lastTransitionTime is already right.
    if let Some(ready) = status
        .conditions
        .iter_mut()
        .find(|c| c.type_ == conditions::READY)
    {
        ready.reason = NAMESPACE_NOT_ALLOWED.into();
        ready.message = message.to_string();
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_monitor_says_why_on_every_condition() {
        let bm =
            crate::resources::test_support::monitor("disks", crate::crd::BioMonitorSpec::default());
        let now = Time(Timestamp::from_second(1_700_000_000).unwrap());
        let status = refused_status(&bm, "no rights in namespace x", &now);
        let ready = status.condition(conditions::READY).unwrap();
        assert_eq!(
            (
                ready.status.as_str(),
                ready.reason.as_str(),
                ready.message.as_str()
            ),
            ("False", NAMESPACE_NOT_ALLOWED, "no rights in namespace x")
        );
        let ds = status.condition(conditions::DAEMONSET_READY).unwrap();
        assert_eq!(
            (ds.status.as_str(), ds.reason.as_str()),
            ("False", NAMESPACE_NOT_ALLOWED)
        );
        assert_eq!(status.observed_generation, Some(1));
        // Stable across reconciles, so no status write repeats.
        let mut again = bm.clone();
        again.status = Some(status.clone());
        let later = Time(Timestamp::from_second(1_700_000_100).unwrap());
        assert_eq!(
            refused_status(&again, "no rights in namespace x", &later),
            status
        );
    }
}
