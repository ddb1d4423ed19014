"""A cluster with one real node (tests/cluster/up.sh --real-nodes 1) as seen from a test.

The cluster lives in a private network and mount namespace; every client command goes through
tests/cluster/enter.sh. What is global on the host (processes, cgroups, BPF, /sys/block) is read
directly.
"""
import glob
import json
import os
import re
import subprocess
import time

import yaml

from . import REPO
from .blockdev import LoopDevice

CLUSTER = os.path.join(REPO, "tests", "cluster")
NODE = "real-node-0"


class RealCluster:
    def __init__(self, workdir):
        self.workdir = workdir
        self.env = {}
        with open(os.path.join(workdir, "env")) as f:
            for m in re.finditer(r"^export (\w+)='([^']*)'", f.read(), re.M):
                self.env[m.group(1)] = m.group(2)

    def run(self, *args, stdin=None, timeout=120, check=True):
        """A command inside the cluster's namespaces, from the repository root."""
        r = subprocess.run([os.path.join(CLUSTER, "enter.sh"), self.workdir, *args], input=stdin,
                           capture_output=True, text=True, timeout=timeout, cwd=REPO)
        if check:
            assert r.returncode == 0, f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
        return r

    def sh(self, script, **kw):
        return self.run("bash", "-c", script, **kw)

    def kubectl(self, *args, stdin=None, check=True):
        return self.run("kubectl", "--request-timeout=20s", *args, stdin=stdin, check=check).stdout

    def get(self, *args):
        return json.loads(self.kubectl("get", "-o", "json", *args))

    def http(self, url, *curl_args):
        """(status, body) of a GET from inside the cluster's network namespace."""
        r = self.run("curl", "-sS", "--max-time", "10", "-o", "/dev/stdout", "-w", "\n%{http_code}",
                     *curl_args, url, check=False)
        body, _, code = r.stdout.rpartition("\n")
        return int(code or 0), body

    def ctr(self, *args):
        return self.run("ctr", "--address", self.env["CONTAINERD_ADDRESS"], "-n", "k8s.io", *args).stdout


# Backing files of this suite's loop devices: the host check counts only these, so loop devices
# of another suite running on the same host (tests/node) are not taken for leftovers.
LOOP_PREFIX = "bio-realnode-"


def wait_for(predicate, timeout, what, interval=1.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except AssertionError as e:  # a check inside the predicate: keep its message
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last})")


def fenced_blocks(markdown, heading):
    """The ``` blocks of the section under `heading` (up to the next heading of its level)."""
    level = heading.split(" ", 1)[0]
    m = re.search(r"^" + re.escape(heading) + r"\s*$", markdown, re.M)
    assert m, f"no section {heading!r}"
    rest = markdown[m.end():]
    end = re.search(r"^" + level + r" ", rest, re.M)
    section = rest[: end.start()] if end else rest
    return re.findall(r"^```[a-z]*\n(.*?)^```", section, re.M | re.S)


def readme_quickstart():
    """(helm install argv, BioMonitor YAML) from the README's own Kubernetes quick start."""
    with open(os.path.join(REPO, "README.md")) as f:
        blocks = fenced_blocks(f.read(), "## On Kubernetes")
    script = blocks[0]
    helm = next(line for line in script.splitlines() if line.startswith("helm install "))
    heredoc = re.search(r"kubectl apply -f - <<'EOF'\n(.*?)^EOF$", script, re.M | re.S)
    assert heredoc, "the README's quick start has no `kubectl apply -f - <<'EOF'` BioMonitor"
    return helm.split(), heredoc.group(1)


def docs_example_biomonitor():
    """The full example BioMonitor of docs/operator.md ("The BioMonitor API")."""
    with open(os.path.join(REPO, "docs", "operator.md")) as f:
        blocks = fenced_blocks(f.read(), "## The BioMonitor API")
    return next(b for b in blocks if "kind: BioMonitor" in b)


# Capability numbers (linux/capability.h).
CAP_PERFMON, CAP_BPF = 38, 39


def proc_status(pid):
    with open(f"/proc/{pid}/status") as f:
        return dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)


def cap_set(hexmask):
    v = int(hexmask, 16)
    return {bit for bit in range(64) if v >> bit & 1}


def root_mount_options(pid):
    """Mount options of the process's root filesystem ('/' in its own mountinfo)."""
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == "/":
                return set(fields[5].split(","))
    raise AssertionError(f"no / in /proc/{pid}/mountinfo")


# Our BPF programs' names (bpf/bio.bpf.c), as the kernel truncates them (15 characters).
OUR_PROGRAMS = re.compile(r"^(btf|raw|tp|kp)_(rq|bio)_")


def _bpf_holders():
    """{prog_id: {pid}}: which processes hold a program (or a link to it) open, from fdinfo."""
    holders = {}
    for info in glob.glob("/proc/[0-9]*/fdinfo/*"):
        try:
            with open(info) as f:
                m = re.search(r"^prog_id:\s*(\d+)", f.read(), re.M)
        except OSError:
            continue
        if m:
            holders.setdefault(int(m.group(1)), set()).add(int(info.split("/")[2]))
    return holders


def _in_a_pod(pid):
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            return "/kubepods" in f.read()
    except OSError:
        return False


