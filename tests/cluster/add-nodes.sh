#!/usr/bin/env bash
# Create N fake nodes managed by kwok and wait until they are Ready.
# Usage: add-nodes.sh <workdir> N [prefix]     (nodes <prefix>-0 .. <prefix>-N-1,
#        prefix defaults to "kwok-node")
# Each node: annotation kwok.x-k8s.io/node=fake (what kwok manages), the usual
# kubernetes.io/{hostname,os,arch} and node.kubernetes.io/instance-type labels,
# type=kwok, 32 CPU / 256Gi / 110 pods allocatable, no taints.
# Env: CLUSTER_TIMEOUT seconds to wait for Ready (default 180).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

W="$(abs_workdir "${1:-}")"
N="${2:-}"
PREFIX="${3:-kwok-node}"
[[ "$N" =~ ^[0-9]+$ ]] || die "usage: add-nodes.sh <workdir> N [prefix]"
load_env "$W"
TIMEOUT="${CLUSTER_TIMEOUT:-180}"

manifest() {
  local i name
  for ((i = 0; i < N; i++)); do
    name="$PREFIX-$i"
    cat <<YAML
---
apiVersion: v1
kind: Node
metadata:
  name: $name
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    type: kwok
    kubernetes.io/hostname: $name
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    beta.kubernetes.io/os: linux
    beta.kubernetes.io/arch: amd64
    node.kubernetes.io/instance-type: kwok
    topology.kubernetes.io/region: kwok-region
    topology.kubernetes.io/zone: kwok-zone-a
    node-role.kubernetes.io/worker: ""
spec: {}
status:
  allocatable: {cpu: "32", memory: 256Gi, pods: "110", ephemeral-storage: 1Ti}
  capacity: {cpu: "32", memory: 256Gi, pods: "110", ephemeral-storage: 1Ti}
  nodeInfo:
    architecture: amd64
    operatingSystem: linux
    kernelVersion: 6.1.0-kwok
    osImage: kwok fake node
    kubeletVersion: v1.37.2
    containerRuntimeVersion: kwok
YAML
  done
}

((N > 0)) || exit 0
manifest | kubectl apply -f - >&2
names=()
for ((i = 0; i < N; i++)); do names+=("node/$PREFIX-$i"); done
if ! kubectl wait --for=condition=Ready --timeout="${TIMEOUT}s" "${names[@]}" >&2; then
  echo "---- last 30 lines of $CLUSTER_LOGS/kwok.log ----" >&2
  tail -n 30 "$CLUSTER_LOGS/kwok.log" >&2 || true
  die "nodes did not become Ready"
fi
# Pods are only scheduled once node-ipam gave the node a podCIDR and the
# not-ready taint is gone; wait for both so callers can deploy right away.
deadline=$((SECONDS + TIMEOUT))
for n in "${names[@]}"; do
  until [[ -n "$(kubectl get "$n" -o jsonpath='{.spec.podCIDR}')" &&
           -z "$(kubectl get "$n" -o jsonpath='{.spec.taints[?(@.key=="node.kubernetes.io/not-ready")].key}')" ]]; do
    ((SECONDS < deadline)) || die "$n has no podCIDR or still has the not-ready taint after ${TIMEOUT}s"
    sleep 0.5
  done
done
printf '%s\n' "${names[@]#node/}"
