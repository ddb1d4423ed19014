// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/*
 * Block-IO latency and size, counted into per-device, per-operation log2 histograms.
 *
 * Latency is the seed's interval: from issue to the driver until completion. Request-based
 * devices (blk-mq: sd, nvme, vd, loop) are measured at the request tracepoints; bio-based devices
 * (zram, device-mapper, md) never make requests, so they are measured at the bio tracepoints.
 *
 * One object holds every attach mode; the agent enables the programs of exactly one mode before
 * loading (node-agent/src/bpf/programs.rs lists each mode's programs, attach.rs loads and
 * attaches them; maps.rs reads what they count). Programs only count into slots: naming devices
 * and operations, filtering and formatting happen in user space at scrape time.
 */
#include "kernel_types.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "bio_types.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define NSEC_PER_USEC 1000ULL
#define BYTES_PER_KIB 1024ULL
#define SECTOR_SHIFT 9
#define REQ_OP_MASK 0xffU
/* dev_t as the kernel keeps it internally (MKDEV), not the 8/8 user-space encoding. */
#define MINORBITS 20
#define MKDEV(ma, mi) (((__u32)(ma) << MINORBITS) | (__u32)(mi))

/* In-flight tables: sized for deep queues on many disks; overflow is counted, never silent. */
#define MAX_INFLIGHT 65536
#define MAX_PARTIALS 4096
/* Device/operation pairs: 2048 disks x 8 operations before LOST_HIST_MAP_FULL (storage nodes
 * have hundreds of disks; entries are allocated on use, BPF_F_NO_PREALLOC, so room costs nothing). */
#define MAX_HIST_KEYS 16384
/* Sentinel for queue_flag_stats_bit: the agent could not resolve QUEUE_FLAG_STATS from BTF. */
#define QUEUE_FLAG_UNKNOWN 0xffffffffU
/* Sentinel for rqf_io_stat_bit: no __RQF_IO_STAT in the kernel's BTF. */
#define RQF_BIT_UNKNOWN 0xffffffffU

/*
 * Set by the agent before load. QUEUE_FLAG_STATS is an enumerator of an anonymous enum, so CO-RE
 * cannot relocate it; the agent finds its value in the kernel's BTF.
 */
const volatile __u32 queue_flag_stats_bit = QUEUE_FLAG_UNKNOWN;
/*
 * Bit of __RQF_IO_STAT in request.rq_flags, likewise found by the agent in BTF (its enum was
 * anonymous until 2025; older kernels had #defines): set on the requests the kernel accounts in
 * /sys/block/DEV/stat.
 */
const volatile __u32 rqf_io_stat_bit = RQF_BIT_UNKNOWN;

/* Classic tracepoints: field offsets read by the agent from tracefs format files. */
struct tp_fields {
	__u32 dev;
	__u32 sector;
	__u32 nr_sector;
	__u32 bytes; /* issue only */
	__u32 error; /* complete only */
	__u32 rwbs;
};
const volatile struct tp_fields tp_issue_fields = {};
const volatile struct tp_fields tp_complete_fields = {};

/* Where an IO started; keyed by request or bio pointer, or (dev, sector) in classic mode. */
struct start_key {
	__u64 id;
	__u32 dev;
	__u32 pad;
};

struct start_val {
	__u64 ts_ns;
	__u32 bytes; /* bio and classic modes: size at issue */
	__u32 op;
	__u32 dev;
	__u32 done_bytes; /* classic mode: bytes already completed by partial completions */
};

/*
 * A request that completed partially: what it carried so far, and when it was first issued.
 * Keyed by the request's address, which the block layer reuses for later requests; `alloc_ns`
 * (the request's allocation stamp) tells an entry of this request from one left behind by an
 * earlier request whose last step the kernel never showed us (node-agent/src/bpf/recursion.rs).
 */
struct partial_val {
	__u64 first_start_ns;
	__u64 alloc_ns;
	__u32 done_bytes;
	__u32 failed;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_INFLIGHT);
	__type(key, struct start_key);
	__type(value, struct start_val);
} starts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PARTIALS);
	__type(key, __u64);
	__type(value, struct partial_val);
} partials SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, MAX_HIST_KEYS);
	/* Allocate per pair on first IO: preallocating MAX_HIST_KEYS x 1568 bytes per CPU (24 MiB)
	 * would waste memory. */
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct hist_key);
	__type(value, struct hist);
} hists SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, LOST_REASONS);
	__type(key, __u32);
	__type(value, __u64);
} lost_events SEC(".maps");

