//! Leader election on a coordination.k8s.io/v1 Lease, following client-go's
//! algorithm (kube-runtime has none, and kube-leader-election lags behind
//! kube 5).
//!
//! Safety rests on two rules:
//! * a follower only takes the lease once the record has not changed for a
//!   full `lease_duration` *by its own monotonic clock*, so clock skew between
//!   replicas does not matter;
//! * the leader gives up (drops the work future, aborting the controller and
//!   every in-flight reconcile) once `renew_deadline` has passed since its last
//!   successful renewal *started*, which is strictly before any follower may
//!   consider the lease expired.
//!
//! The second rule is why a grant counts from the moment its request was
//! sent, not when the answer came: the API server may have written the record
//! (and a follower seen it) at any point in between. So a grant or renewal
//! whose request took `renew_deadline` or longer (an API server stall, this
//! process frozen) is worth nothing: its fence would already be closed. Unlike
//! client-go's requests, every acquire or renew request here is abandoned at
//! the renew deadline, and such a stale grant is never handed to the work;
//! the elector renews first. Losing leadership never ends the process: the
//! replica stands by and campaigns again ([`LeaderElector::lead`]).

use std::{
    collections::hash_map::RandomState,
    future::Future,
    hash::{BuildHasher, Hasher},
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    api::{Api, PostParams},
    Client,
};
use tokio::pin;
use tokio::time::{sleep, timeout, Instant};

use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    /// Unique per replica (and per process start).
    pub identity: String,
    /// How long followers wait after the last observed change before taking over.
    pub lease_duration: Duration,
    /// How long the leader keeps working without a successful renewal.
    pub renew_deadline: Duration,
    /// Pause between acquire/renew attempts.
    pub retry_period: Duration,
}

impl LeaseConfig {
    pub fn validate(&self) -> Result<()> {
        if self.lease_duration < Duration::from_secs(1) {
            return Err(Error::Config("lease duration must be at least 1s".into()));
        }
        if self.renew_deadline >= self.lease_duration {
            return Err(Error::Config(
                "renew deadline must be shorter than the lease duration".into(),
            ));
        }
        if self.retry_period >= self.renew_deadline {
            return Err(Error::Config(
                "retry period must be shorter than the renew deadline".into(),
            ));
        }
        if self.name.is_empty() || self.namespace.is_empty() || self.identity.is_empty() {
            return Err(Error::Config(
                "lease name, lease namespace and identity must not be empty".into(),
            ));
        }
        Ok(())
    }
}

/// `<base>_<random>`: a restarted pod keeps its name but must not be
/// mistaken for its previous incarnation still holding the lease.
pub fn unique_identity(base: &str) -> String {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    hasher.write_u32(std::process::id());
    format!("{base}_{:08x}", hasher.finish() as u32)
}

/// Write permission shared between the elector and the controller. Dropping
/// the controller on lost leadership stops it, but a process that was paused
/// (SIGSTOP, a long GC-like stall, a frozen VM) can resume with reconciles
/// already past their own checks; those consult the fence right before each
/// write, and the fence expires on the monotonic clock at the renew deadline.
#[derive(Clone, Debug)]
pub struct Fence(Arc<Mutex<Option<Instant>>>);

impl Fence {
    /// Always open: for running without leader election.
    pub fn open() -> Self {
        Self(Arc::new(Mutex::new(None)))
    }

    fn closed() -> Self {
        Self(Arc::new(Mutex::new(Some(Instant::now()))))
    }

    fn valid_until(&self, deadline: Instant) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(deadline);
    }

    fn close(&self) {
        self.valid_until(Instant::now());
    }

    /// `Err(LeadershipLost)` once the renew deadline has passed.
    pub fn check(&self) -> Result<()> {
        match *self.0.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(deadline) if Instant::now() >= deadline => Err(Error::LeadershipLost(
                "renew deadline passed; refusing to write".into(),
            )),
            _ => Ok(()),
        }
    }
}

