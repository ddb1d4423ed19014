//! Listing the agent pods of a DaemonSet that is not ready, to say which
//! agents fail and why.

use std::time::Instant;

use k8s_openapi::api::core::v1::Pod;
use kube::{
    api::{Api, ListParams},
    runtime::reflector::ObjectRef,
    ResourceExt,
};

use super::{lock, Context};
use crate::{
    conditions::{self, AgentHealth, AgentsState, DaemonSetState},
    crd::BioMonitor,
    names, Error, Result,
};

/// Lists the agent pods when the DaemonSet is not fully ready (and not
/// within `agent_check_interval` of the last list), to say which agents fail
/// and why. Page by page, so a large DaemonSet is never held in memory whole.
pub(super) async fn check_agents(
    bm: &BioMonitor,
    ctx: &Context,
    daemonset: &DaemonSetState,
) -> Result<AgentsState> {
    let key = ObjectRef::from_obj(bm);
    if !conditions::needs_agent_check(daemonset) {
        // The next time agents are not ready, look at once.
        lock(&ctx.agent_checks).remove(&key);
        return Ok(AgentsState::NotChecked);
    }
    {
        let mut checks = lock(&ctx.agent_checks);
        if checks
            .get(&key)
            .is_some_and(|at| at.elapsed() < ctx.settings.agent_check_interval)
        {
            return Ok(AgentsState::Unchanged);
        }
        checks.insert(key.clone(), Instant::now());
    }
    let namespace = bm
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let selector = names::selector_labels(bm)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut params = ListParams::default()
        .labels(&selector)
        .limit(AGENT_PODS_PAGE);
    let mut health = AgentHealth::default();
    loop {
        let page = match api.list(&params).await {
            Ok(page) => page,
            // Refused (RBAC, say): that will not fix itself, so report it.
            // (410 Gone is an expired continue token: retry.)
            Err(kube::Error::Api(status)) if status.code != 410 => {
                return Ok(AgentsState::ListFailed(format!(
                    "{} ({})",
                    status.message, status.reason
                )))
            }
            Err(source) => {
                // Let the retry list again instead of keeping the old condition.
                lock(&ctx.agent_checks).remove(&key);
                return Err(Error::AgentPods(source));
            }
        };
        for pod in &page.items {
            health.observe(pod);
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => break,
        }
    }
    Ok(AgentsState::Checked(health))
}

/// Pods per list request when checking agents.
const AGENT_PODS_PAGE: u32 = 500;