/*
 * Entries in starts/partials. While zero, a completion that carries its own issue time skips the
 * hash lookup: the common case costs no map operation besides the histogram.
 */
__u64 start_entries = 0;
__u64 partial_entries = 0;
/*
 * Classic tracepoint mode: write completions of no sectors left out (tp_rq_complete()). Some of
 * them are writes /sys/block/DEV/stat counts; user space takes them off what it finds missing
 * when it compares with stat, so they are not reported lost.
 */
__u64 classic_empty_writes = 0;

static struct hist zero_hist;

/*
 * Read by no program. The agent's Rust types are generated from this object's BTF, and BTF holds
 * only the types something in the object is declared with: these two enums are otherwise used as
 * constants only. This variable puts them there for 8 bytes of .rodata, a map the object has
 * anyway: no instruction, no map, nothing per IO. The lost_events array cannot be keyed by enum
 * lost_reason instead: the kernel takes only an integer as an array map's key type.
 */
static const struct abi_enums {
	enum lost_reason lost_reason;
	enum classic_op classic_op;
} abi_enums __attribute__((used));

static __always_inline void count_lost(__u32 reason)
{
	__u64 *n = bpf_map_lookup_elem(&lost_events, &reason);

	if (n)
		*n += 1;
}

/* floor(log2(v)) for v > 0, by halving the search range: no loops for the verifier. */
static __always_inline __u32 log2_floor(__u64 v)
{
	__u32 r = 0, shift;

	shift = (v > 0xffffffffULL) << 5; v >>= shift; r |= shift;
	shift = (v > 0xffff) << 4; v >>= shift; r |= shift;
	shift = (v > 0xff) << 3; v >>= shift; r |= shift;
	shift = (v > 0xf) << 2; v >>= shift; r |= shift;
	shift = (v > 0x3) << 1; v >>= shift; r |= shift;
	r |= (v >> 1);
	return r;
}

/*
 * The slot whose bound 2^k (in units) is the smallest one >= value: an upper-inclusive bucket,
 * so that "le" is a true upper bound. value/unit is rounded up first because the bound is an
 * integer: v <= 2^k exactly when ceil(v) <= 2^k.
 */
static __always_inline __u64 slot_of(__u64 value, __u64 unit)
{
	__u64 units = (value + unit - 1) / unit;
	__u64 slot = units <= 1 ? 0 : (__u64)log2_floor(units - 1) + 1;

	/* Never above 54 for a u64 of nanoseconds; the mask proves the bound to the verifier. */
	if (slot >= LOG2_SLOTS)
		slot = LOG2_SLOTS - 1;
	return slot & (LOG2_SLOTS - 1);
}

/* Returns the pair's value, for observe_queue(), or NULL when the IO was lost. */
static __always_inline struct hist *observe(__u32 dev, __u32 op, __u64 latency_ns, __u64 bytes,
					    bool failed)
{
	struct hist_key key = { .dev = dev, .op = op };
	struct hist *h;

	h = bpf_map_lookup_elem(&hists, &key);
	if (!h) {
		/* EEXIST means another CPU created the pair first: the lookup below finds it. */
		bpf_map_update_elem(&hists, &key, &zero_hist, BPF_NOEXIST);
		h = bpf_map_lookup_elem(&hists, &key);
		if (!h) {
			count_lost(LOST_HIST_MAP_FULL);
			return NULL;
		}
	}
	/* Per-CPU values: plain increments, no atomics. */
	h->latency_slots[slot_of(latency_ns, NSEC_PER_USEC)] += 1;
	h->size_slots[slot_of(bytes, BYTES_PER_KIB)] += 1;
	h->latency_sum_ns += latency_ns;
	h->size_sum_bytes += bytes;
	if (failed)
		h->errors += 1;
	return h;
}

