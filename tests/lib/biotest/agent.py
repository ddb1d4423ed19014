"""The node-agent binary as a process: started on a free loopback port, ready, stopped."""
import contextlib
import json
import os
import signal
import subprocess
import tempfile
import urllib.error
import urllib.request

from .exposition import parse_metrics
from .util import free_port, sh, wait_ready

TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/bio-exporter/target"))
AGENT_BIN = os.environ.get("BIO_AGENT_BIN", os.path.join(TARGET, "debug", "node-agent"))
# The benchmarks measure the release build unless told otherwise.
RELEASE_AGENT_BIN = os.environ.get("BIO_AGENT_BIN", os.path.join(TARGET, "release", "node-agent"))

# The names of the agent's BPF programs (bpf/bio.bpf.c), every attach mode: how bpftool's lists
# tell ours from other programs on the host.
OUR_PROGRAMS = {"btf_rq_issue", "btf_rq_complete", "btf_bio_queue", "btf_bio_complete", "raw_rq_issue",
                "raw_rq_complete", "raw_bio_queue", "raw_bio_complete", "tp_rq_issue", "tp_rq_complete",
                "kp_rq_issue", "kp_rq_complete"}

# Issue 13 item 4: now and then the kernel does not run the programs for a completion (1-4 per
# run of a few hundred to tens of thousands of IOs here, under load, in every attach mode). The
# agent finds those by comparing with stat at idle moments, once a second, after a quiet baseline
# (reason="unobserved_completion", node-agent/src/unobserved.rs), and test_mixed_load.py requires
# every one reported. The count tests read the agent right after their IO, before that comparison
# can have run, so they tolerate that many (the shortfalls they guard against are hundreds).
ITEM4_UNEXPLAINED = 4


class Agent:
    def __init__(self, args, env=None, wrapper=(), binary=AGENT_BIN, ssl_context=None):
        self.port = free_port()
        self.ssl_context = ssl_context
        self.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="node-agent-", suffix=".log", delete=False)
        cmd = [*wrapper, binary, "--listen", f"127.0.0.1:{self.port}", "--node-name", "test-node", *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        wait_ready(self, lambda: self.get("/readyz")[0] == 200, "agent")

    def get(self, path):
        try:
            with urllib.request.urlopen(self.url + path, timeout=10, context=self.ssl_context) as r:
                return r.status, r.read().decode(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(), dict(e.headers)

    def metrics_text(self):
        status, body, _ = self.get("/metrics")
        assert status == 200, body
        return body

    def samples(self):
        return parse_metrics(self.metrics_text())

    def logs(self):
        with open(self.log.name) as f:
            return f.read()

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@contextlib.contextmanager
def running_agent(*args, **kw):
    """An Agent for the length of a `with` block (the benchmarks' form of the agent fixture); its
    log is removed afterwards, as a benchmark starts dozens of agents."""
    agent = Agent(list(args), **kw)
    try:
        yield agent
    finally:
        agent.stop()
        os.unlink(agent.log.name)


def run_agent(*args, timeout=20, wrapper=()):
    """The agent run to completion (flag errors, --help, the histogram command)."""
    return subprocess.run([*wrapper, AGENT_BIN, *args], capture_output=True, text=True, timeout=timeout)


def attached_program_ids():
    """IDs of the loaded BPF programs named like ours, whoever loaded them."""
    out = sh("bpftool", "-j", "prog", "list").stdout
    return {p["id"] for p in json.loads(out) if p.get("name") in OUR_PROGRAMS}


def recursion_misses():
    """recursion_misses summed over the loaded programs named like ours (bpftool omits zeros)."""
    progs = json.loads(sh("bpftool", "-j", "prog", "show").stdout)
    return sum(p.get("recursion_misses", 0) for p in progs if p.get("name") in OUR_PROGRAMS)


def agent_prog_ids(pid):
    """IDs of the programs this agent process loaded (its fds say), so that other agents on the
    host do not count."""
    ids = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/fdinfo/{fd}") as f:
            ids.update(int(l.split()[1]) for l in f if l.startswith("prog_id:"))
    return ids


def cpu_seconds(pid):
    """User + system CPU seconds the process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(next(l for l in f if l.startswith("VmRSS:")).split()[1]) / 1024
