/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * Types shared by the BPF programs and the node-agent. The agent does not mirror them: build.rs
 * generates Rust types from this object's BTF (libbpf-cargo), and node-agent/src/snapshot.rs and
 * node-agent/src/ops.rs read the maps through those, so a change here fails the agent's build or
 * its unit tests until the agent follows.
 */
#ifndef BIO_TYPES_H
#define BIO_TYPES_H

/*
 * One slot per power of two of a 64-bit value. The kernel keeps all of them; the exporter folds
 * the slots above the largest classic bucket into +Inf only when it prints classic buckets, and
 * keeps them for native histograms.
 */
#define LOG2_SLOTS 64

/*
 * Operation codes in classic-tracepoint mode, where only the rwbs string names the operation.
 * They live above every REQ_OP value (REQ_OP_MASK is 8 bits), so one key space serves all modes.
 * An enum, not #defines, so that the agent's Rust type for them is generated from the object's
 * BTF (see abi_enums in bio.bpf.c).
 */
#define CLASSIC_OP_BASE 0x100
enum classic_op {
	CLASSIC_OP_READ = CLASSIC_OP_BASE + 0,
	CLASSIC_OP_WRITE = CLASSIC_OP_BASE + 1,
	CLASSIC_OP_FLUSH = CLASSIC_OP_BASE + 2,
	CLASSIC_OP_DISCARD = CLASSIC_OP_BASE + 3,
	CLASSIC_OP_OTHER = CLASSIC_OP_BASE + 0xff,
};

struct hist_key {
	__u32 dev; /* kernel dev_t of the whole disk: major << 20 | minor */
	__u32 op;  /* REQ_OP_* of the running kernel, or an enum classic_op */
};

struct hist {
	__u64 latency_slots[LOG2_SLOTS]; /* slot k: latency in (2^(k-1), 2^k] microseconds */
	__u64 size_slots[LOG2_SLOTS];    /* slot k: size in (2^(k-1), 2^k] KiB */
	__u64 latency_sum_ns;            /* nanoseconds, so the sum is not truncated per IO */
	__u64 size_sum_bytes;
	__u64 errors; /* completions with a non-zero status; also counted in the slots */
	/*
	 * Queue time of request-based IO: rq->start_time_ns (the bio became a request) until issue to
	 * the driver, slot k as latency_slots. Appended here rather than kept in a map of its own: the
	 * completion already holds this value, so the queue time costs two increments, not a second
	 * hash lookup per IO (docs/performance.md). Only requests with a valid stamp are counted, so
	 * the queue count can be below the latency count (README, "Queue time").
	 */
	__u64 queue_slots[LOG2_SLOTS];
	__u64 queue_sum_ns;
};

/* Why a measurement was lost; each reason is one slot of the lost_events array. */
enum lost_reason {
	LOST_START_MAP_FULL = 0,   /* no room to remember an issue time */
	LOST_NO_START_TIME = 1,    /* a completion whose issue time is unknown */
	LOST_HIST_MAP_FULL = 2,    /* no room for a new device/operation pair */
	LOST_PARTIAL_MAP_FULL = 3, /* no room to carry a partial completion's bytes */
	LOST_REASONS = 4,
};

#endif
