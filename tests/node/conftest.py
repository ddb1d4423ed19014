"""Fixtures for the node-agent system tests: real BPF on real loop and zram devices.

Everything here runs as root on the test machine and cleans up after itself: loop devices are
backed by files in /dev/shm, zram devices are hot-added for the test and removed afterwards
(never an existing one).
"""
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/bio-exporter/target"))
AGENT_BIN = os.environ.get("BIO_AGENT_BIN", os.path.join(TARGET, "debug", "node-agent"))

# /sys/block/DEV/stat columns (Documentation/block/stat.rst).
STAT_FIELDS = [
    "read_ios", "read_merges", "read_sectors", "read_ticks",
    "write_ios", "write_merges", "write_sectors", "write_ticks",
    "in_flight", "io_ticks", "time_in_queue",
    "discard_ios", "discard_merges", "discard_sectors", "discard_ticks",
    "flush_ios", "flush_ticks",
]

SERIES_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def require_root():
    if os.geteuid() != 0:
        pytest.skip("SKIPPED LOUDLY: these tests load BPF programs and create block devices; run them as root (make test)")


def sh(*args, check=True, **kw):
    return subprocess.run(args, check=check, capture_output=True, text=True, **kw)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_stat(dev):
    with open(f"/sys/block/{dev}/stat") as f:
        values = [int(v) for v in f.read().split()]
    return dict(zip(STAT_FIELDS, values))


def stat_delta(before, after):
    return {k: after[k] - before[k] for k in before}


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


class Agent:
    def __init__(self, args, env=None, wrapper=(), binary=AGENT_BIN, ssl_context=None):
        self.port = free_port()
        self.ssl_context = ssl_context
        self.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="node-agent-", suffix=".log", delete=False)
        cmd = [*wrapper, binary, "--listen", f"127.0.0.1:{self.port}", "--node-name", "test-node", *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.logs()}")
            with contextlib.suppress(OSError):
                if self.get("/readyz")[0] == 200:
                    return
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"agent not ready after 30s:\n{self.logs()}")

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


@pytest.fixture(scope="session", autouse=True)
def system_setup():
    require_root()
    assert os.path.exists(AGENT_BIN), f"{AGENT_BIN} is missing: build with `make build` (or set BIO_AGENT_BIN)"
    # Classic tracepoints read record layouts from tracefs; mount it like a node would have it.
    if not os.path.isdir("/sys/kernel/tracing/events/block"):
        sh("mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing", check=False)
    yield


@pytest.fixture
def agent_factory():
    agents = []

    def start(*args, **kw):
        a = Agent(list(args), **kw)
        agents.append(a)
        return a

    yield start
    for a in agents:
        a.stop()


@pytest.fixture
def agent(agent_factory):
    return agent_factory()


class LoopDevice:
    def __init__(self, size_bytes, direct_io=True, partscan=False, prefix="bio-test-"):
        fd, self.backing = tempfile.mkstemp(prefix=prefix, suffix=".img", dir="/dev/shm")
        os.close(fd)
        os.truncate(self.backing, size_bytes)
        args = ["losetup", "--find", "--show"]
        if direct_io:
            args.append("--direct-io=on")
        if partscan:  # partitions may be added (addpart); detaching drops them
            args.append("--partscan")
        self.path = sh(*args, self.backing).stdout.strip()
        self.name = os.path.basename(self.path)

    def detach(self):
        sh("losetup", "-d", self.path, check=False)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.backing)


@pytest.fixture
def loop_factory():
    devices = []

    def make(size_bytes=64 << 20, direct_io=True, partscan=False):
        d = LoopDevice(size_bytes, direct_io, partscan)
        devices.append(d)
        return d

    yield make
    for d in devices:
        d.detach()


@pytest.fixture
def loop(loop_factory):
    return loop_factory()


@pytest.fixture
def zram(zram_factory):
    """A zram device of our own (64 MiB), hot-added and removed again."""
    return zram_factory()


def direct_io(path, op, block_size, count, offset=0):
    """O_DIRECT reads or writes of exactly block_size bytes each."""
    flag = "iflag=direct" if op == "read" else "oflag=direct"
    src, dst = (path, "/dev/null") if op == "read" else ("/dev/zero", path)
    skip = f"skip={offset // block_size}" if op == "read" else f"seek={offset // block_size}"
    sh("dd", f"if={src}", f"of={dst}", f"bs={block_size}", f"count={count}", skip, flag, "status=none")


