"""A real Prometheus server on 127.0.0.1 for the tests and the scrape benchmark, and the helpers
that point one at an agent.

The server gets a free loopback port, a temporary data directory and a generated configuration
(JSON, which is YAML) scraping the given targets; it is queried through its HTTP API only.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from .blockdev import direct_io
from .exposition import PROTOBUF_ACCEPT, parse_metrics
from .util import free_port, wait_ready

PROMETHEUS2 = os.environ.get("BIO_PROMETHEUS2", "/usr/bin/prometheus")
PROMETHEUS3 = os.environ.get("BIO_PROMETHEUS3", "")


def binary_version(binary):
    """(major, minor, patch) from `prometheus --version`."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    m = re.search(r"version (\d+)\.(\d+)\.(\d+)", out.stdout + out.stderr)
    if not m:
        raise AssertionError(f"cannot read the version of {binary}: {out.stdout}{out.stderr}")
    return tuple(int(x) for x in m.groups())


class PrometheusServer:
    """One Prometheus process. `scrape_configs` are dicts as in prometheus.yml."""

    def __init__(self, binary, scrape_configs, flags=(), global_config=None, name="prom"):
        self.binary = binary
        self.version = binary_version(binary)
        self.tmp = tempfile.mkdtemp(prefix=f"bio-{name}-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s",
                       **(global_config or {})},
            "scrape_configs": scrape_configs,
        }
        self.config_path = os.path.join(self.tmp, "prometheus.yml")
        with open(self.config_path, "w") as f:
            json.dump(self.config, f, indent=2)
        self.log_path = os.path.join(self.tmp, "prometheus.log")
        self.log = open(self.log_path, "w")
        self.cmd = [
            binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={os.path.join(self.tmp, 'data')}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            *flags,
        ]
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=self.tmp, start_new_session=True)
        wait_ready(self, lambda: self._get("/-/ready")[0] == 200, f"prometheus {self.cmd}")

    def _get(self, path, params=None):
        url = self.url + path
        if params:
            url += "?" + urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def api(self, path, **params):
        status, body = self._get("/api/v1/" + path, params)
        doc = json.loads(body)
        assert status == 200 and doc.get("status") == "success", f"{path} {params}: {status} {body}"
        return doc["data"]

    def query(self, expr):
        """The result list of an instant query evaluated now (a vector, or a matrix for a
        range selector)."""
        data = self.api("query", query=expr, time=f"{time.time():.3f}")
        assert data["resultType"] in ("vector", "matrix"), data
        return data["result"]

    def scalar(self, expr):
        """The value of an instant query with at most one result; None when it has none."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr}: {len(result)} results: {result}"
        if not result:
            return None
        if "histogram" in result[0]:
            raise AssertionError(f"{expr} returned a histogram, not a float")
        return float(result[0]["value"][1])

    def series(self, match, lookback=600):
        now = time.time()
        return self.api("series", **{"match[]": match, "start": f"{now - lookback:.3f}",
                                      "end": f"{now:.3f}"})

    def label_values(self, label, match, lookback=600):
        now = time.time()
        return self.api(f"label/{label}/values", **{"match[]": match,
                                                    "start": f"{now - lookback:.3f}",
                                                    "end": f"{now:.3f}"})

    def targets(self):
        return self.api("targets")["activeTargets"]

    def wait_for(self, predicate, timeout, what):
        """Polls predicate() until truthy; returns its value or fails with what was last seen."""
        deadline = time.time() + timeout
        last = None
        while True:
            last = predicate()
            if last and last is not None:
                return last
            if time.time() >= deadline:
                raise AssertionError(
                    f"timed out after {timeout} s waiting for {what} (last: {last!r}); "
                    f"targets: {json.dumps(self.targets())}\nlog:\n{self.logs()[-4000:]}")
            time.sleep(0.2)

    def logs(self):
        with open(self.log_path) as f:
            return f.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def prometheus_binary(server):
    """The binary of the server named by a test parameter, or a loud skip/failure."""
    if server == "prometheus2":
        if not os.access(PROMETHEUS2, os.X_OK):
            pytest.fail(f"{PROMETHEUS2} is missing: run `make deps` (Debian's prometheus package)")
        return PROMETHEUS2
    if server == "prometheus3":
        if not PROMETHEUS3:
            pytest.skip("SKIPPED LOUDLY: BIO_PROMETHEUS3 is not set; run tests/prometheus/run.sh, "
                        "which builds Prometheus 3.x and sets it")
        if not os.access(PROMETHEUS3, os.X_OK):
            pytest.fail(f"BIO_PROMETHEUS3={PROMETHEUS3} is not an executable")
        return PROMETHEUS3
    raise ValueError(server)


# ------------------------------------------------------------- an agent scraped by a server

NODE = "test-node"   # the agent fixture's --node-name
READ_BS = 4 << 10    # 4 KiB: size bucket le=4
WRITE_BS = 64 << 10  # 64 KiB: size bucket le=64
IO_SECONDS = 3.5     # > 3 scrape intervals of 1 s


def scrape_config(agent, job="bio", **extra):
    return {"job_name": job, "scrape_interval": "1s", "scrape_timeout": "1s",
            "static_configs": [{"targets": [f"127.0.0.1:{agent.port}"]}], **extra}


def wait_target_up(prom, job="bio"):
    prom.wait_for(lambda: prom.scalar(f'up{{job="{job}"}}') == 1.0, 20, f"target {job} up")


def agent_serves_protobuf(agent):
    """The Content-Type the agent answers a protobuf scrape with."""
    req = urllib.request.Request(agent.url + "/metrics", headers={"Accept": PROTOBUF_ACCEPT})
    with urllib.request.urlopen(req, timeout=10) as r:
        r.read()
        return r.headers.get("Content-Type", "")


def issue_io(loop):
    """4 KiB O_DIRECT reads and 64 KiB O_DIRECT writes for IO_SECONDS, i.e. across more than
    three 1 s scrapes."""
    start = time.time()
    rounds = 0
    while time.time() - start < IO_SECONDS:
        direct_io(loop.path, "read", READ_BS, 32, offset=(rounds % 64) * 32 * READ_BS)
        direct_io(loop.path, "write", WRITE_BS, 4, offset=(rounds % 64) * 4 * WRITE_BS)
        rounds += 1
    return rounds


def agent_counts(agent, dev):
    """{operation: ebpf_bio_req_size_count} as the agent serves it now."""
    return {labels["operation"]: value for name, labels, value in agent.samples()
            if name == "ebpf_bio_req_size_count" and labels.get("device") == dev}


def agent_le(agent, metric):
    """The le strings the agent exposes for metric (text format), in its order."""
    seen = []
    for name, labels, _ in parse_metrics(agent.metrics_text()):
        if name == metric + "_bucket" and labels["le"] not in seen:
            seen.append(labels["le"])
    return seen


def wait_counts_stored(prom, dev, counts, native=False):
    """Waits until Prometheus stored a scrape taken after the IO: its counts equal the agent's."""
    def stored():
        for op, want in counts.items():
            sel = f'{{device="{dev}",operation="{op}"}}'
            expr = (f"histogram_count(ebpf_bio_req_size{sel})" if native
                    else f"ebpf_bio_req_size_count{sel}")
            if prom.scalar(expr) != want:
                return False
        return True
    prom.wait_for(stored, 15, f"stored counts to reach the agent's {counts}")
