//! Loading, attaching and reading the BPF programs of bpf/bio.bpf.c.
//!
//! One object holds the programs of every attach mode. For a mode, the agent enables only that
//! mode's programs, loads (the verifier checks them), then attaches each; `auto` walks the modes
//! from cheapest to most portable and keeps the first that attaches, logging why others did not.
pub mod kernel_facts;
mod recursion;
mod skel;
mod topology;

#[cfg(test)]
pub use skel::object_enumerators;
/// The Rust types generated from the object's BTF: map keys and values, enums, globals.
pub use skel::types;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::{Link, MapCore, MapFlags, MapHandle, OpenObject};

use crate::snapshot::{
    key_bytes, DeviceOpHist, LayoutError, Snapshot, HIST_KEY_SIZE, HIST_VALUE_SIZE,
    KERNEL_LOST_REASONS, LOST_NO_START_TIME, LOST_PROGRAM_RECURSION, LOST_REASONS, LOST_UNOBSERVED,
};
use crate::unobserved::{self, DiskStat, Reading, Unobserved, GROUPS};
use kernel_facts::{tracepoint_fields, KernelFacts, TracepointFields};
use skel::{BioSkel, BioSkelBuilder};

/// Defined with the rest of the command line, which the operator shares.
pub use bio_agent_args::AttachMode;

const PROBE_ORDER: [AttachMode; 4] = [
    AttachMode::TpBtf,
    AttachMode::RawTp,
    AttachMode::Tracepoint,
    AttachMode::Kprobe,
];

/// When a program is attached. Every program of the mode is loaded (and verified) at start;
/// attaching is what costs time on every IO, so programs that only some hosts need wait until
/// the host needs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Always attached; the mode fails without it.
    Core,
    /// Issue-time stamps, only for request queues that do not keep their own (see bio.bpf.c).
    Issue,
    /// Bio tracepoints, attached at start: a bio-based disk (zram, dm, md, brd) can appear at any
    /// moment and must be measured from its first IO, which no look at sysfs can promise. On
    /// request-based disks the queue program returns after one check (see bio.bpf.c).
    Bio,
}

struct ModeProgram {
    name: &'static str,
    role: Role,
}

const fn prog(name: &'static str, role: Role) -> ModeProgram {
    ModeProgram { name, role }
}

const TP_BTF_PROGRAMS: &[ModeProgram] = &[
    prog("btf_rq_complete", Role::Core),
    prog("btf_rq_issue", Role::Issue),
    prog("btf_bio_queue", Role::Bio),
    prog("btf_bio_complete", Role::Bio),
];
const RAW_TP_PROGRAMS: &[ModeProgram] = &[
    prog("raw_rq_complete", Role::Core),
    prog("raw_rq_issue", Role::Issue),
    prog("raw_bio_queue", Role::Bio),
    prog("raw_bio_complete", Role::Bio),
];
// Classic tracepoints and kprobes see no issue stamp at completion: they always need both.
const TRACEPOINT_PROGRAMS: &[ModeProgram] = &[
    prog("tp_rq_issue", Role::Core),
    prog("tp_rq_complete", Role::Core),
];
const KPROBE_PROGRAMS: &[ModeProgram] = &[
    prog("kp_rq_issue", Role::Core),
    prog("kp_rq_complete", Role::Core),
];

fn programs(mode: AttachMode) -> &'static [ModeProgram] {
    match mode {
        AttachMode::Auto => &[],
        AttachMode::TpBtf => TP_BTF_PROGRAMS,
        AttachMode::RawTp => RAW_TP_PROGRAMS,
        AttachMode::Tracepoint => TRACEPOINT_PROGRAMS,
        AttachMode::Kprobe => KPROBE_PROGRAMS,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("missing capabilities {missing}: run as root, or grant CAP_BPF and CAP_PERFMON (kernel 5.8+; CAP_SYS_ADMIN before)")]
    Capabilities { missing: String },
    #[error("attach mode {mode} is not available: {reason}")]
    ModeUnavailable { mode: AttachMode, reason: String },
    #[error("no attach mode works on this kernel: {0}")]
    NoModeWorks(String),
    #[error("reading BPF map {map}: {source}")]
    MapRead {
        map: &'static str,
        source: libbpf_rs::Error,
    },
    #[error(transparent)]
    Layout(#[from] LayoutError),
}

