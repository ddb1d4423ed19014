//! The reconcile loop: BioMonitor -> children (server-side apply), status,
//! events. Decisions live in the pure modules; this file does the I/O.

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use futures::{channel::mpsc, StreamExt};
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Node, Pod, Secret, Service, ServiceAccount},
        rbac::v1::{ClusterRoleBinding, Subject},
    },
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{
    api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams},
    runtime::{
        controller::Action,
        events::{Event as KubeEvent, EventType, Recorder, Reporter},
        finalizer::{finalizer, Event as FinalizerEvent},
        reflector::{self, ObjectRef, Store},
        watcher, Controller, WatchStreamExt,
    },
    Client, Resource, ResourceExt,
};
use serde::{de::DeserializeOwned, Serialize};
use serde_json::json;

use crate::{
    conditions::{
        self, compute_status, AgentHealth, AgentsState, DaemonSetState, Observation,
        ServiceMonitorState, TlsState,
    },
    conflict::{self, Verdict},
    crd::{BioMonitor, BioMonitorStatus},
    error::{is_not_found, is_stale_write},
    leader::Fence,
    metrics::Metrics,
    names,
    resources::{self, certificate, rbac, servicemonitor, tls, Certificate, ServiceMonitor},
    settings::{Settings, WatchScope, NAMESPACE_NOT_ALLOWED},
    validate::{self, validate_spec},
    Error, Result,
};

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    /// The namespaces the operator has rights in; BioMonitors elsewhere are refused.
    pub scope: WatchScope,
    pub recorder: Recorder,
    pub metrics: Metrics,
    /// Checked right before every write; closed once leadership may be lost.
    pub fence: Fence,
    /// All BioMonitors (the controller's own cache), for the conflict rule.
    pub monitors: Store<BioMonitor>,
    /// All nodes, for the conflict rule.
    pub nodes: Store<Node>,
    /// Bumped (after the node cache is updated) whenever a node's labels or
    /// taints change, or a node comes or goes: heartbeats do not count.
    nodes_version: Arc<AtomicU64>,
    /// The conflict verdicts of every BioMonitor, for the inputs they were
    /// computed from; most reconciles (status changes of the DaemonSet) reuse
    /// them instead of matching every monitor against every node again.
    verdicts: Mutex<Option<VerdictCache>>,
    /// Re-reconciles every BioMonitor: one monitor's spec or deletion can
    /// change another's conflict verdict.
    reconcile_all: mpsc::UnboundedSender<()>,
    /// Consecutive failures per object, for the error backoff.
    failures: Mutex<HashMap<ObjectRef<BioMonitor>, u32>>,
    /// When each BioMonitor's agent pods were last listed: at most once per
    /// `agent_check_interval`, and only while its DaemonSet is not ready.
    agent_checks: Mutex<HashMap<ObjectRef<BioMonitor>, Instant>>,
}

/// What the verdicts depend on: node placement data (via its version) and,
/// per monitor, identity, precedence and spec (via the generation).
#[derive(Clone, Debug, PartialEq, Eq)]
struct VerdictInputs {
    nodes_version: u64,
    monitors: Vec<(String, Option<String>, Option<i64>, bool)>,
}

struct VerdictCache {
    inputs: VerdictInputs,
    verdicts: HashMap<String, Verdict>,
}

