//! Operation codes from the BPF keys, named the way users see them (read, write, flush, ...).
//!
//! REQ_OP_* values moved between kernel versions, so the names come from the running kernel's BTF
//! (`enum req_op`) when it has one; the table below is the layout of current kernels, for the rest.
use std::collections::HashMap;

use crate::bpf::types::classic_op;

/// Classic tracepoints only see the rwbs string; their codes are `enum classic_op` of
/// bpf/bio_types.h, above every REQ_OP value.
pub const CLASSIC_READ: u32 = classic_op::CLASSIC_OP_READ.0;
pub const CLASSIC_WRITE: u32 = classic_op::CLASSIC_OP_WRITE.0;
pub const CLASSIC_FLUSH: u32 = classic_op::CLASSIC_OP_FLUSH.0;
pub const CLASSIC_DISCARD: u32 = classic_op::CLASSIC_OP_DISCARD.0;
/// The lowest classic code (CLASSIC_OP_BASE): every code at or above it is a classic one.
pub const CLASSIC_OP_BASE: u32 = CLASSIC_READ;
/// The name of each `enum classic_op` enumerator; the unit tests check that every enumerator of
/// the object's BTF is here.
pub const CLASSIC_OPS: [(classic_op, &str); 5] = [
    (classic_op::CLASSIC_OP_READ, "read"),
    (classic_op::CLASSIC_OP_WRITE, "write"),
    (classic_op::CLASSIC_OP_FLUSH, "flush"),
    (classic_op::CLASSIC_OP_DISCARD, "discard"),
    (classic_op::CLASSIC_OP_OTHER, "other"),
];

/// enum req_op of Linux 5.19 and later.
const CURRENT_KERNEL_OPS: [(u32, &str); 14] = [
    (0, "read"),
    (1, "write"),
    (2, "flush"),
    (3, "discard"),
    (5, "secure_erase"),
    (7, "zone_append"),
    (9, "write_zeroes"),
    (10, "zone_open"),
    (11, "zone_close"),
    (12, "zone_finish"),
    (13, "zone_reset"),
    (15, "zone_reset_all"),
    (34, "drv_in"),
    (35, "drv_out"),
];

#[derive(Debug, Clone)]
pub struct OpNames {
    names: HashMap<u32, String>,
}

impl OpNames {
    /// Names from `REQ_OP_*` enumerators, e.g. ("REQ_OP_WRITE_ZEROES", 9) → "write_zeroes".
    pub fn from_enumerators<'a>(members: impl IntoIterator<Item = (&'a str, i64)>) -> Self {
        let mut names: HashMap<u32, String> = HashMap::new();
        for (name, value) in members {
            let Some(op) = name.strip_prefix("REQ_OP_") else {
                continue;
            };
            let Ok(value) = u32::try_from(value) else {
                continue;
            };
            if op == "LAST" {
                continue;
            }
            names.insert(value, op.to_ascii_lowercase());
        }
        Self::with_classic(names)
    }

    /// The layout of current kernels, when the running one has no BTF to ask.
    pub fn current_kernel() -> Self {
        Self::with_classic(
            CURRENT_KERNEL_OPS
                .iter()
                .map(|(v, n)| (*v, n.to_string()))
                .collect(),
        )
    }

    fn with_classic(mut names: HashMap<u32, String>) -> Self {
        names.extend(CLASSIC_OPS.iter().map(|(v, n)| (v.0, n.to_string())));
        Self { names }
    }

    /// The code of a named operation on this kernel.
    pub fn code(&self, name: &str) -> Option<u32> {
        self.names
            .iter()
            .filter(|(code, _)| **code < CLASSIC_OP_BASE)
            .find(|(_, n)| n.as_str() == name)
            .map(|(c, _)| *c)
    }

    /// Never fails: an op the kernel gained after this agent was built is still exported.
    pub fn name(&self, op: u32) -> String {
        match self.names.get(&op) {
            Some(n) => n.clone(),
            None => format!("op_{op}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_btf_enumerators() {
        let ops = OpNames::from_enumerators([
            ("REQ_OP_READ", 0),
            ("REQ_OP_WRITE", 1),
            ("REQ_OP_WRITE_ZEROES", 9),
            ("REQ_OP_LAST", 36),
            ("NOT_AN_OP", 3),
        ]);
        assert_eq!(ops.name(0), "read");
        assert_eq!(ops.name(9), "write_zeroes");
        assert_eq!(ops.name(36), "op_36");
        assert_eq!(ops.name(3), "op_3");
        assert_eq!(ops.code("write_zeroes"), Some(9));
        assert_eq!(OpNames::current_kernel().code("flush"), Some(2));
    }

    #[test]
    fn classic_codes_are_named_in_every_table() {
        for ops in [OpNames::current_kernel(), OpNames::from_enumerators([])] {
            assert_eq!(ops.name(CLASSIC_OP_BASE), "read");
            assert_eq!(ops.name(CLASSIC_OP_BASE + 0xff), "other");
        }
    }

    /// Every enumerator of the object's `enum classic_op` (what classic_op() in bio.bpf.c can
    /// return) is named here under its own name; an operation added in the C without a name
    /// fails this.
    #[test]
    fn every_classic_op_of_the_object_is_named() {
        let in_object = crate::bpf::object_enumerators("classic_op");
        assert_eq!(in_object.len(), CLASSIC_OPS.len(), "{in_object:?}");
        for (name, value) in in_object {
            let label = name
                .strip_prefix("CLASSIC_OP_")
                .unwrap()
                .to_ascii_lowercase();
            assert!(
                CLASSIC_OPS
                    .iter()
                    .any(|(op, n)| i64::from(op.0) == value && *n == label),
                "{name} = {value:#x}"
            );
            // Above every REQ_OP (REQ_OP_MASK is 8 bits): one key space serves all modes.
            assert!(
                value >= i64::from(CLASSIC_OP_BASE) && value > 0xff,
                "{name}"
            );
        }
    }
}
