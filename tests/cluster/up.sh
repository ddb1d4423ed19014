#!/usr/bin/env bash
# Start a local Kubernetes cluster (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kwok) whose whole state lives in <workdir>. Everything listens
# on 127.0.0.1 only, on free ports picked at start.
#
# Usage: up.sh <workdir> [--real-nodes 0|1]
#   Afterwards: source <workdir>/env   (KUBECONFIG, PATH, APISERVER, ...)
#               tests/cluster/add-nodes.sh <workdir> 3
#               tests/cluster/down.sh <workdir>
# --real-nodes 1 adds a real node (kubelet + containerd + runc, node name real-node-0) that runs
# real pods. The whole cluster then lives in a private network + mount namespace (netns.sh):
# run clients through tests/cluster/enter.sh <workdir> CMD..., load images with
# tests/cluster/load-images.sh. Needs root and Debian's containerd, runc,
# containernetworking-plugins, iptables.
# Env: CLUSTER_TIMEOUT  seconds to wait for each component (default 180)
#      CLUSTER_V        klog verbosity of the k8s components (default 1)
#      KEEP_ON_FAILURE=1 leave the processes running if up.sh fails
# On failure up.sh stops whatever it started (unless KEEP_ON_FAILURE=1),
# prints the tail of the failing component's log and exits non-zero; logs stay
# in <workdir>/logs/.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

source "$CLUSTER_DIR/netns.sh"

W="$(abs_workdir "${1:-}")"
shift || true
REAL_NODES=0
while (($#)); do
  case "$1" in
    --real-nodes) REAL_NODES="${2:-}"; shift 2 || die "--real-nodes needs a number" ;;
    --real-nodes=*) REAL_NODES="${1#*=}"; shift ;;
    *) die "unknown argument: $1 (usage: up.sh <workdir> [--real-nodes 0|1])" ;;
  esac
done
[[ "$REAL_NODES" =~ ^[01]$ ]] ||
  die "--real-nodes must be 0 or 1: two kubelets on one host would share /var/lib/kubelet and the kernel's BPF hooks"
TIMEOUT="${CLUSTER_TIMEOUT:-180}"
V="${CLUSTER_V:-1}"
T0=$SECONDS

if [[ -s "$W/pids" ]]; then
  while read -r _ pid exe; do
    pid_alive "$pid" "$exe" && die "a cluster is already running in $W (run down.sh $W first)"
  done < "$W/pids"
fi

# Real nodes: build first (on the host, with its network), then make the namespaces and run the
# rest of this script inside them. On failure the host side undoes everything.
if ((REAL_NODES > 0)) && [[ -z "${BIO_CLUSTER_INSIDE_NS:-}" ]]; then
  "$CLUSTER_DIR/build.sh" >/dev/null
  REAL_NODE_IMAGE_ARCHIVES="$("$CLUSTER_DIR/images/build.sh")" || die "building the test images failed"
  export REAL_NODE_IMAGE_ARCHIVES
  ns_create "$W"
  rc=0
  BIO_CLUSTER_INSIDE_NS=1 ns_exec "$W" "$CLUSTER_DIR/up.sh" "$W" --real-nodes "$REAL_NODES" || rc=$?
  if ((rc != 0)); then
    if [[ "${KEEP_ON_FAILURE:-}" == 1 ]]; then
      log "KEEP_ON_FAILURE=1: leaving the cluster and its namespaces; remove them with down.sh $W"
    else
      "$CLUSTER_DIR/down.sh" "$W" >&2 || true
    fi
  fi
  exit "$rc"
fi

BIN="$("$CLUSTER_DIR/build.sh" | tail -n1)"
[[ -x "$BIN/kube-apiserver" ]] || die "build.sh did not produce $BIN/kube-apiserver"
STAGES="$(dirname "$BIN")/kwok-stages.yaml"

