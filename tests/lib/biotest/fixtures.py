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


def factory(make, undo):
    """A fixture's start function that keeps what it made, and the list to undo after the test."""
    made = []

    def start(*args, **kw):
        made.append(make(*args, **kw))
        return made[-1]

    return start, lambda: [undo(x) for x in made]


@pytest.fixture
def agent_factory():
    start, stop_all = factory(lambda *args, **kw: Agent(list(args), **kw), Agent.stop)
    yield start
    stop_all()


@pytest.fixture
def agent(agent_factory):
    return agent_factory()


@pytest.fixture
def loop_factory():
    """make(size_bytes=64 MiB, direct_io=True, partscan=False): a loop device, detached after the test."""
    start, detach_all = factory(lambda size_bytes=64 << 20, direct_io=True, partscan=False:
                                LoopDevice(size_bytes, direct_io, partscan), LoopDevice.detach)
    yield start
    detach_all()


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
    start, stop_all = factory(PrometheusServer, PrometheusServer.stop)
    yield start
    stop_all()
