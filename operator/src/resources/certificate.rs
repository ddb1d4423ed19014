//! cert-manager `Certificate` for the agents' serving certificate, when the
//! BioMonitor names an issuer. Like the ServiceMonitor, a typed subset of
//! the fields the operator sets, applied as a dynamic object.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::ApiResource;
use serde::{Deserialize, Serialize};

use super::child_meta;
use crate::{crd::BioMonitor, names, settings::Settings, Result};

pub const API_VERSION: &str = "cert-manager.io/v1";
pub const KIND: &str = "Certificate";

/// For `Api<DynamicObject>` calls.
pub fn api_resource() -> ApiResource {
    ApiResource {
        group: "cert-manager.io".into(),
        version: "v1".into(),
        api_version: API_VERSION.into(),
        kind: KIND.into(),
        plural: "certificates".into(),
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Certificate {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: CertificateSpec,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CertificateSpec {
    pub secret_name: String,
    pub secret_template: SecretTemplate,
    pub dns_names: Vec<String>,
    pub issuer_ref: IssuerRef,
    pub usages: Vec<String>,
    pub private_key: PrivateKey,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretTemplate {
    pub labels: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IssuerRef {
    pub name: String,
    pub kind: String,
    pub group: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PrivateKey {
    pub algorithm: String,
    pub size: u32,
    pub rotation_policy: String,
}

/// `None` unless the BioMonitor has TLS with an `issuerRef`.
pub fn certificate(bm: &BioMonitor, settings: &Settings) -> Result<Option<Certificate>> {
    let tls = &bm.spec.metrics_endpoint.tls;
    let Some(issuer) = tls.issuer_ref.as_ref().filter(|_| tls.enabled) else {
        return Ok(None);
    };
    let metadata = child_meta(bm, names::child_name(bm))?;
    Ok(Some(Certificate {
        api_version: API_VERSION.into(),
        kind: KIND.into(),
        spec: CertificateSpec {
            secret_name: names::cert_manager_secret_name(bm),
            // So the Secret can be told apart like every other child.
            secret_template: SecretTemplate {
                labels: names::common_labels(bm),
            },
            dns_names: names::service_dns_names(bm, &settings.cluster_domain),
            issuer_ref: IssuerRef {
                name: issuer.name.clone(),
                kind: issuer.kind.clone(),
                group: issuer.group.clone(),
            },
            // A TLS server certificate, nothing else.
            usages: vec!["digital signature".into(), "server auth".into()],
            // Same key type as the operator's own certificates; a new key on
            // every renewal.
            private_key: PrivateKey {
                algorithm: "ECDSA".into(),
                size: 256,
                rotation_policy: "Always".into(),
            },
        },
        metadata,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        crd::{BioMonitorSpec, IssuerRef as SpecIssuerRef},
        resources::test_support::monitor,
    };

    #[test]
    fn only_with_an_issuer() {
        let mut spec = BioMonitorSpec::default();
        spec.metrics_endpoint.tls.enabled = true;
        let settings = Settings::default();
        assert!(certificate(&monitor("disks", spec.clone()), &settings)
            .unwrap()
            .is_none());

        spec.metrics_endpoint.tls.issuer_ref = Some(SpecIssuerRef {
            name: "ca".into(),
            kind: "ClusterIssuer".into(),
            group: "cert-manager.io".into(),
        });
        let settings = Settings {
            cluster_domain: "example.internal".into(),
            ..Settings::default()
        };
        let cert = certificate(&monitor("disks", spec), &settings)
            .unwrap()
            .unwrap();
        let json = serde_json::to_value(&cert).unwrap();
        assert_eq!(json["apiVersion"], "cert-manager.io/v1");
        assert_eq!(json["metadata"]["name"], "disks-agent");
        assert_eq!(json["metadata"]["ownerReferences"][0]["kind"], "BioMonitor");
        assert_eq!(json["spec"]["secretName"], "disks-agent-cert-manager-tls");
        assert_eq!(
            json["spec"]["issuerRef"],
            serde_json::json!({"name": "ca", "kind": "ClusterIssuer", "group": "cert-manager.io"})
        );
        assert_eq!(
            json["spec"]["dnsNames"],
            serde_json::json!([
                "disks-agent",
                "disks-agent.monitoring",
                "disks-agent.monitoring.svc",
                "disks-agent.monitoring.svc.example.internal"
            ])
        );
    }
}
