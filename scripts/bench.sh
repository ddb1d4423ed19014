#!/usr/bin/env bash
# make bench: BPF cost per IO, IOPS overhead and scrape cost of the node-agent on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export BIO_AGENT_BIN="${BIO_AGENT_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/bio-exporter/target}/release/node-agent}"
exec python3 scripts/bench.py "$@"