impl Context {
    /// The verdict for `bm` (fresher than its cached copy), and whether the
    /// verdict of any *other* monitor changed since the last computation, in
    /// which case they all need a reconcile.
    fn verdict(&self, bm: &BioMonitor) -> (Verdict, bool) {
        let my_key = conflict::key(bm);
        let cached = self.monitors.state();
        let mut monitors: Vec<&BioMonitor> = cached
            .iter()
            .map(AsRef::as_ref)
            .filter(|m| conflict::key(m) != my_key)
            // A refused monitor runs no agents, so it blocks no node.
            .filter(|m| self.scope.allows(&m.namespace().unwrap_or_default()))
            .collect();
        monitors.push(bm);
        monitors.sort_by_cached_key(|m| conflict::key(m));
        let inputs = VerdictInputs {
            nodes_version: self.nodes_version.load(Ordering::SeqCst),
            monitors: monitors
                .iter()
                .map(|m| {
                    (
                        conflict::key(m),
                        m.uid(),
                        m.metadata.generation,
                        m.metadata.deletion_timestamp.is_some(),
                    )
                })
                .collect(),
        };
        let mut cache = lock(&self.verdicts);
        if let Some(c) = cache.as_ref().filter(|c| c.inputs == inputs) {
            let verdict = c.verdicts.get(&my_key).cloned();
            return (verdict.unwrap_or(Verdict::Active), false);
        }
        let nodes = self.nodes.state();
        let nodes: Vec<&Node> = nodes.iter().map(AsRef::as_ref).collect();
        let verdicts = conflict::verdicts(&monitors, &nodes);
        let others_changed = cache.as_ref().is_some_and(|old| {
            old.verdicts
                .iter()
                .any(|(k, v)| *k != my_key && verdicts.get(k).is_some_and(|new| new != v))
        });
        let verdict = verdicts.get(&my_key).cloned().unwrap_or(Verdict::Active);
        *cache = Some(VerdictCache { inputs, verdicts });
        (verdict, others_changed)
    }
}

/// Hash of what node placement depends on: labels and taints.
fn placement_hash(node: &Node) -> u64 {
    let mut h = DefaultHasher::new();
    node.labels().hash(&mut h);
    if let Some(taints) = node.spec.as_ref().and_then(|s| s.taints.as_ref()) {
        for t in taints {
            (&t.key, &t.value, &t.effect).hash(&mut h);
        }
    }
    h.finish()
}

/// Runs the controller until the watch streams end. Meant to be run only
/// while holding leadership: dropping the returned future stops all writes.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Metrics,
    reporter: Reporter,
    fence: Fence,
) -> Result<()> {
    let scope = WatchScope::from_env().map_err(|e| Error::Config(e.to_string()))?;
    tracing::info!(?scope, "namespaces BioMonitors may use");
    let monitors = Api::<BioMonitor>::all(client.clone());
    // Fail with a clear message instead of a watch retrying forever.
    monitors
        .list(&ListParams::default().limit(1))
        .await
        .map_err(|e| {
            Error::Config(format!(
                "cannot list BioMonitors (is the CRD installed and RBAC granted?): {e}"
            ))
        })?;

    let (nodes, node_writer) = reflector::store::<Node>();
    let nodes_version = Arc::new(AtomicU64::new(0));
    let mut placements: HashMap<String, u64> = HashMap::new();
    let version = nodes_version.clone();
    let node_watch = reflector::reflector(
        node_writer,
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            // Images and conditions dominate a Node's size and are irrelevant
            // to placement; the cache keeps labels and taints only.
            .modify(|node| {
                node.status = None;
                node.managed_fields_mut().clear();
                node.annotations_mut().clear();
            }),
    )
    // The reflector has updated the store by the time an event gets here,
    // so a reader never pairs a new version with an old store.
    .for_each(move |event| {
        match &event {
            Ok(watcher::Event::Apply(node) | watcher::Event::InitApply(node)) => {
                let hash = placement_hash(node);
                if placements.insert(node.name_any(), hash) != Some(hash) {
                    version.fetch_add(1, Ordering::SeqCst);
                }
            }
            Ok(watcher::Event::Delete(node)) => {
                placements.remove(&node.name_any());
                version.fetch_add(1, Ordering::SeqCst);
            }
            Ok(watcher::Event::Init) => {
                // A relist: forget nodes that may have gone meanwhile.
                placements.clear();
                version.fetch_add(1, Ordering::SeqCst);
            }
            Ok(watcher::Event::InitDone) => {
                version.fetch_add(1, Ordering::SeqCst);
            }
            Err(err) => tracing::warn!(error = %err, "node watch failed; retrying"),
        }
        futures::future::ready(())
    });

    let owned = watcher::Config::default().labels(&format!(
        "{}={}",
        names::LABEL_MANAGED_BY,
        names::FIELD_MANAGER
    ));
    let (reconcile_all, reconcile_all_rx) = mpsc::unbounded();
    let mut controller = Controller::new(monitors, watcher::Config::default());
    // BioMonitors are watched everywhere (to refuse the ones outside the
    // scope in their status); children only where the operator may read them.
    let child_namespaces: Vec<Option<&str>> = match &scope {
        WatchScope::All => vec![None],
        WatchScope::Namespaces(names) => names.iter().map(|n| Some(n.as_str())).collect(),
    };
    for ns in child_namespaces {
        controller = controller
            .owns(scoped_api::<DaemonSet>(&client, ns), owned.clone())
            .owns(scoped_api::<Service>(&client, ns), owned.clone())
            .owns(scoped_api::<ServiceAccount>(&client, ns), owned.clone());
    }
    let controller = controller.reconcile_all_on(reconcile_all_rx);

    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client,
        settings,
        scope,
        metrics,
        fence,
        monitors: controller.store(),
        nodes: nodes.clone(),
        nodes_version,
        verdicts: Mutex::default(),
        reconcile_all,
        failures: Mutex::default(),
        agent_checks: Mutex::default(),
    });

    let main = async move {
        // Without the full node list every monitor would look conflict-free.
        nodes
            .wait_until_ready()
            .await
            .map_err(|_| Error::Config("node cache never became ready".into()))?;
        tracing::info!("node cache ready; starting BioMonitor controller");
        controller
            .run(reconcile, error_policy, ctx)
            .for_each(|res| async move {
                match res {
                    Ok((obj, _)) => tracing::debug!(object = %obj, "reconciled"),
                    Err(err) => tracing::debug!(error = %err, "controller event"),
                }
            })
            .await;
        Ok(())
    };

    tokio::select! {
        res = main => res,
        _ = node_watch => Err(Error::Config("node watch ended".into())),
    }
}

