//! The disk watcher: makes the histogram entries of disks that appear between scrapes, and
//! compares the agent's counts with /sys/block/DEV/stat (see unobserved.rs).
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

use libbpf_rs::MapHandle;

use super::attach::{lock_state, precreate_entries, AttachState, DISKS_RECHECK};
use super::maps::MapReader;
use super::{topology, BpfError};
use crate::unobserved::{self, DiskStat, Reading, GROUPS};

/// How often the disk watcher reads /sys/block's names (one directory read), so that a new disk's
/// histogram entries are made by user space within this time, not at the next scrape.
const DISKS_WATCH: Duration = Duration::from_secs(1);

/// Makes the histogram entries of disks that appear while nobody scrapes (a zram device
/// hot-added, a dm device created), within DISKS_WATCH of their appearing: scrapes may be a minute
/// apart, and until the entries exist a disk's first IOs allocate in interrupt context. A disk
/// that does IO within that second is still counted (the program creates the entry, or counts
/// the IO lost). Ends when the programs are unloaded.
///
/// It also compares the agent's counts with /sys/block/DEV/stat once per DISKS_WATCH (see
/// unobserved.rs).
pub(super) fn watch_disks(
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
pub(super) struct StatGroups {
    pub(super) discard: Option<u32>,
    pub(super) flush: Option<u32>,
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
        let counts = agent_counts(reader, &devs, groups);
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

/// The completions the programs counted per stat group, for the given disks.
fn agent_counts(
    reader: &MapReader,
    devs: &HashSet<u32>,
    groups: &StatGroups,
) -> Result<HashMap<u32, AgentCounts>, BpfError> {
    let mut counts: HashMap<u32, AgentCounts> = HashMap::new();
    for h in reader
        .read_hists()?
        .iter()
        .filter(|h| devs.contains(&h.dev))
    {
        let c = counts.entry(h.dev).or_default();
        match unobserved::group_of(h.op, groups.discard, groups.flush) {
            Some(g) => c.groups[g] += h.count(),
            None => c.ungrouped += h.count(),
        }
    }
    Ok(counts)
}
