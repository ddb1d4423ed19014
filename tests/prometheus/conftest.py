"""Fixtures for the Prometheus end-to-end tests: the node-agent fixtures (a real agent on
loopback, loop devices in /dev/shm) and real Prometheus servers, all from tests/lib/biotest."""
from biotest.fixtures import (agent, agent_factory, loop, loop_factory, prometheus_factory,  # noqa: F401
                              system_setup)