fn scoped_api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

pub async fn reconcile(bm: Arc<BioMonitor>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.reconciliations.inc();
    let started = Instant::now();
    let obj_ref = ObjectRef::from_obj(bm.as_ref());
    let namespace = bm
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<BioMonitor> = Api::namespaced(ctx.client.clone(), &namespace);

    // Refused before the finalizer is added: nothing is created for it, so
    // nothing needs cleaning up. (A deletion still runs the cleanup, in case
    // the namespace was allowed when the finalizer was added.)
    if !ctx.scope.allows(&namespace) && bm.metadata.deletion_timestamp.is_none() {
        let result = refuse(&bm, &ctx).await;
        ctx.metrics
            .reconcile_duration
            .observe(started.elapsed().as_secs_f64());
        return result;
    }
    let result = finalizer(&api, names::FINALIZER, bm, |event| async {
        match event {
            FinalizerEvent::Apply(bm) => apply(bm, &ctx).await,
            FinalizerEvent::Cleanup(bm) => cleanup(bm, &ctx).await,
        }
    })
    .await;
    let result = match result {
        // A queued cleanup of a copy the cache still held: the object (and so
        // the finalizer) is already gone.
        Err(kube::runtime::finalizer::Error::RemoveFinalizer(e)) if is_not_found(&e) => {
            Ok(Action::await_change())
        }
        // A reconcile of a cached copy older than the object (a bulk
        // re-reconcile right after this monitor's first one): the finalizer
        // is already there and the guarded patch fails. The watch event for
        // the newer copy triggers the next reconcile; retry soon regardless.
        Err(kube::runtime::finalizer::Error::AddFinalizer(e)) if is_stale_write(&e) => {
            tracing::debug!(biomonitor = %obj_ref, "stale cached copy; finalizer already changed");
            Ok(Action::requeue(Duration::from_secs(1)))
        }
        other => other.map_err(|e| Error::Finalizer(Box::new(e))),
    };

    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    if result.is_ok() {
        lock(&ctx.failures).remove(&obj_ref);
    }
    result
}

