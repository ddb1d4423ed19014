"""Benchmarks of the node-agent (not tests: they report numbers, they do not pass or fail).

Each figure is the median of alternating runs, so drift on a shared VM hits every variant alike:
- BPF time per IO for each attach mode: kernel.bpf_stats_enabled run_time_ns of the started
  agent's own programs / IOs completed (and the share of the bio programs);
- fio 4k random-read IOPS on a /dev/shm-backed loop device without and with the agent;
- /metrics latency (p50/p99/max), bytes on the wire (text, gzip, protobuf), agent CPU per scrape
  and RSS with 64, 256 and 1024 loop devices that all did IO (--scales or BENCH_SCALES picks the
  counts; --only-scrape skips the per-IO rows).

With BIO_AGENT_BIN_BASELINE set to another build, the BPF time per IO is measured for both,
alternating in every round, so a change to the programs is compared side by side.
"""
import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "lib"))
from biotest.agent import RELEASE_AGENT_BIN, agent_prog_ids, cpu_seconds, rss_mib, running_agent  # noqa: E402
from biotest.blockdev import LoopDevice, loop_devices, read_and_write_once  # noqa: E402
from biotest.util import sh  # noqa: E402

AGENT = RELEASE_AGENT_BIN
BASELINE = os.environ.get("BIO_AGENT_BIN_BASELINE")
PROGRAM_PREFIXES = ("btf_", "raw_", "tp_rq", "kp_rq")


@contextlib.contextmanager
def loop_device(size=256 << 20):
    dev = LoopDevice(size, prefix="bio-bench-")
    try:
        yield dev.path
    finally:
        dev.detach()


def fio_randread(dev, seconds):
    out = sh("fio", "--name=bench", f"--filename={dev}", "--rw=randread", "--bs=4k", "--direct=1",
             "--ioengine=psync", "--iodepth=1", "--time_based", f"--runtime={seconds}",
             "--output-format=json").stdout
    job = json.loads(out)["jobs"][0]["read"]
    return job["iops"], job["total_ios"]


def read_ios(dev):
    with open(f"/sys/block/{os.path.basename(dev)}/stat") as f:
        return int(f.read().split()[0])


def prog_stats(ids):
    progs = json.loads(sh("bpftool", "-j", "prog", "show").stdout)
    return {p["id"]: (p.get("run_time_ns", 0), p.get("run_cnt", 0), p.get("name", ""))
            for p in progs if p["id"] in ids and p.get("name", "").startswith(PROGRAM_PREFIXES)}


def bpf_ns_per_io(dev, mode, seconds, binary=None):
    """BPF ns per IO of every program, and of the bio programs alone."""
    with running_agent("--attach", mode, binary=binary or AGENT) as agent:
        ids = agent_prog_ids(agent.proc.pid)
        before, ios0 = prog_stats(ids), read_ios(dev)
        fio_randread(dev, seconds)
        after, ios1 = prog_stats(ids), read_ios(dev)
    ios = max(1, ios1 - ios0)
    spent = {i: after[i][0] - before.get(i, (0, 0))[0] for i in after}
    bio = sum(ns for i, ns in spent.items() if "_bio_" in after[i][2])
    return sum(spent.values()) / ios, bio / ios


SCRAPE_ACCEPT = {
    "text": {},
    "gzip": {"Accept-Encoding": "gzip"},
    "protobuf": {"Accept": "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;"
                 "encoding=delimited;q=0.7,text/plain;version=0.0.4;q=0.3"},
}


def scrape_cost(n_devices, scrapes):
    """/metrics latency, size and agent CPU per scrape for each format, with n_devices loop devices
    that all did IO. Formats (and, with BIO_AGENT_BIN_BASELINE, the two builds, both running at
    once on the same devices) alternate scrape by scrape, so load drift hits them alike."""
    builds = [("this", AGENT)] + ([("baseline", BASELINE)] if BASELINE else [])
    with contextlib.ExitStack() as stack:
        devs = stack.enter_context(loop_devices(n_devices))
        running = [(build, stack.enter_context(running_agent("--device-include", "^loop[0-9]+$", binary=binary)))
                   for build, binary in builds]
        agents = [(build, a.proc, a.url) for build, a in running]
        for d in devs:
            read_and_write_once(d.path)
        sh("blkdiscard", devs[0].path)
        for _, _, url in agents:
            for _ in range(3):  # warm up: first-scrape attach decisions, allocator
                urllib.request.urlopen(url + "/metrics", timeout=60).read()
        keys = [(build, fmt) for build, _, _ in agents for fmt in SCRAPE_ACCEPT]
        times = {k: [] for k in keys}
        size = {}
        cpu = {k: 0.0 for k in keys}
        text = {}
        for _ in range(scrapes):
            for fmt, headers in SCRAPE_ACCEPT.items():
                for build, proc, url in agents:
                    req = urllib.request.Request(url + "/metrics", headers=headers)
                    c0 = cpu_seconds(proc.pid)
                    t0 = time.perf_counter()
                    with urllib.request.urlopen(req, timeout=60) as resp:
                        body = resp.read()  # urllib does not decompress: this is the wire size
                    times[(build, fmt)].append((time.perf_counter() - t0) * 1000)
                    cpu[(build, fmt)] += cpu_seconds(proc.pid) - c0
                    size[(build, fmt)] = len(body)
                    if fmt == "text":
                        text[build] = body.decode()
        rss = {build: rss_mib(proc.pid) for build, proc, _ in agents}
    rows = []
    for build, fmt in keys:
        t = sorted(times[(build, fmt)])
        full = next((l.rsplit(" ", 1)[1] for l in text[build].splitlines()
                     if l.startswith('ebpf_bio_lost_events_total{reason="hist_map_full"')), "?")
        rows.append({"devices": n_devices, "build": build, "format": fmt,
                     "series": text[build].count("ebpf_bio_req_latency_count{"),
                     "hist_map_full": full, "rss_mib": rss[build], "bytes": size[(build, fmt)],
                     "p50_ms": statistics.median(t), "p99_ms": t[max(0, int(len(t) * 0.99) - 1)],
                     "max_ms": t[-1], "cpu_ms": cpu[(build, fmt)] / len(t) * 1000})
    return rows


