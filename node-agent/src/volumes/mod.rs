//! Which Kubernetes PersistentVolume each measured block device backs.
//!
//! Two halves:
//! - **On the node** (`discover.rs`): the kubelet's directories (`--kubelet-root`, mounted
//!   read-only with HostToContainer propagation) name the PVs set up here; the agent's own
//!   mountinfo gives the device under each mounted one, `stat` the device behind each block
//!   one, and sysfs the whole disks and device-mapper stacks below (`sysfs.rs`).
//! - **From the API server** (`pv_store.rs`): one watch on PersistentVolumes gives each PV's
//!   claim and storage class. Pods are never read.
//!
//! [`VolumeLabeler::index`] joins them (`index.rs`) into a [`VolumeIndex`]: dev_t → the PVs on
//! it, saying whether the device's IO is one PV's alone ([`DiskVolumes::One`]: its series may
//! carry the PV's labels) or not ([`DiskVolumes::Shared`]: no PV labels, the PVs go to an info
//! metric).
//!
//! **Discovery runs at scrape time, and scans the node only when something it reads changed.**
//! A scan reads mountinfo, lists `pods/*/volumeDevices`, reads a few sysfs files per device,
//! and reads each pod CSI volume's vol_data.json once per mount. On a fake node with 500 pod
//! volume directories (100 pods, 1,000 mountinfo lines) that is about 2,200 system calls with
//! the PVs on 25 disks and 12,700 with them on 500 disks, almost all of the cost. So a scrape
//! past [`VolumeConfig::ttl`] (default 5 s) only *looks* (`changes.rs`), with three signals:
//! - **mountinfo**: the agent keeps its `/proc/self/mountinfo` open; poll(2) with a zero
//!   timeout reports POLLPRI|POLLERR once after any change of its mount namespace, mounts
//!   propagated in from the host's kubelet root included (a unit test checks it on this
//!   kernel, mounting a tmpfs in a namespace of its own). One system call.
//! - **the kubelet's pods tree**: inotify watches on the kubelet root, `pods`, each pod,
//!   its `volumeDevices` and plugin directories, each added by the scan before it lists the
//!   directory. Only entries a block PV's link can be in count (not a pod's `etc-hosts`).
//!   One read(2) that fails with EAGAIN when nothing happened. Without inotify (no instance
//!   or no watch left) this signal always fires, which is the old rescan every `ttl`.
//! - **block devices**: the inode numbers of `/sys/class/block`'s entries (disks,
//!   partitions, dm, md), from one directory listing; they also change when a device is
//!   removed and added again under its name. Device stacks are kept until they change.
//!
//! A vol_data.json that cannot be read yet has no signal; while one is unread, every look
//! scans. What no signal covers (a dm or md device moved onto other disks without a device
//! coming or going, e.g. pvmove or lvextend; a host without inotify events for the kubelet
//! root) is caught by a whole rescan every [`VolumeConfig::full_rescan`] (60 s): when it is
//! due and no signal fired, the scrape that finds it starts it on a thread of its own and takes
//! the index it has; the thread stores the new index. A scan for a signal runs in the scrape,
//! so a change shows in the scrape that sees it.
//!
//! The join with the PV watch cache ([`index::build`], no system calls) runs after a scan and
//! whenever the PV store's generation moved, so a new claim shows at the next scrape, `ttl` or
//! not.
//!
//! Measured by the `discovery_cost_*` unit tests (debug build, CPU time per call, a loaded
//! 2-vCPU VM whose system calls are slow; 25 / 500 disks): a whole scan, which before this
//! design every scrape past the 5 s reuse paid, 24 / 57 ms with that code and 31 / 83 ms with
//! this one in later runs under more load; now a look with nothing changed costs 0.06 / 0.7 ms
//! (most of it listing 500 fake /sys/class/block entries), a scan after one mount change
//! 23–29 / 30–42 ms (device stacks reused; parsing mountinfo dominates), and the scrape that
//! starts the whole rescan 0.5 / 1.2 ms. A scrape never waits for another's scan;
//! it takes the previous index. Only the very first scan is waited for.
mod changes;
mod dev_id;
mod discover;
mod index;
mod kubelet;
mod mountinfo;
mod pv_store;
mod sysfs;
#[cfg(test)]
mod testfs;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock, TryLockError};
use std::time::{Duration, Instant};

pub use index::{PvInfo, VolumeIndex, LABEL_NAMESPACE, LABEL_PV, LABEL_PVC};

use changes::{Changed, Changes};
use discover::{Discovery, Memo};
use index::NodeFacts;
use pv_store::PvStore;
use sysfs::Sysfs;

/// Where discovery looks. The defaults are a DaemonSet pod's view with the kubelet root mounted
/// at its host path.
#[derive(Debug, Clone)]
pub struct VolumeConfig {
    /// The kubelet's root directory as the agent sees it.
    pub kubelet_root: PathBuf,
    /// The same directory's path on the host: the kubelet's symlinks point into it.
    pub host_kubelet_root: PathBuf,
    /// The agent's own mount table: its mount points are the paths under `kubelet_root`.
    pub mountinfo: PathBuf,
    /// Block devices are not namespaced, so the container's /sys shows the host's.
    pub sysfs: PathBuf,
    /// How long one look at the node serves scrapes; zero looks on every call.
    pub ttl: Duration,
    /// How often the node is scanned whole, change signals or not.
    pub full_rescan: Duration,
}

