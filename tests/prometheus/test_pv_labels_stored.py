"""PersistentVolume labels as Prometheus stores them, scraped the way the operator's ServiceMonitor
scrapes: the target carries the agent pod's own `namespace` (the Prometheus Operator attaches it),
`honorLabels: true`, and the metric relabeling that drops that target namespace from device series
without a claim (operator/src/resources/servicemonitor.rs; operator/tests/e2e.sh checks the
operator writes exactly RELABEL below in the CRD's spelling).

One real API server (tests/cluster) holds a PV bound to a PVC; a temporary kubelet root holds that
PV as a mounted CSI volume on loop device A; loop device B backs nothing. A second Prometheus
scrapes the same agent with Prometheus' defaults, to show what the ServiceMonitor settings prevent
(and that these assertions can fail). The dashboard's per-PVC table runs on the stored data.
"""
import contextlib

import pytest

from biotest import cluster as kube_cluster
from biotest.agent import Agent
from biotest.blockdev import LoopDevice, direct_io
from biotest.dashboard import TEMPLATE_VARS, dashboard_targets, substitute
from biotest.kubelet import NODE, Node, create_pv, mkfs
from biotest.prometheus import prometheus_binary
from biotest.util import sh, wait_for

SERVERS = ["prometheus2", "prometheus3"]
TARGET_NAMESPACE = "monitoring"  # the agent pod's namespace, a target label under the operator
NS, CLAIM, PV, CLASS, HANDLE = "ns-stored", "claim-stored", "pv-stored", "fast-stored", "handle-stored"
RELABEL = {"source_labels": ["__name__", "persistentvolumeclaim"], "separator": ";",
           "regex": "ebpf_bio_(req_.+|device_info);", "target_label": "namespace",
           "replacement": "", "action": "replace"}
PV_LABELS = {"persistentvolume": PV, "persistentvolumeclaim": CLAIM, "namespace": NS}


