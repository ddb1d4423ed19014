#!/usr/bin/env bash
# Smoke test of the local test cluster: build (cached), bring a cluster up in a
# temp dir, check version, kwok nodes, workloads, RBAC, Helm v4 and v3, loopback
# only, then tear down. Exits non-zero if any check fails; the last line is
# "N passed, N failed".
# Env: KEEP=1 keep the temp workdir (logs) even on success.
# The bash -c '...' snippets expand their own $1, $2 on purpose.
# shellcheck disable=SC2016
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PASS=0 FAIL=0
T0=$SECONDS

ok() { PASS=$((PASS + 1)); echo "ok   - $1"; }
not_ok() { FAIL=$((FAIL + 1)); echo "FAIL - $1"; [[ -z "${2:-}" ]] || sed 's/^/       | /' <<<"$2" | tail -n 30; }
# check DESCRIPTION CMD...: run CMD, pass if it exits 0 (output shown on failure).
check() {
  local desc="$1" out; shift
  if out="$("$@" 2>&1)"; then ok "$desc"; else not_ok "$desc" "$out"; fi
}
summary() { echo "smoke: $((SECONDS - T0))s total"; echo "$PASS passed, $FAIL failed"; }

W="$(mktemp -d "${TMPDIR:-/tmp}/bio-cluster-smoke.XXXXXX")"
cleanup() {
  "$HERE/down.sh" "$W" >/dev/null 2>&1 || true
  if [[ "${KEEP:-}" == 1 || $FAIL -gt 0 ]]; then
    echo "smoke: workdir kept: $W (logs in $W/logs)"
  else
    rm -rf "$W"
  fi
}
trap cleanup EXIT

# ------------------------------------------------------------------ build --
t=$SECONDS
if BIN="$("$HERE/build.sh" | tail -n1)" && [[ -x "$BIN/kubectl" ]]; then
  ok "build.sh: tools in $BIN ($((SECONDS - t))s)"
else
  not_ok "build.sh"; summary; exit 1
fi

# --------------------------------------------------------------------- up --
t=$SECONDS
if out="$("$HERE/up.sh" "$W" 2>&1)"; then
  ok "up.sh: cluster started ($((SECONDS - t))s)"
else
  not_ok "up.sh" "$out"; summary; exit 1
fi
# shellcheck disable=SC1091
source "$W/env"

# ---------------------------------------------------------------- version --
ver="$(kubectl version 2>&1)"
if grep -q '^Server Version: v1\.37\.' <<<"$ver" && grep -q '^Client Version: v1\.37\.' <<<"$ver"; then
  ok "kubectl version: $(tr '\n' ' ' <<<"$ver")"
else
  not_ok "kubectl version shows v1.37.x client and server" "$ver"
fi
check "/readyz?verbose all ok" bash -c 'kubectl get --raw "/readyz?verbose" | tail -n1 | grep -qx "readyz check passed"'
check "etcd reports healthy" bash -c "curl -fsS --noproxy '*' $ETCD_ENDPOINT/health | grep -q '\"health\":\"true\"'"

# ------------------------------------------------------------------ nodes --
check "add-nodes.sh creates 3 Ready kwok nodes" "$HERE/add-nodes.sh" "$W" 3
check "3 nodes listed Ready" bash -c \
  '[[ $(kubectl get nodes -l type=kwok -o jsonpath="{range .items[*]}{.status.conditions[?(@.type==\"Ready\")].status}{\"\n\"}{end}" | grep -c True) == 3 ]]'
check "nodes got podCIDRs from 10.244.0.0/16 and only a 127.0.0.1 InternalIP" bash -c '
  cidrs=$(kubectl get nodes -o jsonpath="{range .items[*]}{.spec.podCIDR}{\"\n\"}{end}")
  ips=$(kubectl get nodes -o jsonpath="{range .items[*]}{range .status.addresses[?(@.type==\"InternalIP\")]}{.address}{\"\n\"}{end}{end}")
  [[ $(grep -c "^10\.244\." <<<"$cidrs") == 3 ]] && [[ -n "$ips" ]] && ! grep -qv "^127\.0\.0\.1$" <<<"$ips"'

