//! Which block devices the node-agent exports, by kernel name, and the check of one
//! filter pattern. The agent compiles its `--device-include`/`--device-exclude` patterns
//! here and the operator validates a BioMonitor's `spec.devices` here, so a pattern the
//! operator accepts is one the agent starts with, and one it rejects is rejected for the
//! same reason.

use std::fmt;

use regex::{Regex, RegexBuilder};

/// Most bytes one compiled pattern may take. Device names are a few characters long, so
/// real filters compile to a few KiB; the limit is there because a BioMonitor may carry
/// 64 patterns and the agent's memory limit is 256 MiB (the regex crate's own default,
/// 10 MiB per pattern, would let 64 patterns exceed it).
pub const SIZE_LIMIT: usize = 1 << 20;

/// Why a pattern cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// Not regex syntax the `regex` crate accepts. The detail is on one line, so it
    /// reads well in a Kubernetes condition.
    #[error("not a valid regex: {0}")]
    Syntax(String),
    /// Valid, but compiles to more than [`SIZE_LIMIT`] (large or nested repetition).
    #[error("compiles to more than {limit} bytes, the limit per pattern; use less repetition")]
    TooBig { limit: usize },
}

/// Compiles `pattern` as written: searched for anywhere in the name, not anchored.
pub fn compile(pattern: &str) -> Result<Regex, PatternError> {
    RegexBuilder::new(pattern)
        .size_limit(SIZE_LIMIT)
        .build()
        .map_err(|err| match err {
            regex::Error::CompiledTooBig(limit) => PatternError::TooBig { limit },
            // The regex crate's syntax messages span several lines with a caret
            // under the error.
            other => PatternError::Syntax(one_line(&other.to_string())),
        })
}

/// The verdict [`compile`] gives, without keeping the compiled program.
pub fn validate(pattern: &str) -> Result<(), PatternError> {
    compile(pattern).map(drop)
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The two pattern lists of a filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum List {
    Include,
    Exclude,
}

impl List {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Include => "include",
            Self::Exclude => "exclude",
        }
    }
}

impl fmt::Display for List {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One unusable pattern, with where it was given (the agent names the flag from `list`,
/// the operator the BioMonitor field from `list` and `index`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid device regex {pattern:?} (an {list} pattern): {error}")]
pub struct InvalidDeviceRegex {
    pub list: List,
    /// Position in its list, from 0.
    pub index: usize,
    pub pattern: String,
    #[source]
    pub error: PatternError,
}

/// Every unusable pattern of both lists, in order (include first).
pub fn validate_all(include: &[String], exclude: &[String]) -> Vec<InvalidDeviceRegex> {
    lists(include, exclude)
        .filter_map(|(list, index, pattern)| {
            validate(pattern).err().map(|error| InvalidDeviceRegex {
                list,
                index,
                pattern: pattern.clone(),
                error,
            })
        })
        .collect()
}

fn lists<'a>(
    include: &'a [String],
    exclude: &'a [String],
) -> impl Iterator<Item = (List, usize, &'a String)> {
    let tag = |list: List, patterns: &'a [String]| {
        patterns.iter().enumerate().map(move |(i, p)| (list, i, p))
    };
    tag(List::Include, include).chain(tag(List::Exclude, exclude))
}

/// Which device names are exported. Patterns are unanchored regexes searched for anywhere in the
/// kernel name, like grep or node_exporter's `--collector.diskstats.device-exclude`: `^loop`
/// matches loop0 and loop12 but not xloop0, and `loop1` matches loop1, loop10 and xloop1. Anchor
/// both ends (`^loop1$`) to name exactly one device. Exclude wins over include; no include
/// patterns means every device is included.
#[derive(Debug, Clone, Default)]
pub struct DeviceFilter {
    include: Vec<Regex>,
    exclude: Vec<Regex>,
}

impl DeviceFilter {
    /// The first unusable pattern is the error (the agent stops on it; the operator
    /// reports all of them through [`validate_all`]).
    pub fn new(include: &[String], exclude: &[String]) -> Result<Self, InvalidDeviceRegex> {
        let mut filter = Self::default();
        for (list, index, pattern) in lists(include, exclude) {
            let re = compile(pattern).map_err(|error| InvalidDeviceRegex {
                list,
                index,
                pattern: pattern.clone(),
                error,
            })?;
            match list {
                List::Include => filter.include.push(re),
                List::Exclude => filter.exclude.push(re),
            }
        }
        Ok(filter)
    }

    /// Exactly one device, by its literal kernel name (`histogram --device loop1` must not show
    /// loop10 as well).
    pub fn only(name: &str) -> Self {
        let exact = format!("^{}$", regex::escape(name));
        Self {
            include: vec![compile(&exact).expect("an escaped, anchored name is a valid regex")],
            exclude: Vec::new(),
        }
    }

