//! The agents' serving certificate: the operator's own CA and Secrets, or
//! cert-manager's Certificate and Secret, and removing what another TLS
//! setup left.

use std::time::Duration;

use k8s_openapi::{api::core::v1::Secret, jiff::Timestamp};
use kube::{
    api::{Api, DynamicObject, Patch},
    runtime::reflector::ObjectRef,
    ResourceExt,
};

use super::{
    write::{apply_namespaced, apply_params, delete_ignoring_missing},
    Context,
};
use crate::{
    conditions::{self, TlsState},
    crd::BioMonitor,
    error::is_not_found,
    names,
    resources::{certificate, tls, Certificate},
    Error, Result,
};

/// What [`reconcile_tls`] found.
pub(super) struct TlsOutcome {
    pub(super) state: TlsState,
    /// When a certificate falls due, if sooner than the periodic resync.
    pub(super) recheck: Option<Duration>,
    /// The Secret the desired DaemonSet mounts holds a certificate (always
    /// true without TLS).
    pub(super) in_place: bool,
}

/// True when the last status already describes this generation's TLS setup
/// as working: then the objects of other TLS setups were removed already.
pub(super) fn tls_settled(bm: &BioMonitor) -> bool {
    bm.status
        .as_ref()
        .and_then(|s| s.condition(conditions::TLS_READY))
        .is_some_and(|c| c.status == "True" && c.observed_generation == bm.metadata.generation)
}

/// Makes sure the serving certificate the spec asks for exists.
pub(super) async fn reconcile_tls(
    bm: &BioMonitor,
    ctx: &Context,
    certificate: Option<&Certificate>,
) -> Result<TlsOutcome> {
    let spec = &bm.spec.metrics_endpoint.tls;
    if !spec.enabled {
        return Ok(TlsOutcome {
            state: TlsState::Disabled,
            recheck: None,
            in_place: true,
        });
    }
    let result = match certificate {
        Some(cert) => cert_manager_tls(bm, ctx, cert).await,
        None => operator_tls(bm, ctx).await,
    };
    match result {
        // RBAC or admission refusing a Secret or the Certificate will not
        // fix itself on retry: say so on the condition.
        Err(Error::Kube(kube::Error::Api(status))) => Ok(TlsOutcome {
            state: TlsState::Failed(format!(
                "writing the serving certificate failed: {} ({})",
                status.message, status.reason
            )),
            recheck: None,
            in_place: false,
        }),
        other => other,
    }
}

/// The operator's own CA and serving certificate (see `resources::tls`).
async fn operator_tls(bm: &BioMonitor, ctx: &Context) -> Result<TlsOutcome> {
    let namespace = bm.namespace().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let ca = api.get_opt(&names::ca_secret_name(bm)).await?;
    let serving = api.get_opt(&names::serving_secret_name(bm)).await?;
    let now = Timestamp::now().as_second();
    let plan = tls::plan(
        ca.as_ref().and_then(|s| s.data.as_ref()),
        serving.as_ref().and_then(|s| s.data.as_ref()),
        &names::service_dns_names(bm, &ctx.settings.cluster_domain),
        &format!("{namespace}/{}", bm.name_any()),
        now,
        &ctx.settings.cert_lifetimes,
    )?;
    if plan.decision.ca != tls::CaAction::Keep || plan.decision.serving != tls::ServingAction::Keep
    {
        tracing::info!(
            biomonitor = %ObjectRef::from_obj(bm),
            ca = ?plan.decision.ca,
            serving = ?plan.decision.serving,
            "issuing agent certificates"
        );
    }
    let (ca_secret, serving_secret) = tls::secrets(bm, &plan)?;
    // CA first: the serving Secret's bundle must never name a CA that is
    // not stored.
    for (desired, existing) in [(&ca_secret, &ca), (&serving_secret, &serving)] {
        if existing.as_ref().and_then(|s| s.data.as_ref()) != desired.data.as_ref() {
            apply_namespaced(ctx, &namespace, desired).await?;
        }
    }
    let until = Timestamp::from_second(plan.serving_validity.not_after)
        .map(|t| t.to_string())
        .unwrap_or_default();
    let renew = Timestamp::from_second(plan.decision.recheck_at)
        .map(|t| t.to_string())
        .unwrap_or_default();
    Ok(TlsOutcome {
        state: TlsState::Issued(format!(
            "serving certificate in Secret {} issued by the operator's CA (Secret {}), valid until {until}; next renewal check {renew}",
            names::serving_secret_name(bm),
            names::ca_secret_name(bm)
        )),
        recheck: Some(Duration::from_secs(
            u64::try_from(plan.decision.recheck_at - now).unwrap_or(0).max(1),
        )),
        in_place: true,
    })
}

