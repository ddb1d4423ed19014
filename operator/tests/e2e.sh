#!/usr/bin/env bash
# End-to-end check of bio-operator against a real kube-apiserver from
# tests/cluster (kwok fake nodes, so DaemonSet pods "run" without a kernel).
# The operator runs on this machine as the chart's ServiceAccount, so the
# chart's RBAC is exercised too.
#
# Usage: operator/tests/e2e.sh [workdir]
#   With a workdir of a running tests/cluster cluster it reuses it (and leaves
#   it up); without, it starts one in a temp dir and stops it at the end.
# Env: BIO_OPERATOR_BIN  operator binary (default: cargo build, debug)
#      HELM              helm binary (default: helm from the cluster's PATH)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CLUSTER="$ROOT/tests/cluster"
SYS_NS=bio-e2e-system
AGENT_NS=bio-e2e-agents
OTHER_NS=bio-e2e-team-b
RELEASE=bio-e2e
FULL="$RELEASE-bio-exporter"
PASS=0 FAIL=0
PIDS=()

log() { echo "e2e: $*" >&2; }
ok() { PASS=$((PASS + 1)); log "ok: $*"; }
bad() { FAIL=$((FAIL + 1)); log "FAIL: $*"; }

OWN_CLUSTER=0
if [[ -n "${1:-}" ]]; then
  W="$1"
else
  W="$(mktemp -d /tmp/bio-e2e.XXXXXX)"
  OWN_CLUSTER=1
  "$CLUSTER/up.sh" "$W" >&2
fi
# shellcheck disable=SC1091
source "$W/env"
ADMIN_KUBECONFIG="$KUBECONFIG"
HELM="${HELM:-helm}"
OUT="$W/bio-e2e"
mkdir -p "$OUT"

cleanup() {
  local pid
  if ((!OWN_CLUSTER)); then
    # Leave a reused cluster as found; delete while an operator still runs so
    # the finalizers are handled.
    KUBECONFIG="$ADMIN_KUBECONFIG" kubectl delete biomonitors --all -n "$AGENT_NS" --timeout=30s >/dev/null 2>&1 || true
    KUBECONFIG="$ADMIN_KUBECONFIG" kubectl delete biomonitors --all -n "$OTHER_NS" --timeout=30s >/dev/null 2>&1 || true
    ((CREATED_SM_CRD)) && KUBECONFIG="$ADMIN_KUBECONFIG" kubectl delete crd servicemonitors.monitoring.coreos.com >/dev/null 2>&1
  fi
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if ((OWN_CLUSTER)); then
    "$CLUSTER/down.sh" "$W" >&2 || true
  fi
}
trap cleanup EXIT

# wait_for SECONDS DESCRIPTION CMD...: retry CMD until it succeeds.
wait_for() {
  local timeout="$1" what="$2" deadline=$((SECONDS + $1))
  shift 2
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      bad "$what (after ${timeout}s)"
      return 1
    fi
    sleep 1
  done
  ok "$what"
}

