#!/usr/bin/env bash
# Installs what building and testing need, and only what is missing: a fresh Debian machine
# gets everything, a prepared one is left alone (no apt-get update when nothing is missing).
set -euo pipefail

# Build: clang compiles the BPF C; libelf/zlib/pkg-config link libbpf; libbpf-dev has its headers.
# Tests: bpftool (program listing), fio (benchmarks), prometheus (promtool and the 2.42 server),
# e2fsprogs/util-linux (mkfs, losetup, blkdiscard, setpriv), openssl (test cluster certificates).
PACKAGES=(clang llvm libelf-dev zlib1g-dev pkg-config libbpf-dev bpftool fio prometheus
  e2fsprogs util-linux openssl curl jq)

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
# Debian's prometheus package starts a server on :9090 that nothing here needs.
if systemctl is-active --quiet prometheus 2>/dev/null; then
  systemctl stop prometheus || true
fi
# The test suite's Python side: pytest runs it, PyYAML reads `helm template` output.
python3 -c 'import pytest, yaml' 2>/dev/null || python3 -m pip install -q pytest pyyaml
command -v cargo >/dev/null || { echo "install-deps: cargo (Rust) is required" >&2; exit 1; }
command -v go >/dev/null || echo "install-deps: warning: go is missing; the Kubernetes test cluster cannot be built" >&2
exit 0
