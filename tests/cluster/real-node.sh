# One real node for up.sh --real-nodes (sourced by up.sh, inside the cluster's namespaces; uses
# up.sh's new_cert, kubeconfig, start, wait_for, kc). containerd + runc + the CNI bridge from
# Debian, the kubelet from the same k8s.io/kubernetes module as the control plane, and the
# locally built pause and test images. Measured quirks of these hosts it works around (cgroup v1
# hybrid without systemd, no CAP_SYS_RESOURCE, no registry) are in tests/cluster/README.md.
# shellcheck shell=bash

REAL_NODE_PKGS=(containerd runc containernetworking-plugins)
CNI_BIN_DIR=/usr/lib/cni
CONTAINERD_SOCK=/run/containerd/containerd.sock # /run is the namespace's own tmpfs

# start_real_node NAME: certificates, containerd, images, kubelet; waits until the node is Ready.
start_real_node() {
  local node="$1" rn="$W/realnode" p
  for p in /usr/bin/containerd /usr/sbin/runc "$CNI_BIN_DIR/bridge" "$CNI_BIN_DIR/host-local" "$CNI_BIN_DIR/loopback"; do
    [[ -x "$p" ]] || die "$p missing: apt-get install ${REAL_NODE_PKGS[*]} (or run scripts/install-deps.sh)"
  done
  mkdir -p "$rn"/{containerd,cni/net.d,cni-ipam,config}

  # The kubelet's client identity passes the Node authorizer and NodeRestriction.
  new_cert "kubelet-$node" client-ca "/O=system:nodes/CN=system:node:$node" clientAuth
  kubeconfig "kubelet-$node" "system:node:$node"
  new_cert "kubelet-$node-serving" ca "/CN=$node" serverAuth "IP:$REAL_NODE_IP,DNS:$node"

  cat > "$rn/config/containerd.toml" <<EOF
version = 2
root = "$rn/containerd/root"
state = "/run/containerd"
# Root here lacks CAP_SYS_RESOURCE: containerd must not lower its own OOM score.
oom_score = 0
[grpc]
  address = "$CONTAINERD_SOCK"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN_DIR"
    conf_dir = "$rn/cni/net.d"
EOF
  # Pods get addresses from a range of their own, bridged in this namespace; no masquerade
  # (there is no uplink to masquerade to).
  cat > "$rn/cni/net.d/10-bio-test.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "bio-test",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "$REAL_POD_CIDR"}]],
              "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$rn/cni-ipam"}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
  start containerd /usr/bin/containerd --config "$rn/config/containerd.toml"
  wait_for containerd "containerd serving CRI" \
    ctr --address "$CONTAINERD_SOCK" -n k8s.io version

  local img
  for img in "${REAL_NODE_IMAGES[@]}"; do
    ctr --address "$CONTAINERD_SOCK" -n k8s.io images import --no-unpack "$img" >>"$LOGS/containerd-import.log" 2>&1 ||
      fail containerd "could not import $img (see $LOGS/containerd-import.log)"
  done
  log "imported ${#REAL_NODE_IMAGES[@]} images"

  # No kube-proxy: the one Service pods need is the API server's; send its ClusterIP to the
  # API server on this namespace's loopback (route_localnet, set by ns_setup, allows it).
  iptables -t nat -A PREROUTING -d "$KUBERNETES_SERVICE_IP/32" -p tcp --dport 443 \
    -j DNAT --to-destination "127.0.0.1:$API_PORT"

  cat > "$rn/config/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# cgroup v1 hybrid without systemd (see README).
failCgroupV1: false
cgroupDriver: cgroupfs
# No CAP_SYS_RESOURCE: keep the kubelet's OOM score and open-files limit where root may set them.
oomScoreAdj: 0
maxOpenFiles: 20000
address: $REAL_NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
tlsCertFile: $PKI/kubelet-$node-serving.crt
tlsPrivateKeyFile: $PKI/kubelet-$node-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/client-ca.crt}
authorization: {mode: Webhook}
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
resolvConf: $rn/etc/resolv.conf
clusterDomain: cluster.local
failSwapOn: false
serializeImagePulls: false
# A shared build machine's disk can be fuller than the defaults allow; never evict test pods.
evictionHard: {memory.available: "50Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
EOF
  start "kubelet-$node" kubelet \
    --config="$rn/config/kubelet.yaml" --kubeconfig="$W/kubeconfig/kubelet-$node.kubeconfig" \
    --hostname-override="$node" --node-ip="$REAL_NODE_IP" \
    --node-labels="bioexporter.io/test-node=real" \
    --v="$V"
  wait_for "kubelet-$node" "node $node Ready" \
    bash -c "[[ \"\$('$BIN/kubectl' --kubeconfig '$KUBECONFIG_ADMIN' get node '$node' -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}')\" == True ]]"
}
