#!/usr/bin/env bash
# Builds (or reuses) the images for running Prometheus Operator on the real kubelet, locally (no
# registry is reachable), from the binaries tests/cluster/prometheus-operator/build.sh builds out
# of the pinned Go modules:
#
#   localhost/bio-test/prometheus-operator:<v0.x.y>         entrypoint /bin/operator, user 65534
#   localhost/bio-test/prometheus-config-reloader:<v0.x.y>  /bin/prometheus-config-reloader
#   localhost/bio-test/prometheus:<v3.x.y>                  upstream's layout (/bin/prometheus,
#                                                           /etc/prometheus/prometheus.yml, /prometheus)
#
# Tags carry upstream's "v", so the operator's own naming works too: with
# --prometheus-default-base-image=localhost/bio-test/prometheus a Prometheus with
# spec.version v3.x.y gets localhost/bio-test/prometheus:v3.x.y. Point the operator at the
# reloader with --prometheus-config-reloader=localhost/bio-test/prometheus-config-reloader:<tag>.
# Versions: tests/cluster/prometheus-operator/tool/go.mod (operator, reloader) and
# tests/prometheus/tool/go.mod (Prometheus); see that build.sh's versions.env.
#
# Archives (docker-archive, for tests/cluster/load-images.sh / `ctr -n k8s.io images import`):
# ~/.cache/bio-exporter/images/bio-test-prometheus-operator.tar, bio-test-prometheus-config-
# reloader.tar, bio-test-prometheus.tar (IMAGES_DIR), printed one per line on stdout. An image
# whose inputs did not change is not rebuilt. Builder as for `make images`:
# scripts/lib-images.sh (BUILDER=buildah|podman|docker).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../../.." && pwd)"
# shellcheck source=../../../scripts/lib-images.sh
. "$ROOT/scripts/lib-images.sh"

# The Go builds come first (minutes when cold) and outside the images lock.
BIN="$("$ROOT/tests/cluster/prometheus-operator/build.sh" | tail -n1)"
# shellcheck disable=SC1091 # written by that build.sh
. "$BIN/../versions.env"
[[ -n "${PROM_OP_VERSION:-}" && -n "${PROMETHEUS_VERSION:-}" ]] || { img_log "no versions in $BIN/../versions.env"; exit 1; }
OPERATOR_IMAGE="localhost/bio-test/prometheus-operator:$PROM_OP_VERSION"
RELOADER_IMAGE="localhost/bio-test/prometheus-config-reloader:$PROM_OP_VERSION"
PROMETHEUS_IMAGE="localhost/bio-test/prometheus:$PROMETHEUS_VERSION"

prom_dir="$(cd "$ROOT/tests/prometheus/tool" && GOTOOLCHAIN=local GOFLAGS=-mod=readonly \
  go mod download -json github.com/prometheus/prometheus |
  sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')"
[ -f "$prom_dir/documentation/examples/prometheus.yml" ] || { img_log "no Prometheus module source in '$prom_dir'"; exit 1; }

"$ROOT/scripts/install-deps.sh" images >&2
img_pick_builder
mkdir -p "$IMAGES_DIR"
exec 9>"$IMAGES_DIR/.lock"
flock 9

# Build contexts: staged outside the repository, beside the archives (not images/build.sh's
# .context, which that script empties).
CTX="$IMAGES_DIR/.context-prometheus"
rm -rf "$CTX"
mkdir -p "$CTX/prometheus-operator" "$CTX/prometheus-config-reloader" \
  "$CTX/prometheus/rootfs/bin" "$CTX/prometheus/rootfs/etc" "$CTX/prometheus/etc-prometheus" \
  "$CTX/prometheus/data/prometheus"
cp "$BIN/operator" "$CTX/prometheus-operator/operator"
cp "$BIN/prometheus-config-reloader" "$CTX/prometheus-config-reloader/prometheus-config-reloader"
cp "$BIN/prometheus" "$CTX/prometheus/rootfs/bin/prometheus"
cp "$prom_dir/LICENSE" "$prom_dir/NOTICE" "$CTX/prometheus/rootfs/"
cp "$prom_dir/documentation/examples/prometheus.yml" "$CTX/prometheus/etc-prometheus/prometheus.yml"
# Modes as upstream's image (the module cache is read-only): owners are the Containerfile's
# COPY --chown, and upstream's `chmod g+w /prometheus`.
chmod -R u+w,go-w,a+rX "$CTX/prometheus"
chmod 0775 "$CTX/prometheus/data/prometheus"

for b in "$CTX/prometheus-operator/operator" "$CTX/prometheus-config-reloader/prometheus-config-reloader" \
  "$CTX/prometheus/rootfs/bin/prometheus"; do
  if readelf -dl "$b" | grep -Eq '\(NEEDED\)|interpreter'; then
    img_log "$b is not static"
    exit 1
  fi
done

img_build bio-test-prometheus-operator "$OPERATOR_IMAGE" "$HERE/prometheus-operator/Containerfile" \
  "$CTX/prometheus-operator" "$CTX/prometheus-operator/operator" "$HERE/build-prometheus.sh"
img_build bio-test-prometheus-config-reloader "$RELOADER_IMAGE" "$HERE/prometheus-config-reloader/Containerfile" \
  "$CTX/prometheus-config-reloader" "$CTX/prometheus-config-reloader/prometheus-config-reloader" "$HERE/build-prometheus.sh"
img_build bio-test-prometheus "$PROMETHEUS_IMAGE" "$HERE/prometheus/Containerfile" "$CTX/prometheus" \
  "$CTX/prometheus/rootfs/bin/prometheus" "$CTX/prometheus/etc-prometheus/prometheus.yml" \
  "$CTX/prometheus/rootfs/LICENSE" "$CTX/prometheus/rootfs/NOTICE" "$HERE/build-prometheus.sh"
img_report "$IMAGES_DIR/bio-test-prometheus-operator.tar" "$IMAGES_DIR/bio-test-prometheus-config-reloader.tar" \
  "$IMAGES_DIR/bio-test-prometheus.tar" >&2
