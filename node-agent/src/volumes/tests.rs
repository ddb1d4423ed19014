//! Discovery end to end on a fake node: a kubelet root laid out as the kubelet lays it out, a
//! fake sysfs, and mountinfo text as the kernel writes it.
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::dev_id::DevId;
use super::index::DiskVolumes;
use super::mountinfo::escape;
use super::pv_store::tests::Feed;
use super::pv_store::tests::{csi_pv, store_of};
use super::testfs::FakeSys;
use super::*;

fn d(major: u32, minor: u32) -> DevId {
    DevId::new(major, minor).unwrap()
}

fn sha256_hex(s: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, s.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A node: kubelet root, sysfs, mountinfo.
struct Node {
    _dir: tempfile::TempDir,
    /// The kubelet root's real path; `root_link` is a symlink to it.
    root: PathBuf,
    root_link: PathBuf,
    sys: FakeSys,
    mountinfo: PathBuf,
    lines: Vec<Vec<u8>>,
}

impl Node {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Spaces, a tab and non-ASCII: mountinfo escapes the first two, passes the rest.
        let root = dir.path().join("kube let\tü");
        std::fs::create_dir_all(&root).unwrap();
        let root_link = dir.path().join("kubelet-link");
        std::os::unix::fs::symlink(&root, &root_link).unwrap();
        let mountinfo = dir.path().join("mountinfo");
        let mut node = Self {
            _dir: dir,
            root,
            root_link,
            sys: FakeSys::new(),
            mountinfo,
            lines: Vec::new(),
        };
        node.raw_mount(d(253, 9), "/", Path::new("/"), "ext4", "/dev/mapper/root");
        node
    }

    fn config(&self) -> VolumeConfig {
        VolumeConfig {
            kubelet_root: self.root_link.clone(),
            host_kubelet_root: "/var/lib/kubelet".into(),
            mountinfo: self.mountinfo.clone(),
            sysfs: self.sys.root().into(),
            ttl: Duration::ZERO,
            // Only the first scan is whole unless a test says otherwise.
            full_rescan: Duration::from_secs(3600),
        }
    }

    /// A mount under the kubelet root; the directory is created as the kubelet would.
    fn mount(&mut self, dev: DevId, fs_root: &str, rel: &str, source: &str) {
        let point = self.root.join(rel);
        std::fs::create_dir_all(&point).unwrap();
        self.raw_mount(dev, fs_root, &point, "ext4", source);
    }

    /// A CSI PV mounted into a pod as the kubelet mounts it, vol_data.json included.
    fn csi_mount(&mut self, dev: DevId, pod: &str, pv: &str, source: &str) {
        let dir = format!("pods/{pod}/volumes/kubernetes.io~csi/{pv}");
        self.mount(dev, "/", &format!("{dir}/mount"), source);
        std::fs::write(
            self.root.join(dir).join("vol_data.json"),
            format!(r#"{{"specVolID":"{pv}","volumeLifecycleMode":"Persistent"}}"#),
        )
        .unwrap();
    }

    fn raw_mount(&mut self, dev: DevId, fs_root: &str, point: &Path, fs: &str, source: &str) {
        let id = self.lines.len() + 100;
        let mut line = format!("{id} 1 {dev} ").into_bytes();
        line.extend(escape(fs_root.as_bytes()));
        line.push(b' ');
        line.extend(escape(point.as_os_str().as_bytes()));
        line.extend(format!(" rw,relatime shared:{id} - {fs} ").as_bytes());
        line.extend(escape(source.as_bytes()));
        line.extend(b" rw");
        self.lines.push(line);
    }

    fn write_mountinfo(&self) {
        let mut text = self.lines.join(&b'\n');
        text.push(b'\n');
        std::fs::write(&self.mountinfo, text).unwrap();
    }

    fn symlink(&self, target: &str, rel: &str) {
        let link = self.root.join(rel);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(target, link).unwrap();
    }

    fn labeler(&self, pvs: Vec<k8s_openapi::api::core::v1::PersistentVolume>) -> VolumeLabeler {
        self.write_mountinfo();
        VolumeLabeler::with_store(store_of(pvs), self.config())
    }
}

/// mknod needs CAP_MKNOD; `make test` runs as root. Returns false (and says so) without it.
fn mknod_block(path: &Path, dev: DevId) -> bool {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let rdev = libc::makedev(dev.major, dev.minor);
    // SAFETY: a valid NUL-terminated path; mknod has no other memory effects.
    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o600, rdev) };
    if rc != 0 {
        eprintln!(
            "skipping device-node checks: mknod: {}",
            std::io::Error::last_os_error()
        );
    }
    rc == 0
}

