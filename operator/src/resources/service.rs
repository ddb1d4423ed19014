//! The Service the ServiceMonitor discovers agent pods through.

use k8s_openapi::{
    api::core::v1::{Service, ServicePort, ServiceSpec},
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::child_meta;
use crate::{crd::BioMonitor, names, Result};

pub fn service(bm: &BioMonitor) -> Result<Service> {
    Ok(Service {
        metadata: child_meta(bm, names::child_name(bm))?,
        spec: Some(ServiceSpec {
            // Headless: Prometheus scrapes each pod through the endpoints, a
            // virtual IP would only load-balance between nodes.
            cluster_ip: Some("None".into()),
            selector: Some(names::selector_labels(bm)),
            ports: Some(vec![ServicePort {
                name: Some(names::METRICS_PORT_NAME.into()),
                port: bm.spec.agent.port,
                target_port: Some(IntOrString::String(names::METRICS_PORT_NAME.into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{crd::BioMonitorSpec, resources::test_support::monitor};

    #[test]
    fn selects_agent_pods_on_the_named_metrics_port() {
        let mut spec = BioMonitorSpec::default();
        spec.agent.port = 9555;
        let bm = monitor("disks", spec);
        let svc = service(&bm).unwrap();
        assert_eq!(svc.metadata.name.as_deref(), Some("disks-agent"));
        let spec = svc.spec.unwrap();
        assert_eq!(spec.selector, Some(names::selector_labels(&bm)));
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        let port = &spec.ports.unwrap()[0];
        assert_eq!(port.name.as_deref(), Some("metrics"));
        assert_eq!(port.port, 9555);
        assert_eq!(
            port.target_port,
            Some(IntOrString::String("metrics".into()))
        );
    }
}
