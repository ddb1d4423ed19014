"""Cost of PersistentVolume labels (a benchmark: it reports numbers, it does not pass or fail).

A real local API server (tests/cluster) holds 500 PVs, 500 bound PVCs and 500 pods using them; a
temporary kubelet root holds 500 pod CSI volume mounts, 64 of them ext4 on their own loop device
(the rest tmpfs, so mountinfo is as long as on a node with 500 volumes). Every loop device does IO.
Then, alternating runs without and with --pv-labels:
- /metrics latency (p50/p99/max) at one scrape per SCRAPE_GAP_S, so discovery (cached 5 s) runs
  inside the measured scrapes as it does under Prometheus, and the agent's RSS;
- API requests on persistentvolumes per minute at steady state, from the API server's
  apiserver_request_total, with the agent running and (baseline: the controller-manager's own
  watch) without.
Usage (as root): make bench-pv-labels, or python3 bench/pv_labels.py [--watch-minutes N]
"""
import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "lib"))
from biotest.agent import RELEASE_AGENT_BIN, rss_mib, running_agent  # noqa: E402
from biotest.blockdev import LoopDevice  # noqa: E402
from biotest.cluster import CLUSTER, Cluster, agent_env  # noqa: E402
from biotest.util import sh  # noqa: E402

N_VOLUMES = 500
N_DEVICES = 64
N_NODES = 5
NS = "bench-pv"
DRIVER = "bench.csi.bioexporter.io"
SCRAPES = 120
SCRAPE_GAP_S = 0.25
RUNS = 2


def kubectl(env, *args, stdin=None):
    """kubectl without the test helpers' time limits: creating 1500 objects takes a while."""
    return subprocess.run(["kubectl", *args], env=env, input=stdin, check=True,
                          capture_output=True, text=True).stdout


def api_objects(nodes):
    docs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}]
    for i in range(N_VOLUMES):
        pv, pvc = f"pv-bench-{i:03d}", f"data-{i:03d}"
        docs.append({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
                     "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                              "storageClassName": "bench", "persistentVolumeReclaimPolicy": "Retain",
                              "claimRef": {"namespace": NS, "name": pvc},
                              "csi": {"driver": DRIVER, "volumeHandle": f"handle-{i:03d}"}}})
        docs.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                     "metadata": {"name": pvc, "namespace": NS},
                     "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "bench",
                              "volumeName": pv, "resources": {"requests": {"storage": "1Gi"}}}})
        docs.append({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": f"app-{i:03d}", "namespace": NS},
                     "spec": {"nodeName": nodes[i % len(nodes)],
                              "containers": [{"name": "app", "image": "registry.invalid/app"}],
                              "volumes": [{"name": "data",
                                           "persistentVolumeClaim": {"claimName": pvc}}]}})
    return "\n".join(json.dumps(d) for d in docs)


@contextlib.contextmanager
def kubelet_root():
    """500 pod CSI volume mounts; the first N_DEVICES are ext4 on loop devices."""
    root = tempfile.mkdtemp(prefix="bio-bench-kubelet-")
    mounts, loops = [], []
    try:
        for i in range(N_VOLUMES):
            pv = f"pv-bench-{i:03d}"
            vol = os.path.join(root, "pods", str(uuid.uuid4()), "volumes", "kubernetes.io~csi", pv)
            os.makedirs(os.path.join(vol, "mount"))
            with open(os.path.join(vol, "vol_data.json"), "w") as f:
                json.dump({"specVolID": pv, "driverName": DRIVER, "volumeHandle": f"handle-{i:03d}",
                           "volumeLifecycleMode": "Persistent"}, f)
            target = os.path.join(vol, "mount")
            if i < N_DEVICES:
                loop = LoopDevice(8 << 20, prefix="bio-bench-pv-")
                loops.append(loop)
                sh("mkfs.ext4", "-q", "-F", loop.path)
                sh("mount", loop.path, target)
            else:
                sh("mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", target)
            mounts.append(target)
        yield root, mounts[:N_DEVICES]
    finally:
        for m in reversed(mounts):
            subprocess.run(["umount", "-l", m])
        for loop in loops:
            loop.detach()
        shutil.rmtree(root, ignore_errors=True)


def write_each(mounts):
    for m in mounts:
        sh("dd", "if=/dev/zero", f"of={m}/f", "bs=4k", "count=4", "oflag=direct,sync", "status=none")


