# The private network + mount namespace a cluster with real nodes lives in (sourced, not
# executed). A real kubelet refuses a loopback node IP, and the container runtime builds a
# bridge, veths and iptables rules: all of it must stay off the host. So the whole cluster
# (control plane, containerd, kubelet, pods' bridge) runs in one network namespace with no
# uplink (nothing can leave it) and one mount namespace with private propagation (the
# kubelet's mounts, tmpfs /run, sysctl stand-ins never reach the host).
#
# Both namespaces are pinned by bind mounts under <workdir>/ns/ so every script can enter
# them (ns_exec) and down.sh can free them (ns_destroy). Host paths the kubelet insists on
# that do not exist on the host (/var/lib/kubelet, /var/lib/cni) are created empty, listed in
# <workdir>/ns/created, and removed again by ns_destroy.
# shellcheck shell=bash

# The node's address: kubelet rejects loopback addresses, so a /32 on the namespace's lo.
REAL_NODE_IP=10.200.0.1
# The `kubernetes` Service's ClusterIP (first address of up.sh's --service-cluster-ip-range).
KUBERNETES_SERVICE_IP=10.96.0.1

ns_dir() { echo "$1/ns"; }
ns_exists() { [[ -f "$1/ns/net" && -f "$1/ns/mnt" ]] && mountpoint -q "$1/ns/mnt" 2>/dev/null; }

# ns_exec WORKDIR CMD...: run CMD inside the cluster's namespaces, in the current directory.
ns_exec() {
  local w="$1"; shift
  nsenter --net="$w/ns/net" --mount="$w/ns/mnt" --wd="$PWD" -- "$@"
}

# ns_create WORKDIR: new network + mount namespaces pinned under WORKDIR/ns.
ns_create() {
  local w="$1" d="$1/ns"
  [[ $(id -u) == 0 ]] || die "real nodes need root (namespaces, mounts, cgroups, BPF)"
  command -v nsenter >/dev/null && command -v unshare >/dev/null || die "nsenter/unshare (util-linux) missing"
  mkdir -p "$d"
  # unshare can pin a mount namespace only on a mount that does not propagate
  # (otherwise the namespace would contain its own pin).
  mountpoint -q "$d" || mount --bind "$d" "$d"
  mount --make-private "$d"
  touch "$d/net" "$d/mnt"
  unshare --net="$d/net" --mount="$d/mnt" --propagation private true ||
    die "could not create the cluster's namespaces"
}

# ns_mkdir_host PATH: make sure PATH exists on the host (as an empty dir we remove again).
ns_mkdir_host() {
  local w="$1" p="$2" top="$2"
  [[ -e "$p" ]] && return 0
  # Record the topmost missing component so ns_destroy removes all it made.
  while [[ ! -e "$(dirname "$top")" ]]; do top="$(dirname "$top")"; done
  mkdir -p "$p"
  echo "$top" >> "$w/ns/created"
}

