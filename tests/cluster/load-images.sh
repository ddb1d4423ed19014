#!/usr/bin/env bash
# Import image archives (docker-archive or oci-archive, e.g. from `make images`) into the real
# node's containerd, where pods find them without a registry (like `kind load image-archive`).
# Usage: load-images.sh <workdir> ARCHIVE...
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
source "$CLUSTER_DIR/netns.sh"
W="$(abs_workdir "${1:-}")"; shift
(($#)) || die "usage: load-images.sh <workdir> ARCHIVE..."
load_env "$W"
[[ -n "${CONTAINERD_ADDRESS:-}" ]] || die "$W has no real node (up.sh --real-nodes 1)"
for a in "$@"; do
  [[ -f "$a" ]] || die "no such archive: $a"
  ns_exec "$W" ctr --address "$CONTAINERD_ADDRESS" -n k8s.io images import "$a" >&2 || die "import of $a failed"
done