REAL_NODE_NAMES=()
if ((REAL_NODES > 0)); then
  REAL_NODE_NAMES=(real-node-0)
  REAL_POD_CIDR=10.88.0.0/16
  mapfile -t REAL_NODE_IMAGES <<<"${REAL_NODE_IMAGE_ARCHIVES:-}"
  # The sandbox image's name as images/build.sh defines it (its PAUSE_* assignments).
  PAUSE_IMAGE="$(source <(grep -E '^PAUSE_(TAG|IMAGE)=' "$CLUSTER_DIR/images/build.sh"); echo "${PAUSE_IMAGE:-}")"
  [[ -n "$PAUSE_IMAGE" ]] || die "images/build.sh names no PAUSE_IMAGE"
  # shellcheck source=real-node.sh
  source "$CLUSTER_DIR/real-node.sh"
  ns_setup "$W" "${REAL_NODE_NAMES[0]}"
fi

# Never let a proxy setting divert loopback traffic.
export NO_PROXY="127.0.0.1,localhost${NO_PROXY:+,$NO_PROXY}" no_proxy="127.0.0.1,localhost${no_proxy:+,$no_proxy}"

PKI="$W/pki" LOGS="$W/logs"
rm -rf "$PKI" "$W/etcd" "$W/kubeconfig" "$W/config" "$W/cache" "$W/env" "$W/pids"
mkdir -p "$PKI" "$LOGS" "$W/kubeconfig" "$W/config" "$W/etcd"
chmod 700 "$PKI" "$W/etcd"
: > "$W/pids"

# ---------------------------------------------------------------- ports ----
declare -A USED=()
pick_port() { # VAR: a random free 127.0.0.1 TCP port, unique within this run
  local p i
  for ((i = 0; i < 200; i++)); do
    p=$((20000 + RANDOM % 12000)) # below the ephemeral range (32768+)
    [[ -z "${USED[$p]:-}" ]] || continue
    # In use if any TCP socket (any state, v4 or v6) has it as local port.
    ! grep -qi ":$(printf '%04X' "$p") " /proc/net/tcp /proc/net/tcp6 2>/dev/null || continue
    USED[$p]=1
    printf -v "$1" '%s' "$p"
    return 0
  done
  die "no free port found"
}
for v in ETCD_PORT ETCD_PEER_PORT API_PORT KCM_PORT SCHED_PORT KWOK_PORT; do pick_port "$v"; done
APISERVER="https://127.0.0.1:$API_PORT"

# ---------------------------------------------------------------- certs ----
SA_ISSUER="https://kubernetes.default.svc.cluster.local"
ossl() { openssl "$@" 2>>"$LOGS/openssl.log" >/dev/null || die "openssl $1 failed (see $LOGS/openssl.log)"; }
new_ca() { # name CN
  ossl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
    -keyout "$PKI/$1.key" -out "$PKI/$1.crt" -days 3650 -subj "/CN=$2" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature"
}
new_cert() { # name ca subject serverAuth|clientAuth [subjectAltName]
  local name="$1" ca="$2" subj="$3" eku="$4" san="${5:-}"
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$eku"
    [[ -z "$san" ]] || echo "subjectAltName=$san"
  } > "$PKI/$name.ext"
  ossl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
    -keyout "$PKI/$name.key" -out "$PKI/$name.csr" -subj "$subj"
  ossl x509 -req -in "$PKI/$name.csr" -CA "$PKI/$ca.crt" -CAkey "$PKI/$ca.key" -set_serial "0x$(openssl rand -hex 16)" \
    -days 365 -sha256 -extfile "$PKI/$name.ext" -out "$PKI/$name.crt"
  rm -f "$PKI/$name.csr" "$PKI/$name.ext"
}
LOCAL_SAN="IP:127.0.0.1,DNS:localhost"
new_ca ca "bio-exporter test cluster CA"         # serves: apiserver, kwok
new_ca client-ca "bio-exporter test client CA"   # signs client certs
new_cert apiserver ca "/CN=kube-apiserver" serverAuth \
  "$LOCAL_SAN,IP:10.96.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
