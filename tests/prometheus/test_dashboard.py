"""The chart's Grafana dashboard: its JSON, its ConfigMap, and every PromQL expression in it run
against real Prometheus servers holding real data.

One loop device, one agent measuring it, and two Prometheus servers scraping that agent for the
whole module (module-scoped fixture; the IO is issued once):

  - prometheus2: Debian's 2.42, text exposition, classic histograms only (le stored verbatim);
  - prometheus3: 3.x (BIO_PROMETHEUS3), protobuf with scrape_native_histograms and
    always_scrape_classic_histograms: native and classic stored, le normalised ("1.0").

The loop device backs a block-mode PersistentVolume bound to a claim in a real local API server
(tests/cluster), linked under a temporary kubelet root as the kubelet links a pod's
volumeDevices, and the agent runs with --pv-labels: its own `ebpf_bio_device_info` series feeds
the per-PVC table on both servers.

Every `expr` of every panel target (rows included, collapsed or not) has its Grafana variables
replaced ($__rate_interval -> 1m, $__range -> 5m, $__interval -> 15s; $node/$device/$operation
-> ".*" and, separately, values naming the test's node, device and read|write) and is run as an
instant query and, for range targets, as a range query over the minute before: status success,
no warnings or infos, and a non-empty result wherever the data it reads exists on that server
(and an empty one where it does not: native-only expressions on 2.42). Queries are evaluated at the time of a successful scrape taken after the IO
(a failed scrape on a busy machine would leave staleness markers after it). Also: no expression
names an `le` value or uses `le` outside `by (...)`; the variables' label_values queries find
the test's node, device and operations; `helm template` renders the ConfigMap only when
grafanaDashboard.enabled, with its labels, namespace and the JSON verbatim.
"""
import contextlib
import json
import math
import os
import re
import subprocess

import pytest

from biotest import REPO
from biotest.agent import Agent
from biotest.blockdev import LoopDevice, direct_io
from biotest.cluster import agent_env, running_cluster
from biotest.dashboard import (CHART, DASHBOARD_PATH, DS, HISTOGRAMS, TEMPLATE_VARS, VAR_RE, api, check_response,
                               dashboard_targets, forms, load_dashboard, substitute, walk_panels)
from biotest.kubelet import Node, create_pv
from biotest.prometheus import (NODE, PROMETHEUS2, PROMETHEUS3, PrometheusServer, agent_counts, agent_le,
                                agent_serves_protobuf, issue_io, scrape_config, wait_counts_stored, wait_target_up)
from biotest.util import wait_for

CONFIGMAP_TEMPLATE = "templates/dashboard-configmap.yaml"
DATA_KEY = "bio-exporter.json"
SERVERS = ["prometheus2", "prometheus3"]

# The PersistentVolume the loop device backs, as the agent's ebpf_bio_device_info labels it.
PVC_INFO = {"persistentvolume": "pv-dashboard-test", "persistentvolumeclaim": "data-0",
            "namespace": "ns-dashboard-test", "storageclass": "sc-test", "shared": "false"}

TARGETS = dashboard_targets()


LE_MATCHER_RE = re.compile(r"\ble\s*(=~|!~|!=|=)")
BY_CLAUSE_RE = re.compile(r"\bby\s*\([^()]*\)")


def le_problems(expr):
    """Why expr may depend on how `le` is spelled: a matcher on le, or le anywhere but inside a
    `by (...)` clause (label_replace, without, on, a string ...)."""
    problems = []
    if LE_MATCHER_RE.search(expr):
        problems.append("matches le values")
    if re.search(r"\ble\b", BY_CLAUSE_RE.sub("", expr)):
        problems.append("uses le outside `by (...)`")
    return problems


# ------------------------------------------------------------------ static checks of the JSON

