"""--pv-labels: PersistentVolume labels from a real API server and a kubelet root laid out as the
kubelet lays it out, on real loop devices with real filesystems.

One local cluster (tests/cluster/up.sh) and one agent for the module. The agent runs as a
ServiceAccount bound to the chart's own agent ClusterRole (rendered with `helm template`), with a
token kubeconfig; PV objects and the PVCs bound to them live in the API server. Under a temporary
kubelet root the tests mount CSI pod volumes and staging globalmounts, local volumes, block-mode
links, device-mapper stacks and partitions, exactly where the kubelet would.

Every scrape goes through one checker that fails as soon as a counter (histogram bucket, _sum,
_count, _total) of a series present in two consecutive scrapes went down, or a PV label is empty.
The outage test kills and restarts the API server, so it stays the last test of this file.
"""
import os
import re
import shutil
import signal
import subprocess
import time
import uuid

import pytest
import yaml

from biotest import REPO
from biotest.agent import Agent
from biotest.blockdev import direct_io, read_stat, stat_delta
from biotest.exposition import parse_metrics, sample
from biotest.util import sh
from biotest.cluster import agent_env, running_cluster
from biotest.kubelet import NODE, Node, create_pv, mkfs, mounts_under, rebind

CHART = os.path.join(REPO, "charts", "bio-exporter")
RUN = uuid.uuid4().hex[:6]  # in every API object name: a leftover of another run never matches
AGENT_NS = "bio-pv-agent"
NS_A, NS_B = f"ns-a-{RUN}", f"ns-b-{RUN}"

LAT, SIZE = "ebpf_bio_req_latency", "ebpf_bio_req_size"
ERRORS = "ebpf_bio_req_errors_total"
INFO = "ebpf_bio_device_info"
# The per-device families (histogram samples and the error counter) and the PV labels they may carry.
DEVICE_FAMILIES = tuple(f"{h}_{s}" for h in (LAT, SIZE) for s in ("bucket", "sum", "count")) + (ERRORS,)
PV_KEYS = ("persistentvolume", "persistentvolumeclaim", "namespace")
# Discovery is reused for 5 s: a mount change shows within one reuse period and a scrape.
RELABEL_TIMEOUT = 20
# The PV watch retries with backoff up to ~30 s after an API server outage.
WATCH_TIMEOUT = 90


def name(what):
    return f"{what}-{RUN}-{uuid.uuid4().hex[:4]}"


# ---------------------------------------------------------------- the exposition --------------

def family_of(sample_name, types):
    for suffix in ("_bucket", "_sum", "_count", "_total", "_info"):
        if sample_name.endswith(suffix) and sample_name[: -len(suffix)] in types:
            return sample_name[: -len(suffix)]
    return sample_name


class Scrapes:
    """Every scrape of the module's agent, each checked against the one before it."""

    def __init__(self, agent):
        self.agent = agent
        self.last = None
        self.count = 0

    def __call__(self):
        text = self.agent.metrics_text()
        types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
        samples = parse_metrics(text)
        counters = {}
        for n, labels, v in samples:
            if types.get(family_of(n, types)) in ("counter", "histogram"):
                counters[(n, frozenset(labels.items()))] = v
        if self.last is not None:
            down = [(n, dict(l), self.last[(n, l)], v) for (n, l), v in counters.items()
                    if (n, l) in self.last and v < self.last[(n, l)]]
            assert not down, f"counters went down between consecutive scrapes: {down[:5]}"
        self.last = counters
        self.count += 1
        check_label_shape(samples)
        return samples


def check_label_shape(samples):
    """PV labels are absent or non-empty; a claim always comes with its namespace and PV; the
    device series carry no storage class (the info metric does)."""
    for n, labels, _ in samples:
        if n not in DEVICE_FAMILIES and n != INFO:
            continue
        where = f"{n}{labels}"
        for k in (*PV_KEYS, "storageclass", "shared"):
            assert labels.get(k, "x") != "", f"empty {k} label: {where}"
        if "persistentvolumeclaim" in labels or "namespace" in labels:
            assert {"persistentvolumeclaim", "namespace", "persistentvolume"} <= labels.keys(), where
        if n in DEVICE_FAMILIES:
            assert "storageclass" not in labels and "shared" not in labels, where
            assert labels.get("node") == NODE, where
        else:
            assert "persistentvolume" in labels and labels.get("shared") in ("true", "false"), where
            assert labels.get("node") == NODE, where


