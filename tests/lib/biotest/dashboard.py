"""The chart's Grafana dashboard as data: its panels' targets, their PromQL with Grafana's
variables replaced, and which stored forms each expression reads. Used by
tests/prometheus/test_dashboard.py, test_pv_labels_stored.py and tests/realnode."""
import json
import os
import re

from . import REPO

CHART = os.path.join(REPO, "charts", "bio-exporter")
DASHBOARD_PATH = os.path.join(CHART, "dashboards", "bio-exporter.json")
DS = {"type": "prometheus", "uid": "${datasource}"}

# The histogram families after `ebpf_bio_req_`: the seed's two and the queue time.
HISTOGRAMS = "(?:queue_latency|latency|size)"
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__range": "5m", "__interval": "15s"}
TEMPLATE_VARS = ("node", "device", "operation")
VAR_RE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def load_dashboard():
    with open(DASHBOARD_PATH) as f:
        return json.load(f)


def walk_panels(panels):
    """Every panel, rows and the panels inside collapsed rows included."""
    for p in panels:
        yield p
        yield from walk_panels(p.get("panels", []))


def dashboard_targets(dashboard=None):
    """[(id, panel, target)] for every target with an expr."""
    out = []
    for p in walk_panels((dashboard or load_dashboard())["panels"]):
        for t in p.get("targets", []):
            if "expr" in t:
                tid = re.sub(r"[^A-Za-z0-9]+", "_", f"{p['id']}-{p['title']}").strip("_")
                out.append((f"{tid}-{t['refId']}", p, t))
    return out


def substitute(expr, values):
    """expr with Grafana's variables replaced; an unknown variable fails."""
    def repl(m):
        name = m.group(1) or m.group(2) or m.group(3)
        if name in GRAFANA_BUILTINS:
            return GRAFANA_BUILTINS[name]
        assert name in values, f"unknown variable ${name} in {expr!r}"
        return values[name]
    return VAR_RE.sub(repl, expr)


def forms(expr):
    """(reads classic series, reads native histograms, reads ebpf_bio_device_info)."""
    classic = re.search(rf"\bebpf_bio_req_{HISTOGRAMS}_(bucket|count|sum)\b", expr) is not None
    native = re.search(rf"\bebpf_bio_req_{HISTOGRAMS}\s*\{{", expr) is not None
    return classic, native, "ebpf_bio_device_info" in expr


def api(prom, path, **params):
    """The whole response document (data, warnings, infos) of a Prometheus API call on anything
    with PrometheusServer's _get; fails on an error status."""
    status, body = prom._get("/api/v1/" + path, params)
    doc = json.loads(body)
    assert status == 200 and doc.get("status") == "success", f"{path} {params}: {status} {body}"
    return doc


def check_response(doc, what):
    assert not doc.get("warnings"), f"{what}: warnings {doc['warnings']}"
    assert not doc.get("infos"), f"{what}: infos {doc['infos']}"