new_cert kwok-serving ca "/CN=kwok" serverAuth "$LOCAL_SAN"
new_cert admin client-ca "/O=system:masters/CN=kubernetes-admin" clientAuth
new_cert controller-manager client-ca "/CN=system:kube-controller-manager" clientAuth
new_cert scheduler client-ca "/CN=system:kube-scheduler" clientAuth
new_cert kwok client-ca "/O=system:masters/CN=kwok-controller" clientAuth
# The API server's identity towards kubelets (logs, exec, port-forward on real nodes).
new_cert apiserver-kubelet-client client-ca "/O=system:masters/CN=kube-apiserver-kubelet-client" clientAuth
ossl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$PKI/sa.key"
ossl pkey -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub"
chmod 600 "$PKI"/*.key

b64() { base64 -w0 < "$1"; }
kubeconfig() { # name user -> $W/kubeconfig/<name>.kubeconfig
  cat > "$W/kubeconfig/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: bio-test
  cluster:
    server: $APISERVER
    certificate-authority-data: $(b64 "$PKI/ca.crt")
users:
- name: $2
  user:
    client-certificate-data: $(b64 "$PKI/$1.crt")
    client-key-data: $(b64 "$PKI/$1.key")
contexts:
- name: bio-test
  context:
    cluster: bio-test
    user: $2
current-context: bio-test
EOF
  chmod 600 "$W/kubeconfig/$1.kubeconfig"
}
kubeconfig admin kubernetes-admin
kubeconfig controller-manager system:kube-controller-manager
kubeconfig scheduler system:kube-scheduler
kubeconfig kwok kwok-controller
KUBECONFIG_ADMIN="$W/kubeconfig/admin.kubeconfig"

# ------------------------------------------------------------ processes ----
declare -A PIDS=()
STARTED=()
on_exit() {
  local rc=$?
  if [[ $rc != 0 && ${#STARTED[@]} -gt 0 ]]; then
    if [[ "${KEEP_ON_FAILURE:-}" == 1 ]]; then
      log "KEEP_ON_FAILURE=1: leaving the cluster processes running; stop them with down.sh $W"
    else
      "$CLUSTER_DIR/down.sh" "$W" >&2 || true
    fi
  fi
}
trap on_exit EXIT

start() { # name binary|/abs/path args...
  local name="$1" exe="$2"; shift 2
  [[ "$exe" == /* ]] || exe="$BIN/$exe"
  echo "+ $exe $*" > "$LOGS/$name.log"
  "$exe" "$@" </dev/null >>"$LOGS/$name.log" 2>&1 &
  PIDS[$name]=$!
  STARTED+=("$name")
  echo "$name $! $exe" >> "$W/pids"
}

fail() { # component message
  echo "up.sh: error: $2" >&2
  # Lost a race for a port with another process: start over on new ports.
  if [[ -n "$1" && -f "$LOGS/$1.log" ]] && grep -q 'address already in use' "$LOGS/$1.log" &&
     (( ${UP_ATTEMPT:-1} < 3 )); then
    echo "up.sh: $1 could not bind its port; retrying with new ports" >&2
    "$CLUSTER_DIR/down.sh" "$W" >&2 || true
    STARTED=()
    UP_ATTEMPT=$(( ${UP_ATTEMPT:-1} + 1 )) exec "$CLUSTER_DIR/up.sh" "$W"
  fi
  if [[ -n "$1" && -f "$LOGS/$1.log" ]]; then
    echo "---- last 40 lines of $LOGS/$1.log ----" >&2
    tail -n 40 "$LOGS/$1.log" >&2
    echo "----" >&2
  fi
  exit 1
}

wait_for() { # component description command...
  local comp="$1" desc="$2"; shift 2
  local deadline=$((SECONDS + TIMEOUT)) t=$SECONDS
  until "$@" >/dev/null 2>&1; do
    if [[ -n "$comp" ]] && ! kill -0 "${PIDS[$comp]}" 2>/dev/null; then
      fail "$comp" "$comp exited while waiting for $desc"
    fi
    ((SECONDS < deadline)) || fail "$comp" "timed out after ${TIMEOUT}s waiting for $desc"
    sleep 0.5
  done
  log "$desc ($((SECONDS - t))s)"
}

curl_ok() { # url [curl args...] : body must be "ok"
  local url="$1"; shift
  [[ "$(curl -fsS --noproxy '*' --max-time 5 "$@" "$url")" == ok ]]
}
kc() { "$BIN/kubectl" --kubeconfig "$KUBECONFIG_ADMIN" --request-timeout=10s "$@"; }

# ---------------------------------------------------------------- etcd -----
start etcd etcd \
  --name=bio-test --data-dir="$W/etcd" \
  --listen-client-urls="http://127.0.0.1:$ETCD_PORT" --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster="bio-test=http://127.0.0.1:$ETCD_PEER_PORT" --initial-cluster-state=new \
  --unsafe-no-fsync --log-level=warn
wait_for etcd "etcd healthy on 127.0.0.1:$ETCD_PORT" \
  bash -c "curl -fsS --noproxy '*' --max-time 5 http://127.0.0.1:$ETCD_PORT/health | grep -q '\"health\":\"true\"'"

# ------------------------------------------------------------- apiserver ---
# --advertise-address=127.0.0.1 + --endpoint-reconciler-type=none: nothing is
# ever published that points off loopback (the default advertise address is a
# non-loopback interface, and loopback fails Endpoints validation).
start kube-apiserver kube-apiserver \
  --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
  --bind-address=127.0.0.1 --secure-port="$API_PORT" \
  --advertise-address=127.0.0.1 --endpoint-reconciler-type=none \
  --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
  --client-ca-file="$PKI/client-ca.crt" \
  --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
  --authorization-mode=Node,RBAC \
  --service-account-issuer="$SA_ISSUER" --api-audiences="$SA_ISSUER" \
  --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
  --service-cluster-ip-range=10.96.0.0/16 \
  --allow-privileged=true \
  --cert-dir="$PKI/apiserver-generated" \
  --profiling=false \
  --v="$V"
wait_for kube-apiserver "kube-apiserver /readyz ok at $APISERVER" \
  curl_ok "$APISERVER/readyz" --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key"

# ---------------------------------------------------- controller-manager ---
KCM_KC="$W/kubeconfig/controller-manager.kubeconfig"
start kube-controller-manager kube-controller-manager \
  --kubeconfig="$KCM_KC" --authentication-kubeconfig="$KCM_KC" --authorization-kubeconfig="$KCM_KC" \
  --bind-address=127.0.0.1 --secure-port="$KCM_PORT" --cert-dir="$PKI/kcm-generated" \
  --leader-elect=false \
  --use-service-account-credentials \
  --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
  --cluster-signing-cert-file="$PKI/client-ca.crt" --cluster-signing-key-file="$PKI/client-ca.key" \
  --allocate-node-cidrs --cluster-cidr=10.244.0.0/16 --node-cidr-mask-size=24 \
  --service-cluster-ip-range=10.96.0.0/16 \
  --kube-api-qps=500 --kube-api-burst=1000 \
  --profiling=false \
  --v="$V"

# -------------------------------------------------------------- scheduler --
cat > "$W/config/scheduler.yaml" <<EOF
apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
clientConnection:
  kubeconfig: $W/kubeconfig/scheduler.kubeconfig
  qps: 500
  burst: 1000
leaderElection:
  leaderElect: false
EOF
SCHED_KC="$W/kubeconfig/scheduler.kubeconfig"
start kube-scheduler kube-scheduler \
  --config="$W/config/scheduler.yaml" \
  --authentication-kubeconfig="$SCHED_KC" --authorization-kubeconfig="$SCHED_KC" \
  --bind-address=127.0.0.1 --secure-port="$SCHED_PORT" --cert-dir="$PKI/scheduler-generated" \
  --profiling=false \
  --v="$V"

# ------------------------------------------------------------------ kwok ---
# Manages only nodes annotated kwok.x-k8s.io/node=fake (add-nodes.sh). Nodes
# get InternalIP 127.0.0.1 and kubelet port = kwok's own loopback server, so
# even `kubectl logs/exec` against a fake pod stays on loopback.
start kwok kwok \
  --kubeconfig="$W/kubeconfig/kwok.kubeconfig" \
  --config="$STAGES" \
  --manage-all-nodes=false \
  --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
  --node-ip=127.0.0.1 --node-port="$KWOK_PORT" \
  --server-address="127.0.0.1:$KWOK_PORT" \
  --tls-cert-file="$PKI/kwok-serving.crt" --tls-private-key-file="$PKI/kwok-serving.key" \
  --cidr=10.244.255.0/24 \
  --node-lease-duration-seconds=40

wait_for kube-controller-manager "kube-controller-manager /healthz ok on 127.0.0.1:$KCM_PORT" \
  curl_ok "https://127.0.0.1:$KCM_PORT/healthz" -k
wait_for kube-scheduler "kube-scheduler /healthz ok on 127.0.0.1:$SCHED_PORT" \
  curl_ok "https://127.0.0.1:$SCHED_PORT/healthz" -k
wait_for kwok "kwok /healthz ok on 127.0.0.1:$KWOK_PORT" \
  curl_ok "https://127.0.0.1:$KWOK_PORT/healthz" --cacert "$PKI/ca.crt"
wait_for kube-controller-manager "ServiceAccount default/default created" \
  kc get serviceaccount default -n default
wait_for kube-controller-manager "ConfigMap default/kube-root-ca.crt created" \
  kc get configmap kube-root-ca.crt -n default

# ------------------------------------------------------------------- env ---
cat > "$W/env" <<EOF
# Written by tests/cluster/up.sh; source it.
export CLUSTER_WORKDIR='$W'
export CLUSTER_BIN_DIR='$BIN'
export KUBECONFIG='$KUBECONFIG_ADMIN'
export PATH='$BIN':"\$PATH"
export APISERVER='$APISERVER'
export API_PORT='$API_PORT'
export ETCD_ENDPOINT='http://127.0.0.1:$ETCD_PORT'
export ETCD_PORT='$ETCD_PORT'
export ETCD_PEER_PORT='$ETCD_PEER_PORT'
export KCM_PORT='$KCM_PORT'
export SCHEDULER_PORT='$SCHED_PORT'
export KWOK_PORT='$KWOK_PORT'
export CLUSTER_CA_CERT='$PKI/ca.crt'
export CLUSTER_CA_KEY='$PKI/ca.key'
export CLIENT_CA_CERT='$PKI/client-ca.crt'
export CLIENT_CA_KEY='$PKI/client-ca.key'
export ADMIN_CERT='$PKI/admin.crt'
export ADMIN_KEY='$PKI/admin.key'
export SA_SIGNING_KEY='$PKI/sa.key'
export SA_PUBLIC_KEY='$PKI/sa.pub'
export SA_ISSUER='$SA_ISSUER'
export CLUSTER_LOGS='$LOGS'
export NO_PROXY='$NO_PROXY'
# Keep kubectl's discovery cache and Helm's config/cache/data in the workdir.
export KUBECACHEDIR='$W/cache/kube'
export HELM_CACHE_HOME='$W/cache/helm'
export HELM_CONFIG_HOME='$W/config/helm'
export HELM_DATA_HOME='$W/cache/helm-data'
export no_proxy='$no_proxy'
EOF
if ((REAL_NODES > 0)); then
  cat >> "$W/env" <<EOF
# Real nodes: this cluster lives in the namespaces pinned under \$CLUSTER_WORKDIR/ns; run clients
# with tests/cluster/enter.sh (or nsenter --net=.../ns/net --mount=.../ns/mnt).
export REAL_NODES='${REAL_NODE_NAMES[*]}'
export REAL_NODE_IP='$REAL_NODE_IP'
export CONTAINERD_ADDRESS='$CONTAINERD_SOCK'
EOF
fi

# Prove kwok really manages annotated nodes: a probe node must turn Ready.
CLUSTER_TIMEOUT="$TIMEOUT" "$CLUSTER_DIR/add-nodes.sh" "$W" 1 kwok-probe >"$LOGS/probe.log" 2>&1 ||
  { cat "$LOGS/probe.log" >&2; fail kwok "kwok did not make a probe node Ready"; }
kc delete node kwok-probe-0 --wait=true >>"$LOGS/probe.log" 2>&1 || fail probe "could not delete the probe node"
log "kwok manages annotated nodes (probe node turned Ready)"

for n in "${REAL_NODE_NAMES[@]}"; do start_real_node "$n"; done

STARTED=() # success: the cluster belongs to the caller now (down.sh)
log "cluster up in $((SECONDS - T0))s: $APISERVER (source $W/env)"