static __always_inline void remember_start(struct start_key *key, struct start_val *val)
{
	struct start_val *old = bpf_map_lookup_elem(&starts, key);

	if (old) {
		/* Re-issued (requeued) request: restart its clock, no new entry. */
		*old = *val;
		return;
	}
	if (bpf_map_update_elem(&starts, key, val, BPF_NOEXIST)) {
		count_lost(LOST_START_MAP_FULL);
		return;
	}
	__sync_fetch_and_add(&start_entries, 1);
}

/* Looks up and removes an entry; returns false when there was none. */
static __always_inline bool take_start(struct start_key *key, struct start_val *out)
{
	struct start_val *v = bpf_map_lookup_elem(&starts, key);

	if (!v)
		return false;
	*out = *v;
	if (bpf_map_delete_elem(&starts, key) == 0)
		__sync_fetch_and_add(&start_entries, -1);
	return true;
}

/* ---- Request-based devices: mode-independent logic on values already read from the request */

/*
 * Request fields read only at the zero-byte end step of a write (see rq_completed()). A flavor
 * of struct request (CO-RE drops the ___ suffix), so that kernel_types.h stays as it is.
 */
enum mq_rq_state {
	MQ_RQ_IDLE = 0,
};

struct request___end_step {
	__u32 rq_flags; /* req_flags_t */
	enum mq_rq_state state;
} __attribute__((preserve_access_index));

struct rq_at_complete {
	__u64 id;
	__u32 dev;
	__u32 op;
	__u32 remaining_bytes;
	__u64 io_start_ns;
	__u64 alloc_ns;
	/* Read only for a write's zero-byte end step: */
	bool never_issued; /* rq->state is MQ_RQ_IDLE: the driver never saw this request */
	bool alloc_stamped; /* alloc_ns (rq->start_time_ns) was stamped for this request */
	__u64 queued_ns; /* rq->start_time_ns if stamped for this request, else 0 (rq_queued_at()) */
};

/* A partial entry of this very request, not a leftover of an earlier one at the same address. */
static __always_inline bool same_request(const struct partial_val *p, const struct rq_at_complete *rq)
{
	/* Without allocation stamps the address is all there is. */
	return p->alloc_ns == rq->alloc_ns;
}

static __always_inline bool queue_keeps_stats(unsigned long queue_flags)
{
	if (queue_flag_stats_bit == QUEUE_FLAG_UNKNOWN)
		return false;
	return (queue_flags >> (queue_flag_stats_bit & 63)) & 1;
}

/*
 * The kernel stamps io_start_time_ns right after this tracepoint when the queue keeps stats; then
 * the completion reads it and no table is needed. Flushes are not stamped, and neither is any
 * request of a queue without stats: only those pay for a start-table entry.
 */
static __always_inline void rq_issued(__u64 id, unsigned long queue_flags, __u32 cmd_flags)
{
	if (queue_keeps_stats(queue_flags) &&
	    (cmd_flags & REQ_OP_MASK) != bpf_core_enum_value(enum req_op, REQ_OP_FLUSH))
		return;

	struct start_key key = { .id = id };
	struct start_val val = { .ts_ns = bpf_ktime_get_ns() };

	remember_start(&key, &val);
}

/* The completion that rq_completed() must look closer at: a write ending with no bytes left. */
static __always_inline bool is_write_end_step(__u32 op, __u32 remaining_bytes, __u32 nr_bytes)
{
	return nr_bytes == 0 && remaining_bytes == 0 &&
	       op == bpf_core_enum_value(enum req_op, REQ_OP_WRITE);
}

/*
 * Whether rq->start_time_ns belongs to this request. Recent kernels (6.18 here) stamp it only in
 * blk_account_io_start(), for the requests they account in /sys/block/DEV/stat (RQF_IO_STAT), and
 * otherwise leave what the last request in that slot had (seen: a value minutes old), so the flag
 * decides. Kernels whose BTF has no __RQF_IO_STAT (RQF_* were #defines) stamp at allocation and
 * zero the stamp when they take none.
 */
static __always_inline bool start_time_is_stamped(__u32 rq_flags, __u64 start_time_ns)
{
	if (rqf_io_stat_bit == RQF_BIT_UNKNOWN)
		return start_time_ns != 0;
	return (rq_flags >> (rqf_io_stat_bit & 31)) & 1;
}

/* ---- Queue time: kept apart from the service-time logic above, read at the same completion */

