"""/metrics over TLS: verified with the CA and server name, refused without, rotated live."""
import os
import socket
import ssl
import subprocess
import time

import pytest

from biotest.agent import AGENT_BIN, Agent
from biotest.tls import SERVER_NAME, make_ca, make_cert
from biotest.util import require_tool


def install(src_cert, src_key, cert, key):
    """Swap files in atomically, as the kubelet does with Secret volumes."""
    for src, dst in ((src_key, key), (src_cert, cert)):
        tmp = dst + ".tmp"
        with open(src, "rb") as f, open(tmp, "wb") as g:
            g.write(f.read())
        os.replace(tmp, dst)


def served_cert_subject(port, ca):
    ctx = ssl.create_default_context(cafile=ca)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=SERVER_NAME) as tls:
            return dict(x[0] for x in tls.getpeercert()["subject"])["commonName"]


@pytest.fixture
def pki(tmp_path):
    require_tool("openssl")
    make_ca(tmp_path)
    first = make_cert(tmp_path, "first")
    second = make_cert(tmp_path, "second")
    cert, key = str(tmp_path / "tls.crt"), str(tmp_path / "tls.key")
    install(*first, cert, key)
    return {"dir": tmp_path, "ca": str(tmp_path / "ca.crt"), "cert": cert, "key": key, "second": second}


def test_tls_scrape_verifies_and_rotates_without_restart(pki):
    ctx = ssl.create_default_context(cafile=pki["ca"])
    agent = Agent(["--tls-cert-file", pki["cert"], "--tls-key-file", pki["key"]], ssl_context=ctx)
    try:
        status, body, _ = agent.get("/metrics")
        assert status == 200 and "# TYPE ebpf_bio_req_latency histogram" in body
        assert served_cert_subject(agent.port, pki["ca"]) == "first"

        # Without the CA the client must refuse the server.
        with pytest.raises(ssl.SSLCertVerificationError):
            with socket.create_connection(("127.0.0.1", agent.port), timeout=5) as raw:
                ssl.create_default_context().wrap_socket(raw, server_hostname=SERVER_NAME)
        # Plain HTTP to the TLS port is not served.
        r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{agent.port}/metrics"],
                           capture_output=True, text=True)
        assert r.stdout != "200"

        pid = agent.proc.pid
        install(*pki["second"], pki["cert"], pki["key"])
        deadline = time.time() + 15
        while served_cert_subject(agent.port, pki["ca"]) != "second":
            assert time.time() < deadline, "the rotated certificate was not served within 15 s"
            time.sleep(0.2)
        assert agent.proc.pid == pid and agent.proc.poll() is None, "rotation must not restart the agent"
        assert "TLS certificate reloaded" in agent.logs()
    finally:
        agent.stop()


def test_tls_flags_must_come_together():
    r = subprocess.run([AGENT_BIN, "--tls-cert-file", "/x.crt"], capture_output=True, text=True)
    assert r.returncode == 2 and "--tls-key-file" in r.stderr


def test_unreadable_certificate_is_a_clear_error(tmp_path):
    r = subprocess.run([AGENT_BIN, "--listen", "127.0.0.1:0", "--tls-cert-file", str(tmp_path / "missing.crt"),
                        "--tls-key-file", str(tmp_path / "missing.key")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "loading TLS certificate" in r.stderr, r.stderr
