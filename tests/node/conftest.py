"""Fixtures for the node-agent system tests: real BPF on real loop and zram devices.

Everything here runs as root on the test machine and cleans up after itself: loop devices are
backed by files in /dev/shm, zram devices are hot-added for the test and removed afterwards
(never an existing one). The fixtures and every helper live in tests/lib/biotest.
"""
from biotest.fixtures import agent, agent_factory, loop, loop_factory, system_setup, zram, zram_factory  # noqa: F401