/// Loaded programs and the links of those attached so far. Dropping this unloads them.
pub struct Attached {
    pub mode: AttachMode,
    pub facts: KernelFacts,
    maps: MapReader,
    /// Shared with the disk watcher (see watch_disks), which holds it weakly.
    state: Arc<Mutex<AttachState>>,
    sys_block: PathBuf,
}

struct AttachState {
    skel: BioSkel<'static>,
    links: HashMap<&'static str, Link>,
    /// Disks whose histogram entries exist already (see precreate_entries).
    prepared: HashSet<u32>,
    /// /sys/block's names when the watcher last created entries (see watch_disks).
    prepared_names: BTreeSet<std::ffi::OsString>,
    /// /sys/block's names at the last look at the disks, and when that was (see refresh).
    disks_seen: BTreeSet<std::ffi::OsString>,
    looked_at: Option<Instant>,
}

/// How often refresh looks at every disk again although none came or went: what only a disk's
/// attributes say (a zram device given a size, writeback throttling turned off) is noticed
/// within this time. Looking reads a few sysfs files per disk, which on a host with many disks
/// costs more than the rest of a scrape.
const DISKS_RECHECK: Duration = Duration::from_secs(10);

/// How often the disk watcher reads /sys/block's names (one directory read), so that a new disk's
/// histogram entries are made by user space within this time, not at the next scrape.
const DISKS_WATCH: Duration = Duration::from_secs(1);

// SAFETY: the skeleton holds raw pointers into libbpf's bpf_object, which has no thread affinity;
// libbpf is not safe for concurrent use, and every use goes through the Mutex around this state.
unsafe impl Send for AttachState {}

impl Attached {
    pub fn reader(&self) -> MapReader {
        self.maps.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AttachState> {
        lock_state(&self.state)
    }

    fn has_role(&self, role: Role) -> bool {
        programs(self.mode).iter().any(|p| p.role == role)
    }

    fn role_attached(&self, st: &AttachState, role: Role) -> bool {
        programs(self.mode)
            .iter()
            .filter(|p| p.role == role)
            .all(|p| st.links.contains_key(p.name))
    }

    fn attach_role(&self, st: &mut AttachState, role: Role) -> Result<(), String> {
        for want in programs(self.mode).iter().filter(|p| p.role == role) {
            if st.links.contains_key(want.name) {
                continue;
            }
            let link = {
                let prog = st
                    .skel
                    .object()
                    .progs_mut()
                    .find(|p| p.name() == want.name)
                    .ok_or_else(|| format!("program {} missing from the BPF object", want.name))?;
                prog.attach().map_err(|e| {
                    format!(
                        "programs loaded and passed the verifier, but attaching {} failed: {}",
                        want.name,
                        explain_attach_error(self.mode, &e)
                    )
                })?
            };
            st.links.insert(want.name, link);
        }
        Ok(())
    }

    /// Attaches what this host needs now. Called at start and on every scrape, so a host that
    /// changes (a disk appears, a queue stops keeping stats) is covered without a restart.
    pub fn refresh(&self, snapshot: Option<&Snapshot>) {
        let mut st = self.lock();
        let missed = snapshot.map_or(0, |s| s.lost[LOST_NO_START_TIME]);
        let names = topology::disk_names(&self.sys_block);
        let due = st.looked_at.is_none_or(|at| at.elapsed() >= DISKS_RECHECK);
        let unstamped = missed > 0 && !self.role_attached(&st, Role::Issue);
        if names == st.disks_seen && !due && !unstamped {
            return;
        }
        st.disks_seen = names;
        st.looked_at = Some(Instant::now());
        precreate_entries(&self.maps.hists, &self.ops(), &self.sys_block, &mut st);
        if self.has_role(Role::Issue) && !self.role_attached(&st, Role::Issue) {
            let reason = match topology::request_disk_without_stats(&self.sys_block) {
                Some(disk) => Some(format!(
                    "the request queue of {disk} keeps no issue stamps (wbt off)"
                )),
                None if missed > 0 => Some(format!("{missed} completions had no issue stamp")),
                None => None,
            };
            if let Some(reason) = reason {
                match self.attach_role(&mut st, Role::Issue) {
                    Ok(()) => tracing::info!(%reason, "issue-time programs attached"),
                    Err(e) => tracing::warn!(error = %e, "cannot attach issue-time programs"),
                }
            }
        }
        // Attached at start; this only retries after a failure there, once such a disk exists.
        if self.has_role(Role::Bio) && !self.role_attached(&st, Role::Bio) {
            if let Some(disk) = topology::bio_based_disk(&self.sys_block) {
                match self.attach_role(&mut st, Role::Bio) {
                    Ok(()) => {
                        tracing::info!(%disk, "bio-based disk present: bio programs attached")
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "bio programs not attached: bio-based disks (zram, dm, md) are not measured")
                    }
                }
            }
        }
    }

