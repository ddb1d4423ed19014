//! The conflict-verdict cache: every BioMonitor's node-conflict verdict,
//! recomputed only when a node's placement data or a monitor's identity,
//! precedence or spec changed.

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    sync::atomic::Ordering,
};

use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;

use super::{lock, Context};
use crate::{
    conflict::{self, Verdict},
    crd::BioMonitor,
};

/// What the verdicts depend on: node placement data (via its version) and,
/// per monitor, identity, precedence and spec (via the generation).
#[derive(Clone, Debug, PartialEq, Eq)]
struct VerdictInputs {
    nodes_version: u64,
    monitors: Vec<(String, Option<String>, Option<i64>, bool)>,
}

pub(super) struct VerdictCache {
    inputs: VerdictInputs,
    verdicts: HashMap<String, Verdict>,
}

impl Context {
    /// The verdict for `bm` (fresher than its cached copy), and whether the
    /// verdict of any *other* monitor changed since the last computation, in
    /// which case they all need a reconcile.
    pub(super) fn verdict(&self, bm: &BioMonitor) -> (Verdict, bool) {
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
pub(super) fn placement_hash(node: &Node) -> u64 {
    let mut h = DefaultHasher::new();
    node.labels().hash(&mut h);
    if let Some(taints) = node.spec.as_ref().and_then(|s| s.taints.as_ref()) {
        for t in taints {
            (&t.key, &t.value, &t.effect).hash(&mut h);
        }
    }
    h.finish()
}