/// Exponential backoff per object: 5s, 10s, 20s, ... capped at 5 minutes, so a
/// persistent error (RBAC, admission webhook) never becomes a hot loop.
pub fn backoff(consecutive_failures: u32) -> Duration {
    let exp = consecutive_failures.saturating_sub(1).min(6);
    Duration::from_secs(5 * 2u64.pow(exp)).min(Duration::from_secs(300))
}

pub fn error_policy(bm: Arc<BioMonitor>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(err.metric_label());
    let failures = {
        let mut map = lock(&ctx.failures);
        let n = map.entry(ObjectRef::from_obj(bm.as_ref())).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = backoff(failures);
    tracing::warn!(
        biomonitor = %ObjectRef::from_obj(bm.as_ref()),
        error = %err,
        failures,
        retry_in = ?delay,
        "reconcile failed"
    );
    Action::requeue(delay)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these maps cannot leave them inconsistent.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn apply_params() -> PatchParams {
    PatchParams::apply(names::FIELD_MANAGER).force()
}

async fn apply_namespaced<K>(ctx: &Context, ns: &str, obj: &K) -> Result<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    ctx.fence.check()?;
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    let name = obj
        .meta()
        .name
        .clone()
        .ok_or(Error::MissingField("metadata.name"))?;
    Ok(api
        .patch(&name, &apply_params(), &Patch::Apply(obj))
        .await?)
}

/// Deletes `name`; already gone is fine.
async fn delete_ignoring_missing<K>(fence: &Fence, api: &Api<K>, name: &str) -> Result<()>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    fence.check()?;
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn apply(bm: Arc<BioMonitor>, ctx: &Context) -> Result<Action> {
    let client = &ctx.client;
    let namespace = bm
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let generation = bm.metadata.generation;

    let mut invalid_spec = validate_spec(&bm.spec).err().map(|e| e.to_string());
    let mut apply_rejected = None;
    let (verdict, others_changed) = ctx.verdict(&bm);
    if others_changed {
        // This monitor's spec (or arrival) changed another one's verdict.
        // Unbounded and only closed when the controller stops: ignore errors.
        let _ = ctx.reconcile_all.unbounded_send(());
    }
    let node_conflict = match &verdict {
        Verdict::Blocked(conflicts) => Some(conflict::describe(conflicts)),
        Verdict::Active => None,
    };
    let ds_api: Api<DaemonSet> = Api::namespaced(client.clone(), &namespace);
    let ds_name = names::child_name(&bm);
    let observe_daemonset = || async {
        Ok::<_, Error>(match ds_api.get_opt(&ds_name).await? {
            Some(ds) => DaemonSetState::Observed {
                generation: ds.metadata.generation,
                status: ds.status,
            },
            None => DaemonSetState::Missing,
        })
    };

    let mut tls = TlsOutcome {
        state: TlsState::Unchanged,
        recheck: None,
        in_place: false,
    };
    let (daemonset, service_monitor) = if invalid_spec.is_some() {
        // Leave the last valid configuration running rather than tearing
        // down monitoring over a typo; report what is there.
        (observe_daemonset().await?, ServiceMonitorState::Unchanged)
    } else {
        let children = resources::desired(&bm, &ctx.settings)?;
        apply_namespaced(ctx, &namespace, &children.service_account).await?;
        for binding in &children.agent_bindings {
            sync_agent_subject(ctx, binding, &children.agent_subject).await?;
        }
        apply_namespaced(ctx, &namespace, &children.service).await?;
        tls = reconcile_tls(&bm, ctx, children.certificate.as_ref()).await?;
        // Without the certificate the DaemonSet would not start and the
        // ServiceMonitor would point at a missing CA: keep both as they are
        // until it is there.
        let sm = if tls.in_place {
            apply_service_monitor(&bm, ctx, children.service_monitor.as_ref()).await?
        } else {
            ServiceMonitorState::Unchanged
        };
        let ds = if let Some(message) = &node_conflict {
            delete_ignoring_missing(&ctx.fence, &ds_api, &ds_name).await?;
            DaemonSetState::NotRolledOut {
                reason: conditions::reason::NODE_CONFLICT,
                message: message.clone(),
            }
        } else if tls.in_place {
            match apply_namespaced(ctx, &namespace, &children.daemonset).await {
                Ok(ds) => DaemonSetState::Observed {
                    generation: ds.metadata.generation,
                    status: ds.status,
                },
                Err(Error::Kube(kube::Error::Api(status))) => {
                    // The API server's verdict on the spec will not change on
                    // retry: report it on the status (by BioMonitor field) and
                    // keep the running DaemonSet, as for an invalid spec.
                    let Some(rejection) = validate::rejection(&status) else {
                        return Err(Error::Kube(kube::Error::Api(status)));
                    };
                    tracing::warn!(
                        biomonitor = %ObjectRef::from_obj(bm.as_ref()),
                        verdict = %rejection.message,
                        "the API server rejected the agent DaemonSet"
                    );
                    if rejection.spec_fields_only {
                        invalid_spec = Some(rejection.message);
                    } else {
                        apply_rejected = Some(rejection.message);
                    }
                    observe_daemonset().await?
                }
                Err(e) => return Err(e),
            }
        } else {
            observe_daemonset().await?
        };
        if tls.in_place && !tls_settled(&bm) {
            // Only now that nothing points at them any more.
            remove_unused_tls_objects(&bm, ctx).await?;
        }
        (ds, sm)
    };

    let agents = check_agents(&bm, ctx, &daemonset).await?;
    let agents_pending = conditions::needs_agent_check(&daemonset);

    let crd_missing = service_monitor == ServiceMonitorState::CrdNotInstalled;
    let tls_waiting = matches!(
        tls.state,
        TlsState::CertManagerNotInstalled | TlsState::NotReady(_) | TlsState::Failed(_)
    );
    let observation = Observation {
        generation,
        invalid_spec,
        apply_rejected,
        node_conflict,
        daemonset,
        service_monitor,
        tls: tls.state,
        agents,
    };
    let now = Time(
        Timestamp::from_second(Timestamp::now().as_second()).unwrap_or_else(|_| Timestamp::now()),
    );
    let status = compute_status(bm.status.as_ref(), &observation, &now);
    publish_transition_events(&bm, ctx, bm.status.as_ref(), &status).await;
    if bm.status.as_ref() != Some(&status) {
        ctx.fence.check()?;
        let api: Api<BioMonitor> = Api::namespaced(client.clone(), &namespace);
        api.patch_status(
            &bm.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await?;
    }

    // Nothing watches for missing CRDs to appear or for cert-manager to
    // issue: poll for them.
    let mut requeue = if crd_missing || tls_waiting {
        ctx.settings.crd_missing_retry
    } else {
        ctx.settings.resync_interval
    };
    if let Some(recheck) = tls.recheck {
        requeue = requeue.min(recheck);
    }
    if agents_pending {
        // A crash-looping agent changes nothing the controller watches:
        // look at the pods again.
        requeue = requeue.min(ctx.settings.agent_check_interval);
    }
    Ok(Action::requeue(requeue))
}

/// Lists the agent pods when the DaemonSet is not fully ready (and not
/// within `agent_check_interval` of the last list), to say which agents fail
/// and why. Page by page, so a large DaemonSet is never held in memory whole.
async fn check_agents(
    bm: &BioMonitor,
    ctx: &Context,
    daemonset: &DaemonSetState,
) -> Result<AgentsState> {
    let key = ObjectRef::from_obj(bm);
    if !conditions::needs_agent_check(daemonset) {
        // The next time agents are not ready, look at once.
        lock(&ctx.agent_checks).remove(&key);
        return Ok(AgentsState::NotChecked);
    }
    {
        let mut checks = lock(&ctx.agent_checks);
        if checks
            .get(&key)
            .is_some_and(|at| at.elapsed() < ctx.settings.agent_check_interval)
        {
            return Ok(AgentsState::Unchanged);
        }
        checks.insert(key.clone(), Instant::now());
    }
    let namespace = bm
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let selector = names::selector_labels(bm)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut params = ListParams::default()
        .labels(&selector)
        .limit(AGENT_PODS_PAGE);
    let mut health = AgentHealth::default();
    loop {
        let page = match api.list(&params).await {
            Ok(page) => page,
            // Refused (RBAC, say): that will not fix itself, so report it.
            // (410 Gone is an expired continue token: retry.)
            Err(kube::Error::Api(status)) if status.code != 410 => {
                return Ok(AgentsState::ListFailed(format!(
                    "{} ({})",
                    status.message, status.reason
                )))
            }
            Err(source) => {
                // Let the retry list again instead of keeping the old condition.
                lock(&ctx.agent_checks).remove(&key);
                return Err(Error::AgentPods(source));
            }
        };
        for pod in &page.items {
            health.observe(pod);
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => break,
        }
    }
    Ok(AgentsState::Checked(health))
}

/// Pods per list request when checking agents.
const AGENT_PODS_PAGE: u32 = 500;

/// Attempts at one subject change before giving up (the error backoff
/// retries later): each failed attempt means another BioMonitor's change
/// went through.
const SUBJECT_UPDATE_ATTEMPTS: usize = 8;

/// Adds or removes this agent in one of the chart's agent
/// ClusterRoleBindings. Read, change, write back with the resourceVersion
/// read: a concurrent change by another BioMonitor's reconcile makes the
/// write fail with 409 Conflict instead of dropping that change, and the
/// loop starts over from the newer list. (Server-side apply cannot share
/// the list: `subjects` is atomic, so each apply would replace it whole.)
async fn sync_agent_subject(
    ctx: &Context,
    binding: &rbac::AgentBinding,
    subject: &Subject,
) -> Result<()> {
    let api: Api<ClusterRoleBinding> = Api::all(ctx.client.clone());
    for _ in 0..SUBJECT_UPDATE_ATTEMPTS {
        let Some(mut crb) = api.get_opt(&binding.name).await? else {
            if !binding.wanted {
                // Gone with the release: nothing to remove the agent from.
                return Ok(());
            }
            return Err(Error::Config(format!(
                "ClusterRoleBinding {} not found: the chart creates it (one per agent ClusterRole) and the operator only adds and removes agent ServiceAccounts in it",
                binding.name
            )));
        };
        rbac::check_role_ref(&crb, binding)?;
        let current = crb.subjects.take().unwrap_or_default();
        let Some(next) = rbac::subjects_with(&current, subject, binding.wanted) else {
            return Ok(());
        };
        crb.subjects = Some(next);
        crb.metadata.managed_fields = None;
        ctx.fence.check()?;
        let params = PostParams {
            field_manager: Some(names::FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        match api.replace(&binding.name, &params, &crb).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 => {
                tracing::debug!(binding = %binding.name, "subjects changed concurrently; retrying");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Timeout(format!(
        "a stable subject list in ClusterRoleBinding {} ({SUBJECT_UPDATE_ATTEMPTS} conflicting writes)",
        binding.name
    )))
}

/// A BioMonitor in a namespace outside the scope: nothing is created, the
/// status says why. Its agent is taken out of the agent bindings in case the
/// namespace was in scope before (the rest went with the owner references
/// or stays until the BioMonitor is deleted).
async fn refuse(bm: &BioMonitor, ctx: &Context) -> Result<Action> {
    let namespace = bm
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let subject = rbac::agent_subject(bm)?;
    for binding in &rbac::no_agent_bindings(&ctx.settings) {
        sync_agent_subject(ctx, binding, &subject).await?;
    }
    let message = ctx.scope.refusal(&namespace);
    let now = Time(
        Timestamp::from_second(Timestamp::now().as_second()).unwrap_or_else(|_| Timestamp::now()),
    );
    let status = refused_status(bm, &message, &now);
    if bm.status.as_ref() != Some(&status) {
        tracing::info!(biomonitor = %ObjectRef::from_obj(bm), "refused: namespace outside the operator's scope");
        ctx.fence.check()?;
        let api: Api<BioMonitor> = Api::namespaced(ctx.client.clone(), &namespace);
        api.patch_status(
            &bm.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await?;
    }
    // The scope only changes with a restart, which reconciles everything.
    Ok(Action::await_change())
}

/// Every condition False with the refusal, and Ready's reason naming it.
fn refused_status(bm: &BioMonitor, message: &str, now: &Time) -> BioMonitorStatus {
    let not_rolled_out = || DaemonSetState::NotRolledOut {
        reason: NAMESPACE_NOT_ALLOWED,
        message: message.to_string(),
    };
    let observation = Observation {
        generation: bm.metadata.generation,
        invalid_spec: None,
        apply_rejected: None,
        node_conflict: None,
        daemonset: not_rolled_out(),
        service_monitor: ServiceMonitorState::NotRolledOut {
            reason: NAMESPACE_NOT_ALLOWED,
            message: message.to_string(),
        },
        tls: TlsState::Failed(message.to_string()),
        agents: AgentsState::NotChecked,
    };
    let mut status = compute_status(bm.status.as_ref(), &observation, now);
    // compute_status reports the first False condition as Ready's reason;
    // the cause here is the namespace, whatever that is. Ready is False
    // either way, so its lastTransitionTime is already right.
    if let Some(ready) = status
        .conditions
        .iter_mut()
        .find(|c| c.type_ == conditions::READY)
    {
        ready.reason = NAMESPACE_NOT_ALLOWED.into();
        ready.message = message.to_string();
    }
    status
}

/// What [`reconcile_tls`] found.
struct TlsOutcome {
    state: TlsState,
    /// When a certificate falls due, if sooner than the periodic resync.
    recheck: Option<Duration>,
    /// The Secret the desired DaemonSet mounts holds a certificate (always
    /// true without TLS).
    in_place: bool,
}

/// True when the last status already describes this generation's TLS setup
/// as working: then the objects of other TLS setups were removed already.
fn tls_settled(bm: &BioMonitor) -> bool {
    bm.status
        .as_ref()
        .and_then(|s| s.condition(conditions::TLS_READY))
        .is_some_and(|c| c.status == "True" && c.observed_generation == bm.metadata.generation)
}

/// Makes sure the serving certificate the spec asks for exists.
async fn reconcile_tls(
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
async fn remove_unused_tls_objects(bm: &BioMonitor, ctx: &Context) -> Result<()> {
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

async fn apply_service_monitor(
    bm: &BioMonitor,
    ctx: &Context,
    desired: Option<&ServiceMonitor>,
) -> Result<ServiceMonitorState> {
    let namespace = bm.namespace().unwrap_or_default();
    let api: Api<DynamicObject> = Api::namespaced_with(
        ctx.client.clone(),
        &namespace,
        &servicemonitor::api_resource(),
    );
    let name = names::child_name(bm);
    ctx.fence.check()?;
    let result = match desired {
        Some(sm) => api
            .patch(&name, &apply_params(), &Patch::Apply(sm))
            .await
            .map(|_| ServiceMonitorState::Applied),
        None => api
            .delete(&name, &DeleteParams::background())
            .await
            .map(|_| ServiceMonitorState::Disabled),
    };
    match result {
        Ok(state) => Ok(state),
        // 404 on apply: the resource type itself is unknown.
        Err(e) if is_not_found(&e) && desired.is_some() => Ok(ServiceMonitorState::CrdNotInstalled),
        Err(e) if is_not_found(&e) => Ok(ServiceMonitorState::Disabled),
        // Rejections (RBAC, admission, validation) will not fix themselves
        // on retry: surface them on the condition instead of erroring out,
        // so the DaemonSet is still reconciled.
        Err(kube::Error::Api(status)) => Ok(ServiceMonitorState::Failed(format!(
            "applying the ServiceMonitor failed: {} ({})",
            status.message, status.reason
        ))),
        Err(e) => Err(e.into()),
    }
}

async fn cleanup(bm: Arc<BioMonitor>, ctx: &Context) -> Result<Action> {
    lock(&ctx.agent_checks).remove(&ObjectRef::from_obj(bm.as_ref()));
    // Namespaced children go with their owner references; only the agent's
    // entries in the cluster-scoped bindings need removing by hand (the
    // bindings belong to the chart and stay).
    let subject = rbac::agent_subject(&bm)?;
    for binding in &rbac::no_agent_bindings(&ctx.settings) {
        sync_agent_subject(ctx, binding, &subject).await?;
    }
    // A monitor blocked by this one may now be rolled out.
    let _ = ctx.reconcile_all.unbounded_send(());
    tracing::info!(biomonitor = %ObjectRef::from_obj(bm.as_ref()), "removed the agent from the agent ClusterRoleBindings");
    Ok(Action::await_change())
}

/// One Warning per transition into a bad state, not one per reconcile.
async fn publish_transition_events(
    bm: &BioMonitor,
    ctx: &Context,
    old: Option<&BioMonitorStatus>,
    new: &BioMonitorStatus,
) {
    let reason_of = |s: Option<&BioMonitorStatus>, t: &str| {
        s.and_then(|s| s.condition(t)).map(|c| c.reason.clone())
    };
    let mut events = Vec::new();
    for (type_, bad) in [
        (conditions::READY, conditions::reason::INVALID_SPEC),
        (conditions::READY, conditions::reason::APPLY_REJECTED),
        (conditions::READY, conditions::reason::NODE_CONFLICT),
        (
            conditions::SERVICE_MONITOR_READY,
            conditions::reason::CRD_NOT_INSTALLED,
        ),
        (
            conditions::TLS_READY,
            conditions::reason::CERT_MANAGER_NOT_INSTALLED,
        ),
        (
            conditions::AGENTS_HEALTHY,
            conditions::reason::AGENT_FAILING,
        ),
        (
            conditions::AGENTS_HEALTHY,
            conditions::reason::IMAGE_PULL_FAILED,
        ),
    ] {
        let now = reason_of(Some(new), type_);
        // Only on the transition: kube's Recorder folds a repeat of the same
        // reason into a series that keeps the first note, so a second event
        // for a changed message would show the old one. The condition
        // always carries the current message.
        if now.as_deref() == Some(bad) && reason_of(old, type_).as_deref() != Some(bad) {
            let note = new.condition(type_).map(|c| c.message.clone());
            events.push((bad, note));
        }
    }
    for (reason, note) in events {
        // Events are writes too: a replica that resumed after losing the
        // lease must not report anything (the invalid-spec path reaches this
        // point without any fenced apply before it).
        if ctx.fence.check().is_err() {
            return;
        }
        let event = KubeEvent {
            type_: EventType::Warning,
            reason: reason.into(),
            note,
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(err) = ctx.recorder.publish(&event, &bm.object_ref(&())).await {
            tracing::warn!(error = %err, reason, "could not publish event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_monitor_says_why_on_every_condition() {
        let bm =
            crate::resources::test_support::monitor("disks", crate::crd::BioMonitorSpec::default());
        let now = Time(Timestamp::from_second(1_700_000_000).unwrap());
        let status = refused_status(&bm, "no rights in namespace x", &now);
        let ready = status.condition(conditions::READY).unwrap();
        assert_eq!(
            (
                ready.status.as_str(),
                ready.reason.as_str(),
                ready.message.as_str()
            ),
            ("False", NAMESPACE_NOT_ALLOWED, "no rights in namespace x")
        );
        let ds = status.condition(conditions::DAEMONSET_READY).unwrap();
        assert_eq!(
            (ds.status.as_str(), ds.reason.as_str()),
            ("False", NAMESPACE_NOT_ALLOWED)
        );
        assert_eq!(status.observed_generation, Some(1));
        // Stable across reconciles, so no status write repeats.
        let mut again = bm.clone();
        again.status = Some(status.clone());
        let later = Time(Timestamp::from_second(1_700_000_100).unwrap());
        assert_eq!(
            refused_status(&again, "no rights in namespace x", &later),
            status
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_secs(5));
        assert_eq!(backoff(2), Duration::from_secs(10));
        assert_eq!(backoff(4), Duration::from_secs(40));
        assert_eq!(backoff(7), Duration::from_secs(300));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(300));
        assert_eq!(backoff(0), Duration::from_secs(5));
    }
}