fn attributed(index: &VolumeIndex, dev: DevId) -> Option<String> {
    index
        .get(dev.kernel())
        .and_then(|v| v.attributed())
        .map(|p| p.pv.clone())
}

fn all_pvs(index: &VolumeIndex, dev: DevId) -> Vec<String> {
    index
        .get(dev.kernel())
        .map(|v| v.volumes().iter().map(|p| p.pv.clone()).collect())
        .unwrap_or_default()
}

#[test]
fn a_node_with_every_kind_of_volume() {
    let mut node = Node::new();
    let sys = &node.sys;
    for (name, dev) in [
        ("sdb", d(8, 16)),
        ("sdd", d(8, 48)),
        ("sde", d(8, 64)),
        ("sdf", d(8, 80)),
        ("sdg", d(8, 96)),
        ("sdh", d(8, 112)),
        ("sdi", d(8, 128)),
        ("sdj", d(8, 144)),
        ("sdk", d(8, 160)),
    ] {
        sys.disk(name, dev);
    }
    sys.disk("loop0", d(7, 0))
        .partition("loop0p1", d(259, 0))
        .partition("loop0p2", d(259, 1));
    sys.dm("dm-0", d(253, 0), &["sde"]);

    // CSI filesystem PV: staged by handle hash, published into two pods.
    let staging = format!(
        "plugins/kubernetes.io/csi/ebs.csi.aws.com/{}/globalmount",
        sha256_hex("vol-fs")
    );
    node.mount(d(8, 16), "/", &staging, "/dev/sdb");
    for pod in ["pod-1", "pod-2"] {
        let rel = format!("pods/{pod}/volumes/kubernetes.io~csi/pvc-fs/mount");
        node.mount(d(8, 16), "/", &rel, "/dev/sdb");
    }
    // Local PVs on two partitions of one disk.
    node.mount(
        d(259, 0),
        "/",
        "pods/pod-3/volumes/kubernetes.io~local-volume/local-a",
        "/dev/loop0p1",
    );
    node.mount(
        d(259, 1),
        "/",
        "pods/pod-3/volumes/kubernetes.io~local-volume/local-b",
        "/dev/loop0p2",
    );
    // A CSI PV on LUKS/LVM.
    node.mount(
        d(253, 0),
        "/",
        "pods/pod-4/volumes/kubernetes.io~csi/pvc-dm/mount",
        "/dev/dm-0",
    );
    // Local block PV: the pod's link names a host /dev node the agent cannot stat.
    node.symlink(
        "/dev/sdf",
        "pods/pod-5/volumeDevices/kubernetes.io~local-volume/local-blk",
    );
    // An inline CSI volume: where a PV would be, but not one.
    node.mount(
        d(8, 96),
        "/",
        "pods/pod-6/volumes/kubernetes.io~csi/scratch/mount",
        "/dev/sdg",
    );
    std::fs::write(
        node.root
            .join("pods/pod-6/volumes/kubernetes.io~csi/scratch/vol_data.json"),
        r#"{"specVolID":"scratch","volumeLifecycleMode":"Ephemeral"}"#,
    )
    .unwrap();
    // btrfs: an anonymous number, the disk in the source.
    node.mount(
        d(0, 61),
        "/",
        "pods/pod-7/volumes/kubernetes.io~csi/pvc-btrfs/mount",
        "/dev/sdh",
    );
    // NFS and the pods' own tmpfs volumes: no block device.
    node.mount(
        d(0, 60),
        "/",
        "pods/pod-7/volumes/kubernetes.io~csi/pvc-nfs/mount",
        "nfs:/export",
    );
    node.mount(
        d(0, 52),
        "/",
        "pods/pod-7/volumes/kubernetes.io~projected/kube-api-access",
        "tmpfs",
    );
    // Older kubelets stage under the PV name; local block-backed PVs mounted by the kubelet.
    node.mount(
        d(8, 128),
        "/",
        "plugins/kubernetes.io/csi/pv/pvc-old/globalmount",
        "/dev/sdi",
    );
    node.mount(
        d(8, 144),
        "/",
        "plugins/kubernetes.io/local-volume/mounts/local-c",
        "/dev/sdj",
    );
    // A local PV that is a directory of a bigger filesystem.
    node.mount(
        d(8, 160),
        "/data/dir",
        "pods/pod-8/volumes/kubernetes.io~local-volume/local-dir",
        "/dev/sdk",
    );
    // A staging directory whose handle no PV has, and a directory no layout knows.
    node.mount(
        d(8, 16),
        "/",
        &format!("plugins/kubernetes.io/csi/x/{}/globalmount", "1".repeat(64)),
        "/dev/sdb",
    );
    node.mount(
        d(8, 16),
        "/",
        "pods/pod-1/volume-subpaths/data/app/0",
        "/dev/sdb",
    );

    let labeler = node.labeler(vec![
        csi_pv("pvc-fs", ("shop", "data-db-0"), "gp3", "vol-fs"),
        csi_pv("pvc-dm", ("shop", "logs"), "encrypted", "vol-dm"),
    ]);
    let index = labeler.index();

    let fs = index.get(d(8, 16).kernel()).unwrap();
    assert_eq!(
        fs,
        &DiskVolumes::One(PvInfo {
            pv: "pvc-fs".into(),
            pvc: Some("data-db-0".into()),
            namespace: Some("shop".into()),
            storage_class: Some("gp3".into()),
        })
    );
    assert_eq!(attributed(&index, d(7, 0)), None);
    assert_eq!(all_pvs(&index, d(7, 0)), ["local-a", "local-b"]);
    assert_eq!(attributed(&index, d(253, 0)).as_deref(), Some("pvc-dm"));
    assert_eq!(
        attributed(&index, d(8, 64)).as_deref(),
        Some("pvc-dm"),
        "the disk under dm-0"
    );
    assert_eq!(attributed(&index, d(8, 80)).as_deref(), Some("local-blk"));
    assert_eq!(index.get(d(8, 96).kernel()), None, "inline volume");
    assert_eq!(attributed(&index, d(8, 112)).as_deref(), Some("pvc-btrfs"));
    assert_eq!(attributed(&index, d(8, 128)).as_deref(), Some("pvc-old"));
    assert_eq!(attributed(&index, d(8, 144)).as_deref(), Some("local-c"));
    assert_eq!(attributed(&index, d(8, 160)), None);
    assert_eq!(all_pvs(&index, d(8, 160)), ["local-dir"]);
    assert_eq!(
        index.get(d(253, 9).kernel()),
        None,
        "the root disk backs no PV"
    );
    assert_eq!(index.iter().count(), 9, "{index:#?}");
}

