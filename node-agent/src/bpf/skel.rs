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

/// The enumerators of an enum in the object's BTF, for tests that check that the agent names every
/// value the programs can write. Reads the object build.rs compiled; needs no privileges.
#[cfg(test)]
pub fn object_enumerators(name: &str) -> Vec<(String, i64)> {
    use libbpf_rs::btf::{types::Enum, Btf};
    static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/bio.bpf.o"));
    let btf = Btf::from_raw("bio", OBJECT)
        .expect("parsing the BPF object")
        .expect("the BPF object has BTF");
    let Some(e) = btf.type_by_name::<Enum>(name) else {
        return Vec::new();
    };
    e.iter()
        .filter_map(|m| Some((m.name?.to_string_lossy().into_owned(), m.value)))
        .collect()
}
