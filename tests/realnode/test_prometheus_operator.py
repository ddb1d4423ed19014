"""Prometheus Operator scraping the agents for real, on the real kubelet (issue #10).

The Prometheus Operator (v0.85.0, built from its Go module by tests/cluster/prometheus-operator/
build.sh; images by tests/cluster/images/build-prometheus.sh) runs as a Deployment in namespace
`monitoring`, with its CRDs applied server-side from the module's own files and upstream's example
RBAC. Two `Prometheus` resources run Prometheus 3 StatefulSet pods on the real node:

  - `classic`: the operator's defaults (text exposition, classic histograms only), selecting
    every ServiceMonitor (`serviceMonitorSelector: {}`, `serviceMonitorNamespaceSelector: {}`);
  - `native`: native histograms on, selecting ServiceMonitors labelled `release: prometheus`
    (the BioMonitor's `spec.serviceMonitor.labels`, as a kube-prometheus-stack user would). The
    operator v0.85 has no `scrapeNativeHistograms` field, and Prometheus 3.16 ignores the
    `native-histograms` feature flag, so: `scrapeProtocols` with `PrometheusProto` first, a default
    scrape class relabeling `__scrape_native_histograms__` to "true" (Prometheus >= 3.13) and
    `scrapeClassicHistograms` (always_scrape_classic_histograms) true, later switched to false.

Both use ServiceAccount `monitoring/prometheus` with upstream's discovery ClusterRole minus its
`/metrics` non-resource rule (that rule is exactly what the chart's metrics-reader role grants; it
is withheld so the secured-scrape test can show 403 without the binding).

The module runs after test_real_node.py (conftest MODULE_ORDER) and also alone
(`tests/realnode/run.sh -k prometheus_operator`): it installs the chart with the README's line if
the release is missing, and makes its own loop device, local PV and PVC. It deletes its
BioMonitors (agents gone), the writer pod, PVC, PV and namespace, and the metrics-reader binding
at the end; the Prometheus Operator and Prometheus stay until down.sh. Timings go to the
measurements file through biotest.realnode.record (docs/prometheus-operator.md), never into asserts.
"""
import calendar
import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.parse

import pytest
import yaml

from biotest import dashboard as dash
from biotest import realnode as rn
from biotest.blockdev import read_stat
from biotest.realnode import (AGENTS_NS, CLUSTER, NODE, OPERATOR_NS, apply_biomonitor,
                              delete_biomonitor_and_wait_clean, make_local_pv, readme_quickstart, ready_agent, record,
                              wait_for)

ARCHIVES = [a for a in os.environ.get("BIO_PROM_ARCHIVES", "").split(":") if a]
OPERATOR_DIR = os.environ.get("BIO_PROM_OPERATOR_DIR", "")

MON_NS = "monitoring"
PROM_SA = "prometheus"
DISCOVERY_ROLE = "prometheus-discovery"
SELECT_LABELS = {"release": "prometheus"}  # what the `native` Prometheus selects ServiceMonitors by
PVC_NS, PVC, PV = "webshop", "orders", "orders-pv"
SCRAPE_INTERVAL_S = 5
MONITOR = "prom"          # plain HTTP BioMonitor
SECURE_MONITOR = "secure"  # TLS + auth: kubernetes
RELEASE = "bio-exporter"
CHART = "charts/bio-exporter"
M = "prom_op_"  # prefix of this module's measurement keys


# ------------------------------------------------------------------------------ helpers --

def versions():
    out = {}
    with open(os.path.join(OPERATOR_DIR, "versions.env")) as f:
        for line in f:
            k, _, v = line.strip().partition("=")
            if k:
                out[k] = v
    return out


def diagnostics(c):
    """What a failed wait needs: pods, their description, events, the operators' and Prometheus' logs."""
    out = []

    def run(*args):
        r = c.run(*args, check=False, timeout=60)
        out.append(f"$ {' '.join(args)}\n{(r.stdout + r.stderr)[-4000:]}")

    run("kubectl", "get", "pods", "-A", "-o", "wide")
    run("kubectl", "get", "prometheus,servicemonitors,biomonitors", "-A")
    run("kubectl", "describe", "pods", "-n", MON_NS)
    run("kubectl", "get", "events", "-n", MON_NS, "--sort-by=.lastTimestamp")
    run("kubectl", "logs", "deploy/prometheus-operator", "-n", MON_NS, "--tail=60")
    for p in c.get("pods", "-n", MON_NS)["items"]:
        name = p["metadata"]["name"]
        if name.startswith("prometheus-") and not name.startswith("prometheus-operator"):
            for ctr in ("prometheus", "config-reloader"):
                run("kubectl", "logs", name, "-n", MON_NS, "-c", ctr, "--tail=30")
    run("kubectl", "get", "biomonitors", "-n", AGENTS_NS, "-o", "yaml")
    for d in c.get("deployments", "-n", OPERATOR_NS)["items"]:
        run("kubectl", "logs", f"deploy/{d['metadata']['name']}", "-n", OPERATOR_NS, "--tail=30")
    return "\n".join(out)


