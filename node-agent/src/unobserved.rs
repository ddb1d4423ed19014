//! Completions the block layer accounted in `/sys/block/DEV/stat` that the programs were never run
//! for (`ebpf_bio_lost_events_total{reason="unobserved_completion"}`).
//!
//! Under heavy mixed load the kernel now and then does not run our `block_rq_complete` program
//! for a burst of completions and counts nothing for it (docs/performance.md, "Counts under a
//! mixed load"). No program can count what it never runs for, so user space compares: the
//! programs observe a completion at `block_rq_complete`, before the block layer accounts it in
//! stat. So the difference stat − agent per stat group is exact only at an instant when no IO of
//! that disk sits between those two points. An idle check reads stat, then the agent's counts,
//! then stat again: with nothing in flight both times and no counter moved, the disk was idle
//! across the read. A disk's first such check after it was quiet for a whole check interval is its
//! baseline; at every later idle check the loss since the baseline is
//! `(S − A) − (S0 − A0)` per group, less what went missing for a known reason in that window:
//! the programs' reported losses and, in classic tracepoint mode, the empty writes it leaves out
//! (neither is per disk: preferring to under-report, all of them are taken off). A loss never un-happens, so each disk's figure only ratchets up. A disk that is never
//! idle reports its losses at its first idle moment.
//!
//! The arithmetic is here, apart from sysfs and the maps, so it is tested without a kernel.
use std::collections::HashMap;

/// Stat groups as the kernel's `op_stat_group()` forms them, and flushes (stat's fields 1, 5, 12
/// and 16).
pub const GROUPS: usize = 4;
const READ: usize = 0;
const WRITE: usize = 1;
const DISCARD: usize = 2;
const FLUSH: usize = 3;

/// What `/sys/block/DEV/stat` says, as far as this check needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiskStat {
    /// Completed IOs per group.
    pub ios: [u64; GROUPS],
    /// Field 9: IOs started and not yet accounted done.
    pub in_flight: u64,
}

/// Parses `/sys/block/DEV/stat`. Kernels before 4.18 (no discard fields) and 5.5 (no flush
/// fields) show those groups as 0: the agent's counts there only lower the difference, never
/// raise it.
pub fn parse_stat(text: &str) -> Option<DiskStat> {
    let fields: Vec<u64> = text
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let at = |i: usize| fields.get(i).copied().unwrap_or(0);
    if fields.len() < 9 {
        return None;
    }
    Some(DiskStat {
        ios: [at(0), at(4), at(11), at(15)],
        in_flight: at(8),
    })
}

/// The stat group of an operation code of the running kernel (`op_stat_group()`: discards apart,
/// every other operation with the write bit (the low bit of REQ_OP_*) a write, the rest reads),
/// flushes apart as stat counts them. Classic-tracepoint codes group as their names say; their
/// "other" (rwbs "N": write-zeroes, zone operations) may be either group, so it has none.
pub fn group_of(op: u32, discard: Option<u32>, flush: Option<u32>) -> Option<usize> {
    use crate::ops::{
        CLASSIC_DISCARD, CLASSIC_FLUSH, CLASSIC_OP_BASE, CLASSIC_READ, CLASSIC_WRITE,
    };
    if op >= CLASSIC_OP_BASE {
        match op {
            CLASSIC_READ => Some(READ),
            CLASSIC_WRITE => Some(WRITE),
            CLASSIC_FLUSH => Some(FLUSH),
            CLASSIC_DISCARD => Some(DISCARD),
            _ => None,
        }
    } else if Some(op) == discard {
        Some(DISCARD)
    } else if Some(op) == flush {
        Some(FLUSH)
    } else if op & 1 == 1 {
        Some(WRITE)
    } else {
        Some(READ)
    }
}

/// One disk, read in this order: stat, then the agent, then stat again.
#[derive(Debug, Clone, Copy)]
pub struct Reading {
    /// Changes when the kernel makes a new disk under the same number (`diskseq`; 0 if unknown).
    pub seq: u64,
    pub before: DiskStat,
    /// The agent's completions of the disk per group.
    pub agent: [u64; GROUPS],
    /// Completions missing from `agent` for a known reason: every loss the programs reported (any
    /// disk, every per-IO reason), the disk's operations that have no group, and the empty
    /// writes classic tracepoint mode leaves out (any disk).
    pub reported: u64,
    pub after: DiskStat,
}

impl Reading {
    fn idle(&self) -> bool {
        self.before.in_flight == 0 && self.after.in_flight == 0 && self.before.ios == self.after.ios
    }
}

#[derive(Debug, Clone, Copy)]
struct Baseline {
    seq: u64,
    stat: [u64; GROUPS],
    agent: [u64; GROUPS],
    reported: u64,
}

#[derive(Debug, Default)]
struct Disk {
    /// Stat's counters at the last idle check, if the check before this one was idle.
    last_idle: Option<[u64; GROUPS]>,
    baseline: Option<Baseline>,
    /// Losses since the baseline (a running maximum) and from earlier baselines.
    since_baseline: u64,
    carried: u64,
}

