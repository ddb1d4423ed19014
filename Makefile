# bio-exporter: `make run` starts the node-agent on this host; `make test` runs every test.
SHELL := /bin/bash
export CARGO_TARGET_DIR ?= $(HOME)/.cache/bio-exporter/target
LISTEN ?= 0.0.0.0:9435
ARGS ?=
AGENT_DEBUG := $(CARGO_TARGET_DIR)/debug/node-agent
AGENT_RELEASE := $(CARGO_TARGET_DIR)/release/node-agent

.PHONY: deps build build-release static images tracefs run test test-unit test-node test-cluster test-prometheus test-real-node lint bench bench-pv-labels bench-scrape crds clean

deps:
	@scripts/install-deps.sh

build: deps
	cargo build --workspace --all-targets

build-release: deps
	cargo build --release -p node-agent

# The release build: both binaries fully static (glibc too) in dist/linux-amd64/, checked with
# ldd and started in an empty chroot. Release artefacts and the images are these files.
static:
	@scripts/install-deps.sh images
	scripts/build-static.sh

# The node-agent and operator images (node-agent/Dockerfile, operator/Dockerfile: FROM scratch +
# the static binary) with buildah, podman or docker (BUILDER=...), tagged as the chart's defaults,
# saved as archives in ~/.cache/bio-exporter/images/.
images: static
	scripts/build-images.sh

# Classic tracepoints need tracefs; mounting it is what a node's init normally does.
tracefs:
	@[ -d /sys/kernel/tracing/events/block ] || mount -t tracefs nodev /sys/kernel/tracing || true

run: build-release tracefs
	$(AGENT_RELEASE) --listen $(LISTEN) $(ARGS)

lint: deps
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

test-unit: build
	cargo test --workspace

test-node: build tracefs
	cd tests/node && BIO_AGENT_BIN=$(AGENT_DEBUG) python3 -m pytest -q -rs

# The real control plane (built from Go modules, cached outside the repo) and the operator
# against it: the chart's RBAC, reconcile, conditions, conflicts, leader election.
test-cluster: build
	tests/cluster/smoke.sh
	BIO_OPERATOR_BIN=$(CARGO_TARGET_DIR)/debug/bio-operator operator/tests/e2e.sh

# Real Prometheus servers (Debian's 2.42 and a 3.x built from its Go module, cached) scraping a
# real agent: classic and native histograms, PromQL on the stored data.
test-prometheus: build tracefs
	BIO_AGENT_BIN=$(AGENT_DEBUG) tests/prometheus/run.sh

# The user's path on a real kubelet (tests/cluster/up.sh --real-nodes 1): the images from
# `make images`, the chart's operator Deployment, the README's BioMonitor, agents as real pods,
# a PVC on a local PV, faults, and the host left as before. As root.
test-real-node: build images tracefs
	tests/realnode/run.sh

test: lint test-unit test-node test-prometheus test-cluster test-real-node

# The benchmarks (bench/: they print figures, they do not pass or fail), as root, on the release
# build; docs/performance*.md say what each measured. BENCH_ARGS go to the script (--help).

# BPF time per IO, IOPS with and without the agent, /metrics cost at 64/256/1024 devices
# (BENCH_SCALES=64 picks the device counts; BENCH_ARGS=--only-scrape skips the per-IO rows).
bench: build-release tracefs
	BIO_AGENT_BIN=$(AGENT_RELEASE) python3 bench/agent_cost.py $(BENCH_ARGS)

# PersistentVolume labels with 64 devices and 500 PVs in a real local API server (~15 min).
bench-pv-labels: build-release
	BIO_AGENT_BIN=$(AGENT_RELEASE) python3 bench/pv_labels.py $(BENCH_ARGS)

# What real Prometheus servers (Debian's 2.42, the cached 3.x) see scraping 64 devices.
bench-scrape: build-release tracefs
	BIO_PROMETHEUS3="$$(tests/prometheus/build.sh | tail -n 1)" BIO_AGENT_BIN=$(AGENT_RELEASE) \
		python3 bench/prometheus_scrape.py $(BENCH_ARGS)

# Both copies: crds/ (kubectl apply users) and the chart's crds/ (helm install).
crds:
	cargo run -q -p bio-operator --bin crdgen -- --update

clean:
	cargo clean
