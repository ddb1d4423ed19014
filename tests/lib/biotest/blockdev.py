"""Block devices of the tests' own (loop devices on /dev/shm files, hot-added zram), their
/sys/block stat, O_DIRECT IO on them, and the kernel's own count of their completions.

Only devices made here are touched, and each is removed again: never an existing one.
"""
import contextlib
import fcntl
import mmap
import os
import tempfile
import time

import pytest

from .util import sh

# /sys/block/DEV/stat columns (Documentation/block/stat.rst).
STAT_FIELDS = [
    "read_ios", "read_merges", "read_sectors", "read_ticks",
    "write_ios", "write_merges", "write_sectors", "write_ticks",
    "in_flight", "io_ticks", "time_in_queue",
    "discard_ios", "discard_merges", "discard_sectors", "discard_ticks",
    "flush_ios", "flush_ticks",
]


def read_stat(dev):
    with open(f"/sys/block/{dev}/stat") as f:
        values = [int(v) for v in f.read().split()]
    return dict(zip(STAT_FIELDS, values))


def stat_delta(before, after):
    return {k: after[k] - before[k] for k in before}


class LoopDevice:
    def __init__(self, size_bytes, direct_io=True, partscan=False, prefix="bio-test-"):
        fd, self.backing = tempfile.mkstemp(prefix=prefix, suffix=".img", dir="/dev/shm")
        os.close(fd)
        os.truncate(self.backing, size_bytes)
        args = ["losetup", "--find", "--show"]
        if direct_io:
            args.append("--direct-io=on")
        if partscan:  # partitions may be added (addpart); detaching drops them
            args.append("--partscan")
        self.path = sh(*args, self.backing).stdout.strip()
        self.name = os.path.basename(self.path)

    def detach(self):
        sh("losetup", "-d", self.path, check=False)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.backing)


LOOP_CTL_REMOVE = 0x4C81  # linux/loop.h


@contextlib.contextmanager
def loop_devices(n, size_bytes=1 << 20, prefix="bio-bench-"):
    """n loop devices made by this call only (losetup --find asks /dev/loop-control for a free or
    new one), and only those detached again; the device nodes the kernel created for them are
    removed too, so a 1024-device run leaves no 1000 empty disks behind (each would be one more
    disk for every agent on the host)."""
    existed = {d for d in os.listdir("/sys/block") if d.startswith("loop")}
    devs = []
    try:
        for _ in range(n):
            devs.append(LoopDevice(size_bytes, prefix=prefix))
        yield devs
    finally:
        for d in devs:
            d.detach()
        remove_new_loop_nodes([d.name for d in devs], existed)


def remove_new_loop_nodes(names, existed):
    """LOOP_CTL_REMOVE for the loop nodes in `names` that were not there before; busy ones stay."""
    ctl = os.open("/dev/loop-control", os.O_RDWR)
    try:
        for name in names:
            if name not in existed:
                with contextlib.suppress(OSError):
                    fcntl.ioctl(ctl, LOOP_CTL_REMOVE, int(name[len("loop"):]))
    finally:
        os.close(ctl)


def direct_io(path, op, block_size, count, offset=0):
    """O_DIRECT reads or writes of exactly block_size bytes each."""
    flag = "iflag=direct" if op == "read" else "oflag=direct"
    src, dst = (path, "/dev/null") if op == "read" else ("/dev/zero", path)
    skip = f"skip={offset // block_size}" if op == "read" else f"seek={offset // block_size}"
    sh("dd", f"if={src}", f"of={dst}", f"bs={block_size}", f"count={count}", skip, flag, "status=none")


def read_and_write_once(dev_path):
    """One 16 KiB direct read and write, so the device has read and write series. In-process
    (an aligned mmap buffer for O_DIRECT) instead of two dd runs: 1024 devices would cost 2048
    processes."""
    buf = mmap.mmap(-1, 16 << 10)
    fd = os.open(dev_path, os.O_RDWR | os.O_DIRECT)
    try:
        os.preadv(fd, [buf], 0)
        os.pwritev(fd, [buf], 0)
    finally:
        os.close(fd)
        buf.close()


def wait_idle(dev, quiet=0.5, timeout=20.0):
    """/sys/block/DEV/stat once nothing is in flight and no counter has moved for `quiet` seconds.

    Nothing else on the test machine opens the tests' loop devices (no udev to run blkid after a
    close-after-write), so a quiet device stays quiet while the agent is read.
    """
    deadline = time.time() + timeout
    last, still_since = read_stat(dev), time.time()
    while time.time() < deadline:
        time.sleep(0.05)
        now = read_stat(dev)
        if now != last or now["in_flight"]:
            last, still_since = now, time.time()
        elif time.time() - still_since >= quiet:
            return now
    raise AssertionError(f"{dev} did not go idle within {timeout}s: {last}")