def device_series(samples, device):
    return [(n, l, v) for n, l, v in samples if n in DEVICE_FAMILIES and l.get("device") == device]


def pv_labels(labels):
    return {k: labels[k] for k in PV_KEYS if k in labels}


def labels_on(samples, device):
    """The PV labels the device's series carry (one dict per distinct set; [] if no series)."""
    sets = []
    for _, l, _ in device_series(samples, device):
        if pv_labels(l) not in sets:
            sets.append(pv_labels(l))
    return sets


def info_rows(samples, device):
    rows = []
    for n, l, v in samples:
        if n == INFO and l.get("device") == device:
            assert v == 1, f"{n}{l} {v}"
            rows.append({k: x for k, x in l.items() if k not in ("node", "device")})
    return sorted(rows, key=lambda r: r["persistentvolume"])


def count(samples, device, op="write", family=f"{LAT}_count", **labels):
    return sample(samples, family, device=device, operation=op, **labels)


def want_labels(pv, claim=None):
    return {"persistentvolume": pv, **({"persistentvolumeclaim": claim[1], "namespace": claim[0]} if claim else {})}


def describe(samples, *devices):
    lines = [f"{n}{l} {v}" for n, l, v in samples
             if l.get("device") in devices and (n.endswith("_count") or n in (ERRORS, INFO))]
    return "\n".join(lines) or f"(no series for {devices})"


def wait_scrape(scrape, agent, ok, timeout, what, devices=()):
    """Scrapes until ok(samples) holds; the samples that satisfied it."""
    deadline = time.monotonic() + timeout
    samples = []
    while time.monotonic() < deadline:
        samples = scrape()
        if ok(samples):
            return samples
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{describe(samples, *devices)}\n"
                         f"--- agent log (tail) ---\n{agent.logs()[-4000:]}")


def wait_labels(scrape, agent, device, want, timeout=RELABEL_TIMEOUT):
    """Until every series of the device carries exactly these PV labels ({} for none)."""
    return wait_scrape(scrape, agent, lambda s: labels_on(s, device) == [want], timeout,
                       f"{device}'s series to carry {want or 'no PV labels'}", [device])


# ---------------------------------------------------------------- fixtures --------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running_cluster(tmp_path_factory.mktemp("pv-cluster")) as c:
        c.apply(yaml.safe_dump_all([
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}} for ns in (AGENT_NS, NS_A, NS_B)
        ] + [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "agent", "namespace": AGENT_NS}},
            {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": "fast"},
             "provisioner": "kubernetes.io/no-provisioner", "volumeBindingMode": "Immediate"},
        ]))
        yield c


@pytest.fixture(scope="module")
def agent_role(cluster):
    """The chart's agent ClusterRole, as `helm template` renders it, applied to the cluster."""
    r = cluster.run("helm", "template", "bio", CHART, "--show-only", "templates/clusterrole-agent.yaml")
    assert r.returncode == 0, f"helm template: {r.stderr}"
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    assert len(docs) == 1 and docs[0]["kind"] == "ClusterRole", r.stdout
    cluster.apply(r.stdout)
    return docs[0]["metadata"]["name"]


@pytest.fixture(scope="module")
def agent_kubeconfig(cluster, agent_role):
    cluster.kubectl("create", "clusterrolebinding", f"bio-pv-agent-{RUN}", f"--clusterrole={agent_role}",
                    f"--serviceaccount={AGENT_NS}:agent")
    return cluster.sa_kubeconfig(AGENT_NS, "agent")


@pytest.fixture(scope="module")
def kubelet_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("kubelet"))
    for d in ("pods", "plugins"):
        os.makedirs(os.path.join(root, d))
    yield root
    for point in sorted(mounts_under(root), reverse=True):  # whatever a broken test left behind
        sh("umount", "-l", point, check=False)


