//! Discovery on the node: the PVs the kubelet set up here, and the device each sits on.
//!
//! Mounted PVs are found from mountinfo (every mount under the kubelet root whose path is a
//! known layout), so no directory is listed for them and a directory that is not a mount is
//! never mistaken for one. Block PVs are device files: the kubelet's bind-mounted map files
//! (also in mountinfo) and the pods' symlinks (listed).
use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use super::dev_id::DevId;
use super::index::Found;
use super::kubelet::{self, Layout, VolumePath};
use super::mountinfo::{self, Mount};
use super::sysfs::Sysfs;

/// Symlink chains in the kubelet tree are one or two long; more is a loop.
const MAX_LINK_HOPS: usize = 8;

#[derive(Debug, Clone)]
pub struct Discovery {
    pub kubelet_root: PathBuf,
    pub host_kubelet_root: PathBuf,
    pub mountinfo: PathBuf,
    pub sysfs: Sysfs,
}

/// What a scan learns that stays true while a volume stays mounted, so later scans need not
/// read it again: whether a pod's CSI volume is inline (the kubelet writes vol_data.json before
/// the mount and never changes it).
#[derive(Debug, Default)]
pub struct Memo {
    inline: HashMap<PathBuf, bool>,
    /// A mounted CSI volume's vol_data.json could not be read: no signal says when it can be,
    /// so the next discovery scans again.
    unresolved: bool,
}

impl Memo {
    pub fn unresolved(&self) -> bool {
        self.unresolved
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.inline.is_empty()
    }
}

impl Discovery {
    /// `before_listing` sees each kubelet directory before it is listed (see
    /// [`kubelet::pod_block_links`]).
    pub fn scan(
        &self,
        memo: &mut Memo,
        before_listing: &mut dyn FnMut(&Path, kubelet::PodDir) -> bool,
    ) -> Vec<Found> {
        // mountinfo holds resolved paths; the configured root may go through a symlink.
        let root =
            std::fs::canonicalize(&self.kubelet_root).unwrap_or_else(|_| self.kubelet_root.clone());
        let mounts = match std::fs::read(&self.mountinfo) {
            Ok(text) => mountinfo::parse(&text),
            Err(e) => {
                tracing::debug!(path = %self.mountinfo.display(), error = %e, "cannot read mountinfo");
                Vec::new()
            }
        };
        // A later mount on the same point hides the earlier one.
        let visible: BTreeMap<&Path, &Mount> = mounts
            .iter()
            .map(|m| (m.mount_point.as_path(), m))
            .collect();
        let mut still_mounted = Memo::default();
        let mut found: Vec<Found> = visible
            .into_iter()
            .filter_map(|(point, mount)| {
                let volume = point.strip_prefix(&root).ok().and_then(kubelet::classify)?;
                self.mounted(point, mount, volume, memo, &mut still_mounted)
            })
            .collect();
        // Only what is still mounted: the memo cannot grow with pod churn.
        *memo = still_mounted;
        for rel in kubelet::pod_block_links(&root, before_listing) {
            let Some(volume) = kubelet::classify(&rel) else {
                tracing::debug!(path = %rel.display(), "not a PV name; skipping");
                continue;
            };
            let path = root.join(&rel);
            if let Some(dev) = self.device_file(&path) {
                found.push(Found {
                    key: volume.key,
                    dev,
                    subdirectory: false,
                    path,
                });
            }
        }
        found
    }

    /// The PV mounted (or, for a map file, bind-mounted) at `point`.
    fn mounted(
        &self,
        point: &Path,
        mount: &Mount,
        volume: VolumePath,
        memo: &Memo,
        still_mounted: &mut Memo,
    ) -> Option<Found> {
        if volume.layout.is_device_file() {
            return Some(Found {
                key: volume.key,
                dev: self.device_file(point)?,
                subdirectory: false,
                path: point.to_path_buf(),
            });
        }
        if volume.layout == Layout::CsiPodMount {
            let dir = point.parent()?;
            let inline = match memo.inline.get(dir) {
                Some(&known) => Some(known),
                None => kubelet::is_inline_csi_volume(dir),
            };
            match inline {
                Some(inline) => {
                    still_mounted.inline.insert(dir.to_path_buf(), inline);
                }
                None => still_mounted.unresolved = true,
            }
            if inline == Some(true) {
                tracing::debug!(path = %point.display(), "inline CSI volume, not a PV; skipping");
                return None;
            }
        }
        Some(Found {
            key: volume.key,
            dev: self.mount_device(mount)?,
            subdirectory: mount.root != Path::new("/"),
            path: point.to_path_buf(),
        })
    }

    fn mount_device(&self, mount: &Mount) -> Option<DevId> {
        if !mount.dev.is_anonymous() {
            return Some(mount.dev);
        }
        // btrfs reports an anonymous number; its source still names the disk.
        let dev = dev_node_name(&mount.source).and_then(|name| self.sysfs.dev_by_name(name));
        if dev.is_none() {
            tracing::debug!(
                path = %mount.mount_point.display(),
                source = %mount.source.display(),
                "PV not on a block device (network or memory filesystem); skipping"
            );
        }
        dev
    }

    /// The block device a device file or a chain of symlinks to one stands for. Absolute link
    /// targets are host paths: the kubelet's own are rebased onto the kubelet root as the agent
    /// sees it, and `/dev/NAME` is looked up in sysfs, as the agent's /dev is not the host's.
    fn device_file(&self, path: &Path) -> Option<DevId> {
        let mut path = path.to_path_buf();
        for _ in 0..MAX_LINK_HOPS {
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(meta) => meta,
                Err(e) => {
                    tracing::debug!(path = %path.display(), error = %e, "device file vanished or unreadable");
                    return None;
                }
            };
            if meta.file_type().is_block_device() {
                return DevId::from_stat(meta.rdev());
            }
            if !meta.file_type().is_symlink() {
                tracing::debug!(path = %path.display(), "not a block device file; skipping");
                return None;
            }
            let target = std::fs::read_link(&path).ok()?;
            path = if target.is_relative() {
                path.parent()?.join(target)
            } else if let Ok(rest) = target.strip_prefix(&self.host_kubelet_root) {
                self.kubelet_root.join(rest)
            } else if let Some(name) = dev_node_name(&target) {
                return self.sysfs.dev_by_name(name);
            } else {
                target
            };
        }
        tracing::debug!(path = %path.display(), "symlink chain too long; skipping");
        None
    }
}

/// "sdb" for "/dev/sdb"; nothing for deeper paths (/dev/mapper/x, /dev/disk/by-id/y).
fn dev_node_name(path: &Path) -> Option<&str> {
    let mut c = path.components();
    match (c.next(), c.next(), c.next(), c.next()) {
        (
            Some(Component::RootDir),
            Some(Component::Normal(dev)),
            Some(Component::Normal(n)),
            None,
        ) if dev == "dev" => n.to_str(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_node_names() {
        assert_eq!(dev_node_name(Path::new("/dev/sdb")), Some("sdb"));
        assert_eq!(dev_node_name(Path::new("/dev/mapper/x")), None);
        assert_eq!(dev_node_name(Path::new("/dev")), None);
        assert_eq!(dev_node_name(Path::new("dev/sdb")), None);
        assert_eq!(dev_node_name(Path::new("tmpfs")), None);
    }
}
