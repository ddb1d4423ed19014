"""A real node-agent scraped by a real Prometheus server, queried through its HTTP API.

Each case: a loop device in /dev/shm, an agent on loopback measuring only it, a Prometheus server
on a free 127.0.0.1 port scraping the agent every second, known O_DIRECT IO (4 KiB reads, 64 KiB
writes) for longer than three scrapes, then PromQL over what Prometheus stored. Run against
Debian's Prometheus 2.42 (/usr/bin/prometheus) and a current 3.x (BIO_PROMETHEUS3, built by
build.sh). See README.md beside this file for what each server stores.
"""
import math

import pytest

from biotest.exposition import normalized_le
from biotest.prometheus import (NODE, agent_counts, agent_le, agent_serves_protobuf, issue_io, prometheus_binary,
                                scrape_config, wait_counts_stored, wait_target_up)

SERVERS = ["prometheus2", "prometheus3"]
# issue_io's 4 KiB reads and 64 KiB writes: size buckets le=4 and le=64, so a median in (2, 4]
# and in (32, 64].
EXPECTED_SIZE_BUCKET = {"read": (2.0, 4.0), "write": (32.0, 64.0)}
SERIES_LABELS = {"__name__", "device", "operation", "node", "instance", "job"}


# ---------------------------------------------------------------------------------- helpers

def bucket_index(q):
    """k such that q lies in (2^(k-1), 2^k]: the log2 bucket a quantile falls in."""
    return math.ceil(math.log2(q) - 1e-9)


def observed_range(prom, metric, dev, op):
    """(lower, upper): the bound below the first bucket with any count and the first bound
    holding every count, from the stored cumulative buckets."""
    res = prom.query(f'sum by (le) ({metric}_bucket{{device="{dev}",operation="{op}"}})')
    buckets = sorted((float(r["metric"]["le"]), float(r["value"][1])) for r in res)
    assert buckets and math.isinf(buckets[-1][0]), f"{metric} {op}: no +Inf bucket in {res}"
    total = buckets[-1][1]
    assert total > 0, f"{metric} {op}: no counts stored"
    lower = max([le for le, c in buckets if c == 0], default=0.0)
    upper = min(le for le, c in buckets if c == total)
    return lower, upper


def classic_quantile(prom, metric, dev, op, rate=True):
    inner = f'{metric}_bucket{{device="{dev}",operation="{op}"}}'
    if rate:
        inner = f"rate({inner}[1m])"
    return prom.scalar(f"histogram_quantile(0.5, sum by (le, device, operation) ({inner}))")


def native_quantile(prom, metric, dev, op, rate=True):
    inner = f'{metric}{{device="{dev}",operation="{op}"}}'
    if rate:
        inner = f"rate({inner}[1m])"
    return prom.scalar(f"histogram_quantile(0.5, sum by (device, operation) ({inner}))")


def assert_io_spanned_scrapes(prom, dev, native=False):
    """The counts changed between at least three stored scrapes: the IO spanned them."""
    for op in ("read", "write"):
        sel = f'ebpf_bio_req_size{"" if native else "_count"}{{device="{dev}",operation="{op}"}}'
        series = prom.query(f"{sel}[1m]")
        assert len(series) == 1, series
        key = "histograms" if native else "values"
        points = series[0].get(key, [])
        if native:
            counts = [float(h[1]["count"]) for h in points]
        else:
            counts = [float(v[1]) for v in points]
        distinct = sorted(set(counts))
        assert len(distinct) >= 3, (
            f"{op}: the IO should show in at least 3 scrapes, stored counts were {counts}")


def assert_classic_quantiles(prom, dev):
    for op, (lo, hi) in EXPECTED_SIZE_BUCKET.items():
        q = classic_quantile(prom, "ebpf_bio_req_size", dev, op)
        assert q is not None and lo < q <= hi, (
            f"size median of {op}s of {hi:g} KiB: {q}, expected in ({lo:g}, {hi:g}]")
        lat = classic_quantile(prom, "ebpf_bio_req_latency", dev, op)
        assert lat is not None and math.isfinite(lat) and lat > 0, f"latency median of {op}s: {lat}"
        lower, upper = observed_range(prom, "ebpf_bio_req_latency", dev, op)
        assert math.isfinite(upper), f"{op}: IOs above the largest latency bucket?"
        assert lower <= lat <= upper, (
            f"latency median of {op}s {lat} µs outside the observed buckets ({lower:g}, {upper:g}]")


def assert_classic_series(prom, agent, dev, normalized):
    """Labels device, operation, node (+ le on buckets), and le as this server stores it."""
    for metric in ("ebpf_bio_req_size", "ebpf_bio_req_latency"):
        series = prom.series(f'{{__name__=~"{metric}_(bucket|count|sum)",device="{dev}"}}')
        assert series, f"no {metric} series stored"
        ops = set()
        for s in series:
            want = SERIES_LABELS | ({"le"} if s["__name__"].endswith("_bucket") else set())
            assert set(s) == want, f"stored series labels {sorted(s)}, expected {sorted(want)}"
            assert s["node"] == NODE and s["device"] == dev and s["job"] == "bio", s
            ops.add(s["operation"])
        assert {"read", "write"} <= ops, ops

        exposed = agent_le(agent, metric)
        assert exposed[0] == "1" and exposed[-1] == "+Inf", exposed
        want_le = {normalized_le(le) if normalized else le for le in exposed}
        stored = set(prom.label_values("le", f'{metric}_bucket{{device="{dev}"}}'))
        assert stored == want_le, (
            f"{metric}: stored le {sorted(stored, key=float)}, expected "
            f"{'normalised' if normalized else 'verbatim'} {sorted(want_le, key=float)}")
        assert ("1.0" if normalized else "1") in stored


