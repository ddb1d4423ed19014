#!/usr/bin/env bash
# make bench-pv-labels: what PersistentVolume labels cost the node-agent (scrape time, RSS, API
# traffic) with 64 devices and 500 PVs in a real local API server. Root; ~15 min.
set -euo pipefail
cd "$(dirname "$0")/.."
export BIO_AGENT_BIN="${BIO_AGENT_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/bio-exporter/target}/release/node-agent}"
exec python3 scripts/bench_pv_labels.py "$@"