def wait_for(predicate, timeout=5.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def wait_idle(dev, quiet=0.5, timeout=20.0):
    """/sys/block/DEV/stat once nothing is in flight and no counter has moved for `quiet` seconds.

    Nothing else on the test machine opens the tests' loop devices (no udev to run blkid after a
    close-after-write), so a quiet device stays quiet while the agent is read.
    """
    deadline = time.time() + timeout
    last, still_since = read_stat(dev), time.time()
    while time.time() < deadline:
        time.sleep(0.05)
        now = read_stat(dev)
        if now != last or now["in_flight"]:
            last, still_since = now, time.time()
        elif time.time() - still_since >= quiet:
            return now
    raise AssertionError(f"{dev} did not go idle within {timeout}s: {last}")


@contextlib.contextmanager
def ext4_mounted(loop, mnt, mkfs_options="lazy_itable_init=0,lazy_journal_init=0"):
    """A fresh ext4 on the loop device, mounted on `mnt` (made here) while the block runs."""
    sh("mkfs.ext4", "-q", "-E", mkfs_options, loop.path)
    mnt.mkdir()
    sh("mount", loop.path, str(mnt))
    try:
        yield mnt
    finally:
        sh("umount", str(mnt))


# Issue 13 item 4: now and then the kernel does not run the programs for a completion (1-4 per
# run of a few hundred to tens of thousands of IOs here, under load, in every attach mode). The
# agent finds those by comparing with stat at idle moments, once a second, after a quiet baseline
# (reason="unobserved_completion", node-agent/src/unobserved.rs), and test_mixed_load.py requires
# every one reported. The count tests read the agent right after their IO, before that comparison
# can have run, so they tolerate that many (the shortfalls they guard against are hundreds).
ITEM4_UNEXPLAINED = 4


def require_tool(name):
    if shutil.which(name) is None:
        pytest.fail(f"{name} is not installed: run `make deps`")


@pytest.fixture
def zram_factory():
    """Hot-adds zram devices on demand (after an agent started, say), sized or not; removes them."""
    control = "/sys/class/zram-control/hot_add"
    if not os.path.exists(control):
        pytest.skip("SKIPPED LOUDLY: no zram-control in sysfs (kernel without CONFIG_ZRAM)")
    added = []

    def make(size_bytes=64 << 20):
        with open(control) as f:
            idx = int(f.read().strip())
        added.append(idx)
        name = f"zram{idx}"
        if size_bytes:
            with open(f"/sys/block/{name}/disksize", "w") as f:
                f.write(str(size_bytes))
        return name

    yield make
    for idx in added:
        with contextlib.suppress(OSError):
            with open(f"/sys/block/zram{idx}/reset", "w") as f:
                f.write("1")
        with contextlib.suppress(OSError):
            with open("/sys/class/zram-control/hot_remove", "w") as f:
                f.write(str(idx))


class CompletionTrace:
    """Counts block_rq_complete events of one disk in a tracefs instance of our own.

    The tracepoint the agent's programs run on, recorded by the kernel's own tracer: an
    independent count of completions per operation, to tell what the kernel completed from what
    the agent was shown.
    """

    OPS = {"R": "read", "W": "write", "D": "discard"}

    def __init__(self, dev_path):
        root = "/sys/kernel/tracing"
        if not os.path.isdir(f"{root}/events/block/block_rq_complete"):
            pytest.skip("SKIPPED LOUDLY: no block_rq_complete in tracefs (/sys/kernel/tracing): cannot count completions independently")
        self.dir = tempfile.mkdtemp(prefix="bio-test-", dir=f"{root}/instances")
        rdev = os.stat(dev_path).st_rdev
        kdev = (os.major(rdev) << 20) | os.minor(rdev)  # the kernel's dev_t, as the event records it
        self._write("buffer_size_kb", "65536")
        self._write("events/block/block_rq_complete/filter", f"dev == {kdev}")
        self._write("events/block/block_rq_complete/enable", "1")

    def _write(self, name, value):
        with open(f"{self.dir}/{name}", "w") as f:
            f.write(value)

    def clear(self):
        self._write("trace", "")

    def counts(self):
        """{operation: completions} since clear(); fails if the ring buffer dropped any event."""
        overruns = 0
        for cpu in os.listdir(f"{self.dir}/per_cpu"):
            with open(f"{self.dir}/per_cpu/{cpu}/stats") as f:
                overruns += sum(int(l.split()[1]) for l in f if l.startswith("overrun"))
        assert overruns == 0, f"tracefs dropped {overruns} events: the trace is not a complete count"
        counts = {"read": 0, "write": 0, "discard": 0, "flush": 0, "other": 0, "empty_write": 0}
        with open(f"{self.dir}/trace") as f:
            for line in f:
                if line.startswith("#") or "block_rq_complete:" not in line:
                    continue
                # "MAJ,MIN RWBS (cmd) SECTOR + NR_SECTORS ..."
                fields = line.split("block_rq_complete:", 1)[1].split()
                rwbs, nr = fields[1], int(fields[fields.index("+") + 1])
                op = self.OPS.get(rwbs.lstrip("F")[:1], "flush" if rwbs.startswith("F") else "other")
                if op == "write" and nr == 0:
                    op = "empty_write"  # a flush sequence's end step or an empty preflush write
                counts[op] += 1
        return counts

    def close(self):
        with contextlib.suppress(OSError):
            self._write("events/block/block_rq_complete/enable", "0")
        with contextlib.suppress(OSError):
            os.rmdir(self.dir)
