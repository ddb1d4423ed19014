//! What the kernel counted, summed over CPUs: the input of every exporter view.
//!
//! Parsing is kept apart from map access so it is tested without a kernel. The layouts mirror
//! `struct hist_key`, `struct hist` and `enum lost_reason` in bpf/bio_types.h.

/// Slots per histogram (LOG2_SLOTS): one per power of two of a 64-bit value.
pub const LOG2_SLOTS: usize = 64;
/// The seed's part of `struct hist`: latency and size slots, their sums, errors.
const SEED_WORDS: usize = 2 * LOG2_SLOTS + 3;
/// Then the queue slots and their sum, appended so the seed's offsets stay.
const HIST_WORDS: usize = SEED_WORDS + LOG2_SLOTS + 1;
pub const HIST_VALUE_SIZE: usize = HIST_WORDS * 8;
pub const HIST_KEY_SIZE: usize = 8;

/// Exported as the `reason` label: the names of `enum lost_reason` (counted by the programs, in
/// the `lost_events` map), in order, then what the kernel counts for us, then the completions
/// user space finds missing (see unobserved.rs).
pub const LOST_REASONS: [&str; 6] = [
    "start_map_full",
    "no_start_time",
    "hist_map_full",
    "partial_map_full",
    "program_recursion",
    "unobserved_completion",
];
/// How many of LOST_REASONS the programs count (`LOST_REASONS` in bpf/bio_types.h).
pub const KERNEL_LOST_REASONS: usize = 4;
/// Index of the skipped nested runs (see bpf/recursion.rs) in LOST_REASONS.
pub const LOST_PROGRAM_RECURSION: usize = 4;
/// Index of the completions stat counted and the programs never ran for, in LOST_REASONS.
pub const LOST_UNOBSERVED: usize = 5;
/// Index of LOST_NO_START_TIME in LOST_REASONS.
pub const LOST_NO_START_TIME: usize = 1;

/// The kernel's in-flight tables, as the `table` label.
pub const INFLIGHT_TABLES: [&str; 2] = ["starts", "partials"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceOpHist {
    /// Kernel-internal dev_t of the whole disk.
    pub dev: u32,
    /// REQ_OP_* of the running kernel, or a classic-tracepoint op code.
    pub op: u32,
    /// Slot k counts latencies in (2^(k-1), 2^k] µs; slot 0 is [0, 1] µs.
    pub latency_slots: [u64; LOG2_SLOTS],
    /// Slot k counts sizes in (2^(k-1), 2^k] KiB; slot 0 is [0, 1] KiB.
    pub size_slots: [u64; LOG2_SLOTS],
    pub latency_sum_ns: u64,
    pub size_sum_bytes: u64,
    pub errors: u64,
    /// Queue time of request-based IO; counts only requests the kernel stamped (bpf/bio.bpf.c,
    /// observe_queue()), so its count may be below [`DeviceOpHist::count`].
    pub queue: QueueHist,
}

/// Slot k counts queue times in (2^(k-1), 2^k] µs, like `latency_slots`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueHist {
    pub slots: [u64; LOG2_SLOTS],
    pub sum_ns: u64,
}

impl Default for QueueHist {
    fn default() -> Self {
        Self {
            slots: [0; LOG2_SLOTS],
            sum_ns: 0,
        }
    }
}

impl QueueHist {
    pub fn count(&self) -> u64 {
        self.slots.iter().sum()
    }

    pub fn add(&mut self, other: &QueueHist) {
        for (a, b) in self.slots.iter_mut().zip(other.slots) {
            *a += b;
        }
        self.sum_ns += other.sum_ns;
    }

    /// Slot-wise `self - base`, saturating like the other fields' baselines.
    pub fn minus(&self, base: &QueueHist) -> QueueHist {
        let mut d = QueueHist::default();
        for k in 0..LOG2_SLOTS {
            d.slots[k] = self.slots[k].saturating_sub(base.slots[k]);
        }
        d.sum_ns = self.sum_ns.saturating_sub(base.sum_ns);
        d
    }
}

impl DeviceOpHist {
    pub fn empty(dev: u32, op: u32) -> Self {
        Self {
            dev,
            op,
            latency_slots: [0; LOG2_SLOTS],
            size_slots: [0; LOG2_SLOTS],
            latency_sum_ns: 0,
            size_sum_bytes: 0,
            errors: 0,
            queue: QueueHist::default(),
        }
    }

    /// Every observation lands in exactly one latency slot, so this is the IO count.
    pub fn count(&self) -> u64 {
        self.latency_slots.iter().sum()
    }

