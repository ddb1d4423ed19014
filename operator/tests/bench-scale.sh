#!/usr/bin/env bash
# Scale benchmark of bio-operator (a measurement, not a test: it fails only if
# the setup fails or something never finishes; it does not judge the figures).
#
# NODES kwok nodes in MONITORS disjoint groups (node label group=g0..g<M-1>),
# one BioMonitor per group (nodeSelector group=gN), all created at once. The
# operator (release build) runs on this machine as the chart's ServiceAccount
# against a tests/cluster cluster. Measured:
#   * operator share: from the create of the BioMonitors until every child
#     (DaemonSet, Service, ServiceMonitor) exists and every BioMonitor has a
#     first status, from timestamped watches;
#   * time until every BioMonitor is Ready (every agent pod scheduled and
#     Running on its kwok node: mostly scheduler, DaemonSet controller, kwok);
#   * operator RSS (VmRSS/VmHWM from /proc);
#   * API requests: the operator's own, through a FlowSchema that matches only
#     its ServiceAccount (apiserver_flowcontrol_dispatched_requests_total),
#     and per verb/resource from apiserver_request_total deltas; reconciles
#     from the operator's /metrics.
#
# Usage: operator/tests/bench-scale.sh [workdir]
#   Without a workdir it starts a cluster in a temp dir and stops it after.
# Env: NODES (5000), MONITORS (50), BIO_OPERATOR_BIN (default: cargo build
#      --release), NODE_READY_WAIT seconds to wait for every node to be Ready
#      before starting (600; then it goes on and reports how many were),
#      READY_TIMEOUT seconds to wait for every BioMonitor to be Ready (900;
#      then it reports how many were), SETTLE seconds of quiet after that
#      before the request counters are read (15).
#      NODE_KIND=kwok (default) or static: static nodes are not managed by
#      kwok (no heartbeats, never Ready, agents never run), to measure the
#      operator's share at node counts kwok cannot keep alive; Ready is then
#      not waited for.
# On 2 cores kwok cannot heartbeat thousands of nodes in time: they flap
# NotReady and the API server saturates (5000 nodes did not work here).
# Results: printed, and kept in <workdir>/bio-bench/results.txt.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CLUSTER="$ROOT/tests/cluster"
NODES="${NODES:-5000}"
MONITORS="${MONITORS:-50}"
NODE_KIND="${NODE_KIND:-kwok}"
case "$NODE_KIND" in
  kwok) READY_TIMEOUT="${READY_TIMEOUT:-900}" NODE_READY_WAIT="${NODE_READY_WAIT:-600}" NODE_ANNOTATION="kwok.x-k8s.io/node: fake, " ;;
  static) READY_TIMEOUT=0 NODE_READY_WAIT=0 NODE_ANNOTATION="" ;;
  *) echo "NODE_KIND must be kwok or static" >&2; exit 2 ;;
esac
export NODE_KIND
SETTLE="${SETTLE:-15}"
PER=$((NODES / MONITORS))
((PER * MONITORS == NODES)) || { echo "NODES must be a multiple of MONITORS" >&2; exit 2; }
((NODES <= 8192)) || { echo "at most 8192 nodes (one /29 pod CIDR each in 10.244.0.0/16)" >&2; exit 2; }
SYS_NS=bench-system
AGENT_NS=bench-agents
RELEASE=bench
FULL="$RELEASE-bio-exporter"
SA_USER="system:serviceaccount:$SYS_NS:$FULL"
PIDS=()
T_START=$SECONDS

log() { echo "bench [$((SECONDS - T_START))s]: $*" >&2; }
die() { log "error: $*"; exit 1; }

OWN_CLUSTER=0
if [[ -n "${1:-}" ]]; then
  W="$1"
else
  W="$(mktemp -d /tmp/bio-bench.XXXXXX)"
  OWN_CLUSTER=1
fi
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  PIDS=()
  if ((OWN_CLUSTER)); then "$CLUSTER/down.sh" "$W" >&2 || true; fi
}
trap cleanup EXIT

