//! From what one reconcile observed to the BioMonitor's status. Pure, so the
//! meaning of every condition is pinned down by unit tests.

use k8s_openapi::{
    api::apps::v1::DaemonSetStatus,
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
};

use crate::crd::BioMonitorStatus;

pub const READY: &str = "Ready";
pub const DAEMONSET_READY: &str = "DaemonSetReady";
pub const SERVICE_MONITOR_READY: &str = "ServiceMonitorReady";
pub const TLS_READY: &str = "TLSReady";

/// Condition reasons; part of the API (alerts and scripts match on them).
pub mod reason {
    pub const READY: &str = "Ready";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const NODE_CONFLICT: &str = "NodeConflict";
    pub const DAEMONSET_NOT_READY: &str = "DaemonSetNotReady";
    pub const SERVICE_MONITOR_NOT_READY: &str = "ServiceMonitorNotReady";
    pub const TLS_NOT_READY: &str = "TLSNotReady";

    pub const ALL_AGENTS_READY: &str = "AllAgentsReady";
    pub const AGENTS_NOT_READY: &str = "AgentsNotReady";
    pub const ROLLOUT_IN_PROGRESS: &str = "RolloutInProgress";
    pub const NO_NODES: &str = "NoNodes";
    pub const NOT_FOUND: &str = "NotFound";

    pub const APPLIED: &str = "Applied";
    pub const DISABLED: &str = "Disabled";
    pub const CRD_NOT_INSTALLED: &str = "CRDNotInstalled";
    pub const APPLY_FAILED: &str = "ApplyFailed";
    pub const PENDING: &str = "Pending";

    pub const ISSUED: &str = "Issued";
    pub const CERT_MANAGER_NOT_INSTALLED: &str = "CertManagerNotInstalled";
    pub const CERTIFICATE_NOT_READY: &str = "CertificateNotReady";
}

/// What the reconcile found out about the DaemonSet.
#[derive(Clone, Debug, PartialEq)]
pub enum DaemonSetState {
    /// Deliberately not applied (e.g. a node conflict).
    NotRolledOut {
        reason: &'static str,
        message: String,
    },
    /// Not applied this time (invalid spec) and none exists.
    Missing,
    /// Applied or found; `generation` is the DaemonSet's metadata.generation.
    Observed {
        generation: Option<i64>,
        status: Option<DaemonSetStatus>,
    },
}

/// What the reconcile found out about the ServiceMonitor.
#[derive(Clone, Debug, PartialEq)]
pub enum ServiceMonitorState {
    Applied,
    Disabled,
    CrdNotInstalled,
    Failed(String),
    NotRolledOut {
        reason: &'static str,
        message: String,
    },
    /// Not touched this time: keep whatever the previous status said.
    Unchanged,
}

/// What the reconcile found out about the agents' serving certificate.
#[derive(Clone, Debug, PartialEq)]
pub enum TlsState {
    /// TLS is off.
    Disabled,
    /// A certificate is in its Secret; the message says whose and until when.
    Issued(String),
    /// An issuerRef is set but cert-manager's Certificate CRD is missing.
    CertManagerNotInstalled,
    /// cert-manager has not (yet) issued: its Ready condition, or the Secret.
    NotReady(String),
    /// The API server refused the Certificate or a Secret.
    Failed(String),
    /// Not touched this time: keep whatever the previous status said.
    Unchanged,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    /// metadata.generation of the BioMonitor that was reconciled.
    pub generation: Option<i64>,
    pub invalid_spec: Option<String>,
    pub node_conflict: Option<String>,
    pub daemonset: DaemonSetState,
    pub service_monitor: ServiceMonitorState,
    pub tls: TlsState,
}

struct Outcome {
    ok: bool,
    reason: &'static str,
    message: String,
}

impl Outcome {
    fn new(ok: bool, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            ok,
            reason,
            message: message.into(),
        }
    }
}

