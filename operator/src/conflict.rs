//! Two BioMonitors whose agents would run on the same node would attach the
//! BPF programs twice and export every series twice. The rule: monitors are
//! ordered by creationTimestamp, then namespace/name; walking that order, a
//! monitor is *active* unless one of its nodes is already covered by an
//! earlier active monitor, in which case it is *blocked* and not rolled out
//! at all. Blocked monitors cover no nodes, so they never block later ones.
//! Monitors being deleted do not count, so a successor starts right away.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{Node, Taint, Toleration};
use kube::ResourceExt;

use crate::{
    crd::{BioMonitor, BioMonitorSpec},
    resources::daemonset::effective_node_selector,
};

/// How many node names a conflict message lists before summarising.
const MAX_NODES_IN_MESSAGE: usize = 3;

/// Tolerations the DaemonSet controller adds to every DaemonSet pod on its own.
const DAEMONSET_TOLERATIONS: &[(&str, &str)] = &[
    ("node.kubernetes.io/not-ready", "NoExecute"),
    ("node.kubernetes.io/unreachable", "NoExecute"),
    ("node.kubernetes.io/disk-pressure", "NoSchedule"),
    ("node.kubernetes.io/memory-pressure", "NoSchedule"),
    ("node.kubernetes.io/pid-pressure", "NoSchedule"),
    ("node.kubernetes.io/unschedulable", "NoSchedule"),
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// `namespace/name` of the earlier, active monitor.
    pub with: String,
    /// Nodes both would run on, sorted.
    pub nodes: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Active,
    Blocked(Vec<Conflict>),
}

/// Kubernetes' toleration matching (`ToleratesTaint`).
pub fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    if let Some(effect) = toleration.effect.as_deref().filter(|e| !e.is_empty()) {
        if effect != taint.effect {
            return false;
        }
    }
    if let Some(key) = toleration.key.as_deref().filter(|k| !k.is_empty()) {
        if key != taint.key {
            return false;
        }
    }
    match toleration.operator.as_deref().unwrap_or("Equal") {
        "Exists" => true,
        "Equal" | "" => {
            toleration.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("")
        }
        _ => false,
    }
}

/// Would the DaemonSet built from `spec` place a pod on `node`?
pub fn runs_on(spec: &BioMonitorSpec, node: &Node) -> bool {
    runs_on_with(&effective_node_selector(spec), spec, node)
}

/// `runs_on` with the effective node selector computed once by the caller
/// (it is the same for every node).
fn runs_on_with(selector: &BTreeMap<String, String>, spec: &BioMonitorSpec, node: &Node) -> bool {
    let labels = node.labels();
    let selected = selector.iter().all(|(k, v)| labels.get(k) == Some(v));
    if !selected {
        return false;
    }
    let taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_deref())
        .unwrap_or_default();
    taints
        .iter()
        // PreferNoSchedule never keeps a pod away.
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .all(|taint| {
            spec.tolerations.iter().any(|t| tolerates(t, taint))
                || DAEMONSET_TOLERATIONS
                    .iter()
                    .any(|(key, effect)| *key == taint.key && *effect == taint.effect)
        })
}

/// `namespace/name`, the key of a BioMonitor in verdict maps and messages.
pub fn key(bm: &BioMonitor) -> String {
    format!("{}/{}", bm.namespace().unwrap_or_default(), bm.name_any())
}

/// Total order: older first; objects without a timestamp (not yet persisted) last.
fn precedence(bm: &BioMonitor) -> (bool, Option<k8s_openapi::jiff::Timestamp>, String) {
    let ts = bm.metadata.creation_timestamp.as_ref().map(|t| t.0);
    (ts.is_none(), ts, key(bm))
}

/// The verdict for `me`, given every BioMonitor in the cluster (the cache may
/// hold an older copy of `me`; the fresh one wins) and every node.
pub fn verdict(me: &BioMonitor, monitors: &[&BioMonitor], nodes: &[&Node]) -> Verdict {
    let my_key = key(me);
    let mut all: Vec<&BioMonitor> = monitors
        .iter()
        .copied()
        .filter(|m| key(m) != my_key)
        .collect();
    all.push(me);
    verdicts(&all, nodes)
        .remove(&my_key)
        .unwrap_or(Verdict::Active)
}

