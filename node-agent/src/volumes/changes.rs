//! Change signals: whether anything a scan reads may have changed since the last scan, answered
//! with a few system calls instead of a scan (see the module doc of `volumes` for what each
//! covers and what is left to the periodic full rescan).
use std::collections::HashMap;
use std::fs::File;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::fs::DirEntryExt;
use std::path::{Path, PathBuf};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use rustix::io::Errno;

use super::kubelet::PodDir;

/// `PROC_SUPER_MAGIC` from linux/magic.h.
const PROC_SUPER_MAGIC: i64 = 0x9fa0;

/// Which signals fired at one check.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Changed {
    pub mounts: bool,
    pub pods: bool,
    pub blocks: bool,
}

impl Changed {
    pub fn any(self) -> bool {
        self.mounts || self.pods || self.blocks
    }
}

/// The three signals together.
pub struct Changes {
    pub mounts: MountTable,
    pub pods: PodWatch,
    pub blocks: BlockDevices,
}

impl Changes {
    pub fn new(mountinfo: &Path, sysfs: &Path) -> Self {
        Self {
            mounts: MountTable::open(mountinfo),
            pods: PodWatch::new(),
            blocks: BlockDevices::new(sysfs.join("class/block")),
        }
    }

    /// Every signal is read (none short-circuits another), so each starts afresh after a scan.
    pub fn check(&mut self) -> Changed {
        Changed {
            mounts: self.mounts.changed(),
            pods: self.pods.changed(),
            blocks: self.blocks.changed(),
        }
    }
}

/// The agent's mount table.
pub struct MountTable {
    path: PathBuf,
    kind: TableKind,
}

enum TableKind {
    /// An open `/proc/PID/mountinfo`: poll(2) reports POLLPRI|POLLERR once for any number of
    /// changes of its mount namespace (mounts propagated into it included) since the previous
    /// poll on this file, and nothing otherwise.
    Proc(File),
    /// Anything else (a test's fake table, or a table that could not be opened): compared by
    /// its contents at each check.
    Contents(Option<Vec<u8>>),
}

impl MountTable {
    pub fn open(path: &Path) -> Self {
        let kind = match File::open(path) {
            Ok(f) if is_procfs(&f) => TableKind::Proc(f),
            _ => TableKind::Contents(std::fs::read(path).ok()),
        };
        Self {
            path: path.to_path_buf(),
            kind,
        }
    }

    #[cfg(test)]
    pub fn polls(&self) -> bool {
        matches!(self.kind, TableKind::Proc(_))
    }

    /// Whether the table changed since the previous call (or since it was opened).
    pub fn changed(&mut self) -> bool {
        match &mut self.kind {
            TableKind::Proc(file) => {
                let mut fds = [PollFd::new(file, PollFlags::PRI)];
                match poll(&mut fds, Some(&Timespec::default())) {
                    Ok(_) => fds[0].revents().intersects(PollFlags::PRI | PollFlags::ERR),
                    Err(e) => {
                        // Cannot tell: take it as changed, which costs a scan, never a label.
                        tracing::debug!(path = %self.path.display(), error = %e, "cannot poll mountinfo");
                        true
                    }
                }
            }
            TableKind::Contents(last) => {
                let now = std::fs::read(&self.path).ok();
                let changed = now != *last;
                *last = now;
                changed
            }
        }
    }
}

// f_type is i64 on x86_64 and aarch64 but u32 on some 32-bit targets: the conversion is not
// useless everywhere.
#[allow(clippy::useless_conversion)]
fn is_procfs(file: &File) -> bool {
    rustix::fs::fstatfs(file).is_ok_and(|st| i64::from(st.f_type) == PROC_SUPER_MAGIC)
}

/// An inotify watch on each directory [`super::kubelet::pod_block_links`] lists. The scan adds
/// the watches itself, each before it lists the directory, so an entry is either in the
/// listing or reported here.
pub struct PodWatch {
    /// `None` when inotify is unavailable (no instance left): every check reports a change.
    inotify: Option<OwnedFd>,
    /// Watch descriptor → the directory and what it is.
    watched: HashMap<i32, (PathBuf, PodDir)>,
    by_path: HashMap<PathBuf, i32>,
    /// A watch could not be added during the last scan (the watch limit): until a scan adds
    /// every watch, every check reports a change.
    degraded: bool,
    failed_this_scan: bool,
}

/// Entries appearing and leaving, and the directory itself going away.
fn watch_flags() -> WatchFlags {
    WatchFlags::CREATE
        | WatchFlags::DELETE
        | WatchFlags::MOVED_FROM
        | WatchFlags::MOVED_TO
        | WatchFlags::DELETE_SELF
        | WatchFlags::MOVE_SELF
        | WatchFlags::ONLYDIR
        | WatchFlags::DONT_FOLLOW
        | WatchFlags::EXCL_UNLINK
}

