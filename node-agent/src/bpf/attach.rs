//! Loading the object in an attach mode, attaching its programs, and attaching more (or making
//! map entries) as the host changes.
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::{Link, MapCore, MapFlags, MapHandle, OpenObject};

use super::disk_watch::{watch_disks, StatGroups};
use super::kernel_facts::{tracepoint_fields, KernelFacts, TracepointFields};
use super::maps::MapReader;
use super::programs::{
    explain_attach_error, precondition, programs, AttachMode, Role, PROBE_ORDER,
};
use super::skel::{self, BioSkel, BioSkelBuilder};
use super::{recursion, topology, types, BpfError};
use crate::snapshot::{key_bytes, Snapshot, HIST_VALUE_SIZE, LOST_NO_START_TIME};
use crate::unobserved::Unobserved;

/// Loaded programs and the links of those attached so far. Dropping this unloads them.
pub struct Attached {
    pub mode: AttachMode,
    pub facts: KernelFacts,
    maps: MapReader,
    /// Shared with the disk watcher (disk_watch.rs), which holds it weakly.
    state: Arc<Mutex<AttachState>>,
    sys_block: PathBuf,
}

pub(super) struct AttachState {
    skel: BioSkel<'static>,
    links: HashMap<&'static str, Link>,
    /// Disks whose histogram entries exist already (see precreate_entries).
    prepared: HashSet<u32>,
    /// /sys/block's names when the watcher last created entries (disk_watch.rs).
    pub(super) prepared_names: BTreeSet<std::ffi::OsString>,
    /// /sys/block's names at the last look at the disks, and when that was (see refresh).
    disks_seen: BTreeSet<std::ffi::OsString>,
    looked_at: Option<Instant>,
}

/// How often refresh looks at every disk again although none came or went: what only a disk's
/// attributes say (a zram device given a size, writeback throttling turned off) is noticed
/// within this time. Looking reads a few sysfs files per disk, which on a host with many disks
/// costs more than the rest of a scrape.
pub(super) const DISKS_RECHECK: Duration = Duration::from_secs(10);

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

pub(super) fn lock_state(state: &Mutex<AttachState>) -> std::sync::MutexGuard<'_, AttachState> {
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
pub(super) fn precreate_entries(
    hists: &MapHandle,
    ops: &[u32],
    sys_block: &Path,
    st: &mut AttachState,
) {
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
