/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * The few kernel structures the programs read, instead of a multi-megabyte generated vmlinux.h.
 * preserve_access_index makes every access a CO-RE relocation: libbpf rewrites the offsets to the
 * running kernel's layout from its BTF, so only the field names and sizes must be right.
 */
#ifndef KERNEL_TYPES_H
#define KERNEL_TYPES_H

/* Tells bpf_tracing.h to use the kernel's pt_regs field names (di, si, ...), defined below. */
#define __VMLINUX_H__

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef signed char __s8;
typedef short __s16;
typedef int __s32;
typedef long long __s64;
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u32 __wsum;
typedef _Bool bool;
#define true 1
#define false 0

enum bpf_map_type {
	BPF_MAP_TYPE_HASH = 1,
	BPF_MAP_TYPE_ARRAY = 2,
	BPF_MAP_TYPE_PERCPU_HASH = 5,
	BPF_MAP_TYPE_PERCPU_ARRAY = 6,
};

enum {
	BPF_ANY = 0,
	BPF_NOEXIST = 1,
	BPF_EXIST = 2,
	BPF_F_NO_PREALLOC = 1,
};

#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)

struct pt_regs {
	unsigned long r15, r14, r13, r12, bp, bx, r11, r10, r9, r8, ax, cx, dx, si, di, orig_ax, ip,
		cs, flags, sp, ss;
};

struct blk_mq_ops;

struct gendisk {
	int major;
	int first_minor;
	struct request_queue *queue;
};

struct request_queue {
	unsigned long queue_flags;
	const struct blk_mq_ops *mq_ops; /* NULL for bio-based drivers (zram, dm, md) */
	struct gendisk *disk;
};

struct block_device {
	__u32 bd_dev;
	struct gendisk *bd_disk;
};

struct request {
	struct request_queue *q;
	__u32 cmd_flags;      /* blk_opf_t: REQ_OP_* in the low bits, flags above */
	unsigned int __data_len; /* bytes not yet completed */
	__u64 start_time_ns;    /* allocation time (0 when the queue keeps no time stamps) */
	__u64 io_start_time_ns; /* issue time, set only while the queue keeps stats */
};

struct bvec_iter {
	__u64 bi_sector;
	unsigned int bi_size;
};

struct bio {
	struct block_device *bi_bdev;
	__u32 bi_opf;
	__u8 bi_status;
	struct bvec_iter bi_iter;
};

#pragma clang attribute pop

/* Named in the kernel; CO-RE resolves each value on the running kernel (they moved in 5.x). */
enum req_op {
	REQ_OP_READ = 0,
	REQ_OP_WRITE = 1,
	REQ_OP_FLUSH = 2,
	REQ_OP_DISCARD = 3,
};

#endif