@pytest.fixture(scope="module")
def agent(agent_kubeconfig, kubelet_root):
    a = Agent(["--pv-labels", "--kubelet-root", kubelet_root, "--log-level", "info,node_agent=debug"],
              env=agent_env(agent_kubeconfig))
    yield a
    a.stop()


@pytest.fixture(scope="module")
def scrape(agent):
    return Scrapes(agent)


@pytest.fixture
def node(kubelet_root, loop_factory, tmp_path):
    n = Node(kubelet_root, str(tmp_path))
    yield n
    n.cleanup()


def fs_loop(loop_factory):
    loop = loop_factory(64 << 20)
    mkfs(loop.path)
    return loop


# ---------------------------------------------------------------- tests -----------------------

def test_agent_identity_is_the_charts_clusterrole(cluster, agent_kubeconfig, agent, scrape):
    """The chart's role is all the agent gets: PVs yes, pods and claims no (the other tests show it
    is enough: claims arrive through the PV watch)."""
    can = lambda *a: cluster.can_i(agent_kubeconfig, *a)
    for verb in ("get", "list", "watch"):
        assert can(verb, "persistentvolumes"), f"the chart's agent role must allow {verb} persistentvolumes"
    assert not can("list", "pods", "--all-namespaces"), "the agent must not be able to read pods"
    assert not can("get", "pods", "-n", NS_A)
    assert not can("list", "persistentvolumeclaims", "--all-namespaces")
    assert not can("create", "persistentvolumes")
    scrape()
    assert "not implemented" not in agent.logs(), "this agent build has no --pv-labels"


def test_csi_filesystem_volume(cluster, agent, scrape, node, loop_factory):
    """A CSI PV staged at its globalmount and bind-mounted into a pod carries pv/claim/namespace on
    every series of its disk and one info row; an inline (ephemeral) CSI volume, an emptyDir-style
    mount and a device with no volume carry no PV labels."""
    pv, claim, handle = name("pv-csi"), (NS_A, name("claim-csi")), f"vol-{uuid.uuid4()}"
    create_pv(cluster, pv, claim, handle=handle, storage_class="fast")
    # A PV object with the inline volume's directory name: only vol_data.json tells them apart.
    inline_name = name("scratch")
    create_pv(cluster, inline_name, (NS_A, name("claim-decoy")))
    data, inline, other = fs_loop(loop_factory), fs_loop(loop_factory), fs_loop(loop_factory)
    uid = node.pod()
    staged = node.csi_staging(data.path, handle)
    pod_mount = node.csi_pod_volume(uid, pv, bind_from=staged, handle=handle)
    inline_mount = node.csi_pod_volume(uid, inline_name, dev=inline.path, mode="Ephemeral")
    cache = node.mount(other.path, os.path.join(node.root, "pods", uid, "volumes", "kubernetes.io~empty-dir", "cache"))
    for d in (pod_mount, inline_mount, cache):
        direct_io(os.path.join(d, "warmup"), "write", 4096, 4)

    want = want_labels(pv, claim)
    samples = wait_labels(scrape, agent, data.name, want)
    for dev in (inline.name, other.name):
        assert labels_on(samples, dev) == [{}], describe(samples, dev)
        assert info_rows(samples, dev) == []
    assert info_rows(samples, data.name) == [{**want, "storageclass": "fast", "shared": "false"}]
    assert not [l for n, l, _ in samples if inline_name in l.values()], "the inline volume is no PV"
    # The claim came through the PV watch: the chart's role was enough, never refused.
    assert "refused" not in agent.logs(), agent.logs()[-4000:]
    families = {n for n, _, _ in device_series(samples, data.name)}
    assert set(DEVICE_FAMILIES) <= families, f"labelled families missing: {set(DEVICE_FAMILIES) - families}"

    s0, m0 = read_stat(data.name), scrape()
    direct_io(os.path.join(pod_mount, "data"), "write", 4096, 64)
    m1, s1 = scrape(), read_stat(data.name)
    writes = count(m1, data.name, **want) - count(m0, data.name, **want)
    assert 64 <= writes <= stat_delta(s0, s1)["write_ios"], (writes, stat_delta(s0, s1))
    kib = count(m1, data.name, family=f"{SIZE}_sum", **want) - count(m0, data.name, family=f"{SIZE}_sum", **want)
    assert kib >= 64 * 4
    assert labels_on(m1, data.name) == [want]


