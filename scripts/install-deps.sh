#!/usr/bin/env bash
# Installs what building and testing need, and only what is missing: a fresh Debian machine
# gets everything, a prepared one is left alone (no apt-get update when nothing is missing).
#   install-deps.sh                  everything (make deps: build, test, images)
#   install-deps.sh images           what `make images` needs: build, images
#   install-deps.sh images-builder   only an image builder (buildah; when no other builder is here)
set -euo pipefail

# Build: clang compiles the BPF C; libelf/zlib/pkg-config link libbpf; libbpf-dev has its headers.
# libelf-dev and zlib1g-dev also ship the libelf.a/libz.a the static release build links.
BUILD=(clang llvm libelf-dev zlib1g-dev pkg-config libbpf-dev)
# Tests: bpftool (program listing), fio (benchmarks), prometheus (promtool and the 2.42 server),
# e2fsprogs/util-linux (mkfs, losetup, blkdiscard, setpriv), openssl (test cluster certificates).
TEST=(bpftool fio prometheus e2fsprogs util-linux openssl curl jq)
# Images (scripts/build-images.sh, tests/cluster/images/build.sh): buildah builds them
# (Debian-packaged, daemonless, reads the Dockerfiles as they are); gcc/libc6-dev compile the
# static pause binary, busybox-static is the test busybox image; binutils' readelf and `file`
# check the static binaries.
BUILDER_PACKAGES=(buildah)
IMAGES=(gcc libc6-dev busybox-static binutils file)
# The real node of tests/cluster (up.sh --real-nodes): the container runtime, its OCI runtime
# (crun fails on this cgroup layout), the CNI plugins, and iptables for the one Service DNAT.
REAL_NODE=(containerd runc containernetworking-plugins iptables)

case "${1:-all}" in
  all) PACKAGES=("${BUILD[@]}" "${TEST[@]}" "${BUILDER_PACKAGES[@]}" "${IMAGES[@]}" "${REAL_NODE[@]}") ;;
  images) PACKAGES=("${BUILD[@]}" "${IMAGES[@]}") ;;
  images-builder) PACKAGES=("${BUILDER_PACKAGES[@]}") ;;
  *) echo "usage: $0 [all|images|images-builder]" >&2; exit 2 ;;
esac

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
[ "${1:-all}" != images-builder ] || exit 0
command -v cargo >/dev/null || { echo "install-deps: cargo (Rust) is required" >&2; exit 1; }
[ "${1:-all}" = all ] || exit 0
# Debian's prometheus package starts a server on :9090 that nothing here needs.
if systemctl is-active --quiet prometheus 2>/dev/null; then
  systemctl stop prometheus || true
fi
# The test suite's Python side: pytest runs it, PyYAML reads `helm template` output.
python3 -c 'import pytest, yaml' 2>/dev/null || python3 -m pip install -q pytest pyyaml
command -v go >/dev/null || echo "install-deps: warning: go is missing; the Kubernetes test cluster cannot be built" >&2
exit 0
