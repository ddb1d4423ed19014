#!/usr/bin/env bash
# Run a command inside a cluster started with up.sh --real-nodes (its private network and mount
# namespaces), with <workdir>/env loaded: KUBECONFIG, PATH (kubectl, helm), CONTAINERD_ADDRESS.
# Usage: enter.sh <workdir> CMD [ARGS...]      e.g. enter.sh "$W" kubectl get pods -A
#        enter.sh <workdir>                     an interactive shell
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
source "$CLUSTER_DIR/netns.sh"
W="$(abs_workdir "${1:-}")"; shift
load_env "$W"
ns_exists "$W" || die "$W has no cluster namespaces (was it started with --real-nodes?)"
(($#)) || set -- "${SHELL:-bash}"
ns_exec "$W" "$@"