# -------------------------------------------------------------- workloads --
kubectl create namespace smoke >/dev/null
cat > "$W/workloads.yaml" <<'EOF'
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: smoke-ds, namespace: smoke}
spec:
  selector: {matchLabels: {app: smoke-ds}}
  template:
    metadata: {labels: {app: smoke-ds}}
    spec:
      containers:
      - {name: pause, image: registry.k8s.io/pause:3.10}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: smoke-deploy, namespace: smoke}
spec:
  replicas: 4
  selector: {matchLabels: {app: smoke-deploy}}
  template:
    metadata: {labels: {app: smoke-deploy}}
    spec:
      containers:
      - name: pause
        image: registry.k8s.io/pause:3.10
        resources: {requests: {cpu: 100m, memory: 64Mi}}
EOF
check "apply DaemonSet + Deployment" kubectl apply -f "$W/workloads.yaml"
check "DaemonSet rolled out" kubectl rollout status -n smoke daemonset/smoke-ds --timeout=120s
check "Deployment rolled out" kubectl rollout status -n smoke deployment/smoke-deploy --timeout=120s
check "DaemonSet: 3 pods Running+Ready, one per kwok node, pod IPs in 10.244/16" bash -c '
  rows=$(kubectl get pods -n smoke -l app=smoke-ds -o jsonpath="{range .items[*]}{.spec.nodeName} {.status.phase} {.status.conditions[?(@.type==\"Ready\")].status} {.status.podIP}{\"\n\"}{end}")
  echo "$rows"
  [[ $(grep -cE "^kwok-node-[0-9]+ Running True 10\.244\." <<<"$rows") == 3 ]] &&
  [[ $(awk "{print \$1}" <<<"$rows" | sort -u | wc -l) == 3 ]]'
check "Deployment: 4 pods Running on kwok nodes" bash -c '
  [[ $(kubectl get pods -n smoke -l app=smoke-deploy --field-selector=status.phase=Running -o jsonpath="{range .items[*]}{.spec.nodeName}{\"\n\"}{end}" | grep -c "^kwok-node-") == 4 ]]'

# ------------------------------------------------------------------- RBAC --
kubectl create serviceaccount -n smoke nobody >/dev/null
check "sa-kubeconfig.sh writes a token kubeconfig" "$HERE/sa-kubeconfig.sh" "$W" smoke nobody "$W/nobody.kubeconfig"
check "SA kubeconfig authenticates as the ServiceAccount" bash -c \
  'kubectl --kubeconfig "$1" auth whoami -o jsonpath="{.status.userInfo.username}" | grep -qx system:serviceaccount:smoke:nobody' _ "$W/nobody.kubeconfig"
out="$(kubectl --kubeconfig "$W/nobody.kubeconfig" get pods -n smoke 2>&1)"
if [[ $? -ne 0 ]] && grep -q 'forbidden' <<<"$out"; then
  ok "negative control: SA without rights is Forbidden to list pods"
else
  not_ok "negative control: SA without rights is Forbidden to list pods" "$out"
fi
TOKEN="$(kubectl create token -n smoke nobody)"
code="$(curl -sS --noproxy '*' -o /dev/null -w '%{http_code}' --cacert "$CLUSTER_CA_CERT" \
  -H "Authorization: Bearer $TOKEN" "$APISERVER/api/v1/namespaces/smoke/pods")"
if [[ "$code" == 403 ]]; then ok "negative control: raw API call returns HTTP 403"; else not_ok "negative control: raw API call returns HTTP 403 (got $code)"; fi
code="$(curl -sS --noproxy '*' -o /dev/null -w '%{http_code}' --cacert "$CLUSTER_CA_CERT" "$APISERVER/api/v1/namespaces/smoke/pods")"
if [[ "$code" == 403 || "$code" == 401 ]]; then ok "anonymous request rejected ($code)"; else not_ok "anonymous request rejected (got $code)"; fi
ans="$(kubectl auth can-i list pods -n smoke --as=system:serviceaccount:smoke:nobody 2>&1)"
if [[ "$ans" == no ]]; then ok "auth can-i (SA, before binding): no"; else not_ok "auth can-i (SA, before binding): no" "$ans"; fi
kubectl create role -n smoke pod-reader --verb=get,list,watch --resource=pods >/dev/null
kubectl create rolebinding -n smoke nobody-reads-pods --role=pod-reader --serviceaccount=smoke:nobody >/dev/null
check "positive control: after a RoleBinding the SA can list pods" bash -c '
  for i in $(seq 1 20); do kubectl --kubeconfig "$1" get pods -n smoke >/dev/null 2>&1 && exit 0; sleep 0.5; done; exit 1' _ "$W/nobody.kubeconfig"