if ((OWN_CLUSTER)); then "$CLUSTER/up.sh" "$W" >&2; fi
# shellcheck disable=SC1091
source "$W/env"
OUT="$W/bio-bench"
mkdir -p "$OUT"
k() { kubectl --request-timeout=60s "$@"; }
now() { echo "$EPOCHREALTIME"; }

if [[ -z "${BIO_OPERATOR_BIN:-}" ]]; then
  log "cargo build --release -p bio-operator"
  (cd "$ROOT" && cargo build -q --release -p bio-operator --bin bio-operator)
  BIO_OPERATOR_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/bio-operator"
fi

# ------------------------------------------------------------ the chart ----
log "helm install (operator replicas 0: the operator runs here)"
helm upgrade --install "$RELEASE" "$ROOT/charts/bio-exporter" -n "$SYS_NS" --create-namespace \
  --set agentNamespace.create=true --set agentNamespace.name="$AGENT_NS" \
  --set operator.replicaCount=0 >"$OUT/helm.log"
# ServiceMonitor CRD: a minimal stand-in is enough here (the e2e test uses the
# real one); the operator's requests are the same.
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
# Count the operator's requests on their own: a FlowSchema that matches only
# its ServiceAccount (API Priority and Fairness metrics are per flow schema).
k apply -f - >/dev/null <<EOF
apiVersion: flowcontrol.apiserver.k8s.io/v1
kind: FlowSchema
metadata: {name: bio-operator-bench}
spec:
  matchingPrecedence: 100
  priorityLevelConfiguration: {name: workload-high}
  distinguisherMethod: {type: ByUser}
  rules:
  - subjects:
    - kind: ServiceAccount
      serviceAccount: {name: $FULL, namespace: $SYS_NS}
    resourceRules:
    - {verbs: ["*"], apiGroups: ["*"], resources: ["*"], namespaces: ["*"], clusterScope: true}
    nonResourceRules:
    - {verbs: ["*"], nonResourceURLs: ["*"]}
EOF
"$CLUSTER/sa-kubeconfig.sh" "$W" "$SYS_NS" "$FULL" "$OUT/operator.kubeconfig" >/dev/null

# ---------------------------------------------------------------- nodes ----
# Created here rather than with add-nodes.sh (which checks nodes one by one).
# Same shape as add-nodes.sh, plus group=gN and a preset /29 pod CIDR inside
# the cluster CIDR: node-ipam hands out only 256 /24s, and kwok gives pods
# IPs from the node's pod CIDR.
log "creating $NODES $NODE_KIND nodes in $MONITORS groups of $PER"
gen_nodes() { # FROM TO
  local i name
  for ((i = $1; i < $2; i++)); do
    name="bench-$i"
    cat <<YAML
---
apiVersion: v1
kind: Node
metadata:
  name: $name
  annotations: {${NODE_ANNOTATION}node.alpha.kubernetes.io/ttl: "0"}
  labels: {type: kwok, group: g$((i / PER)), kubernetes.io/hostname: $name, kubernetes.io/os: linux, kubernetes.io/arch: amd64, node-role.kubernetes.io/worker: ""}
spec: {podCIDR: 10.244.$((i / 32)).$((i % 32 * 8))/29, podCIDRs: [10.244.$((i / 32)).$((i % 32 * 8))/29]}
status:
  allocatable: {cpu: "32", memory: 256Gi, pods: "110"}
  capacity: {cpu: "32", memory: 256Gi, pods: "110"}
  nodeInfo: {architecture: amd64, operatingSystem: linux, kernelVersion: 6.1.0-kwok, kubeletVersion: v1.37.2, containerRuntimeVersion: kwok}
YAML
  done
}
T_NODES=$SECONDS
CHUNK=500
for ((from = 0; from < NODES; from += CHUNK)); do
  to=$((from + CHUNK < NODES ? from + CHUNK : NODES))
  if ! gen_nodes "$from" "$to" | k create -f - >/dev/null 2>"$OUT/nodes.err"; then
    # Re-running on a reused cluster: existing nodes are fine.
    if grep -v AlreadyExists "$OUT/nodes.err" | grep -q .; then
      cat "$OUT/nodes.err" >&2
      die "creating nodes failed"
    fi
  fi