impl Default for VolumeConfig {
    fn default() -> Self {
        Self {
            kubelet_root: "/var/lib/kubelet".into(),
            host_kubelet_root: "/var/lib/kubelet".into(),
            mountinfo: "/proc/self/mountinfo".into(),
            sysfs: "/sys".into(),
            ttl: Duration::from_secs(5),
            full_rescan: Duration::from_secs(60),
        }
    }
}

/// Keeps the PV watch running and answers "which PVs are on which device" at scrape time.
pub struct VolumeLabeler {
    discovery: Arc<Discovery>,
    pvs: PvStore,
    ttl: Duration,
    full_rescan: Duration,
    last: Arc<RwLock<Option<Last>>>,
    /// Held by the one call looking at the node or joining, with what calls carry over.
    scanning: Arc<Mutex<State>>,
    /// The last periodic whole rescan, which runs beside the scrapes.
    background: Mutex<Option<std::thread::JoinHandle<()>>>,
    watch: Option<tokio::task::JoinHandle<()>>,
}

/// The index scrapes take.
struct Last {
    /// When the node was last looked at (signals checked, scanned if they fired).
    looked: Instant,
    /// The PV store's generation the index was joined at.
    pv_generation: u64,
    index: Arc<VolumeIndex>,
}

/// What one look at the node carries over to the next.
struct State {
    memo: Memo,
    changes: Changes,
    facts: NodeFacts,
    /// `None` before the first scan.
    last_full: Option<Instant>,
    /// Scans so far, whole ones included.
    scans: u64,
}

impl VolumeLabeler {
    /// Starts the PersistentVolume watch on the current tokio runtime. Never fails: with the API
    /// server unreachable, PVs are labelled by name only until the watch succeeds.
    pub async fn start(client: kube::Client, cfg: VolumeConfig) -> Self {
        let (pvs, watch) = PvStore::watch(client);
        let mut labeler = Self::with_store(pvs, cfg);
        labeler.watch = Some(watch);
        labeler
    }

    /// Waits up to `limit` for the first full list of PersistentVolumes, so the first scrapes
    /// label devices with their claims rather than by PV name only (which would restart every
    /// labelled series once the list arrives). Returns whether it arrived.
    pub async fn wait_synced(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while !self.pvs.synced() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    fn with_store(pvs: PvStore, cfg: VolumeConfig) -> Self {
        let changes = Changes::new(&cfg.mountinfo, &cfg.sysfs);
        Self {
            discovery: Arc::new(Discovery {
                kubelet_root: cfg.kubelet_root,
                host_kubelet_root: cfg.host_kubelet_root,
                mountinfo: cfg.mountinfo,
                sysfs: Sysfs::new(cfg.sysfs),
            }),
            pvs,
            ttl: cfg.ttl,
            full_rescan: cfg.full_rescan,
            last: Arc::new(RwLock::new(None)),
            scanning: Arc::new(Mutex::new(State {
                memo: Memo::default(),
                changes,
                facts: NodeFacts::default(),
                last_full: None,
                scans: 0,
            })),
            background: Mutex::new(None),
            watch: None,
        }
    }

    /// The current mapping. Cheap and never blocked by the API server: it reads the local
    /// watch cache, looks at the node at most once per `ttl`, and scans it only when a change
    /// signal fired (or the whole rescan is due).
    pub fn index(&self) -> Arc<VolumeIndex> {
        if let Some(fresh) = self.fresh() {
            return fresh;
        }
        let mut state = match self.scanning.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => match self.previous() {
                Some(previous) => return previous,
                // The very first scan: nothing to fall back on, so wait for it.
                None => self.scanning.lock().unwrap_or_else(PoisonError::into_inner),
            },
        };
        if let Some(fresh) = self.fresh() {
            return fresh; // done by the call we waited for
        }
        let started = Instant::now();
        // Read before the store: an event applied meanwhile shows as a newer generation.
        let pv_generation = self.pvs.generation();
        let (looked, previous) = {
            let last = self.last.read().unwrap_or_else(PoisonError::into_inner);
            match last.as_ref() {
                Some(l) => (Some(l.looked), Some((l.pv_generation, l.index.clone()))),
                None => (None, None),
            }
        };
        let look = looked.is_none_or(|at| at.elapsed() >= self.ttl);
        let mut scan = if look {
            state.due(self.full_rescan)
        } else {
            Scan::None
        };
        if scan == Scan::Background {
            match &previous {
                Some((_, index)) => {
                    let index = index.clone();
                    self.rescan_in_background(state, pv_generation, index.clone());
                    return index;
                }
                None => scan = Scan::Full,
            }
        }
        if scan != Scan::None {
            state.scan(&self.discovery, scan);
        }
        let index = match previous {
            Some((generation, index)) if scan == Scan::None && generation == pv_generation => index,
            _ => Arc::new(index::build(&state.facts, &self.pvs)),
        };
        if scan != Scan::None || tracing::enabled!(tracing::Level::TRACE) {
            tracing::debug!(
                scan = ?scan,
                volumes = state.facts.found.len(),
                devices = index.iter().count(),
                pv_list_synced = self.pvs.synced(),
                elapsed_us = started.elapsed().as_micros() as u64,
                "volume discovery"
            );
        }
        let looked = if look { Some(Instant::now()) } else { looked };
        *self.last.write().unwrap_or_else(PoisonError::into_inner) = Some(Last {
            looked: looked.unwrap_or_else(Instant::now),
            pv_generation,
            index: index.clone(),
        });
        index
    }

