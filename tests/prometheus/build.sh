#!/usr/bin/env bash
# Builds the Prometheus 3.x server that tests/prometheus runs against, from the Go module pinned in
# tests/prometheus/tool/go.mod, and caches the binary outside the repository:
#
#   ${BIO_CACHE:-$HOME/.cache/bio-exporter}/prometheus-<hash>/prometheus
#
# <hash> covers tool/go.mod, tool/go.sum, this script and `go version`, so any change to them
# builds anew; otherwise the cached binary is reused. Concurrent runs are serialised by flock.
# Everything but the binary's path goes to stderr; the path is the last line on stdout.
#
# Needs: Go >= the version in tool/go.mod (GOTOOLCHAIN=local: no toolchain download), flock,
# sha256sum, and the Go module proxy (first build only; later builds use the module cache).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tool="$here/tool"
cache="${BIO_CACHE:-$HOME/.cache/bio-exporter}"

export GOTOOLCHAIN=local
export CGO_ENABLED=0
export GOFLAGS="-buildvcs=false -mod=readonly"

command -v go >/dev/null || { echo "build.sh: go is not installed (need Go >= $(sed -n 's/^go //p' "$tool/go.mod"))" >&2; exit 1; }

# v0.3XX.Y of the Go module is Prometheus 3.XX.Y.
modver="$(awk '$1 == "github.com/prometheus/prometheus" { print $2 }' "$tool/go.mod")"
if [[ ! "$modver" =~ ^v0\.3([0-9][0-9])\.([0-9]+)$ ]]; then
    echo "build.sh: cannot map module version '$modver' to a Prometheus 3.x version" >&2
    exit 1
fi
version="3.$((10#${BASH_REMATCH[1]})).${BASH_REMATCH[2]}"

hash="$( { cat "$tool/go.mod" "$tool/go.sum" "$0"; go version; go env GOOS GOARCH; } | sha256sum | cut -c1-16)"
dir="$cache/prometheus-$hash"
bin="$dir/prometheus"

mkdir -p "$cache"
exec 9>"$cache/prometheus-$hash.lock"
if ! flock -n 9; then
    echo "build.sh: another build of $dir is running; waiting for it (up to 60 min)" >&2
    flock -w 3600 9 || { echo "build.sh: timed out waiting for the lock" >&2; exit 1; }
fi

if [[ -x "$bin" ]] && "$bin" --version >/dev/null 2>&1; then
    echo "build.sh: cached Prometheus $version: $bin" >&2
    echo "$bin"
    exit 0
fi

echo "build.sh: building Prometheus $version (module $modver) into $dir; a cold build takes minutes" >&2
mkdir -p "$dir"
tmp="$(mktemp "$dir/prometheus.tmp.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
start=$SECONDS
# remove_all_sd: only the file and http service discoveries (static_configs are core); the cloud
# and Kubernetes SDs are not needed here and are most of the build. No builtinassets: the web UI
# is not embedded (the HTTP API is all the tests use).
(
    cd "$tool"
    go build -p 2 -trimpath -tags remove_all_sd \
        -ldflags "-s -w \
            -X github.com/prometheus/common/version.Version=$version \
            -X github.com/prometheus/common/version.Revision=$modver \
            -X github.com/prometheus/common/version.Branch=module \
            -X github.com/prometheus/common/version.BuildUser=bio-exporter \
            -X github.com/prometheus/common/version.BuildDate=$(date -u +%Y%m%d-%H:%M:%S)" \
        -o "$tmp" github.com/prometheus/prometheus/cmd/prometheus
)
"$tmp" --version >&2
mv -f "$tmp" "$bin"
trap - EXIT
echo "build.sh: built in $((SECONDS - start)) s: $bin" >&2
echo "$bin"
