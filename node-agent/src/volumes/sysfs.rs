//! Block device stacks from sysfs: the whole disk under a partition, the disks under a
//! device-mapper or md device, and who else uses a disk.
//!
//! The agent measures IO per whole disk and per stacked (dm, md) device, so a PV's IO shows up
//! on every device of its stack: dm-3 → its slaves → their whole disks.
use std::collections::{BTreeSet, HashSet};
use std::path::{Component, Path, PathBuf};

use super::dev_id::DevId;

/// Stacks deeper than this are a loop in a corrupt or fake tree, not real storage.
const MAX_DEPTH: usize = 16;

#[derive(Debug, Clone)]
pub struct Sysfs {
    root: PathBuf,
}

/// The devices a PV's IO passes through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stack {
    /// Devices the agent has histograms for: whole disks and stacked devices.
    pub measured: BTreeSet<DevId>,
    /// Those and every partition on the way, for the "who else uses it" check.
    pub touched: BTreeSet<DevId>,
}

impl Sysfs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The device's own directory (`/sys/dev/block/M:m` links to it).
    fn dir_of(&self, dev: DevId) -> Option<PathBuf> {
        follow(&self.root.join("dev/block").join(dev.to_string()))
    }

    /// A kernel device name ("sdb", "dm-0") to its number.
    pub fn dev_by_name(&self, name: &str) -> Option<DevId> {
        if name.is_empty() || name == "." || name == ".." || name.contains('/') {
            return None;
        }
        read_dev(&self.root.join("class/block").join(name))
    }

    /// Every measured device under `dev`, `dev`'s whole disk included. A device sysfs does not
    /// know (vanished, or sysfs not mounted) stands for itself.
    pub fn stack(&self, dev: DevId) -> Stack {
        let mut stack = Stack::default();
        match self.dir_of(dev) {
            Some(dir) => self.walk(&dir, 0, &mut stack),
            None => tracing::debug!(device = %dev, "device not in sysfs; no stack below it"),
        }
        if stack.measured.is_empty() {
            stack.measured.insert(dev);
            stack.touched.insert(dev);
        }
        stack
    }

    fn walk(&self, dir: &Path, depth: usize, stack: &mut Stack) {
        if depth > MAX_DEPTH {
            tracing::debug!(dir = %dir.display(), "device stack too deep; stopping");
            return;
        }
        let Some(dev) = read_dev(dir) else {
            tracing::debug!(dir = %dir.display(), "no readable dev file; skipping");
            return;
        };
        stack.touched.insert(dev);
        let (whole_dir, whole) = if is_partition(dir) {
            let Some(parent) = dir.parent() else {
                return;
            };
            let Some(whole) = read_dev(parent) else {
                tracing::debug!(dir = %parent.display(), "no readable dev file; skipping");
                return;
            };
            stack.touched.insert(whole);
            (parent, whole)
        } else {
            (dir, dev)
        };
        if !stack.measured.insert(whole) {
            return; // already walked below it (two partitions of one disk, or a cycle)
        }
        for slave in links(whole_dir, "slaves") {
            self.walk(&slave, depth + 1, stack);
        }
    }

    /// What else sits on `dev` and would have its IO counted there too: its holders (dm, md)
    /// and, for a whole disk, its partitions. `None` for one whose number cannot be read.
    /// Nothing for a device sysfs does not know.
    pub fn users(&self, dev: DevId) -> Vec<Option<DevId>> {
        let Some(dir) = self.dir_of(dev) else {
            return Vec::new();
        };
        let mut users: Vec<Option<DevId>> =
            links(&dir, "holders").iter().map(|d| read_dev(d)).collect();
        if !is_partition(&dir) {
            users.extend(partitions(&dir).iter().map(|d| read_dev(d)));
        }
        users
    }

    /// Whether something outside `known` sits on `dev` (see [`Sysfs::users`]).
    #[cfg(test)]
    pub fn has_unknown_users(&self, dev: DevId, known: &HashSet<DevId>) -> bool {
        any_unknown(&self.users(dev), known)
    }
}