#[test]
fn block_volumes_through_device_files() {
    let mut node = Node::new();
    node.sys.disk("sdd", d(8, 48));
    node.sys.disk("nvme1n1", d(259, 5));
    // CSI block PV: the driver's publish file, the kubelet's bind-mounted map file, and the
    // pod's link to the publish file by its host path.
    let publish = "plugins/kubernetes.io/csi/volumeDevices/publish/pvc-blk/pod-1";
    let map_file = "plugins/kubernetes.io/csi/volumeDevices/pvc-blk/dev/pod-1";
    if !mknod_block(&node.root.join(publish), d(8, 48))
        || !mknod_block(&node.root.join(map_file), d(8, 48))
    {
        return;
    }
    node.symlink(
        &format!("/var/lib/kubelet/{publish}"),
        "pods/pod-1/volumeDevices/kubernetes.io~csi/pvc-blk",
    );
    // devtmpfs numbers the bind mount; only st_rdev names the disk.
    let point = node.root.join(map_file);
    node.raw_mount(d(0, 5), "/sdd", &point, "devtmpfs", "udev");
    // Only the map file for this one (its pod link is gone).
    let other = "plugins/kubernetes.io/csi/volumeDevices/pvc-nvme/dev/pod-2";
    assert!(mknod_block(&node.root.join(other), d(259, 5)));
    node.raw_mount(
        d(0, 5),
        "/nvme1n1",
        &node.root.join(other),
        "devtmpfs",
        "udev",
    );
    // A link to a file that is not a device, and a link loop.
    std::fs::write(node.root.join("not-a-device"), "").unwrap();
    node.symlink(
        "../../../../not-a-device",
        "pods/pod-3/volumeDevices/kubernetes.io~csi/pvc-file",
    );
    node.symlink(
        "pvc-loop",
        "pods/pod-3/volumeDevices/kubernetes.io~csi/pvc-loop",
    );

    let index = node
        .labeler(vec![csi_pv("pvc-blk", ("ns", "raw"), "io2", "vol-b")])
        .index();
    let blk = index.get(d(8, 48).kernel()).unwrap();
    assert_eq!(blk.attributed().unwrap().pvc.as_deref(), Some("raw"));
    assert_eq!(attributed(&index, d(259, 5)).as_deref(), Some("pvc-nvme"));
    assert_eq!(index.iter().count(), 2, "{index:#?}");
}