fn daemonset_outcome(state: &DaemonSetState) -> (Outcome, i32, i32) {
    match state {
        DaemonSetState::NotRolledOut { reason, message } => {
            (Outcome::new(false, reason, message.clone()), 0, 0)
        }
        DaemonSetState::Missing => (
            Outcome::new(
                false,
                reason::NOT_FOUND,
                "the agent DaemonSet does not exist",
            ),
            0,
            0,
        ),
        DaemonSetState::Observed { generation, status } => {
            let Some(st) = status else {
                return (
                    Outcome::new(
                        false,
                        reason::ROLLOUT_IN_PROGRESS,
                        "the DaemonSet controller has not reported status yet",
                    ),
                    0,
                    0,
                );
            };
            let desired = st.desired_number_scheduled;
            let ready = st.number_ready;
            let updated = st.updated_number_scheduled.unwrap_or(0);
            let outcome = if st.observed_generation < *generation {
                Outcome::new(
                    false,
                    reason::ROLLOUT_IN_PROGRESS,
                    "the DaemonSet controller has not observed the latest spec yet",
                )
            } else if desired == 0 {
                Outcome::new(
                    false,
                    reason::NO_NODES,
                    "no node matches nodeSelector and tolerations",
                )
            } else if updated < desired {
                Outcome::new(
                    false,
                    reason::ROLLOUT_IN_PROGRESS,
                    format!("{updated}/{desired} agents updated, {ready}/{desired} ready"),
                )
            } else if ready < desired {
                Outcome::new(
                    false,
                    reason::AGENTS_NOT_READY,
                    format!("{ready}/{desired} agents ready"),
                )
            } else {
                Outcome::new(
                    true,
                    reason::ALL_AGENTS_READY,
                    format!("{ready}/{desired} agents ready"),
                )
            };
            (outcome, desired, ready)
        }
    }
}

/// `None` means "carry the previous condition over".
fn service_monitor_outcome(state: &ServiceMonitorState) -> Option<Outcome> {
    Some(match state {
        ServiceMonitorState::Applied => Outcome::new(true, reason::APPLIED, "ServiceMonitor applied"),
        ServiceMonitorState::Disabled => {
            Outcome::new(true, reason::DISABLED, "serviceMonitor.enabled is false")
        }
        ServiceMonitorState::CrdNotInstalled => Outcome::new(
            false,
            reason::CRD_NOT_INSTALLED,
            "the monitoring.coreos.com/v1 ServiceMonitor CRD is not installed; install the Prometheus Operator CRDs or set serviceMonitor.enabled=false (retrying periodically)",
        ),
        ServiceMonitorState::Failed(msg) => Outcome::new(false, reason::APPLY_FAILED, msg.clone()),
        ServiceMonitorState::NotRolledOut { reason, message } => {
            Outcome::new(false, reason, message.clone())
        }
        ServiceMonitorState::Unchanged => return None,
    })
}

/// `None` means "carry the previous condition over".
fn tls_outcome(state: &TlsState) -> Option<Outcome> {
    Some(match state {
        TlsState::Disabled => Outcome::new(
            true,
            reason::DISABLED,
            "metricsEndpoint.tls.enabled is false: /metrics is plain HTTP",
        ),
        TlsState::Issued(msg) => Outcome::new(true, reason::ISSUED, msg.clone()),
        TlsState::CertManagerNotInstalled => Outcome::new(
            false,
            reason::CERT_MANAGER_NOT_INSTALLED,
            "metricsEndpoint.tls.issuerRef is set but the cert-manager.io/v1 Certificate CRD is not installed; install cert-manager or remove issuerRef to let the operator issue the certificate (retrying periodically)",
        ),
        TlsState::NotReady(msg) => Outcome::new(false, reason::CERTIFICATE_NOT_READY, msg.clone()),
        TlsState::Failed(msg) => Outcome::new(false, reason::APPLY_FAILED, msg.clone()),
        TlsState::Unchanged => return None,
    })
}

/// A condition that keeps its lastTransitionTime while its status is unchanged,
/// so re-reconciling an unchanged object writes an identical status (no
/// status churn, no self-triggered watch events).
fn condition(
    prev: Option<&BioMonitorStatus>,
    type_: &str,
    status: &str,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let last_transition_time = prev
        .and_then(|p| p.condition(type_))
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

fn status_str(ok: bool) -> &'static str {
    if ok {
        "True"
    } else {
        "False"
    }
}