def scrape_series(url, scrapes):
    times, body = [], b""
    for _ in range(scrapes):
        t0 = time.perf_counter()
        body = urllib.request.urlopen(url + "/metrics", timeout=10).read()
        times.append((time.perf_counter() - t0) * 1000)
        time.sleep(SCRAPE_GAP_S)
    return times, body.decode()


def pv_requests(env):
    """apiserver_request_total for persistentvolumes, by verb."""
    text = kubectl(env, "get", "--raw", "/metrics")
    by_verb = {}
    for line in text.splitlines():
        if line.startswith("apiserver_request_total{") and 'resource="persistentvolumes"' in line:
            verb = re.search(r'verb="([A-Z]+)"', line).group(1)
            by_verb[verb] = by_verb.get(verb, 0) + float(line.rsplit(" ", 1)[1])
    return by_verb


def delta(a, b):
    return {k: b.get(k, 0) - a.get(k, 0) for k in sorted(set(a) | set(b)) if b.get(k, 0) != a.get(k, 0)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--watch-minutes", type=float, default=5.0)
    args = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="bio-bench-cluster-")
    subprocess.run([f"{CLUSTER}/up.sh", workdir], check=True)
    try:
        env = Cluster(workdir).env
        nodes = sh(f"{CLUSTER}/add-nodes.sh", workdir, str(N_NODES), "bench").stdout.split()
        t0 = time.time()
        kubectl(env, "create", "-f", "-", stdin=api_objects(nodes))
        print(f"created {N_VOLUMES} PVs, PVCs and pods in {time.time() - t0:.0f} s", flush=True)
        with_kubeconfig = agent_env(env["KUBECONFIG"])
        with kubelet_root() as (root, mounts):
            rows = {False: [], True: []}
            for run in range(RUNS):
                for labels in (False, True):
                    extra = ["--pv-labels", "--kubelet-root", root] if labels else []
                    with running_agent("--device-include", "^loop[0-9]+$", *extra, binary=RELEASE_AGENT_BIN,
                                       env=with_kubeconfig) as agent:
                        write_each(mounts)
                        times, body = scrape_series(agent.url, SCRAPES)
                        rows[labels].append((times, rss_mib(agent.proc.pid), len(body), body))
            print(f"\n## /metrics with {N_DEVICES} devices, {N_VOLUMES} PV mounts, {N_VOLUMES} PVs"
                  f" ({SCRAPES} scrapes, one per {SCRAPE_GAP_S}s, {RUNS} runs each)")
            print("| --pv-labels | labelled series | bytes | p50 ms | p99 ms | max ms | RSS MiB |")
            print("|---|---|---|---|---|---|---|")
            for labels in (False, True):
                times = sorted(t for r in rows[labels] for t in r[0])
                body = rows[labels][-1][3]
                labelled = len(re.findall(r'^ebpf_bio_req_latency_count\{[^}]*persistentvolumeclaim=', body, re.M))
                print(f"| {labels} | {labelled} | {rows[labels][-1][2]} | {statistics.median(times):.2f}"
                      f" | {times[int(len(times) * 0.99) - 1]:.2f} | {times[-1]:.2f}"
                      f" | {statistics.median(r[1] for r in rows[labels]):.1f} |")

            seconds = args.watch_minutes * 60
            before = pv_requests(env)
            time.sleep(seconds)
            baseline = delta(before, pv_requests(env))
            with running_agent("--device-include", "^loop[0-9]+$", "--pv-labels", "--kubelet-root", root,
                               binary=RELEASE_AGENT_BIN, env=with_kubeconfig) as agent:
                time.sleep(5)  # the initial LIST and WATCH
                before = pv_requests(env)
                time.sleep(seconds)
                steady = delta(before, pv_requests(env))
                urllib.request.urlopen(agent.url + "/metrics", timeout=10).read()
            print(f"\n## API requests on persistentvolumes over {args.watch_minutes:g} min at steady state")
            print(f"- without the agent (controller-manager only): {baseline or 'none'}")
            print(f"- with the agent: {steady or 'none'}")
            per_min = (sum(steady.values()) - sum(baseline.values())) / args.watch_minutes
            print(f"- the agent's share: {per_min:.2f} requests/min")
    finally:
        subprocess.run([f"{CLUSTER}/down.sh", workdir])


if __name__ == "__main__":
    main()
