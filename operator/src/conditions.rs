//! From what one reconcile observed to the BioMonitor's status. Pure, so the
//! meaning of every condition is pinned down by unit tests.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::DaemonSetStatus,
        core::v1::{ContainerStateTerminated, Pod},
    },
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
};

use crate::{crd::BioMonitorStatus, names};

pub const READY: &str = "Ready";
pub const DAEMONSET_READY: &str = "DaemonSetReady";
pub const SERVICE_MONITOR_READY: &str = "ServiceMonitorReady";
pub const TLS_READY: &str = "TLSReady";
pub const AGENTS_HEALTHY: &str = "AgentsHealthy";

/// Condition reasons; part of the API (alerts and scripts match on them).
pub mod reason {
    pub const READY: &str = "Ready";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// Ready: the API server refused the agent DaemonSet for a field the
    /// operator sets itself (a spec problem is `InvalidSpec`).
    pub const APPLY_REJECTED: &str = "ApplyRejected";
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

    /// AgentsHealthy (and Ready): an agent container keeps exiting or cannot start.
    pub const AGENT_FAILING: &str = "AgentFailing";
    /// AgentsHealthy (and Ready): the agent image cannot be pulled.
    pub const IMAGE_PULL_FAILED: &str = "ImagePullFailed";
    /// AgentsHealthy=True: not every agent is ready yet, but none has failed.
    pub const NO_FAILURES: &str = "NoFailures";
    /// AgentsHealthy=Unknown: no agent pods to look at (see DaemonSetReady).
    pub const NO_AGENTS: &str = "NoAgents";
    /// AgentsHealthy=Unknown: the API server refused to list the agent pods.
    pub const POD_LIST_FAILED: &str = "PodListFailed";
}

/// Longest excerpt of one agent's own message (the tail of its log) in a
/// condition: enough for the agent's final `error: ...` line.
pub const MAX_AGENT_MESSAGE_BYTES: usize = 1024;
/// Lines of the agent's message kept (the last ones: the error comes last).
pub const MAX_AGENT_MESSAGE_LINES: usize = 3;
/// Distinct failures spelled out in the condition message.
const MAX_FAILURE_GROUPS: usize = 2;
/// Node names listed per failure.
const MAX_NODES_NAMED: usize = 3;

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

/// What the reconcile found out about the agent pods.
#[derive(Clone, Debug, PartialEq)]
pub enum AgentsState {
    /// Not listed: the DaemonSet is fully ready or has no agents to run
    /// (see [`needs_agent_check`]).
    NotChecked,
    /// Listed this time.
    Checked(AgentHealth),
    /// The API server refused the list (e.g. RBAC): its message.
    ListFailed(String),
    /// Listed recently, not again this time: keep the previous condition.
    Unchanged,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    /// metadata.generation of the BioMonitor that was reconciled.
    pub generation: Option<i64>,
    /// Why the spec cannot be rolled out, by BioMonitor field: found before
    /// applying, or the API server's refusal of the DaemonSet mapped back.
    pub invalid_spec: Option<String>,
    /// The API server refused the DaemonSet for a field not from the spec.
    pub apply_rejected: Option<String>,
    pub node_conflict: Option<String>,
    pub daemonset: DaemonSetState,
    pub service_monitor: ServiceMonitorState,
    pub tls: TlsState,
    pub agents: AgentsState,
}

/// One agent that cannot run, as its pod's status tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentFailure {
    /// The pod's node (its name if it has none).
    pub node: String,
    /// [`reason::AGENT_FAILING`] or [`reason::IMAGE_PULL_FAILED`].
    pub reason: &'static str,
    /// What went wrong, with the agent's own last words, sanitized and short.
    pub detail: String,
}

/// The failing agents among the pods listed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AgentHealth {
    /// Pods looked at (terminating ones are skipped).
    pub pods: usize,
    pub failures: Vec<AgentFailure>,
}

impl AgentHealth {
    /// Adds one pod of the DaemonSet; the controller feeds it page by page.
    pub fn observe(&mut self, pod: &Pod) {
        if pod.metadata.deletion_timestamp.is_some() {
            // Replaced in a rollout or evicted: not an agent that should run.
            return;
        }
        self.pods += 1;
        if let Some(failure) = agent_failure(pod) {
            self.failures.push(failure);
        }
    }
}

/// The failing agents among `pods` (the DaemonSet's pods).
pub fn agent_health<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> AgentHealth {
    let mut health = AgentHealth::default();
    for pod in pods {
        health.observe(pod);
    }
    health
}

