#!/usr/bin/env python3
"""Scrape cost of the node-agent with many devices: a measurement, not a test.

As root: makes N loop devices (default 64) backed by /dev/shm, starts one agent measuring only
them, issues on each device 4 KiB O_DIRECT reads, 64 KiB O_DIRECT writes followed by fsync (a
flush: loop devices have a write-back cache) and a 1 MiB discard, so every device has four
operations. Then:

  - fetches /metrics N times sequentially from 127.0.0.1 (text format; protobuf as well when the
    agent serves it) and reports bytes per scrape and the client-side time per scrape;
  - lets Prometheus servers scrape the agent (--interval, 2 s) and reports their own
    scrape_samples_scraped, scrape_series_added, scrape_duration_seconds and
    scrape_body_size_bytes for the target: Debian's 2.42 always, Prometheus 3.x when
    BIO_PROMETHEUS3 (or --prometheus3) names a binary; classic (text) and native (protobuf).

Prints a Markdown table and writes the raw figures as JSON (--json). Everything it makes is
removed at the end. Usage (as root): make bench-scrape, or

  BIO_PROMETHEUS3=$(tests/prometheus/build.sh | tail -1) python3 bench/prometheus_scrape.py
"""
import argparse
import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "lib"))
from biotest.agent import RELEASE_AGENT_BIN, Agent  # noqa: E402
from biotest.blockdev import LoopDevice, direct_io  # noqa: E402
from biotest.exposition import PROTOBUF_ACCEPT  # noqa: E402
from biotest.prometheus import PROMETHEUS2, PROMETHEUS3, PrometheusServer, binary_version  # noqa: E402
from biotest.util import sh  # noqa: E402

TEXT_ACCEPT = "text/plain;version=0.0.4"


def fetch(url, accept):
    req = urllib.request.Request(url, headers={"Accept": accept})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=30) as r:
        body = r.read()
        ctype = r.headers.get("Content-Type", "")
        enc = r.headers.get("Content-Encoding", "")
    return time.perf_counter() - t0, body, ctype, enc


def time_scrapes(agent, accept, n, warmup=3):
    for _ in range(warmup):
        fetch(agent.url + "/metrics", accept)
    times, sizes = [], set()
    ctype = enc = ""
    body = b""
    for _ in range(n):
        dt, body, ctype, enc = fetch(agent.url + "/metrics", accept)
        times.append(dt)
        sizes.add(len(body))
    times.sort()
    return {
        "content_type": ctype, "content_encoding": enc or "identity",
        "bytes": max(sizes), "bytes_min": min(sizes), "scrapes": n,
        # What the body would be gzip'd (Prometheus sends Accept-Encoding: gzip), for reference.
        "bytes_gzip6": len(gzip.compress(body, 6)) if not enc else None,
        "ms_median": 1e3 * statistics.median(times),
        "ms_p90": 1e3 * times[int(0.9 * (n - 1))],
        "ms_max": 1e3 * times[-1],
    }


def issue_io(dev):
    direct_io(dev.path, "read", 4096, 4)
    sh("dd", "if=/dev/zero", f"of={dev.path}", "bs=65536", "count=4", "oflag=direct",
            "conv=fsync", "status=none")
    sh("blkdiscard", "-o", str(8 << 20), "-l", str(1 << 20), dev.path)


def prometheus_figures(binary, agent, label, native, interval, settle_scrapes=6):
    """Starts a server, lets it scrape the agent settle_scrapes times, reads its figures."""
    job = {"job_name": "bio", "scrape_interval": f"{interval}s", "scrape_timeout": f"{interval}s",
           "static_configs": [{"targets": [f"127.0.0.1:{agent.port}"]}]}
    flags, glob = [], {}
    major = binary_version(binary)[0]
    if major >= 3:
        glob["extra_scrape_metrics"] = True  # scrape_body_size_bytes etc. (3.16: a config option)
        if native:
            job["scrape_native_histograms"] = True
    else:
        features = ["extra-scrape-metrics"] + (["native-histograms"] if native else [])
        flags.append("--enable-feature=" + ",".join(features))
    glob.update(scrape_interval=f"{interval}s", scrape_timeout=f"{interval}s")
    prom = PrometheusServer(binary, [job], flags=flags, global_config=glob, name="bench")
    window = f"{interval * (settle_scrapes + 2)}s"
    try:
        prom.wait_for(lambda: (prom.scalar(f'count_over_time(up{{job="bio"}}[{window}])') or 0)
                      >= settle_scrapes, interval * settle_scrapes + 30, f"{settle_scrapes} scrapes")
        sel = '{job="bio"}'
        q = prom.scalar
        fig = {
            "server": label, "version": ".".join(map(str, prom.version)), "native": native,
            "up": q(f"up{sel}"),
            "scrape_samples_scraped": q(f"scrape_samples_scraped{sel}"),
            "scrape_series_added_max": q(f"max_over_time(scrape_series_added{sel}[{window}])"),
            "scrape_duration_ms_avg": 1e3 * q(f"avg_over_time(scrape_duration_seconds{sel}[{window}])"),
            "scrape_duration_ms_median": 1e3 * q(f"quantile_over_time(0.5, scrape_duration_seconds{sel}[{window}])"),
            "scrape_duration_ms_max": 1e3 * q(f"max_over_time(scrape_duration_seconds{sel}[{window}])"),
            "scrape_body_size_bytes": q(f"scrape_body_size_bytes{sel}"),
            "histogram_series": len(prom.series('{__name__=~"ebpf_bio_req_(size|latency)(_bucket|_count|_sum)?"}')),
        }
        return fig
    finally:
        prom.stop()