def wait(c, predicate, timeout, what, interval=1.0):
    """wait_for, and on a timeout the cluster's state in the message."""
    try:
        return wait_for(predicate, timeout, what, interval)
    except AssertionError as e:
        try:
            more = diagnostics(c)
        except Exception as d:  # noqa: BLE001  the API itself may be what is broken
            more = f"(diagnostics failed: {d})"
        c.keep_logs = True  # conftest then keeps <workdir>/logs (kubelet, containerd, control plane)
        raise AssertionError(f"{e}\n------ diagnostics (logs kept in {c.workdir}/logs) ------\n{more}") from None


class Prom:
    """A Prometheus pod of the operator, queried through its HTTP API by pod IP from the cluster's
    network namespace. `_get` is what biotest.dashboard.api() calls."""

    def __init__(self, c, name):
        self.c, self.name, self.pod = c, name, f"prometheus-{name}-0"
        self._ip = None

    @property
    def ip(self):
        if self._ip is None:
            self._ip = self.c.get("pod", self.pod, "-n", MON_NS)["status"]["podIP"]
        return self._ip

    def _get(self, path, params=None):
        url = f"http://{self.ip}:9090{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params, doseq=True)
        code, body = self.c.http(url)
        if code == 0:
            self._ip = None  # restarted pod: look the IP up again
        return code, body

    def api(self, path, **params):
        return dash.api(self, path, **params)

    def query(self, expr, t=None):
        params = {"query": expr}
        if t is not None:
            params["time"] = f"{t:.3f}"
        return self.api("query", **params)["data"]["result"]

    def values(self, expr, t=None):
        return [float(r["value"][1]) for r in self.query(expr, t) if "value" in r]

    def targets(self, pool):
        return [t for t in self.api("targets", state="active")["data"]["activeTargets"] if t["scrapePool"] == pool]

    def job_config(self, pool):
        cfg = yaml.safe_load(self.api("status/config")["data"]["yaml"])
        jobs = [j for j in cfg.get("scrape_configs", []) if j["job_name"] == pool]
        return (jobs[0] if jobs else None), cfg


def pool_of(monitor):
    """The scrape pool (job_name) the operator generates for a BioMonitor's ServiceMonitor."""
    return f"serviceMonitor/{AGENTS_NS}/{monitor}-agent/0"


def biomonitor(name, extra_spec=None):
    spec = {"serviceMonitor": {"labels": dict(SELECT_LABELS)}, **(extra_spec or {})}
    return yaml.safe_dump({"apiVersion": "bioexporter.io/v1alpha1", "kind": "BioMonitor",
                           "metadata": {"name": name, "namespace": AGENTS_NS}, "spec": spec})


def helm_set_metrics_readers(c, accounts):
    """docs/operator.md's command: bind the chart's metrics-reader ClusterRole to `accounts`."""
    c.run("helm", "upgrade", RELEASE, CHART, "-n", OPERATOR_NS, "--reuse-values",
          "--set-json", "metricsReader.serviceAccounts=" + json.dumps(accounts), timeout=300)