def test_staging_only_pv_without_claim(cluster, agent, scrape, node, loop_factory):
    """A PV found only by its staging directory's handle hash; with no claimRef it carries the PV
    label alone. A staging directory whose handle no PV has is not labelled."""
    pv, handle = name("pv-stage"), f"vol-{uuid.uuid4()}"
    create_pv(cluster, pv, None, handle=handle, storage_class="slow")
    staged, unknown = fs_loop(loop_factory), fs_loop(loop_factory)
    a = node.csi_staging(staged.path, handle)
    b = node.csi_staging(unknown.path, f"vol-nobody-{uuid.uuid4()}")
    for d in (a, b):
        direct_io(os.path.join(d, "f"), "write", 4096, 8)
    samples = wait_labels(scrape, agent, staged.name, {"persistentvolume": pv})
    assert info_rows(samples, staged.name) == [{"persistentvolume": pv, "storageclass": "slow", "shared": "false"}]
    assert labels_on(samples, unknown.name) == [{}] and info_rows(samples, unknown.name) == []

    m0 = scrape()
    direct_io(os.path.join(a, "f"), "write", 4096, 16)
    m1 = scrape()
    assert count(m1, staged.name, persistentvolume=pv) - count(m0, staged.name, persistentvolume=pv) >= 16


def test_local_volumes(cluster, agent, scrape, node, loop_factory):
    """A local PV that is a whole filesystem is its disk's; one that is a subdirectory of a bigger
    filesystem shares it: no labels on the disk's series, shared="true" in the info row."""
    whole_dev, big_dev = fs_loop(loop_factory), fs_loop(loop_factory)
    whole = node.mount(whole_dev.path, node.outside("local-whole"))
    big = node.mount(big_dev.path, node.outside("local-big"))
    sub = os.path.join(big, "vol1")
    os.makedirs(sub)
    pv_whole, claim = name("pv-local"), (NS_B, name("claim-local"))
    pv_sub, claim_sub = name("pv-local-sub"), (NS_B, name("claim-sub"))
    create_pv(cluster, pv_whole, claim, local_path=whole)
    create_pv(cluster, pv_sub, claim_sub, local_path=sub)
    uid = node.pod()
    a = node.local_volume(uid, pv_whole, whole)
    b = node.local_volume(uid, pv_sub, sub)
    for d in (a, b):
        direct_io(os.path.join(d, "f"), "write", 4096, 8)

    want = want_labels(pv_whole, claim)
    samples = wait_labels(scrape, agent, whole_dev.name, want)
    assert info_rows(samples, whole_dev.name) == [{**want, "storageclass": "fast", "shared": "false"}]
    samples = wait_scrape(scrape, agent, lambda s: info_rows(s, big_dev.name) != [], RELABEL_TIMEOUT,
                          f"an info row for {big_dev.name}", [big_dev.name])
    assert info_rows(samples, big_dev.name) == [{**want_labels(pv_sub, claim_sub), "storageclass": "fast",
                                                 "shared": "true"}]
    assert labels_on(samples, big_dev.name) == [{}], describe(samples, big_dev.name)

    m0 = scrape()
    direct_io(os.path.join(a, "g"), "write", 4096, 32)
    direct_io(os.path.join(b, "g"), "write", 4096, 32)
    m1 = scrape()
    assert count(m1, whole_dev.name, **want) - count(m0, whole_dev.name, **want) >= 32
    assert count(m1, big_dev.name) - count(m0, big_dev.name) >= 32, "the shared disk still counts, unlabelled"


