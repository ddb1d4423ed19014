#!/usr/bin/env bash
# `make images`: the node-agent and bio-operator images from node-agent/Dockerfile and
# operator/Dockerfile, which package the static binaries of the release build
# (scripts/build-static.sh, run first by `make images`) from dist/linux-amd64/.
#
# Tags are what the chart's defaults and the operator's --agent-image default ask for, so a
# `helm install` with default values finds these images once they are in the node's runtime:
#   ghcr.io/bio-exporter/node-agent:<appVersion>   (values: agent.image.repository/tag)
#   ghcr.io/bio-exporter/operator:<appVersion>     (values: operator.image.repository/tag)
# <appVersion> is charts/bio-exporter/Chart.yaml's, which must equal both crates' versions (the
# operator's built-in --agent-image default uses its crate version).
#
# Each image is also saved as a docker-archive in ~/.cache/bio-exporter/images/ (IMAGES_DIR)
# for `ctr -n k8s.io images import`, `podman load` or `docker load`. An image whose binary and
# Dockerfile did not change is not rebuilt. Builder: see scripts/lib-images.sh (BUILDER=...).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
# shellcheck source=lib-images.sh
. scripts/lib-images.sh

DIST=dist/linux-amd64
REPO=ghcr.io/bio-exporter

version="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' charts/bio-exporter/Chart.yaml)"
[ -n "$version" ] || { img_log "no appVersion in charts/bio-exporter/Chart.yaml"; exit 1; }
for crate in node-agent operator; do
  v="$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$crate/Cargo.toml" | head -1)"
  if [ "$v" != "$version" ]; then
    img_log "$crate/Cargo.toml version $v differs from the chart's appVersion $version"
    exit 1
  fi
done

for b in node-agent bio-operator; do
  [ -x "$DIST/$b" ] || { img_log "$DIST/$b missing: run scripts/build-static.sh (make static)"; exit 1; }
done

img_pick_builder
mkdir -p "$IMAGES_DIR"
exec 9>"$IMAGES_DIR/.lock"
flock 9

archives=()
archives+=("$(img_build node-agent "$REPO/node-agent:$version" node-agent/Dockerfile . "$DIST/node-agent")")
archives+=("$(img_build operator "$REPO/operator:$version" operator/Dockerfile . "$DIST/bio-operator")")

echo "images ($BUILDER):"
case "$BUILDER" in
  buildah) buildah images --filter "reference=$REPO/*:$version" ;;
  *) "$BUILDER" images --filter "reference=$REPO/*:$version" ;;
esac
echo "archives:"
img_report "${archives[@]}"