#[test]
fn vanished_and_unreadable_things_are_skipped() {
    let mut node = Node::new();
    // A mount of a device sysfs does not know: kept, standing for itself.
    node.mount(
        d(8, 16),
        "/",
        "pods/p/volumes/kubernetes.io~csi/pvc-gone/mount",
        "/dev/sdb",
    );
    // A pod link to a /dev node sysfs does not know.
    node.symlink("/dev/sdz", "pods/p/volumeDevices/kubernetes.io~csi/pvc-z");
    // Garbage in mountinfo.
    node.lines.push(b"garbage \xff line".to_vec());
    node.lines.push(b"1 2 3:4".to_vec());
    let labeler = node.labeler(vec![]);
    let index = labeler.index();
    assert_eq!(attributed(&index, d(8, 16)).as_deref(), Some("pvc-gone"));
    assert_eq!(index.iter().count(), 1);

    // Everything gone: no mountinfo, no kubelet root, no sysfs.
    let cfg = VolumeConfig {
        kubelet_root: "/nonexistent/kubelet".into(),
        mountinfo: "/nonexistent/mountinfo".into(),
        sysfs: "/nonexistent/sys".into(),
        ..node.config()
    };
    let empty = VolumeLabeler::with_store(store_of(vec![]), cfg).index();
    assert_eq!(*empty, VolumeIndex::default());
}

#[test]
fn a_later_mount_hides_an_earlier_one_on_the_same_point() {
    let mut node = Node::new();
    node.sys.disk("sdb", d(8, 16));
    node.sys.disk("sdc", d(8, 32));
    let rel = "pods/p/volumes/kubernetes.io~csi/pvc-1/mount";
    node.mount(d(8, 16), "/", rel, "/dev/sdb");
    node.mount(d(8, 32), "/", rel, "/dev/sdc");
    let index = node.labeler(vec![]).index();
    assert_eq!(index.get(d(8, 16).kernel()), None);
    assert_eq!(attributed(&index, d(8, 32)).as_deref(), Some("pvc-1"));
}

#[test]
fn scans_are_reused_within_the_ttl_and_never_waited_for() {
    let mut node = Node::new();
    node.sys.disk("sdb", d(8, 16));
    node.mount(
        d(8, 16),
        "/",
        "pods/p/volumes/kubernetes.io~csi/pvc-1/mount",
        "/dev/sdb",
    );
    node.write_mountinfo();
    let cfg = VolumeConfig {
        ttl: Duration::from_secs(3600),
        ..node.config()
    };
    let labeler = VolumeLabeler::with_store(store_of(vec![]), cfg);
    let first = labeler.index();
    std::fs::write(&node.mountinfo, "").unwrap();
    assert!(Arc::ptr_eq(&first, &labeler.index()), "within the ttl");

    // Another scrape is scanning: take the previous index rather than wait.
    labeler.last.write().unwrap().as_mut().unwrap().looked =
        Instant::now() - Duration::from_secs(7200);
    let scanning = labeler.scanning.lock().unwrap();
    assert!(Arc::ptr_eq(&first, &labeler.index()));
    drop(scanning);
    assert_eq!(
        *labeler.index(),
        VolumeIndex::default(),
        "stale: scanned again"
    );
}

