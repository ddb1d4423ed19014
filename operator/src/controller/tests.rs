//! `reconcile` against a mocked API server: a real kube `Client` whose
//! transport is tower-test's mock service, answered in-process by
//! [`FakeApi`], which records every request. The tests assert on that record
//! (which writes, in which order, by which field manager) and on the bodies
//! written. What only a real API server can judge (schemas, CEL, SSA
//! ownership, garbage collection, RBAC, failover) stays in
//! `operator/tests/e2e.sh`.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::channel::mpsc;
use http::{Request, Response};
use k8s_openapi::{
    api::core::v1::Node,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    jiff::Timestamp,
};
use kube::{
    client::Body,
    runtime::{controller::Action, events::Recorder, reflector, watcher},
    Client,
};
use serde_json::{json, Value};

use super::{reconcile, Context};
use crate::{
    conditions,
    crd::{BioMonitor, BioMonitorSpec, DeviceFilter},
    leader::{Fence, LeaderElector, LeaseConfig},
    metrics::Metrics,
    names,
    settings::{Settings, WatchScope},
};

const NS: &str = "monitoring";

/// One request as the API server received it.
#[derive(Clone, Debug)]
struct Call {
    method: String,
    path: String,
    /// `apply`, `merge` or `json` for a PATCH, from its content type.
    patch: Option<&'static str>,
    field_manager: Option<String>,
    force: bool,
    body: Value,
}

impl Call {
    /// `METHOD[(patch type)] path [by manager[, force]]`: what the write-order
    /// assertions compare.
    fn line(&self) -> String {
        let mut s = self.method.clone();
        if let Some(p) = self.patch {
            s += &format!("({p})");
        }
        s += " ";
        s += &self.path;
        if let Some(m) = &self.field_manager {
            s += &format!(" by {m}");
        }
        if self.force {
            s += ", force";
        }
        s
    }

    fn is_write(&self) -> bool {
        !matches!(self.method.as_str(), "GET" | "HEAD")
    }
}

/// A test's answer for a request, instead of the default one.
type Override = Box<dyn Fn(&Call) -> Option<(u16, Value)> + Send + Sync>;

/// Answers the way the API server would for the objects these tests need:
/// applies, replaces and creates echo the object written; the chart's two
/// agent ClusterRoleBindings exist with the right roleRef and no subject;
/// every other GET and every DELETE finds nothing (404); BioMonitor patches
/// return the BioMonitor.
struct FakeApi {
    calls: Arc<Mutex<Vec<Call>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeApi {
    fn start(bm: &BioMonitor, settings: &Settings, overrides: Vec<Override>) -> (Self, Client) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let log = calls.clone();
        let bm_json = serde_json::to_value(bm).unwrap();
        let roles = [
            settings.agent_cluster_role.clone(),
            settings.agent_auth_cluster_role.clone(),
        ];
        let task = tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let call = call_of(request).await;
                let (code, body) = overrides
                    .iter()
                    .find_map(|o| o(&call))
                    .unwrap_or_else(|| default_answer(&call, &bm_json, &roles));
                log.lock().unwrap().push(call);
                send.send_response(
                    Response::builder()
                        .status(code)
                        .header("content-type", "application/json")
                        .body(Body::from(serde_json::to_vec(&body).unwrap()))
                        .unwrap(),
                );
            }
        });
        (Self { calls, task }, Client::new(service, NS))
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    fn lines(&self) -> Vec<String> {
        self.calls().iter().map(Call::line).collect()
    }

    /// The merge patch of the BioMonitor's status (the last one written).
    fn written_status(&self) -> crate::crd::BioMonitorStatus {
        let call = self
            .calls()
            .into_iter()
            .rev()
            .find(|c| c.path.ends_with("/status") && c.method == "PATCH")
            .expect("no status write");
        serde_json::from_value(call.body["status"].clone()).unwrap()
    }

    /// Reasons of the events created, in order.
    fn event_reasons(&self) -> Vec<String> {
        self.calls()
            .iter()
            .filter(|c| c.method == "POST" && c.path.ends_with("/events"))
            .map(|c| c.body["reason"].as_str().unwrap_or_default().to_string())
            .collect()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn call_of(request: Request<Body>) -> Call {
    let (parts, body) = request.into_parts();
    let query: BTreeMap<String, String> = parts
        .uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let content_type = parts
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let patch = match content_type {
        "application/apply-patch+yaml" => Some("apply"),
        "application/merge-patch+json" => Some("merge"),
        "application/json-patch+json" => Some("json"),
        _ => None,
    };
    let bytes = body.collect_bytes().await.unwrap();
    Call {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        patch: patch.filter(|_| parts.method == http::Method::PATCH),
        field_manager: query.get("fieldManager").cloned(),
        force: query.get("force").is_some_and(|f| f == "true"),
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

fn not_found(call: &Call) -> (u16, Value) {
    (
        404,
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("{} not found", call.path), "reason": "NotFound", "code": 404
        }),
    )
}

fn default_answer(call: &Call, bm: &Value, roles: &[String; 2]) -> (u16, Value) {
    const CRBS: &str = "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/";
    match call.method.as_str() {
        "GET" => match call.path.strip_prefix(CRBS) {
            Some(name) => match roles.iter().find(|r| names::agent_binding_name(r) == name) {
                Some(role) => (
                    200,
                    json!({
                        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                        "metadata": {"name": name, "resourceVersion": "1"},
                        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                    }),
                ),
                None => not_found(call),
            },
            _ if call.path.ends_with("/pods") => (
                200,
                json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []}),
            ),
            _ => not_found(call),
        },
        "DELETE" => not_found(call),
        "PATCH" if call.path.contains("/biomonitors/") => (200, bm.clone()),
        _ => (200, call.body.clone()),
    }
}

