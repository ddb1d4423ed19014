//! What kinds of disks this host has, from sysfs: it decides which optional programs to attach.
use std::path::Path;

pub const SYS_BLOCK: &str = "/sys/block";

/// blk-mq (request-based) disks have an `mq` directory; bio-based ones (zram, dm, md) do not.
fn is_request_based(disk: &Path) -> bool {
    disk.join("mq").is_dir()
}

/// Disks with no capacity (unbound loop devices, unconfigured zram) do no IO.
fn has_capacity(disk: &Path) -> bool {
    std::fs::read_to_string(disk.join("size"))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .is_some_and(|n| n > 0)
}

fn disks(sys_block: &Path) -> impl Iterator<Item = std::path::PathBuf> {
    std::fs::read_dir(sys_block)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| has_capacity(p))
}

/// A request-based disk whose queue may not stamp `io_start_time_ns`. Writeback throttling
/// (`queue/wbt_lat_usec` > 0) turns the queue's stats on; without it nothing visible says they are,
/// so such a disk is taken as keeping none.
pub fn request_disk_without_stats(sys_block: &Path) -> Option<String> {
    disks(sys_block)
        .filter(|d| is_request_based(d))
        .find_map(|d| {
            let wbt = std::fs::read_to_string(d.join("queue/wbt_lat_usec")).ok();
            let stats_on = wbt
                .and_then(|s| s.trim().parse::<u64>().ok())
                .is_some_and(|us| us > 0);
            (!stats_on)
                .then(|| d.file_name().map(|n| n.to_string_lossy().into_owned()))
                .flatten()
        })
}

pub fn bio_based_disk(sys_block: &Path) -> Option<String> {
    disks(sys_block)
        .find(|d| !is_request_based(d))
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// A disk whose `/sys/block/DEV/stat` counts exactly what the request programs see.
#[derive(Debug, Clone)]
pub struct StatDisk {
    pub dir: std::path::PathBuf,
    pub dev: u32,
}

/// Request-based disks with capacity whose queue keeps IO stats (`queue/iostats` 1). Bio-based
/// disks are left out: their stat differs from what the agent counts by design (zram accounts no
/// discards or write-zeroes), and with iostats 0 stat counts nothing.
pub fn stat_disks(sys_block: &Path) -> Vec<StatDisk> {
    disks(sys_block)
        .filter(|d| is_request_based(d))
        .filter(|d| std::fs::read_to_string(d.join("queue/iostats")).is_ok_and(|s| s.trim() == "1"))
        .filter_map(|d| {
            let dev = parse_dev(&std::fs::read_to_string(d.join("dev")).ok()?)?;
            Some(StatDisk { dir: d, dev })
        })
        .collect()
}

fn parse_dev(s: &str) -> Option<u32> {
    let (major, minor) = s.trim().split_once(':')?;
    Some(crate::devices::mkdev(
        major.parse().ok()?,
        minor.parse().ok()?,
    ))
}

/// The disks' names: one directory read, cheap enough for every scrape.
pub fn disk_names(sys_block: &Path) -> std::collections::BTreeSet<std::ffi::OsString> {
    std::fs::read_dir(sys_block)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name())
        .collect()
}

/// Kernel dev_t of every disk (`/sys/block/X/dev` holds "MAJ:MIN").
pub fn disk_devs(sys_block: &Path) -> Vec<u32> {
    std::fs::read_dir(sys_block)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("dev")).ok())
        .filter_map(|s| parse_dev(&s))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn disk(root: &Path, name: &str, size: u64, mq: bool, wbt: Option<u64>) {
        let d = root.join(name);
        fs::create_dir_all(d.join("queue")).unwrap();
        fs::write(d.join("size"), format!("{size}\n")).unwrap();
        fs::write(d.join("dev"), "7:3\n").unwrap();
        if mq {
            fs::create_dir_all(d.join("mq")).unwrap();
        }
        if let Some(w) = wbt {
            fs::write(d.join("queue/wbt_lat_usec"), format!("{w}\n")).unwrap();
        }
        fs::write(d.join("queue/iostats"), "1\n").unwrap();
    }

    #[test]
    fn classifies_a_fake_sysfs() {
        let root = std::env::temp_dir().join(format!("bio-topology-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        disk(&root, "vda", 100, true, Some(75000));
        disk(&root, "zram0", 0, false, None);
        disk(&root, "loop0", 0, true, None);
        assert_eq!(request_disk_without_stats(&root), None);
        assert_eq!(
            bio_based_disk(&root),
            None,
            "an unconfigured zram does no IO"
        );

        disk(&root, "zram1", 8, false, None);
        disk(&root, "sdb", 8, true, Some(0));
        assert_eq!(bio_based_disk(&root).as_deref(), Some("zram1"));
        assert_eq!(request_disk_without_stats(&root).as_deref(), Some("sdb"));
        assert!(disk_devs(&root)
            .iter()
            .all(|&d| d == crate::devices::mkdev(7, 3)));
        assert_eq!(disk_devs(&root).len(), 5);
        // Compared with stat: request-based, sized, iostats on.
        fs::write(root.join("sdb/queue/iostats"), "0\n").unwrap();
        let compared: Vec<_> = stat_disks(&root).into_iter().map(|d| d.dir).collect();
        assert_eq!(compared, vec![root.join("vda")]);
        fs::remove_dir_all(&root).unwrap();
    }
}