/// The verdict of every BioMonitor in `monitors` (one copy per
/// namespace/name) at once, keyed by `namespace/name`. Monitors being
/// deleted take no part and get no entry. One pass over the nodes per
/// monitor and no per-node allocation: this runs on every spec or node
/// change in clusters with thousands of nodes.
pub fn verdicts(monitors: &[&BioMonitor], nodes: &[&Node]) -> HashMap<String, Verdict> {
    let mut ordered: Vec<&BioMonitor> = monitors
        .iter()
        .copied()
        .filter(|m| m.metadata.deletion_timestamp.is_none())
        .collect();
    ordered.sort_by_cached_key(|m| precedence(m));

    // Per node: the index (into `active`) of the active monitor covering it.
    let mut owner: Vec<Option<usize>> = vec![None; nodes.len()];
    let mut active: Vec<String> = Vec::new();
    let mut out = HashMap::with_capacity(ordered.len());
    for m in ordered {
        let selector = effective_node_selector(&m.spec);
        let mut mine = Vec::new();
        // Shared nodes per earlier active monitor, in activation order.
        let mut shared: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, node) in nodes.iter().enumerate() {
            if runs_on_with(&selector, &m.spec, node) {
                mine.push(i);
                if let Some(o) = owner[i] {
                    shared.entry(o).or_default().push(i);
                }
            }
        }
        let verdict = if shared.is_empty() {
            for i in mine {
                owner[i] = Some(active.len());
            }
            active.push(key(m));
            Verdict::Active
        } else {
            Verdict::Blocked(
                shared
                    .into_iter()
                    .map(|(o, idx)| {
                        let mut names: Vec<String> =
                            idx.into_iter().map(|i| nodes[i].name_any()).collect();
                        names.sort();
                        Conflict {
                            with: active[o].clone(),
                            nodes: names,
                        }
                    })
                    .collect(),
            )
        };
        out.insert(key(m), verdict);
    }
    out
}

