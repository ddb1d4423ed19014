#!/usr/bin/env bash
# Builds (or reuses) what running Prometheus Operator on a real kubelet needs, from Go modules (no
# registry is reachable, so nothing comes from quay.io): the binaries for the images that
# tests/cluster/images/build-prometheus.sh makes, and the operator's CRDs and example RBAC.
#
#   bin/operator                    Prometheus Operator, cmd/operator of
#                                   github.com/prometheus-operator/prometheus-operator (tool/go.mod)
#   bin/prometheus-config-reloader  cmd/prometheus-config-reloader of the same module
#   bin/prometheus                  Prometheus 3.x, the module tests/prometheus/tool/go.mod pins,
#                                   with the Kubernetes service discovery (see below)
#   crds/*.yaml                     example/prometheus-operator-crd/ of the same operator module,
#                                   for `kubectl apply --server-side -f crds/`
#   rbac/{prometheus-operator,prometheus}/*.yaml   example/rbac/ of the same module (the
#                                   operator's ServiceAccount/ClusterRole/Deployment, Prometheus's)
#   versions.env                    PROM_OP_VERSION=v0.85.0 PROMETHEUS_VERSION=v3.x.y (sourceable)
#
# all under ${BIO_CACHE:-$HOME/.cache/bio-exporter}/prometheus-operator-<key>/, <key> hashing
# tool/go.mod, tool/go.sum, tests/prometheus/tool/go.{mod,sum}, this script and the Go version:
# a change to any of them builds anew, nothing else ever does. Static (CGO_ENABLED=0), -trimpath,
# version stamped into github.com/prometheus/common/version as upstream's Makefile does (dates
# are the modules' publication times, so a rebuild gives the same binary). A flock serialises
# concurrent runs; each file is written to a temp dir and moved into place.
#
# Why Prometheus is built here and not taken from tests/prometheus/build.sh: that build uses
# `-tags remove_all_sd`, which leaves out kubernetes_sd_configs, and every scrape job Prometheus
# Operator generates for a ServiceMonitor uses kubernetes_sd_configs. This one is the same module
# and version with `-tags remove_all_sd,enable_kubernetes_sd` (file/http/static SD + Kubernetes).
# As there, no web UI is embedded (no builtinassets): the API, /-/ready, /-/healthy and /-/reload
# (what the operator's probes and config-reloader use) work.
#
# Usage: build.sh                  build what is missing, print the bin dir last on stdout
#        build.sh --print-bin-dir  only print the bin dir (no build)
#        build.sh --check          exit 0 if everything is built, 1 otherwise
# Progress goes to stderr. Needs Go (GOTOOLCHAIN=local), flock, sha256sum, the Go module proxy
# on the first build.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../../.." && pwd)"
TOOL="$HERE/tool"
PROM_TOOL="$ROOT/tests/prometheus/tool"

# Pinned version (must match tool/go.mod; the build stops if not). Also what
# operator/tests/e2e.sh fetches the ServiceMonitor CRD from.
PROM_OP_MODULE=github.com/prometheus-operator/prometheus-operator
PROM_OP_VERSION=v0.85.0
PROM_MODULE=github.com/prometheus/prometheus

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="-buildvcs=false -mod=readonly"
unset GOOS GOARCH

die() { echo "prometheus-operator/build.sh: error: $*" >&2; exit 1; }
log() { echo "prometheus-operator/build.sh: $*" >&2; }

command -v go >/dev/null || die "go not found in PATH"

key() {
  {
    go env GOVERSION GOOS GOARCH
    local f
    for f in "$TOOL/go.mod" "$TOOL/go.sum" "$PROM_TOOL/go.mod" "$PROM_TOOL/go.sum" "$HERE/build.sh"; do
      echo "== ${f#"$ROOT"/}"
      cat "$f"
    done
  } | sha256sum | cut -c1-16
}

CACHE_ROOT="${BIO_CACHE:-$HOME/.cache/bio-exporter}"
OUT="$CACHE_ROOT/prometheus-operator-$(key)"
BIN="$OUT/bin"
BINS=(operator prometheus-config-reloader prometheus)

all_built() {
  local b
  for b in "${BINS[@]}"; do [[ -x "$BIN/$b" ]] || return 1; done
  [[ -s "$OUT/versions.env" && -s "$OUT/crds/monitoring.coreos.com_servicemonitors.yaml" &&
    -d "$OUT/rbac/prometheus-operator" ]]
}

case "${1:-}" in
  --print-bin-dir) echo "$BIN"; exit 0 ;;
  --check) all_built; exit $? ;;
  "") ;;
  *) die "unknown argument: $1 (use --print-bin-dir or --check)" ;;
esac

if all_built; then
  log "cached in $OUT"
  echo "$BIN"
  exit 0
fi

mkdir -p "$BIN"
exec 9>"$OUT/.lock"
if ! flock -n 9; then
  log "another build of $OUT is running; waiting for it"
  flock 9
fi

got="$(cd "$TOOL" && go list -m -f '{{.Version}}' "$PROM_OP_MODULE")"
[[ "$got" == "$PROM_OP_VERSION" ]] || die "tool/go.mod requires $PROM_OP_MODULE $got but build.sh pins $PROM_OP_VERSION"
# v0.3XX.Y of the Prometheus Go module is Prometheus 3.XX.Y (as tests/prometheus/build.sh maps it).
prom_modver="$(cd "$PROM_TOOL" && go list -m -f '{{.Version}}' "$PROM_MODULE")"
[[ "$prom_modver" =~ ^v0\.3([0-9][0-9])\.([0-9]+)$ ]] ||
  die "cannot map $PROM_MODULE $prom_modver (tests/prometheus/tool/go.mod) to a Prometheus 3.x version"