    fn ops(&self) -> Vec<u32> {
        self.facts.common_ops(self.mode)
    }

    /// Names of the attached programs, for logs.
    pub fn attached_programs(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.lock().links.keys().copied().collect();
        names.sort_unstable();
        names
    }

    /// Detaches every program now (the process is about to exit).
    pub fn detach(&self) {
        self.lock().links.clear();
    }
}

fn lock_state(state: &Mutex<AttachState>) -> std::sync::MutexGuard<'_, AttachState> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Creates the histogram entries of every disk's common operations from user space.
///
/// A BPF program that inserts into a per-CPU hash allocates in the completion's interrupt
/// context, where the kernel's BPF allocator can fail under memory pressure (the IO would be
/// lost, and counted as `hist_map_full`). User space allocates reliably, so the entries of known
/// disks exist before their first IO; zero entries are not exported, so a pair still appears only
/// after it did IO.
fn precreate_entries(hists: &MapHandle, ops: &[u32], sys_block: &Path, st: &mut AttachState) {
    let Ok(cpus) = libbpf_rs::num_possible_cpus() else {
        return;
    };
    let zero = vec![vec![0u8; HIST_VALUE_SIZE]; cpus];
    for dev in topology::disk_devs(sys_block) {
        if st.prepared.contains(&dev) {
            continue;
        }
        for &op in ops {
            let key = key_bytes(types::hist_key { dev, op });
            // EEXIST: the kernel side was first; either way the entry exists.
            let _ = hists.update_percpu(&key, &zero, MapFlags::NO_EXIST);
        }
        st.prepared.insert(dev);
    }
}

/// Makes the histogram entries of disks that appear while nobody scrapes (a zram device
/// hot-added, a dm device created), within DISKS_WATCH of their appearing: scrapes may be a minute
/// apart, and until the entries exist a disk's first IOs allocate in interrupt context. A disk
/// that does IO within that second is still counted (the program creates the entry, or counts
/// the IO lost). Ends when the programs are unloaded.
///
/// It also compares the agent's counts with /sys/block/DEV/stat once per DISKS_WATCH (see
/// unobserved.rs).
fn watch_disks(
    state: Weak<Mutex<AttachState>>,
    hists: MapHandle,
    ops: Vec<u32>,
    sys_block: PathBuf,
    reader: MapReader,
    groups: StatGroups,
) {
    let mut compared: Vec<topology::StatDisk> = Vec::new();
    let mut compared_at: Option<(Instant, BTreeSet<std::ffi::OsString>)> = None;
    loop {
        std::thread::sleep(DISKS_WATCH);
        let Some(state) = state.upgrade() else {
            return;
        };
        let names = topology::disk_names(&sys_block);
        {
            let mut st = lock_state(&state);
            if names != st.prepared_names {
                st.prepared_names = names.clone();
                precreate_entries(&hists, &ops, &sys_block, &mut st);
            }
        }
        // Which disks to compare is a few sysfs reads per disk: redone when disks come or go
        // and every DISKS_RECHECK (iostats switched, a loop device bound).
        let stale = compared_at
            .as_ref()
            .is_none_or(|(at, seen)| *seen != names || at.elapsed() >= DISKS_RECHECK);
        if stale {
            let now = topology::stat_disks(&sys_block);
            let kept: HashSet<u32> = now.iter().map(|d| d.dev).collect();
            let mut u = reader.unobserved_state();
            for d in compared.iter().filter(|d| !kept.contains(&d.dev)) {
                u.gone(d.dev);
            }
            drop(u);
            compared = now;
            compared_at = Some((Instant::now(), names));
        }
        check_unobserved(&reader, &compared, &groups);
    }
}