    pub fn allows(&self, name: &str) -> bool {
        let included = self.include.is_empty() || self.include.iter().any(|r| r.is_match(name));
        included && !self.exclude.iter().any(|r| r.is_match(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn filter(include: &[&str], exclude: &[&str]) -> DeviceFilter {
        DeviceFilter::new(&owned(include), &owned(exclude)).unwrap()
    }

    #[test]
    fn patterns_are_searched_not_anchored() {
        // The documented BioMonitor example (docs/operator.md): exclude: ["^loop", "^ram"].
        let f = filter(&[], &["^loop", "^ram"]);
        assert!(!f.allows("loop0"));
        assert!(!f.allows("loop12"));
        assert!(!f.allows("ram0"));
        assert!(
            f.allows("xloop0"),
            "^ anchors at the start of the name only"
        );
        assert!(f.allows("zram0"));
        assert!(f.allows("nvme0n1"));
        assert!(f.allows("sda"));
        // Unanchored on purpose, like grep: a bare name also matches longer names containing it.
        let bare = filter(&["loop1"], &[]);
        assert!(bare.allows("loop1"));
        assert!(bare.allows("loop10"));
        assert!(bare.allows("xloop1"));
        // Anchored at both ends it names exactly one device.
        let exact = filter(&["^loop1$"], &[]);
        assert!(exact.allows("loop1"));
        assert!(!exact.allows("loop10"));
        assert!(!exact.allows("xloop1"));
    }

    #[test]
    fn verbose_mode_comments_stay_inside_the_pattern() {
        // Compiled as written, nothing wrapped around it: a `#` comment in (?x) mode
        // cannot swallow an anchor or group the filter adds.
        let f = filter(&["(?x)sda#comment"], &[]);
        assert!(f.allows("sda"));
        assert!(f.allows("sda1"));
        assert!(!f.allows("sdb"));
    }

    #[test]
    fn exclude_wins_over_include() {
        let f = filter(&["^loop[0-9]+$", "^zram"], &["^loop7$"]);
        assert!(f.allows("loop0"));
        assert!(f.allows("loop70"));
        assert!(f.allows("zram0"));
        assert!(!f.allows("loop7"));
        assert!(!f.allows("xloop0"));
        assert!(!f.allows("vda"));
        assert!(!filter(&["^sd"], &["^sd"]).allows("sda"));
        assert!(DeviceFilter::default().allows("anything"));
    }

    #[test]
    fn only_is_one_literal_name() {
        let f = DeviceFilter::only("loop1");
        assert!(f.allows("loop1"));
        assert!(!f.allows("loop10"));
        assert!(!f.allows("xloop1"));
        let dotted = DeviceFilter::only("a.b");
        assert!(dotted.allows("a.b"));
        assert!(!dotted.allows("axb"));
    }

    #[test]
    fn filter_table() {
        // (include, exclude, name, exported)
        let cases: &[(&[&str], &[&str], &str, bool)] = &[
            (&[], &[], "sda", true),
            (&["sd"], &[], "sda1", true),
            (&["^sd[a-z]$"], &[], "sda1", false),
            (&["^sd[a-z]$"], &[], "sdb", true),
            (&["^nvme"], &[], "nvme0n1", true),
            (&["^nvme"], &[], "dm-0", false),
            (&[], &["^dm-"], "dm-3", false),
            (&[], &["dm-"], "xdm-3", false),
            (&[], &["^(loop|ram|zram)"], "zram0", false),
            (&[], &["^(loop|ram|zram)"], "vda", true),
            (&["^nvme0n1$", "^sda$"], &[], "nvme0n10", false),
            (&["^nvme0n1$", "^sda$"], &[], "sda", true),
            (&["."], &["^loop"], "loop3", false),
        ];
        for (include, exclude, name, exported) in cases {
            assert_eq!(
                filter(include, exclude).allows(name),
                *exported,
                "include {include:?} exclude {exclude:?} name {name:?}"
            );
        }
    }

    proptest::proptest! {
        /// Search semantics: a pattern matches a name exactly when `regex::Regex::is_match` on the
        /// pattern as written does (so a literal name matches every name containing it), and
        /// anchoring with ^...$ leaves only the name itself.
        #[test]
        fn literal_patterns_match_names_containing_them(
            pattern in "[a-z]{1,4}[0-9]{0,2}",
            prefix in "[a-z]{0,3}",
            suffix in "[a-z0-9]{0,3}",
        ) {
            let name = format!("{prefix}{pattern}{suffix}");
            proptest::prop_assert!(filter(&[&pattern], &[]).allows(&name));
            proptest::prop_assert!(!filter(&[], &[&pattern]).allows(&name));
            let exact = format!("^{pattern}$");
            proptest::prop_assert_eq!(filter(&[&exact], &[]).allows(&name), name == pattern);
        }
    }

    #[test]
    fn bad_regex_is_named_with_its_list_and_position() {
        let err = DeviceFilter::new(&owned(&["^sd", "loop["]), &[]).unwrap_err();
        assert_eq!((err.list, err.index), (List::Include, 1));
        assert!(matches!(err.error, PatternError::Syntax(_)), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("invalid device regex \"loop[\" (an include pattern)"),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "{msg}");
        let err = DeviceFilter::new(&[], &owned(&["(loop"])).unwrap_err();
        assert_eq!((err.list, err.index), (List::Exclude, 0));
    }

    #[test]
    fn too_much_repetition_is_its_own_error() {
        // 1000 x 1000 states: far over the limit, and a typed error, not a panic or OOM.
        assert!(matches!(
            validate("a{1000}{1000}"),
            Err(PatternError::TooBig { .. })
        ));
        // Nested repetition just under it still compiles: the limit is not too tight for
        // anything a device name needs.
        assert_eq!(validate("(?:[a-z0-9]{1,8}){1,4}"), Ok(()));
    }

    #[test]
    fn validate_all_reports_every_bad_pattern() {
        let bad = validate_all(
            &owned(&["^nvme", "sd[a-", "x{1000}{1000}"]),
            &owned(&["(loop", "^ram"]),
        );
        let found: Vec<_> = bad.iter().map(|e| (e.list, e.index)).collect();
        assert_eq!(
            found,
            [(List::Include, 1), (List::Include, 2), (List::Exclude, 0)]
        );
        assert!(validate_all(&owned(&["^nvme"]), &owned(&["^loop"])).is_empty());
    }
}