/// Whether any of `users` is outside `known`; one whose number could not be read is.
pub fn any_unknown(users: &[Option<DevId>], known: &HashSet<DevId>) -> bool {
    users.iter().any(|u| u.is_none_or(|u| !known.contains(&u)))
}

/// `dev` holds "MAJ:MIN\n". One read into a small buffer: sysfs returns an attribute whole,
/// and `read_to_string` would add a stat and a second read, per device, per scrape.
fn read_dev(dir: &Path) -> Option<DevId> {
    use std::io::Read;
    let mut buf = [0u8; 32];
    let n = std::fs::File::open(dir.join("dev"))
        .ok()?
        .read(&mut buf)
        .ok()?;
    let text = std::str::from_utf8(&buf[..n]).ok()?;
    DevId::parse(text.strip_suffix('\n').unwrap_or(text))
}

fn is_partition(dir: &Path) -> bool {
    dir.join("partition").is_file()
}

/// The resolved targets of the links in `dir/sub` (`slaves`, `holders`).
fn links(dir: &Path, sub: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir.join(sub)) else {
        return Vec::new();
    };
    entries.filter_map(|e| follow(&e.ok()?.path())).collect()
}

/// Where a sysfs link points. One readlink and lexical `..` handling instead of canonicalize,
/// which costs a readlink per component of paths ten components deep: sysfs links are
/// relative and only ever cross real directories, where the two agree.
fn follow(link: &Path) -> Option<PathBuf> {
    let target = std::fs::read_link(link).ok()?;
    let mut out = PathBuf::new();
    for c in link.parent()?.join(target).components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    Some(out)
}