def test_block_volume_counts_exactly(cluster, agent, scrape, node, loop_factory):
    """A block-mode PV: the pod's volumeDevices link to the device node. O_DIRECT IO on it is
    counted exactly, under the PV's labels, in every family."""
    loop = loop_factory(32 << 20)
    pv, claim = name("pv-blk"), (NS_A, name("claim-blk"))
    create_pv(cluster, pv, claim, block=True)
    node.block_link(node.pod(), pv, loop.path)
    direct_io(loop.path, "write", 4096, 1)  # the device's first IO: its series exist from now on
    want = want_labels(pv, claim)
    wait_labels(scrape, agent, loop.name, want)

    m0, s0 = scrape(), read_stat(loop.name)
    direct_io(loop.path, "write", 4096, 40)
    direct_io(loop.path, "read", 8192, 10)
    m1, s1 = scrape(), read_stat(loop.name)
    d = stat_delta(s0, s1)
    delta = lambda family, op, **kw: count(m1, loop.name, op, family, **want, **kw) - count(m0, loop.name, op, family, **want, **kw)
    assert (delta(f"{LAT}_count", "write"), delta(f"{LAT}_count", "read")) == (40, 10) == (d["write_ios"], d["read_ios"])
    assert (delta(f"{SIZE}_count", "write"), delta(f"{SIZE}_count", "read")) == (40, 10)
    assert (delta(f"{SIZE}_sum", "write"), delta(f"{SIZE}_sum", "read")) == (160, 80)
    assert (delta(f"{SIZE}_bucket", "write", le="4"), delta(f"{SIZE}_bucket", "read", le="8")) == (40, 10)
    assert delta(f"{LAT}_sum", "write") > 0
    assert delta(ERRORS, "write") == 0 and any(n == ERRORS for n, _, _ in device_series(m1, loop.name))
    assert info_rows(m1, loop.name) == [{**want, "storageclass": "fast", "shared": "false"}]


