//! The reconcile entry point: scope check, finalizer (apply or cleanup),
//! and the per-object error backoff.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use kube::{
    api::Api,
    runtime::{
        controller::Action,
        finalizer::{finalizer, Event as FinalizerEvent},
        reflector::ObjectRef,
    },
    ResourceExt,
};

use super::{apply::apply, bindings::sync_agent_subject, lock, refuse::refuse, Context};
use crate::{
    crd::BioMonitor,
    error::{is_not_found, is_stale_write},
    names,
    resources::rbac,
    Error, Result,
};

pub async fn reconcile(bm: Arc<BioMonitor>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.reconciliations.inc();
    let started = Instant::now();
    let obj_ref = ObjectRef::from_obj(bm.as_ref());
    let namespace = bm
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<BioMonitor> = Api::namespaced(ctx.client.clone(), &namespace);

    // Refused before the finalizer is added: nothing is created for it, so
    // nothing needs cleaning up. (A deletion still runs the cleanup, in case
    // the namespace was allowed when the finalizer was added.)
    if !ctx.scope.allows(&namespace) && bm.metadata.deletion_timestamp.is_none() {
        let result = refuse(&bm, &ctx).await;
        ctx.metrics
            .reconcile_duration
            .observe(started.elapsed().as_secs_f64());
        return result;
    }
    // kube's finalizer helper writes on its own (adding the finalizer here,
    // removing it after a cleanup) and knows nothing of the fence. Nothing is
    // awaited between this check and the add.
    if !bm.finalizers().iter().any(|f| f == names::FINALIZER)
        && bm.metadata.deletion_timestamp.is_none()
    {
        ctx.fence.check()?;
    }
    let result = finalizer(&api, names::FINALIZER, bm, |event| async {
        match event {
            FinalizerEvent::Apply(bm) => apply(bm, &ctx).await,
            FinalizerEvent::Cleanup(bm) => cleanup(bm, &ctx).await,
        }
    })
    .await;
    let result = match result {
        // A queued cleanup of a copy the cache still held: the object (and so
        // the finalizer) is already gone.
        Err(kube::runtime::finalizer::Error::RemoveFinalizer(e)) if is_not_found(&e) => {
            Ok(Action::await_change())
        }
        // A reconcile of a cached copy older than the object (a bulk
        // re-reconcile right after this monitor's first one): the finalizer
        // is already there and the guarded patch fails. The watch event for
        // the newer copy triggers the next reconcile; retry soon regardless.
        Err(kube::runtime::finalizer::Error::AddFinalizer(e)) if is_stale_write(&e) => {
            tracing::debug!(biomonitor = %obj_ref, "stale cached copy; finalizer already changed");
            Ok(Action::requeue(Duration::from_secs(1)))
        }
        other => other.map_err(|e| Error::Finalizer(Box::new(e))),
    };

    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    if result.is_ok() {
        lock(&ctx.failures).remove(&obj_ref);
    }
    result
}

/// Exponential backoff per object: 5s, 10s, 20s, ... capped at 5 minutes, so a
/// persistent error (RBAC, admission webhook) never becomes a hot loop.
pub fn backoff(consecutive_failures: u32) -> Duration {
    let exp = consecutive_failures.saturating_sub(1).min(6);
    Duration::from_secs(5 * 2u64.pow(exp)).min(Duration::from_secs(300))
}

pub fn error_policy(bm: Arc<BioMonitor>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(err.metric_label());
    let failures = {
        let mut map = lock(&ctx.failures);
        let n = map.entry(ObjectRef::from_obj(bm.as_ref())).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = backoff(failures);
    tracing::warn!(
        biomonitor = %ObjectRef::from_obj(bm.as_ref()),
        error = %err,
        failures,
        retry_in = ?delay,
        "reconcile failed"
    );
    Action::requeue(delay)
}

async fn cleanup(bm: Arc<BioMonitor>, ctx: &Context) -> Result<Action> {
    lock(&ctx.agent_checks).remove(&ObjectRef::from_obj(bm.as_ref()));
    // Namespaced children go with their owner references; only the agent's
    // entries in the cluster-scoped bindings need removing by hand (the
    // bindings belong to the chart and stay).
    let subject = rbac::agent_subject(&bm)?;
    for binding in &rbac::no_agent_bindings(&ctx.settings) {
        sync_agent_subject(ctx, binding, &subject).await?;
    }
    // A monitor blocked by this one may now be rolled out.
    let _ = ctx.reconcile_all.unbounded_send(());
    tracing::info!(biomonitor = %ObjectRef::from_obj(bm.as_ref()), "removed the agent from the agent ClusterRoleBindings");
    // The finalizer helper removes the finalizer as soon as this returns
    // Ok: a failed cleanup keeps it, so the check guards that write too.
    ctx.fence.check()?;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_secs(5));
        assert_eq!(backoff(2), Duration::from_secs(10));
        assert_eq!(backoff(4), Duration::from_secs(40));
        assert_eq!(backoff(7), Duration::from_secs(300));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(300));
        assert_eq!(backoff(0), Duration::from_secs(5));
    }
}
