//! Block devices: kernel dev_t → name, and which devices the user wants exported.
use std::path::{Path, PathBuf};

/// The filter lives in its own crate so the operator validates BioMonitor patterns with
/// the very code the agent compiles them with.
pub use bio_device_filter::{DeviceFilter, InvalidDeviceRegex};

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_t_round_trips() {
        let d = mkdev(259, 3);
        assert_eq!((major(d), minor(d)), (259, 3));
        assert_eq!(mkdev(7, 0), 7 << 20);
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