def test_dashboard_structure():
    d = load_dashboard()
    assert d["schemaVersion"] >= 39, d["schemaVersion"]
    assert d["uid"] and d["title"]
    assert "id" not in d or d["id"] is None, "a provisioned dashboard carries no database id"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus", ds
    for name in TEMPLATE_VARS:
        v = variables[name]
        assert v["type"] == "query" and v["datasource"] == DS, v
        assert v["definition"].startswith("label_values("), v
        assert v["query"]["query"] == v["definition"], v
        assert v["includeAll"] and v["allValue"] == ".*" and v["multi"], v

    ids = [p["id"] for p in walk_panels(d["panels"])]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    for p in walk_panels(d["panels"]):
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]), p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == DS, f"{p['title']}: datasource {p['datasource']}"
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DS, f"{p['title']} {t['refId']}: {t['datasource']}"
            assert t["expr"].strip(), p["title"]
            left = VAR_RE.findall(substitute(t["expr"], dict.fromkeys(TEMPLATE_VARS, ".*")))
            assert not left, f"{p['title']}: variables left after substitution: {left}"


def test_dashboard_has_the_panels_of_the_issue():
    exprs = {}  # panel type -> [normalised expr]
    for _, p, t in TARGETS:
        exprs.setdefault(p["type"], []).append(re.sub(r"\s+", " ", t["expr"]))
    heat = exprs["heatmap"]
    heat_targets = [t for _, p, t in TARGETS if p["type"] == "heatmap"]

    def has(kind, pattern):
        return any(re.search(pattern, e) for e in exprs.get(kind, []))

    # Classic heatmaps: sum by (le) of bucket rates, format heatmap.
    for metric in ("ebpf_bio_req_latency", "ebpf_bio_req_size", "ebpf_bio_req_queue_latency"):
        assert any(re.fullmatch(rf"sum by \(le\) \(rate\({metric}_bucket\{{.*\}}"
                                rf"\[\$__rate_interval\]\)\)", e) for e in heat), metric
        # Native heatmaps: sum of the rate of the histogram itself.
        assert any(re.fullmatch(rf"sum\(rate\({metric}\{{.*\}}\[\$__rate_interval\]\)\)", e)
                   for e in heat), metric
    for t in heat_targets:
        classic, native, _ = forms(t["expr"])
        assert t["format"] == ("heatmap" if classic else "time_series"), t
    # The queue-time heatmaps sit right below the latency ones, in the same row and repeat.
    panels = list(walk_panels(load_dashboard()["panels"]))
    for latency_title, queue_title in (("Latency: ", "Queue time: "),
                                       ("Latency (native): ", "Queue time (native): ")):
        lat = next(p for p in panels if p["title"].startswith(latency_title))
        queue = next(p for p in panels if p["title"].startswith(queue_title))
        assert queue["type"] == "heatmap" and queue["repeat"] == lat["repeat"], queue
        assert queue["gridPos"] == {**lat["gridPos"], "y": lat["gridPos"]["y"] + lat["gridPos"]["h"]}
    assert has("timeseries", r"^sum by \(operation\) \( rate\(ebpf_bio_req_latency_count")
    for q in ("0.5", "0.99"):
        assert has("timeseries", rf"histogram_quantile\({q}, sum by \(le, node, device, "
                                 rf"operation\) \(rate\(ebpf_bio_req_latency_bucket")
        assert has("timeseries", rf"histogram_quantile\({q}, sum by \(node, device, "
                                 rf"operation\) \(rate\(ebpf_bio_req_latency\{{")
    assert has("timeseries", r"ebpf_bio_req_errors_total")
    assert has("timeseries", r"ebpf_bio_lost_events_total")
    pvc = [t for _, p, t in TARGETS if p["type"] == "table" and "ebpf_bio_device_info" in t["expr"]]
    assert pvc and all("group_left" in t["expr"] and t["format"] == "table" for t in pvc), pvc


@pytest.mark.parametrize("tid", [tid for tid, _, _ in TARGETS])
def test_no_le_value_matching(tid):
    """2.x text scrapes store le="1", protobuf scrapes and every 3.x scrape le="1.0": an
    expression that names le values works on one of them only."""
    expr = next(t["expr"] for i, _, t in TARGETS if i == tid)
    assert not le_problems(expr), f"{tid}: {le_problems(expr)}: {expr}"


