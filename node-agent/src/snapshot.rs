//! What the kernel counted, summed over CPUs: the input of every exporter view.
//!
//! Parsing is kept apart from map access so it is tested without a kernel. Keys, values and lost
//! reasons are read through the Rust types build.rs generates from bpf/bio_types.h (`hist_key`,
//! `hist`, `enum lost_reason`): every field is filled by name at the offset the generated type
//! gives it, so a field added to, removed from or retyped in the C fails this file's build, and
//! a moved one is read where it now is.
use std::mem::{offset_of, size_of};

use crate::bpf::types::{hist, hist_key, lost_reason};

/// Slots per histogram (LOG2_SLOTS in bpf/bio_types.h): one per power of two of a 64-bit value.
/// Not read from the C, but checked against it: `parse_value` fills the generated `[u64; N]`
/// fields with arrays of this length, which does not compile if the two differ.
pub const LOG2_SLOTS: usize = 64;
pub const HIST_VALUE_SIZE: usize = size_of::<hist>();
pub const HIST_KEY_SIZE: usize = size_of::<hist_key>();

/// How many reasons the programs count, in the `lost_events` map (`LOST_REASONS` in
/// bpf/bio_types.h, the last enumerator of `enum lost_reason`).
pub const KERNEL_LOST_REASONS: usize = lost_reason::LOST_REASONS.0 as usize;
/// The `reason` label of each enumerator of `enum lost_reason`. Its length is the C's count, so a
/// reason added there fails the build until it is named here; the unit tests check that every
/// enumerator of the object's BTF is here under its own value.
const PROGRAM_LOST_REASONS: [(lost_reason, &str); KERNEL_LOST_REASONS] = [
    (lost_reason::LOST_START_MAP_FULL, "start_map_full"),
    (lost_reason::LOST_NO_START_TIME, "no_start_time"),
    (lost_reason::LOST_HIST_MAP_FULL, "hist_map_full"),
    (lost_reason::LOST_PARTIAL_MAP_FULL, "partial_map_full"),
];
/// Index of the skipped nested runs (see bpf/recursion.rs) in LOST_REASONS: counted by the
/// kernel, after the programs' own reasons.
pub const LOST_PROGRAM_RECURSION: usize = KERNEL_LOST_REASONS;
/// Index of the completions stat counted and the programs never ran for, in LOST_REASONS
/// (found by user space, see unobserved.rs).
pub const LOST_UNOBSERVED: usize = KERNEL_LOST_REASONS + 1;
/// Index of LOST_NO_START_TIME in LOST_REASONS.
pub const LOST_NO_START_TIME: usize = lost_reason::LOST_NO_START_TIME.0 as usize;

/// Exported as the `reason` label: the programs' reasons at their `enum lost_reason` values (the
/// `lost_events` map's keys), then what the kernel counts for us, then what user space finds.
pub const LOST_REASONS: [&str; KERNEL_LOST_REASONS + 2] = lost_reason_names();

const fn lost_reason_names() -> [&'static str; KERNEL_LOST_REASONS + 2] {
    let mut names = [""; KERNEL_LOST_REASONS + 2];
    let mut i = 0;
    while i < PROGRAM_LOST_REASONS.len() {
        let (reason, name) = PROGRAM_LOST_REASONS[i];
        // A value beyond the count is an index out of bounds here: a build error.
        names[reason.0 as usize] = name;
        i += 1;
    }
    names[LOST_PROGRAM_RECURSION] = "program_recursion";
    names[LOST_UNOBSERVED] = "unobserved_completion";
    names
}

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

    /// One map entry's value as the programs wrote it (one CPU's, or a sum). Destructured
    /// without `..`, so a field added to `struct hist` fails the build here until it is kept.
    pub fn from_map(key: hist_key, value: &hist) -> Self {
        let hist_key { dev, op } = key;
        let hist {
            latency_slots,
            size_slots,
            latency_sum_ns,
            size_sum_bytes,
            errors,
            queue_slots,
            queue_sum_ns,
        } = *value;
        Self {
            dev,
            op,
            latency_slots,
            size_slots,
            latency_sum_ns,
            size_sum_bytes,
            errors,
            queue: QueueHist {
                slots: queue_slots,
                sum_ns: queue_sum_ns,
            },
        }
    }

    /// A per-CPU map entry: its key's bytes and each CPU's value bytes, summed.
    pub fn from_cpu_values<'a>(
        key: &[u8],
        per_cpu: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Self, LayoutError> {
        let key = parse_key(key)?;
        let mut sum: Option<Self> = None;
        for bytes in per_cpu {
            let cpu = Self::from_map(key, &parse_value(bytes)?);
            // The first CPU's value is the sum so far: one pass fewer over the counters.
            match &mut sum {
                Some(sum) => sum.add(&cpu),
                None => sum = Some(cpu),
            }
        }
        Ok(sum.unwrap_or_else(|| Self::empty(key.dev, key.op)))
    }

    /// Every observation lands in exactly one latency slot, so this is the IO count.
    pub fn count(&self) -> u64 {
        self.latency_slots.iter().sum()
    }

    /// Counter-wise `self + other`: summing CPUs, and merging pairs that export the same series.
    pub fn add(&mut self, other: &Self) {
        self.zip_counters(other, |a, b| a + b);
    }

    /// Counter-wise `self - base`, saturating: kernel totals only grow, so saturation never hides
    /// IO; it only guards against a baseline from a map entry that was recreated.
    pub fn minus(&self, base: &Self) -> Self {
        let mut d = self.clone();
        d.zip_counters(base, u64::saturating_sub);
        d
    }

    /// Sets each counter (every slot, sum and error count) of `self` to `f` of it and `other`'s,
    /// keeping `self`'s device and operation: the one place that lists a histogram's counters
    /// for arithmetic. In place: it runs per CPU per map entry on every scrape.
    fn zip_counters(&mut self, other: &Self, f: impl Fn(u64, u64) -> u64) {
        let slots = |a: &mut [u64; LOG2_SLOTS], b: &[u64; LOG2_SLOTS]| {
            for (x, y) in a.iter_mut().zip(b) {
                *x = f(*x, *y);
            }
        };
        slots(&mut self.latency_slots, &other.latency_slots);
        slots(&mut self.size_slots, &other.size_slots);
        slots(&mut self.queue.slots, &other.queue.slots);
        self.latency_sum_ns = f(self.latency_sum_ns, other.latency_sum_ns);
        self.size_sum_bytes = f(self.size_sum_bytes, other.size_sum_bytes);
        self.errors = f(self.errors, other.errors);
        self.queue.sum_ns = f(self.queue.sum_ns, other.queue.sum_ns);
    }
}