#[test]
fn vol_data_is_read_once_per_mount_but_retried_until_readable() {
    let mut node = Node::new();
    node.sys.disk("sdb", d(8, 16));
    let dir = "pods/p/volumes/kubernetes.io~csi/scratch";
    node.mount(d(8, 16), "/", &format!("{dir}/mount"), "/dev/sdb");
    let labeler = node.labeler(vec![]);
    let vol_data = node.root.join(dir).join("vol_data.json");
    assert!(
        labeler.index().get(d(8, 16).kernel()).is_some(),
        "unknown: taken as a PV"
    );

    std::fs::write(&vol_data, r#"{"volumeLifecycleMode":"Ephemeral"}"#).unwrap();
    assert_eq!(labeler.index().get(d(8, 16).kernel()), None, "read now");

    std::fs::write(&vol_data, r#"{"volumeLifecycleMode":"Persistent"}"#).unwrap();
    assert_eq!(
        labeler.index().get(d(8, 16).kernel()),
        None,
        "not read again while mounted"
    );

    // Unmounted: forgotten, so a new mount at the same path is read afresh.
    std::fs::write(&node.mountinfo, "").unwrap();
    assert_eq!(*labeler.index(), VolumeIndex::default());
    assert!(labeler.scanning.lock().unwrap().memo.is_empty());
    node.write_mountinfo();
    assert!(labeler.index().get(d(8, 16).kernel()).is_some());
}

/// The cost the module doc quotes: 100 pods × 5 PV directories, 1,000 mountinfo lines, each
/// PV on a disk of its own (a worst case: most nodes attach far fewer disks) …
#[test]
fn discovery_cost_500_pod_volumes_on_500_disks() {
    discovery_cost(500);
}

/// … and the same 500 pod directories for 25 PVs on 25 disks, each PV used by 20 pods.
#[test]
fn discovery_cost_500_pod_volumes_on_25_disks() {
    discovery_cost(25);
}

fn discovery_cost(disks: u32) {
    let mut node = Node::new();
    for i in 0..disks {
        node.sys.disk(&format!("vd{i}"), d(252, i));
    }
    let mut pvs = Vec::new();
    for pod in 0..100 {
        let uid = format!("0e5d{pod:04}-0000-4000-8000-000000000000");
        for v in 0..5 {
            let i = (pod * 5 + v) % disks;
            let (name, dev, pv) = (format!("vd{i}"), d(252, i), format!("pvc-{i:04}"));
            match i % 5 {
                0..=2 => {
                    let dir = format!("pods/{uid}/volumes/kubernetes.io~csi/{pv}");
                    node.mount(dev, "/", &format!("{dir}/mount"), &format!("/dev/{name}"));
                    std::fs::write(
                        node.root.join(&dir).join("vol_data.json"),
                        format!(r#"{{"specVolID":"{pv}","volumeLifecycleMode":"Persistent"}}"#),
                    )
                    .unwrap();
                    if pod * 5 + v < disks {
                        pvs.push(csi_pv(&pv, ("ns", &format!("claim-{i}")), "gp3", &pv));
                    }
                }
                3 => node.mount(
                    dev,
                    "/",
                    &format!("pods/{uid}/volumes/kubernetes.io~local-volume/{pv}"),
                    &format!("/dev/{name}"),
                ),
                _ => node.symlink(
                    &format!("/dev/{name}"),
                    &format!("pods/{uid}/volumeDevices/kubernetes.io~csi/{pv}"),
                ),
            }
            // Every pod also has its service-account token and a config map or two.
            node.mount(
                d(0, 1000 + pod * 5 + v),
                "/",
                &format!("pods/{uid}/volumes/kubernetes.io~projected/token-{v}"),
                "tmpfs",
            );
        }
    }
    let labeler = node.labeler(pvs);
    let _ = labeler.index(); // warm the page cache as a running node has it
    let check = |index: &VolumeIndex| {
        assert_eq!(index.iter().count(), disks as usize);
        assert!(index.iter().all(|(_, v)| v.attributed().is_some()));
    };
    let runs = 10;
    let build = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };

    // A whole scan, as every scrape past the ttl paid before change signals (now the first
    // scan, and every 60 s on a thread beside the scrapes).
    let full = cost(runs, || {
        let mut state = labeler.scanning.lock().unwrap();
        state.scan(&labeler.discovery, Scan::Full);
        check(&index::build(&state.facts, &labeler.pvs));
    });
    // The scrape that starts the periodic whole rescan pays only for starting its thread.
    let mut starting = (Duration::ZERO, Duration::ZERO);
    for _ in 0..runs {
        labeler.scanning.lock().unwrap().last_full =
            Some(Instant::now() - Duration::from_secs(7200));
        let (wall, cpu) = (Instant::now(), thread_cpu_time());
        check(&labeler.index());
        starting.0 += thread_cpu_time() - cpu;
        starting.1 += wall.elapsed();
        labeler
            .background
            .lock()
            .unwrap()
            .take()
            .unwrap()
            .join()
            .unwrap();
    }
    let starting = (starting.0 / runs, starting.1 / runs);
    // Nothing changed: the signals only, with the real mount table's poll(2) in place of the
    // fake table (a fake one is compared by reading it).
    labeler.scanning.lock().unwrap().changes.mounts =
        changes::MountTable::open(Path::new("/proc/thread-self/mountinfo"));
    let scans = labeler.scanning.lock().unwrap().scans;
    let unchanged = cost(runs, || check(&labeler.index()));
    assert_eq!(
        labeler.scanning.lock().unwrap().scans,
        scans,
        "nothing changed"
    );
    // One pod volume mounted or unmounted: scanned again, device stacks reused.
    labeler.scanning.lock().unwrap().changes.mounts = changes::MountTable::open(&node.mountinfo);
    let mut line = 0;
    let one_mount = cost(runs, || {
        line += 1;
        node.raw_mount(
            d(0, 5000 + line),
            "/",
            &node
                .root
                .join(format!("pods/x/volumes/kubernetes.io~projected/t{line}")),
            "tmpfs",
            "tmpfs",
        );
        node.write_mountinfo();
        check(&labeler.index());
    });
    assert_eq!(labeler.scanning.lock().unwrap().scans, scans + runs as u64);
    eprintln!(
        "discovery of 500 pod volumes on {disks} disks, 1,000 mountinfo lines ({build} build), \
         CPU (wall) per call: whole scan {:?} ({:?}); scrape starting it in the background \
         {:?} ({:?}); nothing changed {:?} ({:?}); after one mount change {:?} ({:?})",
        full.0, full.1, starting.0, starting.1, unchanged.0, unchanged.1, one_mount.0, one_mount.1
    );
}

/// Thread CPU time and wall time per run: CPU, as wall time on a busy test machine mostly
/// measures the other processes.
fn cost(runs: u32, mut f: impl FnMut()) -> (Duration, Duration) {
    let (started, cpu_started) = (Instant::now(), thread_cpu_time());
    for _ in 0..runs {
        f();
    }
    (
        (thread_cpu_time() - cpu_started) / runs,
        started.elapsed() / runs,
    )
}

fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn scans(labeler: &VolumeLabeler) -> u64 {
    labeler.scanning.lock().unwrap().scans
}

/// A node with one PV mounted from a whole disk, scanned once.
fn one_pv_node() -> (Node, VolumeLabeler) {
    let mut node = Node::new();
    node.sys.disk("sdb", d(8, 16));
    node.csi_mount(d(8, 16), "p1", "pvc-1", "/dev/sdb");
    let labeler = node.labeler(vec![]);
    assert_eq!(
        attributed(&labeler.index(), d(8, 16)).as_deref(),
        Some("pvc-1")
    );
    assert_eq!(scans(&labeler), 1);
    (node, labeler)
}

#[test]
fn nothing_changed_reuses_the_scan_and_the_index() {
    let (_node, labeler) = one_pv_node();
    let first = labeler.index();
    for _ in 0..3 {
        assert!(Arc::ptr_eq(&first, &labeler.index()));
    }
    assert_eq!(scans(&labeler), 1, "no signal fired: no scan");
}

#[test]
fn a_mount_table_change_rescans() {
    let (mut node, labeler) = one_pv_node();
    node.sys.disk("sdc", d(8, 32));
    node.csi_mount(d(8, 32), "p2", "pvc-2", "/dev/sdc");
    node.write_mountinfo();
    assert_eq!(
        attributed(&labeler.index(), d(8, 32)).as_deref(),
        Some("pvc-2")
    );
    assert_eq!(scans(&labeler), 2);
    std::fs::write(&node.mountinfo, "").unwrap();
    assert_eq!(*labeler.index(), VolumeIndex::default(), "unmounted");
    assert_eq!(scans(&labeler), 3);
}

/// The real mount table: poll(2) on /proc/PID/mountinfo reports a mount and an unmount in the
/// agent's namespace, each once. Runs in a mount namespace of its own (root only), so the
/// host's table never changes.
#[test]
fn mountinfo_poll_reports_mounts_and_unmounts_once() {
    std::thread::spawn(|| {
        // SAFETY: plain system calls with NUL-terminated constant strings; unshare affects
        // this thread alone (it gets its own fs_struct), which ends with the test.
        let private = unsafe {
            libc::unshare(libc::CLONE_NEWNS) == 0
                && libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) == 0
        };
        if !private {
            eprintln!(
                "SKIPPED LOUDLY: no mount namespace of our own ({}); run as root",
                std::io::Error::last_os_error()
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let point = CString::new(dir.path().as_os_str().as_bytes()).unwrap();
        // The thread's own view: /proc/self is the main thread's, in the host's namespace.
        let mut table = changes::MountTable::open(Path::new("/proc/thread-self/mountinfo"));
        assert!(table.polls(), "procfs mountinfo is polled, not read");
        assert!(!table.changed(), "nothing mounted yet");
        // SAFETY: as above; the mount point is a directory this test owns.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                point.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "mount tmpfs: {}", std::io::Error::last_os_error());
        assert!(table.changed(), "a mount");
        assert!(!table.changed(), "reported once");
        // SAFETY: as above.
        assert_eq!(unsafe { libc::umount(point.as_ptr()) }, 0);
        assert!(table.changed(), "an unmount");
        assert!(!table.changed(), "reported once");
    })
    .join()
    .unwrap();
}

#[test]
fn block_links_in_the_pods_tree_rescan_and_other_entries_do_not() {
    let node = Node::new();
    for (name, dev) in [("sdf", d(8, 80)), ("sdg", d(8, 96))] {
        node.sys.disk(name, dev);
    }
    let labeler = node.labeler(vec![]);
    assert_eq!(
        *labeler.index(),
        VolumeIndex::default(),
        "no pods directory yet"
    );
    assert_eq!(scans(&labeler), 1);

    // pods/ appears with the whole chain below it at once: the root's watch sees it.
    node.symlink(
        "/dev/sdf",
        "pods/p1/volumeDevices/kubernetes.io~local-volume/local-f",
    );
    assert_eq!(
        attributed(&labeler.index(), d(8, 80)).as_deref(),
        Some("local-f")
    );
    assert_eq!(scans(&labeler), 2);

    // What the kubelet writes beside block volumes changes nothing it reads.
    std::fs::write(node.root.join("pods/p1/etc-hosts"), "").unwrap();
    std::fs::create_dir_all(node.root.join("pods/p1/containers/app")).unwrap();
    std::fs::create_dir_all(node.root.join("pods/p1/volumeDevices/kubernetes.io~empty")).unwrap();
    let before = labeler.index();
    assert!(Arc::ptr_eq(&before, &labeler.index()));
    assert_eq!(scans(&labeler), 2, "no rescan for entries no PV lives in");

    // A second pod: its directory in pods/, then its link.
    std::fs::create_dir_all(node.root.join("pods/p2")).unwrap();
    let _ = labeler.index();
    assert_eq!(scans(&labeler), 3);
    node.symlink("/dev/sdg", "pods/p2/volumeDevices/kubernetes.io~csi/pvc-g");
    assert_eq!(
        attributed(&labeler.index(), d(8, 96)).as_deref(),
        Some("pvc-g")
    );
    assert_eq!(scans(&labeler), 4);

    // A link removed from a watched plugin directory.
    std::fs::remove_file(
        node.root
            .join("pods/p1/volumeDevices/kubernetes.io~local-volume/local-f"),
    )
    .unwrap();
    let index = labeler.index();
    assert_eq!(index.get(d(8, 80).kernel()), None);
    assert_eq!(attributed(&index, d(8, 96)).as_deref(), Some("pvc-g"));
    // A pod removed whole: its watches go with it, and so does its PV.
    std::fs::remove_dir_all(node.root.join("pods/p2")).unwrap();
    assert_eq!(*labeler.index(), VolumeIndex::default());
    let watches = labeler.scanning.lock().unwrap().changes.pods.watches();
    assert_eq!(
        watches, 5,
        "root, pods, p1, its volumeDevices and plugin directory"
    );
}

#[test]
fn a_new_block_device_rescans_and_reads_stacks_again() {
    let (node, labeler) = one_pv_node();
    // A partition table re-read puts a partition on the PV's disk: no mount changed, but the
    // disk now carries IO that is not the PV's.
    node.sys.add_partition("sdb", "sdb1", d(8, 17));
    let index = labeler.index();
    assert_eq!(scans(&labeler), 2);
    assert_eq!(attributed(&index, d(8, 16)), None);
    assert_eq!(all_pvs(&index, d(8, 16)), ["pvc-1"]);
}

#[test]
fn pv_changes_rejoin_at_once_without_a_scan() {
    let mut node = Node::new();
    node.sys.disk("sdb", d(8, 16));
    node.csi_mount(d(8, 16), "p1", "pvc-1", "/dev/sdb");
    node.write_mountinfo();
    let mut feed = Feed::new(vec![csi_pv("pvc-1", ("ns", "old"), "gp3", "h")]);
    let cfg = VolumeConfig {
        ttl: Duration::from_secs(3600),
        ..node.config()
    };
    let labeler = VolumeLabeler::with_store(feed.pvs.clone(), cfg);
    let claim = |l: &VolumeLabeler| {
        l.index()
            .get(d(8, 16).kernel())
            .and_then(|v| v.attributed()?.pvc.clone())
    };
    assert_eq!(claim(&labeler).as_deref(), Some("old"));
    feed.apply(csi_pv("pvc-1", ("ns", "new"), "gp3", "h"));
    assert_eq!(claim(&labeler).as_deref(), Some("new"), "within the ttl");
    assert_eq!(scans(&labeler), 1, "joined again, not scanned");
}

#[test]
fn what_no_signal_covers_waits_for_the_whole_rescan() {
    let mut node = Node::new();
    node.sys.disk("sdb", d(8, 16));
    node.sys.disk("sdc", d(8, 32));
    node.sys.dm("dm-0", d(253, 0), &["sdb"]);
    node.csi_mount(d(253, 0), "p1", "pvc-1", "/dev/dm-0");
    let labeler = node.labeler(vec![]);
    assert_eq!(attributed(&labeler.index(), d(8, 32)), None);
    // An LV extended onto another disk: its slaves change, no device appears.
    node.sys.add_slave("dm-0", "sdc");
    assert_eq!(attributed(&labeler.index(), d(8, 32)), None, "not seen yet");
    assert_eq!(scans(&labeler), 1);
    labeler.scanning.lock().unwrap().last_full = Some(Instant::now() - Duration::from_secs(3600));
    // The scrape that finds it due starts it beside itself and takes the index it has.
    assert_eq!(attributed(&labeler.index(), d(8, 32)), None);
    labeler
        .background
        .lock()
        .unwrap()
        .take()
        .expect("a whole rescan started")
        .join()
        .unwrap();
    assert_eq!(scans(&labeler), 2);
    assert_eq!(
        attributed(&labeler.index(), d(8, 32)).as_deref(),
        Some("pvc-1")
    );
    assert_eq!(scans(&labeler), 2, "stored by the rescan");
}