def test_le_check_catches_what_it_should():
    assert "matches le values" in le_problems('sum(rate(x_bucket{le="1"}[1m]))')
    assert "matches le values" in le_problems('rate(x_bucket{le=~"1(\\\\.0)?"}[1m])')
    assert "matches le values" in le_problems('x_bucket{le != "+Inf"}')
    assert le_problems('label_replace(x, "b", "$1", "le", "(.*)")')
    assert le_problems("sum without (le) (x_bucket)")
    assert not le_problems("histogram_quantile(0.9, sum by (le, device) (rate(x_bucket[1m])))")


# ------------------------------------------------------------------------------ the ConfigMap

def helm_binary():
    out = subprocess.run([os.path.join(REPO, "tests", "cluster", "build.sh"), "--print-bin-dir"],
                         capture_output=True, text=True)
    helm = os.path.join(out.stdout.strip(), "helm")
    if out.returncode != 0 or not os.access(helm, os.X_OK):
        pytest.skip(f"SKIPPED LOUDLY: no helm binary at {helm!r} (tests/cluster/build.sh builds "
                    f"it): {out.stderr.strip()}")
    return helm


def helm_template(*args):
    yaml = pytest.importorskip("yaml", reason="SKIPPED LOUDLY: PyYAML is needed to read "
                                              "`helm template` output")
    out = subprocess.run([helm_binary(), "template", "rel", CHART, "--namespace", "rel-ns",
                          *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"helm template {args}: {out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def dashboard_configmaps(docs):
    return [d for d in docs if d["kind"] == "ConfigMap" and DATA_KEY in d.get("data", {})]


def test_chart_renders_dashboard_configmap():
    docs = helm_template("--set", "grafanaDashboard.enabled=true")
    cms = dashboard_configmaps(docs)
    assert len(cms) == 1, cms
    cm = cms[0]
    assert cm["metadata"]["namespace"] == "rel-ns"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    rendered = cm["data"][DATA_KEY]
    assert json.loads(rendered) == load_dashboard()
    with open(DASHBOARD_PATH) as f:
        assert rendered == f.read().rstrip("\n"), "the JSON must be carried verbatim"
    # kubectl apply (client side) copies the object into an annotation limited to 256 KiB.
    assert len(rendered.encode()) < 200 * 1024, len(rendered)


def test_chart_dashboard_labels_and_namespace_configurable():
    docs = helm_template("--set", "grafanaDashboard.enabled=true",
                         "--set", "grafanaDashboard.namespace=monitoring",
                         "--set", "grafanaDashboard.labels.grafana_dashboard=null",
                         "--set-string", "grafanaDashboard.labels.my-grafana=dashboards")
    (cm,) = dashboard_configmaps(docs)
    assert cm["metadata"]["namespace"] == "monitoring"
    labels = cm["metadata"]["labels"]
    assert labels["my-grafana"] == "dashboards" and "grafana_dashboard" not in labels, labels


def test_chart_renders_no_dashboard_by_default():
    docs = helm_template()
    assert docs, "the chart rendered nothing at all"
    assert dashboard_configmaps(docs) == []
    assert not [d for d in docs if d["kind"] == "ConfigMap"], [d["metadata"] for d in docs]


# -------------------------------------------------------- real agent, real Prometheus servers

class Stack:
    def __init__(self):
        self.servers = {}      # name -> PrometheusServer
        self.stores = {}       # name -> {"classic": bool, "native": bool}
        self.t_eval = {}       # name -> evaluation time of every query
        self.dev = None
        self.bucket_count = {}  # metric -> number of le values the agent exposes


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """One loop device backing a PV, one agent with --pv-labels on it, the servers scraping it;
    IO issued once."""
    s = Stack()
    with contextlib.ExitStack() as undo:
        cluster = undo.enter_context(running_cluster(tmp_path_factory.mktemp("dashboard-cluster")))
        ns, claim, pv = PVC_INFO["namespace"], PVC_INFO["persistentvolumeclaim"], PVC_INFO["persistentvolume"]
        cluster.kubectl("create", "namespace", ns)
        create_pv(cluster, pv, (ns, claim), storage_class=PVC_INFO["storageclass"], block=True)
        loop = LoopDevice(64 << 20)
        undo.callback(loop.detach)
        s.dev = loop.name
        root = str(tmp_path_factory.mktemp("kubelet"))
        kubelet = Node(root, str(tmp_path_factory.mktemp("scratch")))
        undo.callback(kubelet.cleanup)
        # A block-mode volume: the raw O_DIRECT IO below goes to the device, no filesystem on it.
        kubelet.block_link(kubelet.pod(), pv, loop.path)
        agent = Agent(["--device-include", f"^{loop.name}$", "--pv-labels", "--kubelet-root", root],
                      env=agent_env(cluster.env["KUBECONFIG"]))
        undo.callback(agent.stop)
        # The device's first IO makes its series; the servers start once they carry the claim.
        direct_io(loop.path, "write", 4096, 1)
        wait_for(lambda: any(n == "ebpf_bio_device_info" and l.get("device") == loop.name
                             and l.get("persistentvolumeclaim") == claim for n, l, _ in agent.samples()),
                 30, f"{loop.name} labelled with its claim {claim}")

        if not os.access(PROMETHEUS2, os.X_OK):
            pytest.fail(f"{PROMETHEUS2} is missing: run `make deps` (Debian's prometheus package)")
        p2 = PrometheusServer(PROMETHEUS2, [scrape_config(agent)], name="dash-prometheus2")
        undo.callback(p2.stop)
        s.servers["prometheus2"] = p2
        s.stores["prometheus2"] = {"classic": True, "native": False}

        if PROMETHEUS3:
            assert agent_serves_protobuf(agent).startswith("application/vnd.google.protobuf"), (
                "the agent must serve the protobuf exposition (native histograms)")
            p3 = PrometheusServer(PROMETHEUS3, [
                scrape_config(agent, scrape_native_histograms=True,
                              always_scrape_classic_histograms=True),
            ], name="dash-prometheus3")
            undo.callback(p3.stop)
            s.servers["prometheus3"] = p3
            s.stores["prometheus3"] = {"classic": True, "native": True}

        for p in s.servers.values():
            wait_target_up(p)

        issue_io(loop)
        for metric in ("ebpf_bio_req_latency", "ebpf_bio_req_size", "ebpf_bio_req_queue_latency"):
            s.bucket_count[metric] = len(agent_le(agent, metric))
        counts = agent_counts(agent, loop.name)
        assert counts.get("read", 0) > 0 and counts.get("write", 0) > 0, counts
        for name, p in s.servers.items():
            wait_counts_stored(p, loop.name, counts)
            if s.stores[name]["native"]:
                wait_counts_stored(p, loop.name, counts, native=True)
            # The agent looks PVs up on its own schedule: the info series may come a scrape later.
            p.wait_for(lambda: p.query(f'ebpf_bio_device_info{{device="{loop.name}"}}'), 30,
                       f"ebpf_bio_device_info of {loop.name} stored")
        for name, p in s.servers.items():
            s.t_eval[name] = evaluation_time(p, ["bio"])
        yield s


def evaluation_time(prom, jobs):
    """When every query on prom is evaluated: the time of its latest scrape of the agent, once
    that scrape and the latest one of every other job succeeded. A failed scrape (a timeout on a
    busy machine) writes staleness markers, and instant selectors evaluated after it return
    nothing; the IO just done is inside every [1m] window ending then."""
    def attempt():
        t = prom.scalar('timestamp(up{job="bio"})')
        if t is None:
            return None
        for job in jobs:
            doc = api(prom, "query", query=f'up{{job="{job}"}} == 1', time=f"{t:.3f}")
            if not doc["data"]["result"]:
                return None
        return t
    return prom.wait_for(attempt, 15, f"a successful scrape of every job {jobs}")


def server_of(stack, name):
    if name not in stack.servers:
        pytest.skip("SKIPPED LOUDLY: BIO_PROMETHEUS3 is not set; run tests/prometheus/run.sh, "
                    "which builds Prometheus 3.x and sets it")
    return stack.servers[name]


def variable_sets(stack):
    return {
        "all": dict.fromkeys(TEMPLATE_VARS, ".*"),
        # As Grafana formats a multi-value selection for a regex matcher.
        "selected": {"node": NODE, "device": stack.dev, "operation": "(read|write)"},
    }


def sample_values(result):
    """Float values of an instant-query result (native histograms give none)."""
    return [float(r["value"][1]) for r in result if "value" in r]


@pytest.mark.parametrize("tid", [tid for tid, _, _ in TARGETS])
@pytest.mark.parametrize("server", SERVERS)
def test_expression_runs(stack, server, tid):
    prom = server_of(stack, server)
    t_eval = stack.t_eval[server]
    _, panel, target = next(x for x in TARGETS if x[0] == tid)
    classic, native, info = forms(target["expr"])
    store = stack.stores[server]
    expect_data = ((classic and store["classic"]) or (native and store["native"])
                   or not (classic or native))

    for vname, values in variable_sets(stack).items():
        expr = substitute(target["expr"], values)
        what = f"{server} {panel['title']!r} {target['refId']} ({vname}): {expr}"

        doc = api(prom, "query", query=expr, time=f"{t_eval:.3f}")
        check_response(doc, what)
        assert doc["data"]["resultType"] == "vector", what
        result = doc["data"]["result"]
        range_result = None
        if not target.get("instant"):
            # As the panel runs it: a range query (here the minute up to the evaluation time).
            rdoc = api(prom, "query_range", query=expr, start=f"{t_eval - 60:.3f}",
                       end=f"{t_eval:.3f}", step="15")
            check_response(rdoc, what + " [range]")
            assert rdoc["data"]["resultType"] == "matrix", what
            range_result = rdoc["data"]["result"]

        if not expect_data:
            assert result == [] and not range_result, (
                f"{what}: expected no data on this server, got {result} {range_result}")
            continue
        assert result, f"{what}: empty result"
        assert range_result is None or range_result, f"{what}: empty range result"

        if vname == "selected":
            for r in result:
                m = r["metric"]
                assert m.get("device", stack.dev) == stack.dev, (what, m)
                assert m.get("node", NODE) == NODE, (what, m)
                assert m.get("operation", "read") in ("read", "write"), (what, m)
        if "histogram_quantile" in expr:
            vals = sample_values(result)
            assert vals and all(math.isfinite(v) and v > 0 for v in vals), f"{what}: {vals}"
        if panel["type"] == "heatmap":
            metric = re.search(rf"\b(ebpf_bio_req_{HISTOGRAMS})", expr).group(1)
            if target["format"] == "heatmap":
                # Only le is left after `by (le)`, and every bucket the agent exposes is there
                # whatever the server's spelling of le.
                assert all(set(r["metric"]) == {"le"} for r in result), what
                les = {float(r["metric"]["le"]) for r in result}
                assert len(result) == len(les) == stack.bucket_count[metric], (what, les)
                assert math.inf in les, (what, les)
            else:
                assert len(result) == 1 and "histogram" in result[0], (what, result)
        if info:
            # One row for the loop device, carrying the PVC labels of the agent's info series.
            assert len(result) == 1, (what, result)
            want = {"node": NODE, "device": stack.dev,
                    **{k: v for k, v in PVC_INFO.items() if k != "shared"}}
            assert result[0]["metric"] == want, (what, result[0]["metric"])


@pytest.mark.parametrize("server", SERVERS)
def test_variable_queries(stack, server):
    """The node/device/operation variables' label_values queries find the test's series."""
    prom = server_of(stack, server)
    t_eval = stack.t_eval[server]
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    want = {"node": {NODE}, "device": {stack.dev}, "operation": {"read", "write"}}
    values = dict.fromkeys(TEMPLATE_VARS, ".*")
    for name in TEMPLATE_VARS:
        m = re.fullmatch(r"label_values\((?:(.+),\s*)?(\w+)\)", variables[name]["definition"])
        assert m, variables[name]["definition"]
        selector, label = m.group(1), m.group(2)
        assert label == name
        params = {"start": f"{t_eval - 3600:.3f}", "end": f"{t_eval:.3f}"}
        if selector:
            params["match[]"] = substitute(selector, values)
        got = set(api(prom, f"label/{label}/values", **params)["data"])
        assert want[name] <= got, f"{server} ${name}: {sorted(got)}, expected {want[name]}"

