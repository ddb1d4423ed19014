//! The agent's entries in the chart's cluster-scoped ClusterRoleBindings.

use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, Subject};
use kube::api::{Api, PostParams};

use super::Context;
use crate::{names, resources::rbac, Error, Result};

/// Attempts at one subject change before giving up (the error backoff
/// retries later): each failed attempt means another BioMonitor's change
/// went through.
const SUBJECT_UPDATE_ATTEMPTS: usize = 8;

/// Adds or removes this agent in one of the chart's agent
/// ClusterRoleBindings. Read, change, write back with the resourceVersion
/// read: a concurrent change by another BioMonitor's reconcile makes the
/// write fail with 409 Conflict instead of dropping that change, and the
/// loop starts over from the newer list. (Server-side apply cannot share
/// the list: `subjects` is atomic, so each apply would replace it whole.)
pub(super) async fn sync_agent_subject(
    ctx: &Context,
    binding: &rbac::AgentBinding,
    subject: &Subject,
) -> Result<()> {
    let api: Api<ClusterRoleBinding> = Api::all(ctx.client.clone());
    for _ in 0..SUBJECT_UPDATE_ATTEMPTS {
        let Some(mut crb) = api.get_opt(&binding.name).await? else {
            if !binding.wanted {
                // Gone with the release: nothing to remove the agent from.
                return Ok(());
            }
            return Err(Error::Config(format!(
                "ClusterRoleBinding {} not found: the chart creates it (one per agent ClusterRole) and the operator only adds and removes agent ServiceAccounts in it",
                binding.name
            )));
        };
        rbac::check_role_ref(&crb, binding)?;
        let current = crb.subjects.take().unwrap_or_default();
        let Some(next) = rbac::subjects_with(&current, subject, binding.wanted) else {
            return Ok(());
        };
        crb.subjects = Some(next);
        crb.metadata.managed_fields = None;
        ctx.fence.check()?;
        let params = PostParams {
            field_manager: Some(names::FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        match api.replace(&binding.name, &params, &crb).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 => {
                tracing::debug!(binding = %binding.name, "subjects changed concurrently; retrying");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Timeout(format!(
        "a stable subject list in ClusterRoleBinding {} ({SUBJECT_UPDATE_ATTEMPTS} conflicting writes)",
        binding.name
    )))
}
