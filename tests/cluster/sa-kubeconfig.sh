#!/usr/bin/env bash
# Write a kubeconfig that authenticates as a ServiceAccount (bound token from
# `kubectl create token`), e.g. to prove what a Helm chart's RBAC allows.
# Usage: sa-kubeconfig.sh <workdir> <namespace> <serviceaccount> <out> [duration]
#   duration defaults to 2h. The ServiceAccount must exist.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ $# -ge 4 ]] || die "usage: sa-kubeconfig.sh <workdir> <namespace> <serviceaccount> <out> [duration]"
W="$(abs_workdir "$1")" NS="$2" SA="$3" OUT="$4" DURATION="${5:-2h}"
load_env "$W"

kubectl get serviceaccount -n "$NS" "$SA" >/dev/null || die "ServiceAccount $NS/$SA not found"
TOKEN="$(kubectl create token -n "$NS" "$SA" --duration="$DURATION")"
[[ -n "$TOKEN" ]] || die "empty token for $NS/$SA"

mkdir -p "$(dirname "$OUT")"
umask 077
cat > "$OUT" <<YAML
apiVersion: v1
kind: Config
clusters:
- name: bio-test
  cluster:
    server: $APISERVER
    certificate-authority-data: $(base64 -w0 < "$CLUSTER_CA_CERT")
users:
- name: system:serviceaccount:$NS:$SA
  user:
    token: $TOKEN
contexts:
- name: bio-test
  context:
    cluster: bio-test
    user: system:serviceaccount:$NS:$SA
    namespace: $NS
current-context: bio-test
YAML
echo "$OUT"
