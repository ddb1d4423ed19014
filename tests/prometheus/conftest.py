"""Fixtures for the Prometheus end-to-end tests: the node-agent fixtures of tests/node (a real
agent on loopback, loop devices in /dev/shm, direct IO), plus real Prometheus servers.

tests/node/conftest.py is loaded under its own module name by node_fixtures.py; its fixtures are
re-exported below, so they apply to this directory. When both directories run in one pytest
session each conftest.py serves fixtures to its own directory. Test modules import helpers from
node_fixtures and promserver, never from "conftest".
"""
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from node_fixtures import node as _node  # noqa: E402

# Everything public of tests/node/conftest.py, fixtures included (pytest collects fixtures from
# this namespace), as `from conftest import *` would. All of it, not just what these tests use:
# when both directories run in one session, pytest may have imported this file as "conftest"
# last, and tests/node's `from conftest import ...` then finds this module.
for _name in dir(_node):
    if not _name.startswith("_"):
        globals().setdefault(_name, getattr(_node, _name))

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
