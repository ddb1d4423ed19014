# Shared helpers for tests/cluster/*.sh (sourced, not executed).
# shellcheck shell=bash

# shellcheck disable=SC2034 # used by the scripts that source this file
CLUSTER_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

die() { echo "${0##*/}: error: $*" >&2; exit 1; }
log() { echo "${0##*/}: $*" >&2; }

# abs_workdir DIR: absolute path of DIR (created if missing).
abs_workdir() {
  [[ -n "${1:-}" ]] || die "missing <workdir> argument"
  mkdir -p "$1"
  (cd "$1" && pwd)
}

# load_env WORKDIR: source WORKDIR/env written by up.sh.
load_env() {
  [[ -f "$1/env" ]] || die "$1/env not found: is a cluster up in $1? (run tests/cluster/up.sh $1)"
  # shellcheck disable=SC1091
  source "$1/env"
}

# pid_alive PID EXE: PID runs and is the binary EXE (guards against PID reuse).
pid_alive() {
  local pid="$1" exe="$2" real
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  real="$(readlink "/proc/$pid/exe" 2>/dev/null)" || return 1
  [[ "$real" == "$exe" || "$real" == "$exe (deleted)" ]]
}
