//! Reading the maps: every device/operation histogram (batched where the kernel can), the lost
//! counters and the programs' globals, into a Snapshot.
use std::sync::{Arc, Mutex};

use libbpf_rs::{MapCore, MapFlags, MapHandle};

use super::{recursion, skel, BpfError};
use crate::snapshot::{
    DeviceOpHist, LayoutError, Snapshot, HIST_KEY_SIZE, KERNEL_LOST_REASONS,
    LOST_PROGRAM_RECURSION, LOST_REASONS, LOST_UNOBSERVED,
};
use crate::unobserved::Unobserved;

/// Reads the histogram maps; cheap to clone, usable from any thread (owns duplicated map fds).
#[derive(Debug)]
pub struct MapReader {
    pub(super) hists: MapHandle,
    pub(super) lost: MapHandle,
    /// The object's .bss: the in-flight entry counters the programs keep.
    pub(super) bss: MapHandle,
    pub(super) recursion: Arc<recursion::RecursionMisses>,
    /// Filled by the disk watcher, shared by every clone.
    pub(super) unobserved: Arc<Mutex<Unobserved>>,
}

impl Clone for MapReader {
    fn clone(&self) -> Self {
        Self {
            hists: MapHandle::try_from(&self.hists).expect("dup of an open map fd"),
            lost: MapHandle::try_from(&self.lost).expect("dup of an open map fd"),
            bss: MapHandle::try_from(&self.bss).expect("dup of an open map fd"),
            recursion: self.recursion.clone(),
            unobserved: self.unobserved.clone(),
        }
    }
}

impl MapReader {
    /// Every device/operation pair's histogram, summed over CPUs: BPF_MAP_LOOKUP_BATCH where the
    /// kernel has it, else one lookup per key (kernels before 5.6).
    pub(super) fn read_hists(&self) -> Result<Vec<DeviceOpHist>, BpfError> {
        let mut hists = Vec::new();
        let batched = lookup_percpu_batch(&self.hists, HIST_KEY_SIZE, |key, per_cpu| {
            hists.push(DeviceOpHist::from_cpu_values(key, per_cpu.iter().copied())?);
            Ok(())
        })
        .map_err(|e| match e {
            BatchError::Read(source) => BpfError::MapRead {
                map: "hists",
                source,
            },
            BatchError::Layout(e) => BpfError::Layout(e),
        })?;
        if batched {
            return Ok(hists);
        }
        for key in self.hists.keys() {
            // A pair is never deleted, so None only means a race with map teardown.
            let Some(per_cpu) =
                self.hists
                    .lookup_percpu(&key, MapFlags::ANY)
                    .map_err(|source| BpfError::MapRead {
                        map: "hists",
                        source,
                    })?
            else {
                continue;
            };
            hists.push(DeviceOpHist::from_cpu_values(
                &key,
                per_cpu.iter().map(Vec::as_slice),
            )?);
        }
        Ok(hists)
    }

    /// One pass over the maps: O(device/operation pairs), independent of the IO rate.
    pub fn snapshot(&self) -> Result<Snapshot, BpfError> {
        let hists = self.read_hists()?;
        let mut lost = [0u64; LOST_REASONS.len()];
        lost[..=LOST_PROGRAM_RECURSION].copy_from_slice(&self.program_losses()?);
        let unobserved = self.unobserved_state().losses();
        lost[LOST_UNOBSERVED] = unobserved.iter().map(|(_, n)| n).sum();
        let bss = self.read_bss()?;
        let inflight = [bss.start_entries, bss.partial_entries];
        Ok(Snapshot {
            hists,
            lost,
            inflight,
            unobserved,
        })
    }

    /// The programs' global counters, as the skeleton's type for `.bss`: a variable added to or
    /// removed from the C changes that type and fails the build here, and each field is read at
    /// the offset the type gives it.
    pub(super) fn read_bss(&self) -> Result<skel::types::bss, BpfError> {
        let bytes = self
            .bss
            .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)
            .map_err(|source| BpfError::MapRead {
                map: ".bss",
                source,
            })?
            .unwrap_or_default();
        let at = |offset: usize| {
            bytes
                .get(offset..offset + 8)
                .map_or(0, |b| u64::from_ne_bytes(b.try_into().expect("8 bytes")))
        };
        use std::mem::offset_of;
        type Bss = skel::types::bss;
        Ok(Bss {
            start_entries: at(offset_of!(Bss, start_entries)),
            partial_entries: at(offset_of!(Bss, partial_entries)),
            classic_empty_writes: at(offset_of!(Bss, classic_empty_writes)),
        })
    }

    pub(super) fn unobserved_state(&self) -> std::sync::MutexGuard<'_, Unobserved> {
        self.unobserved
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// What the programs and the kernel count lost per IO (LOST_REASONS up to program_recursion).
    pub(super) fn program_losses(&self) -> Result<[u64; LOST_PROGRAM_RECURSION + 1], BpfError> {
        let mut lost = [0u64; LOST_PROGRAM_RECURSION + 1];
        lost[LOST_PROGRAM_RECURSION] = self.recursion.total();
        for (i, slot) in lost.iter_mut().enumerate().take(KERNEL_LOST_REASONS) {
            let key = (i as u32).to_ne_bytes();
            let per_cpu = self
                .lost
                .lookup_percpu(&key, MapFlags::ANY)
                .map_err(|source| BpfError::MapRead {
                    map: "lost_events",
                    source,
                })?
                .unwrap_or_default();
            *slot = per_cpu
                .iter()
                .filter_map(|v| v.get(..8))
                .map(|b| u64::from_ne_bytes(b.try_into().expect("8 bytes")))
                .sum();
        }
        Ok(lost)
    }
}