# ------------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("server", SERVERS)
def test_classic_histograms(server, loop_factory, agent_factory, prometheus_factory):
    """Text exposition, classic histograms; native histograms off (2.42: no feature flag;
    3.x: scrape_native_histograms defaults to false)."""
    binary = prometheus_binary(server)
    loop = loop_factory()
    dev = loop.name
    agent = agent_factory("--device-include", f"^{dev}$")
    prom = prometheus_factory(binary, [scrape_config(agent)], name=server)
    wait_target_up(prom)

    issue_io(loop)
    counts = agent_counts(agent, dev)
    assert counts.get("read", 0) > 0 and counts.get("write", 0) > 0, counts
    wait_counts_stored(prom, dev, counts)

    assert_io_spanned_scrapes(prom, dev)
    assert_classic_quantiles(prom, dev)
    # 2.x keeps le as exposed in the text format; 3.x normalises it on ingestion.
    assert_classic_series(prom, agent, dev, normalized=prom.version[0] >= 3)


@pytest.mark.parametrize("server", SERVERS)
def test_native_histograms(server, loop_factory, agent_factory, prometheus_factory):
    """Protobuf exposition with native histograms; their quantiles agree with the classic ones.

    2.42 (--enable-feature=native-histograms) stores only the native form of a histogram that
    has one, so a second 2.42 server without the flag scrapes the same agent for the classic
    form. 3.x stores both from one scrape (always_scrape_classic_histograms)."""
    binary = prometheus_binary(server)
    loop = loop_factory()
    dev = loop.name
    agent = agent_factory("--device-include", f"^{dev}$")
    assert agent_serves_protobuf(agent).startswith("application/vnd.google.protobuf"), (
        "the agent must answer a protobuf scrape with the protobuf exposition (native histograms)")

    three = server == "prometheus3"
    if three:
        native = classic = prometheus_factory(binary, [scrape_config(
            agent, scrape_native_histograms=True, always_scrape_classic_histograms=True)],
            name=server)
    else:
        native = prometheus_factory(binary, [scrape_config(agent)], name=server + "-native",
                                    flags=["--enable-feature=native-histograms"])
        classic = prometheus_factory(binary, [scrape_config(agent)], name=server + "-classic")
    for p in {id(native): native, id(classic): classic}.values():
        wait_target_up(p)

    issue_io(loop)
    counts = agent_counts(agent, dev)
    assert counts.get("read", 0) > 0 and counts.get("write", 0) > 0, counts
    wait_counts_stored(native, dev, counts, native=True)
    wait_counts_stored(classic, dev, counts)

    assert_io_spanned_scrapes(native, dev, native=True)
    assert_classic_quantiles(classic, dev)

    for op, (lo, hi) in EXPECTED_SIZE_BUCKET.items():
        sel = f'{{device="{dev}",operation="{op}"}}'
        stored = native.query(f"ebpf_bio_req_size{sel}")
        assert len(stored) == 1 and "histogram" in stored[0], (
            f"expected a native histogram for {op}, got {stored}")

        # The query of the brief: rates of native histograms, same bucket as the classic one.
        nq = native_quantile(native, "ebpf_bio_req_size", dev, op)
        cq = classic_quantile(classic, "ebpf_bio_req_size", dev, op)
        assert nq is not None and lo < nq <= hi, f"native size median of {op}s: {nq}"
        assert bucket_index(nq) == bucket_index(cq), f"{op} size median: native {nq}, classic {cq}"

        # Latency: the same totals (no rate extrapolation, which differs between two servers)
        # give a median in the same log2 bucket in both forms.
        nl = native_quantile(native, "ebpf_bio_req_latency", dev, op, rate=False)
        cl = classic_quantile(classic, "ebpf_bio_req_latency", dev, op, rate=False)
        assert nl is not None and cl is not None and math.isfinite(nl), (nl, cl)
        assert bucket_index(nl) == bucket_index(cl), (
            f"{op} latency median: native {nl} µs, classic {cl} µs")

        # Count and sum agree exactly.
        for metric in ("ebpf_bio_req_size", "ebpf_bio_req_latency"):
            msel = metric + sel
            n_count = native.scalar(f"histogram_count({msel})")
            n_sum = native.scalar(f"histogram_sum({msel})")
            c_count = classic.scalar(f"{metric}_count{sel}")
            c_sum = classic.scalar(f"{metric}_sum{sel}")
            assert n_count == c_count, f"{msel}: native count {n_count}, classic {c_count}"
            assert math.isclose(n_sum, c_sum, rel_tol=1e-9), f"{msel}: sums {n_sum} vs {c_sum}"

    # Native series carry the same labels (no le).
    for s in native.series(f'{{__name__=~"ebpf_bio_req_(size|latency)",device="{dev}"}}'):
        assert set(s) == SERIES_LABELS and s["node"] == NODE, s
    if three:
        # The classic form, scraped over protobuf here, has normalised le as well.
        assert_classic_series(classic, agent, dev, normalized=True)
    else:
        # 2.42 has no always_scrape_classic_histograms: with the flag, only the native form.
        assert native.series(f'{{__name__="ebpf_bio_req_size_bucket",device="{dev}"}}') == []
        assert_classic_series(classic, agent, dev, normalized=False)