    /// The periodic whole rescan when no signal fired: it finds nothing new almost always, so
    /// it runs on a thread of its own while scrapes take the index they have; it stores its
    /// index when done. Inline if no thread can be started.
    fn rescan_in_background(
        &self,
        mut state: std::sync::MutexGuard<'_, State>,
        pv_generation: u64,
        index: Arc<VolumeIndex>,
    ) {
        // Scrapes within the ttl take this index; a scrape past it before the rescan ends
        // finds the lock taken and takes it too.
        state.last_full = Some(Instant::now());
        *self.last.write().unwrap_or_else(PoisonError::into_inner) = Some(Last {
            looked: Instant::now(),
            pv_generation,
            index,
        });
        drop(state);
        let (scanning, discovery, pvs, last) = (
            self.scanning.clone(),
            self.discovery.clone(),
            self.pvs.clone(),
            self.last.clone(),
        );
        let rescan = move || {
            let mut state = scanning.lock().unwrap_or_else(PoisonError::into_inner);
            let started = Instant::now();
            state.scan(&discovery, Scan::Full);
            let pv_generation = pvs.generation();
            let index = Arc::new(index::build(&state.facts, &pvs));
            tracing::debug!(
                scan = ?Scan::Background,
                volumes = state.facts.found.len(),
                devices = index.iter().count(),
                elapsed_us = started.elapsed().as_micros() as u64,
                "volume discovery"
            );
            let mut last = last.write().unwrap_or_else(PoisonError::into_inner);
            if let Some(last) = last.as_mut() {
                last.pv_generation = pv_generation;
                last.index = index;
            }
        };
        let spawned = std::thread::Builder::new()
            .name("pv-rescan".into())
            .spawn(rescan);
        match spawned {
            Ok(handle) => {
                *self
                    .background
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(handle);
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot start a thread for the whole PV rescan; next scrape");
                let mut state = self.scanning.lock().unwrap_or_else(PoisonError::into_inner);
                state.last_full = None;
            }
        }
    }

    fn fresh(&self) -> Option<Arc<VolumeIndex>> {
        let last = self.last.read().unwrap_or_else(PoisonError::into_inner);
        let last = last.as_ref()?;
        (last.looked.elapsed() < self.ttl && last.pv_generation == self.pvs.generation())
            .then(|| last.index.clone())
    }

    fn previous(&self) -> Option<Arc<VolumeIndex>> {
        let last = self.last.read().unwrap_or_else(PoisonError::into_inner);
        last.as_ref().map(|l| l.index.clone())
    }
}

/// What one look at the node did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// Nothing changed: the previous facts stand.
    None,
    /// A signal fired (or a vol_data.json was unreadable): scanned, device stacks reused.
    Changed(Changed),
    /// The first scan, or a signal fired when the whole rescan was due.
    Full,
    /// The periodic whole rescan with no signal fired, beside the scrapes.
    Background,
}

impl State {
    /// Checks the change signals: what scan is needed, if any.
    fn due(&mut self, full_every: Duration) -> Scan {
        let changed = self.changes.check();
        let full = self.last_full.is_none_or(|at| at.elapsed() >= full_every);
        match (full, changed.any() || self.memo.unresolved()) {
            (true, true) => Scan::Full,
            (true, false) => Scan::Background,
            (false, true) => Scan::Changed(changed),
            (false, false) => Scan::None,
        }
    }

    fn scan(&mut self, discovery: &Discovery, scan: Scan) {
        let full = matches!(scan, Scan::Full | Scan::Background);
        let blocks = matches!(scan, Scan::Changed(c) if c.blocks);
        let State {
            memo,
            changes,
            facts,
            ..
        } = self;
        changes.pods.scan_started();
        let found = discovery.scan(memo, &mut |dir, kind| changes.pods.watch(dir, kind));
        changes.pods.scan_finished();
        // Device stacks stay as they were while the set of block devices does; a whole rescan
        // reads them again for what that misses (a dm table reloaded onto other disks).
        let known = (!full && !blocks).then_some(&*facts);
        *facts = NodeFacts::gather(found, &discovery.sysfs, known);
        if full {
            self.last_full = Some(Instant::now());
        }
        self.scans += 1;
    }
}

impl Drop for VolumeLabeler {
    fn drop(&mut self) {
        if let Some(watch) = self.watch.take() {
            watch.abort();
        }
    }
}