def test_device_mapper_stack(cluster, agent, scrape, node, loop_factory):
    """A PV on a dm linear device: the dm device and the loop under it both carry its labels."""
    if shutil.which("dmsetup") is None:
        pytest.skip("SKIPPED LOUDLY: dmsetup is not installed (Debian package dmsetup)")
    r = subprocess.run(["dmsetup", "version"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"SKIPPED LOUDLY: device-mapper unavailable in this kernel: {(r.stdout + r.stderr).strip()}")
    loop = loop_factory(32 << 20)
    dm = node.dm_linear(loop)
    pv, claim = name("pv-dm"), (NS_A, name("claim-dm"))
    create_pv(cluster, pv, claim, block=True)
    node.block_link(node.pod(), pv, f"/dev/{dm}")
    direct_io(f"/dev/{dm}", "write", 4096, 1)
    want = want_labels(pv, claim)
    wait_labels(scrape, agent, dm, want)
    samples = wait_labels(scrape, agent, loop.name, want)
    for dev in (dm, loop.name):
        assert info_rows(samples, dev) == [{**want, "storageclass": "fast", "shared": "false"}], dev

    m0 = scrape()
    direct_io(f"/dev/{dm}", "write", 4096, 20)
    m1 = scrape()
    assert count(m1, dm, **want) - count(m0, dm, **want) == 20
    assert count(m1, loop.name, **want) - count(m0, loop.name, **want) >= 20


def test_partitions_share_their_disk(cluster, agent, scrape, node, loop_factory):
    """Two partitions of one loop disk, each a block PV. The disk (what is measured) is no one PV's:
    its series carry no PV labels and the info metric lists its PVs with shared="true" — already
    when only one partition is a PV and the other is not."""
    loop = loop_factory(64 << 20, partscan=True)
    p1, p2 = node.partitions(loop, [(2048, 32768), (34816, 32768)])
    (pv1, c1), (pv2, c2) = [(name(f"pv-part{i}"), (NS_A, name(f"claim-part{i}"))) for i in (1, 2)]
    create_pv(cluster, pv1, c1, block=True)
    create_pv(cluster, pv2, c2, block=True)
    row = lambda pv, claim: {**want_labels(pv, claim), "storageclass": "fast", "shared": "true"}
    uid = node.pod()
    node.block_link(uid, pv1, f"/dev/{p1}")
    direct_io(f"/dev/{p1}", "write", 4096, 1)
    samples = wait_scrape(scrape, agent, lambda s: info_rows(s, loop.name) == [row(pv1, c1)], RELABEL_TIMEOUT,
                          f"{loop.name}: {pv1} beside a partition that is no PV", [loop.name])
    assert labels_on(samples, loop.name) == [{}], describe(samples, loop.name)

    node.block_link(uid, pv2, f"/dev/{p2}")
    samples = wait_scrape(scrape, agent, lambda s: info_rows(s, loop.name) == [row(pv1, c1), row(pv2, c2)],
                          RELABEL_TIMEOUT, f"{loop.name} shared by {pv1} and {pv2}", [loop.name])
    assert labels_on(samples, loop.name) == [{}], describe(samples, loop.name)
    for p in (p1, p2):
        assert info_rows(samples, p) == [] and labels_on(samples, p) in ([], [{}]), describe(samples, p)

    m0, s0 = scrape(), read_stat(loop.name)
    direct_io(f"/dev/{p1}", "write", 4096, 12)
    direct_io(f"/dev/{p2}", "write", 4096, 8)
    m1, s1 = scrape(), read_stat(loop.name)
    assert count(m1, loop.name) - count(m0, loop.name) == 20 == stat_delta(s0, s1)["write_ios"]
    assert labels_on(m1, loop.name) == [{}]


def test_claim_change_ends_old_series_and_starts_new_from_zero(cluster, agent, scrape, node, loop_factory):
    """The claim is deleted and the Retained PV handed to another claim: the old labels' series
    disappear and the new ones start from zero instead of inheriting the old claim's IO."""
    loop = loop_factory(32 << 20)
    pv, old, new = name("pv-move"), (NS_A, name("claim-old")), (NS_B, name("claim-new"))
    create_pv(cluster, pv, old, block=True)
    node.block_link(node.pod(), pv, loop.path)
    direct_io(loop.path, "write", 4096, 1)
    wait_labels(scrape, agent, loop.name, want_labels(pv, old))
    direct_io(loop.path, "write", 4096, 30)
    assert count(scrape(), loop.name, **want_labels(pv, old)) >= 30

    rebind(cluster, pv, old, new)
    first = wait_labels(scrape, agent, loop.name, want_labels(pv, new), timeout=WATCH_TIMEOUT)
    assert count(first, loop.name, **want_labels(pv, new)) == 0, "no IO since the claim changed"
    assert not [l for n, l, _ in first if l.get("persistentvolumeclaim") == old[1]], "old series must end"
    assert info_rows(first, loop.name) == [{**want_labels(pv, new), "storageclass": "fast", "shared": "false"}]
    direct_io(loop.path, "write", 4096, 7)
    assert count(scrape(), loop.name, **want_labels(pv, new)) == 7


def test_labels_that_come_back_resume_their_count(cluster, agent, scrape, node, loop_factory):
    """A→B→A: the series under A comes back at the value it had, never lower and without B's IO."""
    loop = loop_factory(32 << 20)
    pv, a, b = name("pv-back"), (NS_A, name("claim-a")), (NS_A, name("claim-b"))
    create_pv(cluster, pv, a, block=True)
    node.block_link(node.pod(), pv, loop.path)
    direct_io(loop.path, "write", 4096, 1)
    wait_labels(scrape, agent, loop.name, want_labels(pv, a))
    direct_io(loop.path, "write", 4096, 12)
    last_a = scrape()
    a_writes = count(last_a, loop.name, **want_labels(pv, a))
    a_sum = count(last_a, loop.name, family=f"{SIZE}_sum", **want_labels(pv, a))
    assert a_writes >= 12

    rebind(cluster, pv, a, b)
    wait_labels(scrape, agent, loop.name, want_labels(pv, b), timeout=WATCH_TIMEOUT)
    direct_io(loop.path, "write", 4096, 5)
    assert count(scrape(), loop.name, **want_labels(pv, b)) == 5

    rebind(cluster, pv, b, a)
    back = wait_labels(scrape, agent, loop.name, want_labels(pv, a), timeout=WATCH_TIMEOUT)
    assert count(back, loop.name, **want_labels(pv, a)) == a_writes, "A resumes where it ended"
    assert count(back, loop.name, family=f"{SIZE}_sum", **want_labels(pv, a)) == a_sum
    direct_io(loop.path, "write", 4096, 3)
    assert count(scrape(), loop.name, **want_labels(pv, a)) == a_writes + 3


def test_remount_under_another_pv(cluster, agent, scrape, node, loop_factory):
    """The filesystem is unmounted from one PV's pod directory and mounted under another PV: the
    new PV's series start with only the IO done since, not the old PV's."""
    loop = fs_loop(loop_factory)
    (pv1, c1), (pv2, c2) = [(name(f"pv-r{i}"), (NS_B, name(f"claim-r{i}"))) for i in (1, 2)]
    create_pv(cluster, pv1, c1)
    create_pv(cluster, pv2, c2)
    first = node.csi_pod_volume(node.pod(), pv1, dev=loop.path)
    direct_io(os.path.join(first, "f"), "write", 4096, 1)
    wait_labels(scrape, agent, loop.name, want_labels(pv1, c1))
    direct_io(os.path.join(first, "f"), "write", 4096, 200)
    old = count(scrape(), loop.name, **want_labels(pv1, c1))
    assert old >= 200

    s0 = read_stat(loop.name)
    node.umount(first)
    second = node.csi_pod_volume(node.pod(), pv2, dev=loop.path)
    m = wait_labels(scrape, agent, loop.name, want_labels(pv2, c2))
    since = stat_delta(s0, read_stat(loop.name))
    assert count(m, loop.name, **want_labels(pv2, c2)) <= since["write_ios"] < old, (since, old)
    assert count(m, loop.name, "read", **want_labels(pv2, c2)) <= since["read_ios"]
    assert not [l for n, l, _ in m if l.get("persistentvolume") == pv1], "the old PV's series must end"

    m0 = scrape()
    direct_io(os.path.join(second, "g"), "write", 4096, 20)
    m1 = scrape()
    assert count(m1, loop.name, **want_labels(pv2, c2)) - count(m0, loop.name, **want_labels(pv2, c2)) >= 20


def test_api_server_outage(cluster, agent, scrape, node, loop_factory):
    """API server hung (SIGSTOP), then gone (killed): /metrics answers at once with the last labels.
    Restarted: the watch reconnects and a PV created afterwards labels its device. Must stay last."""
    loop, late = loop_factory(32 << 20), loop_factory(32 << 20)
    pv, claim = name("pv-out"), (NS_A, name("claim-out"))
    create_pv(cluster, pv, claim, block=True)
    uid = node.pod()
    node.block_link(uid, pv, loop.path)
    direct_io(loop.path, "write", 4096, 1)
    want = want_labels(pv, claim)
    wait_labels(scrape, agent, loop.name, want)

    def still_labelled(what):
        t0 = time.monotonic()
        samples = scrape()
        assert time.monotonic() - t0 < 5, f"{what}: a scrape must not wait for the API server"
        assert labels_on(samples, loop.name) == [want], f"{what}:\n{describe(samples, loop.name)}"
        assert info_rows(samples, loop.name) == [{**want, "storageclass": "fast", "shared": "false"}], what

    pid = cluster.apiserver_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        still_labelled("API server stopped")
        time.sleep(6)  # past the 5 s discovery reuse: the next scrape scans again
        still_labelled("API server stopped, after a rescan")
    finally:
        os.kill(pid, signal.SIGCONT)

    cluster.kill_apiserver()
    # A PV set up on the node while the API server is away; its object is created once it is back.
    pv_late, claim_late = name("pv-late"), (NS_B, name("claim-late"))
    node.block_link(uid, pv_late, late.path)
    direct_io(late.path, "write", 4096, 1)
    time.sleep(6)
    still_labelled("API server killed, after a rescan")

    cluster.restart_apiserver()
    create_pv(cluster, pv_late, claim_late, block=True)
    want_late = want_labels(pv_late, claim_late)
    samples = wait_labels(scrape, agent, late.name, want_late, timeout=WATCH_TIMEOUT)
    assert info_rows(samples, late.name) == [{**want_late, "storageclass": "fast", "shared": "false"}]
    assert labels_on(samples, loop.name) == [want]
    direct_io(late.path, "write", 4096, 9)
    assert count(scrape(), late.name, **want_late) - count(samples, late.name, **want_late) == 9
