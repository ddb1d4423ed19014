//! The kubelet's directory layout: which paths under its root hold a PersistentVolume, and
//! which PV each names.
//!
//! Paths are relative to the kubelet root. Anything that does not match a known layout exactly,
//! or names a PV with what cannot be a PV name, is not a volume: a stray directory must never
//! become a label.
use std::ffi::OsStr;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// How a path names its PV.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PvKey {
    Name(String),
    /// A CSI staging directory names the PV only by sha256(volumeHandle), lowercase hex.
    Handle {
        driver: String,
        sha256: String,
    },
}

/// Where the kubelet put a PV, which decides how its device is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `pods/<uid>/volumes/kubernetes.io~csi/<pv>/mount`
    CsiPodMount,
    /// `plugins/kubernetes.io/csi/<driver>/<sha256(handle)>/globalmount`, or before kubelet
    /// 1.24ish `plugins/kubernetes.io/csi/pv/<pv>/globalmount`
    CsiStaging,
    /// `pods/<uid>/volumes/kubernetes.io~local-volume/<pv>`: a bind of the local path
    LocalPodMount,
    /// `plugins/kubernetes.io/local-volume/mounts/<pv>`: a local block device the kubelet
    /// formatted and mounted for a Filesystem-mode PV
    LocalGlobalMount,
    /// `plugins/kubernetes.io/csi/volumeDevices/<pv>/dev/<uid>`: a bind mount of the device file
    CsiBlockMapFile,
    /// `pods/<uid>/volumeDevices/{kubernetes.io~csi,kubernetes.io~local-volume}/<pv>`: a symlink
    /// to the device file
    PodBlockLink,
}

impl Layout {
    /// Mounts carry their device in mountinfo; device files carry it in st_rdev.
    pub fn is_device_file(self) -> bool {
        matches!(self, Layout::CsiBlockMapFile | Layout::PodBlockLink)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumePath {
    pub key: PvKey,
    pub layout: Layout,
}

/// The volume a path (relative to the kubelet root) is, if it is one.
pub fn classify(rel: &Path) -> Option<VolumePath> {
    let parts = rel
        .components()
        .map(|c| match c {
            Component::Normal(s) => s.to_str(),
            _ => None,
        })
        .collect::<Option<Vec<&str>>>()?;
    let named = |pv: &str, layout| {
        is_pv_name(pv).then(|| VolumePath {
            key: PvKey::Name(pv.to_string()),
            layout,
        })
    };
    match parts.as_slice() {
        ["pods", _uid, "volumes", "kubernetes.io~csi", pv, "mount"] => {
            named(pv, Layout::CsiPodMount)
        }
        ["pods", _uid, "volumes", "kubernetes.io~local-volume", pv] => {
            named(pv, Layout::LocalPodMount)
        }
        ["pods", _uid, "volumeDevices", "kubernetes.io~csi" | "kubernetes.io~local-volume", pv] => {
            named(pv, Layout::PodBlockLink)
        }
        ["plugins", "kubernetes.io", "local-volume", "mounts", pv] => {
            named(pv, Layout::LocalGlobalMount)
        }
        ["plugins", "kubernetes.io", "csi", "pv", pv, "globalmount"] => {
            named(pv, Layout::CsiStaging)
        }
        // "publish" and "staging" are the kubelet's own directories beside the PV-named ones
        // (a PV of that name is still found through its pods' links).
        ["plugins", "kubernetes.io", "csi", "volumeDevices", pv, "dev", _uid]
            if !matches!(*pv, "publish" | "staging") =>
        {
            named(pv, Layout::CsiBlockMapFile)
        }
        ["plugins", "kubernetes.io", "csi", driver, hash, "globalmount"]
            if *driver != "volumeDevices" && is_sha256_hex(hash) =>
        {
            Some(VolumePath {
                key: PvKey::Handle {
                    driver: driver.to_string(),
                    sha256: hash.to_string(),
                },
                layout: Layout::CsiStaging,
            })
        }
        _ => None,
    }
}

/// The API server's rule for PV names (DNS-1123 subdomain).
pub fn is_pv_name(s: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 253
        && alnum(b[0])
        && alnum(b[b.len() - 1])
        && b.iter().all(|&c| alnum(c) || c == b'-' || c == b'.')
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The kubelet's directory name for a CSI driver (`EscapeQualifiedName`).
pub fn escaped_driver(driver: &str) -> String {
    driver.replace('/', "~")
}

/// The directories [`pod_block_links`] lists, from the kubelet root down to a plugin's links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodDir {
    /// The kubelet root: only its `pods` entry matters.
    Root,
    /// `pods`: every entry is a pod.
    Pods,
    /// `pods/<uid>`: only its `volumeDevices` entry matters.
    Pod,
    /// `pods/<uid>/volumeDevices`: only the plugins below matter.
    VolumeDevices,
    /// `pods/<uid>/volumeDevices/<plugin>`: every entry is a PV's link.
    Plugin,
}

const BLOCK_PLUGINS: [&str; 2] = ["kubernetes.io~csi", "kubernetes.io~local-volume"];

impl PodDir {
    /// Whether an entry named `name` appearing in or leaving this directory can change what
    /// [`pod_block_links`] finds.
    pub fn matters(self, name: &OsStr) -> bool {
        match self {
            PodDir::Root => name == "pods",
            PodDir::Pod => name == "volumeDevices",
            PodDir::VolumeDevices => BLOCK_PLUGINS.iter().any(|p| name == *p),
            PodDir::Pods | PodDir::Plugin => true,
        }
    }
}

/// Pod block-volume links are not mounts, so they are found by listing, not through mountinfo:
/// `pods/*/volumeDevices/{kubernetes.io~csi,kubernetes.io~local-volume}/*`, relative paths.
/// `before_listing` is called with each directory before it is listed (to watch it, so that
/// nothing created after the listing goes unseen); when it returns false the directory does
/// not exist and is not listed. Most pods have no `volumeDevices`: one failed call each.
pub fn pod_block_links(
    root: &Path,
    before_listing: &mut dyn FnMut(&Path, PodDir) -> bool,
) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if !before_listing(root, PodDir::Root) || !before_listing(&root.join("pods"), PodDir::Pods) {
        return found;
    }
    for pod in list(&root.join("pods")) {
        let pod = Path::new("pods").join(&pod);
        if !before_listing(&root.join(&pod), PodDir::Pod) {
            continue;
        }
        let devices = pod.join("volumeDevices");
        if !before_listing(&root.join(&devices), PodDir::VolumeDevices) {
            continue;
        }
        for plugin in list(&root.join(&devices)) {
            if BLOCK_PLUGINS.iter().any(|p| plugin == *p) {
                let rel = devices.join(plugin);
                if before_listing(&root.join(&rel), PodDir::Plugin) {
                    found.extend(list(&root.join(&rel)).into_iter().map(|pv| rel.join(pv)));
                }
            }
        }
    }
    found
}

fn list(dir: &Path) -> Vec<std::ffi::OsString> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect(),
        Err(e) => {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::debug!(dir = %dir.display(), error = %e, "cannot list kubelet directory");
            }
            Vec::new()
        }
    }
}