def print_scrape_cost(results, scrapes):
    print(f"\n## /metrics with N loop devices that all did IO ({scrapes} scrapes per format, "
          "formats alternating; CPU from /proc/PID/stat, RSS after the last scrape)")
    print("| devices | build | series (latency) | format | bytes | p50 ms | p99 ms | max ms "
          "| agent CPU ms/scrape | agent RSS MiB | lost hist_map_full |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for rows in results:
        for r in rows:
            print(f"| {r['devices']} | {r['build']} | {r['series']} | {r['format']} | {r['bytes']} "
                  f"| {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.2f} | {r['cpu_ms']:.2f} "
                  f"| {r['rss_mib']:.1f} | {r['hist_map_full']} |")


def load_average():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--modes", default="tp_btf,raw_tp,tracepoint")
    ap.add_argument("--scales", default=os.environ.get("BENCH_SCALES", "64,256,1024"),
                    help="device counts for the /metrics rows (env BENCH_SCALES), e.g. 64")
    ap.add_argument("--scrapes", type=int, default=200, help="scrapes per format and scale")
    ap.add_argument("--only-scrape", action="store_true",
                    help="skip the BPF-per-IO and IOPS rows")
    args = ap.parse_args()
    # A terminated bench still detaches its loop devices (the finally blocks run on SystemExit).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    scales = [int(n) for n in args.scales.split(",") if n]
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root (it loads BPF and makes loop devices)")
    if not os.path.isdir("/sys/kernel/tracing/events/block"):
        subprocess.run(["mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing"])
    modes = args.modes.split(",")
    print(f"# node-agent benchmark: {os.uname().release}, {os.cpu_count()} CPUs, rounds={args.rounds}, "
          f"{AGENT}, load average {load_average()} at start")
    if not args.only_scrape:
        per_io_and_iops(args, modes)
    results = [scrape_cost(n, args.scrapes) for n in scales]
    print_scrape_cost(results, args.scrapes)
    print(f"\n# load average {load_average()} at the end")


def per_io_and_iops(args, modes):
    with open("/proc/sys/kernel/bpf_stats_enabled") as f:
        stats_was = f.read().strip()
    with loop_device() as dev:
        fio_randread(dev, 1)  # warm the page cache of the backing file
        variants = [(m, None) for m in modes] + [(m, BASELINE) for m in modes if BASELINE]
        per_io = {v: [] for v in variants}
        bio_per_io = {v: [] for v in variants}
        iops = {"without": [], "with": []}
        try:
            sh("sysctl", "-q", "kernel.bpf_stats_enabled=1")
            for _ in range(args.rounds):
                for m, binary in variants:
                    total, bio = bpf_ns_per_io(dev, m, args.seconds, binary)
                    per_io[(m, binary)].append(total)
                    bio_per_io[(m, binary)].append(bio)
        finally:
            sh("sysctl", "-q", f"kernel.bpf_stats_enabled={stats_was}")
        for _ in range(args.rounds):
            iops["without"].append(fio_randread(dev, args.seconds)[0])
            with running_agent(binary=AGENT):
                iops["with"].append(fio_randread(dev, args.seconds)[0])
    print("\n## BPF time per IO (fio 4k randread, psync, loop on /dev/shm; includes bpf_stats' own ~84 ns per program run)")
    print("| mode | build | median ns/IO | runs | of it bio programs (median) |")
    print("|---|---|---|---|---|")
    for (m, binary), runs in per_io.items():
        build = "baseline" if binary else "this"
        bio = statistics.median(bio_per_io[(m, binary)])
        print(f"| {m} | {build} | {statistics.median(runs):.0f} | {', '.join(f'{v:.0f}' for v in runs)} | {bio:.0f} |")
    w, wo = statistics.median(iops["with"]), statistics.median(iops["without"])
    print("\n## fio 4k random-read IOPS, one job, iodepth 1")
    print("| without agent | with agent (auto) | ratio |")
    print("|---|---|---|")
    print(f"| {wo:.0f} | {w:.0f} | {w / wo:.3f} |")


if __name__ == "__main__":
    sys.exit(main())
