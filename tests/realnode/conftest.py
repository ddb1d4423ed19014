"""One cluster with a real node for the whole tests/realnode session (it takes ~10 s warm to
start, and the tests walk one user's path in order). The host is snapshotted before it starts;
test_zz_host_is_as_before tears it down and compares."""
import os
import subprocess
import sys
import tempfile

import pytest

from biotest.host_state import snapshot
from biotest.realnode import CLUSTER, RealCluster

IMAGES = [a for a in os.environ.get("BIO_IMAGE_ARCHIVES", "").split(":") if a]
# One user's session, in this order; the last module tears the cluster down and checks the host.
MODULE_ORDER = ["test_real_node.py", "test_prometheus_operator.py", "test_zz_host_clean.py"]


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.fspath.basename
        return MODULE_ORDER.index(name) if name in MODULE_ORDER else len(MODULE_ORDER) - 1
    items.sort(key=rank)  # stable: file order within a module


@pytest.fixture(scope="session")
def host_before():
    if os.geteuid() != 0:
        pytest.skip("SKIPPED LOUDLY: a real node needs root (namespaces, mounts, cgroups, BPF)")
    return snapshot()


@pytest.fixture(scope="session")
def cluster(host_before):
    assert IMAGES, "BIO_IMAGE_ARCHIVES is empty: run through tests/realnode/run.sh (make test-real-node)"
    workdir = tempfile.mkdtemp(prefix="bio-realnode-")
    c = None
    try:
        r = subprocess.run([os.path.join(CLUSTER, "up.sh"), workdir, "--real-nodes", "1"],
                           capture_output=True, text=True, timeout=900)
        sys.stderr.write(r.stderr[-4000:])
        assert r.returncode == 0, f"up.sh --real-nodes 1 failed:\n{r.stderr[-6000:]}"
        subprocess.run([os.path.join(CLUSTER, "load-images.sh"), workdir, *IMAGES], check=True,
                       capture_output=True, timeout=300)
        c = RealCluster(workdir)
        c.host_before = host_before
        yield c
    finally:
        subprocess.run([os.path.join(CLUSTER, "down.sh"), workdir], capture_output=True, timeout=300)
        if c is None or not getattr(c, "keep_logs", False):
            subprocess.run(["rm", "-rf", workdir])