/// The record a successful acquire or renew writes: acquireTime and
/// leaseTransitions change only when the holder changes.
pub fn next_spec(cfg: &LeaseConfig, current: Option<&LeaseSpec>, now: MicroTime) -> LeaseSpec {
    let current = current.cloned().unwrap_or_default();
    let already_mine = current.holder_identity.as_deref() == Some(&cfg.identity);
    LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(cfg.lease_duration.as_secs().max(1) as i32),
        acquire_time: if already_mine {
            current.acquire_time.clone().or(Some(now.clone()))
        } else {
            Some(now.clone())
        },
        renew_time: Some(now),
        lease_transitions: Some(current.lease_transitions.unwrap_or(0) + i32::from(!already_mine)),
        ..current
    }
}

/// The three Lease requests the elector makes. A trait so the election logic
/// can be tested against a fake API server (stalls, a frozen process) with
/// tokio's paused clock.
pub trait LeaseClient {
    fn get(&self, name: &str) -> impl Future<Output = Result<Option<Lease>, kube::Error>> + Send;
    fn create(&self, lease: &Lease) -> impl Future<Output = Result<Lease, kube::Error>> + Send;
    fn replace(
        &self,
        name: &str,
        lease: &Lease,
    ) -> impl Future<Output = Result<Lease, kube::Error>> + Send;
}

impl LeaseClient for Api<Lease> {
    async fn get(&self, name: &str) -> Result<Option<Lease>, kube::Error> {
        self.get_opt(name).await
    }

    async fn create(&self, lease: &Lease) -> Result<Lease, kube::Error> {
        Api::create(self, &PostParams::default(), lease).await
    }

    async fn replace(&self, name: &str, lease: &Lease) -> Result<Lease, kube::Error> {
        Api::replace(self, name, &PostParams::default(), lease).await
    }
}

/// Whether an error from the work ends the process rather than sending the
/// replica back to standing by. Lost leadership never does. Neither do
/// failures a retry can outlive (API server unreachable or overloaded, the
/// CRD slow to become Established). What does: configuration errors and API
/// answers that no retry changes (forbidden by RBAC, an invalid request), so
/// they show as a crash loop instead of a quietly idle operator.
pub fn ends_the_process(err: &Error) -> bool {
    match err {
        Error::LeadershipLost(_) | Error::Timeout(_) => false,
        Error::Kube(kube::Error::Api(status)) => {
            (400..500).contains(&status.code) && ![408, 409, 429].contains(&status.code)
        }
        Error::Kube(_) => false,
        _ => true,
    }
}

pub struct LeaderElector<C = Api<Lease>> {
    api: C,
    cfg: LeaseConfig,
    fence: Fence,
    /// Last lease record seen and when it was first seen in that state.
    observed: Option<(LeaseSpec, Instant)>,
}

impl LeaderElector {
    pub fn new(client: Client, cfg: LeaseConfig) -> Self {
        Self::with_client(Api::namespaced(client, &cfg.namespace), cfg)
    }
}

impl<C: LeaseClient> LeaderElector<C> {
    pub fn with_client(api: C, cfg: LeaseConfig) -> Self {
        Self {
            api,
            cfg,
            fence: Fence::closed(),
            observed: None,
        }
    }

    /// The fence to hand to the controller; open only while leading.
    pub fn fence(&self) -> Fence {
        self.fence.clone()
    }

    pub fn identity(&self) -> &str {
        &self.cfg.identity
    }

