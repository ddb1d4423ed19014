"""The agent's /metrics as data: sample lines parsed, `le` spelled as Go spells a float, and the
seed's sample exposition (tests/fixtures/seed-exposition.txt), whose lines are the metric
contract users' dashboards query."""
import decimal
import math
import os
import re

from . import REPO

SERIES_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

PROTOBUF_ACCEPT = (
    "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited"
)

# The two sample blocks of the original ebpf_exporter bio example's README, kept verbatim.
SEED_EXPOSITION = os.path.join(REPO, "tests", "fixtures", "seed-exposition.txt")


def parse_metrics(text):
    """[(name, {labels}, value)] for every sample line."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SERIES_RE.match(line)
        assert m, f"unparseable exposition line: {line!r}"
        labels = dict(LABEL_RE.findall(m.group(2) or ""))
        samples.append((m.group(1), labels, float(m.group(3))))
    return samples


def sample(samples, name, **labels):
    """The value of the one sample with this name and (a subset of) labels, or 0 when absent."""
    found = [v for n, l, v in samples if n == name and all(l.get(k) == v2 for k, v2 in labels.items())]
    assert len(found) <= 1, f"{name}{labels} matched {len(found)} samples"
    return found[0] if found else 0.0


def go_float(f):
    """strconv.FormatFloat(f, 'g', -1, 64): how Go (the seed's Prometheus client, and Prometheus)
    prints a float, e.g. `le`: plain digits below 1e+06, the shortest exponent form above."""
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "+Inf" if f > 0 else "-Inf"
    if f == 0:
        return "0"
    sign, digits, exp = decimal.Decimal(repr(f)).normalize().as_tuple()
    ds = "".join(map(str, digits))
    x = len(ds) + exp - 1  # decimal exponent of the first digit
    s = "-" if sign else ""
    if x < -4 or x >= 6:  # Go uses %e there when the precision is the shortest
        mant = ds[0] + ("." + ds[1:] if len(ds) > 1 else "")
        return f"{s}{mant}e{'+' if x >= 0 else '-'}{abs(x):02d}"
    return s + format(decimal.Decimal(repr(abs(f))).normalize(), "f")


def normalized_le(value):
    """The `le` string as Prometheus 3.x stores it (and 2.x when it scraped protobuf):
    the float printed by Go with ".0" added to integers, e.g. "1" -> "1.0", "1.048576e+06" stays."""
    s = go_float(float(value))
    if not any(c in s for c in ".eEIN"):
        s += ".0"
    return s


def seed_lines():
    with open(SEED_EXPOSITION) as f:
        return f.read().splitlines()


def help_type(lines, name):
    return [l for l in lines if l.startswith(f"# HELP {name} ") or l.startswith(f"# TYPE {name} ")]


def le_sequence(lines, name):
    return [re.search(r'le="([^"]+)"', l).group(1) for l in lines if l.startswith(f"{name}_bucket")]


def contract_block(name):
    """The seed's HELP/TYPE lines and `le` sequence of a histogram family, from the fixture."""
    lines = seed_lines()
    head, les = help_type(lines, name), le_sequence(lines, name)
    assert head and les, f"{name} is not in {SEED_EXPOSITION}"
    return head, les
