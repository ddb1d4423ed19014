"""A throwaway CA and serving certificates (openssl) for the agent's TLS."""
from .util import sh

SERVER_NAME = "bio-agent.test"


def make_ca(d):
    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=bio-test-ca",
       "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.crt")


def make_cert(d, name):
    """A serving certificate for SERVER_NAME and 127.0.0.1, signed by the test CA."""
    ext = f"{d}/{name}.ext"
    with open(ext, "w") as f:
        f.write(f"subjectAltName=DNS:{SERVER_NAME},IP:127.0.0.1\n")
    sh("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
       "-keyout", f"{d}/{name}.key", "-out", f"{d}/{name}.csr")
    sh("openssl", "x509", "-req", "-in", f"{d}/{name}.csr", "-CA", f"{d}/ca.crt", "-CAkey", f"{d}/ca.key",
       "-CAcreateserial", "-days", "1", "-extfile", ext, "-out", f"{d}/{name}.crt")
    return f"{d}/{name}.crt", f"{d}/{name}.key"
