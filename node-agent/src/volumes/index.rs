//! The join: discovered volumes × PV objects × device stacks → which device's IO belongs to
//! which PV.
//!
//! A device's series carry a PV's labels only when all of its IO is that PV's. Whole disks are
//! measured, not partitions, so a disk is shared as soon as two PVs sit on it (two partitions,
//! two LVs, two directories of one filesystem), or one PV sits on it beside anything else: a
//! partition or device-mapper holder that is no PV, or a PV that is only a subdirectory of a
//! filesystem (a local volume on the root disk, hostpath-style CSI drivers).
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;

use super::dev_id::DevId;
use super::kubelet::PvKey;
use super::pv_store::PvStore;
use super::sysfs::{any_unknown, Stack, Sysfs};

pub const LABEL_PV: &str = "persistentvolume";
pub const LABEL_PVC: &str = "persistentvolumeclaim";
pub const LABEL_NAMESPACE: &str = "namespace";
pub const LABEL_STORAGE_CLASS: &str = "storageclass";

/// What the labels of one PV say. `None` means "no such label", never an empty value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PvInfo {
    pub pv: String,
    pub pvc: Option<String>,
    pub namespace: Option<String>,
    pub storage_class: Option<String>,
}

impl PvInfo {
    /// A PV known only by the kubelet's directory name (its object not listed yet).
    pub fn named(pv: &str) -> Self {
        Self {
            pv: pv.to_string(),
            pvc: None,
            namespace: None,
            storage_class: None,
        }
    }

    /// The label pairs, in a fixed order, leaving out what is unknown.
    pub fn labels(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            (LABEL_PV, Some(self.pv.as_str())),
            (LABEL_PVC, self.pvc.as_deref()),
            (LABEL_NAMESPACE, self.namespace.as_deref()),
            (LABEL_STORAGE_CLASS, self.storage_class.as_deref()),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)))
    }
}

/// The PVs on one measured device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskVolumes {
    /// All of the device's IO is this PV's: its series may carry the PV's labels.
    One(PvInfo),
    /// The device's IO is not one PV's (see the module doc): no PV labels on its series; every
    /// PV on it belongs in the info metric. Sorted by PV name; it may hold a single PV that
    /// shares the device with something else.
    Shared(Vec<PvInfo>),
}

impl DiskVolumes {
    /// The PV whose labels the device's series carry, if its IO is that PV's alone.
    pub fn attributed(&self) -> Option<&PvInfo> {
        match self {
            DiskVolumes::One(pv) => Some(pv),
            DiskVolumes::Shared(_) => None,
        }
    }

    /// Every PV on the device.
    pub fn volumes(&self) -> &[PvInfo] {
        match self {
            DiskVolumes::One(pv) => std::slice::from_ref(pv),
            DiskVolumes::Shared(pvs) => pvs,
        }
    }
}

/// Measured device (kernel dev_t, as in the histograms) → its PVs. Devices that back no PV
/// are absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeIndex {
    devices: BTreeMap<u32, DiskVolumes>,
}

impl VolumeIndex {
    pub fn get(&self, dev: u32) -> Option<&DiskVolumes> {
        self.devices.get(&dev)
    }

    /// Every device with PVs, by dev_t.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &DiskVolumes)> {
        self.devices.iter().map(|(d, v)| (*d, v))
    }
}

/// One PV found on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub key: PvKey,
    /// The device the PV is mounted from or mapped to (the top of its stack).
    pub dev: DevId,
    /// The PV is a directory inside a larger filesystem, not a whole one.
    pub subdirectory: bool,
    /// Where it was found, for logs.
    pub path: PathBuf,
}

/// What the node says, apart from the PV objects: the volumes found, and the sysfs facts about
/// every device under them. Gathering it costs system calls; [`build`] joins it with the PV
/// watch cache without any, so a change of PV objects never needs a scan of the node.
#[derive(Debug, Default)]
pub struct NodeFacts {
    pub found: Vec<Found>,
    /// The stack below every device a found volume touches.
    stacks: HashMap<DevId, Stack>,
    /// The holders and partitions of each of those devices.
    users: HashMap<DevId, Vec<Option<DevId>>>,
}

