//! Start-up installation of the BioMonitor CRD. Helm installs `crds/` once and
//! never upgrades it, so the operator applying its own (generated) CRD is the
//! upgrade path for the schema.

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    api::{Api, Patch, PatchParams},
    runtime::{conditions, wait::await_condition},
    Client, ResourceExt,
};

use crate::{crd, names, Error, Result};

/// Server-side applies the CRD and waits until the API server serves it.
pub async fn apply_crd(client: Client, wait: Duration) -> Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client);
    let crd = crd::crd();
    let name = crd.name_any();
    api.patch(
        &name,
        &PatchParams::apply(names::FIELD_MANAGER).force(),
        &Patch::Apply(&crd),
    )
    .await?;
    tokio::time::timeout(
        wait,
        await_condition(api, &name, conditions::is_crd_established()),
    )
    .await
    .map_err(|_| Error::Timeout(format!("CRD {name} to become Established")))?
    .map_err(|e| Error::Config(format!("waiting for CRD {name}: {e}")))?;
    tracing::info!(crd = %name, "CRD applied and established");
    Ok(())
}