done
ready_nodes() { k get nodes -l group -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -c True || true; }
deadline=$((SECONDS + NODE_READY_WAIT))
while (( (n = $(ready_nodes)) < NODES)); do
  if ((SECONDS >= deadline)); then
    ((NODE_READY_WAIT == 0)) || log "only $n of $NODES nodes Ready after ${NODE_READY_WAIT}s (kwok heartbeats lag); going on"
    break
  fi
  sleep 5
done
NODES_READY_AT_START="$(ready_nodes)"
log "$NODES_READY_AT_START of $NODES nodes Ready, $((SECONDS - T_NODES))s after the first create"

# ------------------------------------------------------------- operator ----
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
# The chart's Role covers the agent namespace only (operator.watchNamespaces).
KUBECONFIG="$OUT/operator.kubeconfig" BIO_OPERATOR_WATCH_NAMESPACES="$AGENT_NS" "$BIO_OPERATOR_BIN" \
  --lease-namespace "$SYS_NS" --lease-name "$FULL-leader" --leader-identity bench \
  --agent-cluster-role "$FULL-agent" --agent-image example.invalid/node-agent:bench \
  --metrics-addr "127.0.0.1:$PORT" --log-format json >"$OUT/operator.log" 2>&1 &
OP_PID=$!
PIDS+=("$OP_PID")
op_metrics() { curl -fsS --noproxy '*' --max-time 5 "http://127.0.0.1:$PORT/metrics"; }
deadline=$((SECONDS + 120))
until op_metrics 2>/dev/null | grep -q '^bio_operator_leader 1' && grep -q 'starting BioMonitor controller' "$OUT/operator.log"; do
  ((SECONDS < deadline)) || die "operator did not start (see $OUT/operator.log)"
  kill -0 "$OP_PID" 2>/dev/null || die "operator exited (see $OUT/operator.log)"
  sleep 0.5
done
sleep 2
rss() { awk '/^(VmRSS|VmHWM)/ {printf "%s %d MiB  ", $1, $2 / 1024}' "/proc/$OP_PID/status"; }
RSS_IDLE="$(rss)"
log "operator leads, node cache filled: $RSS_IDLE"

apiserver_metrics() { k get --raw /metrics; }
apiserver_metrics >"$OUT/apiserver-before.prom"
op_metrics >"$OUT/operator-before.prom"

# ------------------------------------------------------------- watchers ----
# One line per event, stamped on arrival ($EPOCHREALTIME: no fork per line).
stamp() { local l; while IFS= read -r l; do echo "$EPOCHREALTIME $l"; done; }
watch_kind() { # KIND FILE
  k get "$1" -n "$AGENT_NS" --watch -o name --request-timeout=0 2>/dev/null > >(stamp >"$2") &
  PIDS+=("$!")
}
watch_kind daemonsets "$OUT/w-ds.txt"
watch_kind services "$OUT/w-svc.txt"
watch_kind servicemonitors.monitoring.coreos.com "$OUT/w-sm.txt"
k get biomonitors -n "$AGENT_NS" --watch --request-timeout=0 \
  -o jsonpath='{.metadata.name} {.status.observedGeneration} {.status.conditions[?(@.type=="Ready")].status}{"\n"}' 2>/dev/null \
  > >(stamp >"$OUT/w-bm.txt") &
PIDS+=("$!")
sleep 2