/// Entries per BPF_MAP_LOOKUP_BATCH call; bounds the value buffer to this x struct hist (1568
/// bytes) x CPUs.
const LOOKUP_BATCH: usize = 256;

#[derive(Debug)]
enum BatchError {
    Read(libbpf_rs::Error),
    Layout(LayoutError),
}

impl From<LayoutError> for BatchError {
    fn from(e: LayoutError) -> Self {
        BatchError::Layout(e)
    }
}

/// Calls `each(key, per-CPU values)` for every entry of a per-CPU hash map, LOOKUP_BATCH entries
/// per syscall (BPF_MAP_LOOKUP_BATCH) instead of a get_next_key and a lookup per entry: at 1024
/// disks x 4 operations that was 8192 syscalls per scrape. libbpf-rs 0.27 refuses batch lookups
/// on per-CPU maps, hence libbpf's C call. Returns false, having called nothing, when the kernel
/// has no batch ops (before 5.6), so the caller reads entry by entry.
fn lookup_percpu_batch(
    map: &MapHandle,
    key_size: usize,
    mut each: impl FnMut(&[u8], &[&[u8]]) -> Result<(), LayoutError>,
) -> Result<bool, BatchError> {
    let cpus = libbpf_rs::num_possible_cpus().map_err(BatchError::Read)?;
    // The kernel lays per-CPU values out at 8-byte strides, CPU after CPU.
    let value_size = map.value_size() as usize;
    let stride = value_size.next_multiple_of(8);
    let mut keys = vec![0u8; LOOKUP_BATCH * key_size];
    let mut values = vec![0u8; LOOKUP_BATCH * stride * cpus];
    // The hash map's batch position is a u32 bucket index; 8 bytes leave room.
    let (mut in_batch, mut out_batch) = ([0u8; 8], [0u8; 8]);
    let opts = libbpf_rs::libbpf_sys::bpf_map_batch_opts {
        sz: std::mem::size_of::<libbpf_rs::libbpf_sys::bpf_map_batch_opts>() as _,
        ..Default::default()
    };
    let mut first = true;
    loop {
        let mut count = LOOKUP_BATCH as u32;
        // SAFETY: keys and values hold LOOKUP_BATCH entries of the map's key size and per-CPU
        // value size, as `count` tells the kernel; the batch tokens are 8 bytes, more than the
        // kernel's u32; all outlive the call, and the map fd is open (borrowed from `map`).
        let ret = unsafe {
            libbpf_rs::libbpf_sys::bpf_map_lookup_batch(
                std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(map)),
                if first {
                    std::ptr::null_mut()
                } else {
                    in_batch.as_mut_ptr().cast()
                },
                out_batch.as_mut_ptr().cast(),
                keys.as_mut_ptr().cast(),
                values.as_mut_ptr().cast(),
                &mut count,
                &opts,
            )
        };
        // ENOENT: this was the last batch (count is valid); anything else fails the read.
        let done = ret < 0 && -ret == libc::ENOENT;
        if ret < 0 && !done {
            // EINVAL or ENOTSUPP (524): no batch ops for this map on this kernel.
            if first && (-ret == libc::EINVAL || -ret == 524) {
                return Ok(false);
            }
            return Err(BatchError::Read(libbpf_rs::Error::from_raw_os_error(-ret)));
        }
        let mut per_cpu: Vec<&[u8]> = Vec::with_capacity(cpus);
        for i in 0..(count as usize).min(LOOKUP_BATCH) {
            let value = &values[i * stride * cpus..(i + 1) * stride * cpus];
            per_cpu.clear();
            per_cpu.extend(value.chunks_exact(stride).map(|v| &v[..value_size]));
            each(&keys[i * key_size..(i + 1) * key_size], &per_cpu)?;
        }
        if done {
            return Ok(true);
        }
        in_batch = out_batch;
        first = false;
    }
}