/// A BioMonitor as the API server hands it to the controller after its
/// first reconcile: finalizer set.
fn monitor(name: &str, spec: BioMonitorSpec, created: i64) -> BioMonitor {
    BioMonitor {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS.into()),
            uid: Some(format!("uid-{name}")),
            generation: Some(1),
            resource_version: Some("7".into()),
            creation_timestamp: Some(Time(Timestamp::from_second(created).unwrap())),
            finalizers: Some(vec![names::FINALIZER.into()]),
            ..ObjectMeta::default()
        },
        spec,
        status: None,
    }
}

fn linux_node(name: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/os".to_string(),
                "linux".to_string(),
            )])),
            ..ObjectMeta::default()
        },
        ..Node::default()
    }
}

/// The fence of a replica that does not hold the lease: what a reconcile
/// still running after its renew deadline sees.
fn lost_lease_fence(client: Client) -> Fence {
    let cfg = LeaseConfig {
        name: "bio-operator".into(),
        namespace: NS.into(),
        identity: "me".into(),
        lease_duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        retry_period: Duration::from_secs(2),
    };
    LeaderElector::new(client, cfg).fence()
}

fn context(
    client: Client,
    fence: Fence,
    settings: Settings,
    monitors: &[&BioMonitor],
    nodes: &[Node],
) -> Arc<Context> {
    let (monitor_store, mut monitor_writer) = reflector::store();
    for m in monitors {
        monitor_writer.apply_watcher_event(&watcher::Event::Apply((*m).clone()));
    }
    let (node_store, mut node_writer) = reflector::store();
    for n in nodes {
        node_writer.apply_watcher_event(&watcher::Event::Apply(n.clone()));
    }
    let (reconcile_all, _) = mpsc::unbounded();
    Arc::new(Context {
        recorder: Recorder::new(client.clone(), "bio-operator".into()),
        client,
        settings,
        scope: WatchScope::All,
        metrics: Metrics::new(&mut Default::default()),
        fence,
        monitors: monitor_store,
        nodes: node_store,
        nodes_version: Default::default(),
        verdicts: Default::default(),
        reconcile_all,
        failures: Default::default(),
        agent_checks: Default::default(),
    })
}

/// Runs one reconcile of `bm` against a fresh [`FakeApi`]; the other
/// monitors and the nodes are what the controller's caches hold.
async fn reconcile_once(
    bm: &BioMonitor,
    others: &[&BioMonitor],
    nodes: &[Node],
    overrides: Vec<Override>,
    lost_lease: bool,
) -> (crate::Result<Action>, FakeApi) {
    let settings = Settings::default();
    let (api, client) = FakeApi::start(bm, &settings, overrides);
    let fence = if lost_lease {
        lost_lease_fence(client.clone())
    } else {
        Fence::open()
    };
    let mut cached: Vec<&BioMonitor> = others.to_vec();
    cached.push(bm);
    let ctx = context(client, fence, settings, &cached, nodes);
    // A guard against a request nobody answers, not a timing assertion.
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        reconcile(Arc::new(bm.clone()), ctx),
    )
    .await
    .expect("reconcile hung");
    (result, api)
}

fn path(kind_path: &str, name: &str) -> String {
    format!("{kind_path}/{name}")
}

const SA: &str = "/api/v1/namespaces/monitoring/serviceaccounts";
const SVC: &str = "/api/v1/namespaces/monitoring/services";
const SECRETS: &str = "/api/v1/namespaces/monitoring/secrets";
const DS: &str = "/apis/apps/v1/namespaces/monitoring/daemonsets";
const SM: &str = "/apis/monitoring.coreos.com/v1/namespaces/monitoring/servicemonitors";
const CERTS: &str = "/apis/cert-manager.io/v1/namespaces/monitoring/certificates";
const CRBS: &str = "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings";
const BMS: &str = "/apis/bioexporter.io/v1alpha1/namespaces/monitoring/biomonitors";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/monitoring/events";

