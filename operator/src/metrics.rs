//! The operator's own Prometheus metrics.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: String,
}

#[derive(Clone, Debug)]
pub struct Metrics {
    pub reconciliations: Counter,
    pub failures: Family<ErrorLabels, Counter>,
    pub reconcile_duration: Histogram,
    pub leader: Gauge,
}

impl Metrics {
    /// Registers under the `bio_operator_` prefix.
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            reconciliations: Counter::default(),
            failures: Family::default(),
            // 5 ms .. ~20 s: a reconcile is a handful of API round trips.
            reconcile_duration: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.0, 13),
            ),
            leader: Gauge::default(),
        };
        let registry = registry.sub_registry_with_prefix("bio_operator");
        registry.register(
            "reconciliations",
            "BioMonitor reconciliations started",
            metrics.reconciliations.clone(),
        );
        registry.register(
            "reconcile_errors",
            "BioMonitor reconciliations that failed, by error kind",
            metrics.failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of BioMonitor reconciliations",
            metrics.reconcile_duration.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader lease and runs the controller",
            metrics.leader.clone(),
        );
        metrics
    }

    pub fn reconcile_failed(&self, kind: &str) {
        self.failures
            .get_or_create(&ErrorLabels { error: kind.into() })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_the_documented_names() {
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry);
        m.reconciliations.inc();
        m.reconcile_failed("kube");
        m.reconcile_duration.observe(0.01);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(
            out.contains("bio_operator_reconciliations_total 1"),
            "{out}"
        );
        assert!(
            out.contains("bio_operator_reconcile_errors_total{error=\"kube\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("bio_operator_reconcile_duration_seconds_count 1"),
            "{out}"
        );
        assert!(out.contains("bio_operator_leader 0"), "{out}");
    }
}