def log_times(c, pod, ns):
    """{line: unix time} from the container runtime's timestamps (busybox has no `date`)."""
    out = c.kubectl("logs", pod, "-n", ns, "--timestamps", check=False)
    times = {}
    for line in out.splitlines():
        stamp, _, text = line.partition(" ")
        m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?Z$", stamp)
        if m:
            t = calendar.timegm(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S"))
            times[text.strip()] = t + float(m.group(2) or 0)
    return times


def scrape_time(prom, job, before):
    """The time of the latest successful scrape of `job` at or before `before`: queries evaluated
    then see that scrape (a failed one would have written staleness markers)."""
    t = before
    for _ in range(12):
        ts = prom.values(f'timestamp(up{{job="{job}"}})', t)
        assert ts, f"{prom.name}: no scrape of {job} in the 5 minutes before {t}"
        if prom.values(f'up{{job="{job}"}}', ts[0]) == [1.0]:
            return ts[0]
        t = ts[0] - 0.001
    raise AssertionError(f"{prom.name}: the last 12 scrapes of {job} before {before} failed")


def native_buckets_cumulative(hist, le):
    """Observations <= le in a native histogram as the query API renders it ({count, buckets:
    [[boundary rule, lower, upper, count], ...]}), the zero bucket included."""
    return sum(float(b[3]) for b in hist.get("buckets", []) if float(b[2]) <= le)


class Stack:
    pass


# ------------------------------------------------------------------------------ fixture --

@pytest.fixture(scope="module")
def stack(cluster):
    c = cluster
    assert ARCHIVES and OPERATOR_DIR, (
        "BIO_PROM_ARCHIVES / BIO_PROM_OPERATOR_DIR are empty: run through tests/realnode/run.sh, which "
        "builds Prometheus Operator (tests/cluster/prometheus-operator/build.sh) and its images "
        "(tests/cluster/images/build-prometheus.sh)")
    # Run alone, test_real_node recorded nothing this session: keep its last figures in the file.
    if not rn.measured and os.path.exists(rn.MEASUREMENTS):
        with open(rn.MEASUREMENTS) as f:
            rn.measured.update(json.load(f))
    s = Stack()
    s.c = c
    s.versions = versions()
    s.monitors = []
    s.bound = False
    s.loop = None
    try:
        _install_chart_if_missing(c)
        # Agents of an earlier module's BioMonitors would conflict with ours on the one node.
        for bm in c.get("biomonitors", "-n", AGENTS_NS)["items"]:
            delete_biomonitor_and_wait_clean(c, bm["metadata"]["name"])

        t0 = time.monotonic()
        subprocess.run([os.path.join(CLUSTER, "load-images.sh"), c.workdir, *ARCHIVES], check=True,
                       capture_output=True, timeout=600)
        record(M + "load_images_s", round(time.monotonic() - t0, 1))
        _start_prometheus_operator(c, s)
        _start_prometheuses(c, s)
        _local_pv(c, s)
        yield s
    finally:
        _cleanup(c, s)


def _install_chart_if_missing(c):
    if c.run("helm", "status", RELEASE, "-n", OPERATOR_NS, check=False).returncode == 0:
        return
    helm, _ = readme_quickstart()
    c.run(*helm, timeout=300)
    for d in c.get("deployments", "-n", OPERATOR_NS)["items"]:
        c.run("kubectl", "rollout", "status", f"deployment/{d['metadata']['name']}", "-n", OPERATOR_NS,
              "--timeout=180s", timeout=200)


def _start_prometheus_operator(c, s):
    t0 = time.monotonic()
    crds = os.path.join(OPERATOR_DIR, "crds")
    # As a user would (the prometheuses CRD is too large for client-side apply's annotation).
    c.run("kubectl", "apply", "--server-side", "-f", crds, timeout=600)
    c.run("kubectl", "wait", "--for=condition=Established", "-f", crds, "--timeout=120s", timeout=180)
    record(M + "crds_apply_s", round(time.monotonic() - t0, 1))

    c.kubectl("create", "namespace", MON_NS, check=False)
    rbac = os.path.join(OPERATOR_DIR, "rbac", "prometheus-operator")
    docs = []
    for f in sorted(os.listdir(rbac)):
        for d in yaml.safe_load_all(open(os.path.join(rbac, f))):
            if not d or d["kind"] in ("Service", "ServiceMonitor"):
                continue  # the operator's own metrics: not part of this test
            if d["kind"] == "ClusterRoleBinding":
                for sub in d["subjects"]:
                    sub["namespace"] = MON_NS
            if d["metadata"].get("namespace"):
                d["metadata"]["namespace"] = MON_NS
            if d["kind"] == "Deployment":
                ctr = d["spec"]["template"]["spec"]["containers"][0]
                v = s.versions["PROM_OP_VERSION"]
                ctr["image"] = f"localhost/bio-test/prometheus-operator:{v}"
                ctr["imagePullPolicy"] = "IfNotPresent"
                # No kubelet Service (kube-system/kubelet) to manage here: nothing scrapes kubelets.
                args = [a for a in ctr["args"] if not a.startswith("--kubelet-")]
                args = [f"--prometheus-config-reloader=localhost/bio-test/prometheus-config-reloader:{v}"
                        if a.startswith("--prometheus-config-reloader=") else a for a in args]
                args.append("--prometheus-default-base-image=localhost/bio-test/prometheus")
                ctr["args"] = args
            docs.append(d)
    c.run("kubectl", "apply", "--server-side", "-f", "-", stdin=yaml.safe_dump_all(docs), timeout=120)

    def ready():
        pods = [p for p in c.get("pods", "-n", MON_NS, "-l", "app.kubernetes.io/name=prometheus-operator")["items"]
                if not p["metadata"].get("deletionTimestamp")]
        return pods if pods and all(p["status"].get("phase") == "Running" and p["spec"].get("nodeName") == NODE
                                    and all(cs.get("ready") for cs in p["status"].get("containerStatuses", []))
                                    for p in pods) else None
    s.operator_pod = wait(c, ready, 180, "the Prometheus Operator pod Running and ready on the real node")[0]
    record(M + "operator_ready_s", round(time.monotonic() - t0, 1))


def prometheus_cr(name, s, selector, extra):
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "Prometheus",
            "metadata": {"name": name, "namespace": MON_NS},
            "spec": {"version": s.versions["PROMETHEUS_VERSION"], "imagePullPolicy": "IfNotPresent",
                     "replicas": 1, "serviceAccountName": PROM_SA,
                     "serviceMonitorSelector": selector, "serviceMonitorNamespaceSelector": {},
                     "serviceDiscoveryRole": "EndpointSlice",
                     "scrapeInterval": f"{SCRAPE_INTERVAL_S}s", **extra}}


NATIVE_EXTRA = {
    # Negotiate protobuf first: the only exposition carrying native histograms.
    "scrapeProtocols": ["PrometheusProto", "OpenMetricsText1.0.0", "OpenMetricsText0.0.1",
                        "PrometheusText1.0.0", "PrometheusText0.0.4"],
    # scrape_native_histograms per target (Prometheus >= 3.13), for every ServiceMonitor.
    "scrapeClasses": [{"name": "native-histograms", "default": True, "relabelings": [
        {"action": "replace", "targetLabel": "__scrape_native_histograms__", "replacement": "true"}]}],
    # Keep the classic buckets too (the dashboard's classic panels, the comparison below).
    "scrapeClassicHistograms": True,
}


