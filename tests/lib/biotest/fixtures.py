"""The pytest fixtures of every suite; each conftest.py imports the ones its directory uses
(pytest registers fixtures found in a conftest's namespace)."""
import os

import pytest

from .agent import AGENT_BIN, Agent
from .blockdev import LoopDevice, ZramDevices
from .prometheus import PrometheusServer
from .util import require_root, sh


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
def zram_factory():
    """Hot-adds zram devices on demand (after an agent started, say), sized or not; removes them."""
    devices = ZramDevices()
    yield devices.add
    devices.remove()


@pytest.fixture
def zram(zram_factory):
    """A zram device of our own (64 MiB), hot-added and removed again."""
    return zram_factory()


@pytest.fixture
def prometheus_factory():
    """Starts Prometheus servers; stops them and removes their data when the test ends."""
    servers = []

    def start(binary, scrape_configs, **kw):
        s = PrometheusServer(binary, scrape_configs, **kw)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()
