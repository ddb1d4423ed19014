//! Loading, attaching and reading the BPF programs of bpf/bio.bpf.c.
//!
//! One object holds the programs of every attach mode. For a mode, the agent enables only that
//! mode's programs, loads (the verifier checks them), then attaches each; `auto` walks the modes
//! from cheapest to most portable and keeps the first that attaches, logging why others did not.
//!
//! By job: programs.rs (each mode's programs and what it needs), attach.rs (loading, attaching,
//! refreshing what is attached as disks come and go), maps.rs (reading the maps), disk_watch.rs
//! (making new disks' map entries, and comparing the counts with /sys/block/DEV/stat).
mod attach;
mod disk_watch;
pub mod kernel_facts;
mod maps;
mod programs;
mod recursion;
mod skel;
mod topology;

pub use attach::{attach, Attached};
pub use maps::MapReader;
pub use programs::AttachMode;
#[cfg(test)]
pub use skel::object_enumerators;
/// The Rust types generated from the object's BTF: map keys and values, enums, globals.
pub use skel::types;

use crate::snapshot::LayoutError;

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
