"""Runs last (file order): tear the real-node cluster down and find nothing of it on the host —
processes, namespaces, mounts, cgroups, links, rules, sysctls, paths, loop devices, BPF."""
import os
import subprocess
import time

from biotest.host_state import diff, snapshot
from biotest.realnode import REPO, record


def test_zz_host_is_as_before(cluster):
    c = cluster
    t0 = time.monotonic()
    r = subprocess.run([os.path.join(REPO, "tests", "cluster", "down.sh"), c.workdir], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    record("down_s", round(time.monotonic() - t0, 1))
    # The loop device the PV test made is detached by down.sh (listed in <workdir>/loops).
    loop = getattr(cluster, "loop", None)
    if loop:
        os.unlink(loop.backing)
    problems = diff(c.host_before, snapshot())
    assert not problems, "\n".join(problems)