k() { KUBECONFIG="$ADMIN_KUBECONFIG" kubectl --request-timeout=10s "$@"; }
# cond NS NAME TYPE -> "Status/Reason"
cond() { k get biomonitor -n "$1" "$2" -o jsonpath="{.status.conditions[?(@.type==\"$3\")].status}/{.status.conditions[?(@.type==\"$3\")].reason}"; }
cond_is() { [[ "$(cond "$1" "$2" "$3")" == "$4" ]]; }
gen_observed() { [[ "$(k get biomonitor -n "$1" "$2" -o jsonpath='{.metadata.generation}')" == "$(k get biomonitor -n "$1" "$2" -o jsonpath='{.status.observedGeneration}')" ]]; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
leader_metric() { curl -fsS --max-time 2 "http://127.0.0.1:$1/metrics" | grep -q '^bio_operator_leader 1'; }

# ------------------------------------------------------------------ setup --
CREATED_SM_CRD=0
if k get crd servicemonitors.monitoring.coreos.com >/dev/null 2>&1; then
  log "this test needs a cluster without the ServiceMonitor CRD"
  exit 2
fi
log "nodes: 3 fake nodes labelled bio-e2e=yes, one of them pool=db"
"$CLUSTER/add-nodes.sh" "$W" 3 bio-e2e >&2
for i in 0 1 2; do k label node "bio-e2e-$i" bio-e2e=yes --overwrite >/dev/null; done
k label node bio-e2e-2 pool=db --overwrite >/dev/null

log "helm install (agent namespace created and labelled by the chart)"
"$HELM" upgrade --install "$RELEASE" "$ROOT/charts/bio-exporter" -n "$SYS_NS" --create-namespace \
  --set agentNamespace.create=true --set agentNamespace.name="$AGENT_NS" \
  --set operator.replicaCount=0 >&2
k create namespace "$OTHER_NS" --dry-run=client -o yaml | k apply -f - >/dev/null
k label namespace "$OTHER_NS" pod-security.kubernetes.io/enforce=privileged --overwrite >/dev/null
"$CLUSTER/sa-kubeconfig.sh" "$W" "$SYS_NS" "$FULL" "$OUT/operator.kubeconfig" >/dev/null

if [[ -z "${BIO_OPERATOR_BIN:-}" ]]; then
  (cd "$ROOT" && cargo build -q -p bio-operator --bin bio-operator)
  BIO_OPERATOR_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/bio-operator"
fi

start_operator() { # NAME PORT
  KUBECONFIG="$OUT/operator.kubeconfig" "$BIO_OPERATOR_BIN" \
    --lease-namespace "$SYS_NS" --lease-name "$FULL-leader" \
    --agent-cluster-role "$FULL-agent" --agent-image example.invalid/node-agent:e2e \
    --metrics-addr "127.0.0.1:$2" --leader-identity "$1" \
    --crd-retry-interval 5s --resync-interval 30s \
    --log-level info,bio_operator=debug --log-format json \
    >"$OUT/$1.log" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}

PORT_A="$(free_port)"
start_operator op-a "$PORT_A"
PID_A=$LAST_PID
wait_for 60 "operator A leads" leader_metric "$PORT_A"

# ------------------------------------------------------ schema validation --
# rejects NAME SPEC PATTERN: a server-side dry run must fail mentioning PATTERN.
rejects() {
  local out
  if out="$(printf 'apiVersion: bioexporter.io/v1alpha1\nkind: BioMonitor\nmetadata: {name: %s, namespace: %s}\nspec: %s\n' "$1" "$AGENT_NS" "$2" \
    | k apply --dry-run=server -f - 2>&1)"; then
    bad "accepted: $1 $2"
  elif [[ "$out" == *"$3"* ]]; then
    ok "rejected: $1 $2"
  else
    bad "rejected for another reason: $out"
  fi
}
rejects Bad.Name '{}' 'DNS-1035'
rejects "$(printf 'a%.0s' {1..58})" '{}' 'at most 57'
rejects disks '{agent: {port: 80}}' 'greater than or equal to 1024'
rejects disks '{agent: {extraCapabilities: [CAP_SYS_RESOURCE]}}' 'without the CAP_ prefix'
rejects disks '{serviceMonitor: {interval: 30s, scrapeTimeout: 1m}}' 'scrapeTimeout must not be longer than interval'
rejects disks '{attach: fentry}' 'Unsupported value'
rejects disks '{serviceMonitor: {interval: 5 minutes}}' 'should match'

# ------------------------------------------------- reconcile & conditions --
k apply -f - >/dev/null <<EOF
apiVersion: bioexporter.io/v1alpha1
kind: BioMonitor
metadata: {name: disks, namespace: $AGENT_NS}
spec:
  nodeSelector: {bio-e2e: "yes"}
  devices: {exclude: ["^loop", "^sd[a-z]\$"]}
EOF
wait_for 60 "DaemonSetReady=True on 3 nodes" cond_is "$AGENT_NS" disks DaemonSetReady True/AllAgentsReady
wait_for 30 "ServiceMonitorReady=False/CRDNotInstalled without the CRD" cond_is "$AGENT_NS" disks ServiceMonitorReady False/CRDNotInstalled
[[ "$(k get biomonitor -n "$AGENT_NS" disks -o jsonpath='{.status.nodes}')" == 3/3 ]] && ok "status.nodes 3/3" || bad "status.nodes"
args="$(k get ds -n "$AGENT_NS" disks-agent -o jsonpath='{.spec.template.spec.containers[0].args}')"
[[ "$args" == *'--device-exclude=^sd[a-z]$$'* && "$args" == *'--node-name=$(NODE_NAME)'* ]] && ok "agent args" || bad "agent args: $args"
sc="$(k get ds -n "$AGENT_NS" disks-agent -o jsonpath='{.spec.template.spec.containers[0].securityContext}')"
[[ "$sc" == *'"add":["BPF","PERFMON"]'* && "$sc" == *'"privileged":false'* ]] && ok "agent securityContext" || bad "securityContext: $sc"
k get svc,sa -n "$AGENT_NS" disks-agent >/dev/null && ok "Service and ServiceAccount" || bad "Service/ServiceAccount missing"
k get clusterrolebinding "bio-exporter-agent:$AGENT_NS:disks" >/dev/null && ok "ClusterRoleBinding" || bad "ClusterRoleBinding missing"
sleep 12 # two CRD retry periods
uid="$(k get biomonitor -n "$AGENT_NS" disks -o jsonpath='{.metadata.uid}')"
n="$(k get events -n "$AGENT_NS" --field-selector "reason=CRDNotInstalled,involvedObject.uid=$uid" -o name | wc -l)"
[[ "$n" == 1 ]] && ok "one CRDNotInstalled event" || bad "CRDNotInstalled events: $n"

log "install a ServiceMonitor CRD: the ServiceMonitor must follow without a restart"
CREATED_SM_CRD=1
k apply -f - >/dev/null <<'EOF'
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: servicemonitors.monitoring.coreos.com}
spec:
  group: monitoring.coreos.com
  names: {kind: ServiceMonitor, plural: servicemonitors, singular: servicemonitor, listKind: ServiceMonitorList}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