fn apply_line(kind_path: &str, name: &str) -> String {
    format!(
        "PATCH(apply) {} by {}, force",
        path(kind_path, name),
        names::FIELD_MANAGER
    )
}

/// The requests of a first reconcile of a valid BioMonitor `disks` without
/// TLS, up to (not including) its status write, with `daemonset` standing
/// for what happens to the DaemonSet.
fn first_reconcile_writes(daemonset: String) -> Vec<String> {
    let settings = Settings::default();
    let pv_crb = path(
        CRBS,
        &names::agent_binding_name(&settings.agent_cluster_role),
    );
    let auth_crb = path(
        CRBS,
        &names::agent_binding_name(&settings.agent_auth_cluster_role),
    );
    vec![
        apply_line(SA, "disks-agent"),
        // PV labels are on by default: the agent joins the PV binding
        // (read, then a replace guarded by the resourceVersion read)...
        format!("GET {pv_crb}"),
        format!("PUT {pv_crb} by {}", names::FIELD_MANAGER),
        // ...and auth is off: it is not in the auth binding, nothing to write.
        format!("GET {auth_crb}"),
        apply_line(SVC, "disks-agent"),
        apply_line(SM, "disks-agent"),
        daemonset,
        // TLS is off: whatever an earlier TLS setup left goes, Certificate first.
        format!("DELETE {}", path(CERTS, "disks-agent")),
        format!("DELETE {}", path(SECRETS, "disks-agent-ca")),
        format!("DELETE {}", path(SECRETS, "disks-agent-tls")),
        format!("DELETE {}", path(SECRETS, "disks-agent-cert-manager-tls")),
    ]
}

fn status_line() -> String {
    format!("PATCH(merge) {}/disks/status", BMS)
}

#[tokio::test]
async fn a_new_biomonitor_gets_the_finalizer_and_nothing_else() {
    let mut bm = monitor("disks", BioMonitorSpec::default(), 100);
    bm.metadata.finalizers = None;
    let (result, api) = reconcile_once(&bm, &[], &[], vec![], false).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert_eq!(api.lines(), [format!("PATCH(json) {BMS}/disks")]);
    // Guarded by a test that no finalizer is there yet, so a concurrent
    // writer's list is never overwritten.
    assert_eq!(
        api.calls()[0].body,
        json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": [names::FINALIZER]},
        ])
    );
}

#[tokio::test]
async fn first_reconcile_writes_children_in_order_then_status() {
    let bm = monitor("disks", BioMonitorSpec::default(), 100);
    let (result, api) = reconcile_once(&bm, &[], &[linux_node("n1")], vec![], false).await;
    assert_eq!(
        result.unwrap(),
        Action::requeue(Settings::default().resync_interval)
    );
    let mut expected = first_reconcile_writes(apply_line(DS, "disks-agent"));
    expected.push(status_line());
    assert_eq!(api.lines(), expected);

    let calls = api.calls();
    let put = calls.iter().find(|c| c.method == "PUT").unwrap();
    assert_eq!(put.body["metadata"]["resourceVersion"], "1");
    assert_eq!(
        put.body["subjects"],
        json!([{"kind": "ServiceAccount", "name": "disks-agent", "namespace": NS}])
    );
    let ds = calls
        .iter()
        .find(|c| c.path == path(DS, "disks-agent"))
        .unwrap();
    assert_eq!(
        ds.body["metadata"]["ownerReferences"][0]["uid"],
        "uid-disks"
    );
    let status = api.written_status();
    assert_eq!(status.observed_generation, Some(1));
    let sm = status.condition(conditions::SERVICE_MONITOR_READY).unwrap();
    assert_eq!(
        (sm.status.as_str(), sm.reason.as_str()),
        ("True", conditions::reason::APPLIED)
    );
    assert!(api.event_reasons().is_empty(), "{:?}", api.event_reasons());
}

