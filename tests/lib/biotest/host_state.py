"""What a real node could leave behind on the host, read from the host's own namespaces:
processes of the node's programs, namespaces, mounts, cgroups, network links and rules,
sysctls, paths, loop devices and BPF programs. snapshot() before, diff() after."""
import glob
import os
import subprocess

from .realnode import LOOP_PREFIX, our_bpf_programs

# Only a real node runs these; the control plane's programs also run in other suites' clusters, so
# those count as ours only when their command line names our workdir (see _processes).
NODE_PROGRAMS = {"kubelet", "containerd", "containerd-shim-runc-v2", "runc", "pause"}
SYSCTLS = ["vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops", "net/ipv4/ip_forward",
           "net/ipv4/conf/all/route_localnet"]
PATHS = ["/var/lib/kubelet", "/var/lib/cni", "/run/containerd", "/run/netns", "/etc/cni/net.d",
         "/var/log/pods", "/var/log/containers"]


def _out(*args):
    return subprocess.run(args, capture_output=True, text=True).stdout


def _processes(workdir_prefix="/tmp/bio-realnode-"):
    """(exe, pid) of processes a real-node cluster could leave: the node's programs, anything
    with our workdir on its command line, anything in a kubepods cgroup (pods)."""
    found = set()
    for p in glob.glob("/proc/[0-9]*"):
        try:
            exe = os.path.basename(os.readlink(p + "/exe")).removesuffix(" (deleted)")
            with open(p + "/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
            with open(p + "/cgroup") as f:
                cgroups = f.read()
        except OSError:
            continue
        if exe in NODE_PROGRAMS or workdir_prefix in cmdline or "/kubepods" in cgroups:
            found.add((exe, int(p[6:])))
    return found


def _namespaces():
    spaces = set()
    for p in glob.glob("/proc/[0-9]*/ns/*"):
        if p.endswith(("/net", "/mnt")):
            try:
                spaces.add(os.readlink(p))
            except OSError:
                pass
    return spaces


def _mounts():
    with open("/proc/self/mountinfo") as f:
        return {" ".join(line.split()[3:5]) for line in f}


def snapshot():
    return {
        "processes": _processes(),
        "namespaces": _namespaces(),
        "mounts": _mounts(),
        "cgroups": set(glob.glob("/sys/fs/cgroup/*/kubepods*") + glob.glob("/sys/fs/cgroup/kubepods*")),
        "links": {line.split(":")[1].strip() for line in _out("ip", "-o", "link", "show").splitlines()},
        "iptables": set(line for line in _out("iptables-save").splitlines() if not line.startswith(("#", ":"))),
        "sysctls": {s: open("/proc/sys/" + s).read().strip() for s in SYSCTLS},
        "paths": {p for p in PATHS if os.path.exists(p)},
        "loops": {line for line in _out("losetup", "-n", "-O", "NAME,BACK-FILE").splitlines()
                  if LOOP_PREFIX in line},
        "bpf": set(our_bpf_programs().values()),
    }


def diff(before, after):
    """Human-readable differences that are leftovers (new things), or changed values."""
    problems = []
    new_procs = {p for p in after["processes"] if p not in before["processes"]}
    if new_procs:
        problems.append(f"processes left running: {sorted(new_procs)}")
    # Other processes on the machine may come and go; our namespaces would outlive us only
    # through a process or a pin, so a namespace nobody had before is a leak.
    if after["namespaces"] - before["namespaces"]:
        problems.append(f"namespaces left: {sorted(after['namespaces'] - before['namespaces'])}")
    for key in ("mounts", "cgroups", "links", "iptables", "paths", "loops", "bpf"):
        extra = after[key] - before[key]
        if extra:
            problems.append(f"{key} left behind: {sorted(extra)}")
    if after["sysctls"] != before["sysctls"]:
        problems.append(f"sysctls changed: {before['sysctls']} -> {after['sysctls']}")
    return problems