/// The native-endian integer at `offset`; the caller checked that `bytes` holds the whole type.
fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_ne_bytes(word)
}

fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_ne_bytes(word)
}

fn slots_at(bytes: &[u8], offset: usize) -> [u64; LOG2_SLOTS] {
    let mut slots = [0u64; LOG2_SLOTS];
    let (words, _) = bytes[offset..offset + LOG2_SLOTS * 8].as_chunks::<8>();
    for (slot, word) in slots.iter_mut().zip(words) {
        *slot = u64::from_ne_bytes(*word);
    }
    slots
}

fn check_size(what: &'static str, expected: usize, got: usize) -> Result<(), LayoutError> {
    if got == expected {
        return Ok(());
    }
    Err(LayoutError {
        what,
        expected,
        got,
    })
}

/// Parses one CPU's `struct hist`. The kernel pads per-CPU values to 8 bytes, which `struct
/// hist` (all u64) already is, so anything but its exact size is another layout.
pub fn parse_value(bytes: &[u8]) -> Result<hist, LayoutError> {
    check_size("struct hist", HIST_VALUE_SIZE, bytes.len())?;
    Ok(hist {
        latency_slots: slots_at(bytes, offset_of!(hist, latency_slots)),
        size_slots: slots_at(bytes, offset_of!(hist, size_slots)),
        latency_sum_ns: u64_at(bytes, offset_of!(hist, latency_sum_ns)),
        size_sum_bytes: u64_at(bytes, offset_of!(hist, size_sum_bytes)),
        errors: u64_at(bytes, offset_of!(hist, errors)),
        queue_slots: slots_at(bytes, offset_of!(hist, queue_slots)),
        queue_sum_ns: u64_at(bytes, offset_of!(hist, queue_sum_ns)),
    })
}

/// Parses a `struct hist_key`.
pub fn parse_key(bytes: &[u8]) -> Result<hist_key, LayoutError> {
    check_size("struct hist_key", HIST_KEY_SIZE, bytes.len())?;
    Ok(hist_key {
        dev: u32_at(bytes, offset_of!(hist_key, dev)),
        op: u32_at(bytes, offset_of!(hist_key, op)),
    })
}