impl NodeFacts {
    /// Reads sysfs for the devices under `found`. Facts about a device in `known` are taken from
    /// it instead: the caller passes the previous facts while the node's set of block devices
    /// has not changed. Only the devices `found` needs are kept, so this never grows with churn.
    pub fn gather(found: Vec<Found>, sysfs: &Sysfs, known: Option<&NodeFacts>) -> Self {
        let mut stacks: HashMap<DevId, Stack> = HashMap::new();
        let mut stack_of = |dev: DevId| -> Stack {
            stacks
                .entry(dev)
                .or_insert_with(|| {
                    known
                        .and_then(|k| k.stacks.get(&dev).cloned())
                        .unwrap_or_else(|| sysfs.stack(dev))
                })
                .clone()
        };
        // Every device a volume's IO touches, whether or not its PV resolves: which ones do
        // depends on the PV store, which `build` reads later.
        let mut touched = HashSet::new();
        for f in &found {
            touched.extend(stack_of(f.dev).touched);
        }
        let mut users = HashMap::new();
        for &d in &touched {
            // A device with foreign IO passes it to its whole stack, so `build` may need it.
            stack_of(d);
            let u = known
                .and_then(|k| k.users.get(&d).cloned())
                .unwrap_or_else(|| sysfs.users(d));
            users.insert(d, u);
        }
        Self {
            found,
            stacks,
            users,
        }
    }

    fn stack(&self, dev: DevId) -> Stack {
        self.stacks.get(&dev).cloned().unwrap_or_else(|| Stack {
            // Not gathered: stands for itself, as a device sysfs does not know does.
            measured: [dev].into(),
            touched: [dev].into(),
        })
    }
}

pub fn build(node: &NodeFacts, pvs: &PvStore) -> VolumeIndex {
    let mut names = Names::new(pvs);
    let mut members: BTreeMap<DevId, BTreeMap<String, PvInfo>> = BTreeMap::new();
    let mut touched = HashSet::new();
    let mut foreign_roots = Vec::new();
    for f in &node.found {
        let Some(info) = names.resolve(f) else {
            continue;
        };
        let stack = node.stack(f.dev);
        tracing::debug!(pv = %info.pv, device = %f.dev, path = %f.path.display(), "PV found");
        for d in &stack.measured {
            let on_device = members.entry(*d).or_default();
            on_device
                .entry(info.pv.clone())
                .or_insert_with(|| info.clone());
        }
        touched.extend(stack.touched);
        if f.subdirectory {
            foreign_roots.push(f.dev);
        }
    }
    foreign_roots.extend(touched.iter().filter(|d| {
        node.users
            .get(d)
            .is_some_and(|users| any_unknown(users, &touched))
    }));
    // Whatever is under a device with foreign IO carries that IO too.
    let foreign: HashSet<DevId> = foreign_roots
        .into_iter()
        .flat_map(|d| node.stack(d).measured)
        .collect();

    let devices = members
        .into_iter()
        .map(|(dev, pvs)| {
            let mut pvs: Vec<PvInfo> = pvs.into_values().collect();
            let volumes = if pvs.len() == 1 && !foreign.contains(&dev) {
                DiskVolumes::One(pvs.remove(0))
            } else {
                DiskVolumes::Shared(pvs)
            };
            (dev.kernel(), volumes)
        })
        .collect();
    VolumeIndex { devices }
}

/// Names found volumes: by the PV name in their path, or by their staging directory's handle
/// hash, whose index is built at most once per scan and only if a staging directory asks.
struct Names<'a> {
    pvs: &'a PvStore,
    handles: Option<HashMap<(String, String), String>>,
}

impl<'a> Names<'a> {
    fn new(pvs: &'a PvStore) -> Self {
        Self { pvs, handles: None }
    }