/*
 * When the request began to wait for issue, or 0 when the kernel left no stamp of its own on it.
 * rq->start_time_ns is stamped where the bio becomes a request (blk_account_io_start(), or at
 * allocation on kernels whose RQF_* are #defines), only for requests accounted in
 * /sys/block/DEV/stat; on other requests it is a previous request's value or 0
 * (start_time_is_stamped()). An unstamped request is not counted: never a stale interval.
 */
static __always_inline __u64 rq_queued_at(__u32 rq_flags, __u64 start_time_ns)
{
	if (start_time_ns == 0 || !start_time_is_stamped(rq_flags, start_time_ns))
		return 0;
	return start_time_ns;
}

/*
 * Counts the time from queued_ns until issued_ns (the issue time the latency was measured from)
 * into the pair's queue slots. A stamp after the issue time cannot be this request's wait: the
 * block layer caches its clock per plug, and a request made by one task and issued under another
 * task's older cached time shows that (README, "Queue time"); not counted.
 */
static __always_inline void observe_queue(struct hist *h, __u64 queued_ns, __u64 issued_ns)
{
	if (!h || queued_ns == 0 || queued_ns > issued_ns)
		return;

	__u64 queue_ns = issued_ns - queued_ns;

	h->queue_slots[slot_of(queue_ns, NSEC_PER_USEC)] += 1;
	h->queue_sum_ns += queue_ns;
}

/*
 * A write ending with no bytes left is one of two things, and rq->bio does not tell them apart
 * (blk_flush_restore_request() puts the bio back before the last end step in both):
 *  - the end step of a data write with PREFLUSH/FUA: its data completed earlier (observed then) and
 *    the flush sequence now ends the request again. Not another IO: /sys/block/DEV/stat does not
 *    count it either. The request went to the driver for its data step, so its state is no longer
 *    MQ_RQ_IDLE (MQ_RQ_COMPLETE, or MQ_RQ_IN_FLIGHT for drivers that end requests directly).
 *  - an empty write with PREFLUSH (fsync, sync: blkdev_issue_flush()): the flush runs as a request of
 *    its own (counted as a flush), and this request is ended without ever being issued to the
 *    driver, still MQ_RQ_IDLE. /sys/block/DEV/stat counts it as a write of 0 sectors, and so do
 *    we. It has no issue time; its latency is from rq->start_time_ns, when the kernel made it a
 *    request (the interval /sys/block/DEV/stat adds to its write ticks): the wait for its flush.
 *    Without a stamp of its own it is counted lost (no_start_time), never given a stale one.
 * Kernels without rq->state (before 4.18) cannot tell: both are left out there.
 */
static __always_inline void rq_write_end_step(struct rq_at_complete *rq, int error)
{
	if (!rq->never_issued)
		return;

	__u64 now = bpf_ktime_get_ns();

	if (!rq->alloc_stamped || rq->alloc_ns == 0 || rq->alloc_ns > now) {
		count_lost(LOST_NO_START_TIME);
		return;
	}
	observe(rq->dev, rq->op, now - rq->alloc_ns, 0, error != 0);
}

/*
 * block_rq_complete fires once per completion step; a partial step (fewer bytes than remain) is
 * carried in `partials` and the request is observed once, at its last step, with every byte it
 * carried and the time since it was first issued.
 */
