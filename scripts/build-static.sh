#!/usr/bin/env bash
# The release build: node-agent and bio-operator as fully static x86_64 Linux binaries, copied to
# dist/linux-amd64/ (gitignored). The images (node-agent/Dockerfile, operator/Dockerfile) only
# COPY these files, so a release's binaries and its images come from this one build.
#
# * `+crt-static`: glibc linked statically, so the binaries run on an empty (scratch) root. DNS
#   lookups still work: since glibc 2.34 the dns/files NSS modules are part of libc.
# * `--target x86_64-unknown-linux-gnu` keeps RUSTFLAGS off build scripts and proc-macros, which
#   cannot be static (and puts the output beside, not over, the ordinary release build).
# * `--features libbpf-rs/static`: libbpf (vendored, built from source by libbpf-sys), libelf and
#   zlib linked statically; LIBBPF_SYS_LIBRARY_PATH is where libbpf-sys tells rustc to find
#   libelf.a/libz.a (Debian's libelf-dev, zlib1g-dev), rustc does not search the system dirs.
#
# Checks each binary: no dynamic dependency (ldd, readelf), and, as root, that it starts
# (`--help`) chrooted into an empty directory, as it would on scratch.
#
# Env: CARGO_TARGET_DIR (default ~/.cache/bio-exporter/target), DIST (default dist/linux-amd64).
# Other architectures: run this on that architecture's builder with RUST_TARGET set, e.g.
# RUST_TARGET=aarch64-unknown-linux-gnu DIST=dist/linux-arm64 (not set up or tested here).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/bio-exporter/target}"
RUST_TARGET="${RUST_TARGET:-x86_64-unknown-linux-gnu}"
DIST="${DIST:-dist/linux-amd64}"
BINS=(node-agent bio-operator)

multiarch="$(gcc -print-multiarch 2>/dev/null || true)"
export LIBBPF_SYS_LIBRARY_PATH="${LIBBPF_SYS_LIBRARY_PATH:-/usr/lib/${multiarch:-x86_64-linux-gnu}}"
export RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C target-feature=+crt-static"

# One cargo invocation for both packages, so the crates they share are built once.
start=$(date +%s)
cargo build --locked --release --target "$RUST_TARGET" \
  -p node-agent -p bio-operator --bin node-agent --bin bio-operator \
  --features libbpf-rs/static
echo "build-static: cargo build took $(($(date +%s) - start)) s"

mkdir -p "$DIST"
for b in "${BINS[@]}"; do
  src="$CARGO_TARGET_DIR/$RUST_TARGET/release/$b"
  # Replace only when the content changed: the image build hashes these files.
  if ! cmp -s "$src" "$DIST/$b"; then
    cp "$src" "$DIST/$b.tmp"
    mv -f "$DIST/$b.tmp" "$DIST/$b"
  fi
  out="$DIST/$b"
  # A static(-pie) binary: ldd says "statically linked" / "not a dynamic executable" and lists
  # nothing; the dynamic section (static-pie has one) needs no shared object and no interpreter.
  lddout="$(ldd "$out" 2>&1 || true)"
  if grep -q '=>' <<<"$lddout" || ! grep -Eq 'statically linked|not a dynamic executable' <<<"$lddout"; then
    echo "build-static: $out is linked dynamically:" >&2
    echo "$lddout" >&2
    exit 1
  fi
  if readelf -dl "$out" | grep -Eq '\(NEEDED\)|Requesting program interpreter'; then
    echo "build-static: $out needs shared objects or an interpreter:" >&2
    readelf -dl "$out" | grep -E '\(NEEDED\)|interpreter' >&2
    exit 1
  fi
  if [ "$(id -u)" -eq 0 ]; then
    jail="$(mktemp -d)"
    cp "$out" "$jail/$b"
    if ! chroot "$jail" "/$b" --help >/dev/null 2>"$jail.err"; then
      echo "build-static: $b --help fails in an empty root:" >&2
      cat "$jail.err" >&2
      rm -rf "$jail" "$jail.err"
      exit 1
    fi
    rm -rf "$jail" "$jail.err"
    started="starts in an empty root"
  else
    started="not run in an empty root (needs root for chroot)"
  fi
  command -v file >/dev/null && file -b "$out" | sed "s|^|build-static: $out: |"
  echo "build-static: $out ($(du -h "$out" | cut -f1)): ldd: $(echo $lddout); $started"
done