impl PodWatch {
    fn new() -> Self {
        let inotify = match inotify::init(CreateFlags::NONBLOCK | CreateFlags::CLOEXEC) {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "cannot create an inotify instance (fs.inotify.max_user_instances?); the \
                     kubelet's pods directory is listed again at every discovery"
                );
                None
            }
        };
        Self {
            inotify,
            watched: HashMap::new(),
            by_path: HashMap::new(),
            degraded: false,
            failed_this_scan: false,
        }
    }

    pub fn scan_started(&mut self) {
        self.failed_this_scan = false;
    }

    pub fn scan_finished(&mut self) {
        self.degraded = self.failed_this_scan;
    }

    /// Watches `dir` if it is not watched yet; false if it does not exist (or is no directory).
    pub fn watch(&mut self, dir: &Path, kind: PodDir) -> bool {
        let Some(fd) = &self.inotify else {
            return true;
        };
        if self.by_path.contains_key(dir) {
            return true;
        }
        match inotify::add_watch(fd, dir, watch_flags()) {
            Ok(wd) => {
                // The same directory by another path (a bind mount) has the same descriptor.
                if let Some((old, _)) = self.watched.insert(wd, (dir.to_path_buf(), kind)) {
                    self.by_path.remove(&old);
                }
                self.by_path.insert(dir.to_path_buf(), wd);
                true
            }
            Err(Errno::NOENT | Errno::NOTDIR) => false,
            Err(e) => {
                if !self.degraded && !self.failed_this_scan {
                    tracing::warn!(
                        dir = %dir.display(),
                        error = %e,
                        "cannot watch a kubelet directory (fs.inotify.max_user_watches?); the \
                         kubelet's pods directory is listed again at every discovery until it can"
                    );
                }
                self.failed_this_scan = true;
                true
            }
        }
    }

    #[cfg(test)]
    pub fn watches(&self) -> usize {
        self.watched.len()
    }

    /// Whether an event since the previous call can change what the scan finds. Reads until
    /// the queue is empty: one read(2) that fails with EAGAIN when nothing happened.
    pub fn changed(&mut self) -> bool {
        let Some(fd) = &self.inotify else {
            return true;
        };
        let mut changed = self.degraded;
        let mut buf = [MaybeUninit::<u8>::uninit(); 4096];
        let mut events = inotify::Reader::new(fd, &mut buf);
        let mut gone = Vec::new();
        loop {
            let event = match events.next() {
                Ok(event) => event,
                Err(Errno::AGAIN) => break,
                Err(Errno::INTR) => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read inotify events");
                    changed = true;
                    break;
                }
            };
            let flags = event.events();
            if flags.contains(ReadFlags::QUEUE_OVERFLOW) {
                changed = true; // events were lost
                continue;
            }
            if flags.contains(ReadFlags::IGNORED) {
                gone.push(event.wd());
                changed = true;
                continue;
            }
            if flags.intersects(ReadFlags::DELETE_SELF | ReadFlags::MOVE_SELF) {
                // A moved directory keeps its watch under a path that is no longer its own.
                if flags.contains(ReadFlags::MOVE_SELF) {
                    let _ = inotify::remove_watch(fd, event.wd());
                }
                changed = true;
                continue;
            }
            let relevant = match (self.watched.get(&event.wd()), event.file_name()) {
                (Some((_, kind)), Some(name)) => {
                    use std::os::unix::ffi::OsStrExt;
                    kind.matters(std::ffi::OsStr::from_bytes(name.to_bytes()))
                }
                _ => true,
            };
            changed |= relevant;
        }
        for wd in gone {
            if let Some((path, _)) = self.watched.remove(&wd) {
                self.by_path.remove(&path);
            }
        }
        changed
    }
}

/// The set of block devices: the entries of `/sys/class/block` (disks, partitions, dm and md
/// devices) by inode number, which sysfs gives each new entry, so a device removed and added
/// again under the same name between two checks still shows.
pub struct BlockDevices {
    dir: PathBuf,
    last: Option<Vec<u64>>,
}

impl BlockDevices {
    fn new(dir: PathBuf) -> Self {
        let mut blocks = Self { dir, last: None };
        blocks.last = blocks.list();
        blocks
    }

    /// One directory listing; the inode number comes with each entry, no stat per device.
    fn list(&self) -> Option<Vec<u64>> {
        let entries = std::fs::read_dir(&self.dir).ok()?;
        let mut inodes: Vec<u64> = entries.filter_map(|e| Some(e.ok()?.ino())).collect();
        inodes.sort_unstable();
        Some(inodes)
    }

    pub fn changed(&mut self) -> bool {
        let now = self.list();
        let changed = now != self.last;
        self.last = now;
        changed
    }
}
