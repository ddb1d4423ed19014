//! Block devices: kernel dev_t → name, and which devices the user wants exported.
use std::path::{Path, PathBuf};

use regex::Regex;

/// The kernel's internal dev_t layout (MKDEV): 12 bits of major above 20 bits of minor.
const MINOR_BITS: u32 = 20;
const MINOR_MASK: u32 = (1 << MINOR_BITS) - 1;

pub fn major(dev: u32) -> u32 {
    dev >> MINOR_BITS
}

pub fn minor(dev: u32) -> u32 {
    dev & MINOR_MASK
}

pub fn mkdev(major: u32, minor: u32) -> u32 {
    (major << MINOR_BITS) | (minor & MINOR_MASK)
}

/// Names devices through sysfs (`/sys/dev/block/MAJ:MIN` links to the device's directory).
#[derive(Debug, Clone)]
pub struct DeviceNamer {
    sys_dev_block: PathBuf,
}

impl Default for DeviceNamer {
    fn default() -> Self {
        Self::new("/sys/dev/block")
    }
}

impl DeviceNamer {
    pub fn new(sys_dev_block: impl Into<PathBuf>) -> Self {
        Self {
            sys_dev_block: sys_dev_block.into(),
        }
    }

    /// The kernel name (sda, nvme0n1, loop0, dm-0). A device that vanished or never had a sysfs
    /// entry is still exported, named "MAJ:MIN", so no IO is dropped.
    pub fn name(&self, dev: u32) -> String {
        let id = format!("{}:{}", major(dev), minor(dev));
        let link = self.sys_dev_block.join(&id);
        match std::fs::read_link(&link)
            .ok()
            .as_deref()
            .and_then(Path::file_name)
        {
            Some(name) => name.to_string_lossy().into_owned(),
            None => {
                tracing::debug!(device = %id, "no sysfs name for device; exporting it by number");
                id
            }
        }
    }
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

#[derive(Debug, thiserror::Error)]
#[error("invalid device regex {pattern:?}: {source}")]
pub struct InvalidDeviceRegex {
    pub pattern: String,
    #[source]
    pub source: regex::Error,
}

impl DeviceFilter {
    pub fn new(include: &[String], exclude: &[String]) -> Result<Self, InvalidDeviceRegex> {
        let compile = |patterns: &[String]| {
            patterns
                .iter()
                .map(|p| {
                    // Compiled as written: search semantics, the same regex the operator validates.
                    Regex::new(p).map_err(|source| InvalidDeviceRegex {
                        pattern: p.clone(),
                        source,
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Self {
            include: compile(include)?,
            exclude: compile(exclude)?,
        })
    }

    /// Exactly one device, by its literal kernel name (`histogram --device loop1` must not show
    /// loop10 as well).
    pub fn only(name: &str) -> Self {
        let exact = format!("^{}$", regex::escape(name));
        Self {
            include: vec![
                Regex::new(&exact).expect("an escaped, anchored literal is a valid regex")
            ],
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

    #[test]
    fn dev_t_round_trips() {
        let d = mkdev(259, 3);
        assert_eq!((major(d), minor(d)), (259, 3));
        assert_eq!(mkdev(7, 0), 7 << 20);
    }

    fn filter(include: &[&str], exclude: &[&str]) -> DeviceFilter {
        let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
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
    fn bad_regex_is_named() {
        let err = DeviceFilter::new(&["loop[".into()], &[]).unwrap_err();
        assert!(err.to_string().contains("loop["), "{err}");
    }

    #[test]
    fn names_from_sysfs_links_and_numbers_otherwise() {
        let dir = std::env::temp_dir().join(format!("bio-devnamer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let target = "../../devices/virtual/block/loop3";
        let _ = std::fs::remove_file(dir.join("7:3"));
        std::os::unix::fs::symlink(target, dir.join("7:3")).unwrap();
        let namer = DeviceNamer::new(&dir);
        assert_eq!(namer.name(mkdev(7, 3)), "loop3");
        assert_eq!(namer.name(mkdev(7, 99)), "7:99");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