/// Whether listing the agent pods can tell anything: the DaemonSet has
/// agents to run and not all of them are ready. A fully ready DaemonSet has
/// no failing agent, so the usual reconcile lists nothing.
pub fn needs_agent_check(state: &DaemonSetState) -> bool {
    let (outcome, desired, _) = daemonset_outcome(state);
    !outcome.ok && desired > 0
}

/// Why the agent container of `pod` cannot run, if it cannot: it cannot be
/// pulled or created, it is in CrashLoopBackOff, or its last run ended with
/// a non-zero exit code and it is not ready since. A ready container is never
/// failing, whatever it went through before.
pub fn agent_failure(pod: &Pod) -> Option<AgentFailure> {
    let status = pod
        .status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == names::AGENT_CONTAINER)?;
    if status.ready {
        return None;
    }
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .or_else(|| pod.metadata.name.clone())
        .unwrap_or_default();
    let failure = |reason, detail| {
        Some(AgentFailure {
            node: sanitize_line(&node, 253),
            reason,
            detail,
        })
    };
    let state = status.state.as_ref();
    let last_failure = || {
        [state, status.last_state.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|s| s.terminated.as_ref())
            .find(|t| t.exit_code != 0)
    };
    if let Some(waiting) = state.and_then(|s| s.waiting.as_ref()) {
        let why = waiting.reason.as_deref().unwrap_or_default();
        let message = waiting.message.as_deref().unwrap_or_default();
        match why {
            "ErrImagePull" | "ImagePullBackOff" | "InvalidImageName" | "ErrImageNeverPull" => {
                // ErrImagePull and ImagePullBackOff alternate: the message
                // names neither, so it stays the same between them.
                let image = sanitize_line(&status.image, 512);
                let detail = match excerpt(message) {
                    m if m.is_empty() => format!("cannot pull image \"{image}\" ({why})"),
                    m => format!("cannot pull image \"{image}\": {m}"),
                };
                return failure(reason::IMAGE_PULL_FAILED, detail);
            }
            "CreateContainerConfigError" | "CreateContainerError" | "RunContainerError" => {
                let detail = format!(
                    "the agent container cannot be started ({why}): {}",
                    excerpt(message)
                );
                return failure(reason::AGENT_FAILING, detail);
            }
            "CrashLoopBackOff" => {
                let detail = match last_failure() {
                    Some(t) => terminated_detail(t),
                    None => format!(
                        "the agent keeps exiting (CrashLoopBackOff): {}",
                        excerpt(message)
                    ),
                };
                return failure(reason::AGENT_FAILING, detail);
            }
            _ => {}
        }
    }
    last_failure().and_then(|t| failure(reason::AGENT_FAILING, terminated_detail(t)))
}

/// "the agent exited with code 1: <its last lines>". Leaves out what
/// changes from one crash to the next (restart count, times), so the
/// condition, and the status, stay the same while the agent crash-loops.
fn terminated_detail(t: &ContainerStateTerminated) -> String {
    let mut detail = format!("the agent exited with code {}", t.exit_code);
    if let Some(signal) = t.signal.filter(|s| *s != 0) {
        detail.push_str(&format!(" (signal {signal})"));
    }
    // "Error" and "Completed" say nothing the exit code does not.
    if let Some(why) = t
        .reason
        .as_deref()
        .filter(|r| !r.is_empty() && *r != "Error" && *r != "Completed")
    {
        detail.push_str(&format!(" ({})", sanitize_line(why, 64)));
    }
    let message = excerpt(t.message.as_deref().unwrap_or_default());
    if !message.is_empty() {
        detail.push_str(": ");
        detail.push_str(&message);
    }
    detail
}

/// The last [`MAX_AGENT_MESSAGE_LINES`] non-empty lines of `message`, joined
/// with " | ", cleaned of terminal escapes and control characters, and at
/// most [`MAX_AGENT_MESSAGE_BYTES`] long (the end is kept: the agent's error
/// is its last line).
pub fn excerpt(message: &str) -> String {
    // Look at the end only: a termination message can be large.
    let tail = tail_bytes(message, 4 * MAX_AGENT_MESSAGE_BYTES);
    let cleaned = strip_escapes(tail);
    let lines: Vec<&str> = cleaned
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let joined = lines[lines.len().saturating_sub(MAX_AGENT_MESSAGE_LINES)..].join(" | ");
    if joined.len() <= MAX_AGENT_MESSAGE_BYTES {
        return joined;
    }
    let ellipsis = "...";
    format!(
        "{ellipsis}{}",
        tail_bytes(&joined, MAX_AGENT_MESSAGE_BYTES - ellipsis.len())
    )
}

