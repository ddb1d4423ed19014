//! Warning events on transitions into a bad state.

use kube::{
    runtime::events::{Event as KubeEvent, EventType},
    Resource,
};

use super::Context;
use crate::{
    conditions,
    crd::{BioMonitor, BioMonitorStatus},
};

/// One Warning per transition into a bad state, not one per reconcile.
pub(super) async fn publish_transition_events(
    bm: &BioMonitor,
    ctx: &Context,
    old: Option<&BioMonitorStatus>,
    new: &BioMonitorStatus,
) {
    let reason_of = |s: Option<&BioMonitorStatus>, t: &str| {
        s.and_then(|s| s.condition(t)).map(|c| c.reason.clone())
    };
    let mut events = Vec::new();
    for (type_, bad) in [
        (conditions::READY, conditions::reason::INVALID_SPEC),
        (conditions::READY, conditions::reason::APPLY_REJECTED),
        (conditions::READY, conditions::reason::NODE_CONFLICT),
        (
            conditions::SERVICE_MONITOR_READY,
            conditions::reason::CRD_NOT_INSTALLED,
        ),
        (
            conditions::TLS_READY,
            conditions::reason::CERT_MANAGER_NOT_INSTALLED,
        ),
        (
            conditions::AGENTS_HEALTHY,
            conditions::reason::AGENT_FAILING,
        ),
        (
            conditions::AGENTS_HEALTHY,
            conditions::reason::IMAGE_PULL_FAILED,
        ),
    ] {
        let now = reason_of(Some(new), type_);
        // Only on the transition: kube's Recorder folds a repeat of the same
        // reason into a series that keeps the first note, so a second event
        // for a changed message would show the old one. The condition
        // always carries the current message.
        if now.as_deref() == Some(bad) && reason_of(old, type_).as_deref() != Some(bad) {
            let note = new.condition(type_).map(|c| c.message.clone());
            events.push((bad, note));
        }
    }
    for (reason, note) in events {
        // Events are writes too: a replica that resumed after losing the
        // lease must not report anything (the invalid-spec path reaches this
        // point without any fenced apply before it).
        if ctx.fence.check().is_err() {
            return;
        }
        let event = KubeEvent {
            type_: EventType::Warning,
            reason: reason.into(),
            note,
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(err) = ctx.recorder.publish(&event, &bm.object_ref(&())).await {
            tracing::warn!(error = %err, reason, "could not publish event");
        }
    }
}