impl Disk {
    fn total(&self) -> u64 {
        self.carried + self.since_baseline
    }

    /// A new baseline is taken later; what was lost stays counted.
    fn drop_baseline(&mut self) {
        self.carried += self.since_baseline;
        self.since_baseline = 0;
        self.baseline = None;
        self.last_idle = None;
    }
}

/// Per disk (kernel dev_t), what was found lost so far.
#[derive(Debug, Default)]
pub struct Unobserved {
    disks: HashMap<u32, Disk>,
}

impl Unobserved {
    /// A disk that is busy or does not count (bio-based, iostats off) at this check: its next
    /// baseline needs two idle checks in a row again.
    pub fn busy(&mut self, dev: u32) {
        if let Some(d) = self.disks.get_mut(&dev) {
            d.last_idle = None;
        }
    }

    /// A disk gone from /sys/block: a disk made later under its number starts afresh.
    pub fn gone(&mut self, dev: u32) {
        if let Some(d) = self.disks.get_mut(&dev) {
            d.drop_baseline();
        }
    }

    /// Returns how many completions this check found lost that earlier ones had not.
    pub fn check(&mut self, dev: u32, r: &Reading) -> u64 {
        let d = self.disks.entry(dev).or_default();
        if !r.idle() {
            d.last_idle = None;
            return 0;
        }
        let stat = r.after.ios;
        if let Some(b) = d.baseline {
            // A new disk under the same number, or counters that went back: not comparable.
            let went_back = (0..GROUPS).any(|g| stat[g] < b.stat[g] || r.agent[g] < b.agent[g]);
            if b.seq != r.seq || went_back {
                d.drop_baseline();
            }
        }
        // The baseline must be exact: an IO observed and not yet accounted at that instant would
        // read as a loss later. A disk whose counters stood still over a whole check interval
        // has none in that window, whatever its in-flight count says.
        let quiet = d.last_idle == Some(stat);
        d.last_idle = Some(stat);
        match d.baseline {
            None if quiet => {
                d.baseline = Some(Baseline {
                    seq: r.seq,
                    stat,
                    agent: r.agent,
                    reported: r.reported,
                })
            }
            None => {}
            Some(b) => {
                // Per group: where the agent legitimately counts more, the group shows no loss
                // rather than hiding another group's.
                let short: u64 = (0..GROUPS)
                    .map(|g| (stat[g] - b.stat[g]).saturating_sub(r.agent[g] - b.agent[g]))
                    .sum();
                let reported = r.reported.saturating_sub(b.reported);
                let was = d.since_baseline;
                d.since_baseline = was.max(short.saturating_sub(reported));
                return d.since_baseline - was;
            }
        }
        0
    }

