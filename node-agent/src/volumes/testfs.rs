//! A fake sysfs block tree in a temporary directory, laid out as the kernel does.
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

use super::dev_id::DevId;
use super::sysfs::Sysfs;

pub struct FakeSys {
    dir: TempDir,
    /// Kernel name → the device's directory.
    dirs: RefCell<HashMap<String, PathBuf>>,
}

pub struct Disk<'a> {
    sys: &'a FakeSys,
    name: String,
}

impl FakeSys {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["dev/block", "class/block", "devices/virtual/block"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        Self {
            dir,
            dirs: RefCell::default(),
        }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn sysfs(&self) -> Sysfs {
        Sysfs::new(self.root())
    }

    pub fn disk(&self, name: &str, dev: DevId) -> Disk<'_> {
        let dir = self.root().join("devices/virtual/block").join(name);
        self.device(name, dev, &dir);
        std::fs::create_dir_all(dir.join("slaves")).unwrap();
        Disk {
            sys: self,
            name: name.into(),
        }
    }

    /// A device-mapper (or md) device on `slaves`, which must exist already.
    pub fn dm(&self, name: &str, dev: DevId, slaves: &[&str]) {
        self.disk(name, dev);
        for s in slaves {
            self.add_slave(name, s);
        }
    }

    pub fn add_slave(&self, upper: &str, lower: &str) {
        let dirs = self.dirs.borrow();
        let (u, l) = (&dirs[upper], &dirs[lower]);
        std::os::unix::fs::symlink(l, u.join("slaves").join(lower)).unwrap();
        std::os::unix::fs::symlink(u, l.join("holders").join(upper)).unwrap();
    }

    /// A partition appearing on an existing disk (a partition table re-read).
    pub fn add_partition(&self, disk: &str, name: &str, dev: DevId) {
        Disk {
            sys: self,
            name: disk.into(),
        }
        .partition(name, dev);
    }

    pub fn write(&self, rel: &str, text: &str) {
        std::fs::write(self.root().join(rel), text).unwrap();
    }

    fn device(&self, name: &str, dev: DevId, dir: &Path) {
        std::fs::create_dir_all(dir.join("holders")).unwrap();
        std::fs::write(dir.join("dev"), format!("{dev}\n")).unwrap();
        let link = |sub: &str, file: &str| {
            let l = self.root().join(sub).join(file);
            let _ = std::fs::remove_file(&l);
            std::os::unix::fs::symlink(dir, l).unwrap();
        };
        link("dev/block", &dev.to_string());
        link("class/block", name);
        self.dirs.borrow_mut().insert(name.into(), dir.into());
    }
}

impl Disk<'_> {
    pub fn partition(self, name: &str, dev: DevId) -> Self {
        let dir = self.sys.dirs.borrow()[&self.name].join(name);
        self.sys.device(name, dev, &dir);
        // Only its presence matters; the kernel writes the partition number.
        std::fs::write(dir.join("partition"), "1\n").unwrap();
        self
    }
}