#[tokio::test]
async fn missing_servicemonitor_crd_is_a_condition_and_the_daemonset_still_applies() {
    // An apply to an unknown resource type: 404 from the API server.
    fn no_sm_crd() -> Override {
        Box::new(|c| (c.method == "PATCH" && c.path.starts_with(SM)).then(|| not_found(c)))
    }
    let mut bm = monitor("disks", BioMonitorSpec::default(), 100);
    let (result, api) =
        reconcile_once(&bm, &[], &[linux_node("n1")], vec![no_sm_crd()], false).await;
    // Nothing watches for the CRD to appear: the retry period, not the resync.
    assert_eq!(
        result.unwrap(),
        Action::requeue(Settings::default().crd_missing_retry)
    );
    let mut expected = first_reconcile_writes(apply_line(DS, "disks-agent"));
    expected.push(format!("POST {EVENTS}"));
    expected.push(status_line());
    assert_eq!(api.lines(), expected);
    let status = api.written_status();
    let sm = status.condition(conditions::SERVICE_MONITOR_READY).unwrap();
    assert_eq!(
        (sm.status.as_str(), sm.reason.as_str()),
        ("False", conditions::reason::CRD_NOT_INSTALLED)
    );
    assert_eq!(api.event_reasons(), [conditions::reason::CRD_NOT_INSTALLED]);

    // The retry a minute later, CRD still missing: the DaemonSet is applied
    // again, but neither the status nor a second event is written.
    bm.status = Some(status);
    let (result, api) =
        reconcile_once(&bm, &[], &[linux_node("n1")], vec![no_sm_crd()], false).await;
    assert_eq!(
        result.unwrap(),
        Action::requeue(Settings::default().crd_missing_retry)
    );
    let lines = api.lines();
    assert!(lines.contains(&apply_line(DS, "disks-agent")), "{lines:?}");
    assert!(api.event_reasons().is_empty(), "{lines:?}");
    assert!(!lines.contains(&status_line()), "{lines:?}");
}

#[tokio::test]
async fn invalid_spec_writes_only_status() {
    let spec = BioMonitorSpec {
        devices: DeviceFilter {
            include: vec!["nvme(\\d+".into()],
            ..DeviceFilter::default()
        },
        ..BioMonitorSpec::default()
    };
    let bm = monitor("disks", spec, 100);
    let (result, api) = reconcile_once(&bm, &[], &[linux_node("n1")], vec![], false).await;
    result.unwrap();
    // The running DaemonSet (none here) is only looked at, never replaced.
    assert_eq!(
        api.lines(),
        [
            format!("GET {}", path(DS, "disks-agent")),
            format!("POST {EVENTS}"),
            status_line(),
        ]
    );
    let status = api.written_status();
    let ready = status.condition(conditions::READY).unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", conditions::reason::INVALID_SPEC)
    );
    assert!(
        ready.message.contains("devices.include[0]"),
        "{}",
        ready.message
    );
    assert_eq!(api.event_reasons(), [conditions::reason::INVALID_SPEC]);
}

#[tokio::test]
async fn node_conflict_deletes_this_monitors_daemonset() {
    // An earlier BioMonitor selecting the same (every Linux) node wins it.
    let earlier = monitor("first", BioMonitorSpec::default(), 50);
    let bm = monitor("disks", BioMonitorSpec::default(), 100);
    let (result, api) = reconcile_once(&bm, &[&earlier], &[linux_node("n1")], vec![], false).await;
    result.unwrap();
    let mut expected = first_reconcile_writes(format!("DELETE {}", path(DS, "disks-agent")));
    expected.push(format!("POST {EVENTS}"));
    expected.push(status_line());
    assert_eq!(api.lines(), expected);
    assert!(
        !api.lines()
            .iter()
            .any(|l| l.starts_with("PATCH(apply) /apis/apps/v1")),
        "a blocked monitor must not apply its DaemonSet"
    );
    let status = api.written_status();
    let ready = status.condition(conditions::READY).unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", conditions::reason::NODE_CONFLICT)
    );
    assert!(
        ready.message.contains("monitoring/first") && ready.message.contains("n1"),
        "{}",
        ready.message
    );
    assert_eq!(api.event_reasons(), [conditions::reason::NODE_CONFLICT]);
}

/// Every path a reconcile can take, with the fence closed: reads are fine,
/// writes (finalizer, children, events, status) are not.
#[tokio::test]
async fn a_lost_lease_writes_nothing() {
    let valid = monitor("disks", BioMonitorSpec::default(), 100);
    let mut new = valid.clone();
    new.metadata.finalizers = None;
    let mut invalid = valid.clone();
    invalid.spec.devices.include = vec!["nvme(\\d+".into()];
    let mut deleted = valid.clone();
    deleted.metadata.deletion_timestamp = Some(Time(Timestamp::from_second(200).unwrap()));
    for (what, bm) in [
        ("valid spec", &valid),
        ("new BioMonitor (finalizer to add)", &new),
        ("invalid spec (status and event only)", &invalid),
        ("deleted BioMonitor (finalizer to remove)", &deleted),
    ] {
        let (result, api) = reconcile_once(bm, &[], &[linux_node("n1")], vec![], true).await;
        let writes: Vec<String> = api
            .calls()
            .iter()
            .filter(|c| c.is_write())
            .map(Call::line)
            .collect();
        assert!(writes.is_empty(), "{what}: wrote {writes:?}");
        // An error, so the controller's error policy (not a requeue timer)
        // decides, and the elector sees the lost leadership.
        let err = result.expect_err(what);
        assert_eq!(err.metric_label(), "leadership", "{what}: {err}");
    }
}
