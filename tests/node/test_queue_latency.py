"""Queue time (ebpf_bio_req_queue_latency) on a loop device behind mq-deadline, under a load that
builds a queue: it appears, in the latency family's buckets, and leaves the service time alone."""
import json
import subprocess

import pytest

from biotest.agent import ITEM4_UNEXPLAINED
from biotest.blockdev import read_stat, stat_delta
from biotest.exposition import contract_block, le_sequence, sample
from biotest.util import require_tool, sh

QUEUE = "ebpf_bio_req_queue_latency"
LAT = "ebpf_bio_req_latency"
IOS = 4096


def use_mq_deadline(dev):
    path = f"/sys/block/{dev}/queue/scheduler"
    try:
        with open(path) as f:
            offered = f.read()
        if "mq-deadline" not in offered.split() and "[mq-deadline]" not in offered.split():
            pytest.skip(f"SKIPPED LOUDLY: {path} offers no mq-deadline ({offered.strip()}); "
                        "the kernel needs CONFIG_MQ_IOSCHED_DEADLINE for the queue-time test")
        with open(path, "w") as f:
            f.write("mq-deadline")
        with open(path) as f:
            assert "[mq-deadline]" in f.read()
    except OSError as e:
        pytest.skip(f"SKIPPED LOUDLY: cannot switch {dev} to mq-deadline ({e})")


def driver_tags(dev):
    with open(f"/sys/block/{dev}/mq/0/nr_tags") as f:
        return int(f.read())


def queued_writes(dev, path):
    """4 KiB O_DIRECT random writes from one submitter with twice the driver's tags in flight
    (loop has 128): the requests beyond them wait in mq-deadline until a completion frees a tag.
    Fewer in flight never wait on a loop device, whose driver takes every request at once; more
    than one submitting task can make the kernel's per-plug cached clock put a queue stamp after
    an issue stamp (README, "Queue time"), which the test would then have to explain."""
    require_tool("fio")
    depth = 2 * driver_tags(dev)
    r = subprocess.run(
        ["fio", "--name=queue", f"--filename={path}", "--rw=randwrite", "--bs=4k",
         f"--number_ios={IOS}", f"--size={IOS * 4096}", "--ioengine=libaio", "--direct=1",
         f"--iodepth={depth}", "--norandommap", "--output-format=json"],
        capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)["jobs"][0]
    return job["write"]["total_ios"]


@pytest.mark.parametrize("mode", ["tp_btf", "raw_tp"])
def test_queue_time_appears_beside_unchanged_service_time(agent_factory, loop, mode):
    use_mq_deadline(loop.name)
    agent = agent_factory("--attach", mode, "--device-include", f"^{loop.name}$")
    m0, s0 = agent.samples(), read_stat(loop.name)
    issued = queued_writes(loop.name, loop.path)
    text = agent.metrics_text()
    s1 = read_stat(loop.name)
    d = stat_delta(s0, s1)
    dev = {"device": loop.name, "operation": "write", "node": "test-node"}
    m1 = agent.samples()
    delta = lambda name, **l: sample(m1, name, **dev, **l) - sample(m0, name, **dev, **l)

    service = delta(f"{LAT}_count")
    queued = delta(f"{QUEUE}_count")
    # Service time is what it was without the feature: one observation per IO the kernel counted.
    assert d["write_ios"] - ITEM4_UNEXPLAINED <= service <= d["write_ios"], f"stat delta {d}"
    assert d["write_ios"] >= issued * 0.5, f"fio issued {issued}, the disk saw {d}"
    # Every one of these writes is accounted (RQF_IO_STAT), so every one has a queue time, counted
    # at the same completion: the two counts agree exactly.
    assert queued == service, f"queue count {queued} vs service count {service}"
    # Queue time is real: part of the requests waited longer than the lowest bucket (1 µs).
    assert queued - delta(f"{QUEUE}_bucket", le="1") > 0
    assert delta(f"{QUEUE}_sum") > 0
    assert delta(f"{QUEUE}_bucket", le="+Inf") == queued
    # The seed's latency buckets, the same `le` strings.
    _, les = contract_block(LAT)
    mine = [l for l in text.splitlines() if f'device="{loop.name}",operation="write"' in l]
    assert le_sequence(mine, QUEUE) == les


def test_classic_tracepoints_export_no_queue_time(agent_factory, loop):
    """Documented in README: the classic tracepoints carry no request stamps, so no series."""
    agent = agent_factory("--attach", "tracepoint", "--device-include", f"^{loop.name}$")
    sh("dd", "if=/dev/zero", f"of={loop.path}", "bs=4096", "count=50", "oflag=direct", "status=none")
    m = agent.samples()
    dev = {"device": loop.name, "operation": "write", "node": "test-node"}
    assert sample(m, f"{LAT}_count", **dev) == 50
    assert not [n for n, l, _ in m if n.startswith(QUEUE) and l.get("device") == loop.name]
    assert f"# TYPE {QUEUE} histogram" in agent.metrics_text()