# ns_setup WORKDIR: runs INSIDE the namespaces (once, from up.sh): loopback and node address,
# tmpfs /run, the kubelet's directories (shared so HostToContainer mounts propagate), and files
# standing in for the host-wide sysctls the kubelet would otherwise write.
ns_setup() {
  local w="$1" node="$2" rn="$1/realnode"
  mkdir -p "$rn"/{kubelet,log,cni-lib,sysctl/vm,sysctl/kernel,etc}
  ns_mkdir_host "$w" /var/lib/kubelet
  ns_mkdir_host "$w" /var/lib/cni
  ip link set lo up
  ip addr add "$REAL_NODE_IP/32" dev lo
  # Per network namespace: the host's values are untouched.
  sysctl -q -w net.ipv4.ip_forward=1 net.ipv4.conf.all.route_localnet=1
  mount -t tmpfs -o mode=0755 tmpfs /run
  mkdir -p /run/netns
  mount --bind "$rn/kubelet" /var/lib/kubelet
  mount --make-rshared /var/lib/kubelet
  mount --bind "$rn/log" /var/log
  mount --bind "$rn/cni-lib" /var/lib/cni
  # kubelet writes vm.overcommit_memory=1, kernel.panic=10, kernel.panic_on_oops=1 unless they
  # already read so: give it files that do (only in this mount namespace).
  local kv
  for kv in vm/overcommit_memory=1 kernel/panic=10 kernel/panic_on_oops=1; do
    echo "${kv#*=}" > "$rn/sysctl/${kv%%=*}"
    mount --bind "$rn/sysctl/${kv%%=*}" "/proc/sys/${kv%%=*}"
  done
  # The API server dials the kubelet by node name.
  printf '127.0.0.1 localhost\n%s %s\n' "$REAL_NODE_IP" "$node" > "$rn/etc/hosts"
  mount --bind "$rn/etc/hosts" /etc/hosts
  printf 'nameserver 127.0.0.1\n' > "$rn/etc/resolv.conf"
  # Classic tracepoints (attach: tracepoint / auto fallback) need tracefs.
  [[ -d /sys/kernel/tracing/events ]] || mount -t tracefs nodev /sys/kernel/tracing
}

# ns_kill_all WORKDIR: SIGKILL every process still in the cluster's mount namespace or in a
# kubepods cgroup (pods, container shims, anything a test left), then wait for them to go.
ns_kill_all() {
  ns_exists "$1" || return 0
  NS_MNT_INODE="$(stat -L -c %i "$1/ns/mnt")" kill_until_gone processes ns_and_pod_procs
}

# ns_kill_pods: SIGKILL every process in a kubepods cgroup (the pods) until none is left.
ns_kill_pods() { kill_until_gone "pod processes" kubepods_procs; }

# kill_until_gone WHAT LISTER: SIGKILL the PIDs LISTER prints until it prints none (10 s at most).
kill_until_gone() {
  local what="$1" lister="$2" pids=() i
  for ((i = 0; i < 50; i++)); do
    mapfile -t pids < <("$lister")
    ((${#pids[@]} == 0)) && return 0
    kill -KILL "${pids[@]}" 2>/dev/null || true
    sleep 0.2
  done
  log "$what survived SIGKILL: ${pids[*]}"
}

# ns_and_pod_procs: PIDs in the mount namespace whose inode is $NS_MNT_INODE, and pods.
ns_and_pod_procs() {
  local p
  for p in /proc/[0-9]*; do
    [[ "$(stat -L -c %i "$p/ns/mnt" 2>/dev/null)" == "$NS_MNT_INODE" ]] && echo "${p#/proc/}"
  done
  kubepods_procs
}

# kubepods_procs: PIDs in any kubepods cgroup (cgroup v1 hierarchies and v2).
kubepods_procs() {
  local f
  for f in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
    [[ -d "$f" ]] || continue
    find "$f" -name cgroup.procs -exec cat {} + 2>/dev/null
  done | sort -u
}

# kubepods_remove: the kubelet's cgroups, deepest first, in every hierarchy.
kubepods_remove() {
  local f
  for f in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
    [[ -d "$f" ]] || continue
    find "$f" -depth -type d -exec rmdir {} + 2>/dev/null || true
    [[ ! -d "$f" ]] || log "could not remove cgroup $f"
  done
}

# ns_destroy WORKDIR: run on the host after every process is gone: free the namespaces (their
# mounts, bridge, veths, rules go with them) and remove the host dirs ns_setup created.
ns_destroy() {
  local w="$1" d="$1/ns" p
  [[ -d "$d" ]] || return 0
  ns_kill_all "$w"
  kubepods_remove
  for p in net mnt; do mountpoint -q "$d/$p" && umount "$d/$p"; done
  mountpoint -q "$d" && umount "$d"
  if [[ -f "$d/created" ]]; then
    while read -r p; do
      [[ -n "$p" && -d "$p" ]] && rmdir "$p" 2>/dev/null || [[ ! -e "$p" ]] || log "could not remove $p"
    done < <(tac "$d/created")
  fi
  rm -rf "$d"
}
