"""The one Python library of bio-exporter's tests and benchmarks.

tests/node, tests/prometheus, tests/realnode and bench/ import their helpers from here, never from
a conftest.py or from another test module: pytest imports every conftest.py under the one name
"conftest", so importing from it finds whichever directory's file came last.

- util: sh, free_port, wait_for, require_root, require_tool
- agent: the agent binary as a process (Agent, running_agent, run_agent, its BPF programs)
- blockdev: loop and zram devices, /sys/block stat, O_DIRECT IO, the kernel's completion trace
- exposition: parsing /metrics, Go's float spelling of `le`, the seed's exposition (the contract)
- tls: a throwaway CA and serving certificates
- cluster: a local API server (tests/cluster/up.sh); kubelet: a fake node's PVs and volume mounts
- prometheus: a real Prometheus server and the scrape helpers; dashboard: the chart's dashboard
- fixtures: the pytest fixtures every suite's conftest.py imports

On sys.path through tests/pytest.ini (`pythonpath = lib`); the bench scripts insert it
themselves.
"""
import os

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
