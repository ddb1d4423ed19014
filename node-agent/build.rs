//! Compiles bpf/bio.bpf.c and embeds it as a libbpf skeleton, so the agent is one executable.
use std::env;
use std::path::PathBuf;

use libbpf_cargo::SkeletonBuilder;

const SRC: &str = "../bpf/bio.bpf.c";

fn main() {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let out = out_dir.join("bio.skel.rs");
    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("CARGO_CFG_TARGET_ARCH is set by cargo");
    // bpf_tracing.h picks the pt_regs layout (kprobe arguments) by this name.
    let target_arch = match arch.as_str() {
        "x86_64" => "x86",
        "aarch64" => "arm64",
        "riscv64" => "riscv",
        "powerpc64" => "powerpc",
        "s390x" => "s390",
        other => other,
    };
    SkeletonBuilder::new()
        .source(SRC)
        // Kept where the unit tests find it: they read its BTF to check that every enumerator the
        // programs can write has a name on the Rust side (snapshot.rs, ops.rs).
        .obj(out_dir.join("bio.bpf.o"))
        .clang_args([
            format!("-D__TARGET_ARCH_{target_arch}"),
            "-Wall".into(),
            "-O2".into(),
        ])
        .build_and_generate(&out)
        .expect("compiling bpf/bio.bpf.c (needs clang and libbpf headers: run `make deps`)");
    println!("cargo:rerun-if-changed=../bpf");
}