static __always_inline void rq_completed(struct rq_at_complete *rq, __u32 nr_bytes, int error)
{
	if (is_write_end_step(rq->op, rq->remaining_bytes, nr_bytes)) {
		rq_write_end_step(rq, error);
		return;
	}

	__u64 now = bpf_ktime_get_ns();
	__u64 start_ns = rq->io_start_ns;
	__u32 bytes = nr_bytes;
	bool failed = error != 0;

	if (start_entries || start_ns == 0) {
		struct start_key key = { .id = rq->id };
		struct start_val v;

		if (take_start(&key, &v) && start_ns == 0)
			start_ns = v.ts_ns;
	}

	if (nr_bytes < rq->remaining_bytes) {
		struct partial_val *p = bpf_map_lookup_elem(&partials, &rq->id);

		if (p && same_request(p, rq)) {
			p->done_bytes += nr_bytes;
			p->failed |= failed;
			return;
		}
		struct partial_val init = {
			.first_start_ns = start_ns,
			.alloc_ns = rq->alloc_ns,
			.done_bytes = nr_bytes,
			.failed = failed,
		};
		/* A leftover is replaced in place: the entry count stays. */
		if (p) {
			*p = init;
			return;
		}
		if (bpf_map_update_elem(&partials, &rq->id, &init, BPF_NOEXIST) == 0)
			__sync_fetch_and_add(&partial_entries, 1);
		else
			count_lost(LOST_PARTIAL_MAP_FULL);
		return;
	}

	if (partial_entries) {
		struct partial_val *p = bpf_map_lookup_elem(&partials, &rq->id);

		if (p) {
			if (same_request(p, rq)) {
				bytes += p->done_bytes;
				failed |= p->failed;
				if (p->first_start_ns)
					start_ns = p->first_start_ns;
			}
			if (bpf_map_delete_elem(&partials, &rq->id) == 0)
				__sync_fetch_and_add(&partial_entries, -1);
		}
	}

	if (start_ns == 0 || start_ns > now) {
		count_lost(LOST_NO_START_TIME);
		return;
	}
	struct hist *h = observe(rq->dev, rq->op, now - start_ns, bytes, failed);

	observe_queue(h, rq->queued_ns, start_ns);
}

/* ---- Bio-based devices */

static __always_inline void bio_queued(__u64 id, __u32 dev, __u32 opf, __u32 size)
{
	struct start_key key = { .id = id };
	struct start_val val = {
		.ts_ns = bpf_ktime_get_ns(),
		.bytes = size,
		.op = opf & REQ_OP_MASK,
		.dev = dev,
	};

	remember_start(&key, &val);
}

static __always_inline void bio_completed(__u64 id, int status)
{
	struct start_key key = { .id = id };
	struct start_val v;

	/*
	 * Bios of request-based disks were never remembered: nothing to do for them. With no entry
	 * in the table at all (the common case on a host without bio-based IO in flight), they skip
	 * the hash lookup too.
	 */
	if (!start_entries || !take_start(&key, &v))
		return;
	observe(v.dev, v.op, bpf_ktime_get_ns() - v.ts_ns, v.bytes, status != 0);
}

/* ---- tp_btf: typed arguments, direct (CO-RE relocated) loads; the cheapest mode */

SEC("tp_btf/block_rq_issue")
int BPF_PROG(btf_rq_issue, struct request *rq)
{
	rq_issued((__u64)rq, rq->q->queue_flags, rq->cmd_flags);
	return 0;
}

SEC("tp_btf/block_rq_complete")
int BPF_PROG(btf_rq_complete, struct request *rq, int error, unsigned int nr_bytes)
{
	struct gendisk *disk = rq->q->disk;
	struct rq_at_complete c = {
		.id = (__u64)rq,
		.dev = MKDEV(disk->major, disk->first_minor),
		.op = rq->cmd_flags & REQ_OP_MASK,
		.remaining_bytes = rq->__data_len,
		.io_start_ns = rq->io_start_time_ns,
		.alloc_ns = rq->start_time_ns,
		.queued_ns = rq_queued_at(((struct request___end_step *)rq)->rq_flags,
					  rq->start_time_ns),
	};

	if (is_write_end_step(c.op, c.remaining_bytes, nr_bytes) &&
	    bpf_core_field_exists(((struct request___end_step *)rq)->state)) {
		struct request___end_step *r = (void *)rq;

		c.never_issued = r->state == bpf_core_enum_value(enum mq_rq_state, MQ_RQ_IDLE);
		c.alloc_stamped = start_time_is_stamped(r->rq_flags, c.alloc_ns);
	}
	rq_completed(&c, nr_bytes, error);
	return 0;
}

SEC("tp_btf/block_bio_queue")
int BPF_PROG(btf_bio_queue, struct bio *bio)
{
	struct gendisk *disk = bio->bi_bdev->bd_disk;

	if (disk->queue->mq_ops)
		return 0;
	bio_queued((__u64)bio, MKDEV(disk->major, disk->first_minor), bio->bi_opf,
		   bio->bi_iter.bi_size);
	return 0;
}

SEC("tp_btf/block_bio_complete")
int BPF_PROG(btf_bio_complete, struct request_queue *q, struct bio *bio)
{
	bio_completed((__u64)bio, bio->bi_status);
	return 0;
}

