//! The programs of each attach mode, what a mode needs from the kernel, and the order `auto`
//! tries the modes in.
use super::kernel_facts::{self, KernelFacts};

/// Defined with the rest of the command line, which the operator shares.
pub use bio_agent_args::AttachMode;

pub(super) const PROBE_ORDER: [AttachMode; 4] = [
    AttachMode::TpBtf,
    AttachMode::RawTp,
    AttachMode::Tracepoint,
    AttachMode::Kprobe,
];

/// When a program is attached. Every program of the mode is loaded (and verified) at start;
/// attaching is what costs time on every IO, so programs that only some hosts need wait until
/// the host needs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    /// Always attached; the mode fails without it.
    Core,
    /// Issue-time stamps, only for request queues that do not keep their own (see bio.bpf.c).
    Issue,
    /// Bio tracepoints, attached at start: a bio-based disk (zram, dm, md, brd) can appear at any
    /// moment and must be measured from its first IO, which no look at sysfs can promise. On
    /// request-based disks the queue program returns after one check (see bio.bpf.c).
    Bio,
}

pub(super) struct ModeProgram {
    pub(super) name: &'static str,
    pub(super) role: Role,
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

pub(super) fn programs(mode: AttachMode) -> &'static [ModeProgram] {
    match mode {
        AttachMode::Auto => &[],
        AttachMode::TpBtf => TP_BTF_PROGRAMS,
        AttachMode::RawTp => RAW_TP_PROGRAMS,
        AttachMode::Tracepoint => TRACEPOINT_PROGRAMS,
        AttachMode::Kprobe => KPROBE_PROGRAMS,
    }
}

/// Why a mode cannot work, before trying it: the missing kernel feature, named.
pub(super) fn precondition(mode: AttachMode, facts: &KernelFacts) -> Result<(), String> {
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

pub(super) fn explain_attach_error(mode: AttachMode, e: &libbpf_rs::Error) -> String {
    let kprobe_pmu = std::path::Path::new("/sys/bus/event_source/devices/kprobe").exists();
    match mode {
        AttachMode::Kprobe if !kprobe_pmu => format!(
            "{e}: the kernel has no kprobe support (CONFIG_KPROBES is off: no /sys/bus/event_source/devices/kprobe); use --attach=tp_btf, raw_tp or tracepoint"
        ),
        _ => e.to_string(),
    }
}