def job(agent, name, **extra):
    return {"job_name": name, "scrape_interval": "1s", "scrape_timeout": "1s",
            "static_configs": [{"targets": [f"127.0.0.1:{agent.port}"],
                                "labels": {"namespace": TARGET_NAMESPACE}}], **extra}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Cluster, kubelet root with a PV on loop A, plain loop B, an agent with --pv-labels."""
    with contextlib.ExitStack() as undo:
        cluster = undo.enter_context(kube_cluster.running_cluster(tmp_path_factory.mktemp("stored-cluster")))
        cluster.kubectl("create", "namespace", NS)
        create_pv(cluster, PV, (NS, CLAIM), storage_class=CLASS, handle=HANDLE)

        a, b = LoopDevice(64 << 20), LoopDevice(64 << 20)
        undo.callback(a.detach)
        undo.callback(b.detach)
        mkfs(a.path)
        root = str(tmp_path_factory.mktemp("kubelet"))
        kubelet = Node(root, str(tmp_path_factory.mktemp("scratch")))
        undo.callback(kubelet.cleanup)
        mnt = kubelet.csi_pod_volume(kubelet.pod(), PV, dev=a.path, handle=HANDLE)

        agent = Agent(["--device-include", f"^({a.name}|{b.name})$", "--pv-labels", "--kubelet-root", root],
                           env=kube_cluster.agent_env(cluster.env["KUBECONFIG"]))
        undo.callback(agent.stop)
        # Both devices do IO before any Prometheus starts, so every series exists at the first scrape.
        sh("dd", "if=/dev/zero", f"of={mnt}/data", "bs=64k", "count=16", "oflag=direct", "status=none")
        direct_io(b.path, "write", 4096, 16)

        def labelled():
            rows = [s for s in agent.samples() if s[0] == "ebpf_bio_req_latency_count"]
            return any(labels.get("device") == a.name and labels.get("persistentvolumeclaim") == CLAIM
                       for _, labels, _ in rows)
        wait_for(labelled, 30, f"{a.name}'s series labelled with {CLAIM}")
        yield {"agent": agent, "a": a.name, "b": b.name, "mnt": mnt}


def series(prom, expr):
    return [r["metric"] for r in prom.query(expr)]


def stored(prom, expr, what):
    prom.wait_for(lambda: len(prom.query(expr)) > 0, 30, what)
    return series(prom, expr)


@pytest.mark.parametrize("server", SERVERS)
def test_labels_as_stored_with_the_servicemonitor_settings(stack, server, prometheus_factory):
    binary = prometheus_binary(server)
    ours = prometheus_factory(binary, [job(stack["agent"], "bio", honor_labels=True,
                                           metric_relabel_configs=[RELABEL])], name=f"pv-{server}")
    plain = prometheus_factory(binary, [job(stack["agent"], "bio-plain")], name=f"pv-plain-{server}")
    a, b = stack["a"], stack["b"]

    for m in stored(ours, f'ebpf_bio_req_latency_count{{device="{a}"}}', f"{a} stored"):
        assert {k: m.get(k) for k in PV_LABELS} == PV_LABELS, m
        assert "exported_namespace" not in m, m
    for m in stored(ours, f'ebpf_bio_req_size_count{{device="{b}"}}', f"{b} stored"):
        assert not set(PV_LABELS) & set(m), f"a device backing no PV carries no PV labels: {m}"
    info = stored(ours, "ebpf_bio_device_info", "device info stored")
    assert [(m["device"], m["namespace"], m["persistentvolumeclaim"], m["storageclass"], m["shared"])
            for m in info] == [(a, NS, CLAIM, CLASS, "false")], info
    # Series that are not per device keep the target's namespace.
    assert {m.get("namespace") for m in stored(ours, "ebpf_bio_attach_info", "attach info")} == {TARGET_NAMESPACE}

    # What Prometheus' defaults would store instead: the PVC's namespace renamed, and the agent's
    # namespace on every device, PV or not.
    for m in stored(plain, f'ebpf_bio_req_latency_count{{device="{a}"}}', f"{a} stored (plain)"):
        assert (m.get("namespace"), m.get("exported_namespace")) == (TARGET_NAMESPACE, NS), m
    for m in stored(plain, f'ebpf_bio_req_size_count{{device="{b}"}}', f"{b} stored (plain)"):
        assert m.get("namespace") == TARGET_NAMESPACE, m


@pytest.mark.parametrize("server", SERVERS)
def test_dashboard_per_pvc_table_on_real_labels(stack, server, prometheus_factory):
    """Every per-PVC table query of the dashboard finds loop A's claim, and only it."""
    binary = prometheus_binary(server)
    prom = prometheus_factory(binary, [job(stack["agent"], "bio", honor_labels=True,
                                           metric_relabel_configs=[RELABEL])], name=f"pvc-table-{server}")
    a = stack["a"]
    stored(prom, "ebpf_bio_device_info", "device info stored")
    # Two scrapes around new IO, so rate() over the table's range has an increase to show.
    prom.wait_for(lambda: len(prom.query(f'ebpf_bio_req_latency_count{{device="{a}"}}[1m]')) > 0
                  and len(prom.query(f'ebpf_bio_req_latency_count{{device="{a}"}}[1m]')[0]["values"]) >= 2,
                  30, "two scrapes stored")
    sh("dd", "if=/dev/zero", f"of={stack['mnt']}/more", "bs=64k", "count=16", "oflag=direct", "status=none")
    tables = [t for _, panel, t in dashboard_targets() if panel["type"] == "table"
              and "ebpf_bio_device_info" in t["expr"]]
    assert tables, "the dashboard has per-PVC table queries"
    values = dict.fromkeys(TEMPLATE_VARS, ".*")
    want = {"node": NODE, "device": a, **PV_LABELS, "storageclass": CLASS}
    for t in tables:
        expr = substitute(t["expr"], values)
        prom.wait_for(lambda: len(prom.query(expr)) > 0, 30, f"table query {t.get('refId')} answers")
        rows = series(prom, expr)
        assert rows == [want], (t["expr"], rows)