    /// A PV the store does not know yet keeps the name the kubelet gave it.
    fn resolve(&mut self, f: &Found) -> Option<PvInfo> {
        let name = match &f.key {
            PvKey::Name(name) => name,
            PvKey::Handle { driver, sha256 } => {
                let handles = self.handles.get_or_insert_with(|| self.pvs.handle_index());
                let name = handles.get(&(driver.clone(), sha256.clone()));
                if name.is_none() {
                    tracing::debug!(path = %f.path.display(), "no known PV has this volume handle; skipping");
                }
                name?
            }
        };
        Some(
            self.pvs
                .by_name(name)
                .unwrap_or_else(|| PvInfo::named(name)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::pv_store::tests::{csi_pv, store_of};
    use super::super::testfs::FakeSys;
    use super::*;
    use proptest::prelude::*;

    fn d(major: u32, minor: u32) -> DevId {
        DevId::new(major, minor).unwrap()
    }

    /// Gathers fresh facts for each call, as a first scan does.
    fn build(found: &[Found], pvs: &PvStore, sysfs: &Sysfs) -> VolumeIndex {
        super::build(&NodeFacts::gather(found.to_vec(), sysfs, None), pvs)
    }

    fn found(pv: &str, dev: DevId) -> Found {
        Found {
            key: PvKey::Name(pv.into()),
            dev,
            subdirectory: false,
            path: PathBuf::from(pv),
        }
    }

    fn names(v: &DiskVolumes) -> Vec<&str> {
        v.volumes().iter().map(|p| p.pv.as_str()).collect()
    }

    #[test]
    fn labels_leave_out_what_is_unknown() {
        let full = PvInfo {
            pv: "pv".into(),
            pvc: Some("c".into()),
            namespace: Some("n".into()),
            storage_class: Some("s".into()),
        };
        assert_eq!(
            full.labels().collect::<Vec<_>>(),
            [
                ("persistentvolume", "pv"),
                ("persistentvolumeclaim", "c"),
                ("namespace", "n"),
                ("storageclass", "s")
            ]
        );
        assert_eq!(
            PvInfo::named("pv").labels().collect::<Vec<_>>(),
            [("persistentvolume", "pv")]
        );
    }

    #[test]
    fn one_pv_per_disk_labels_it_and_partitions_of_one_disk_share_it() {
        let sys = FakeSys::new();
        sys.disk("sdb", d(8, 16));
        sys.disk("loop0", d(7, 0))
            .partition("loop0p1", d(259, 0))
            .partition("loop0p2", d(259, 1));
        let pvs = store_of(vec![csi_pv("pvc-b", ("shop", "db"), "gp3", "h")]);
        let index = build(
            &[
                found("pvc-b", d(8, 16)),
                found("pvc-b", d(8, 16)), // pod mount and staging mount of the same PV
                found("pvc-p1", d(259, 0)),
                found("pvc-p2", d(259, 1)),
            ],
            &pvs,
            &sys.sysfs(),
        );
        let sdb = index.get(d(8, 16).kernel()).unwrap();
        assert_eq!(sdb.attributed().unwrap().pvc.as_deref(), Some("db"));
        let loop0 = index.get(d(7, 0).kernel()).unwrap();
        assert_eq!(loop0.attributed(), None);
        assert_eq!(names(loop0), ["pvc-p1", "pvc-p2"]);
        assert_eq!(
            loop0.volumes()[0],
            PvInfo::named("pvc-p1"),
            "not in the store: name only"
        );
        assert_eq!(
            index.get(d(259, 0).kernel()),
            None,
            "partitions are not measured"
        );
        assert_eq!(index.iter().count(), 2);
    }

    #[test]
    fn a_pv_beside_other_data_is_not_attributed() {
        let sys = FakeSys::new();
        sys.disk("sda", d(8, 0))
            .partition("sda1", d(8, 1))
            .partition("sda2", d(8, 2));
        sys.disk("sdc", d(8, 32));
        let pvs = store_of(vec![]);
        let subdir = Found {
            subdirectory: true,
            ..found("local-dir", d(8, 32))
        };
        let index = build(&[found("pvc-a2", d(8, 2)), subdir], &pvs, &sys.sysfs());
        let sda = index.get(d(8, 0).kernel()).unwrap();
        assert_eq!(sda, &DiskVolumes::Shared(vec![PvInfo::named("pvc-a2")]));
        let sdc = index.get(d(8, 32).kernel()).unwrap();
        assert_eq!(sdc.attributed(), None, "a directory of a larger filesystem");
        assert_eq!(names(sdc), ["local-dir"]);
    }

    #[test]
    fn dm_stacks_label_every_level_and_share_what_they_share() {
        let sys = FakeSys::new();
        sys.disk("sda", d(8, 0));
        sys.disk("sdb", d(8, 16));
        // LUKS on sdb: dm-0 is pvc-x's alone, and so is sdb.
        sys.dm("dm-0", d(253, 0), &["sdb"]);
        // Two LVs on sda: each LV is one PV's, sda is shared.
        sys.dm("dm-1", d(253, 1), &["sda"]);
        sys.dm("dm-2", d(253, 2), &["sda"]);
        let pvs = store_of(vec![]);
        let index = build(
            &[
                found("pvc-x", d(253, 0)),
                found("pvc-y", d(253, 1)),
                found("pvc-z", d(253, 2)),
            ],
            &pvs,
            &sys.sysfs(),
        );
        let pv = |dev: DevId| {
            index
                .get(dev.kernel())
                .and_then(|v| v.attributed())
                .map(|p| p.pv.as_str())
        };
        assert_eq!(pv(d(253, 0)), Some("pvc-x"));
        assert_eq!(pv(d(8, 16)), Some("pvc-x"));
        assert_eq!(pv(d(253, 1)), Some("pvc-y"));
        assert_eq!(pv(d(253, 2)), Some("pvc-z"));
        assert_eq!(
            names(index.get(d(8, 0).kernel()).unwrap()),
            ["pvc-y", "pvc-z"]
        );

        // A third LV that is no PV makes sda carry foreign IO even with one PV left.
        sys.dm("dm-3", d(253, 3), &["sda"]);
        let index = build(&[found("pvc-y", d(253, 1))], &pvs, &sys.sysfs());
        assert_eq!(
            index
                .get(d(253, 1).kernel())
                .unwrap()
                .attributed()
                .unwrap()
                .pv,
            "pvc-y"
        );
        assert_eq!(index.get(d(8, 0).kernel()).unwrap().attributed(), None);
    }

    #[test]
    fn staging_hashes_resolve_through_the_store() {
        let sys = FakeSys::new();
        sys.disk("sdd", d(8, 48));
        let pvs = store_of(vec![csi_pv("pvc-s", ("ns", "claim"), "fast", "vol-9")]);
        let handle = |h: &str| Found {
            key: PvKey::Handle {
                driver: "ebs.csi.aws.com".into(),
                sha256: h.into(),
            },
            ..found("", d(8, 48))
        };
        let known = pvs.handle_index().into_keys().next().unwrap().1;
        let index = build(&[handle(&known)], &pvs, &sys.sysfs());
        let v = index.get(d(8, 48).kernel()).unwrap();
        assert_eq!(
            v.attributed().unwrap().storage_class.as_deref(),
            Some("fast")
        );
        let unknown = "0".repeat(64);
        assert_eq!(
            build(&[handle(&unknown)], &pvs, &sys.sysfs()),
            VolumeIndex::default()
        );
    }

    #[derive(Debug, Clone)]
    struct Layout {
        /// Per disk: how many partitions (0: the PV uses the whole disk).
        partitions: Vec<u32>,
        /// (disk, partition or whole, PV number, is a subdirectory)
        volumes: Vec<(usize, u32, u8, bool)>,
    }

    fn layout() -> impl Strategy<Value = Layout> {
        proptest::collection::vec(0u32..4, 1..4).prop_flat_map(|partitions| {
            let disks = partitions.len();
            let vols = proptest::collection::vec((0..disks, 0u32..4, 0u8..5, any::<bool>()), 0..8);
            (Just(partitions), vols).prop_map(|(partitions, volumes)| Layout {
                partitions,
                volumes,
            })
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The rule that matters most: a disk's series never carry one PV's labels when
        /// another PV or anything else lives on that disk.
        #[test]
        fn a_disk_is_attributed_only_to_its_only_user(l in layout()) {
            let sys = FakeSys::new();
            for (i, &parts) in l.partitions.iter().enumerate() {
                let name = format!("sd{}", (b'a' + i as u8) as char);
                let mut disk = sys.disk(&name, d(8, 16 * i as u32));
                for p in 1..=parts {
                    disk = disk.partition(&format!("{name}{p}"), d(8, 16 * i as u32 + p));
                }
            }
            let found: Vec<Found> = l
                .volumes
                .iter()
                .map(|&(disk, part, pv, subdirectory)| {
                    let part = if l.partitions[disk] == 0 { 0 } else { 1 + part % l.partitions[disk] };
                    Found { subdirectory, ..found(&format!("pv-{pv}"), d(8, 16 * disk as u32 + part)) }
                })
                .collect();
            let index = build(&found, &store_of(vec![]), &sys.sysfs());
            for (disk, &parts) in l.partitions.iter().enumerate() {
                let on_disk: Vec<_> = l.volumes.iter().zip(&found).filter(|(v, _)| v.0 == disk).collect();
                let got = index.get(d(8, 16 * disk as u32).kernel());
                if on_disk.is_empty() {
                    prop_assert_eq!(got, None);
                    continue;
                }
                let pv_names: std::collections::BTreeSet<_> = on_disk.iter().map(|(v, _)| v.2).collect();
                let used_parts: std::collections::BTreeSet<_> = on_disk.iter().map(|(_, f)| f.dev).collect();
                let exclusive = pv_names.len() == 1
                    && on_disk.iter().all(|(v, _)| !v.3)
                    && (parts == 0 || used_parts.len() as u32 == parts);
                let got = got.unwrap();
                prop_assert_eq!(got.attributed().is_some(), exclusive, "{:?}", got);
                prop_assert_eq!(got.volumes().len(), pv_names.len());
            }
        }
    }
}