def _start_prometheuses(c, s):
    t0 = time.monotonic()
    rbac = os.path.join(OPERATOR_DIR, "rbac", "prometheus")
    docs = []
    for f in ("prometheus-service-account.yaml", "prometheus-cluster-role.yaml", "prometheus-cluster-role-binding.yaml"):
        d = yaml.safe_load(open(os.path.join(rbac, f)))
        if d["kind"] == "ServiceAccount":
            d["metadata"].update(name=PROM_SA, namespace=MON_NS)
        elif d["kind"] == "ClusterRole":
            d["metadata"]["name"] = DISCOVERY_ROLE
            # Discovery only: upstream's example also grants GET /metrics, which is what the
            # chart's metrics-reader ClusterRole is for (tested with and without below).
            d["rules"] = [r for r in d["rules"] if "nonResourceURLs" not in r]
        else:
            d["metadata"]["name"] = DISCOVERY_ROLE
            d["roleRef"]["name"] = DISCOVERY_ROLE
            d["subjects"] = [{"kind": "ServiceAccount", "name": PROM_SA, "namespace": MON_NS}]
        docs.append(d)
    docs.append(prometheus_cr("classic", s, {}, {}))
    docs.append(prometheus_cr("native", s, {"matchLabels": dict(SELECT_LABELS)}, NATIVE_EXTRA))
    c.run("kubectl", "apply", "--server-side", "-f", "-", stdin=yaml.safe_dump_all(docs), timeout=120)
    s.proms = {"classic": Prom(c, "classic"), "native": Prom(c, "native")}

    def ready():
        for p in s.proms.values():
            pod = c.get("pods", "-n", MON_NS, "-l", f"prometheus={p.name}")["items"]
            if len(pod) != 1 or pod[0]["spec"].get("nodeName") != NODE or pod[0]["status"].get("phase") != "Running":
                return None
            if not all(cs.get("ready") for cs in pod[0]["status"].get("containerStatuses", [])):
                return None
            cr = c.get("prometheus", p.name, "-n", MON_NS)
            avail = [x for x in cr.get("status", {}).get("conditions", []) if x["type"] == "Available"]
            if not avail or avail[0]["status"] != "True":
                return None
        return True
    wait(c, ready, 300, "both Prometheus StatefulSet pods Running/Ready on the real node and their CRs Available")
    for p in s.proms.values():
        wait(c, lambda p=p: p._get("/-/ready")[0] == 200, 60, f"{p.name} /-/ready")
    record(M + "prometheus_ready_s", round(time.monotonic() - t0, 1))


def _local_pv(c, s):
    s.loop = make_local_pv(c, PV, PVC, PVC_NS)



