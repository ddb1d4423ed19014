//! PersistentVolumes from the API server: one watch into a reflector store, read at scrape time.
//!
//! The store keeps its last state whenever the API server is unreachable or slow; the watcher
//! retries with backoff and, once back, re-lists and swaps the new list in whole (the reflector
//! buffers a re-list until it is complete), so a scrape never sees half a list.
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{
    CSIPersistentVolumeSource, ObjectReference, PersistentVolume, PersistentVolumeSpec,
};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};

use super::index::PvInfo;
use super::kubelet::escaped_driver;

/// The PV controller reads this annotation before `spec.storageClassName`; so do we.
const BETA_STORAGE_CLASS: &str = "volume.beta.kubernetes.io/storage-class";

#[derive(Clone)]
pub struct PvStore {
    store: Store<PersistentVolume>,
    synced: Arc<AtomicBool>,
    /// Bumped after every watch event is in the store: labels joined at an older generation
    /// may be stale.
    generation: Arc<AtomicU64>,
}

impl PvStore {
    /// Starts watching PersistentVolumes; the task runs until aborted.
    pub fn watch(client: Client) -> (Self, tokio::task::JoinHandle<()>) {
        let events = watcher(
            Api::<PersistentVolume>::all(client),
            watcher::Config::default(),
        )
        .default_backoff();
        let (pvs, writer) = Self::new();
        (pvs.clone(), tokio::spawn(drive(events, writer, pvs)))
    }

    fn new() -> (Self, reflector::store::Writer<PersistentVolume>) {
        let (store, writer) = reflector::store();
        let pvs = Self {
            store,
            synced: Arc::new(AtomicBool::new(false)),
            generation: Arc::new(AtomicU64::new(0)),
        };
        (pvs, writer)
    }

    /// Changes whenever the store may have changed; read it before reading the store.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Whether the first full list has arrived; before it, PVs are known by name only.
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    pub fn by_name(&self, name: &str) -> Option<PvInfo> {
        self.store
            .get(&ObjectRef::new(name))
            .and_then(|pv| pv_info(&pv))
    }

    /// (kubelet directory name of the driver, sha256 hex of the volume handle) → PV name, for
    /// CSI staging directories. Hashing every CSI PV costs well under a millisecond per
    /// thousand PVs, so it is rebuilt per index, and only when a staging directory needs it.
    pub fn handle_index(&self) -> HashMap<(String, String), String> {
        self.store
            .state()
            .iter()
            .filter_map(|pv| {
                let csi = pv.spec.as_ref()?.csi.as_ref()?;
                let name = pv.metadata.name.clone()?;
                Some((
                    (escaped_driver(&csi.driver), sha256_hex(&csi.volume_handle)),
                    name,
                ))
            })
            .collect()
    }
}

/// Feeds the store and logs the watch's health. Errors never end it: the backoff in `events`
/// decides when to retry.
async fn drive<S>(events: S, writer: reflector::store::Writer<PersistentVolume>, pvs: PvStore)
where
    S: Stream<Item = watcher::Result<watcher::Event<PersistentVolume>>>,
{
    let mut health = Health::default();
    let mut events = std::pin::pin!(events.modify(trim).reflect(writer));
    while let Some(event) = events.next().await {
        if matches!(event, Ok(watcher::Event::InitDone))
            && !pvs.synced.swap(true, Ordering::Relaxed)
        {
            tracing::info!("PersistentVolumes listed; volume labels carry claims");
        }
        // `reflect` has applied the event to the store before passing it on.
        if event.is_ok() {
            pvs.changed();
        }
        match health.observe(&event) {
            Report::Back => tracing::info!("PersistentVolume watch is back"),
            Report::Denied(e) => tracing::warn!(
                error = %e,
                "PersistentVolume watch refused: the agent's ServiceAccount needs get, list and \
                 watch on persistentvolumes; retrying with backoff, last known PVs stay in use"
            ),
            Report::Failed(e) => tracing::warn!(
                error = %e,
                "PersistentVolume watch failed; retrying with backoff, last known PVs stay in use"
            ),
            Report::StillFailing(e) => {
                tracing::debug!(error = %e, "PersistentVolume watch still failing")
            }
            Report::Nothing => {}
        }
    }
}