/// A disk's completions as the agent counted them, per stat group.
#[derive(Debug, Default, Clone, Copy)]
struct AgentCounts {
    groups: [u64; GROUPS],
    /// Operations whose stat group is unknown (classic tracepoints' "other").
    ungrouped: u64,
}

/// Operation codes of the running kernel that stat counts apart from reads and writes.
#[derive(Debug, Clone, Copy)]
struct StatGroups {
    discard: Option<u32>,
    flush: Option<u32>,
}

fn read_stat(disk: &topology::StatDisk) -> Option<DiskStat> {
    unobserved::parse_stat(&std::fs::read_to_string(disk.dir.join("stat")).ok()?)
}

/// One comparison of the agent's counts with /sys/block/DEV/stat: stat, then the maps, then stat
/// again, for the disks with nothing in flight at the first read.
fn check_unobserved(reader: &MapReader, disks: &[topology::StatDisk], groups: &StatGroups) {
    let mut idle = Vec::new();
    let mut busy = Vec::new();
    let mut gone = Vec::new();
    for d in disks {
        match read_stat(d) {
            None => gone.push(d.dev),
            Some(s) if s.in_flight > 0 => busy.push(d.dev),
            Some(s) => {
                let seq = std::fs::read_to_string(d.dir.join("diskseq"))
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0);
                idle.push((d, s, seq));
            }
        }
    }
    let readings = if idle.is_empty() {
        Vec::new()
    } else {
        let devs: HashSet<u32> = idle.iter().map(|(d, _, _)| d.dev).collect();
        let counts = reader.agent_counts(&devs, groups);
        let lost = reader.program_losses();
        let (Ok(counts), Ok(lost)) = (counts, lost) else {
            return; // the maps are going away with the programs
        };
        let Ok(bss) = reader.read_bss() else {
            return;
        };
        let reported = lost.iter().sum::<u64>() + bss.classic_empty_writes;
        idle.into_iter()
            .map(|(d, before, seq)| {
                let after = read_stat(d).unwrap_or(DiskStat {
                    in_flight: u64::MAX, // vanished meanwhile: not comparable
                    ..before
                });
                let agent = counts.get(&d.dev).copied().unwrap_or_default();
                (
                    d.dev,
                    Reading {
                        seq,
                        before,
                        agent: agent.groups,
                        reported: reported + agent.ungrouped,
                        after,
                    },
                )
            })
            .collect()
    };
    let mut u = reader.unobserved_state();
    for dev in gone {
        u.gone(dev);
    }
    for dev in busy {
        u.busy(dev);
    }
    for (dev, r) in &readings {
        let new = u.check(*dev, r);
        if new > 0 {
            let device = format!(
                "{}:{}",
                crate::devices::major(*dev),
                crate::devices::minor(*dev)
            );
            tracing::warn!(%device, completions = new, "completions counted by the block layer (/sys/block/DEV/stat) never ran the programs: counted lost (reason unobserved_completion)");
        }
    }
}

