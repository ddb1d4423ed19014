//! Prometheus Operator ServiceMonitor. There are no published Rust types for
//! it, so this is a typed subset holding only the fields the operator sets;
//! server-side apply leaves every other field to whoever else manages it.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::{core::ApiResource, ResourceExt};
use serde::{Deserialize, Serialize};

use super::child_meta;
use crate::{crd::BioMonitor, names, Result};

pub const API_VERSION: &str = "monitoring.coreos.com/v1";
pub const KIND: &str = "ServiceMonitor";

/// For `Api<DynamicObject>` calls.
pub fn api_resource() -> ApiResource {
    ApiResource {
        group: "monitoring.coreos.com".into(),
        version: "v1".into(),
        api_version: API_VERSION.into(),
        kind: KIND.into(),
        plural: "servicemonitors".into(),
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceMonitor {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: ServiceMonitorSpec,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceMonitorSpec {
    pub selector: LabelSelector,
    pub namespace_selector: NamespaceSelector,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceSelector {
    pub match_names: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub port: String,
    pub path: String,
    pub scheme: String,
    pub honor_labels: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scrape_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_config: Option<TlsConfig>,
    /// Deprecated by the Prometheus Operator in favour of `authorization`,
    /// which cannot name a file; still the only way to send Prometheus' own
    /// ServiceAccount token (as kube-prometheus does for the kubelet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bearer_token_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authorization: Option<Authorization>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metric_relabelings: Vec<RelabelConfig>,
}

/// A Prometheus relabeling rule, as the ServiceMonitor CRD spells it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RelabelConfig {
    pub source_labels: Vec<String>,
    pub separator: String,
    pub regex: String,
    pub target_label: String,
    pub replacement: String,
    pub action: String,
}

/// Prometheus adds the target's `namespace` (the agent's) to every series that lacks one, so a
/// device that backs no claimed PV would look like it belonged to the agent's namespace. On the
/// per-device families and the device info, `namespace` must mean the PVC's namespace or be
/// absent: drop it where the series has no `persistentvolumeclaim` (the agent sets both or
/// neither; setting a label to "" removes it).
fn drop_target_namespace_without_pvc() -> RelabelConfig {
    RelabelConfig {
        source_labels: vec!["__name__".into(), "persistentvolumeclaim".into()],
        separator: ";".into(),
        regex: "ebpf_bio_(req_.+|device_info);".into(),
        target_label: "namespace".into(),
        replacement: String::new(),
        action: "replace".into(),
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TlsConfig {
    pub ca: SecretOrConfigMap,
    /// Prometheus scrapes pod IPs; the certificate names the Service.
    pub server_name: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretOrConfigMap {
    pub secret: SecretKeySelector,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeySelector {
    pub name: String,
    pub key: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Authorization {
    #[serde(rename = "type")]
    pub type_: String,
    pub credentials: SecretKeySelector,
}

/// Inside the Prometheus container: its own ServiceAccount token.
pub const PROMETHEUS_TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// `None` when the BioMonitor disables its ServiceMonitor.
pub fn service_monitor(bm: &BioMonitor) -> Result<Option<ServiceMonitor>> {
    let sm = &bm.spec.service_monitor;
    if !sm.enabled {
        return Ok(None);
    }
    let endpoint = &bm.spec.metrics_endpoint;
    let mut metadata = child_meta(bm, names::child_name(bm))?;
    // User labels first, so they can never replace the operator's own.
    let mut labels: BTreeMap<String, String> = sm.labels.clone();
    labels.extend(metadata.labels.take().unwrap_or_default());
    metadata.labels = Some(labels);

    Ok(Some(ServiceMonitor {
        api_version: API_VERSION.into(),
        kind: KIND.into(),
        metadata,
        spec: ServiceMonitorSpec {
            selector: LabelSelector {
                match_labels: Some(names::selector_labels(bm)),
                ..LabelSelector::default()
            },
            namespace_selector: NamespaceSelector {
                match_names: bm.namespace().into_iter().collect(),
            },
            endpoints: vec![Endpoint {
                port: names::METRICS_PORT_NAME.into(),
                path: "/metrics".into(),
                scheme: if endpoint.tls.enabled {
                    "https"
                } else {
                    "http"
                }
                .into(),
                // The agent labels series with `namespace` and `node` of the
                // volume's consumer; without honorLabels Prometheus would
                // rename them exported_namespace/exported_node and overwrite
                // them with the agent pod's own.
                honor_labels: true,
                interval: sm.interval.clone(),
                scrape_timeout: sm.scrape_timeout.clone(),
                tls_config: endpoint.tls.enabled.then(|| TlsConfig {
                    ca: SecretOrConfigMap {
                        secret: SecretKeySelector {
                            name: names::tls_secret_name(bm),
                            key: super::tls::TLS_CA_KEY.into(),
                        },
                    },
                    server_name: names::tls_server_name(bm),
                }),
                bearer_token_file: (endpoint.auth_enabled()
                    && endpoint.bearer_token_secret.is_none())
                .then(|| PROMETHEUS_TOKEN_FILE.into()),
                authorization: endpoint
                    .bearer_token_secret
                    .as_ref()
                    .filter(|_| endpoint.auth_enabled())
                    .map(|s| Authorization {
                        type_: "Bearer".into(),
                        credentials: SecretKeySelector {
                            name: s.name.clone(),
                            key: s.key.clone(),
                        },
                    }),
                metric_relabelings: if bm.spec.persistent_volume_labels {
                    vec![drop_target_namespace_without_pvc()]
                } else {
                    Vec::new()
                },
            }],
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        crd::{AuthMode, BioMonitorSpec, IssuerRef, SecretKeyRef},
        resources::test_support::monitor,
    };

    #[test]
    fn selects_the_agent_service_port_and_honors_labels() {
        let mut spec = BioMonitorSpec::default();
        spec.service_monitor.interval = Some("30s".into());
        spec.service_monitor.labels = BTreeMap::from([
            ("release".to_string(), "prometheus".to_string()),
            (names::LABEL_INSTANCE.to_string(), "spoofed".to_string()),
        ]);
        let bm = monitor("disks", spec);
        let sm = service_monitor(&bm).unwrap().unwrap();
        assert_eq!(sm.api_version, "monitoring.coreos.com/v1");
        assert_eq!(sm.kind, "ServiceMonitor");
        let labels = sm.metadata.labels.clone().unwrap();
        assert_eq!(labels.get("release").unwrap(), "prometheus");
        assert_eq!(labels.get(names::LABEL_INSTANCE).unwrap(), "disks");
        assert_eq!(
            sm.spec.selector.match_labels,
            Some(names::selector_labels(&bm))
        );
        assert_eq!(sm.spec.namespace_selector.match_names, vec!["monitoring"]);
        let ep = &sm.spec.endpoints[0];
        assert_eq!(ep.port, "metrics");
        assert!(ep.honor_labels);
        assert_eq!(ep.interval.as_deref(), Some("30s"));
        assert_eq!(ep.scrape_timeout, None);

        let json = serde_json::to_value(&sm).unwrap();
        assert_eq!(json["spec"]["endpoints"][0]["honorLabels"], true);
        assert!(json["spec"]["endpoints"][0].get("scrapeTimeout").is_none());
    }

    #[test]
    fn target_namespace_is_dropped_from_device_series_without_a_claim() {
        let sm = service_monitor(&monitor("disks", BioMonitorSpec::default()))
            .unwrap()
            .unwrap();
        let json = serde_json::to_value(&sm.spec.endpoints[0]).unwrap();
        assert_eq!(
            json["metricRelabelings"],
            serde_json::json!([{
                "sourceLabels": ["__name__", "persistentvolumeclaim"],
                "separator": ";",
                "regex": "ebpf_bio_(req_.+|device_info);",
                "targetLabel": "namespace",
                "replacement": "",
                "action": "replace"
            }])
        );
        let off = BioMonitorSpec {
            persistent_volume_labels: false,
            ..BioMonitorSpec::default()
        };
        let sm = service_monitor(&monitor("disks", off)).unwrap().unwrap();
        let json = serde_json::to_value(&sm.spec.endpoints[0]).unwrap();
        assert!(json.get("metricRelabelings").is_none(), "{json}");
    }

    #[test]
    fn plain_http_without_tls_or_auth() {
        let sm = service_monitor(&monitor("disks", BioMonitorSpec::default()))
            .unwrap()
            .unwrap();
        let json = serde_json::to_value(&sm.spec.endpoints[0]).unwrap();
        assert_eq!(json["scheme"], "http");
        for absent in ["tlsConfig", "bearerTokenFile", "authorization"] {
            assert!(json.get(absent).is_none(), "{absent}: {json}");
        }
    }

    fn secured(issuer: bool, token_secret: bool) -> serde_json::Value {
        let mut spec = BioMonitorSpec::default();
        let ep = &mut spec.metrics_endpoint;
        ep.tls.enabled = true;
        ep.auth = AuthMode::Kubernetes;
        if issuer {
            ep.tls.issuer_ref = Some(IssuerRef {
                name: "ca-issuer".into(),
                kind: "ClusterIssuer".into(),
                group: "cert-manager.io".into(),
            });
        }
        if token_secret {
            ep.bearer_token_secret = Some(SecretKeyRef {
                name: "prom-token".into(),
                key: "token".into(),
            });
        }
        let sm = service_monitor(&monitor("disks", spec)).unwrap().unwrap();
        serde_json::to_value(&sm.spec.endpoints[0]).unwrap()
    }

    #[test]
    fn tls_and_auth_with_prometheus_own_token() {
        let ep = secured(false, false);
        assert_eq!(ep["scheme"], "https");
        assert_eq!(
            ep["tlsConfig"],
            serde_json::json!({
                "ca": {"secret": {"name": "disks-agent-tls", "key": "ca.crt"}},
                "serverName": "disks-agent.monitoring.svc"
            })
        );
        assert_eq!(
            ep["bearerTokenFile"],
            "/var/run/secrets/kubernetes.io/serviceaccount/token"
        );
        assert!(ep.get("authorization").is_none());
    }

    #[test]
    fn token_from_a_secret_and_ca_from_cert_manager() {
        let ep = secured(true, true);
        assert_eq!(
            ep["tlsConfig"]["ca"]["secret"]["name"],
            "disks-agent-cert-manager-tls"
        );
        assert_eq!(
            ep["authorization"],
            serde_json::json!({"type": "Bearer", "credentials": {"name": "prom-token", "key": "token"}})
        );
        assert!(ep.get("bearerTokenFile").is_none());
    }

    #[test]
    fn disabled_means_absent() {
        let mut spec = BioMonitorSpec::default();
        spec.service_monitor.enabled = false;
        assert!(service_monitor(&monitor("disks", spec)).unwrap().is_none());
    }
}
