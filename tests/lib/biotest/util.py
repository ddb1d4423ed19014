"""Process, port and polling helpers shared by every suite and benchmark."""
import contextlib
import os
import shutil
import socket
import subprocess
import time

import pytest


def sh(*args, check=True, **kw):
    return subprocess.run(args, check=check, capture_output=True, text=True, **kw)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=5.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def wait_ready(server, probe, what, timeout=30):
    """Polls probe() (True once a started server answers) until it is; fails at once with the
    server's log if its process exits, and stops it and fails after `timeout` seconds. `server`
    has proc, logs() and stop()."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.proc.poll() is not None:
            raise AssertionError(f"{what} exited with {server.proc.returncode}:\n{server.logs()}")
        with contextlib.suppress(OSError):
            if probe():
                return
        time.sleep(0.1)
    server.stop()
    raise AssertionError(f"{what} not ready after {timeout} s:\n{server.logs()}")


def require_root():
    if os.geteuid() != 0:
        pytest.skip("SKIPPED LOUDLY: these tests load BPF programs and create block devices; run them as root (make test)")


def require_tool(name):
    if shutil.which(name) is None:
        pytest.fail(f"{name} is not installed: run `make deps`")
