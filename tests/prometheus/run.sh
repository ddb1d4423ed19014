#!/usr/bin/env bash
# Builds (or reuses the cached) Prometheus 3.x, then runs the Prometheus end-to-end tests against
# it and against Debian's Prometheus 2.42 (/usr/bin/prometheus). As root: the tests load BPF and
# make loop devices. Extra arguments go to pytest. Exit code: pytest's.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/bio-exporter/target}"
export BIO_AGENT_BIN="${BIO_AGENT_BIN:-$CARGO_TARGET_DIR/debug/node-agent}"

prom3="$("$here/build.sh" | tail -n 1)"
[[ -x "$prom3" ]] || { echo "run.sh: build.sh gave no binary ($prom3)" >&2; exit 1; }
export BIO_PROMETHEUS3="$prom3"

cd "$repo"
exec python3 -m pytest -q -rs tests/prometheus "$@"