PROM_VERSION="v3.$((10#${BASH_REMATCH[1]})).${BASH_REMATCH[2]}"

# mod_info DIR MODULE FIELD: a field of `go mod download -json` (Dir, Info, ...).
mod_info() {
  (cd "$1" && go mod download -json "$2") | sed -n "s/^[[:space:]]*\"$3\": \"\(.*\)\",\{0,1\}\$/\1/p"
}
# mod_date DIR MODULE: the module version's publication time as promu/upstream's Makefile write
# BuildDate (20250821-12:39:54), so the binary does not change when it is rebuilt.
mod_date() {
  local t
  t="$(sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' "$(mod_info "$1" "$2" Info)")"
  date -u -d "$t" +%Y%m%d-%H:%M:%S
}
# ldflags VERSION REVISION DATE: upstream's GO_BUILD_LDFLAGS (Makefile), -w as our other builds.
ldflags() {
  local p=github.com/prometheus/common/version
  echo "-s -w -X $p.Version=$1 -X $p.Revision=$2 -X $p.Branch=module -X $p.BuildUser=bio-exporter -X $p.BuildDate=$3"
}

TMP="$(mktemp -d "$OUT/.build.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
GOBUILD=(go build -p "${BUILD_JOBS:-2}" -trimpath)
T_ALL=$SECONDS
timed() { # name cmd...
  local t=$SECONDS name="$1"; shift
  log "building $name ..."
  "$@" || die "building $name failed"
  log "built $name in $((SECONDS - t)) s"
}
need() { local b; for b in "$@"; do [[ -x "$BIN/$b" ]] || return 0; done; return 1; }

op_dir="$(mod_info "$TOOL" "$PROM_OP_MODULE" Dir)"
[[ -d "$op_dir/cmd/operator" ]] || die "$PROM_OP_MODULE $PROM_OP_VERSION not in the module cache ($op_dir)"
# Upstream's Makefile: VERSION is the VERSION file (0.85.0, no "v"); the operator derives its
# default config-reloader image from it (quay.io/...:v0.85.0; tests pass their own anyway).
op_file_version="$(tr -d ' \t\r\n' <"$op_dir/VERSION")"
[[ "v$op_file_version" == "$PROM_OP_VERSION" ]] || die "$op_dir/VERSION says $op_file_version"

if need operator prometheus-config-reloader; then
  # One go build for both, so the shared packages compile once.
  (cd "$TOOL" && timed "Prometheus Operator $PROM_OP_VERSION (operator, prometheus-config-reloader)" \
    "${GOBUILD[@]}" -ldflags "$(ldflags "$op_file_version" "$PROM_OP_VERSION" "$(mod_date "$TOOL" "$PROM_OP_MODULE")")" \
    -o "$TMP/" "$PROM_OP_MODULE/cmd/operator" "$PROM_OP_MODULE/cmd/prometheus-config-reloader")
  { "$TMP/operator" --version && echo && "$TMP/prometheus-config-reloader" --version && echo; } >&2
  mv -f "$TMP/operator" "$TMP/prometheus-config-reloader" "$BIN/"
fi

if need prometheus; then
  (cd "$PROM_TOOL" && timed "Prometheus $PROM_VERSION (module $prom_modver, Kubernetes SD)" \
    "${GOBUILD[@]}" -tags remove_all_sd,enable_kubernetes_sd \
    -ldflags "$(ldflags "${PROM_VERSION#v}" "$prom_modver" "$(mod_date "$PROM_TOOL" "$PROM_MODULE")")" \
    -o "$TMP/prometheus" "$PROM_MODULE/cmd/prometheus")
  "$TMP/prometheus" --version >&2
  mv -f "$TMP/prometheus" "$BIN/prometheus"
fi

for b in "${BINS[@]}"; do
  if readelf -dl "$BIN/$b" | grep -Eq '\(NEEDED\)|interpreter'; then die "$BIN/$b is not static"; fi
done

if [[ ! -s "$OUT/crds/monitoring.coreos.com_servicemonitors.yaml" || ! -d "$OUT/rbac/prometheus-operator" ]]; then
  mkdir -p "$TMP/crds" "$TMP/rbac"
  cp "$op_dir"/example/prometheus-operator-crd/*.yaml "$TMP/crds/"
  cp -r "$op_dir/example/rbac/prometheus-operator" "$op_dir/example/rbac/prometheus" "$TMP/rbac/"
  chmod -R u+w "$TMP/crds" "$TMP/rbac" # the module cache is read-only
  rm -rf "$OUT/crds" "$OUT/rbac"
  mv "$TMP/crds" "$TMP/rbac" "$OUT/"
fi

printf 'PROM_OP_VERSION=%s\nPROMETHEUS_VERSION=%s\n' "$PROM_OP_VERSION" "$PROM_VERSION" >"$TMP/versions.env"
mv -f "$TMP/versions.env" "$OUT/versions.env"

all_built || die "something is still missing from $OUT"
log "done in $((SECONDS - T_ALL)) s: $OUT (versions.env: Prometheus Operator $PROM_OP_VERSION, Prometheus $PROM_VERSION)"
echo "$BIN"