def our_bpf_programs():
    """{id: name} of loaded BPF programs of ours (bpf/bio.bpf.c's names) that a pod holds or that
    nobody holds (a leak). Programs another agent on the host holds (another test suite's) are
    not this cluster's."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout
    progs = {p["id"]: p.get("name", "") for p in json.loads(out or "[]") if OUR_PROGRAMS.match(p.get("name", ""))}
    if not progs:
        return progs
    holders = _bpf_holders()
    return {i: n for i, n in progs.items() if not holders.get(i) or any(map(_in_a_pod, holders[i]))}


def our_bpf_links():
    out = subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout
    progs = our_bpf_programs()
    return [link for link in json.loads(out or "[]") if link.get("prog_id") in progs]


def make_local_pv(c, pv, claim, namespace, size_mib=64):
    """A loop device (in /dev/shm, detached by down.sh via <workdir>/loops) with ext4 mounted in
    the cluster's namespace, a local PersistentVolume on it pinned to the node, and a claim bound
    to it. Returns the LoopDevice."""
    loop = LoopDevice(size_mib << 20, prefix=LOOP_PREFIX)
    with open(os.path.join(c.workdir, "loops"), "a") as f:
        f.write(loop.path + "\n")
    mnt = os.path.join(c.workdir, "realnode", "pv", pv)
    # No lazy inode-table init: it would write in the background and the device never be idle.
    c.sh(f"mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0 {loop.path} && mkdir -p {mnt} && "
         f"mount {loop.path} {mnt} && chmod 777 {mnt}")
    c.kubectl("create", "namespace", namespace, check=False)
    c.kubectl("apply", "-f", "-", stdin=f"""
apiVersion: v1
kind: PersistentVolume
metadata: {{name: {pv}}}
spec:
  capacity: {{storage: {size_mib}Mi}}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: local-disks
  local: {{path: {mnt}}}
  nodeAffinity:
    required:
      nodeSelectorTerms:
      - matchExpressions: [{{key: kubernetes.io/hostname, operator: In, values: [{NODE}]}}]
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: {claim}, namespace: {namespace}}}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: local-disks
  volumeName: {pv}
  resources: {{requests: {{storage: {size_mib}Mi}}}}
""")
    return loop


# --------------------------------------------- one user's session: measurements, BioMonitors --

AGENTS_NS = "bio-exporter-agents"
OPERATOR_NS = "bio-exporter"
MEASUREMENTS = os.environ.get("BIO_REALNODE_MEASUREMENTS",
                              os.path.expanduser("~/.cache/bio-exporter/realnode-measurements.json"))
measured = {}


def record(key, value):
    """Add one figure to the measurements file (other modules' figures in it are kept)."""
    try:
        with open(MEASUREMENTS) as f:
            measured.update({k: v for k, v in json.load(f).items() if k not in measured})
    except (OSError, ValueError):
        pass
    measured[key] = value
    with open(MEASUREMENTS, "w") as f:
        json.dump(measured, f, indent=2, sort_keys=True)


# ------------------------------------------------------------------------------------ helpers --

def agent_pods(c, monitor=None):
    pods = c.get("pods", "-n", AGENTS_NS)["items"]
    # The DaemonSet's selector labels (operator/src/names.rs): name = the app, instance = the monitor.
    def ours(labels):
        return labels.get("app.kubernetes.io/name") == "bio-exporter-agent" and \
            (monitor is None or labels.get("app.kubernetes.io/instance") == monitor)
    return [p for p in pods if ours(p["metadata"].get("labels", {})) and not p["metadata"].get("deletionTimestamp")]


def ready_agent(c, monitor, timeout=180):
    """The one Ready agent pod of `monitor` on the real node."""
    def ready():
        pods = agent_pods(c, monitor)
        ok = [p for p in pods if p["spec"].get("nodeName") == NODE and p["status"].get("phase") == "Running"
              and any(cs.get("ready") for cs in p["status"].get("containerStatuses", []))]
        return ok[0] if len(ok) == 1 and len(pods) == 1 else None
    return wait_for(ready, timeout, f"one Ready agent pod of {monitor} on {NODE}")


def container_pid(c, pod):
    """Host PID of the pod's agent container (its init process), from containerd."""
    cid = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    out = c.ctr("tasks", "ls")
    for line in out.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return int(fields[1])
    raise AssertionError(f"container {cid} not in containerd's tasks:\n{out}")


def scrape(c, pod, path="/metrics"):
    code, body = c.http(f"http://{pod['status']['podIP']}:9435{path}")
    assert code == 200, f"GET {path} on {pod['metadata']['name']}: {code} {body[:300]}"
    return body


def biomonitor_status(c, name):
    return c.get("biomonitor", name, "-n", AGENTS_NS).get("status", {})


def condition(status, ctype):
    return next((x for x in status.get("conditions", []) if x["type"] == ctype), {})


def apply_biomonitor(c, manifest):
    c.kubectl("apply", "-f", "-", stdin=manifest)
    return yaml.safe_load(manifest)["metadata"]["name"]


def delete_biomonitor_and_wait_clean(c, name):
    c.kubectl("delete", "biomonitor", name, "-n", AGENTS_NS, "--wait=true", "--timeout=120s")
    wait_for(lambda: not agent_pods(c, name) and not c.get("pods", "-n", AGENTS_NS)["items"], 120,
             f"the pods of {name} to be gone")
    wait_for(lambda: not our_bpf_programs(), 30, "our BPF programs to be unloaded")
    assert not our_bpf_links(), "BPF links of ours left attached"