/* ---- raw_tp and kprobe: untyped pointers, every load through bpf_probe_read_kernel */

static __always_inline void core_rq_issue(struct request *rq)
{
	rq_issued((__u64)rq, BPF_CORE_READ(rq, q, queue_flags), BPF_CORE_READ(rq, cmd_flags));
}

/* rq_queued_at() through probe reads: two more reads per completion in raw_tp and kprobe modes. */
static __always_inline __u64 core_rq_queued_at(struct request *rq)
{
	return rq_queued_at(BPF_CORE_READ((struct request___end_step *)rq, rq_flags),
			    BPF_CORE_READ(rq, start_time_ns));
}

static __always_inline void core_rq_complete(struct request *rq, int error, unsigned int nr_bytes)
{
	struct gendisk *disk = BPF_CORE_READ(rq, q, disk);
	struct rq_at_complete c = {
		.id = (__u64)rq,
		.dev = MKDEV(BPF_CORE_READ(disk, major), BPF_CORE_READ(disk, first_minor)),
		.op = BPF_CORE_READ(rq, cmd_flags) & REQ_OP_MASK,
		.remaining_bytes = BPF_CORE_READ(rq, __data_len),
		.io_start_ns = BPF_CORE_READ(rq, io_start_time_ns),
	};

	/*
	 * Only partial completions compare allocation stamps, and only a write's zero-byte end step
	 * needs the state and flags: spare every other IO the reads.
	 */
	if (partial_entries || nr_bytes < c.remaining_bytes)
		c.alloc_ns = BPF_CORE_READ(rq, start_time_ns);
	if (is_write_end_step(c.op, c.remaining_bytes, nr_bytes) &&
	    bpf_core_field_exists(((struct request___end_step *)rq)->state)) {
		struct request___end_step *r = (void *)rq;

		c.alloc_ns = BPF_CORE_READ(rq, start_time_ns);
		c.never_issued = BPF_CORE_READ(r, state) ==
				 bpf_core_enum_value(enum mq_rq_state, MQ_RQ_IDLE);
		c.alloc_stamped = start_time_is_stamped(BPF_CORE_READ(r, rq_flags), c.alloc_ns);
	}

	c.queued_ns = core_rq_queued_at(rq);
	rq_completed(&c, nr_bytes, error);
}

SEC("raw_tp/block_rq_issue")
int BPF_PROG(raw_rq_issue, struct request *rq)
{
	core_rq_issue(rq);
	return 0;
}

SEC("raw_tp/block_rq_complete")
int BPF_PROG(raw_rq_complete, struct request *rq, int error, unsigned int nr_bytes)
{
	core_rq_complete(rq, error, nr_bytes);
	return 0;
}

SEC("raw_tp/block_bio_queue")
int BPF_PROG(raw_bio_queue, struct bio *bio)
{
	struct gendisk *disk = BPF_CORE_READ(bio, bi_bdev, bd_disk);

	if (BPF_CORE_READ(disk, queue, mq_ops))
		return 0;
	bio_queued((__u64)bio, MKDEV(BPF_CORE_READ(disk, major), BPF_CORE_READ(disk, first_minor)),
		   BPF_CORE_READ(bio, bi_opf), BPF_CORE_READ(bio, bi_iter.bi_size));
	return 0;
}

SEC("raw_tp/block_bio_complete")
int BPF_PROG(raw_bio_complete, struct request_queue *q, struct bio *bio)
{
	bio_completed((__u64)bio, BPF_CORE_READ(bio, bi_status));
	return 0;
}

/*
 * kprobe: the seed's original method, for kernels without tracepoint BTF. blk_mq_start_request is
 * where a request is issued; blk_update_request is where block_rq_complete fires.
 */
SEC("kprobe/blk_mq_start_request")
int BPF_KPROBE(kp_rq_issue, struct request *rq)
{
	core_rq_issue(rq);
	return 0;
}

SEC("kprobe/blk_update_request")
int BPF_KPROBE(kp_rq_complete, struct request *rq, int error, unsigned int nr_bytes)
{
	core_rq_complete(rq, error, nr_bytes);
	return 0;
}

/* ---- Classic tracepoints: no kernel BTF needed, no request pointer, so keyed by (dev, sector) */