/// cert-manager issues: apply the Certificate, wait for its Secret.
async fn cert_manager_tls(
    bm: &BioMonitor,
    ctx: &Context,
    cert: &Certificate,
) -> Result<TlsOutcome> {
    let namespace = bm.namespace().unwrap_or_default();
    let secret_name = names::cert_manager_secret_name(bm);
    let secret = Api::<Secret>::namespaced(ctx.client.clone(), &namespace)
        .get_opt(&secret_name)
        .await?;
    let has = |key: &str| {
        secret
            .as_ref()
            .and_then(|s| s.data.as_ref())
            .and_then(|d| d.get(key))
            .is_some_and(|v| !v.0.is_empty())
    };
    let in_place = has(tls::TLS_CERT_KEY) && has(tls::TLS_KEY_KEY);

    let api: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), &namespace, &certificate::api_resource());
    ctx.fence.check()?;
    let cert_name = names::child_name(bm);
    let applied = match api
        .patch(&cert_name, &apply_params(), &Patch::Apply(cert))
        .await
    {
        Ok(obj) => obj,
        // 404 on apply: the resource type itself is unknown.
        Err(e) if is_not_found(&e) => {
            return Ok(TlsOutcome {
                state: TlsState::CertManagerNotInstalled,
                recheck: None,
                in_place,
            })
        }
        Err(e) => return Err(e.into()),
    };
    let ready = applied.data["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Ready");
    let ready_status = ready
        .and_then(|c| c["status"].as_str())
        .unwrap_or("Unknown");
    let ready_message = ready
        .and_then(|c| c["message"].as_str())
        .unwrap_or("no status from cert-manager yet");
    let issuer = &cert.spec.issuer_ref;
    let state = if !in_place || ready_status != "True" {
        TlsState::NotReady(format!(
            "cert-manager Certificate {cert_name} (issuer {} {}) is not ready: {ready_message}",
            issuer.kind, issuer.name
        ))
    } else if !has(tls::TLS_CA_KEY) {
        TlsState::NotReady(format!(
            "Secret {secret_name} has no ca.crt: issuer {} {} does not publish its CA, so Prometheus cannot verify the agents (use a CA, self-signed or Vault issuer)",
            issuer.kind, issuer.name
        ))
    } else {
        TlsState::Issued(format!(
            "serving certificate in Secret {secret_name} issued by cert-manager ({} {})",
            issuer.kind, issuer.name
        ))
    };
    Ok(TlsOutcome {
        state,
        recheck: None,
        in_place,
    })
}

/// Removes what other TLS setups left: the operator's Secrets when
/// cert-manager issues or TLS is off, cert-manager's Certificate and Secret
/// when the operator issues or TLS is off. Key material does not linger.
pub(super) async fn remove_unused_tls_objects(bm: &BioMonitor, ctx: &Context) -> Result<()> {
    let namespace = bm.namespace().unwrap_or_default();
    let tls = &bm.spec.metrics_endpoint.tls;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut unused = Vec::new();
    if !tls.enabled || tls.issuer_ref.is_some() {
        unused.push(names::ca_secret_name(bm));
        unused.push(names::serving_secret_name(bm));
    }
    if !tls.enabled || tls.issuer_ref.is_none() {
        unused.push(names::cert_manager_secret_name(bm));
        let certs: Api<DynamicObject> =
            Api::namespaced_with(ctx.client.clone(), &namespace, &certificate::api_resource());
        // 404 also when cert-manager is not installed at all.
        delete_ignoring_missing(&ctx.fence, &certs, &names::child_name(bm)).await?;
    }
    for name in unused {
        delete_ignoring_missing(&ctx.fence, &secrets, &name).await?;
    }
    Ok(())
}
