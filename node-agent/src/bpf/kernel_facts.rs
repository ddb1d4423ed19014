//! What the agent learns about the running kernel before loading: BTF facts CO-RE cannot
//! relocate, and classic-tracepoint record layouts from tracefs.
use std::path::{Path, PathBuf};

use libbpf_rs::btf::{types::Enum, Btf};

use crate::ops::OpNames;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
const TRACEFS_MOUNTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

#[derive(Debug, Clone)]
pub struct KernelFacts {
    pub has_btf: bool,
    /// Bit of QUEUE_FLAG_STATS in request_queue.queue_flags (an anonymous enum: no CO-RE).
    pub queue_flag_stats_bit: Option<u32>,
    /// Bit of __RQF_IO_STAT in request.rq_flags (an enumerator of `enum rqf_flags`, anonymous
    /// before 2025: no CO-RE; older kernels had #defines, absent from BTF).
    pub rqf_io_stat_bit: Option<u32>,
    pub ops: OpNames,
    pub tracefs: Option<PathBuf>,
}

impl KernelFacts {
    pub fn probe() -> Self {
        let has_btf = Path::new(VMLINUX_BTF).exists();
        let btf = if has_btf {
            Btf::from_vmlinux()
                .map_err(|e| tracing::warn!(error = %e, "cannot parse kernel BTF"))
                .ok()
        } else {
            None
        };
        let bit = |btf: &Btf, name: &str| {
            enumerator(btf, name)
                .and_then(|v| u32::try_from(v).ok())
                .filter(|b| *b < 32)
        };
        let (queue_flag_stats_bit, rqf_io_stat_bit, ops) = match &btf {
            Some(btf) => (
                enumerator(btf, "QUEUE_FLAG_STATS").and_then(|v| u32::try_from(v).ok()),
                bit(btf, "__RQF_IO_STAT"),
                req_op_names(btf),
            ),
            None => (None, None, OpNames::current_kernel()),
        };
        let tracefs = TRACEFS_MOUNTS
            .iter()
            .map(PathBuf::from)
            .find(|p| p.join("events/block").is_dir());
        Self {
            has_btf: btf.is_some(),
            queue_flag_stats_bit,
            rqf_io_stat_bit,
            ops,
            tracefs,
        }
    }
}

impl KernelFacts {
    /// Operation codes most disks see, whose histogram entries are created ahead of time.
    pub fn common_ops(&self, mode: super::AttachMode) -> Vec<u32> {
        match mode {
            super::AttachMode::Tracepoint => {
                crate::ops::CLASSIC_OPS.iter().map(|(op, _)| op.0).collect()
            }
            _ => ["read", "write", "flush", "discard"]
                .iter()
                .filter_map(|n| self.ops.code(n))
                .collect(),
        }
    }
}

fn enumerator(btf: &Btf, name: &str) -> Option<i64> {
    btf.type_by_kind::<Enum>().find_map(|e| {
        e.iter()
            .find(|m| m.name.is_some_and(|n| n == name))
            .map(|m| m.value)
    })
}

fn req_op_names(btf: &Btf) -> OpNames {
    match btf.type_by_name::<Enum>("req_op") {
        Some(e) => {
            let members: Vec<(String, i64)> = e
                .iter()
                .filter_map(|m| m.name.map(|n| (n.to_string_lossy().into_owned(), m.value)))
                .collect();
            OpNames::from_enumerators(members.iter().map(|(n, v)| (n.as_str(), *v)))
        }
        None => OpNames::current_kernel(),
    }
}

/// Offsets of the fields the classic programs read, from a tracefs `format` file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TracepointFields {
    pub dev: u32,
    pub sector: u32,
    pub nr_sector: u32,
    pub bytes: u32,
    pub error: u32,
    pub rwbs: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} has no field {field:?}")]
    MissingField { path: PathBuf, field: &'static str },
}

/// Parses lines like `\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;` into (name, offset).
pub fn parse_format(text: &str) -> Vec<(String, u32)> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let decl = line.strip_prefix("field:")?.split(';').next()?;
            let name = decl.split_whitespace().last()?;
            let name = name.split('[').next()?.to_string();
            let offset = line
                .split(';')
                .find_map(|part| part.trim().strip_prefix("offset:"))?
                .trim()
                .parse()
                .ok()?;
            Some((name, offset))
        })
        .collect()
}

/// Reads one event's format; `required` names the fields the program must have, `optional` the
/// ones it may lack (left at 0 and unused).
pub fn tracepoint_fields(
    tracefs: &Path,
    event: &str,
    complete: bool,
) -> Result<TracepointFields, FormatError> {
    let path = tracefs.join("events/block").join(event).join("format");
    let text = std::fs::read_to_string(&path).map_err(|source| FormatError::Read {
        path: path.clone(),
        source,
    })?;
    let fields = parse_format(&text);
    let get = |field: &'static str| {
        fields
            .iter()
            .find(|(n, _)| n == field)
            .map(|(_, off)| *off)
            .ok_or_else(|| FormatError::MissingField {
                path: path.clone(),
                field,
            })
    };
    let mut f = TracepointFields {
        dev: get("dev")?,
        sector: get("sector")?,
        nr_sector: get("nr_sector")?,
        rwbs: get("rwbs")?,
        ..Default::default()
    };
    if complete {
        f.error = get("error")?;
    } else {
        f.bytes = get("bytes")?;
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISSUE_FORMAT: &str = "name: block_rq_issue\nID: 1234\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\n\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;\n\tfield:sector_t sector;\toffset:16;\tsize:8;\tsigned:0;\n\tfield:unsigned int nr_sector;\toffset:24;\tsize:4;\tsigned:0;\n\tfield:unsigned int bytes;\toffset:28;\tsize:4;\tsigned:0;\n\tfield:char rwbs[8];\toffset:34;\tsize:8;\tsigned:0;\n\tfield:__data_loc char[] cmd;\toffset:60;\tsize:4;\tsigned:0;\n\nprint fmt: \"%d,%d\"\n";

    #[test]
    fn parses_tracefs_format() {
        let fields = parse_format(ISSUE_FORMAT);
        assert!(fields.contains(&("dev".into(), 8)));
        assert!(fields.contains(&("rwbs".into(), 34)));
        assert!(fields.contains(&("cmd".into(), 60)));
    }

    #[test]
    fn hostile_format_text_never_panics() {
        for junk in [
            "",
            "field:",
            "field:;offset:x;",
            "\u{0}\u{ffff}field: a b c;offset:99999999999;",
            "offset:1;field:int x",
        ] {
            let _ = parse_format(junk);
        }
    }
}