/* Reads a field of the tracepoint record at an offset only known at load time. */
#define TP_FIELD(ctx, off, dst) bpf_probe_read_kernel(&(dst), sizeof(dst), (void *)(ctx) + (off))

#define RWBS_LEN 8

/*
 * rwbs is "[F]<op>[F][A][S][M]": a leading F is a preflush of the op after it; R, W, D name
 * read, write and discard; a lone F is a flush. Anything else (N: write_zeroes, zone ops...) cannot
 * be told apart here and is "other".
 */
static __always_inline __u32 classic_op(const char *rwbs)
{
	char c = rwbs[0];

	if (c == 'F') {
		c = rwbs[1];
		if (c != 'R' && c != 'W' && c != 'D')
			return CLASSIC_OP_FLUSH;
	}
	switch (c) {
	case 'R':
		return CLASSIC_OP_READ;
	case 'W':
		return CLASSIC_OP_WRITE;
	case 'D':
		return CLASSIC_OP_DISCARD;
	default:
		return CLASSIC_OP_OTHER;
	}
}

/* Requests without a position (flushes) report sector 0 at issue but -1 at completion. */
#define NO_SECTOR (~0ULL)
static __always_inline __u64 normalize_sector(__u64 sector)
{
	return sector == NO_SECTOR ? 0 : sector;
}

static __always_inline __u32 classic_op_at(void *ctx, __u32 rwbs_offset)
{
	char rwbs[RWBS_LEN] = {};

	TP_FIELD(ctx, rwbs_offset, rwbs);
	return classic_op(rwbs);
}

SEC("tracepoint/block/block_rq_issue")
int tp_rq_issue(void *ctx)
{
	struct start_key key = {};
	struct start_val val = {};
	struct start_val *old;
	char rwbs[RWBS_LEN] = {};
	__u64 sector = 0;

	TP_FIELD(ctx, tp_issue_fields.dev, key.dev);
	TP_FIELD(ctx, tp_issue_fields.sector, sector);
	TP_FIELD(ctx, tp_issue_fields.bytes, val.bytes);
	TP_FIELD(ctx, tp_issue_fields.rwbs, rwbs);
	key.id = normalize_sector(sector);

	/* A request re-issued after a partial completion continues: keep its start and bytes. */
	old = bpf_map_lookup_elem(&starts, &key);
	if (old && old->done_bytes)
		return 0;
	val.ts_ns = bpf_ktime_get_ns();
	val.op = classic_op(rwbs);
	val.dev = key.dev;
	remember_start(&key, &val);
	return 0;
}

SEC("tracepoint/block/block_rq_complete")
int tp_rq_complete(void *ctx)
{
	struct start_key key = {};
	struct start_val v;
	__u64 sector = 0;
	__u32 nr_sector = 0;
	int error = 0;
	__u32 bytes;

	TP_FIELD(ctx, tp_complete_fields.dev, key.dev);
	TP_FIELD(ctx, tp_complete_fields.sector, sector);
	TP_FIELD(ctx, tp_complete_fields.nr_sector, nr_sector);
	TP_FIELD(ctx, tp_complete_fields.error, error);
	key.id = normalize_sector(sector);

	/*
	 * A write ending with no sectors: the end step of a data write's flush sequence, or an empty
	 * PREFLUSH write (see rq_write_end_step()). The record (a "W" rwbs, no sectors, no request
	 * pointer) is alike for both, so both are left out: this mode does not count the empty
	 * writes that /sys/block/DEV/stat counts (README, "What is measured, exactly").
	 */
	if (nr_sector == 0 && classic_op_at(ctx, tp_complete_fields.rwbs) == CLASSIC_OP_WRITE) {
		__sync_fetch_and_add(&classic_empty_writes, 1);
		return 0;
	}

	if (!take_start(&key, &v)) {
		count_lost(LOST_NO_START_TIME);
		return 0;
	}
	bytes = v.done_bytes + (nr_sector << SECTOR_SHIFT);
	if (bytes < v.bytes) {
		/* Partial: the rest continues at the next sector; carry what is done there. */
		key.id = sector + nr_sector;
		v.done_bytes = bytes;
		remember_start(&key, &v);
		return 0;
	}
	observe(v.dev, v.op, bpf_ktime_get_ns() - v.ts_ns, v.bytes ? v.bytes : bytes, error != 0);
	return 0;
}