/// The longest suffix of `s` of at most `max` bytes that starts on a
/// character boundary.
fn tail_bytes(s: &str, max: usize) -> &str {
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Removes ANSI escape sequences (the agent's log lines may be coloured),
/// control characters other than newlines, and Unicode direction overrides,
/// which could make a message read differently from what it says.
fn strip_escapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => match chars.next() {
                // CSI (colours): parameters, then a final byte in @..~.
                Some('[') => {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                // OSC (window titles, links): up to BEL or ESC \.
                Some(']') => {
                    while let Some(c) = chars.next() {
                        if c == '\u{7}' || (c == '\u{1b}' && chars.next_if_eq(&'\\').is_some()) {
                            break;
                        }
                    }
                }
                // Anything else: ESC and one character.
                _ => {}
            },
            '\n' => out.push('\n'),
            '\t' => out.push(' '),
            c if c.is_control() => {}
            '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' => {}
            c => out.push(c),
        }
    }
    out
}

/// One line, clean, at most `max` bytes (for names and image references).
fn sanitize_line(s: &str, max: usize) -> String {
    let cleaned = strip_escapes(s).replace('\n', " ");
    let mut end = cleaned.len().min(max);
    while !cleaned.is_char_boundary(end) {
        end -= 1;
    }
    cleaned[..end].to_string()
}

/// "node a" / "nodes a, b, c and 2 more".
fn describe_nodes(nodes: &[&str]) -> String {
    let named = nodes
        .iter()
        .take(MAX_NODES_NAMED)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    match nodes.len() {
        1 => format!("node {named}"),
        n if n <= MAX_NODES_NAMED => format!("nodes {named}"),
        n => format!("nodes {named} and {} more", n - MAX_NODES_NAMED),
    }
}

