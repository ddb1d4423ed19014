//! The libbpf skeleton generated from bpf/bio.bpf.c by build.rs.
#![allow(
    clippy::all,
    clippy::pedantic,
    non_camel_case_types,
    non_snake_case,
    dead_code,
    unused_imports
)]
include!(concat!(env!("OUT_DIR"), "/bio.skel.rs"));