/// A `struct hist_key` as the map takes it.
pub fn key_bytes(key: hist_key) -> [u8; HIST_KEY_SIZE] {
    let hist_key { dev, op } = key;
    let mut bytes = [0u8; HIST_KEY_SIZE];
    let mut put = |offset: usize, v: u32| {
        bytes[offset..offset + 4].copy_from_slice(&v.to_ne_bytes());
    };
    put(offset_of!(hist_key, dev), dev);
    put(offset_of!(hist_key, op), op);
    bytes
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

    /// `value` as the programs lay it out, written field by field at the generated offsets.
    fn value_bytes(value: &hist) -> Vec<u8> {
        let mut bytes = vec![0u8; HIST_VALUE_SIZE];
        let mut put = |offset: usize, words: &[u64]| {
            for (k, w) in words.iter().enumerate() {
                bytes[offset + k * 8..offset + k * 8 + 8].copy_from_slice(&w.to_ne_bytes());
            }
        };
        put(offset_of!(hist, latency_slots), &value.latency_slots);
        put(offset_of!(hist, size_slots), &value.size_slots);
        put(offset_of!(hist, latency_sum_ns), &[value.latency_sum_ns]);
        put(offset_of!(hist, size_sum_bytes), &[value.size_sum_bytes]);
        put(offset_of!(hist, errors), &[value.errors]);
        put(offset_of!(hist, queue_slots), &value.queue_slots);
        put(offset_of!(hist, queue_sum_ns), &[value.queue_sum_ns]);
        bytes
    }

    fn value(lat_slot: usize, size_slot: usize, sums: [u64; 3]) -> Vec<u8> {
        let mut v = hist::default();
        v.latency_slots[lat_slot] = 1;
        v.size_slots[size_slot] = 1;
        [v.latency_sum_ns, v.size_sum_bytes, v.errors] = sums;
        value_bytes(&v)
    }

    fn key(dev: u32, op: u32) -> [u8; HIST_KEY_SIZE] {
        key_bytes(hist_key { dev, op })
    }

    #[test]
    fn sums_cpu_values() {
        let cpus = [value(3, 2, [1500, 4096, 0]), value(3, 4, [2500, 16384, 1])];
        let h = DeviceOpHist::from_cpu_values(&key(1, 0), cpus.iter().map(Vec::as_slice)).unwrap();
        assert_eq!((h.dev, h.op), (1, 0));
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
    fn queue_slots_are_read_and_summed() {
        let mut v = hist::default();
        v.latency_slots[3] = 1; // one IO in latency slot 3
        v.queue_slots[2] = 1; // queued (2, 4] µs
        v.queue_sum_ns = 3_000;
        let bytes = value_bytes(&v);
        let h = DeviceOpHist::from_cpu_values(&key(1, 0), [bytes.as_slice(), bytes.as_slice()])
            .unwrap();
        assert_eq!((h.count(), h.latency_sum_ns, h.errors), (2, 0, 0));
        assert_eq!(
            (h.queue.slots[2], h.queue.count(), h.queue.sum_ns),
            (2, 2, 6_000)
        );
        // A value without the queue fields (an older object) is refused, not half-read.
        let seed_part = offset_of!(hist, queue_slots);
        assert!(DeviceOpHist::from_cpu_values(&key(1, 0), [&bytes[..seed_part]]).is_err());
    }

    #[test]
    fn add_and_minus_cover_every_counter() {
        let mut a = DeviceOpHist::empty(1, 0);
        a.latency_slots[63] = 5;
        a.size_slots[0] = 4;
        a.latency_sum_ns = 3;
        a.size_sum_bytes = 2;
        a.errors = 1;
        a.queue.slots[7] = 6;
        a.queue.sum_ns = 7;
        let mut twice = a.clone();
        twice.add(&a);
        assert_eq!(
            (
                twice.latency_slots[63],
                twice.size_slots[0],
                twice.latency_sum_ns,
                twice.size_sum_bytes,
                twice.errors,
                twice.queue.slots[7],
                twice.queue.sum_ns
            ),
            (10, 8, 6, 4, 2, 12, 14)
        );
        assert_eq!(twice.minus(&a), a);
        assert_eq!(a.minus(&twice), DeviceOpHist::empty(1, 0), "saturates");
        let other = DeviceOpHist::empty(9, 9);
        assert_eq!((a.minus(&other).dev, a.minus(&other).op), (1, 0));
    }

    #[test]
    fn rejects_wrong_sizes() {
        assert!(parse_value(&[0u8; 16]).is_err());
        assert!(parse_value(&vec![0u8; HIST_VALUE_SIZE + 8]).is_err());
        assert!(parse_key(&[0u8; 4]).is_err());
        let k = parse_key(&key(7 << 20, 9)).unwrap();
        assert_eq!((k.dev, k.op), (7 << 20, 9));
    }

    /// Every enumerator of the object's `enum lost_reason` (what the programs can count) has its
    /// name here, at its value; a reason added in the C without a name fails this.
    #[test]
    fn every_lost_reason_of_the_object_is_named() {
        let in_object = crate::bpf::object_enumerators("lost_reason");
        assert!(
            !in_object.is_empty(),
            "enum lost_reason is in the object's BTF"
        );
        for (name, value) in in_object {
            if name == "LOST_REASONS" {
                assert_eq!(value as usize, KERNEL_LOST_REASONS);
                continue;
            }
            let label = name.strip_prefix("LOST_").unwrap().to_ascii_lowercase();
            assert_eq!(
                LOST_REASONS.get(value as usize).copied(),
                Some(label.as_str()),
                "{name} = {value}"
            );
        }
        let mut names = LOST_REASONS.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), LOST_REASONS.len(), "{LOST_REASONS:?}");
        assert!(!names.contains(&""), "{LOST_REASONS:?}");
    }
}
