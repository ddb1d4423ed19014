"""--auth=kubernetes against a real API server: TokenReview + SubjectAccessReview decide /metrics.

One local cluster for the whole module (tests/cluster/up.sh, ~20 s). The agent runs as the
ServiceAccount `agent` (may only create tokenreviews and subjectaccessreviews); `scraper` may get the
non-resource URL /metrics; `nobody` has no rights. The outage test stops, resumes and finally kills
the kube-apiserver, so it must stay the last test of this file.
"""
import os
import re
import signal
import time
import urllib.error
import urllib.request

import pytest

from biotest.agent import Agent
from biotest.cluster import agent_env, running_cluster

NS = "bio-auth"
METRICS_TYPE_LINE = "# TYPE ebpf_bio_req_latency histogram"

RBAC = f"""
apiVersion: v1
kind: Namespace
metadata: {{name: {NS}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: agent, namespace: {NS}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: scraper, namespace: {NS}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: nobody, namespace: {NS}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: bio-auth-agent}}
rules:
- apiGroups: [authentication.k8s.io]
  resources: [tokenreviews]
  verbs: [create]
- apiGroups: [authorization.k8s.io]
  resources: [subjectaccessreviews]
  verbs: [create]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: bio-auth-agent}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: bio-auth-agent}}
subjects: [{{kind: ServiceAccount, name: agent, namespace: {NS}}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: bio-auth-scraper}}
rules:
- nonResourceURLs: ["/metrics"]
  verbs: [get]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: bio-auth-scraper}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: bio-auth-scraper}}
subjects: [{{kind: ServiceAccount, name: scraper, namespace: {NS}}}]
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running_cluster(tmp_path_factory.mktemp("auth-cluster")) as c:
        c.apply(RBAC)
        yield c


def review_calls(cluster):
    """TokenReviews and SubjectAccessReviews the API server has answered so far."""
    counts = {"tokenreviews": 0.0, "subjectaccessreviews": 0.0}
    for line in cluster.kubectl("get", "--raw", "/metrics").splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        m = re.search(r'resource="([^"]*)".*\}\s+(\S+)$', line)
        if m and m.group(1) in counts:
            counts[m.group(1)] += float(m.group(2))
    return counts["tokenreviews"], counts["subjectaccessreviews"]


@pytest.fixture(scope="module")
def agent(cluster):
    kubeconfig = cluster.sa_kubeconfig(NS, "agent")
    # The agent's identity can do its reviews, and nothing else.
    assert cluster.can_i(kubeconfig, "create", "tokenreviews.authentication.k8s.io")
    a = Agent(["--auth=kubernetes"], env=agent_env(kubeconfig))
    yield a
    a.stop()


@pytest.fixture(scope="module")
def tokens(cluster):
    return {sa: cluster.token(sa, NS) for sa in ("scraper", "nobody")}


def get(agent, path, token=None, authorization=None):
    """(status, body, headers) of GET path with a bearer token or a raw Authorization value."""
    req = urllib.request.Request(agent.url + path)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    if authorization is not None:
        req.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, r.read().decode(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), e.headers


def assert_unauthorized(reply, what):
    status, body, headers = reply
    assert status == 401, f"{what}: {status} {body}"
    assert (headers.get("WWW-Authenticate") or "").startswith("Bearer"), f"{what}: {dict(headers)}"
    assert METRICS_TYPE_LINE not in body


def test_scraper_token_gets_metrics(agent, tokens):
    status, body, _ = get(agent, "/metrics", tokens["scraper"])
    assert status == 200, f"{body}\n{agent.logs()}"
    assert METRICS_TYPE_LINE in body


def test_token_without_rbac_is_forbidden(agent, tokens):
    status, body, _ = get(agent, "/metrics", tokens["nobody"])
    assert status == 403, f"{status} {body}\n{agent.logs()}"
    assert f"system:serviceaccount:{NS}:nobody" in body and "get /metrics" in body
    assert METRICS_TYPE_LINE not in body


def test_missing_or_malformed_authorization_is_unauthorized(agent, tokens):
    assert_unauthorized(get(agent, "/metrics"), "no Authorization header")
    for value in ("Bearer", "Bearer ", "Basic dXNlcjpwYXNz", tokens["scraper"], f"Bearer {tokens['scraper']} x"):
        assert_unauthorized(get(agent, "/metrics", authorization=value), repr(value[:20]))


def test_garbage_and_tampered_tokens_are_unauthorized(agent, tokens):
    assert_unauthorized(get(agent, "/metrics", "garbage"), "garbage token")
    scraper = tokens["scraper"]
    tampered = scraper[:-2] + ("AA" if scraper[-2:] != "AA" else "BB")
    assert_unauthorized(get(agent, "/metrics", tampered), "token with a broken signature")


def test_health_endpoints_stay_open(agent):
    for path in ("/healthz", "/readyz"):
        status, body, _ = get(agent, path)
        assert status == 200, f"{path}: {status} {body}"


def test_steady_scrapes_cost_no_api_calls(agent, cluster):
    token = cluster.token("scraper", NS)
    before = review_calls(cluster)
    assert get(agent, "/metrics", token)[0] == 200
    first = review_calls(cluster)
    assert first[0] >= before[0] + 1 and first[1] >= before[1] + 1, (before, first)
    for _ in range(5):
        assert get(agent, "/metrics", token)[0] == 200
    assert review_calls(cluster) == first, "cached decisions must not call the API server"


def test_api_server_outage(agent, cluster, tokens):
    """Hung API (SIGSTOP): cached decisions hold, a new token gets 503 after the API timeout, and
    nothing of that failure is cached once it answers again. Then the API gone for good (killed):
    503 at once. Must stay last: the cluster has no API server afterwards."""
    fresh = [cluster.token("scraper", NS) for _ in range(3)]
    cached = cluster.token("scraper", NS)
    assert get(agent, "/metrics", cached)[0] == 200
    assert get(agent, "/metrics", tokens["nobody"])[0] == 403

    pid = cluster.apiserver_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        assert get(agent, "/metrics", tokens["nobody"])[0] == 403, "a cached denial holds"
        status, body, _ = get(agent, "/metrics", cached)
        assert status == 200 and METRICS_TYPE_LINE in body, f"a cached allow holds: {status} {body}"
        t0 = time.monotonic()
        status, body, headers = get(agent, "/metrics", fresh[0])
        assert status == 503, f"{status} {body}\n{agent.logs()}"
        assert "timed out" in body and headers.get("Retry-After"), body
        assert time.monotonic() - t0 < 15
        assert "503" in agent.logs() and "timed out" in agent.logs()
    finally:
        os.kill(pid, signal.SIGCONT)

    status, body, _ = get(agent, "/metrics", fresh[0])
    assert status == 200, f"the 503 must not be cached: {status} {body}\n{agent.logs()}"

    assert get(agent, "/metrics", fresh[1])[0] == 200  # cached just before the kill
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert get(agent, "/metrics", fresh[1])[0] == 200, "a cached allow holds with the API server gone"
    t0 = time.monotonic()
    status, body, _ = get(agent, "/metrics", fresh[2])
    assert status == 503, f"{status} {body}\n{agent.logs()}"
    assert "unreachable" in body, body
    assert cluster.env["APISERVER"] not in body, "the API address stays in the agent's log"
    assert time.monotonic() - t0 < 5, "a refused connection must not wait for the timeout"
