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
}

/// `None` when the BioMonitor disables its ServiceMonitor.
pub fn service_monitor(bm: &BioMonitor) -> Result<Option<ServiceMonitor>> {
    let sm = &bm.spec.service_monitor;
    if !sm.enabled {
        return Ok(None);
    }
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
                scheme: "http".into(),
                // The agent labels series with `namespace` and `node` of the
                // volume's consumer; without honorLabels Prometheus would
                // rename them exported_namespace/exported_node and overwrite
                // them with the agent pod's own.
                honor_labels: true,
                interval: sm.interval.clone(),
                scrape_timeout: sm.scrape_timeout.clone(),
            }],
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{crd::BioMonitorSpec, resources::test_support::monitor};

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
    fn disabled_means_absent() {
        let mut spec = BioMonitorSpec::default();
        spec.service_monitor.enabled = false;
        assert!(service_monitor(&monitor("disks", spec)).unwrap().is_none());
    }
}
