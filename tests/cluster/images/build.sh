#!/usr/bin/env bash
# Builds (or reuses) the images the real-kubelet tests run, locally (no registry is reachable):
#
#   localhost/bio-test/pause:3.10.2   the pod sandbox image: point containerd's sandbox_image at it
#                                     (also `--pod-infra-container-image` where a kubelet asks)
#   localhost/bio-test/busybox:1      test pods' shell (sh, dd with oflag=direct, sync, mount ...)
#
# * pause: build/pause/linux/pause.c from the k8s.io/kubernetes module pinned in
#   tests/cluster/tools/kubernetes/go.mod, compiled static with upstream's flags
#   (build/pause/Makefile: -Os -Wall -Werror -static -DVERSION=...), packaged like upstream
#   (pause/Containerfile). The tag is upstream's TAG of that source; if a Kubernetes bump changes
#   it, this script stops and PAUSE_TAG here (and the containerd config) must follow.
# * busybox: Debian's busybox-static on scratch with links for the applets below.
#
# Archives (docker-archive, for `ctr -n k8s.io images import`): ~/.cache/bio-exporter/images/
# bio-test-pause.tar and bio-test-busybox.tar (IMAGES_DIR), printed one per line on stdout. An
# image whose inputs (binary, Containerfile, this script) did not change is not rebuilt. Builder
# as for `make images`: scripts/lib-images.sh (BUILDER=buildah|podman|docker).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../../.." && pwd)"
# shellcheck source=../../../scripts/lib-images.sh
. "$ROOT/scripts/lib-images.sh"

PAUSE_TAG=3.10.2
PAUSE_IMAGE="localhost/bio-test/pause:$PAUSE_TAG"
BUSYBOX_IMAGE=localhost/bio-test/busybox:1
APPLETS=(sh ash cat cp dd df du echo env false find grep head id kill ln ls mkdir mknod mount mv
  printf ps pwd readlink rm rmdir sed seq sleep stat sync tail tee test '[' timeout touch tr true
  truncate umount uname wc blockdev losetup)

"$ROOT/scripts/install-deps.sh" images >&2
img_pick_builder
mkdir -p "$IMAGES_DIR"
exec 9>"$IMAGES_DIR/.lock"
flock 9

# Build contexts: staged outside the repository, beside the archives.
CTX="$IMAGES_DIR/.context"
rm -rf "$CTX"
mkdir -p "$CTX/pause" "$CTX/busybox/rootfs/bin"

# pause
command -v go >/dev/null || { img_log "go is needed to fetch the k8s.io/kubernetes module"; exit 1; }
k8s_dir="$(cd "$ROOT/tests/cluster/tools/kubernetes" && go mod download -json k8s.io/kubernetes |
  sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')"
k8s_version="$(cd "$ROOT/tests/cluster/tools/kubernetes" && go list -m -f '{{.Version}}' k8s.io/kubernetes)"
src="$k8s_dir/build/pause/linux/pause.c"
[ -f "$src" ] || { img_log "no $src in k8s.io/kubernetes $k8s_version"; exit 1; }
upstream_tag="$(sed -n 's/^TAG ?= *//p' "$k8s_dir/build/pause/Makefile")"
if [ "$upstream_tag" != "$PAUSE_TAG" ]; then
  img_log "k8s.io/kubernetes $k8s_version builds pause $upstream_tag, this script tags $PAUSE_TAG: update PAUSE_TAG and the kubelet's containerd sandbox_image together"
  exit 1
fi
gcc -Os -Wall -Werror -static -DVERSION="v$PAUSE_TAG-$k8s_version" -o "$CTX/pause/pause" "$src"
if readelf -dl "$CTX/pause/pause" | grep -Eq '\(NEEDED\)|interpreter'; then
  img_log "pause is not static"
  exit 1
fi

# busybox
cp /bin/busybox "$CTX/busybox/rootfs/bin/busybox"
have="$("$CTX/busybox/rootfs/bin/busybox" --list)"
for a in "${APPLETS[@]}"; do
  grep -qxF -- "$a" <<<"$have" || { img_log "busybox has no $a"; exit 1; }
  ln -s busybox "$CTX/busybox/rootfs/bin/$a"
done

img_build bio-test-pause "$PAUSE_IMAGE" "$HERE/pause/Containerfile" "$CTX/pause" \
  "$CTX/pause/pause" "$HERE/build.sh"
img_build bio-test-busybox "$BUSYBOX_IMAGE" "$HERE/busybox/Containerfile" "$CTX/busybox" \
  "$CTX/busybox/rootfs/bin/busybox" "$HERE/build.sh"
img_report "$IMAGES_DIR/bio-test-pause.tar" "$IMAGES_DIR/bio-test-busybox.tar" >&2