# ---------------------------------------------------------------- go! ------
gen_monitors() {
  local g
  for ((g = 0; g < MONITORS; g++)); do
    printf -- '---\napiVersion: bioexporter.io/v1alpha1\nkind: BioMonitor\nmetadata: {name: g%d, namespace: %s}\nspec: {nodeSelector: {group: g%d}}\n' "$g" "$AGENT_NS" "$g"
  done
}
gen_monitors >"$OUT/monitors.yaml"
log "creating $MONITORS BioMonitors"
T0="$(now)"
k create -f "$OUT/monitors.yaml" >/dev/null
T0_DONE="$(now)"

count_first() { awk '{print $2}' "$1" | sort -u | grep -c . || true; }
deadline=$((SECONDS + 300))
until (($(count_first "$OUT/w-ds.txt") >= MONITORS && $(count_first "$OUT/w-svc.txt") >= MONITORS + 0 &&
  $(count_first "$OUT/w-sm.txt") >= MONITORS)) &&
  (($(awk '$3 != "" {print $2}' "$OUT/w-bm.txt" | sort -u | grep -c . || true) >= MONITORS)); do
  ((SECONDS < deadline)) || die "children or first status missing after 300s"
  sleep 0.5
done
RSS_CHILDREN="$(rss)"
log "every child written, every BioMonitor has a status"
deadline=$((SECONDS + READY_TIMEOUT))
until (( (n = $(awk '$4 == "True" {print $2}' "$OUT/w-bm.txt" | sort -u | grep -c . || true)) >= MONITORS)); do
  if ((SECONDS >= deadline)); then
    ((READY_TIMEOUT == 0)) || log "only $n of $MONITORS BioMonitors Ready after ${READY_TIMEOUT}s; reporting what there is"
    break
  fi
  kill -0 "$OP_PID" 2>/dev/null || die "operator exited"
  sleep 2
done
log "$n of $MONITORS BioMonitors Ready; settling ${SETTLE}s"
sleep "$SETTLE"
RSS_END="$(rss)"
apiserver_metrics >"$OUT/apiserver-after.prom"
op_metrics >"$OUT/operator-after.prom"
CPU_TICKS="$(awk '{print $14 + $15}' "/proc/$OP_PID/stat")"
CLK_TCK="$(getconf CLK_TCK)"

# ---------------------------------------------------------------- report ---
NODES_READY_AT_END="$(ready_nodes)"
python3 - "$OUT" "$T0" "$T0_DONE" "$MONITORS" "$NODES" "$CPU_TICKS" "$CLK_TCK" "$SA_USER" "$NODES_READY_AT_START" "$NODES_READY_AT_END" <<'PY' | tee "$OUT/results.txt"
import collections, os, re, sys
out, t0, t0_done, monitors, nodes, ticks, clk, sa, ready_start, ready_end = sys.argv[1:11]
t0, t0_done, monitors, nodes = float(t0), float(t0_done), int(monitors), int(nodes)

def first_seen(path, pred=lambda f: True):
    seen = {}
    for line in open(os.path.join(out, path)):
        f = line.split()
        if len(f) >= 2 and pred(f) and f[1] not in seen:
            seen[f[1]] = float(f[0])
    return seen

ds, svc, sm = (first_seen(p) for p in ("w-ds.txt", "w-svc.txt", "w-sm.txt"))
status = first_seen("w-bm.txt", lambda f: len(f) >= 3)
ready = first_seen("w-bm.txt", lambda f: len(f) >= 4 and f[3] == "True")
children_done = max(max(d.values()) for d in (ds, svc, sm))
status_done = max(status.values())

def prom(path):
    vals = collections.defaultdict(float)
    for line in open(os.path.join(out, path)):
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        try:
            vals[name] += float(value)
        except ValueError:
            pass
    return vals

a0, a1 = prom("apiserver-before.prom"), prom("apiserver-after.prom")
o0, o1 = prom("operator-before.prom"), prom("operator-after.prom")
def delta(d0, d1, pattern):
    rx = re.compile(pattern)
    return sum(v - d0.get(k, 0.0) for k, v in d1.items() if rx.search(k))