/// `None` when no agent is failing. Agents failing the same way are grouped;
/// the most common failure (ties: by reason, then node) gives the reason.
fn agents_failure_outcome(health: &AgentHealth) -> Option<Outcome> {
    let mut groups: BTreeMap<(&'static str, &str), Vec<&str>> = BTreeMap::new();
    for f in &health.failures {
        groups
            .entry((f.reason, f.detail.as_str()))
            .or_default()
            .push(f.node.as_str());
    }
    let mut groups: Vec<((&'static str, &str), Vec<&str>)> = groups
        .into_iter()
        .map(|(key, mut nodes)| {
            nodes.sort_unstable();
            (key, nodes)
        })
        .collect();
    groups.sort_by(|(ka, na), (kb, nb)| {
        nb.len()
            .cmp(&na.len())
            .then(ka.0.cmp(kb.0))
            .then(na[0].cmp(nb[0]))
    });
    let first_reason: &'static str = groups.first()?.0 .0;
    let failing = health.failures.len();
    let mut message = format!(
        "{failing} of {} agent{} failing: ",
        health.pods.max(failing),
        if health.pods.max(failing) == 1 {
            ""
        } else {
            "s"
        }
    );
    let shown: Vec<String> = groups
        .iter()
        .take(MAX_FAILURE_GROUPS)
        .map(|((_, detail), nodes)| format!("{}: {detail}", describe_nodes(nodes)))
        .collect();
    message.push_str(&shown.join("; "));
    let rest: usize = groups
        .iter()
        .skip(MAX_FAILURE_GROUPS)
        .map(|(_, n)| n.len())
        .sum();
    if rest > 0 {
        message.push_str(&format!("; {rest} more failing otherwise"));
    }
    Some(Outcome::new(false, first_reason, message))
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

/// AgentsHealthy: True when every agent is ready or none of the pods listed
/// is failing; False with the failures; Unknown when there are no agents or
/// the pods could not be listed. Carried over while the pods were not listed
/// again (they are listed at most every `--agent-check-interval`).
fn agents_healthy_condition(
    prev: Option<&BioMonitorStatus>,
    obs: &Observation,
    ds: &Outcome,
    desired: i32,
    ready: i32,
    now: &Time,
) -> Condition {
    let gen = obs.generation;
    let make = |status: &str, reason: &str, message: String| {
        condition(prev, AGENTS_HEALTHY, status, reason, message, gen, now)
    };
    if ds.ok {
        return make(
            "True",
            reason::ALL_AGENTS_READY,
            format!("{ready}/{desired} agents ready"),
        );
    }
    if !needs_agent_check(&obs.daemonset) {
        return make(
            "Unknown",
            reason::NO_AGENTS,
            "no agent pods to look at: see DaemonSetReady".into(),
        );
    }
    match &obs.agents {
        AgentsState::Checked(health) => match agents_failure_outcome(health) {
            Some(o) => make("False", o.reason, o.message),
            None => make(
                "True",
                reason::NO_FAILURES,
                format!("no agent has failed; {ready}/{desired} ready"),
            ),
        },
        AgentsState::ListFailed(message) => make(
            "Unknown",
            reason::POD_LIST_FAILED,
            format!("cannot list the agent pods: {message}"),
        ),
        AgentsState::Unchanged | AgentsState::NotChecked => {
            match prev.and_then(|p| p.condition(AGENTS_HEALTHY)) {
                Some(c) if matches!(obs.agents, AgentsState::Unchanged) => c.clone(),
                _ => make(
                    "Unknown",
                    reason::PENDING,
                    "the agent pods have not been checked yet".into(),
                ),
            }
        }
    }
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

    let agents_condition = agents_healthy_condition(prev, obs, &ds, desired, ready, now);

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
    } else if let Some(msg) = &obs.apply_rejected {
        Outcome::new(false, reason::APPLY_REJECTED, msg.clone())
    } else if let Some(msg) = &obs.node_conflict {
        Outcome::new(false, reason::NODE_CONFLICT, msg.clone())
    } else if tls_condition.status != "True" {
        Outcome::new(false, reason::TLS_NOT_READY, tls_condition.message.clone())
    } else if !ds.ok {
        if agents_condition.status == "False" {
            // Why the DaemonSet is not ready, in the agents' own words.
            let why = if agents_condition.reason == reason::IMAGE_PULL_FAILED {
                reason::IMAGE_PULL_FAILED
            } else {
                reason::AGENT_FAILING
            };
            Outcome::new(false, why, agents_condition.message.clone())
        } else {
            Outcome::new(false, reason::DAEMONSET_NOT_READY, ds.message)
        }
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
        conditions: vec![
            ready_condition,
            ds_condition,
            sm_condition,
            tls_condition,
            agents_condition,
        ],
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
            apply_rejected: None,
            node_conflict: None,
            daemonset,
            service_monitor,
            tls: TlsState::Disabled,
            agents: AgentsState::NotChecked,
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
        for type_ in [
            READY,
            DAEMONSET_READY,
            SERVICE_MONITOR_READY,
            TLS_READY,
            AGENTS_HEALTHY,
        ] {
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
            [
                READY,
                DAEMONSET_READY,
                SERVICE_MONITOR_READY,
                TLS_READY,
                AGENTS_HEALTHY
            ]
        );
        assert_eq!(get(&s, AGENTS_HEALTHY).reason, reason::ALL_AGENTS_READY);
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
    fn a_rejected_daemonset_makes_ready_false_while_the_old_one_runs() {
        let mut o = obs(ds(2, 2, 2, 1), ServiceMonitorState::Applied);
        o.apply_rejected = Some("the API server rejected the agent DaemonSet: x".into());
        let s = compute_status(None, &o, &t(1));
        let r = get(&s, READY);
        assert_eq!(
            (r.status.as_str(), r.reason.as_str(), r.message.as_str()),
            (
                "False",
                reason::APPLY_REJECTED,
                "the API server rejected the agent DaemonSet: x"
            )
        );
        // The previous DaemonSet keeps running and is reported as it is.
        assert_eq!(get(&s, DAEMONSET_READY).status, "True");
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

    // --- AgentsHealthy: from agent pods to the condition ---

    use serde_json::{json, Value};

    const KPROBE_ERROR: &str = "error: attach mode kprobe is not available: programs loaded and passed the verifier, but attaching kp_rq_issue failed: No such file or directory (os error 2): the kernel has no kprobe support (CONFIG_KPROBES is off: no /sys/bus/event_source/devices/kprobe); use --attach=tp_btf, raw_tp or tracepoint";

    fn pod(node: &str, container: Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": format!("disks-agent-{node}"), "namespace": "ns"},
            "spec": {"nodeName": node, "containers": [{"name": "agent"}]},
            "status": {"phase": "Running", "containerStatuses": [container]},
        }))
        .unwrap()
    }

    fn agent(ready: bool, state: Value, last_state: Value) -> Value {
        json!({
            "name": "agent",
            "ready": ready,
            "restartCount": 4,
            "image": "ghcr.io/bio-exporter/node-agent:1.0",
            "imageID": "",
            "state": state,
            "lastState": last_state,
        })
    }

    fn crashed(exit_code: i32, message: &str) -> Value {
        json!({"terminated": {"exitCode": exit_code, "reason": "Error", "message": message}})
    }

    fn crash_looping(node: &str, message: &str) -> Pod {
        pod(
            node,
            agent(
                false,
                json!({"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container=agent pod=disks-agent-x_ns(uid)"}}),
                crashed(1, message),
            ),
        )
    }

    fn running(node: &str) -> Pod {
        pod(
            node,
            agent(
                true,
                json!({"running": {"startedAt": "2025-01-01T00:00:00Z"}}),
                json!({}),
            ),
        )
    }

    fn pulling(node: &str, why: &str, message: &str) -> Pod {
        pod(
            node,
            agent(
                false,
                json!({"waiting": {"reason": why, "message": message}}),
                json!({}),
            ),
        )
    }

    fn agent_log(last: &str) -> String {
        format!(
            "2025-01-01T00:00:00.000000Z  INFO node_agent: serving /metrics, /healthz, /readyz listen=0.0.0.0:9435\n\
             2025-01-01T00:00:00.100000Z  INFO node_agent::bpf: kernel facts btf=true\n\
             {last}\n"
        )
    }

    fn checked(pods: &[Pod]) -> Observation {
        let mut o = obs(ds(3, 3, 1, 1), ServiceMonitorState::Applied);
        o.agents = AgentsState::Checked(agent_health(pods));
        o
    }

    #[test]
    fn crash_looping_agent_names_its_node_and_its_own_error() {
        let pods = [
            running("node-a"),
            crash_looping("node-b", &agent_log(KPROBE_ERROR)),
            running("node-c"),
        ];
        let s = compute_status(None, &checked(&pods), &t(1));
        let c = get(&s, AGENTS_HEALTHY);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", reason::AGENT_FAILING)
        );
        assert_eq!(
            c.message,
            format!(
                "1 of 3 agents failing: node node-b: the agent exited with code 1: \
                 2025-01-01T00:00:00.000000Z  INFO node_agent: serving /metrics, /healthz, /readyz listen=0.0.0.0:9435 | \
                 2025-01-01T00:00:00.100000Z  INFO node_agent::bpf: kernel facts btf=true | {KPROBE_ERROR}"
            )
        );
        // Ready tells the same story, instead of "1/3 agents ready".
        let r = get(&s, READY);
        assert_eq!(
            (r.status.as_str(), r.reason.as_str()),
            ("False", reason::AGENT_FAILING)
        );
        assert_eq!(r.message, c.message);
        assert_eq!(get(&s, DAEMONSET_READY).reason, reason::AGENTS_NOT_READY);
    }

    #[test]
    fn the_agents_own_seccomp_eperm_output_is_quoted_clean() {
        // Captured from the node-agent (attach tp_btf) run under a seccomp
        // filter failing bpf() and perf_event_open() with EPERM, as a
        // runtime's default profile without CAP_SYS_ADMIN does; coloured,
        // as the agent logs.
        const LOG: &str = concat!(
            "\u{1b}[2m2026-11-29T23:12:11.280737Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m \u{1b}[2mnode_agent\u{1b}[0m\u{1b}[2m:\u{1b}[0m serving /metrics, /healthz, /readyz \u{1b}[3mlisten\u{1b}[0m\u{1b}[2m=\u{1b}[0m127.0.0.1:19436 \u{1b}[3mscheme\u{1b}[0m\u{1b}[2m=\u{1b}[0mhttp \u{1b}[3mnode\u{1b}[0m\u{1b}[2m=\u{1b}[0mvm\n",
            "\u{1b}[2m2026-11-29T23:12:11.401550Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m \u{1b}[2mnode_agent::bpf\u{1b}[0m\u{1b}[2m:\u{1b}[0m kernel facts \u{1b}[3mbtf\u{1b}[0m\u{1b}[2m=\u{1b}[0mtrue \u{1b}[3mqueue_flag_stats_bit\u{1b}[0m\u{1b}[2m=\u{1b}[0mSome(7) \u{1b}[3mtracefs\u{1b}[0m\u{1b}[2m=\u{1b}[0mSome(\"/sys/kernel/tracing\")\n",
            "libbpf: Failed to bump RLIMIT_MEMLOCK (err = -EPERM), you might need to do it explicitly!\n",
            "libbpf: Error in bpf_object__probe_loading(): -EPERM. Couldn't load trivial BPF program. Make sure your kernel supports BPF (CONFIG_BPF_SYSCALL=y) and/or that RLIMIT_MEMLOCK is set to big enough value.\n",
            "libbpf: failed to load BPF skeleton 'bio_bpf': -EPERM\n",
            "error: attach mode tp_btf is not available: loading programs (verifier): Operation not permitted (os error 1)\n",
        );
        let f = agent_failure(&crash_looping("node-a", LOG)).unwrap();
        assert_eq!(f.reason, reason::AGENT_FAILING);
        assert_eq!(
            f.detail,
            "the agent exited with code 1: \
             libbpf: Error in bpf_object__probe_loading(): -EPERM. Couldn't load trivial BPF program. Make sure your kernel supports BPF (CONFIG_BPF_SYSCALL=y) and/or that RLIMIT_MEMLOCK is set to big enough value. | \
             libbpf: failed to load BPF skeleton 'bio_bpf': -EPERM | \
             error: attach mode tp_btf is not available: loading programs (verifier): Operation not permitted (os error 1)"
        );
        // As docs/operator.md quotes it.
        let s = compute_status(None, &checked(&[crash_looping("node-a", LOG)]), &t(1));
        assert_eq!(
            get(&s, AGENTS_HEALTHY).message,
            format!("1 of 1 agent failing: node node-a: {}", f.detail)
        );
        // Lines before the error, coloured: escapes go, text stays.
        let two = LOG.lines().take(2).collect::<Vec<_>>().join("\n");
        assert_eq!(
            excerpt(&two),
            "2026-11-29T23:12:11.280737Z  INFO node_agent: serving /metrics, /healthz, /readyz listen=127.0.0.1:19436 scheme=http node=vm | \
             2026-11-29T23:12:11.401550Z  INFO node_agent::bpf: kernel facts btf=true queue_flag_stats_bit=Some(7) tracefs=Some(\"/sys/kernel/tracing\")"
        );
    }

    #[test]
    fn only_the_last_three_lines_are_kept() {
        let log = "one\ntwo\n\nthree\nfour\n\n";
        let f = agent_failure(&crash_looping("n", log)).unwrap();
        assert_eq!(f.detail, "the agent exited with code 1: two | three | four");
    }

    #[test]
    fn status_stays_identical_while_the_agent_crash_loops() {
        // Between crashes the container is waiting (back-off), then running
        // but not ready, then terminated; the restart count grows. None of
        // that may change the status, or every check would write it.
        let log = agent_log(KPROBE_ERROR);
        let states = [
            crash_looping("n", &log),
            pod(
                "n",
                agent(
                    false,
                    json!({"running": {"startedAt": "2025-01-01T00:01:00Z"}}),
                    crashed(1, &log),
                ),
            ),
            pod("n", agent(false, crashed(1, &log), crashed(1, &log))),
        ];
        let first = compute_status(None, &checked(&states[..1]), &t(1));
        for (i, p) in states.iter().enumerate() {
            let mut p = p.clone();
            p.status
                .as_mut()
                .unwrap()
                .container_statuses
                .as_mut()
                .unwrap()[0]
                .restart_count = 10 + i as i32;
            let again = compute_status(Some(&first), &checked(&[p]), &t(100));
            assert_eq!(again, first, "state {i}");
        }
    }

    #[test]
    fn a_ready_agent_is_healthy_whatever_it_went_through() {
        let p = pod(
            "n",
            agent(
                true,
                json!({"running": {"startedAt": "2025-01-01T00:00:00Z"}}),
                crashed(1, "error: once upon a time"),
            ),
        );
        assert_eq!(agent_failure(&p), None);
        let s = compute_status(None, &checked(&[p, running("m")]), &t(1));
        let c = get(&s, AGENTS_HEALTHY);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", reason::NO_FAILURES)
        );
        assert_eq!(get(&s, READY).reason, reason::DAEMONSET_NOT_READY);
    }

    #[test]
    fn clean_exits_and_starting_agents_are_not_failures() {
        let exited_cleanly = pod(
            "a",
            agent(
                false,
                json!({"running": {}}),
                json!({"terminated": {"exitCode": 0, "reason": "Completed"}}),
            ),
        );
        let creating = pulling("b", "ContainerCreating", "");
        let no_status: Pod = serde_json::from_value(json!({
            "metadata": {"name": "disks-agent-x"},
            "spec": {"containers": [{"name": "agent"}]},
            "status": {"phase": "Pending"},
        }))
        .unwrap();
        for p in [exited_cleanly, creating, no_status] {
            assert_eq!(agent_failure(&p), None, "{p:?}");
        }
    }

    #[test]
    fn no_pods_is_no_failure() {
        let s = compute_status(None, &checked(&[]), &t(1));
        let c = get(&s, AGENTS_HEALTHY);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", reason::NO_FAILURES)
        );
        assert_eq!(c.message, "no agent has failed; 1/3 ready");
        assert_eq!(get(&s, READY).reason, reason::DAEMONSET_NOT_READY);
    }

    #[test]
    fn image_pull_errors_have_their_own_reason() {
        for why in ["ErrImagePull", "ImagePullBackOff"] {
            let p = pulling(
                "node-a",
                why,
                "rpc error: code = NotFound desc = failed to pull and unpack image \"ghcr.io/bio-exporter/node-agent:1.0\": not found",
            );
            let s = compute_status(None, &checked(&[p]), &t(1));
            let c = get(&s, AGENTS_HEALTHY);
            assert_eq!(
                (c.status.as_str(), c.reason.as_str()),
                ("False", reason::IMAGE_PULL_FAILED)
            );
            assert_eq!(
                c.message,
                "1 of 1 agent failing: node node-a: cannot pull image \"ghcr.io/bio-exporter/node-agent:1.0\": rpc error: code = NotFound desc = failed to pull and unpack image \"ghcr.io/bio-exporter/node-agent:1.0\": not found"
            );
            let r = get(&s, READY);
            assert_eq!(r.reason, reason::IMAGE_PULL_FAILED);
        }
        // Without a message the kubelet's reason is all there is.
        let f = agent_failure(&pulling("n", "InvalidImageName", "")).unwrap();
        assert_eq!(
            f.detail,
            "cannot pull image \"ghcr.io/bio-exporter/node-agent:1.0\" (InvalidImageName)"
        );
    }

    #[test]
    fn containers_that_cannot_be_created_are_failing() {
        let p = pulling(
            "n",
            "CreateContainerConfigError",
            "secret \"disks-agent-tls\" not found",
        );
        let f = agent_failure(&p).unwrap();
        assert_eq!(f.reason, reason::AGENT_FAILING);
        assert_eq!(
            f.detail,
            "the agent container cannot be started (CreateContainerConfigError): secret \"disks-agent-tls\" not found"
        );
    }

    #[test]
    fn oom_kills_and_signals_are_named_without_a_message() {
        let p = pod(
            "n",
            agent(
                false,
                json!({"waiting": {"reason": "CrashLoopBackOff"}}),
                json!({"terminated": {"exitCode": 137, "signal": 9, "reason": "OOMKilled"}}),
            ),
        );
        assert_eq!(
            agent_failure(&p).unwrap().detail,
            "the agent exited with code 137 (signal 9) (OOMKilled)"
        );
    }

    #[test]
    fn hostile_messages_are_cut_and_cleaned() {
        // Huge, coloured, with control characters, direction overrides and
        // multi-byte characters right where the cut falls.
        let mut log = "x".repeat(1 << 20);
        log.push('\n');
        log.push_str(&"é".repeat(3000));
        log.push_str("\n\u{1b}[31mERROR\u{1b}[0m node_agent: \u{7}bell\u{0}nul\r\u{202e}desrever\u{1b}]0;title\u{7}\n");
        log.push_str("error: the real reason");
        let f = agent_failure(&crash_looping("n", &log)).unwrap();
        let prefix = "the agent exited with code 1: ";
        assert!(f.detail.starts_with(prefix), "{}", f.detail);
        let excerpt = &f.detail[prefix.len()..];
        assert!(
            excerpt.len() <= MAX_AGENT_MESSAGE_BYTES,
            "{}",
            excerpt.len()
        );
        assert!(excerpt.starts_with("..."), "{excerpt}");
        assert!(excerpt.ends_with("| error: the real reason"), "{excerpt}");
        assert!(
            excerpt.contains("ERROR node_agent: bellnuldesrever"),
            "{excerpt}"
        );
        assert!(!excerpt.contains("title"), "{excerpt}");
        assert!(
            !excerpt.chars().any(|c| c.is_control()
                || ('\u{202a}'..='\u{202e}').contains(&c)
                || ('\u{2066}'..='\u{2069}').contains(&c)),
            "{excerpt:?}"
        );

        // One enormous line: its end survives.
        let line = format!("{}END", "ab".repeat(100_000));
        let f = agent_failure(&crash_looping("n", &line)).unwrap();
        assert!(f.detail.ends_with("abababEND"));
        assert!(f.detail.len() <= prefix.len() + MAX_AGENT_MESSAGE_BYTES);

        // Many failing nodes, each with a huge message: the condition
        // message stays small.
        let pods: Vec<Pod> = (0..500)
            .map(|i| crash_looping(&format!("node-{i:03}"), &format!("{}{i}", "z".repeat(5000))))
            .collect();
        let s = compute_status(None, &checked(&pods), &t(1));
        let c = get(&s, AGENTS_HEALTHY);
        assert!(
            c.message.len() < 3 * MAX_AGENT_MESSAGE_BYTES,
            "{}",
            c.message.len()
        );
        assert!(c
            .message
            .starts_with("500 of 500 agents failing: node node-"));
        assert!(
            c.message.ends_with("; 498 more failing otherwise"),
            "{}",
            &c.message[c.message.len() - 60..]
        );
    }

    #[test]
    fn nodes_failing_the_same_way_are_grouped_most_common_first() {
        let log = agent_log(KPROBE_ERROR);
        let mut pods: Vec<Pod> = ["e", "d", "c", "b", "a"]
            .iter()
            .map(|n| crash_looping(n, &log))
            .collect();
        pods.push(pulling("f", "ErrImagePull", "unauthorized"));
        pods.push(crash_looping("g", "error: something else"));
        pods.push(running("h"));
        let s = compute_status(None, &checked(&pods), &t(1));
        let c = get(&s, AGENTS_HEALTHY);
        assert_eq!(c.reason, reason::AGENT_FAILING);
        assert!(
            c.message.starts_with(
                "7 of 8 agents failing: nodes a, b, c and 2 more: the agent exited with code 1: "
            ),
            "{}",
            c.message
        );
        // Ties: AgentFailing before ImagePullFailed, then by node.
        assert!(
            c.message.ends_with(
                "; node g: the agent exited with code 1: error: something else; 1 more failing otherwise"
            ),
            "{}",
            c.message
        );

        // Mostly image pulls: that is the reason.
        let pods = [
            pulling("a", "ErrImagePull", "unauthorized"),
            pulling("b", "ErrImagePull", "unauthorized"),
            crash_looping("c", "error: boom"),
        ];
        let s = compute_status(None, &checked(&pods), &t(1));
        assert_eq!(get(&s, AGENTS_HEALTHY).reason, reason::IMAGE_PULL_FAILED);
        assert_eq!(get(&s, READY).reason, reason::IMAGE_PULL_FAILED);
    }

    #[test]
    fn terminating_pods_are_left_out() {
        let mut old = crash_looping("a", "error: old");
        old.metadata.deletion_timestamp = Some(t(1));
        let health = agent_health(&[old, running("b")]);
        assert_eq!(health.pods, 1);
        assert!(health.failures.is_empty());
    }

    #[test]
    fn pods_are_listed_only_while_agents_are_not_all_ready() {
        assert!(needs_agent_check(&ds(3, 3, 2, 1)));
        assert!(needs_agent_check(&ds(3, 1, 3, 1)));
        assert!(needs_agent_check(&ds(3, 3, 3, 0)));
        assert!(!needs_agent_check(&ds(3, 3, 3, 1)));
        assert!(!needs_agent_check(&ds(0, 0, 0, 1)));
        assert!(!needs_agent_check(&DaemonSetState::Missing));
        assert!(!needs_agent_check(&DaemonSetState::Observed {
            generation: Some(1),
            status: None
        }));
        assert!(!needs_agent_check(&DaemonSetState::NotRolledOut {
            reason: reason::NODE_CONFLICT,
            message: String::new(),
        }));
    }

    #[test]
    fn no_agents_to_check() {
        for state in [ds(0, 0, 0, 1), DaemonSetState::Missing] {
            let s = compute_status(None, &obs(state, ServiceMonitorState::Applied), &t(1));
            let c = get(&s, AGENTS_HEALTHY);
            assert_eq!(
                (c.status.as_str(), c.reason.as_str()),
                ("Unknown", reason::NO_AGENTS)
            );
        }
    }

    #[test]
    fn agents_condition_is_carried_over_between_lists_and_cleared_once_ready() {
        let failing = checked(&[crash_looping("n", "error: boom")]);
        let prev = compute_status(None, &failing, &t(1));
        let mut o = failing.clone();
        o.agents = AgentsState::Unchanged;
        let s = compute_status(Some(&prev), &o, &t(20));
        assert_eq!(get(&s, AGENTS_HEALTHY), get(&prev, AGENTS_HEALTHY));
        assert_eq!(get(&s, READY).reason, reason::AGENT_FAILING);

        // Unchanged with nothing before: not checked yet.
        let s = compute_status(None, &o, &t(20));
        assert_eq!(get(&s, AGENTS_HEALTHY).reason, reason::PENDING);
        assert_eq!(get(&s, AGENTS_HEALTHY).status, "Unknown");

        // Fixed: the DaemonSet is ready, nothing is listed, all healthy.
        let s = compute_status(
            Some(&prev),
            &obs(ds(3, 3, 3, 1), ServiceMonitorState::Applied),
            &t(30),
        );
        let c = get(&s, AGENTS_HEALTHY);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", reason::ALL_AGENTS_READY)
        );
        assert_eq!(c.last_transition_time, t(30));
        assert_eq!(get(&s, READY).status, "True");
    }

    #[test]
    fn refused_pod_list_is_unknown_not_an_error() {
        let mut o = obs(ds(3, 3, 1, 1), ServiceMonitorState::Applied);
        o.agents = AgentsState::ListFailed(
            "pods is forbidden: User \"system:serviceaccount:x:y\" cannot list resource \"pods\" (Forbidden)".into(),
        );
        let s = compute_status(None, &o, &t(1));
        let c = get(&s, AGENTS_HEALTHY);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("Unknown", reason::POD_LIST_FAILED)
        );
        assert!(c
            .message
            .starts_with("cannot list the agent pods: pods is forbidden"));
        assert_eq!(get(&s, READY).reason, reason::DAEMONSET_NOT_READY);
    }
}
