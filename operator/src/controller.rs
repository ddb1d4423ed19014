//! The reconcile loop: BioMonitor -> children (server-side apply), status,
//! events. Decisions live in the pure modules; these files do the I/O, one
//! job each. This one holds what every reconcile shares ([`Context`]) and
//! starts the watches ([`run`]).

mod agents;
mod apply;
mod bindings;
mod events;
mod reconcile;
mod refuse;
#[cfg(test)]
mod tests;
mod tls_secrets;
mod verdicts;
mod write;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Instant,
};

use futures::{channel::mpsc, StreamExt};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Node, Service, ServiceAccount},
};
use kube::{
    api::{Api, ListParams},
    runtime::{
        events::{Recorder, Reporter},
        reflector::{self, ObjectRef, Store},
        watcher, Controller, WatchStreamExt,
    },
    Client, Resource, ResourceExt,
};

pub use self::reconcile::{backoff, error_policy, reconcile};
use self::verdicts::{placement_hash, VerdictCache};
use crate::{
    crd::BioMonitor,
    leader::Fence,
    metrics::Metrics,
    names,
    settings::{Settings, WatchScope},
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these maps cannot leave them inconsistent.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