def machine():
    def first(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return ""
    model = ""
    for line in first(["lscpu"]).splitlines():
        if line.startswith("Model name:"):
            model = line.split(":", 1)[1].strip()
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    return {"cpu": model, "cores": os.cpu_count(), "mem_gib": round(mem_kib / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "loadavg": os.getloadavg()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=64)
    ap.add_argument("--scrapes", type=int, default=50, help="timed client scrapes per format")
    ap.add_argument("--agent", default=RELEASE_AGENT_BIN, help="node-agent binary (default %(default)s)")
    ap.add_argument("--prometheus2", default=PROMETHEUS2)
    ap.add_argument("--prometheus3", default=PROMETHEUS3)
    ap.add_argument("--interval", type=int, default=2, help="Prometheus scrape interval = timeout, s")
    ap.add_argument("--json", help="write the raw figures here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("prometheus_scrape.py: run as root (it loads BPF and makes loop devices)")
    if not os.path.isdir("/sys/kernel/tracing/events/block"):
        sh("mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing", check=False)

    devs, agent = [], None
    result = {"machine": machine(), "devices": args.devices, "agent": args.agent}
    try:
        for _ in range(args.devices):
            devs.append(LoopDevice(16 << 20))
        names = [d.name for d in devs]
        agent = Agent(["--device-include", "^(" + "|".join(names) + ")$"], binary=args.agent)
        t0 = time.time()
        for d in devs:
            issue_io(d)
        result["io_seconds"] = round(time.time() - t0, 1)

        samples = agent.samples()
        pairs = {(l["device"], l["operation"]) for n, l, _ in samples
                 if n == "ebpf_bio_req_latency_count" and l.get("device") in names}
        ops = sorted({op for _, op in pairs})
        result.update(device_operation_pairs=len(pairs), operations=ops,
                      text_sample_lines=len(samples))
        print(f"# {len(names)} devices, operations {ops}: {len(pairs)} device/operation pairs, "
              f"{len(samples)} sample lines in the text exposition", file=sys.stderr)

        result["text"] = time_scrapes(agent, TEXT_ACCEPT, args.scrapes)
        ctype = fetch(agent.url + "/metrics", PROTOBUF_ACCEPT)[2]
        if ctype.startswith("application/vnd.google.protobuf"):
            result["protobuf"] = time_scrapes(agent, PROTOBUF_ACCEPT, args.scrapes)
        else:
            result["protobuf"] = None

        result["prometheus"] = []
        servers = [("2.42 (Debian)", args.prometheus2)]
        if args.prometheus3:
            servers.append(("3.x (build.sh)", args.prometheus3))
        for label, binary in servers:
            if not binary or not os.access(binary, os.X_OK):
                print(f"# {label}: {binary!r} is not an executable; skipped", file=sys.stderr)
                continue
            for native in (False, True):
                if native and result["protobuf"] is None:
                    continue
                fig = prometheus_figures(binary, agent, label, native, args.interval)
                print(f"# {fig}", file=sys.stderr)
                result["prometheus"].append(fig)
    finally:
        if agent:
            agent.stop()
        for d in devs:
            d.detach()

    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print_markdown(result)


def print_markdown(r):
    m = r["machine"]
    print(f"Machine: {m['cpu']}, {m['cores']} cores, {m['mem_gib']} GiB, kernel {m['kernel']}, "
          f"load average at start {m['loadavg'][0]:.1f}")
    print(f"Agent: {r['agent']}; {r['devices']} loop devices × {len(r['operations'])} operations "
          f"({', '.join(r['operations'])}) = {r['device_operation_pairs']} device/operation pairs\n")
    print("| format | bytes per scrape | gzip -6 of it | client time per scrape: median / p90 / max (ms) |")
    print("|---|---:|---:|---:|")
    for key in ("text", "protobuf"):
        x = r.get(key)
        if x:
            gz = f"{x['bytes_gzip6']:,}" if x.get("bytes_gzip6") else "served compressed"
            print(f"| {key} (`{x['content_type']}`, {x['content_encoding']}) | {x['bytes']:,} | {gz} | "
                  f"{x['ms_median']:.1f} / {x['ms_p90']:.1f} / {x['ms_max']:.1f} |")
        else:
            print(f"| {key} | TODO: agent has no protobuf exposition | | |")
    print()
    print("| server | histograms | scrape_samples_scraped | histogram series stored | "
          "scrape_duration_seconds median / avg / max (ms) | scrape_body_size_bytes |")
    print("|---|---|---:|---:|---:|---:|")
    for f in r["prometheus"]:
        print(f"| {f['server']} {f['version']} | {'native (protobuf)' if f['native'] else 'classic (text)'} "
              f"| {f['scrape_samples_scraped']:.0f} | {f['histogram_series']} "
              f"| {f['scrape_duration_ms_median']:.1f} / {f['scrape_duration_ms_avg']:.1f} / {f['scrape_duration_ms_max']:.1f} "
              f"| {f['scrape_body_size_bytes']:,.0f} |" if f['scrape_body_size_bytes'] is not None else "| n/a |")


if __name__ == "__main__":
    main()