    /// Adds one CPU's value (native-endian `struct hist` bytes).
    pub fn add_cpu_value(&mut self, bytes: &[u8]) -> Result<(), LayoutError> {
        if bytes.len() < HIST_VALUE_SIZE {
            return Err(LayoutError {
                what: "struct hist",
                expected: HIST_VALUE_SIZE,
                got: bytes.len(),
            });
        }
        let word =
            |i: usize| u64::from_ne_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        for k in 0..LOG2_SLOTS {
            self.latency_slots[k] += word(k);
            self.size_slots[k] += word(LOG2_SLOTS + k);
        }
        self.latency_sum_ns += word(2 * LOG2_SLOTS);
        self.size_sum_bytes += word(2 * LOG2_SLOTS + 1);
        self.errors += word(2 * LOG2_SLOTS + 2);
        for k in 0..LOG2_SLOTS {
            self.queue.slots[k] += word(SEED_WORDS + k);
        }
        self.queue.sum_ns += word(SEED_WORDS + LOG2_SLOTS);
        Ok(())
    }
}

/// Parses a `struct hist_key`.
pub fn parse_key(bytes: &[u8]) -> Result<(u32, u32), LayoutError> {
    if bytes.len() != HIST_KEY_SIZE {
        return Err(LayoutError {
            what: "struct hist_key",
            expected: HIST_KEY_SIZE,
            got: bytes.len(),
        });
    }
    let dev = u32::from_ne_bytes(bytes[0..4].try_into().expect("4 bytes"));
    let op = u32::from_ne_bytes(bytes[4..8].try_into().expect("4 bytes"));
    Ok((dev, op))
}

pub fn key_bytes(dev: u32, op: u32) -> [u8; HIST_KEY_SIZE] {
    let mut k = [0u8; HIST_KEY_SIZE];
    k[0..4].copy_from_slice(&dev.to_ne_bytes());
    k[4..8].copy_from_slice(&op.to_ne_bytes());
    k
}

#[derive(Debug, thiserror::Error)]
#[error("BPF map value layout mismatch for {what}: expected {expected} bytes, got {got}")]
pub struct LayoutError {
    pub what: &'static str,
    pub expected: usize,
    pub got: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub hists: Vec<DeviceOpHist>,
    /// Indexed like LOST_REASONS.
    pub lost: [u64; LOST_REASONS.len()],
    /// Entries in the start and partial tables, indexed like INFLIGHT_TABLES.
    pub inflight: [u64; INFLIGHT_TABLES.len()],
    /// Per disk (dev_t), the completions counted in LOST_UNOBSERVED, for the device filter.
    pub unobserved: Vec<(u32, u64)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(lat_slot: usize, size_slot: usize, sums: [u64; 3]) -> Vec<u8> {
        let mut words = vec![0u64; HIST_WORDS];
        words[lat_slot] = 1;
        words[LOG2_SLOTS + size_slot] = 1;
        words[2 * LOG2_SLOTS..SEED_WORDS].copy_from_slice(&sums);
        words.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }

    #[test]
    fn sums_cpu_values() {
        let mut h = DeviceOpHist::empty(1, 0);
        h.add_cpu_value(&value(3, 2, [1500, 4096, 0])).unwrap();
        h.add_cpu_value(&value(3, 4, [2500, 16384, 1])).unwrap();
        assert_eq!(h.latency_slots[3], 2);
        assert_eq!(h.size_slots[2], 1);
        assert_eq!(h.size_slots[4], 1);
        assert_eq!(
            (h.latency_sum_ns, h.size_sum_bytes, h.errors),
            (4000, 20480, 1)
        );
        assert_eq!(h.count(), 2);
        assert_eq!(h.queue.count(), 0);
    }

    #[test]
    fn queue_slots_follow_the_seed_words() {
        let mut words = vec![0u64; HIST_WORDS];
        words[3] = 1; // one IO in latency slot 3
        words[SEED_WORDS + 2] = 1; // queued (2, 4] µs
        words[SEED_WORDS + LOG2_SLOTS] = 3_000;
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let mut h = DeviceOpHist::empty(1, 0);
        h.add_cpu_value(&bytes).unwrap();
        h.add_cpu_value(&bytes).unwrap();
        assert_eq!((h.count(), h.latency_sum_ns, h.errors), (2, 0, 0));
        assert_eq!(
            (h.queue.slots[2], h.queue.count(), h.queue.sum_ns),
            (2, 2, 6_000)
        );
        let base = h.queue.clone();
        h.queue.add(&base);
        assert_eq!(h.queue.minus(&base), base);
        // A value of the seed's layout alone (an older object) is refused, not half-read.
        assert!(h.add_cpu_value(&bytes[..SEED_WORDS * 8]).is_err());
    }

    #[test]
    fn rejects_short_values_and_keys() {
        let mut h = DeviceOpHist::empty(1, 0);
        assert!(h.add_cpu_value(&[0u8; 16]).is_err());
        assert!(parse_key(&[0u8; 4]).is_err());
        assert_eq!(parse_key(&key_bytes(7 << 20, 9)).unwrap(), (7 << 20, 9));
    }
}
