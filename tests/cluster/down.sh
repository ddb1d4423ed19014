#!/usr/bin/env bash
# Stop the cluster started by up.sh <workdir>: SIGTERM the recorded processes
# (kwok/scheduler/KCM, then kube-apiserver, then etcd), SIGKILL whatever is
# still alive 10 s after its SIGTERM. Safe to call twice,
# from a trap, or on a half-started cluster. Leaves <workdir> (logs) in place;
# pass --purge to delete the workdir as well.
# With real nodes (up.sh --real-nodes) it stops the kubelet first, kills every pod and
# container shim, stops containerd and the rest, removes the kubelet's cgroups, frees the
# cluster's namespaces (their mounts, bridge, veths and rules go with them), detaches the loop
# devices listed in <workdir>/loops and removes the host directories up.sh had to create.
# Usage: down.sh <workdir> [--purge]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
source "$CLUSTER_DIR/netns.sh"

[[ -n "${1:-}" ]] || die "usage: down.sh <workdir> [--purge]"
[[ -d "$1" ]] || { log "$1 does not exist, nothing to stop"; exit 0; }
W="$(cd "$1" && pwd)"

# stop_group NAME...: SIGTERM the live processes of these names, wait up to
# 10 s, SIGKILL the rest. Clients first, then the apiserver, then etcd, so
# each can shut down cleanly while its backend is still there.
stopped=()
stop_group() {
  local want=" $* " l name pid exe live=() deadline
  for l in "${lines[@]}"; do
    read -r name pid exe <<<"$l"
    [[ "$want" == "  " || "$want" == *" $name "* ]] || continue
    if pid_alive "$pid" "$exe"; then
      kill -TERM "$pid" 2>/dev/null || true
      live+=("$name:$pid:$exe")
    fi
  done
  deadline=$((SECONDS + 10))
  for l in "${live[@]}"; do
    IFS=: read -r name pid exe <<<"$l"
    while pid_alive "$pid" "$exe" && ((SECONDS < deadline)); do sleep 0.2; done
    if pid_alive "$pid" "$exe"; then
      log "$name ($pid) ignored SIGTERM for 10 s, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    stopped+=("$name")
  done
}

if [[ -f "$W/pids" ]]; then
  # Real nodes: the kubelet first (so it restarts nothing), then every container.
  mapfile -t lines < <(grep -E '^kubelet-' "$W/pids" || true)
  ((${#lines[@]} == 0)) || { stop_group; ns_kill_pods; }
  mapfile -t lines < <(grep -vE '^(kube-apiserver|etcd) ' "$W/pids" | tac)
  stop_group # everything but apiserver and etcd (kwok, scheduler, KCM, ...)
  mapfile -t lines < "$W/pids"
  stop_group kube-apiserver
  stop_group etcd
  : > "$W/pids"
  ((${#stopped[@]} == 0)) || log "stopped ${#stopped[@]} processes (${stopped[*]})"
fi

# On the host side only: inside, the namespaces' pins are not visible (up.sh's host side
# calls down.sh again after a failure inside).
if [[ -z "${BIO_CLUSTER_INSIDE_NS:-}" ]]; then
  ns_destroy "$W"
  if [[ -s "$W/loops" ]]; then
    while read -r dev; do
      [[ -n "$dev" ]] && losetup "$dev" >/dev/null 2>&1 && { losetup -d "$dev" || log "could not detach $dev"; }
    done < "$W/loops"
    : > "$W/loops"
  fi
fi

if [[ "${2:-}" == --purge ]]; then
  rm -rf "$W"
fi