EOF
wait_for 60 "Ready=True once the CRD exists" cond_is "$AGENT_NS" disks Ready True/Ready
[[ "$(k get servicemonitor -n "$AGENT_NS" disks-agent -o jsonpath='{.spec.endpoints[0].honorLabels}')" == true ]] \
  && ok "ServiceMonitor honorLabels" || bad "ServiceMonitor honorLabels"

log "bad regex -> InvalidSpec"
k patch biomonitor -n "$AGENT_NS" disks --type merge -p '{"spec":{"devices":{"include":["nvme(\\d+"]}}}' >/dev/null
wait_for 30 "Ready=False/InvalidSpec" cond_is "$AGENT_NS" disks Ready False/InvalidSpec
wait_for 10 "observedGeneration follows an invalid spec" gen_observed "$AGENT_NS" disks
k patch biomonitor -n "$AGENT_NS" disks --type merge -p '{"spec":{"devices":{"include":["^nvme\\d+n\\d+$"]},"persistentVolumeLabels":false}}' >/dev/null
wait_for 30 "fixed spec -> Ready=True" cond_is "$AGENT_NS" disks Ready True/Ready
wait_for 10 "observedGeneration advanced" gen_observed "$AGENT_NS" disks
args="$(k get ds -n "$AGENT_NS" disks-agent -o jsonpath='{.spec.template.spec.containers[0].args}')"
[[ "$args" == *'--pv-labels=false'* ]] && ok "spec change rolled into the DaemonSet" || bad "args after change: $args"
wait_for 20 "ClusterRoleBinding removed without PV labels" bash -c "! KUBECONFIG=$ADMIN_KUBECONFIG kubectl get clusterrolebinding bio-exporter-agent:$AGENT_NS:disks"

# -------------------------------------------------------------- conflicts --
k apply -f - >/dev/null <<EOF
apiVersion: bioexporter.io/v1alpha1
kind: BioMonitor
metadata: {name: db, namespace: $OTHER_NS}
spec:
  nodeSelector: {bio-e2e: "yes", pool: db}
  serviceMonitor: {enabled: false}
EOF
wait_for 30 "later overlapping monitor: Ready=False/NodeConflict" cond_is "$OTHER_NS" db Ready False/NodeConflict
k get ds -n "$OTHER_NS" db-agent >/dev/null 2>&1 && bad "blocked monitor has a DaemonSet" || ok "blocked monitor not rolled out"

log "delete the earlier monitor: children go, the blocked one takes over"
k delete biomonitor -n "$AGENT_NS" disks --timeout=60s >/dev/null && ok "deleted (finalizer released)" || bad "delete hung"
wait_for 60 "successor Ready=True" cond_is "$OTHER_NS" db Ready True/Ready
wait_for 60 "owned DaemonSet garbage-collected" bash -c "! KUBECONFIG=$ADMIN_KUBECONFIG kubectl get ds -n $AGENT_NS disks-agent"

# -------------------------------------------------------- leader election --
PORT_B="$(free_port)"
start_operator op-b "$PORT_B"
sleep 3
leader_metric "$PORT_B" && bad "standby B also leads" || ok "standby B waits"
kill -TERM "$PID_A"
wait_for 20 "B leads after A released the lease" leader_metric "$PORT_B"
grep -q 'released leadership' "$OUT/op-a.log" && ok "A released the lease" || bad "A did not release"

echo "$PASS passed, $FAIL failed"
((FAIL == 0))