/// A whole disk's partitions are its subdirectories named after it ("sda1", "nvme0n1p1",
/// "loop0p1") that have a `partition` file; the name test saves a stat per attribute directory.
fn partitions(dir: &Path) -> Vec<PathBuf> {
    let Some(disk) = dir.file_name() else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| {
            let e = e.ok()?;
            let named = e
                .file_name()
                .as_encoded_bytes()
                .starts_with(disk.as_encoded_bytes());
            (named && is_partition(&e.path())).then(|| e.path())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::testfs::FakeSys;
    use super::*;
    use proptest::prelude::*;

    fn d(major: u32, minor: u32) -> DevId {
        DevId::new(major, minor).unwrap()
    }

    #[test]
    fn partitions_map_to_their_disk() {
        let sys = FakeSys::new();
        sys.disk("sda", d(8, 0)).partition("sda1", d(8, 1));
        let s = sys.sysfs().stack(d(8, 1));
        assert_eq!(s.measured, BTreeSet::from([d(8, 0)]));
        assert_eq!(s.touched, BTreeSet::from([d(8, 0), d(8, 1)]));
        assert_eq!(sys.sysfs().dev_by_name("sda1"), Some(d(8, 1)));
        assert_eq!(sys.sysfs().dev_by_name("../sda1"), None);
    }

    #[test]
    fn dm_stacks_reach_the_disks_below() {
        let sys = FakeSys::new();
        sys.disk("sda", d(8, 0)).partition("sda2", d(8, 2));
        sys.disk("sdb", d(8, 16));
        sys.dm("dm-0", d(253, 0), &["sda2", "sdb"]);
        sys.dm("dm-1", d(253, 1), &["dm-0"]);
        let s = sys.sysfs().stack(d(253, 1));
        assert_eq!(
            s.measured,
            BTreeSet::from([d(253, 1), d(253, 0), d(8, 0), d(8, 16)])
        );
        assert!(s.touched.contains(&d(8, 2)));
    }

    #[test]
    fn unknown_devices_stand_for_themselves() {
        let sys = FakeSys::new();
        let s = sys.sysfs().stack(d(9, 9));
        assert_eq!(s.measured, BTreeSet::from([d(9, 9)]));
        assert!(!sys
            .sysfs()
            .has_unknown_users(d(9, 9), &HashSet::from([d(9, 9)])));
    }

    #[test]
    fn cycles_end() {
        let sys = FakeSys::new();
        sys.dm("dm-0", d(253, 0), &[]);
        sys.dm("dm-1", d(253, 1), &["dm-0"]);
        sys.add_slave("dm-0", "dm-1");
        let s = sys.sysfs().stack(d(253, 0));
        assert_eq!(s.measured, BTreeSet::from([d(253, 0), d(253, 1)]));
    }

    #[test]
    fn other_partitions_and_holders_are_unknown_users() {
        let sys = FakeSys::new();
        sys.disk("sda", d(8, 0))
            .partition("sda1", d(8, 1))
            .partition("sda2", d(8, 2));
        sys.dm("dm-0", d(253, 0), &["sda2"]);
        sys.dm("dm-1", d(253, 1), &["sda2"]);
        let fs = sys.sysfs();
        let known = HashSet::from([d(8, 0), d(8, 2), d(253, 0)]);
        assert!(fs.has_unknown_users(d(8, 0), &known), "sda1 is not known");
        assert!(fs.has_unknown_users(d(8, 2), &known), "dm-1 holds sda2");
        let all = HashSet::from([d(8, 0), d(8, 1), d(8, 2), d(253, 0), d(253, 1)]);
        assert!(!fs.has_unknown_users(d(8, 0), &all));
        assert!(!fs.has_unknown_users(d(8, 2), &all));
    }

    /// `follow` must find what canonicalize finds, on the kernel's own tree.
    #[test]
    fn follow_agrees_with_canonicalize_on_this_hosts_sysfs() {
        let sys = Sysfs::new("/sys");
        let Ok(entries) = std::fs::read_dir("/sys/class/block") else {
            return; // no sysfs in this sandbox; the fake trees above cover the logic
        };
        for e in entries.flatten() {
            let Some(dev) = read_dev(&e.path()) else {
                continue;
            };
            let dir = sys
                .dir_of(dev)
                .expect("every block device has /sys/dev/block/M:m");
            assert_eq!(Some(&dir), std::fs::canonicalize(e.path()).ok().as_ref());
            let stack = sys.stack(dev);
            assert!(stack.touched.contains(&dev), "{dev}: {stack:?}");
            if !is_partition(&dir) {
                assert!(stack.measured.contains(&dev), "{dev}: {stack:?}");
            }
        }
    }

    proptest! {
        #[test]
        fn hostile_names_never_panic_or_escape(name in "\\PC{0,30}|[./]{0,6}") {
            let sys = FakeSys::new();
            sys.disk("sda", d(8, 0));
            let got = sys.sysfs().dev_by_name(&name);
            prop_assert!(got.is_none() || name == "sda");
        }

        /// Slave links pointing anywhere (up past the root, at themselves, at files, nowhere)
        /// end the walk without a panic, and the device still stands for itself.
        #[test]
        fn hostile_slave_links_never_panic(targets in proptest::collection::vec("(\\.\\./|[a-z0-9:-]{1,4}/|/){0,12}[a-z0-9:.-]{0,6}", 0..6)) {
            let sys = FakeSys::new();
            sys.disk("sda", d(8, 0));
            // The kernel refuses an empty link target; everything else is fair game.
            for (i, t) in targets.iter().filter(|t| !t.is_empty()).enumerate() {
                let link = sys.root().join(format!("devices/virtual/block/sda/slaves/s{i}"));
                std::os::unix::fs::symlink(t, link).unwrap();
            }
            let s = sys.sysfs().stack(d(8, 0));
            prop_assert!(s.measured.contains(&d(8, 0)));
            let _ = sys.sysfs().has_unknown_users(d(8, 0), &HashSet::new());
        }

        #[test]
        fn hostile_dev_files_never_panic(text in "\\PC{0,30}") {
            let sys = FakeSys::new();
            sys.disk("sda", d(8, 0));
            sys.write("devices/virtual/block/sda/dev", &text);
            let s = sys.sysfs().stack(d(8, 0));
            prop_assert!(!s.measured.is_empty());
        }
    }
}
