#!/usr/bin/env bash
# Stop the cluster started by up.sh <workdir>: SIGTERM every recorded process
# (newest first), SIGKILL what is still alive after 15 s. Safe to call twice,
# from a trap, or on a half-started cluster. Leaves <workdir> (logs) in place;
# pass --purge to delete the workdir as well.
# Usage: down.sh <workdir> [--purge]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ -n "${1:-}" ]] || die "usage: down.sh <workdir> [--purge]"
[[ -d "$1" ]] || { log "$1 does not exist, nothing to stop"; exit 0; }
W="$(cd "$1" && pwd)"

if [[ -f "$W/pids" ]]; then
  mapfile -t lines < <(tac "$W/pids")
  live=()
  for l in "${lines[@]}"; do
    read -r name pid exe <<<"$l"
    if pid_alive "$pid" "$exe"; then
      kill -TERM "$pid" 2>/dev/null || true
      live+=("$name:$pid:$exe")
    fi
  done
  deadline=$((SECONDS + 15))
  for e in "${live[@]}"; do
    IFS=: read -r name pid exe <<<"$e"
    while pid_alive "$pid" "$exe" && ((SECONDS < deadline)); do sleep 0.2; done
    if pid_alive "$pid" "$exe"; then
      log "$name ($pid) ignored SIGTERM, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  : > "$W/pids"
  ((${#live[@]} == 0)) || log "stopped ${#live[@]} processes (${live[*]%%:*})"
fi

if [[ "${2:-}" == --purge ]]; then
  rm -rf "$W"
fi