    /// Losses per disk, for the disks that had any.
    pub fn losses(&self) -> Vec<(u32, u64)> {
        let mut v: Vec<_> = self
            .disks
            .iter()
            .map(|(&dev, d)| (dev, d.total()))
            .filter(|&(_, n)| n > 0)
            .collect();
        v.sort_unstable();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEV: u32 = 7 << 20;

    fn idle(stat: [u64; GROUPS], agent: [u64; GROUPS], reported: u64) -> Reading {
        let s = DiskStat {
            ios: stat,
            in_flight: 0,
        };
        Reading {
            seq: 1,
            before: s,
            agent,
            reported,
            after: s,
        }
    }

    fn lost(u: &Unobserved) -> u64 {
        u.losses().iter().map(|(_, n)| n).sum()
    }

    /// Two quiet idle checks: the baseline.
    fn baseline(u: &mut Unobserved, stat: [u64; GROUPS], agent: [u64; GROUPS]) {
        assert_eq!(u.check(DEV, &idle(stat, agent, 0)), 0);
        assert_eq!(u.check(DEV, &idle(stat, agent, 0)), 0);
    }

    #[test]
    fn parses_stat_fields() {
        let s = parse_stat(
            "  12974110 14 104970336 2074722 10505174 26229 85304846 2035100 3 667252 4152493 6497 0 25166008 10003 605013 32666\n",
        )
        .unwrap();
        assert_eq!(s.ios, [12974110, 10505174, 6497, 605013]);
        assert_eq!(s.in_flight, 3);
        // 4.x: no discard or flush fields.
        let old = parse_stat("1 0 8 0 2 0 16 0 0 4 4").unwrap();
        assert_eq!((old.ios, old.in_flight), ([1, 2, 0, 0], 0));
        assert!(parse_stat("1 2 x").is_none());
        assert!(parse_stat("").is_none());
    }

    #[test]
    fn groups_operations_like_the_kernel() {
        let (discard, flush) = (Some(3), Some(2));
        let g = |op| group_of(op, discard, flush);
        assert_eq!(g(0), Some(READ));
        assert_eq!(g(1), Some(WRITE));
        assert_eq!(g(9), Some(WRITE), "write_zeroes counts as a write");
        assert_eq!(g(5), Some(WRITE), "secure_erase counts as a write");
        assert_eq!(g(34), Some(READ), "drv_in");
        assert_eq!(g(3), Some(DISCARD));
        assert_eq!(g(2), Some(FLUSH));
        let classic = g;
        assert_eq!(
            [0x100, 0x101, 0x102, 0x103].map(classic),
            [Some(READ), Some(WRITE), Some(FLUSH), Some(DISCARD)],
            "classic-tracepoint codes"
        );
        assert_eq!(classic(0x1ff), None, "rwbs N: read or write, unknown");
    }

    #[test]
    fn reports_the_shortfall_since_the_baseline_per_group() {
        let mut u = Unobserved::default();
        // Before the baseline the agent may have missed anything (it started late): not a loss.
        baseline(&mut u, [100, 50, 0, 0], [90, 50, 0, 0]);
        assert_eq!(lost(&u), 0);
        assert_eq!(u.check(DEV, &idle([200, 80, 5, 1], [187, 79, 5, 1], 0)), 4);
        assert_eq!(lost(&u), 3 + 1);
        // More writes than stat (e.g. a legitimate extra) do not hide the reads' loss.
        u.check(DEV, &idle([205, 90, 5, 1], [190, 95, 5, 1], 0));
        assert_eq!(lost(&u), 5);
        // Later the agent has more reads than stat (the same 5 seen twice would be a bug
        // elsewhere); a loss never un-happens.
        u.check(DEV, &idle([206, 90, 5, 1], [197, 95, 5, 1], 0));
        assert_eq!(u.losses(), vec![(DEV, 5)]);
    }

    #[test]
    fn waits_for_an_idle_moment() {
        let mut u = Unobserved::default();
        baseline(&mut u, [0; GROUPS], [0; GROUPS]);
        let mut busy = idle([10, 0, 0, 0], [5, 0, 0, 0], 0);
        busy.before.in_flight = 2;
        u.check(DEV, &busy);
        let mut moved = idle([10, 0, 0, 0], [5, 0, 0, 0], 0);
        moved.after.ios[0] = 11;
        u.check(DEV, &moved);
        busy.before.in_flight = 0;
        busy.after.in_flight = 1;
        u.check(DEV, &busy);
        assert_eq!(
            lost(&u),
            0,
            "no comparison while IO is between observation and accounting"
        );
        u.check(DEV, &idle([12, 0, 0, 0], [11, 0, 0, 0], 0));
        assert_eq!(lost(&u), 1);
    }

    #[test]
    fn baseline_needs_a_quiet_interval() {
        let mut u = Unobserved::default();
        // One idle check after activity: an IO could sit between observation and accounting.
        u.check(DEV, &idle([10, 0, 0, 0], [11, 0, 0, 0], 0));
        u.check(DEV, &idle([12, 0, 0, 0], [12, 0, 0, 0], 0));
        // Had [10]/[11] been the baseline, this would read as a loss of 1.
        u.check(DEV, &idle([13, 0, 0, 0], [13, 0, 0, 0], 0));
        assert_eq!(lost(&u), 0);
        // A busy check in between also breaks the quiet interval.
        let mut u = Unobserved::default();
        u.check(DEV, &idle([10, 0, 0, 0], [11, 0, 0, 0], 0));
        u.busy(DEV);
        u.check(DEV, &idle([10, 0, 0, 0], [11, 0, 0, 0], 0));
        u.check(DEV, &idle([12, 0, 0, 0], [12, 0, 0, 0], 0));
        assert_eq!(lost(&u), 0);
    }

    #[test]
    fn losses_the_programs_reported_are_not_counted_twice() {
        let mut u = Unobserved::default();
        u.check(DEV, &idle([0; GROUPS], [0; GROUPS], 7));
        u.check(DEV, &idle([0; GROUPS], [0; GROUPS], 7));
        u.check(DEV, &idle([10, 0, 0, 0], [8, 0, 0, 0], 8));
        assert_eq!(lost(&u), 1);
        u.check(DEV, &idle([10, 0, 0, 0], [8, 0, 0, 0], 10));
        assert_eq!(lost(&u), 1, "ratchet: reported later, already counted");
    }

    #[test]
    fn a_new_disk_under_the_same_number_starts_afresh() {
        let mut u = Unobserved::default();
        baseline(&mut u, [100, 0, 0, 0], [100, 0, 0, 0]);
        u.check(DEV, &idle([105, 0, 0, 0], [103, 0, 0, 0], 0));
        assert_eq!(lost(&u), 2);
        // diskseq changed: stat restarted from 0 while the agent's counts go on.
        let mut r = idle([500, 0, 0, 0], [103, 0, 0, 0], 0);
        r.seq = 2;
        u.check(DEV, &r);
        u.check(DEV, &r);
        u.check(DEV, &r);
        assert_eq!(
            lost(&u),
            2,
            "the old loss stays, no new one from the restart"
        );
        u.gone(DEV);
        u.check(DEV, &idle([1, 0, 0, 0], [104, 0, 0, 0], 0));
        u.check(DEV, &idle([1, 0, 0, 0], [104, 0, 0, 0], 0));
        u.check(DEV, &idle([3, 0, 0, 0], [105, 0, 0, 0], 0));
        assert_eq!(lost(&u), 3);
    }
}