/// Reads the histogram maps; cheap to clone, usable from any thread (owns duplicated map fds).
#[derive(Debug)]
pub struct MapReader {
    hists: MapHandle,
    lost: MapHandle,
    /// The object's .bss: the in-flight entry counters the programs keep.
    bss: MapHandle,
    recursion: std::sync::Arc<recursion::RecursionMisses>,
    /// Filled by the disk watcher, shared by every clone.
    unobserved: Arc<Mutex<Unobserved>>,
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
    fn read_hists(&self) -> Result<Vec<DeviceOpHist>, BpfError> {
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
    fn read_bss(&self) -> Result<skel::types::bss, BpfError> {
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

    fn unobserved_state(&self) -> std::sync::MutexGuard<'_, Unobserved> {
        self.unobserved
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// What the programs and the kernel count lost per IO (LOST_REASONS up to program_recursion).
    fn program_losses(&self) -> Result<[u64; LOST_PROGRAM_RECURSION + 1], BpfError> {
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

    /// The completions the programs counted per stat group, for the given disks.
    fn agent_counts(
        &self,
        devs: &HashSet<u32>,
        groups: &StatGroups,
    ) -> Result<HashMap<u32, AgentCounts>, BpfError> {
        let mut counts: HashMap<u32, AgentCounts> = HashMap::new();
        for h in self.read_hists()?.iter().filter(|h| devs.contains(&h.dev)) {
            let c = counts.entry(h.dev).or_default();
            match unobserved::group_of(h.op, groups.discard, groups.flush) {
                Some(g) => c.groups[g] += h.count(),
                None => c.ungrouped += h.count(),
            }
        }
        Ok(counts)
    }
}

/// Entries per BPF_MAP_LOOKUP_BATCH call; bounds the value buffer to this x 1 KiB x CPUs.
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

/// Checks the effective capabilities before libbpf turns their absence into an opaque EPERM.
pub fn check_capabilities() -> Result<(), BpfError> {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let Some(eff) = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
    else {
        return Ok(()); // Not Linux procfs as we know it: let the kernel decide.
    };
    let has = |cap: u32| eff & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return Ok(());
    }
    let missing: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
        .iter()
        .filter(|(c, _)| !has(*c))
        .map(|(_, n)| *n)
        .collect();
    Err(BpfError::Capabilities {
        missing: missing.join(" and "),
    })
}

/// Loads and attaches in the requested mode, or in the first that works for `auto`.
pub fn attach(requested: AttachMode) -> Result<Attached, BpfError> {
    check_capabilities()?;
    let facts = KernelFacts::probe();
    tracing::info!(
        btf = facts.has_btf,
        queue_flag_stats_bit = ?facts.queue_flag_stats_bit,
        rqf_io_stat_bit = ?facts.rqf_io_stat_bit,
        tracefs = ?facts.tracefs,
        "kernel facts"
    );
    if requested != AttachMode::Auto {
        return try_mode(requested, &facts).map_err(|reason| BpfError::ModeUnavailable {
            mode: requested,
            reason,
        });
    }
    let mut skipped = BTreeMap::new();
    for mode in PROBE_ORDER {
        match try_mode(mode, &facts) {
            Ok(attached) => {
                for (m, why) in &skipped {
                    tracing::info!(mode = %m, reason = %why, "attach mode skipped");
                }
                tracing::info!(mode = %mode, "attach mode chosen");
                return Ok(attached);
            }
            Err(why) => {
                tracing::debug!(mode = %mode, reason = %why, "attach mode unavailable");
                skipped.insert(mode, why);
            }
        }
    }
    Err(BpfError::NoModeWorks(
        skipped
            .iter()
            .map(|(m, w)| format!("{m}: {w}"))
            .collect::<Vec<_>>()
            .join("; "),
    ))
}

/// Why a mode cannot work, before trying it: the missing kernel feature, named.
fn precondition(mode: AttachMode, facts: &KernelFacts) -> Result<(), String> {
    match mode {
        AttachMode::TpBtf | AttachMode::RawTp if !facts.has_btf => {
            Err(format!("kernel BTF ({}, CONFIG_DEBUG_INFO_BTF) is missing", kernel_facts::VMLINUX_BTF))
        }
        AttachMode::Tracepoint if facts.tracefs.is_none() => Err(
            "tracefs with block events is not mounted at /sys/kernel/tracing (mount -t tracefs nodev /sys/kernel/tracing)"
                .into(),
        ),
        _ => Ok(()),
    }
}

fn set_tp_fields(dst: &mut skel::types::tp_fields, src: &TracepointFields) {
    dst.dev = src.dev;
    dst.sector = src.sector;
    dst.nr_sector = src.nr_sector;
    dst.bytes = src.bytes;
    dst.error = src.error;
    dst.rwbs = src.rwbs;
}

fn try_mode(mode: AttachMode, facts: &KernelFacts) -> Result<Attached, String> {
    precondition(mode, facts)?;
    let wanted = programs(mode);

    // The skeleton borrows its object storage for its whole life; the agent attaches once (at most
    // one failed try per mode), so leaking that small allocation is the simplest sound owner.
    let storage: &'static mut MaybeUninit<OpenObject> = Box::leak(Box::new(MaybeUninit::uninit()));
    let mut open = BioSkelBuilder::default()
        .open(storage)
        .map_err(|e| format!("opening BPF object: {e}"))?;
    for mut prog in open.open_object_mut().progs_mut() {
        let load = wanted.iter().any(|p| p.name == prog.name());
        prog.set_autoload(load);
    }
    let rodata = open
        .maps
        .rodata_data
        .as_deref_mut()
        .ok_or("BPF object has no .rodata")?;
    if let Some(bit) = facts.queue_flag_stats_bit {
        rodata.queue_flag_stats_bit = bit;
    } else {
        tracing::warn!("QUEUE_FLAG_STATS not found in kernel BTF: every request takes the start-table path (slower)");
    }
    // Absent on kernels whose RQF_* flags are #defines; the programs then trust a non-zero
    // rq->start_time_ns, which those kernels zero when they take no stamp (see bio.bpf.c).
    if let Some(bit) = facts.rqf_io_stat_bit {
        rodata.rqf_io_stat_bit = bit;
    }
    if mode == AttachMode::Tracepoint {
        let tracefs = facts.tracefs.as_deref().ok_or("tracefs missing")?;
        let issue =
            tracepoint_fields(tracefs, "block_rq_issue", false).map_err(|e| e.to_string())?;
        let complete =
            tracepoint_fields(tracefs, "block_rq_complete", true).map_err(|e| e.to_string())?;
        set_tp_fields(&mut rodata.tp_issue_fields, &issue);
        set_tp_fields(&mut rodata.tp_complete_fields, &complete);
    }

    let skel = open
        .load()
        .map_err(|e| format!("loading programs (verifier): {e}"))?;
    let maps = MapReader {
        hists: MapHandle::try_from(&skel.maps.hists).map_err(|e| e.to_string())?,
        lost: MapHandle::try_from(&skel.maps.lost_events).map_err(|e| e.to_string())?,
        bss: MapHandle::try_from(&skel.maps.bss).map_err(|e| e.to_string())?,
        recursion: std::sync::Arc::new(recursion::RecursionMisses::of(skel.object())),
        unobserved: Arc::new(Mutex::new(Unobserved::default())),
    };
    let attached = Attached {
        mode,
        facts: facts.clone(),
        maps,
        state: Arc::new(Mutex::new(AttachState {
            skel,
            links: HashMap::new(),
            prepared: HashSet::new(),
            prepared_names: BTreeSet::new(),
            disks_seen: BTreeSet::new(),
            looked_at: None,
        })),
        sys_block: PathBuf::from(topology::SYS_BLOCK),
    };
    {
        let mut st = attached.lock();
        attached.attach_role(&mut st, Role::Core)?;
        if attached.has_role(Role::Bio) {
            if let Err(e) = attached.attach_role(&mut st, Role::Bio) {
                tracing::warn!(error = %e, "bio programs not attached: bio-based disks (zram, dm, md, brd) are not measured");
            }
        }
    }
    attached.refresh(None);
    let watcher = {
        let hists = MapHandle::try_from(&attached.maps.hists).map_err(|e| e.to_string())?;
        let (state, ops) = (Arc::downgrade(&attached.state), attached.ops());
        let sys_block = attached.sys_block.clone();
        // Every mode, classic tracepoints too: they miss completions unreported as well
        // (measured: 30 in a 10 s mixed run, 1 of them counted as a recursion miss); the empty
        // writes they leave out by design are counted in .bss and taken off.
        let (reader, groups) = (
            attached.reader(),
            StatGroups {
                discard: attached.facts.ops.code("discard"),
                flush: attached.facts.ops.code("flush"),
            },
        );
        std::thread::Builder::new()
            .name("disk-watch".into())
            .spawn(move || watch_disks(state, hists, ops, sys_block, reader, groups))
    };
    if let Err(e) = watcher {
        tracing::warn!(error = %e, "no disk watcher: new disks' histogram entries are made at the next scrape");
    }
    tracing::info!(programs = ?attached.attached_programs(), "attached");
    Ok(attached)
}

fn explain_attach_error(mode: AttachMode, e: &libbpf_rs::Error) -> String {
    let kprobe_pmu = std::path::Path::new("/sys/bus/event_source/devices/kprobe").exists();
    match mode {
        AttachMode::Kprobe if !kprobe_pmu => format!(
            "{e}: the kernel has no kprobe support (CONFIG_KPROBES is off: no /sys/bus/event_source/devices/kprobe); use --attach=tp_btf, raw_tp or tracepoint"
        ),
        _ => e.to_string(),
    }
}