    /// Campaigns, runs `work` while leading, and after any loss of leadership
    /// (the elector's renewals failing, or the work itself finding the fence
    /// closed) stands by and campaigns again with a fresh `work`. Returns
    /// `Ok` once `shutdown` completes (after releasing the lease), or the
    /// work's error if [`ends_the_process`] says so. `on_leading` follows
    /// whether the work runs.
    pub async fn lead<W, Fut>(
        &mut self,
        mut work: W,
        shutdown: impl Future<Output = ()>,
        mut on_leading: impl FnMut(bool),
    ) -> Result<()>
    where
        W: FnMut(Fence) -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        pin!(shutdown);
        let result = loop {
            let acquired_at = tokio::select! {
                at = self.acquire() => at,
                _ = &mut shutdown => break Ok(()),
            };
            on_leading(true);
            let fence = self.fence();
            let outcome = tokio::select! {
                res = self.run_while_leader(acquired_at, work(fence)) => res,
                _ = &mut shutdown => {
                    on_leading(false);
                    break Ok(());
                }
            };
            on_leading(false);
            // The work future is dropped by now: the controller and every
            // reconcile have stopped.
            match outcome.and_then(|out| out) {
                Err(Error::LeadershipLost(why)) => {
                    tracing::warn!(reason = %why, "lost leadership; controller stopped, standing by");
                }
                Err(err) if ends_the_process(&err) => break Err(err),
                other => {
                    let why = match other {
                        Err(err) => err.to_string(),
                        Ok(()) => "the controller ended".into(),
                    };
                    // Let a standby (which may reach the API server) take
                    // over at once; campaign again after a pause.
                    tracing::error!(reason = %why, "controller stopped; releasing the lease and standing by");
                    self.release_within_deadline().await;
                    tokio::select! {
                        _ = sleep(self.cfg.retry_period) => {}
                        _ = &mut shutdown => break Ok(()),
                    }
                }
            }
        };
        // Nothing writes any more, so handing the lease over early is safe.
        self.release_within_deadline().await;
        result
    }

    /// Waits until this replica holds the lease with a fence still open.
    /// Returns the instant the winning request was sent, which starts the
    /// renew-deadline clock.
    pub async fn acquire(&mut self) -> Instant {
        let mut last_holder = None;
        loop {
            let started = Instant::now();
            match timeout(self.cfg.renew_deadline, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) if Instant::now() < started + self.cfg.renew_deadline => {
                    tracing::info!(identity = %self.cfg.identity, lease = %self.cfg.name, "acquired leadership");
                    self.fence.valid_until(started + self.cfg.renew_deadline);
                    return started;
                }
                Ok(Ok(true)) => {
                    // Answered in time but noticed late (this process was
                    // frozen or starved): the record is ours, the fence would
                    // already be closed. Renew at once for a fresh grant.
                    tracing::warn!(
                        "acquired the lease only after the renew deadline; renewing before leading"
                    );
                    continue;
                }
                Ok(Ok(false)) => {
                    let holder = self.holder();
                    if holder != last_holder {
                        tracing::info!(holder = ?holder, "lease held by another replica; waiting");
                        last_holder = holder;
                    }
                }
                Ok(Err(err)) => tracing::warn!(error = %err, "could not acquire the lease"),
                Err(_) => tracing::warn!(
                    renew_deadline = ?self.cfg.renew_deadline,
                    "lease request did not finish within the renew deadline; retrying"
                ),
            }
            sleep(self.cfg.retry_period).await;
        }
    }

    /// Runs `work` while leadership lasts. Returns its output if it finishes
    /// first, or `Error::LeadershipLost` after dropping (cancelling) it.
    pub async fn run_while_leader<F: Future>(
        &mut self,
        acquired_at: Instant,
        work: F,
    ) -> Result<F::Output> {
        let result = tokio::select! {
            out = work => Ok(out),
            lost = self.keep_renewing(acquired_at) => Err(lost),
        };
        self.fence.close();
        result
    }

    async fn keep_renewing(&mut self, mut last_renewal: Instant) -> Error {
        loop {
            let deadline = last_renewal + self.cfg.renew_deadline;
            // Normally one retry period between attempts; with less of the
            // deadline left (a slow grant), try sooner so one attempt still
            // has time to finish.
            let left = deadline.saturating_duration_since(Instant::now());
            sleep(self.cfg.retry_period.min(left / 2)).await;
            let started = Instant::now();
            if started >= deadline {
                return Error::LeadershipLost(
                    "no successful renewal within the renew deadline".into(),
                );
            }
            match timeout(deadline - started, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => {
                    last_renewal = started;
                    self.fence.valid_until(started + self.cfg.renew_deadline);
                }
                Ok(Ok(false)) => {
                    return Error::LeadershipLost(format!(
                        "lease taken over by {}",
                        self.holder().unwrap_or_else(|| "another replica".into())
                    ))
                }
                Ok(Err(err)) => tracing::warn!(error = %err, "lease renewal failed; retrying"),
                Err(_) => {
                    return Error::LeadershipLost(
                        "lease renewal did not finish before the renew deadline".into(),
                    )
                }
            }
        }
    }

    /// [`release`](Self::release), bounded: on SIGTERM during an API server
    /// stall the kubelet kills the pod long before a request times out.
    async fn release_within_deadline(&mut self) {
        match timeout(self.cfg.renew_deadline, self.release()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(error = %err, "could not release the lease"),
            Err(_) => tracing::warn!("could not release the lease: the API server did not answer"),
        }
    }

    /// Gives the lease up so a standby takes over at once instead of after
    /// `lease_duration`. Only call once the work has stopped.
    pub async fn release(&mut self) -> Result<()> {
        let Some(mut lease) = self.api.get(&self.cfg.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(&self.cfg.identity) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        self.api.replace(&self.cfg.name, &lease).await?;
        tracing::info!("released leadership");
        Ok(())
    }

    fn holder(&self) -> Option<String> {
        self.observed
            .as_ref()
            .and_then(|(spec, _)| spec.holder_identity.clone())
    }

    fn observe(&mut self, spec: Option<LeaseSpec>) {
        let spec = spec.unwrap_or_default();
        if self.observed.as_ref().map(|(s, _)| s) != Some(&spec) {
            self.observed = Some((spec, Instant::now()));
        }
    }

    fn desired_spec(&self, current: Option<&LeaseSpec>, now: MicroTime) -> LeaseSpec {
        next_spec(&self.cfg, current, now)
    }

    /// One round of client-go's tryAcquireOrRenew. `Ok(false)`: someone else
    /// holds a valid lease or won a race for it.
    async fn try_acquire_or_renew(&mut self) -> Result<bool> {
        let now = MicroTime(Timestamp::now());
        let Some(mut lease) = self.api.get(&self.cfg.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    namespace: Some(self.cfg.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.desired_spec(None, now)),
            };
            return match self.api.create(&lease).await {
                Ok(created) => {
                    self.observe(created.spec);
                    Ok(true)
                }
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(err) => Err(err.into()),
            };
        };

        self.observe(lease.spec.clone());
        let (current, seen_at) = self.observed.clone().expect("just observed");
        let holder = current.holder_identity.as_deref().unwrap_or_default();
        if !holder.is_empty() && holder != self.cfg.identity {
            let duration =
                Duration::from_secs(current.lease_duration_seconds.unwrap_or(0).max(0) as u64);
            if seen_at.elapsed() < duration {
                return Ok(false);
            }
            tracing::info!(previous = %holder, "lease expired; taking over");
        }

        // The read resourceVersion stays in the metadata, so a concurrent
        // writer makes this replace fail with 409 instead of both winning.
        lease.spec = Some(self.desired_spec(Some(&current), now));
        match self.api.replace(&self.cfg.name, &lease).await {
            Ok(updated) => {
                self.observe(updated.spec);
                Ok(true)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(err) => Err(err.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LeaseConfig {
        LeaseConfig {
            name: "bio-operator".into(),
            namespace: "bio-exporter".into(),
            identity: "me".into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    #[test]
    fn timing_must_leave_room_to_stop_before_expiry() {
        assert!(cfg().validate().is_ok());
        let bad = LeaseConfig {
            renew_deadline: Duration::from_secs(15),
            ..cfg()
        };
        assert!(bad.validate().is_err());
        let bad = LeaseConfig {
            retry_period: Duration::from_secs(10),
            ..cfg()
        };
        assert!(bad.validate().is_err());
    }

    fn at(s: i64) -> MicroTime {
        MicroTime(Timestamp::from_second(s).unwrap())
    }

    #[test]
    fn taking_over_counts_a_transition_and_renewing_does_not() {
        let cfg = cfg();
        let theirs = LeaseSpec {
            holder_identity: Some("them".into()),
            acquire_time: Some(at(1)),
            renew_time: Some(at(5)),
            lease_transitions: Some(3),
            lease_duration_seconds: Some(15),
            ..LeaseSpec::default()
        };
        let mine = next_spec(&cfg, Some(&theirs), at(30));
        assert_eq!(mine.holder_identity.as_deref(), Some("me"));
        assert_eq!(mine.acquire_time, Some(at(30)));
        assert_eq!(mine.lease_transitions, Some(4));
        assert_eq!(mine.lease_duration_seconds, Some(15));

        let renewed = next_spec(&cfg, Some(&mine), at(32));
        assert_eq!(renewed.acquire_time, Some(at(30)));
        assert_eq!(renewed.renew_time, Some(at(32)));
        assert_eq!(renewed.lease_transitions, Some(4));

        let fresh = next_spec(&cfg, None, at(40));
        assert_eq!(fresh.lease_transitions, Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn fence_closes_at_the_deadline() {
        assert!(Fence::open().check().is_ok());
        let fence = Fence::closed();
        assert!(fence.check().is_err());
        fence.valid_until(Instant::now() + Duration::from_secs(10));
        assert!(fence.check().is_ok());
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(matches!(fence.check(), Err(Error::LeadershipLost(_))));
    }

    #[test]
    fn identities_are_unique_per_process_start() {
        let a = unique_identity("pod");
        let b = unique_identity("pod");
        assert!(a.starts_with("pod_"));
        assert_ne!(a, b);
    }

    /// An API server holding one Lease, with optimistic concurrency, that can
    /// stall (requests wait until it resumes, then are served, as a
    /// SIGSTOPped kube-apiserver does) or freeze the client (the clock jumps
    /// while a request is in flight, as when this process is SIGSTOPped).
    #[derive(Clone, Default)]
    struct FakeApiServer(Arc<Mutex<FakeState>>);

    #[derive(Default)]
    struct FakeState {
        lease: Option<Lease>,
        version: u64,
        stalled_until: Option<Instant>,
        freeze_client_once: Option<Duration>,
        requests: u32,
    }

    impl FakeApiServer {
        fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
            self.0.lock().unwrap()
        }

        fn stall_for(&self, d: Duration) {
            self.state().stalled_until = Some(Instant::now() + d);
        }

        fn holder(&self) -> Option<String> {
            self.state()
                .lease
                .as_ref()
                .and_then(|l| l.spec.as_ref()?.holder_identity.clone())
        }

        /// Waits out a stall or a client freeze, then runs `f` on the state.
        async fn serve<T>(&self, f: impl FnOnce(&mut FakeState) -> T) -> T {
            let (stall, freeze) = {
                let mut st = self.state();
                st.requests += 1;
                (st.stalled_until, st.freeze_client_once.take())
            };
            if let Some(until) = stall {
                tokio::time::sleep_until(until).await;
            }
            if let Some(d) = freeze {
                // Jumps the clock without letting this request's timeout
                // fire first: the answer is there when the process resumes.
                tokio::time::advance(d).await;
            }
            f(&mut self.state())
        }
    }

    fn conflict() -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure("conflict", "Conflict")
                .with_code(409)
                .boxed(),
        )
    }

    impl LeaseClient for FakeApiServer {
        fn get(
            &self,
            _name: &str,
        ) -> impl Future<Output = Result<Option<Lease>, kube::Error>> + Send {
            let this = self.clone();
            async move { this.serve(|st| Ok(st.lease.clone())).await }
        }

        fn create(&self, lease: &Lease) -> impl Future<Output = Result<Lease, kube::Error>> + Send {
            let (this, mut lease) = (self.clone(), lease.clone());
            async move {
                this.serve(|st| {
                    if st.lease.is_some() {
                        return Err(conflict());
                    }
                    st.version += 1;
                    lease.metadata.resource_version = Some(st.version.to_string());
                    st.lease = Some(lease.clone());
                    Ok(lease)
                })
                .await
            }
        }

        fn replace(
            &self,
            _name: &str,
            lease: &Lease,
        ) -> impl Future<Output = Result<Lease, kube::Error>> + Send {
            let (this, mut lease) = (self.clone(), lease.clone());
            async move {
                this.serve(|st| {
                    let current = st
                        .lease
                        .as_ref()
                        .and_then(|l| l.metadata.resource_version.clone());
                    if current != lease.metadata.resource_version {
                        return Err(conflict());
                    }
                    st.version += 1;
                    lease.metadata.resource_version = Some(st.version.to_string());
                    st.lease = Some(lease.clone());
                    Ok(lease)
                })
                .await
            }
        }
    }

    fn elector(api: &FakeApiServer) -> LeaderElector<FakeApiServer> {
        LeaderElector::with_client(api.clone(), cfg())
    }

    #[tokio::test(start_paused = true)]
    async fn a_grant_delayed_by_an_api_server_stall_comes_with_an_open_fence() {
        let api = FakeApiServer::default();
        api.stall_for(Duration::from_secs(30));
        let mut elector = elector(&api);
        let acquired_at = elector.acquire().await;
        assert_eq!(api.holder().as_deref(), Some("me"));
        assert!(elector.fence().check().is_ok());
        assert!(acquired_at.elapsed() < cfg().renew_deadline);
    }

    #[tokio::test(start_paused = true)]
    async fn a_grant_noticed_after_the_renew_deadline_is_renewed_before_leading() {
        let api = FakeApiServer::default();
        api.state().freeze_client_once = Some(Duration::from_secs(30));
        let mut elector = elector(&api);
        elector.acquire().await;
        assert!(elector.fence().check().is_ok());
        assert!(api.state().requests > 2, "the stale grant was not renewed");
    }

    /// The work as the controller sees it: writes only through the fence.
    async fn fenced_work(fence: Fence) -> Result<()> {
        loop {
            fence.check()?;
            sleep(Duration::from_millis(100)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_longer_than_the_lease_ends_leadership_not_the_elector() {
        let api = FakeApiServer::default();
        let mut elector = elector(&api);
        let starts = Arc::new(Mutex::new(Vec::new()));
        let leading = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let lead = {
            let starts = starts.clone();
            let leading = leading.clone();
            async move {
                elector
                    .lead(
                        |fence| {
                            starts.lock().unwrap().push(Instant::now());
                            fenced_work(fence)
                        },
                        async {
                            let _ = stopped.await;
                        },
                        |on| leading.lock().unwrap().push(on),
                    )
                    .await
            }
        };
        let scenario = async {
            sleep(Duration::from_secs(5)).await;
            assert_eq!(starts.lock().unwrap().len(), 1);
            api.stall_for(Duration::from_secs(30));
            sleep(Duration::from_secs(60)).await;
            stop.send(()).unwrap();
        };
        let (result, ()) = tokio::join!(lead, scenario);
        assert!(result.is_ok(), "{result:?}");
        let starts = starts.lock().unwrap();
        assert_eq!(
            starts.len(),
            2,
            "the work was not started again after the stall"
        );
        assert_eq!(*leading.lock().unwrap(), [true, false, true, false]);
        // Released on shutdown.
        assert_eq!(api.holder(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_work_finding_the_fence_closed_sends_the_replica_back_to_standby() {
        let api = FakeApiServer::default();
        let mut elector = elector(&api);
        let runs = Arc::new(Mutex::new(0u32));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let stop = Mutex::new(Some(stop));
        let result = elector
            .lead(
                |_fence| {
                    let run = {
                        let mut runs = runs.lock().unwrap();
                        *runs += 1;
                        *runs
                    };
                    if run == 2 {
                        let _ = stop.lock().unwrap().take().unwrap().send(());
                    }
                    async move {
                        if run == 1 {
                            return Err(Error::LeadershipLost("fence closed".into()));
                        }
                        std::future::pending().await
                    }
                },
                async {
                    let _ = stopped.await;
                },
                |_| {},
            )
            .await;
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(*runs.lock().unwrap(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_configuration_error_from_the_work_ends_the_elector() {
        let api = FakeApiServer::default();
        let mut elector = elector(&api);
        let result = elector
            .lead(
                |_fence| async { Err(Error::Config("cannot list BioMonitors".into())) },
                std::future::pending(),
                |_| {},
            )
            .await;
        assert!(matches!(result, Err(Error::Config(_))), "{result:?}");
        assert_eq!(api.holder(), None, "the lease was not released");
    }

    #[test]
    fn only_errors_a_retry_cannot_fix_end_the_process() {
        fn api(code: u16) -> Error {
            Error::Kube(kube::Error::Api(
                kube::core::Status::failure("x", "X")
                    .with_code(code)
                    .boxed(),
            ))
        }
        assert!(!ends_the_process(&Error::LeadershipLost("x".into())));
        assert!(!ends_the_process(&Error::Timeout("CRD".into())));
        assert!(!ends_the_process(&api(503)));
        assert!(!ends_the_process(&api(429)));
        assert!(!ends_the_process(&api(409)));
        assert!(ends_the_process(&api(403)));
        assert!(ends_the_process(&api(422)));
        assert!(ends_the_process(&Error::Config("x".into())));
    }
}
