"""The exposition parses with a real parser and keeps the seed's structure byte for byte."""
import re
import subprocess

from biotest.agent import recursion_misses
from biotest.blockdev import direct_io
from biotest.exposition import (SEED_EXPOSITION, contract_block, go_float, help_type, le_sequence, sample,
                                seed_lines)
from biotest.util import require_tool

# The metric contract of the original ebpf_exporter bio example, which users' dashboards query:
# names, help texts and the classic bucket bounds (log2, in microseconds and KiB), written here as
# facts and checked against the seed's own sample exposition kept in tests/fixtures, which the
# agent's output is compared with.
CONTRACT = {
    "ebpf_bio_req_latency": ("A histogram of bio request latencies in microseconds.", 31),
    "ebpf_bio_req_size": ("A histogram of bio request sizes in KiB.", 15),
}


def one_series(lines, name, device, operation):
    return [l for l in lines if l.startswith(name) and f'device="{device}"' in l and f'operation="{operation}"' in l]


def test_promtool_accepts_the_exposition(agent, loop):
    require_tool("promtool")
    direct_io(loop.path, "read", 4096, 3)
    body = agent.metrics_text()
    r = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, text=True)
    # promtool exits 0 on a clean exposition; lint remarks would be printed with a non-zero exit.
    assert r.returncode == 0, f"promtool: {r.stdout}{r.stderr}"


def test_go_float_prints_like_go():
    assert [go_float(v) for v in (1, 2, 524288, 1048576, 2147483648, 32768)] == \
        ["1", "2", "524288", "1.048576e+06", "2.147483648e+09", "32768"]


def test_contract_matches_the_seed_fixture():
    """The fixture holds exactly the seed's two families, with the help texts and log2 `le`
    strings CONTRACT states, as Go's client wrote them."""
    lines = seed_lines()
    families = [l.split()[2] for l in lines if l.startswith("# TYPE ")]
    assert families == list(CONTRACT), f"{SEED_EXPOSITION}: families {families}"
    for name, (help_text, max_log2) in CONTRACT.items():
        assert help_type(lines, name) == [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        assert le_sequence(lines, name) == [go_float(2 ** k) for k in range(max_log2 + 1)] + ["+Inf"]


def test_promtool_accepts_the_seed_fixture():
    require_tool("promtool")
    with open(SEED_EXPOSITION) as f:
        r = subprocess.run(["promtool", "check", "metrics"], stdin=f, capture_output=True, text=True)
    assert r.returncode == 0, f"promtool on {SEED_EXPOSITION}: {r.stdout}{r.stderr}"


def test_matches_the_seed_sample_structurally(agent, loop):
    direct_io(loop.path, "write", 4096, 3)
    ours = agent.metrics_text().splitlines()
    seed = seed_lines()
    for name in CONTRACT:
        head, les = contract_block(name)
        assert help_type(ours, name) == head
        mine = one_series(ours, name, loop.name, "write")
        assert le_sequence(mine, name) == les
        # The seed's sample kinds in its order: every bucket, then _sum, then _count.
        theirs = one_series(seed, name, "sda", "write")
        assert [kind(name, l) for l in mine] == [kind(name, l) for l in theirs], mine
        # Seed labels come first, in the seed's order; `node` is added beside them, before `le`.
        for m, t in zip(mine, theirs):
            seed_names = label_names(t)
            want = [n for n in seed_names if n != "le"] + ["node"] + (["le"] if "le" in seed_names else [])
            assert label_names(m) == want, (m, t)
        first = mine[0]
        assert re.match(rf'{name}_bucket\{{device="{loop.name}",operation="write",node="test-node",le="1"\}} \d+$', first), first


def kind(name, line):
    return re.match(rf"{name}(_bucket|_sum|_count)\{{", line).group(1)


def label_names(line):
    return re.findall(r'(\w+)="', line.split("{", 1)[1].rsplit("}", 1)[0])


def test_content_type_is_text_0_0_4(agent):
    status, _, headers = agent.get("/metrics")
    assert status == 200
    content_type = {k.lower(): v for k, v in headers.items()}["content-type"]
    assert content_type.startswith("text/plain; version=0.0.4")


def test_series_appear_only_after_io(agent_factory, loop):
    agent = agent_factory("--device-include", f"^{loop.name}$")
    text = agent.metrics_text()
    assert "# TYPE ebpf_bio_req_latency histogram" in text
    assert f'device="{loop.name}"' not in text
    direct_io(loop.path, "read", 4096, 1)
    text = agent.metrics_text()
    assert f'ebpf_bio_req_latency_count{{device="{loop.name}",operation="read"' in text
    assert f'device="{loop.name}",operation="write"' not in text


def test_health_endpoints(agent):
    assert agent.get("/healthz")[0] == 200
    assert agent.get("/readyz")[0] == 200


def test_gzip_when_asked(agent):
    import gzip
    import urllib.request
    req = urllib.request.Request(agent.url + "/metrics", headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.headers["Content-Encoding"] == "gzip"
        text = gzip.decompress(r.read()).decode()
    assert "# TYPE ebpf_bio_req_latency histogram" in text
    # Without the header: plain text, as before.
    assert "content-encoding" not in {k.lower() for k in agent.get("/metrics")[2]}


def test_skipped_nested_runs_are_reported_as_lost_events(agent, loop):
    """The kernel's per-program recursion_misses reach ebpf_bio_lost_events_total."""
    direct_io(loop.path, "write", 4096, 64)
    before = recursion_misses()
    exported = sample(agent.samples(), "ebpf_bio_lost_events_total", reason="program_recursion")
    after = recursion_misses()
    assert any(n == "ebpf_bio_lost_events_total" and l.get("reason") == "program_recursion"
               for n, l, _ in agent.samples()), "the reason is always exported, also at 0"
    assert before <= exported <= after, (before, exported, after)
