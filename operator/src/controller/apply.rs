//! One BioMonitor's children written in order (ServiceAccount, agent
//! bindings, Service, TLS, ServiceMonitor, DaemonSet), then its status.

use std::sync::Arc;

use k8s_openapi::{
    api::apps::v1::DaemonSet, apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp,
};
use kube::{
    api::{Api, DeleteParams, DynamicObject, Patch, PatchParams},
    runtime::{controller::Action, reflector::ObjectRef},
    ResourceExt,
};
use serde_json::json;

use super::{
    agents::check_agents,
    bindings::sync_agent_subject,
    events::publish_transition_events,
    tls_secrets::{reconcile_tls, remove_unused_tls_objects, tls_settled, TlsOutcome},
    write::{apply_namespaced, apply_params, delete_ignoring_missing},
    Context,
};
use crate::{
    conditions::{
        self, compute_status, DaemonSetState, Observation, ServiceMonitorState, TlsState,
    },
    conflict::{self, Verdict},
    crd::BioMonitor,
    error::is_not_found,
    names,
    resources::{self, servicemonitor, ServiceMonitor},
    validate::{self, validate_spec},
    Error, Result,
};

pub(super) async fn apply(bm: Arc<BioMonitor>, ctx: &Context) -> Result<Action> {
    let client = &ctx.client;
    let namespace = bm
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let generation = bm.metadata.generation;

    let mut invalid_spec = validate_spec(&bm.spec).err().map(|e| e.to_string());
    let mut apply_rejected = None;
    let (verdict, others_changed) = ctx.verdict(&bm);
    if others_changed {
        // This monitor's spec (or arrival) changed another one's verdict.
        // Unbounded and only closed when the controller stops: ignore errors.
        let _ = ctx.reconcile_all.unbounded_send(());
    }
    let node_conflict = match &verdict {
        Verdict::Blocked(conflicts) => Some(conflict::describe(conflicts)),
        Verdict::Active => None,
    };
    let ds_api: Api<DaemonSet> = Api::namespaced(client.clone(), &namespace);
    let ds_name = names::child_name(&bm);
    let observe_daemonset = || async {
        Ok::<_, Error>(match ds_api.get_opt(&ds_name).await? {
            Some(ds) => DaemonSetState::Observed {
                generation: ds.metadata.generation,
                status: ds.status,
            },
            None => DaemonSetState::Missing,
        })
    };

    let mut tls = TlsOutcome {
        state: TlsState::Unchanged,
        recheck: None,
        in_place: false,
    };
    let (daemonset, service_monitor) = if invalid_spec.is_some() {
        // Leave the last valid configuration running rather than tearing
        // down monitoring over a typo; report what is there.
        (observe_daemonset().await?, ServiceMonitorState::Unchanged)
    } else {
        let children = resources::desired(&bm, &ctx.settings)?;
        apply_namespaced(ctx, &namespace, &children.service_account).await?;
        for binding in &children.agent_bindings {
            sync_agent_subject(ctx, binding, &children.agent_subject).await?;
        }
        apply_namespaced(ctx, &namespace, &children.service).await?;
        tls = reconcile_tls(&bm, ctx, children.certificate.as_ref()).await?;
        // Without the certificate the DaemonSet would not start and the
        // ServiceMonitor would point at a missing CA: keep both as they are
        // until it is there.
        let sm = if tls.in_place {
            apply_service_monitor(&bm, ctx, children.service_monitor.as_ref()).await?
        } else {
            ServiceMonitorState::Unchanged
        };
        let ds = if let Some(message) = &node_conflict {
            delete_ignoring_missing(&ctx.fence, &ds_api, &ds_name).await?;
            DaemonSetState::NotRolledOut {
                reason: conditions::reason::NODE_CONFLICT,
                message: message.clone(),
            }
        } else if tls.in_place {
            match apply_namespaced(ctx, &namespace, &children.daemonset).await {
                Ok(ds) => DaemonSetState::Observed {
                    generation: ds.metadata.generation,
                    status: ds.status,
                },
                Err(Error::Kube(kube::Error::Api(status))) => {
                    // The API server's verdict on the spec will not change on
                    // retry: report it on the status (by BioMonitor field) and
                    // keep the running DaemonSet, as for an invalid spec.
                    let Some(rejection) = validate::rejection(&status) else {
                        return Err(Error::Kube(kube::Error::Api(status)));
                    };
                    tracing::warn!(
                        biomonitor = %ObjectRef::from_obj(bm.as_ref()),
                        verdict = %rejection.message,
                        "the API server rejected the agent DaemonSet"
                    );
                    if rejection.spec_fields_only {
                        invalid_spec = Some(rejection.message);
                    } else {
                        apply_rejected = Some(rejection.message);
                    }
                    observe_daemonset().await?
                }
                Err(e) => return Err(e),
            }
        } else {
            observe_daemonset().await?
        };
        if tls.in_place && !tls_settled(&bm) {
            // Only now that nothing points at them any more.
            remove_unused_tls_objects(&bm, ctx).await?;
        }
        (ds, sm)
    };

    let agents = check_agents(&bm, ctx, &daemonset).await?;
    let agents_pending = conditions::needs_agent_check(&daemonset);

    let crd_missing = service_monitor == ServiceMonitorState::CrdNotInstalled;
    let tls_waiting = matches!(
        tls.state,
        TlsState::CertManagerNotInstalled | TlsState::NotReady(_) | TlsState::Failed(_)
    );
    let observation = Observation {
        generation,
        invalid_spec,
        apply_rejected,
        node_conflict,
        daemonset,
        service_monitor,
        tls: tls.state,
        agents,
    };
    let now = Time(
        Timestamp::from_second(Timestamp::now().as_second()).unwrap_or_else(|_| Timestamp::now()),
    );
    let status = compute_status(bm.status.as_ref(), &observation, &now);
    publish_transition_events(&bm, ctx, bm.status.as_ref(), &status).await;
    if bm.status.as_ref() != Some(&status) {
        ctx.fence.check()?;
        let api: Api<BioMonitor> = Api::namespaced(client.clone(), &namespace);
        api.patch_status(
            &bm.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await?;
    }

    // Nothing watches for missing CRDs to appear or for cert-manager to
    // issue: poll for them.
    let mut requeue = if crd_missing || tls_waiting {
        ctx.settings.crd_missing_retry
    } else {
        ctx.settings.resync_interval
    };
    if let Some(recheck) = tls.recheck {
        requeue = requeue.min(recheck);
    }
    if agents_pending {
        // A crash-looping agent changes nothing the controller watches:
        // look at the pods again.
        requeue = requeue.min(ctx.settings.agent_check_interval);
    }
    Ok(Action::requeue(requeue))
}

async fn apply_service_monitor(
    bm: &BioMonitor,
    ctx: &Context,
    desired: Option<&ServiceMonitor>,
) -> Result<ServiceMonitorState> {
    let namespace = bm.namespace().unwrap_or_default();
    let api: Api<DynamicObject> = Api::namespaced_with(
        ctx.client.clone(),
        &namespace,
        &servicemonitor::api_resource(),
    );
    let name = names::child_name(bm);
    ctx.fence.check()?;
    let result = match desired {
        Some(sm) => api
            .patch(&name, &apply_params(), &Patch::Apply(sm))
            .await
            .map(|_| ServiceMonitorState::Applied),
        None => api
            .delete(&name, &DeleteParams::background())
            .await
            .map(|_| ServiceMonitorState::Disabled),
    };
    match result {
        Ok(state) => Ok(state),
        // 404 on apply: the resource type itself is unknown.
        Err(e) if is_not_found(&e) && desired.is_some() => Ok(ServiceMonitorState::CrdNotInstalled),
        Err(e) if is_not_found(&e) => Ok(ServiceMonitorState::Disabled),
        // Rejections (RBAC, admission, validation) will not fix themselves
        // on retry: surface them on the condition instead of erroring out,
        // so the DaemonSet is still reconciled.
        Err(kube::Error::Api(status)) => Ok(ServiceMonitorState::Failed(format!(
            "applying the ServiceMonitor failed: {} ({})",
            status.message, status.reason
        ))),
        Err(e) => Err(e.into()),
    }
}