/// An inline (ephemeral) CSI volume lives where a PV would, but its directory is named after the
/// pod's volume, not a PV; the kubelet records which it is in vol_data.json beside the mount.
/// `None` when that file cannot be read or parsed.
pub fn is_inline_csi_volume(pod_volume_dir: &Path) -> Option<bool> {
    // vol_data.json is a few hundred bytes; a cap keeps a corrupt one from costing a scrape.
    const MAX: u64 = 64 * 1024;
    let mut data = Vec::new();
    std::fs::File::open(pod_volume_dir.join("vol_data.json"))
        .and_then(|f| f.take(MAX).read_to_end(&mut data))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&data).ok()?;
    Some(v.get("volumeLifecycleMode").and_then(|m| m.as_str()) == Some("Ephemeral"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::ffi::OsStrExt;

    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn name(pv: &str, layout: Layout) -> Option<VolumePath> {
        Some(VolumePath {
            key: PvKey::Name(pv.into()),
            layout,
        })
    }

    #[test]
    fn known_layouts() {
        let c = |p: &str| classify(Path::new(p));
        assert_eq!(
            c("pods/u1/volumes/kubernetes.io~csi/pvc-1/mount"),
            name("pvc-1", Layout::CsiPodMount)
        );
        assert_eq!(
            c("pods/u1/volumes/kubernetes.io~local-volume/local-pv-a"),
            name("local-pv-a", Layout::LocalPodMount)
        );
        assert_eq!(
            c("pods/u1/volumeDevices/kubernetes.io~csi/pvc-2"),
            name("pvc-2", Layout::PodBlockLink)
        );
        assert_eq!(
            c("pods/u1/volumeDevices/kubernetes.io~local-volume/pvc-3"),
            name("pvc-3", Layout::PodBlockLink)
        );
        assert_eq!(
            c("plugins/kubernetes.io/local-volume/mounts/local-pv-b"),
            name("local-pv-b", Layout::LocalGlobalMount)
        );
        assert_eq!(
            c("plugins/kubernetes.io/csi/pv/pvc-4/globalmount"),
            name("pvc-4", Layout::CsiStaging)
        );
        assert_eq!(
            c("plugins/kubernetes.io/csi/volumeDevices/pvc-5/dev/u1"),
            name("pvc-5", Layout::CsiBlockMapFile)
        );
        assert_eq!(
            c(&format!(
                "plugins/kubernetes.io/csi/ebs.csi.aws.com/{HASH}/globalmount"
            )),
            Some(VolumePath {
                key: PvKey::Handle {
                    driver: "ebs.csi.aws.com".into(),
                    sha256: HASH.into()
                },
                layout: Layout::CsiStaging
            })
        );
    }

    #[test]
    fn near_misses_are_not_volumes() {
        for p in [
            "",
            "pods",
            "pods/u1/volumes/kubernetes.io~csi/pvc-1",
            "pods/u1/volumes/kubernetes.io~csi/pvc-1/mount/x",
            "pods/u1/volumes/kubernetes.io~csi/PVC-1/mount",
            "pods/u1/volumes/kubernetes.io~csi/-pvc/mount",
            "pods/u1/volumes/kubernetes.io~empty-dir/cache",
            "pods/u1/volume-subpaths/data/app/0",
            "pods/../volumes/kubernetes.io~csi/pvc-1/mount",
            "/pods/u1/volumes/kubernetes.io~csi/pvc-1/mount",
            "plugins/kubernetes.io/csi/ebs.csi.aws.com/NOTAHASH/globalmount",
            "plugins/kubernetes.io/csi/volumeDevices/publish/dev/u1",
            "plugins/kubernetes.io/csi/volumeDevices/staging/dev/u1",
            "plugins/kubernetes.io/csi/volumeDevices/pvc-5/data/vol_data.json",
        ] {
            assert_eq!(classify(Path::new(p)), None, "{p:?}");
        }
        let upper = format!(
            "plugins/kubernetes.io/csi/d/{}/globalmount",
            HASH.to_uppercase()
        );
        assert_eq!(classify(Path::new(&upper)), None);
        let not_utf8 = Path::new(OsStr::from_bytes(
            b"pods/u1/volumes/kubernetes.io~csi/pv\xff/mount",
        ));
        assert_eq!(classify(not_utf8), None);
    }

    #[test]
    fn pv_names() {
        assert!(is_pv_name("pvc-0a1b2c3d-0000-4000-8000-000000000000"));
        assert!(is_pv_name("local.pv.1"));
        assert!(is_pv_name(&"a".repeat(253)));
        for bad in ["", "-a", "a-", "A", "a_b", "a b", "日本", &"a".repeat(254)] {
            assert!(!is_pv_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn inline_volumes_are_recognised_by_vol_data() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(is_inline_csi_volume(dir.path()), None, "no vol_data.json");
        let write = |s: &str| std::fs::write(dir.path().join("vol_data.json"), s).unwrap();
        write(r#"{"specVolID":"pvc-1","volumeLifecycleMode":"Persistent"}"#);
        assert_eq!(is_inline_csi_volume(dir.path()), Some(false));
        write(r#"{"specVolID":"pvc-1"}"#);
        assert_eq!(is_inline_csi_volume(dir.path()), Some(false), "before 1.16");
        write(r#"{"specVolID":"scratch","volumeLifecycleMode":"Ephemeral"}"#);
        assert_eq!(is_inline_csi_volume(dir.path()), Some(true));
        write("{not json");
        assert_eq!(is_inline_csi_volume(dir.path()), None);
    }

    fn pv_name() -> impl Strategy<Value = String> {
        "[a-z0-9]([a-z0-9.-]{0,40}[a-z0-9])?"
    }

    proptest! {
        #[test]
        fn hostile_paths_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = classify(Path::new(OsStr::from_bytes(&bytes)));
        }

        #[test]
        fn hostile_component_paths_never_panic(
            parts in proptest::collection::vec(
                prop_oneof![
                    Just("pods".to_string()), Just("volumes".to_string()),
                    Just("kubernetes.io~csi".to_string()), Just("mount".to_string()),
                    Just("plugins".to_string()), Just("kubernetes.io".to_string()),
                    Just("csi".to_string()), Just("globalmount".to_string()),
                    Just("..".to_string()), Just(".".to_string()), Just(String::new()),
                    "\\PC{0,12}",
                ],
                0..9,
            )
        ) {
            let _ = classify(Path::new(&parts.join("/")));
        }

        #[test]
        fn generated_pod_paths_name_their_pv(uid in "[a-f0-9-]{1,36}", pv in pv_name()) {
            let p = format!("pods/{uid}/volumes/kubernetes.io~csi/{pv}/mount");
            prop_assert_eq!(classify(Path::new(&p)), name(&pv, Layout::CsiPodMount));
            let p = format!("pods/{uid}/volumeDevices/kubernetes.io~csi/{pv}");
            prop_assert_eq!(classify(Path::new(&p)), name(&pv, Layout::PodBlockLink));
            // Trailing slashes and doubled separators are the same path.
            let p = format!("pods//{uid}/volumes/kubernetes.io~local-volume/{pv}/");
            prop_assert_eq!(classify(Path::new(&p)), name(&pv, Layout::LocalPodMount));
        }

        #[test]
        fn generated_staging_paths_carry_the_hash(
            driver in "[a-z][a-z0-9.-]{0,30}",
            hash in "[0-9a-f]{64}",
        ) {
            prop_assume!(driver != "pv" && driver != "volumeDevices");
            let p = format!("plugins/kubernetes.io/csi/{driver}/{hash}/globalmount");
            let v = classify(Path::new(&p)).expect("staging path");
            prop_assert_eq!(v.key, PvKey::Handle { driver, sha256: hash });
        }
    }
}
