//! Loading, attaching and reading the BPF programs of bpf/bio.bpf.c.
//!
//! One object holds the programs of every attach mode. For a mode, the agent enables only that
//! mode's programs, loads (the verifier checks them), then attaches each; `auto` walks the modes
//! from cheapest to most portable and keeps the first that attaches, logging why others did not.
pub mod kernel_facts;
mod skel;

use std::collections::BTreeMap;
use std::fmt;
use std::mem::MaybeUninit;

use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::{Link, MapCore, MapFlags, MapHandle, OpenObject};

use crate::snapshot::{parse_key, DeviceOpHist, LayoutError, Snapshot, LOST_REASONS};
use kernel_facts::{tracepoint_fields, KernelFacts, TracepointFields};
use skel::{BioSkel, BioSkelBuilder};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum AttachMode {
    /// Probe tp_btf, raw_tp, tracepoint, kprobe in this order.
    Auto,
    /// BTF-typed tracepoints: direct loads, the cheapest (kernel BTF, 5.5+).
    #[value(name = "tp_btf")]
    TpBtf,
    /// Raw tracepoints with CO-RE reads (kernel BTF).
    #[value(name = "raw_tp")]
    RawTp,
    /// Classic tracepoints: no BTF needed, needs tracefs; operations only as rwbs tells them.
    Tracepoint,
    /// The seed's original method (kernel CONFIG_KPROBES).
    Kprobe,
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachMode::Auto => "auto",
            AttachMode::TpBtf => "tp_btf",
            AttachMode::RawTp => "raw_tp",
            AttachMode::Tracepoint => "tracepoint",
            AttachMode::Kprobe => "kprobe",
        })
    }
}

const PROBE_ORDER: [AttachMode; 4] = [
    AttachMode::TpBtf,
    AttachMode::RawTp,
    AttachMode::Tracepoint,
    AttachMode::Kprobe,
];

/// A program of a mode, and whether the mode is useless without it.
struct ModeProgram {
    name: &'static str,
    required: bool,
}

const fn req(name: &'static str) -> ModeProgram {
    ModeProgram {
        name,
        required: true,
    }
}

/// Bio-based disks only exist on some hosts, and these tracepoints only on newer kernels:
/// without them request-based disks are still measured.
const fn opt(name: &'static str) -> ModeProgram {
    ModeProgram {
        name,
        required: false,
    }
}

const TP_BTF_PROGRAMS: &[ModeProgram] = &[
    req("btf_rq_issue"),
    req("btf_rq_complete"),
    opt("btf_bio_queue"),
    opt("btf_bio_complete"),
];
const RAW_TP_PROGRAMS: &[ModeProgram] = &[
    req("raw_rq_issue"),
    req("raw_rq_complete"),
    opt("raw_bio_queue"),
    opt("raw_bio_complete"),
];
const TRACEPOINT_PROGRAMS: &[ModeProgram] = &[req("tp_rq_issue"), req("tp_rq_complete")];
const KPROBE_PROGRAMS: &[ModeProgram] = &[req("kp_rq_issue"), req("kp_rq_complete")];

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

/// Attached programs. Dropping this detaches and unloads them.
pub struct Attached {
    pub mode: AttachMode,
    pub facts: KernelFacts,
    _links: Vec<Link>,
    _skel: BioSkel<'static>,
    maps: MapReader,
}

impl Attached {
    pub fn reader(&self) -> MapReader {
        self.maps.clone()
    }
}

/// Reads the histogram maps; cheap to clone, usable from any thread (owns duplicated map fds).
#[derive(Debug)]
pub struct MapReader {
    hists: MapHandle,
    lost: MapHandle,
    /// The object's .bss: the in-flight entry counters the programs keep.
    bss: MapHandle,
}

impl Clone for MapReader {
    fn clone(&self) -> Self {
        Self {
            hists: MapHandle::try_from(&self.hists).expect("dup of an open map fd"),
            lost: MapHandle::try_from(&self.lost).expect("dup of an open map fd"),
            bss: MapHandle::try_from(&self.bss).expect("dup of an open map fd"),
        }
    }
}

impl MapReader {
    /// One pass over the maps: O(device/operation pairs), independent of the IO rate.
    pub fn snapshot(&self) -> Result<Snapshot, BpfError> {
        let mut hists = Vec::new();
        for key in self.hists.keys() {
            let (dev, op) = parse_key(&key)?;
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
            let mut h = DeviceOpHist::empty(dev, op);
            for cpu_value in &per_cpu {
                h.add_cpu_value(cpu_value)?;
            }
            hists.push(h);
        }
        let mut lost = [0u64; LOST_REASONS.len()];
        for (i, slot) in lost.iter_mut().enumerate() {
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
        let bss = self
            .bss
            .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)
            .map_err(|source| BpfError::MapRead {
                map: ".bss",
                source,
            })?
            .unwrap_or_default();
        let word = |i: usize| {
            bss.get(i * 8..i * 8 + 8)
                .map_or(0, |b| u64::from_ne_bytes(b.try_into().expect("8 bytes")))
        };
        // start_entries and partial_entries lead .bss, in declaration order.
        let inflight = [word(0), word(1)];
        Ok(Snapshot {
            hists,
            lost,
            inflight,
        })
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
        let name = prog.name().to_string_lossy().into_owned();
        prog.set_autoload(wanted.iter().any(|p| p.name == name));
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
    let mut links = Vec::new();
    for prog in skel.object().progs_mut() {
        let name = prog.name().to_string_lossy().into_owned();
        let Some(want) = wanted.iter().find(|p| p.name == name) else {
            continue;
        };
        match prog.attach() {
            Ok(link) => links.push(link),
            Err(e) if want.required => {
                return Err(format!(
                    "programs loaded and passed the verifier, but attaching {name} failed: {}",
                    explain_attach_error(mode, &e)
                ));
            }
            Err(e) => {
                tracing::warn!(program = %name, error = %e, "optional program not attached: bio-based disks (zram, dm, md) are not measured")
            }
        }
    }
    let maps = MapReader {
        hists: MapHandle::try_from(&skel.maps.hists).map_err(|e| e.to_string())?,
        lost: MapHandle::try_from(&skel.maps.lost_events).map_err(|e| e.to_string())?,
        bss: MapHandle::try_from(&skel.maps.bss).map_err(|e| e.to_string())?,
    };
    Ok(Attached {
        mode,
        facts: facts.clone(),
        _links: links,
        _skel: skel,
        maps,
    })
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