def _cleanup(c, s):
    problems = []

    def step(what, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001  every step is tried; the first failure is reported
            problems.append(f"{what}: {e}")

    for name in (SECURE_MONITOR, MONITOR):
        if c.run("kubectl", "get", "biomonitor", name, "-n", AGENTS_NS, check=False).returncode == 0:
            step(f"delete BioMonitor {name}", lambda name=name: delete_biomonitor_and_wait_clean(c, name))
    if s.bound:
        step("remove the metrics-reader binding", lambda: helm_set_metrics_readers(c, []))
    step("delete the writer, PVC, PV, namespace", lambda: c.run(
        "kubectl", "delete", "namespace", PVC_NS, "--ignore-not-found", "--wait=true", "--timeout=120s", timeout=180))
    step("delete the PV", lambda: c.kubectl("delete", "pv", PV, "--ignore-not-found", "--wait=true"))
    if s.loop:
        # The loop device stays attached (mounted in the cluster's mount namespace) until down.sh
        # detaches it from <workdir>/loops; its backing file can go now.
        step("unlink the loop's backing file", lambda: os.unlink(s.loop.backing))
    if problems:
        sys.stderr.write("test_prometheus_operator cleanup problems:\n" + "\n".join(problems) + "\n")


# -------------------------------------------------------------------------------- tests --

def test_operator_and_prometheus_run_on_the_real_node(stack):
    s, c = stack, stack.c
    pod = c.get("pods", "-n", MON_NS, "-l", "app.kubernetes.io/name=prometheus-operator")["items"][0]
    assert pod["spec"]["containers"][0]["image"].startswith("localhost/bio-test/prometheus-operator:")
    for p in s.proms.values():
        sts = c.get("statefulset", f"prometheus-{p.name}", "-n", MON_NS)
        ctrs = {x["name"]: x for x in sts["spec"]["template"]["spec"]["containers"]}
        want = f"localhost/bio-test/prometheus:{s.versions['PROMETHEUS_VERSION']}"
        assert ctrs["prometheus"]["image"] == want, ctrs["prometheus"]["image"]
        assert ctrs["config-reloader"]["image"].startswith("localhost/bio-test/prometheus-config-reloader:")
        info = p.api("status/buildinfo")["data"]
        assert "v" + info["version"] == s.versions["PROMETHEUS_VERSION"], info
        flags = p.api("status/flags")["data"]
        assert flags["config.file"] == "/etc/prometheus/config_out/prometheus.env.yaml", flags["config.file"]


def test_biomonitor_target_up_with_the_servicemonitors_labels(stack):
    """A BioMonitor with serviceMonitor.labels → its ServiceMonitor is picked up by both
    Prometheuses (selector {} and matchLabels release=prometheus); the target is up with the
    labels, scheme, honorLabels and metric relabeling the ServiceMonitor asks for."""
    s, c = stack, stack.c
    t0 = time.monotonic()
    apply_biomonitor(c, biomonitor(MONITOR))
    s.monitors.append(MONITOR)
    agent = ready_agent(c, MONITOR)
    record(M + "apply_to_agent_ready_s", round(time.monotonic() - t0, 1))
    pending = dict(s.proms)

    def first_samples():
        for name, p in list(pending.items()):
            if p.query(f'ebpf_bio_attach_info{{job="{MONITOR}-agent",node="{NODE}"}}'):
                record(M + f"apply_to_first_sample_{name}_s", round(time.monotonic() - t0, 1))
                del pending[name]
        return not pending
    wait(c, first_samples, 300, f"a first sample of the agent in both Prometheus pods (missing: {list(pending)})", 0.5)

    sm = c.get("servicemonitor", f"{MONITOR}-agent", "-n", AGENTS_NS)
    assert {k: sm["metadata"]["labels"].get(k) for k in SELECT_LABELS} == SELECT_LABELS, sm["metadata"]["labels"]
    ep = sm["spec"]["endpoints"][0]
    ip = agent["status"]["podIP"]
    for p in s.proms.values():
        (t,) = p.targets(pool_of(MONITOR))
        assert t["health"] == "up", t
        assert t["scrapeUrl"] == f"http://{ip}:9435/metrics", t
        want = {"endpoint": ep["port"], "namespace": AGENTS_NS, "service": f"{MONITOR}-agent",
                "job": f"{MONITOR}-agent", "pod": agent["metadata"]["name"], "instance": f"{ip}:9435"}
        got = {k: t["labels"].get(k) for k in want}
        assert got == want, f"{p.name}: target labels {t['labels']}"
        assert t["discoveredLabels"].get("__meta_kubernetes_endpointslice_port_name") == "metrics", t

        job, cfg = p.job_config(pool_of(MONITOR))
        assert job, f"{p.name}: no scrape config {pool_of(MONITOR)}"
        if p.name == "native":
            assert cfg["global"]["scrape_protocols"][0] == "PrometheusProto", cfg["global"]
            assert cfg["global"].get("always_scrape_classic_histograms") is True, cfg["global"]
            assert any(r.get("target_label") == "__scrape_native_histograms__" for r in job["relabel_configs"]), \
                job["relabel_configs"]
        assert job["honor_labels"] is True, job
        assert job["scheme"] == "http" and job["metrics_path"] == "/metrics", job
        assert job["kubernetes_sd_configs"][0]["role"] == "endpointslice", job["kubernetes_sd_configs"]
        assert job["kubernetes_sd_configs"][0]["namespaces"]["names"] == [AGENTS_NS], job["kubernetes_sd_configs"]
        ours = [r for r in job.get("metric_relabel_configs", [])
                if r.get("source_labels") == ["__name__", "persistentvolumeclaim"] and r.get("target_label") == "namespace"]
        assert len(ours) == 1 and ours[0].get("action", "replace") == "replace", job.get("metric_relabel_configs")

        # honorLabels: the agent's own node label; the target's namespace only where the
        # relabeling leaves it (not a device series).
        (attach,) = p.query(f'ebpf_bio_attach_info{{job="{MONITOR}-agent"}}')
        assert attach["metric"]["node"] == NODE and attach["metric"]["namespace"] == AGENTS_NS, attach
        assert not p.query('count({__name__=~"ebpf_bio_.+", exported_namespace!=""} or '
                           '{__name__=~"ebpf_bio_.+", exported_node!=""})'), f"{p.name}: exported_* labels stored"
    s.agent = agent


def test_pvc_p99_carries_the_pvcs_namespace(stack):
    """A real pod writes to the PVC for a minute; the p99 per (PVC, namespace) exists with the
    PVC's namespace in both Prometheuses; device series without a PVC have no namespace."""
    s, c = stack, stack.c
    assert getattr(s, "agent", None), "needs the BioMonitor of the previous test"
    script = ("echo start; i=0; while [ $i -lt 60 ]; do "
              "dd if=/dev/zero of=/data/blob bs=64k count=16 oflag=direct conv=notrunc 2>/dev/null; "
              "dd if=/data/blob of=/dev/null bs=4k count=64 iflag=direct 2>/dev/null; "
              "i=$((i+1)); sleep 1; done; sync; echo done; sleep 3600")
    c.kubectl("apply", "-f", "-", stdin=yaml.safe_dump({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "writer", "namespace": PVC_NS},
        "spec": {"nodeName": NODE, "restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
                 "containers": [{"name": "writer", "image": "localhost/bio-test/busybox:1", "imagePullPolicy": "Never",
                                 "command": ["sh", "-c", script],
                                 "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                 "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": PVC}}]}}))
    wait(c, lambda: "start" in log_times(c, "writer", PVC_NS), 120, "the writer pod to start writing")

    p99 = ("histogram_quantile(0.99, sum by (le, persistentvolumeclaim, namespace) "
           "(rate(ebpf_bio_req_latency_bucket[1m])))")
    found = {}

    def p99_for_the_pvc():
        for name, p in s.proms.items():
            rows = [r for r in p.query(p99) if r["metric"].get("persistentvolumeclaim") == PVC]
            vals = [float(r["value"][1]) for r in rows]
            if len(rows) == 1 and math.isfinite(vals[0]) and vals[0] > 0:
                found[name] = rows[0]
        return len(found) == len(s.proms)
    wait(c, p99_for_the_pvc, 90, f"a finite p99 for PVC {PVC} in both Prometheus pods (have {list(found)})")
    for name, row in found.items():
        assert row["metric"] == {"persistentvolumeclaim": PVC, "namespace": PVC_NS}, (name, row)
        record(M + f"pvc_p99_us_{name}", round(float(row["value"][1]), 1))

    def finished():
        t = log_times(c, "writer", PVC_NS)
        return t if "done" in t else None
    times = wait(c, finished, 180, "the writer to finish its minute of IO")
    s.io_window = (times["start"], times["done"])

    dev = s.loop.name
    for name, p in s.proms.items():
        now = [r["metric"] for r in p.query(f'ebpf_bio_req_latency_count{{device="{dev}"}}', times["done"])]
        assert now and all(x.get("persistentvolumeclaim") == PVC and x.get("namespace") == PVC_NS
                           and x.get("persistentvolume") == PV for x in now), (name, now)
        # Before the claim was mounted (mkfs) the same device had series without PV labels: they
        # end when the labels change, and carry no namespace at all (not the agent's).
        series = p.api("series", **{"match[]": f'ebpf_bio_req_latency_count{{device="{dev}"}}',
                                    "start": f"{times['start'] - 600:.0f}"})["data"]
        assert all("namespace" not in x for x in series if "persistentvolumeclaim" not in x), (name, series)
        # The metric relabeling: no device series without a claim keeps the target's namespace.
        leaked = p.query('count by (device) (ebpf_bio_req_latency_count{persistentvolumeclaim="", namespace!=""})')
        assert not leaked, f"{name}: device series without a PVC carry a namespace: {leaked}"
    unclaimed = s.proms["classic"].query('count(ebpf_bio_req_latency_count{persistentvolumeclaim=""})')
    record(M + "unclaimed_device_series", int(float(unclaimed[0]["value"][1])) if unclaimed else 0)


def test_dashboard_promql_returns_data(stack):
    """Every expression of the chart's dashboard (extracted and substituted by biotest.dashboard,
    as in tests/prometheus/test_dashboard.py), instant and range, at a scrape inside the writer's minute: data where
    the Prometheus stores what it reads (native-only expressions: empty on `classic`)."""
    s = stack
    assert getattr(s, "io_window", None), "needs the writer of the previous test"
    start, done = s.io_window
    job = f"{MONITOR}-agent"
    s.t_eval = {}
    failures = []
    for name, p in s.proms.items():
        t_eval = scrape_time(p, job, done - 1)
        assert t_eval - start >= 30, f"{name}: the scrape at {t_eval} is too early in the IO window {s.io_window}"
        s.t_eval[name] = t_eval
        stores_native = name == "native"
        for tid, panel, target in dash.dashboard_targets():
            classic, native, _info = dash.forms(target["expr"])
            expect = classic or stores_native or not native
            for vname, values in {"all": dict.fromkeys(dash.TEMPLATE_VARS, ".*"),
                                  "selected": {"node": NODE, "device": s.loop.name, "operation": "(read|write)"}}.items():
                expr = dash.substitute(target["expr"], values)
                what = f"{name} {panel['title']!r} {target['refId']} ({vname}): {expr}"
                try:
                    doc = p.api("query", query=expr, time=f"{t_eval:.3f}")
                    dash.check_response(doc, what)
                    result = doc["data"]["result"]
                    rng = None
                    if not target.get("instant"):
                        rdoc = p.api("query_range", query=expr, start=f"{t_eval - 60:.3f}", end=f"{t_eval:.3f}", step="15")
                        dash.check_response(rdoc, what + " [range]")
                        rng = rdoc["data"]["result"]
                    if not expect:
                        assert not result and not rng, f"{what}: expected no data here, got {result}"
                        continue
                    assert result, f"{what}: empty result"
                    assert rng is None or rng, f"{what}: empty range result"
                    vals = [float(r["value"][1]) for r in result if "value" in r]
                    pvc_table = panel["type"] == "table" and "persistentvolumeclaim" in target["expr"]
                    if pvc_table:
                        # The per-PVC table: one row for our claim (other PV devices may be idle).
                        rows = [r for r in result if r["metric"].get("persistentvolumeclaim") == PVC]
                        assert len(rows) == 1, f"{what}: no row for {PVC_NS}/{PVC}: {result}"
                        m = rows[0]["metric"]
                        assert (m.get("namespace"), m.get("persistentvolume"), m.get("device")) == \
                            (PVC_NS, PV, s.loop.name), f"{what}: {m}"
                        vals = [float(rows[0]["value"][1])]
                    if "histogram_quantile" in expr:
                        finite = [v for v in vals if math.isfinite(v) and v > 0]
                        # Over every device some are idle (NaN); our device and our claim's row are not.
                        assert finite if vname == "all" and not pvc_table else (vals and len(finite) == len(vals)), \
                            f"{what}: {vals}"
                    if vname == "selected":
                        for r in result:
                            m = r["metric"]
                            assert m.get("node", NODE) == NODE and m.get("operation", "read") in ("read", "write"), (what, m)
                            if panel["type"] != "table":
                                assert m.get("device", s.loop.name) == s.loop.name, (what, m)
                except AssertionError as e:
                    failures.append(str(e)[:600])
    assert not failures, f"{len(failures)} dashboard queries failed:\n" + "\n".join(failures)

    # The variables' label_values queries find the node, the device and both operations.
    variables = {v["name"]: v for v in dash.load_dashboard()["templating"]["list"]}
    for name, p in s.proms.items():
        for var, want in {"node": {NODE}, "device": {s.loop.name}, "operation": {"read", "write"}}.items():
            m = re.fullmatch(r"label_values\((?:(.+),\s*)?(\w+)\)", variables[var]["definition"])
            assert m, variables[var]["definition"]
            params = {"start": f"{start - 60:.0f}", "end": f"{s.t_eval[name]:.3f}"}
            if m.group(1):
                params["match[]"] = dash.substitute(m.group(1), dict.fromkeys(dash.TEMPLATE_VARS, ".*"))
            got = set(p.api(f"label/{m.group(2)}/values", **params)["data"])
            assert want <= got, f"{name} ${var}: {sorted(got)}"


def test_native_histograms_stored_and_agree_with_classic(stack):
    """`native` stores native histograms (the query returns `histogram`) from the same scrape as
    the classic series, bucket for bucket; `classic` stores none; at rest both count the same."""
    s, c = stack, stack.c
    assert getattr(s, "t_eval", None), "needs the previous tests' IO and evaluation times"
    dev = s.loop.name
    native, classic = s.proms["native"], s.proms["classic"]
    t = s.t_eval["native"]
    compared = 0
    for metric in ("ebpf_bio_req_latency", "ebpf_bio_req_size"):
        for op in ("read", "write"):
            # The claim's series (the device's pre-claim series ended within the 2 minutes below).
            sel = f'{{device="{dev}",operation="{op}",persistentvolumeclaim="{PVC}"}}'
            nat = native.query(metric + sel, t)
            assert len(nat) == 1 and "histogram" in nat[0] and "value" not in nat[0], f"{metric}{sel}: {nat}"
            hist = nat[0]["histogram"][1]
            assert not classic.query(metric + sel, s.t_eval["classic"]), f"classic stores a native {metric}{sel}"
            buckets = native.query(f"{metric}_bucket{sel}", t)
            assert buckets, f"{metric}_bucket{sel}: no classic buckets next to the native histogram"
            for b in buckets:
                le, want = float(b["metric"]["le"]), float(b["value"][1])
                got = float(hist["count"]) if math.isinf(le) else native_buckets_cumulative(hist, le)
                assert got == want, f"{metric}{sel} le={b['metric']['le']}: native {got}, classic {want} ({hist})"
                compared += 1
            (count,) = native.values(f"{metric}_count{sel}", t)
            (hsum,) = native.values(f"{metric}_sum{sel}", t)
            assert float(hist["count"]) == count and math.isclose(float(hist["sum"]), hsum, rel_tol=1e-12), (hist, count, hsum)
            # Over the same range: increase of the native count == increase of the classic count.
            (n_inc,) = native.values(f"histogram_count(increase({metric}{sel}[2m]))", t)
            (c_inc,) = native.values(f"increase({metric}_count{sel}[2m])", t)
            assert math.isclose(n_inc, c_inc, rel_tol=1e-9), f"{metric}{sel}: native {n_inc}, classic {c_inc}"
            assert n_inc > 0, f"{metric}{sel}: no IO counted in the 2 minutes before {t}"
    record(M + "native_vs_classic_buckets_compared", compared)

    # At rest, the two Prometheus pods (separate scrapes, text vs protobuf) hold the same counts.
    def idle():
        s1 = read_stat(dev)
        time.sleep(3 * SCRAPE_INTERVAL_S)
        return s1 if read_stat(dev) == s1 else None
    before = wait(c, idle, 120, f"{dev} idle for {3 * SCRAPE_INTERVAL_S} s")
    for op in ("read", "write"):
        sel = f'{{device="{dev}",operation="{op}",persistentvolumeclaim="{PVC}"}}'
        (cc,) = classic.values(f"ebpf_bio_req_latency_count{sel}")
        (nc,) = native.values(f"histogram_count(ebpf_bio_req_latency{sel})")
        assert cc == nc and cc > 0, f"{op}: classic Prometheus {cc}, native Prometheus {nc}"
    assert read_stat(dev) == before, f"{dev} was not idle during the comparison"


def _scrape_cost(p, job):
    dur = p.values(f'avg_over_time(scrape_duration_seconds{{job="{job}"}}[1m])')
    mx = p.values(f'max_over_time(scrape_duration_seconds{{job="{job}"}}[1m])')
    samples = p.values(f'scrape_samples_scraped{{job="{job}"}}')
    assert dur and samples, f"{p.name}: no scrape metrics for {job}"
    return round(dur[0] * 1000, 2), round(mx[0] * 1000, 2), int(samples[0])


def test_scrape_cost_and_the_classic_histograms_switch(stack):
    """scrape_duration_seconds / scrape_samples_scraped for classic, native+classic and (after
    `scrapeClassicHistograms: false`) native only; with false the classic series stop."""
    s, c = stack, stack.c
    assert getattr(s, "agent", None), "needs the BioMonitor of the earlier tests"
    job = f"{MONITOR}-agent"
    series = s.proms["classic"].values(f'count(count by (device) (ebpf_bio_req_latency_count{{job="{job}"}}))')
    record(M + "devices_exported", int(series[0]) if series else 0)
    for name, key in (("classic", "classic"), ("native", "native_and_classic")):
        avg_ms, max_ms, samples = _scrape_cost(s.proms[name], job)
        record(M + f"scrape_duration_ms_avg_{key}", avg_ms)
        record(M + f"scrape_duration_ms_max_{key}", max_ms)
        record(M + f"scrape_samples_{key}", samples)

    native = s.proms["native"]
    t0 = time.monotonic()
    c.kubectl("patch", "prometheus", "native", "-n", MON_NS, "--type=merge", "-p",
              '{"spec":{"scrapeClassicHistograms":false}}')

    def reloaded():
        j, _ = native.job_config(pool_of(MONITOR))
        return j and j.get("always_scrape_classic_histograms") is not True
    wait(c, reloaded, 240, "the native Prometheus to load always_scrape_classic_histograms: false")
    record(M + "cr_change_to_config_loaded_s", round(time.monotonic() - t0, 1))
    dev = s.loop.name
    # The changed job restarts its scrape loop: the old loop marks its series stale, the new one
    # stores the native histograms only.
    wait(c, lambda: not native.query(f'ebpf_bio_req_latency_bucket{{device="{dev}"}}')
         and native.query(f'ebpf_bio_req_latency{{device="{dev}"}}'), 90,
         "the classic series stale and the native ones still stored in the native Prometheus")
    time.sleep(65)  # a minute of native-only scrapes for the averages
    avg_ms, max_ms, samples = _scrape_cost(native, job)
    record(M + "scrape_duration_ms_avg_native_only", avg_ms)
    record(M + "scrape_duration_ms_max_native_only", max_ms)
    record(M + "scrape_samples_native_only", samples)
    both = rn.measured.get(M + "scrape_samples_native_and_classic")
    assert both is None or samples < both, f"native only: {samples} samples per scrape, with classic: {both}"


def test_secured_scrape_403_without_binding_then_up_and_401_without_token(stack):
    """metricsEndpoint {tls: enabled, auth: kubernetes}: Prometheus scrapes over HTTPS with the
    operator-issued CA and its own ServiceAccount token; 403 until the chart's metrics-reader
    ClusterRole is bound to it (helm upgrade --set-json metricsReader.serviceAccounts=...), then
    up; a request without a token (from the node's network namespace, as another pod) gets 401."""
    s, c = stack, stack.c
    if MONITOR in s.monitors:
        delete_biomonitor_and_wait_clean(c, MONITOR)
        s.monitors.remove(MONITOR)
    t0 = time.monotonic()
    apply_biomonitor(c, biomonitor(SECURE_MONITOR, {"metricsEndpoint": {"tls": {"enabled": True}, "auth": "kubernetes"}}))
    s.monitors.append(SECURE_MONITOR)
    agent = ready_agent(c, SECURE_MONITOR)
    ip = agent["status"]["podIP"]
    pool = pool_of(SECURE_MONITOR)

    sm = c.get("servicemonitor", f"{SECURE_MONITOR}-agent", "-n", AGENTS_NS)
    ep = sm["spec"]["endpoints"][0]
    assert ep["scheme"] == "https" and ep["tlsConfig"]["serverName"] == f"{SECURE_MONITOR}-agent.{AGENTS_NS}.svc", ep
    assert ep["bearerTokenFile"] == "/var/run/secrets/kubernetes.io/serviceaccount/token", ep

    def denied():
        for p in s.proms.values():
            ts = p.targets(pool)
            if len(ts) != 1 or ts[0]["health"] != "down" or "403" not in ts[0].get("lastError", ""):
                return None
        return True
    wait(c, denied, 300, f"the {pool} target down with 403 in both Prometheus pods "
         f"(targets: {[p.targets(pool) for p in s.proms.values()]})", 2)
    record(M + "secure_apply_to_403_s", round(time.monotonic() - t0, 1))
    for p in s.proms.values():
        (t,) = p.targets(pool)
        assert t["scrapeUrl"] == f"https://{ip}:9435/metrics", t
        # The HTTP status came over a verified TLS session: a bad CA or name would fail earlier.
        assert "x509" not in t["lastError"] and "tls" not in t["lastError"].lower(), t["lastError"]

    code, body = c.http(f"https://{ip}:9435/metrics", "-k")
    assert code == 401, f"no token: {code} {body[:200]}"
    code, _ = c.http(f"https://{ip}:9435/healthz", "-k")
    assert code == 200, f"/healthz stays open: {code}"

    t1 = time.monotonic()
    helm_set_metrics_readers(c, [{"name": PROM_SA, "namespace": MON_NS}])
    s.bound = True
    crb = c.get("clusterrolebinding", f"{RELEASE}-metrics-reader")
    assert crb["roleRef"]["name"] == f"{RELEASE}-metrics-reader", crb
    assert {"kind": "ServiceAccount", "name": PROM_SA, "namespace": MON_NS} in crb["subjects"], crb

    def up():
        return all(len(p.targets(pool)) == 1 and p.targets(pool)[0]["health"] == "up" for p in s.proms.values())
    wait(c, up, 120, f"the {pool} target up in both Prometheus pods after binding "
         f"(targets: {[p.targets(pool) for p in s.proms.values()]})", 2)
    record(M + "secure_binding_to_up_s", round(time.monotonic() - t1, 1))
    for p in s.proms.values():
        (attach,) = wait(c, lambda p=p: p.query(f'ebpf_bio_attach_info{{job="{SECURE_MONITOR}-agent"}}'), 30,
                         f"a sample over https in {p.name}")
        assert attach["metric"]["node"] == NODE, attach
