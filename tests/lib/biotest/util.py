"""Process, port and polling helpers shared by every suite and benchmark."""
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


def require_root():
    if os.geteuid() != 0:
        pytest.skip("SKIPPED LOUDLY: these tests load BPF programs and create block devices; run them as root (make test)")


def require_tool(name):
    if shutil.which(name) is None:
        pytest.fail(f"{name} is not installed: run `make deps`")