check "RBAC stays scoped: the SA still cannot list pods in kube-system" bash -c \
  '! kubectl --kubeconfig "$1" get pods -n kube-system 2>/dev/null' _ "$W/nobody.kubeconfig"

# ------------------------------------------------------------------- helm --
hv4="$(helm version --short 2>&1)"; hv3="$(helm3 version --short 2>&1)"
if [[ "$hv4" == v4.* ]]; then ok "helm version: $hv4"; else not_ok "helm (v4) version" "$hv4"; fi
if [[ "$hv3" == v3.* ]]; then ok "helm3 version: $hv3"; else not_ok "helm3 version" "$hv3"; fi
mkdir -p "$W/chart/templates"
cat > "$W/chart/Chart.yaml" <<'EOF'
apiVersion: v2
name: smoke
version: 0.1.0
kubeVersion: ">=1.37.0-0"
EOF
cat > "$W/chart/templates/deploy.yaml" <<'EOF'
apiVersion: apps/v1
kind: Deployment
metadata: {name: {{ .Release.Name }}}
spec:
  replicas: 2
  selector: {matchLabels: {app: {{ .Release.Name }}}}
  template:
    metadata: {labels: {app: {{ .Release.Name }}}}
    spec:
      containers:
      - {name: pause, image: registry.k8s.io/pause:3.10}
EOF
check "helm (v4) install --wait (kubeVersion >=1.37 against the server)" \
  helm install smoke4 "$W/chart" -n helm4 --create-namespace --wait --timeout 120s
check "helm3 install --wait (kubeVersion >=1.37 against the server)" \
  helm3 install smoke3 "$W/chart" -n helm3 --create-namespace --wait --timeout 120s
check "helm3 list shows smoke3 deployed" bash -c 'helm3 list -n helm3 | grep -E "^smoke3\s.*deployed"'

# -------------------------------------------------------------- loopback --
check "every component listens on 127.0.0.1 only and talks to 127.0.0.1 only" bash -c '
  bad=0
  while read -r name pid exe; do
    addrs=$(ss -Htlnp | grep "pid=$pid," | awk "{print \$4}")
    [[ -n "$addrs" ]] || { echo "$name: no listening socket"; bad=1; }
    while read -r a; do [[ -z "$a" || "$a" == 127.0.0.1:* ]] || { echo "$name listens on $a"; bad=1; }; done <<<"$addrs"
    peers=$(ss -Htnp | grep "pid=$pid," | awk "{print \$4, \$5}")
    while read -r l r; do [[ -z "$l" || ( "$l" == 127.0.0.1:* && "$r" == 127.0.0.1:* ) ]] || { echo "$name has a connection $l -> $r"; bad=1; }; done <<<"$peers"
  done < "$1/pids"
  exit $bad' _ "$W"
check "kubernetes Service has no Endpoints pointing anywhere" bash -c '
  ! kubectl get endpointslices -n default -l kubernetes.io/service-name=kubernetes -o jsonpath="{.items[*].endpoints[*].addresses[*]}" | grep -q .'

# ------------------------------------------------------------------- down --
cp "$W/pids" "$W/pids.before-down"
check "down.sh stops every component" bash -c '
  source "$1/lib.sh"; "$1/down.sh" "$2" || exit 1
  while read -r name pid exe; do ! pid_alive "$pid" "$exe" || { echo "$name ($pid) still alive"; exit 1; }; done < "$2/pids.before-down"' _ "$HERE" "$W"

summary
((FAIL == 0))