pub fn compute_status(
    prev: Option<&BioMonitorStatus>,
    obs: &Observation,
    now: &Time,
) -> BioMonitorStatus {
    let gen = obs.generation;
    let (ds, desired, ready) = daemonset_outcome(&obs.daemonset);
    let ds_condition = condition(
        prev,
        DAEMONSET_READY,
        status_str(ds.ok),
        ds.reason,
        ds.message.clone(),
        gen,
        now,
    );

    let sm_condition = match service_monitor_outcome(&obs.service_monitor) {
        Some(o) => condition(
            prev,
            SERVICE_MONITOR_READY,
            status_str(o.ok),
            o.reason,
            o.message,
            gen,
            now,
        ),
        None => match prev.and_then(|p| p.condition(SERVICE_MONITOR_READY)) {
            Some(c) => c.clone(),
            None => condition(
                prev,
                SERVICE_MONITOR_READY,
                "Unknown",
                reason::PENDING,
                "the ServiceMonitor has not been reconciled yet".into(),
                gen,
                now,
            ),
        },
    };

    let tls_condition = match tls_outcome(&obs.tls) {
        Some(o) => condition(
            prev,
            TLS_READY,
            status_str(o.ok),
            o.reason,
            o.message,
            gen,
            now,
        ),
        None => match prev.and_then(|p| p.condition(TLS_READY)) {
            Some(c) => c.clone(),
            None => condition(
                prev,
                TLS_READY,
                "Unknown",
                reason::PENDING,
                "the serving certificate has not been reconciled yet".into(),
                gen,
                now,
            ),
        },
    };

    // TLS before the DaemonSet: without its certificate the DaemonSet is
    // not rolled out, so the certificate is the cause to report.
    let ready_outcome = if let Some(msg) = &obs.invalid_spec {
        Outcome::new(false, reason::INVALID_SPEC, msg.clone())
    } else if let Some(msg) = &obs.node_conflict {
        Outcome::new(false, reason::NODE_CONFLICT, msg.clone())
    } else if tls_condition.status != "True" {
        Outcome::new(false, reason::TLS_NOT_READY, tls_condition.message.clone())
    } else if !ds.ok {
        Outcome::new(false, reason::DAEMONSET_NOT_READY, ds.message)
    } else if sm_condition.status != "True" {
        Outcome::new(
            false,
            reason::SERVICE_MONITOR_NOT_READY,
            sm_condition.message.clone(),
        )
    } else {
        Outcome::new(
            true,
            reason::READY,
            format!("{ready}/{desired} agents ready and scraped"),
        )
    };
    let ready_condition = condition(
        prev,
        READY,
        status_str(ready_outcome.ok),
        ready_outcome.reason,
        ready_outcome.message,
        gen,
        now,
    );

    BioMonitorStatus {
        observed_generation: gen,
        conditions: vec![ready_condition, ds_condition, sm_condition, tls_condition],
        desired_nodes: desired,
        ready_nodes: ready,
        nodes: Some(format!("{ready}/{desired}")),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::Timestamp;

    use super::*;

    fn t(s: i64) -> Time {
        Time(Timestamp::from_second(s).unwrap())
    }

    fn ds(desired: i32, updated: i32, ready: i32, observed: i64) -> DaemonSetState {
        DaemonSetState::Observed {
            generation: Some(1),
            status: Some(DaemonSetStatus {
                desired_number_scheduled: desired,
                updated_number_scheduled: Some(updated),
                number_ready: ready,
                observed_generation: Some(observed),
                ..DaemonSetStatus::default()
            }),
        }
    }

    fn obs(daemonset: DaemonSetState, service_monitor: ServiceMonitorState) -> Observation {
        Observation {
            generation: Some(3),
            invalid_spec: None,
            node_conflict: None,
            daemonset,
            service_monitor,
            tls: TlsState::Disabled,
        }
    }

    fn get<'a>(s: &'a BioMonitorStatus, type_: &str) -> &'a Condition {
        s.condition(type_).unwrap()
    }

    #[test]
    fn all_ready() {
        let s = compute_status(
            None,
            &obs(ds(3, 3, 3, 1), ServiceMonitorState::Applied),
            &t(10),
        );
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!((s.desired_nodes, s.ready_nodes), (3, 3));
        assert_eq!(s.nodes.as_deref(), Some("3/3"));
        for type_ in [READY, DAEMONSET_READY, SERVICE_MONITOR_READY, TLS_READY] {
            let c = get(&s, type_);
            assert_eq!(c.status, "True", "{type_}");
            assert_eq!(c.observed_generation, Some(3));
            assert_eq!(c.last_transition_time, t(10));
        }
        assert_eq!(
            s.conditions
                .iter()
                .map(|c| c.type_.as_str())
                .collect::<Vec<_>>(),
            [READY, DAEMONSET_READY, SERVICE_MONITOR_READY, TLS_READY]
        );
    }

    #[test]
    fn daemonset_progress() {
        let cases = [
            (ds(3, 3, 2, 1), reason::AGENTS_NOT_READY),
            (ds(3, 1, 3, 1), reason::ROLLOUT_IN_PROGRESS),
            (ds(3, 3, 3, 0), reason::ROLLOUT_IN_PROGRESS),
            (ds(0, 0, 0, 1), reason::NO_NODES),
            (
                DaemonSetState::Observed {
                    generation: Some(1),
                    status: None,
                },
                reason::ROLLOUT_IN_PROGRESS,
            ),
            (DaemonSetState::Missing, reason::NOT_FOUND),
        ];
        for (state, want) in cases {
            let s = compute_status(
                None,
                &obs(state.clone(), ServiceMonitorState::Applied),
                &t(1),
            );
            let c = get(&s, DAEMONSET_READY);
            assert_eq!(
                (c.status.as_str(), c.reason.as_str()),
                ("False", want),
                "{state:?}"
            );
            let r = get(&s, READY);
            assert_eq!(
                (r.status.as_str(), r.reason.as_str()),
                ("False", reason::DAEMONSET_NOT_READY)
            );
        }
    }

    #[test]
    fn missing_servicemonitor_crd_is_not_ready_but_daemonset_is() {
        let s = compute_status(
            None,
            &obs(ds(2, 2, 2, 1), ServiceMonitorState::CrdNotInstalled),
            &t(1),
        );
        assert_eq!(get(&s, DAEMONSET_READY).status, "True");
        let sm = get(&s, SERVICE_MONITOR_READY);
        assert_eq!(
            (sm.status.as_str(), sm.reason.as_str()),
            ("False", reason::CRD_NOT_INSTALLED)
        );
        let r = get(&s, READY);
        assert_eq!(
            (r.status.as_str(), r.reason.as_str()),
            ("False", reason::SERVICE_MONITOR_NOT_READY)
        );
    }

    #[test]
    fn disabled_servicemonitor_counts_as_ready() {
        let s = compute_status(
            None,
            &obs(ds(2, 2, 2, 1), ServiceMonitorState::Disabled),
            &t(1),
        );
        assert_eq!(get(&s, READY).status, "True");
        assert_eq!(get(&s, SERVICE_MONITOR_READY).reason, reason::DISABLED);
    }

    #[test]
    fn invalid_spec_wins_over_everything() {
        let mut o = obs(ds(2, 2, 2, 1), ServiceMonitorState::Unchanged);
        o.invalid_spec = Some("devices.include[0] \"(\" is not a valid regex".into());
        o.node_conflict = Some("conflict".into());
        let s = compute_status(None, &o, &t(1));
        let r = get(&s, READY);
        assert_eq!(
            (r.status.as_str(), r.reason.as_str()),
            ("False", reason::INVALID_SPEC)
        );
        assert!(r.message.contains("not a valid regex"));
        assert_eq!(
            s.observed_generation,
            Some(3),
            "an invalid spec is still observed"
        );
        assert_eq!(get(&s, SERVICE_MONITOR_READY).status, "Unknown");
    }

    #[test]
    fn unchanged_servicemonitor_condition_is_carried_over() {
        let prev = compute_status(
            None,
            &obs(ds(1, 1, 1, 1), ServiceMonitorState::Applied),
            &t(1),
        );
        let mut o = obs(ds(1, 1, 1, 1), ServiceMonitorState::Unchanged);
        o.invalid_spec = Some("bad".into());
        let s = compute_status(Some(&prev), &o, &t(50));
        assert_eq!(
            get(&s, SERVICE_MONITOR_READY),
            get(&prev, SERVICE_MONITOR_READY)
        );
    }

    #[test]
    fn tls_not_ready_is_the_reason_before_the_daemonset() {
        let mut o = obs(ds(3, 1, 1, 1), ServiceMonitorState::Applied);
        o.tls = TlsState::CertManagerNotInstalled;
        let s = compute_status(None, &o, &t(1));
        let c = get(&s, TLS_READY);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", reason::CERT_MANAGER_NOT_INSTALLED)
        );
        assert!(c.message.contains("cert-manager.io/v1 Certificate CRD"));
        let r = get(&s, READY);
        assert_eq!(
            (r.status.as_str(), r.reason.as_str()),
            ("False", reason::TLS_NOT_READY)
        );
        assert_eq!(r.message, c.message);

        o.tls = TlsState::NotReady("Issuer ca not found".into());
        let s = compute_status(None, &o, &t(1));
        assert_eq!(get(&s, TLS_READY).reason, reason::CERTIFICATE_NOT_READY);

        o.tls = TlsState::Issued("issued by the operator".into());
        let s = compute_status(None, &o, &t(1));
        assert_eq!(get(&s, TLS_READY).status, "True");
        assert_eq!(get(&s, READY).reason, reason::DAEMONSET_NOT_READY);
    }

    #[test]
    fn unchanged_tls_condition_is_carried_over() {
        let mut o = obs(ds(1, 1, 1, 1), ServiceMonitorState::Applied);
        o.tls = TlsState::Issued("issued".into());
        let prev = compute_status(None, &o, &t(1));
        o.tls = TlsState::Unchanged;
        o.invalid_spec = Some("bad".into());
        let s = compute_status(Some(&prev), &o, &t(50));
        assert_eq!(get(&s, TLS_READY), get(&prev, TLS_READY));
    }

    #[test]
    fn node_conflict() {
        let mut o = obs(
            DaemonSetState::NotRolledOut {
                reason: reason::NODE_CONFLICT,
                message: "nodes a are already monitored".into(),
            },
            ServiceMonitorState::NotRolledOut {
                reason: reason::NODE_CONFLICT,
                message: "not rolled out".into(),
            },
        );
        o.node_conflict = Some("nodes a are already monitored".into());
        let s = compute_status(None, &o, &t(1));
        let r = get(&s, READY);
        assert_eq!(
            (r.status.as_str(), r.reason.as_str()),
            ("False", reason::NODE_CONFLICT)
        );
        assert_eq!(get(&s, DAEMONSET_READY).reason, reason::NODE_CONFLICT);
        assert_eq!(s.nodes.as_deref(), Some("0/0"));
    }

    #[test]
    fn transition_time_changes_only_with_status() {
        let first = compute_status(
            None,
            &obs(ds(2, 2, 1, 1), ServiceMonitorState::Applied),
            &t(1),
        );
        // Same status, different message: time kept.
        let second = compute_status(
            Some(&first),
            &obs(ds(3, 3, 1, 1), ServiceMonitorState::Applied),
            &t(2),
        );
        assert_eq!(get(&second, DAEMONSET_READY).last_transition_time, t(1));
        // Status flips: time moves.
        let third = compute_status(
            Some(&second),
            &obs(ds(3, 3, 3, 1), ServiceMonitorState::Applied),
            &t(3),
        );
        assert_eq!(get(&third, DAEMONSET_READY).last_transition_time, t(3));
        assert_eq!(get(&third, READY).last_transition_time, t(3));
        // Nothing changes: the whole status is identical (no write needed).
        let fourth = compute_status(
            Some(&third),
            &obs(ds(3, 3, 3, 1), ServiceMonitorState::Applied),
            &t(4),
        );
        assert_eq!(fourth, third);
    }
}