/// Condition message for a blocked monitor; names a few nodes, not thousands.
pub fn describe(conflicts: &[Conflict]) -> String {
    let parts: Vec<String> = conflicts
        .iter()
        .map(|c| {
            let shown: Vec<&str> = c
                .nodes
                .iter()
                .take(MAX_NODES_IN_MESSAGE)
                .map(String::as_str)
                .collect();
            let more = c.nodes.len().saturating_sub(MAX_NODES_IN_MESSAGE);
            let suffix = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            let (noun, verb) = if c.nodes.len() == 1 {
                ("node", "is")
            } else {
                ("nodes", "are")
            };
            format!(
                "{noun} {}{suffix} {verb} already monitored by BioMonitor {}",
                shown.join(", "),
                c.with
            )
        })
        .collect();
    format!(
        "{}; not rolled out to avoid loading the BPF programs twice (the older BioMonitor wins)",
        parts.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::{
        api::core::v1::NodeSpec,
        apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
        jiff::Timestamp,
    };

    use super::*;
    use crate::resources::test_support::monitor;

    fn node(name: &str, labels: &[(&str, &str)], taints: &[(&str, &str)]) -> Node {
        let mut all: BTreeMap<String, String> =
            BTreeMap::from([("kubernetes.io/os".to_string(), "linux".to_string())]);
        all.extend(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(all),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                taints: Some(
                    taints
                        .iter()
                        .map(|(key, effect)| Taint {
                            key: key.to_string(),
                            effect: effect.to_string(),
                            ..Taint::default()
                        })
                        .collect(),
                ),
                ..NodeSpec::default()
            }),
            status: None,
        }
    }

    fn mon(name: &str, created_s: i64, selector: &[(&str, &str)]) -> BioMonitor {
        let mut bm = monitor(
            name,
            BioMonitorSpec {
                node_selector: selector
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..BioMonitorSpec::default()
            },
        );
        bm.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created_s).unwrap()));
        bm
    }

    fn toleration(
        key: Option<&str>,
        op: &str,
        value: Option<&str>,
        effect: Option<&str>,
    ) -> Toleration {
        Toleration {
            key: key.map(Into::into),
            operator: Some(op.into()),
            value: value.map(Into::into),
            effect: effect.map(Into::into),
            ..Toleration::default()
        }
    }

    #[test]
    fn toleration_matching_follows_kubernetes() {
        let taint = Taint {
            key: "dedicated".into(),
            value: Some("db".into()),
            effect: "NoSchedule".into(),
            ..Taint::default()
        };
        assert!(tolerates(&toleration(None, "Exists", None, None), &taint));
        assert!(tolerates(
            &toleration(Some("dedicated"), "Exists", None, None),
            &taint
        ));
        assert!(tolerates(
            &toleration(Some("dedicated"), "Equal", Some("db"), Some("NoSchedule")),
            &taint
        ));
        assert!(!tolerates(
            &toleration(Some("dedicated"), "Equal", Some("web"), None),
            &taint
        ));
        assert!(!tolerates(
            &toleration(Some("dedicated"), "Exists", None, Some("NoExecute")),
            &taint
        ));
        assert!(!tolerates(
            &toleration(Some("other"), "Exists", None, None),
            &taint
        ));
    }

    #[test]
    fn placement_respects_selector_and_taints() {
        let tainted = node(
            "gpu-1",
            &[("pool", "gpu")],
            &[("nvidia.com/gpu", "NoSchedule")],
        );
        let soft = node("soft-1", &[], &[("maintenance", "PreferNoSchedule")]);
        let cordoned = node(
            "cordoned",
            &[],
            &[("node.kubernetes.io/unschedulable", "NoSchedule")],
        );
        let default_spec = BioMonitorSpec::default();
        assert!(
            runs_on(&default_spec, &tainted),
            "default tolerates everything"
        );

        let picky = BioMonitorSpec {
            tolerations: vec![],
            ..BioMonitorSpec::default()
        };
        assert!(!runs_on(&picky, &tainted));
        assert!(runs_on(&picky, &soft));
        assert!(
            runs_on(&picky, &cordoned),
            "DaemonSets tolerate cordoned nodes"
        );

        let gpu_only = BioMonitorSpec {
            node_selector: BTreeMap::from([("pool".to_string(), "gpu".to_string())]),
            ..BioMonitorSpec::default()
        };
        assert!(runs_on(&gpu_only, &tainted));
        assert!(!runs_on(&gpu_only, &soft));

        let mut windows = node("win-1", &[], &[]);
        windows
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("kubernetes.io/os".into(), "windows".into());
        assert!(!runs_on(&default_spec, &windows));
    }

    #[test]
    fn disjoint_monitors_are_both_active() {
        let nodes = [
            node("a", &[("pool", "x")], &[]),
            node("b", &[("pool", "y")], &[]),
        ];
        let nodes: Vec<&Node> = nodes.iter().collect();
        let x = mon("x", 100, &[("pool", "x")]);
        let y = mon("y", 200, &[("pool", "y")]);
        let all = [&x, &y];
        assert_eq!(verdict(&x, &all, &nodes), Verdict::Active);
        assert_eq!(verdict(&y, &all, &nodes), Verdict::Active);
    }

    #[test]
    fn the_later_monitor_is_blocked_and_names_the_shared_nodes() {
        let nodes = [
            node("a", &[("pool", "x")], &[]),
            node("b", &[("pool", "y")], &[]),
        ];
        let nodes: Vec<&Node> = nodes.iter().collect();
        let first = mon("first", 100, &[("pool", "x")]);
        let everything = mon("everything", 200, &[]);
        let all = [&everything, &first];
        assert_eq!(verdict(&first, &all, &nodes), Verdict::Active);
        assert_eq!(
            verdict(&everything, &all, &nodes),
            Verdict::Blocked(vec![Conflict {
                with: "monitoring/first".into(),
                nodes: vec!["a".into()],
            }])
        );
    }

    #[test]
    fn same_timestamp_falls_back_to_name_order() {
        let nodes = [node("a", &[], &[])];
        let nodes: Vec<&Node> = nodes.iter().collect();
        let alpha = mon("alpha", 100, &[]);
        let beta = mon("beta", 100, &[]);
        let all = [&beta, &alpha];
        assert_eq!(verdict(&alpha, &all, &nodes), Verdict::Active);
        assert!(matches!(verdict(&beta, &all, &nodes), Verdict::Blocked(_)));
    }

    #[test]
    fn blocked_monitors_do_not_block_others() {
        // first covers pool x; middle covers x and y (blocked by first);
        // last covers y: nobody runs there, so last is active.
        let nodes = [
            node("a", &[("pool", "x")], &[]),
            node("b", &[("pool", "y")], &[]),
        ];
        let nodes: Vec<&Node> = nodes.iter().collect();
        let first = mon("first", 100, &[("pool", "x")]);
        let middle = mon("middle", 200, &[]);
        let last = mon("last", 300, &[("pool", "y")]);
        let all = [&first, &middle, &last];
        assert!(matches!(
            verdict(&middle, &all, &nodes),
            Verdict::Blocked(_)
        ));
        assert_eq!(verdict(&last, &all, &nodes), Verdict::Active);
    }

    #[test]
    fn monitors_being_deleted_do_not_count() {
        let nodes = [node("a", &[], &[])];
        let nodes: Vec<&Node> = nodes.iter().collect();
        let mut old = mon("old", 100, &[]);
        old.metadata.deletion_timestamp = Some(Time(Timestamp::from_second(500).unwrap()));
        let new = mon("new", 200, &[]);
        assert_eq!(verdict(&new, &[&old, &new], &nodes), Verdict::Active);
    }

    #[test]
    fn monitors_in_other_namespaces_conflict_too() {
        let nodes = [node("a", &[], &[])];
        let nodes: Vec<&Node> = nodes.iter().collect();
        let first = mon("disks", 100, &[]);
        let mut second = mon("disks", 200, &[]);
        second.metadata.namespace = Some("team-b".into());
        second.metadata.uid = Some("other".into());
        let all = [&first, &second];
        assert_eq!(verdict(&first, &all, &nodes), Verdict::Active);
        assert!(matches!(
            verdict(&second, &all, &nodes),
            Verdict::Blocked(_)
        ));
    }

    #[test]
    fn all_verdicts_at_once_match_one_at_a_time() {
        let nodes: Vec<Node> = (0..12)
            .map(|i| {
                let pool = format!("p{}", i % 3);
                node(&format!("n{i:02}"), &[("pool", &pool)], &[])
            })
            .collect();
        let nodes: Vec<&Node> = nodes.iter().collect();
        let monitors = [
            mon("everything", 10, &[]),
            mon("p0", 5, &[("pool", "p0")]),
            mon("p1", 20, &[("pool", "p1")]),
            mon("p2", 30, &[("pool", "p2")]),
            mon("none", 1, &[("pool", "nowhere")]),
        ];
        let all: Vec<&BioMonitor> = monitors.iter().collect();
        let at_once = verdicts(&all, &nodes);
        assert_eq!(at_once.len(), monitors.len());
        for m in &monitors {
            assert_eq!(at_once[&key(m)], verdict(m, &all, &nodes), "{}", key(m));
        }
        // p0 is older than `everything`, which is blocked on p0's four
        // nodes; p1 and p2 are then free.
        assert_eq!(at_once[&key(&monitors[1])], Verdict::Active);
        match &at_once[&key(&monitors[0])] {
            Verdict::Blocked(c) => {
                assert_eq!(c.len(), 1);
                assert_eq!(c[0].nodes, ["n00", "n03", "n06", "n09"]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(at_once[&key(&monitors[2])], Verdict::Active);
        assert_eq!(at_once[&key(&monitors[3])], Verdict::Active);
    }

    #[test]
    fn no_nodes_no_conflict() {
        let first = mon("first", 100, &[]);
        let second = mon("second", 200, &[]);
        assert_eq!(verdict(&second, &[&first, &second], &[]), Verdict::Active);
    }

    #[test]
    fn message_lists_a_few_nodes() {
        let msg = describe(&[Conflict {
            with: "monitoring/first".into(),
            nodes: (1..=5).map(|i| format!("node-{i}")).collect(),
        }]);
        assert!(
            msg.starts_with(
                "nodes node-1, node-2, node-3 and 2 more are already monitored by BioMonitor monitoring/first"
            ),
            "{msg}"
        );
        let one = describe(&[Conflict {
            with: "monitoring/first".into(),
            nodes: vec!["node-1".into()],
        }]);
        assert!(one.starts_with("node node-1 is already monitored"), "{one}");
    }
}