/// One log line per change of the watch's health, not one per retry.
#[derive(Debug, Default)]
struct Health {
    failing: bool,
}

#[derive(Debug)]
enum Report<'a> {
    Nothing,
    Back,
    Failed(&'a watcher::Error),
    Denied(&'a watcher::Error),
    StillFailing(&'a watcher::Error),
}

impl Health {
    fn observe<'a, K>(&mut self, event: &'a watcher::Result<watcher::Event<K>>) -> Report<'a> {
        match event {
            // A retry starts with Init before it lists: not yet a sign the server is back.
            Ok(watcher::Event::Init) => Report::Nothing,
            Ok(_) if self.failing => {
                self.failing = false;
                Report::Back
            }
            Ok(_) => Report::Nothing,
            Err(e) if self.failing => Report::StillFailing(e),
            Err(e) => {
                self.failing = true;
                if denied(e) {
                    Report::Denied(e)
                } else {
                    Report::Failed(e)
                }
            }
        }
    }
}

/// Only a 401/403 is the agent's to fix (RBAC); anything else is the API server being away.
fn denied(e: &watcher::Error) -> bool {
    let status = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s))
        | watcher::Error::WatchError(s) => s,
        _ => return false,
    };
    matches!(status.code, 401 | 403)
}

/// Every node's agent caches every PV of the cluster: keep only the fields it reads.
fn trim(pv: &mut PersistentVolume) {
    let beta_class = pv
        .metadata
        .annotations
        .as_mut()
        .and_then(|a| a.remove(BETA_STORAGE_CLASS));
    pv.metadata.annotations = None;
    pv.metadata.labels = None;
    pv.metadata.managed_fields = None;
    pv.metadata.finalizers = None;
    pv.metadata.owner_references = None;
    pv.status = None;
    pv.spec = pv.spec.take().map(|s| PersistentVolumeSpec {
        claim_ref: s.claim_ref.map(|c| ObjectReference {
            name: c.name,
            namespace: c.namespace,
            ..ObjectReference::default()
        }),
        storage_class_name: beta_class.or(s.storage_class_name),
        csi: s.csi.map(|c| CSIPersistentVolumeSource {
            driver: c.driver,
            volume_handle: c.volume_handle,
            ..CSIPersistentVolumeSource::default()
        }),
        ..PersistentVolumeSpec::default()
    });
}

/// The labels a PV object gives; "" (no class, a claimRef being bound) is not a value.
pub fn pv_info(pv: &PersistentVolume) -> Option<PvInfo> {
    let some = |s: Option<&String>| s.filter(|s| !s.is_empty()).cloned();
    let spec = pv.spec.as_ref();
    let claim = spec.and_then(|s| s.claim_ref.as_ref());
    let beta_class = pv
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(BETA_STORAGE_CLASS));
    Some(PvInfo {
        pv: some(pv.metadata.name.as_ref())?,
        pvc: some(claim.and_then(|c| c.name.as_ref())),
        namespace: some(claim.and_then(|c| c.namespace.as_ref())),
        storage_class: some(beta_class.or(spec.and_then(|s| s.storage_class_name.as_ref()))),
    })
}