@contextlib.contextmanager
def ext4_mounted(loop, mnt, mkfs_options="lazy_itable_init=0,lazy_journal_init=0"):
    """A fresh ext4 on the loop device, mounted on `mnt` (made here) while the block runs."""
    sh("mkfs.ext4", "-q", "-E", mkfs_options, loop.path)
    mnt.mkdir()
    sh("mount", loop.path, str(mnt))
    try:
        yield mnt
    finally:
        sh("umount", str(mnt))


ZRAM_CONTROL = "/sys/class/zram-control"


class ZramDevices:
    """zram devices hot-added on demand (after an agent started, say), sized or not; remove()
    resets and hot-removes exactly those."""

    def __init__(self):
        if not os.path.exists(f"{ZRAM_CONTROL}/hot_add"):
            pytest.skip("SKIPPED LOUDLY: no zram-control in sysfs (kernel without CONFIG_ZRAM)")
        self.added = []

    def add(self, size_bytes=64 << 20):
        with open(f"{ZRAM_CONTROL}/hot_add") as f:
            idx = int(f.read().strip())
        self.added.append(idx)
        name = f"zram{idx}"
        if size_bytes:
            with open(f"/sys/block/{name}/disksize", "w") as f:
                f.write(str(size_bytes))
        return name

    def remove(self):
        for idx in self.added:
            with contextlib.suppress(OSError):
                with open(f"/sys/block/zram{idx}/reset", "w") as f:
                    f.write("1")
            with contextlib.suppress(OSError):
                with open(f"{ZRAM_CONTROL}/hot_remove", "w") as f:
                    f.write(str(idx))


class CompletionTrace:
    """Counts block_rq_complete events of one disk in a tracefs instance of our own.

    The tracepoint the agent's programs run on, recorded by the kernel's own tracer: an
    independent count of completions per operation, to tell what the kernel completed from what
    the agent was shown.
    """

    OPS = {"R": "read", "W": "write", "D": "discard"}

    def __init__(self, dev_path):
        root = "/sys/kernel/tracing"
        if not os.path.isdir(f"{root}/events/block/block_rq_complete"):
            pytest.skip("SKIPPED LOUDLY: no block_rq_complete in tracefs (/sys/kernel/tracing): cannot count completions independently")
        self.dir = tempfile.mkdtemp(prefix="bio-test-", dir=f"{root}/instances")
        rdev = os.stat(dev_path).st_rdev
        kdev = (os.major(rdev) << 20) | os.minor(rdev)  # the kernel's dev_t, as the event records it
        self._write("buffer_size_kb", "65536")
        self._write("events/block/block_rq_complete/filter", f"dev == {kdev}")
        self._write("events/block/block_rq_complete/enable", "1")

    def _write(self, name, value):
        with open(f"{self.dir}/{name}", "w") as f:
            f.write(value)

    def clear(self):
        self._write("trace", "")

    def counts(self):
        """{operation: completions} since clear(); fails if the ring buffer dropped any event."""
        overruns = 0
        for cpu in os.listdir(f"{self.dir}/per_cpu"):
            with open(f"{self.dir}/per_cpu/{cpu}/stats") as f:
                overruns += sum(int(l.split()[1]) for l in f if l.startswith("overrun"))
        assert overruns == 0, f"tracefs dropped {overruns} events: the trace is not a complete count"
        counts = {"read": 0, "write": 0, "discard": 0, "flush": 0, "other": 0, "empty_write": 0}
        with open(f"{self.dir}/trace") as f:
            for line in f:
                if line.startswith("#") or "block_rq_complete:" not in line:
                    continue
                # "MAJ,MIN RWBS (cmd) SECTOR + NR_SECTORS ..."
                fields = line.split("block_rq_complete:", 1)[1].split()
                rwbs, nr = fields[1], int(fields[fields.index("+") + 1])
                op = self.OPS.get(rwbs.lstrip("F")[:1], "flush" if rwbs.startswith("F") else "other")
                if op == "write" and nr == 0:
                    op = "empty_write"  # a flush sequence's end step or an empty preflush write
                counts[op] += 1
        return counts

    def close(self):
        with contextlib.suppress(OSError):
            self._write("events/block/block_rq_complete/enable", "0")
        with contextlib.suppress(OSError):
            os.rmdir(self.dir)
