"""Fixtures for the Prometheus end-to-end tests: the node-agent fixtures of tests/node (a real
agent on loopback, loop devices in /dev/shm, direct IO), plus real Prometheus servers.

tests/node/conftest.py is loaded under its own module name by node_fixtures.py; its fixtures are
re-exported below, so they apply to this directory. When both directories run in one pytest
session each conftest.py serves its own directory. Test modules import helpers from
node_fixtures and promserver, never from "conftest".
"""
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from node_fixtures import node as _node  # noqa: E402

# The fixtures of tests/node that these tests use (pytest collects them from this namespace).
system_setup = _node.system_setup
agent_factory = _node.agent_factory
loop_factory = _node.loop_factory

from promserver import PrometheusServer  # noqa: E402


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
