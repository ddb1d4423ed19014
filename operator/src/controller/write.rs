//! The fenced writes every reconcile step goes through: server-side apply
//! with the operator's field manager, deletes that accept "already gone".

use kube::{
    api::{Api, DeleteParams, Patch, PatchParams},
    Resource,
};
use serde::{de::DeserializeOwned, Serialize};

use super::Context;
use crate::{error::is_not_found, leader::Fence, names, Error, Result};

pub(super) fn apply_params() -> PatchParams {
    PatchParams::apply(names::FIELD_MANAGER).force()
}

pub(super) async fn apply_namespaced<K>(ctx: &Context, ns: &str, obj: &K) -> Result<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    ctx.fence.check()?;
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    let name = obj
        .meta()
        .name
        .clone()
        .ok_or(Error::MissingField("metadata.name"))?;
    Ok(api
        .patch(&name, &apply_params(), &Patch::Apply(obj))
        .await?)
}

/// Deletes `name`; already gone is fine.
pub(super) async fn delete_ignoring_missing<K>(
    fence: &Fence,
    api: &Api<K>,
    name: &str,
) -> Result<()>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    fence.check()?;
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
