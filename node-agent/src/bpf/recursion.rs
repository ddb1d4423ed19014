//! IOs the kernel never showed our programs: a tracepoint program is not re-entered on a CPU
//! where it is already running. When a completion arrives in an interrupt while the same program
//! runs for another completion on that CPU, the kernel skips the nested run and counts it in the
//! program's `recursion_misses`. Such an IO is missing from the histograms (or, for a partial
//! completion's last step, leaves its bytes in the partials table), so the sum over our programs
//! is exported as a lost-event reason.
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use libbpf_rs::libbpf_sys;
use libbpf_rs::Object;

#[derive(Debug)]
pub struct RecursionMisses {
    programs: Vec<OwnedFd>,
}

impl RecursionMisses {
    /// Every program of the object, attached now or later: the counter lives with the program.
    pub fn of(object: &Object) -> Self {
        let programs = object
            .progs()
            .filter_map(|p| p.as_fd().try_clone_to_owned().ok())
            .collect();
        Self { programs }
    }

    /// Runs skipped since the programs loaded. A program whose info cannot be read counts 0.
    pub fn total(&self) -> u64 {
        self.programs
            .iter()
            .filter_map(|fd| misses(fd.as_fd()))
            .sum()
    }
}

fn misses(fd: BorrowedFd<'_>) -> Option<u64> {
    let mut info = libbpf_sys::bpf_prog_info::default();
    let mut len = std::mem::size_of::<libbpf_sys::bpf_prog_info>() as u32;
    // SAFETY: `info` is a writable bpf_prog_info of `len` bytes, and the kernel writes at most
    // `len` bytes into it. Every pointer field of `info` is zero (default), so the kernel writes
    // nothing through them.
    let ret = unsafe { libbpf_sys::bpf_prog_get_info_by_fd(fd.as_raw_fd(), &mut info, &mut len) };
    (ret == 0).then_some(info.recursion_misses)
}
