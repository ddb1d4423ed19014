"""A real Prometheus server on 127.0.0.1 for the tests and the scrape benchmark.

The server gets a free loopback port, a temporary data directory and a generated configuration
(JSON, which is YAML) scraping the given targets; it is queried through its HTTP API only.
"""
import contextlib
import decimal
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

PROMETHEUS2 = os.environ.get("BIO_PROMETHEUS2", "/usr/bin/prometheus")
PROMETHEUS3 = os.environ.get("BIO_PROMETHEUS3", "")

PROTOBUF_ACCEPT = (
    "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited"
)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binary_version(binary):
    """(major, minor, patch) from `prometheus --version`."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    m = re.search(r"version (\d+)\.(\d+)\.(\d+)", out.stdout + out.stderr)
    if not m:
        raise AssertionError(f"cannot read the version of {binary}: {out.stdout}{out.stderr}")
    return tuple(int(x) for x in m.groups())


def go_float(f):
    """strconv.FormatFloat(f, 'g', -1, 64), as Go (and so Prometheus) prints a float."""
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
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"prometheus exited with {self.proc.returncode}: {self.cmd}\n{self.logs()}")
            with contextlib.suppress(OSError):
                if self._get("/-/ready")[0] == 200:
                    return
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"prometheus not ready after 30 s: {self.cmd}\n{self.logs()}")

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
