"""A real local Kubernetes control plane (tests/cluster/up.sh) for a test module or a benchmark.

Start it with `running_cluster(workdir)`, which always runs tests/cluster/down.sh afterwards, even
when a test failed or the API server was restarted by a test.
"""
import contextlib
import os
import signal
import subprocess
import time

from . import REPO

CLUSTER = os.path.join(REPO, "tests", "cluster")


def agent_env(kubeconfig):
    """The environment for an agent that talks to the test API server on loopback."""
    return dict(os.environ, KUBECONFIG=kubeconfig, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")


class Cluster:
    def __init__(self, workdir):
        self.workdir = str(workdir)
        out = subprocess.run(["bash", "-c", 'source "$1/env" && env -0', "_", self.workdir],
                             capture_output=True, check=True).stdout.decode()
        self.env = dict(kv.split("=", 1) for kv in out.split("\0") if "=" in kv)
        self.restarted = []  # API servers this process started (reaped in running_cluster)

    def run(self, *args, stdin=None, kubeconfig=None, timeout=60):
        """A command with the cluster's env (KUBECONFIG = admin unless given): CompletedProcess."""
        env = dict(self.env)
        if kubeconfig:
            env["KUBECONFIG"] = kubeconfig
        return subprocess.run(list(args), input=stdin, capture_output=True, text=True, env=env, timeout=timeout)

    def kubectl(self, *args, stdin=None, kubeconfig=None):
        r = self.run("kubectl", "--request-timeout=20s", *args, stdin=stdin, kubeconfig=kubeconfig)
        assert r.returncode == 0, f"kubectl {' '.join(args)} failed:\n{r.stderr}"
        return r.stdout

    def apply(self, manifest):
        return self.kubectl("apply", "-f", "-", stdin=manifest)

    def token(self, sa, namespace):
        return self.kubectl("create", "token", sa, "-n", namespace).strip()

    def sa_kubeconfig(self, namespace, sa):
        """A kubeconfig that authenticates as this (existing) ServiceAccount with a bound token."""
        out = os.path.join(self.workdir, f"{namespace}-{sa}.kubeconfig")
        subprocess.run([f"{CLUSTER}/sa-kubeconfig.sh", self.workdir, namespace, sa, out],
                       check=True, capture_output=True, timeout=120)
        return out

    def can_i(self, kubeconfig, *args):
        """`kubectl auth can-i` as that kubeconfig: True/False ("no" exits 1)."""
        r = self.run("kubectl", "--request-timeout=20s", "auth", "can-i", *args, kubeconfig=kubeconfig)
        answer = r.stdout.strip()
        assert answer in ("yes", "no"), f"kubectl auth can-i {' '.join(args)}: {r.stdout} {r.stderr}"
        return answer == "yes"

    def _apiserver_entries(self):
        with open(os.path.join(self.workdir, "pids")) as f:
            return [line.split() for line in f if line.startswith("kube-apiserver ")]

    def apiserver_pid(self):
        for _, pid, exe in self._apiserver_entries():
            if os.path.realpath(f"/proc/{pid}/exe") == exe:
                return int(pid)
        raise AssertionError("kube-apiserver is not running")

    def kill_apiserver(self, sig=signal.SIGKILL, timeout=30):
        """The API server gone (SIGKILL by default: SIGTERM's graceful shutdown can take 30 s)."""
        pid = self.apiserver_pid()
        os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while os.path.exists(f"/proc/{pid}/exe") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not os.path.exists(f"/proc/{pid}/exe"), f"kube-apiserver {pid} still runs {timeout}s after {sig!r}"

    def restart_apiserver(self, timeout=120):
        """Starts the API server again with up.sh's command line (the first line of its log, all
        arguments free of spaces) on the same port and etcd, recorded in `pids` for down.sh."""
        log = os.path.join(self.workdir, "logs", "kube-apiserver.log")
        with open(log) as f:
            first = f.readline()
        assert first.startswith("+ "), f"unexpected first line of {log}: {first!r}"
        argv = first[2:].split()
        with open(log, "a") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.restarted.append(proc)
        with open(os.path.join(self.workdir, "pids"), "a") as f:
            f.write(f"kube-apiserver {proc.pid} {argv[0]}\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"restarted kube-apiserver exited {proc.returncode}; see {log}"
            if self.run("kubectl", "--request-timeout=5s", "get", "--raw", "/readyz", timeout=30).returncode == 0:
                return
            time.sleep(0.5)
        raise AssertionError(f"restarted kube-apiserver not ready after {timeout}s; see {log}")


@contextlib.contextmanager
def running_cluster(workdir):
    """tests/cluster/up.sh in workdir, yielding a Cluster; down.sh afterwards, whatever happened."""
    cluster = None
    try:
        up = subprocess.run([f"{CLUSTER}/up.sh", str(workdir)], capture_output=True, text=True, timeout=900)
        assert up.returncode == 0, f"tests/cluster/up.sh failed:\n{up.stderr[-6000:]}"
        cluster = Cluster(workdir)
        yield cluster
    finally:
        subprocess.run([f"{CLUSTER}/down.sh", str(workdir)], capture_output=True, timeout=120)
        for proc in cluster.restarted if cluster else ():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