fn sha256_hex(s: &str) -> String {
    use std::fmt::Write;
    let digest = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    digest
        .as_ref()
        .iter()
        .fold(String::with_capacity(64), |mut hex, b| {
            let _ = write!(hex, "{b:02x}");
            hex
        })
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use std::collections::BTreeMap;

    /// A bound CSI PV as the API server returns it, clutter included.
    pub fn csi_pv(name: &str, claim: (&str, &str), class: &str, handle: &str) -> PersistentVolume {
        PersistentVolume {
            metadata: ObjectMeta {
                name: Some(name.into()),
                annotations: Some(BTreeMap::from([(
                    "pv.kubernetes.io/provisioned-by".into(),
                    "ebs.csi.aws.com".into(),
                )])),
                ..ObjectMeta::default()
            },
            spec: Some(PersistentVolumeSpec {
                claim_ref: Some(ObjectReference {
                    name: Some(claim.1.into()),
                    namespace: Some(claim.0.into()),
                    uid: Some("c0ffee".into()),
                    ..ObjectReference::default()
                }),
                storage_class_name: Some(class.into()),
                csi: Some(CSIPersistentVolumeSource {
                    driver: "ebs.csi.aws.com".into(),
                    volume_handle: handle.into(),
                    fs_type: Some("ext4".into()),
                    ..CSIPersistentVolumeSource::default()
                }),
                ..PersistentVolumeSpec::default()
            }),
            status: None,
        }
    }

    /// A store whose PVs a test changes as the watch would.
    pub struct Feed {
        pub pvs: PvStore,
        writer: reflector::store::Writer<PersistentVolume>,
    }

    impl Feed {
        pub fn new(pvs: Vec<PersistentVolume>) -> Self {
            let (store, mut writer) = PvStore::new();
            writer.apply_watcher_event(&watcher::Event::Init);
            for mut pv in pvs {
                trim(&mut pv);
                writer.apply_watcher_event(&watcher::Event::InitApply(pv));
            }
            writer.apply_watcher_event(&watcher::Event::InitDone);
            Self { pvs: store, writer }
        }

        pub fn apply(&mut self, mut pv: PersistentVolume) {
            trim(&mut pv);
            self.writer.apply_watcher_event(&watcher::Event::Apply(pv));
            self.pvs.changed();
        }
    }

    /// A store filled as the watcher fills it.
    pub fn store_of(pvs: Vec<PersistentVolume>) -> PvStore {
        Feed::new(pvs).pvs
    }

    #[test]
    fn claims_and_classes_come_from_the_pv() {
        let pv = csi_pv("pvc-1", ("shop", "data-db-0"), "gp3", "vol-1");
        assert_eq!(
            pv_info(&pv),
            Some(PvInfo {
                pv: "pvc-1".into(),
                pvc: Some("data-db-0".into()),
                namespace: Some("shop".into()),
                storage_class: Some("gp3".into()),
            })
        );
        let mut unbound = csi_pv("pv-2", ("", ""), "", "vol-2");
        assert_eq!(
            pv_info(&unbound),
            Some(PvInfo::named("pv-2")),
            "empty strings are absent values"
        );
        unbound.spec = None;
        assert_eq!(pv_info(&unbound), Some(PvInfo::named("pv-2")));
    }

    #[test]
    fn the_beta_annotation_wins_like_in_the_pv_controller() {
        let mut pv = csi_pv("pv-1", ("ns", "c"), "new", "h");
        pv.metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(BETA_STORAGE_CLASS.into(), "old".into());
        assert_eq!(pv_info(&pv).unwrap().storage_class.as_deref(), Some("old"));
        trim(&mut pv);
        assert_eq!(pv.metadata.annotations, None);
        assert_eq!(pv_info(&pv).unwrap().storage_class.as_deref(), Some("old"));
    }

    #[test]
    fn trimming_keeps_what_lookups_read() {
        let mut pv = csi_pv("pvc-1", ("shop", "data"), "gp3", "vol-1");
        let before = pv_info(&pv);
        trim(&mut pv);
        assert_eq!(pv_info(&pv), before);
        let spec = pv.spec.unwrap();
        assert_eq!(spec.csi.as_ref().unwrap().volume_handle, "vol-1");
        assert_eq!(spec.csi.unwrap().fs_type, None);
        assert_eq!(spec.claim_ref.unwrap().uid, None);
    }

    #[test]
    fn lookups_by_name_and_by_handle_hash() {
        let pvs = store_of(vec![
            csi_pv("pvc-1", ("shop", "data"), "gp3", "vol-1"),
            csi_pv("pvc-2", ("shop", "logs"), "gp3", "vol-2"),
        ]);
        assert_eq!(pvs.by_name("pvc-2").unwrap().pvc.as_deref(), Some("logs"));
        assert_eq!(pvs.by_name("pvc-3"), None);
        let handles = pvs.handle_index();
        assert_eq!(handles.len(), 2);
        assert_eq!(
            handles.get(&("ebs.csi.aws.com".into(), sha256_hex("vol-1"))),
            Some(&"pvc-1".to_string())
        );
    }

    #[test]
    fn sha256_matches_the_kubelets() {
        // Go: fmt.Sprintf("%x", sha256.Sum256([]byte("test")))
        assert_eq!(
            sha256_hex("test"),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
    }

    #[test]
    fn only_refusals_point_at_rbac() {
        use kube::core::Status;
        let api =
            |code| kube::Error::Api(Status::failure("no", "Forbidden").with_code(code).boxed());
        assert!(denied(&watcher::Error::InitialListFailed(api(403))));
        assert!(denied(&watcher::Error::WatchStartFailed(api(401))));
        assert!(denied(&watcher::Error::WatchError(
            Status::failure("no", "Forbidden").with_code(403).boxed()
        )));
        assert!(!denied(&watcher::Error::WatchFailed(api(500))));
        assert!(!denied(&watcher::Error::NoResourceVersion));
    }

    #[test]
    fn health_is_reported_once_per_change_not_per_retry() {
        type Ev = watcher::Result<watcher::Event<PersistentVolume>>;
        let err = || -> Ev { Err(watcher::Error::NoResourceVersion) };
        let mut h = Health::default();
        let mut seen = Vec::new();
        for event in [
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitDone),
            err(),
            Ok(watcher::Event::Init), // the retry, failing again
            err(),
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(csi_pv("a", ("n", "c"), "s", "h"))),
            Ok(watcher::Event::InitDone),
        ] {
            seen.push(match h.observe(&event) {
                Report::Nothing => "-",
                Report::Back => "back",
                Report::Failed(_) => "failed",
                Report::Denied(_) => "denied",
                Report::StillFailing(_) => "still",
            });
        }
        assert_eq!(seen, ["-", "-", "failed", "-", "still", "-", "back", "-"]);
    }

    #[tokio::test]
    async fn a_failing_watch_keeps_the_last_list_and_resyncs_whole() {
        let (pvs, writer) = PvStore::new();
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let task = tokio::spawn(drive(rx, writer, pvs.clone()));
        let send = |e| tx.unbounded_send(e).unwrap();
        let settle = || tokio::time::sleep(std::time::Duration::from_millis(20));

        send(Ok(watcher::Event::Init));
        send(Ok(watcher::Event::InitApply(csi_pv(
            "a",
            ("n", "c"),
            "s",
            "h",
        ))));
        send(Ok(watcher::Event::InitDone));
        settle().await;
        assert!(pvs.synced());
        assert!(pvs.by_name("a").is_some());
        assert_eq!(
            pvs.store
                .get(&ObjectRef::new("a"))
                .unwrap()
                .metadata
                .annotations,
            None,
            "trimmed before it is stored"
        );

        send(Err(watcher::Error::NoResourceVersion));
        send(Err(watcher::Error::NoResourceVersion));
        settle().await;
        assert!(pvs.by_name("a").is_some(), "errors keep the last state");

        // The re-list after the outage: "a" was deleted meanwhile, "b" created.
        send(Ok(watcher::Event::Init));
        send(Ok(watcher::Event::InitApply(csi_pv(
            "b",
            ("n", "d"),
            "s",
            "h2",
        ))));
        settle().await;
        assert!(pvs.by_name("a").is_some(), "a half re-list is not visible");
        assert!(pvs.by_name("b").is_none());
        send(Ok(watcher::Event::InitDone));
        settle().await;
        assert!(pvs.by_name("a").is_none());
        assert!(pvs.by_name("b").is_some());

        drop(tx);
        task.await.unwrap();
    }
}
