#!/usr/bin/env bash
# Build (or reuse) the local test-cluster tools: kube-apiserver, kubelet,
# kube-controller-manager, kube-scheduler, kubectl, etcd, kwok, helm (v4) and
# helm3 (v3), plus kwok's default stage config.
#
# Output goes to a cache outside the repo:
#   ${BIO_CACHE:-$HOME/.cache/bio-exporter}/cluster-<key>/bin/
# where <key> hashes the tools' go.mod/go.sum/*.go, this script and the Go
# version, so a change to any of them rebuilds and nothing else ever does.
#
# Usage: build.sh                  build what is missing, print the bin dir last
#        build.sh --print-bin-dir  only print the bin dir (no build)
#        build.sh --check          exit 0 if everything is built, 1 otherwise
# Progress goes to stderr; the last stdout line is the bin dir.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TOOLS="$HERE/tools"

# Pinned versions (must match tools/*/go.mod; build fails loudly if not).
K8S_VERSION=v1.37.2
KWOK_VERSION=v0.8.0
HELM4_VERSION=v4.3.1
HELM3_VERSION=v3.22.0

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=readonly
unset GOOS GOARCH

die() { echo "build.sh: error: $*" >&2; exit 1; }
log() { echo "build.sh: $*" >&2; }

command -v go >/dev/null || die "go not found in PATH"

key() {
  {
    go env GOVERSION GOOS GOARCH
    cd "$HERE"
    find tools -type f \( -name go.mod -o -name go.sum -o -name '*.go' \) | LC_ALL=C sort |
      while read -r f; do echo "== $f"; cat "$f"; done
    echo "== build.sh"; cat build.sh
  } | sha256sum | cut -c1-16
}

CACHE_ROOT="${BIO_CACHE:-$HOME/.cache/bio-exporter}"
OUT="$CACHE_ROOT/cluster-$(key)"
BIN="$OUT/bin"

K8S_BINS=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet)
ALL_BINS=("${K8S_BINS[@]}" etcd kwok helm helm3)
STAGES="$OUT/kwok-stages.yaml"

all_built() {
  local b
  for b in "${ALL_BINS[@]}"; do [[ -x "$BIN/$b" ]] || return 1; done
  [[ -s "$STAGES" ]]
}

case "${1:-}" in
  --print-bin-dir) echo "$BIN"; exit 0 ;;
  --check) all_built; exit $? ;;
  "") ;;
  *) die "unknown argument: $1 (use --print-bin-dir or --check)" ;;
esac

if all_built; then
  log "all tools cached in $BIN"
  echo "$BIN"
  exit 0
fi

mkdir -p "$BIN"
# Serialise concurrent builds of the same key (two test scripts at once).
exec 9>"$OUT/.lock"
flock 9

mod_version() { # dir module -> version required by that go.mod
  (cd "$TOOLS/$1" && go list -m -f '{{.Version}}' "$2")
}
check_pin() { # dir module expected
  local got; got="$(mod_version "$1" "$2")"
  [[ "$got" == "$3" ]] || die "tools/$1/go.mod requires $2 $got but build.sh pins $3"
}

# Build into a temp dir and move into place, so a killed build never leaves a
# half-written binary that a later run would take for a good one.
TMP="$(mktemp -d "$OUT/.build.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

GOBUILD=(go build -p "${BUILD_JOBS:-2}" -trimpath)
T_ALL=$SECONDS

need() { local b; for b in "$@"; do [[ -x "$BIN/$b" ]] || return 0; done; return 1; }

timed() { # name cmd...
  local t=$SECONDS name="$1"; shift
  log "building $name ..."
  "$@" || die "building $name failed"
  log "built $name in $((SECONDS - t))s"
}

if need "${K8S_BINS[@]}"; then
  check_pin kubernetes k8s.io/kubernetes "$K8S_VERSION"
  ld="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$(cut -d. -f2 <<<"$K8S_VERSION")"
    ld+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  # One invocation for all four so the shared packages compile once.
  (cd "$TOOLS/kubernetes" && timed "kubernetes $K8S_VERSION (${K8S_BINS[*]})" \
    "${GOBUILD[@]}" -ldflags "$ld" -o "$TMP/" \
    "${K8S_BINS[@]/#/k8s.io/kubernetes/cmd/}")
  for b in "${K8S_BINS[@]}"; do mv -f "$TMP/$b" "$BIN/$b"; done
fi

if need etcd; then
  (cd "$TOOLS/etcd" && timed "etcd $(mod_version etcd go.etcd.io/etcd/server/v3)" \
    "${GOBUILD[@]}" -ldflags "-s -w" -o "$TMP/etcd" .)
  mv -f "$TMP/etcd" "$BIN/etcd"
fi

if need kwok; then
  check_pin kwok sigs.k8s.io/kwok "$KWOK_VERSION"
  (cd "$TOOLS/kwok" && timed "kwok $KWOK_VERSION" \
    "${GOBUILD[@]}" -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION -X sigs.k8s.io/kwok/pkg/consts.KubeVersion=$K8S_VERSION" \
    -o "$TMP/kwok" sigs.k8s.io/kwok/cmd/kwok)
  mv -f "$TMP/kwok" "$BIN/kwok"
fi

if [[ ! -s "$STAGES" ]]; then
  # kwok (unlike kwokctl) has no built-in stages: use the upstream defaults
  # that kwokctl uses (node-initialize, node heartbeat with lease, pod
  # ready/complete/delete), taken from the same kwok module version.
  kdir="$(cd "$TOOLS/kwok" && go mod download -json sigs.k8s.io/kwok | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  [[ -d "$kdir/kustomize/stage" ]] || die "kwok module dir not found ($kdir)"
  first=1
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
           pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    [[ -f "$kdir/kustomize/stage/$f" ]] || die "missing kwok stage $f"
    [[ $first == 1 ]] || echo "---"
    first=0
    cat "$kdir/kustomize/stage/$f"
  done > "$TMP/stages.yaml"
  mv -f "$TMP/stages.yaml" "$STAGES"
fi

if need helm; then
  check_pin helm4 helm.sh/helm/v4 "$HELM4_VERSION"
  (cd "$TOOLS/helm4" && timed "helm $HELM4_VERSION" \
    "${GOBUILD[@]}" -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM4_VERSION -X helm.sh/helm/v4/internal/version.gitTreeState=clean" \
    -o "$TMP/helm" helm.sh/helm/v4/cmd/helm)
  mv -f "$TMP/helm" "$BIN/helm"
fi

if need helm3; then
  check_pin helm3 helm.sh/helm/v3 "$HELM3_VERSION"
  k8s_minor="$(cd "$TOOLS/helm3" && go list -m -f '{{.Version}}' k8s.io/client-go | cut -d. -f2)"
  (cd "$TOOLS/helm3" && timed "helm3 $HELM3_VERSION" \
    "${GOBUILD[@]}" -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM3_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean \
      -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$k8s_minor \
      -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$k8s_minor" \
    -o "$TMP/helm3" helm.sh/helm/v3/cmd/helm)
  mv -f "$TMP/helm3" "$BIN/helm3"
fi

all_built || die "some tools are still missing from $BIN"
log "all tools built in $BIN ($((SECONDS - T_ALL))s)"
echo "$BIN"
