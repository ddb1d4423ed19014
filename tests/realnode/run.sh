#!/usr/bin/env bash
# make test-real-node: the user's path on a real kubelet. Builds (or reuses) the product images
# (`make images`) and the cluster tools, then runs tests/realnode with pytest as root: a cluster
# with one real node (tests/cluster/up.sh --real-nodes 1), the chart's operator Deployment, the
# README's and docs' BioMonitors, a real pod on a local PV, faults, and a check that the host is
# left as it was. Extra arguments go to pytest. Timings: ~/.cache/bio-exporter/realnode-measurements.json.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo"
[[ $(id -u) == 0 ]] || { echo "run.sh: a real node needs root" >&2; exit 1; }
# Images (the same archives a user imports); the test images come with up.sh.
make -s images >&2  # no-op when `make test-real-node` just did it
IMAGES_DIR="${IMAGES_DIR:-${BIO_CACHE:-$HOME/.cache/bio-exporter}/images}"
archives=()
for a in node-agent operator; do
  f="$(ls -t "$IMAGES_DIR"/"$a"*.tar 2>/dev/null | head -n1)"
  [[ -n "$f" ]] || { echo "run.sh: no $a image archive in $IMAGES_DIR" >&2; exit 1; }
  archives+=("$f")
done
BIO_IMAGE_ARCHIVES="$(IFS=:; echo "${archives[*]}")"
export BIO_IMAGE_ARCHIVES
tests/cluster/build.sh >/dev/null
# Prometheus Operator for test_prometheus_operator.py: the CRDs and example RBAC of its module
# (BIO_PROM_OPERATOR_DIR) and the operator, config-reloader and Prometheus image archives
# (BIO_PROM_ARCHIVES), all cached (cold ~30 min each, warm a few seconds).
BIO_PROM_OPERATOR_DIR="$(dirname "$(tests/cluster/prometheus-operator/build.sh | tail -n1)")"
BIO_PROM_ARCHIVES="$(tests/cluster/images/build-prometheus.sh | paste -sd:)"
export BIO_PROM_OPERATOR_DIR BIO_PROM_ARCHIVES
# The README's BioMonitor asks for a ServiceMonitor: the user has Prometheus Operator's CRDs. Its
# real CRD comes from the Prometheus Operator Go module (sum-checked by go), as in the e2e.
BIO_SERVICEMONITOR_CRD="$(cd / && GOTOOLCHAIN=local GOFLAGS=-mod=mod GOWORK=off \
  go mod download -json github.com/prometheus-operator/prometheus-operator@v0.85.0 |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')/example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml"
[[ -f "$BIO_SERVICEMONITOR_CRD" ]] || { echo "run.sh: no ServiceMonitor CRD at $BIO_SERVICEMONITOR_CRD" >&2; exit 1; }
export BIO_SERVICEMONITOR_CRD
# One real node per host at a time (it owns /var/lib/kubelet, the kubepods cgroups and the
# kernel's block tracepoints): wait for any other run to finish.
exec 8>/run/lock/bio-exporter-realnode.lock 2>/dev/null || exec 8>/tmp/bio-exporter-realnode.lock
flock 8
exec python3 -m pytest -q -rs -p no:cacheprovider tests/realnode "$@"