apf = delta(a0, a1, r'^apiserver_flowcontrol_dispatched_requests_total\{.*flow_schema="bio-operator-bench"')
reconciles = delta(o0, o1, r"^bio_operator_reconciliations_total")
busy = delta(o0, o1, r"^bio_operator_reconcile_duration_seconds_sum")
errors = delta(o0, o1, r"^bio_operator_reconcile_errors_total")

# Requests per verb and resource on what only the operator writes here.
by = collections.Counter()
rx = re.compile(r'^apiserver_request_total\{(.*)\}$')
for k, v in a1.items():
    m = rx.match(k)
    if not m:
        continue
    labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
    if labels.get("verb") not in ("APPLY", "PATCH", "POST", "PUT", "DELETE"):
        continue
    res = labels.get("resource", "") + ("/" + labels["subresource"] if labels.get("subresource") else "")
    by[(labels["verb"], res)] += v - a0.get(k, 0.0)

print(f"{os.environ.get('NODE_KIND', 'kwok')} nodes {nodes}, BioMonitors {monitors} (disjoint groups of {nodes // monitors});"
      f" nodes Ready when the BioMonitors were created: {ready_start}, at the end: {ready_end}")
print(f"create of the {monitors} BioMonitors took {t0_done - t0:.2f}s (kubectl, sequential POSTs)")
print(f"operator share: every DaemonSet/Service/ServiceMonitor written {children_done - t0:.2f}s after the first create"
      f" (DaemonSets {max(ds.values()) - t0:.2f}s, Services {max(svc.values()) - t0:.2f}s, ServiceMonitors {max(sm.values()) - t0:.2f}s)")
print(f"operator share: every BioMonitor has a status {status_done - t0:.2f}s after the first create")
# Per BioMonitor: from the watch event announcing it to its last child.
added = first_seen("w-bm.txt")
def child(d, m):
    return next((t for n, t in d.items() if n.split("/")[-1] == m + "-agent"), None)
lat = sorted(max(child(d, m) for d in (ds, svc, sm)) - t for m, t in added.items())
print(f"operator share per BioMonitor (its create seen -> its last child seen): median {lat[len(lat) // 2]:.2f}s, max {lat[-1]:.2f}s;"
      f" last child {children_done - max(added.values()):.2f}s after the last BioMonitor was created")
if len(ready) == monitors:
    print(f"every BioMonitor Ready {max(ready.values()) - t0:.2f}s after the first create"
          f" (first {min(ready.values()) - t0:.2f}s, median {sorted(ready.values())[len(ready) // 2] - t0:.2f}s)")
elif ready:
    print(f"only {len(ready)} of {monitors} BioMonitors Ready within the timeout"
          f" (first {min(ready.values()) - t0:.2f}s, last {max(ready.values()) - t0:.2f}s after the first create)")
else:
    print(f"no BioMonitor Ready within the timeout")
print(f"operator reconciles {reconciles:.0f} ({reconciles / monitors:.1f} per BioMonitor), errors {errors:.0f},"
      f" sum of reconcile durations {busy:.2f}s (wall clock, mostly API round trips, overlapping),"
      f" operator CPU time since its start {int(ticks) / int(clk):.2f}s")
print(f"operator API requests (FlowSchema on {sa}): {apf:.0f} = {apf / max(reconciles, 1):.1f} per reconcile,"
      f" {apf / monitors:.1f} per BioMonitor")
print("writes seen by the API server in the window, by verb and resource (all clients):")
for (verb, res), n in sorted(by.items(), key=lambda x: -x[1]):
    if n >= 1:
        print(f"  {verb:6} {res:40} {n:.0f}")
PY
{
  echo "operator RSS idle (node cache full): $RSS_IDLE"
  echo "operator RSS when every child was written: $RSS_CHILDREN"
  echo "operator RSS at the end: $RSS_END"
} | tee -a "$OUT/results.txt"
log "done; results in $OUT/results.txt"
