"""Counts under a mixed load: random reads and writes at queue depth 16 with discards alongside.

The agent's counts per operation plus the losses it reports must equal what the kernel completed:
/sys/block/DEV/stat, and the block_rq_complete events the kernel's own tracer recorded for the
disk (a second, independent count on the very tracepoint the programs run on).
"""
import os
import random
import subprocess
import time

import pytest

from conftest import CompletionTrace, read_stat, require_tool, sample, sh, stat_delta

LAT = "ebpf_bio_req_latency"
SECONDS = 10
OPS = {"read": "read_ios", "write": "write_ios", "discard": "discard_ios"}


def quiesced_stat(dev, quiet=1.0, timeout=30.0):
    """/sys/block/DEV/stat once nothing is in flight and no counter moved for `quiet` seconds.

    Nothing else on this machine opens the test's loop device (no udev to run blkid after a
    close-after-write), so a quiet device stays quiet while the agent is read.
    """
    deadline = time.time() + timeout
    last, since = read_stat(dev), time.time()
    while time.time() < deadline:
        time.sleep(0.05)
        now = read_stat(dev)
        if now != last or now["in_flight"]:
            last, since = now, time.time()
        elif time.time() - since >= quiet:
            return now
    raise AssertionError(f"{dev} did not go idle within {timeout}s: {last}")


def lost_total(samples):
    return sum(v for n, _, v in samples if n == "ebpf_bio_lost_events_total")


# The default mode, and classic tracepoints, whose programs the kernel runs through perf and
# whose skipped runs it does count (program_recursion).
@pytest.mark.parametrize("mode", ["tp_btf", "tracepoint"])
def test_randrw_with_concurrent_discards_counts_every_completion(agent_factory, loop_factory, request, mode):
    require_tool("fio")
    require_tool("blkdiscard")
    loop = loop_factory(size_bytes=256 << 20)
    trace = CompletionTrace(loop.path)
    request.addfinalizer(trace.close)
    agent = agent_factory("--attach", mode, "--device-include", f"^{loop.name}$")

    s0 = quiesced_stat(loop.name)
    trace.clear()
    m0 = agent.samples()
    fio = subprocess.Popen(
        ["fio", "--name=mix", f"--filename={loop.path}", "--rw=randrw", "--bs=4k", "--direct=1",
         "--ioengine=libaio", "--iodepth=16", f"--runtime={SECONDS}", "--time_based",
         "--output=/dev/null"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # 1 MiB discards at random places while fio runs: each is a request of its own, racing the
    # reads and writes on the same queue.
    rnd, discards = random.Random(13), 0
    while fio.poll() is None:
        sh("blkdiscard", "-o", str(rnd.randrange(0, 255) << 20), "-l", str(1 << 20), loop.path)
        discards += 1
        time.sleep(0.05)
    assert fio.returncode == 0, fio.stderr.read()
    s1 = quiesced_stat(loop.name)
    m1 = agent.samples()
    traced = trace.counts()
    d = stat_delta(s0, s1)
    assert read_stat(loop.name) == s1, "the device was not quiet while the agent was read"

    dev = {"device": loop.name}
    agent_counts = {op: sample(m1, f"{LAT}_count", operation=op, **dev)
                    - sample(m0, f"{LAT}_count", operation=op, **dev) for op in OPS}
    stat_counts = {op: d[field] for op, field in OPS.items()}
    traced_counts = {op: traced[op] for op in OPS}
    lost = lost_total(m1) - lost_total(m0)
    report = f"{mode}: agent {agent_counts}, stat {stat_counts}, tracefs {traced_counts}, lost {lost}"

    # The comparison itself is exact: every completion stat counted passed the tracepoint.
    assert traced_counts == stat_counts, report
    assert discards > 0 and stat_counts["discard"] >= discards, report
    # Never more than the kernel completed: discards split into several requests, merged
    # requests and requeues are each counted once.
    assert all(agent_counts[op] <= stat_counts[op] for op in OPS), report
    missing = sum(stat_counts[op] - agent_counts[op] for op in OPS)
    if missing <= lost:
        return  # every completion is either in the histograms or in a reported loss
    # Measured on kernel 6.18 (docs/performance.md, "Counts under a mixed load"): now and then a
    # burst of completions that the kernel's tracer records on this tracepoint never runs our
    # programs, and the kernel counts no recursion miss for them. Not ours to fix and not yet
    # detected by the agent: visible as XFAIL, a hard failure with BIO_STRICT_MIXED=1.
    if os.environ.get("BIO_STRICT_MIXED") != "1":
        pytest.xfail(f"{missing} completions never reached the BPF programs and no loss was reported: {report}")
    pytest.fail(f"{missing} completions neither counted nor reported lost: {report}")
