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

pub struct LeaderElector {
    api: Api<Lease>,
    cfg: LeaseConfig,
    fence: Fence,
    /// Last lease record seen and when it was first seen in that state.
    observed: Option<(LeaseSpec, Instant)>,
}

impl LeaderElector {
    pub fn new(client: Client, cfg: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &cfg.namespace),
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

    /// Waits until this replica holds the lease. Returns the instant the
    /// winning request was sent, which starts the renew-deadline clock.
    pub async fn acquire(&mut self) -> Instant {
        let mut last_holder = None;
        loop {
            let started = Instant::now();
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    tracing::info!(identity = %self.cfg.identity, lease = %self.cfg.name, "acquired leadership");
                    self.fence.valid_until(started + self.cfg.renew_deadline);
                    return started;
                }
                Ok(false) => {
                    let holder = self.holder();
                    if holder != last_holder {
                        tracing::info!(holder = ?holder, "lease held by another replica; waiting");
                        last_holder = holder;
                    }
                }
                Err(err) => tracing::warn!(error = %err, "could not acquire the lease"),
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
            sleep(self.cfg.retry_period).await;
            let started = Instant::now();
            let deadline = last_renewal + self.cfg.renew_deadline;
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

    /// Gives the lease up so a standby takes over at once instead of after
    /// `lease_duration`. Only call once the work has stopped.
    pub async fn release(&mut self) -> Result<()> {
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
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
        self.api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await?;
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
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    namespace: Some(self.cfg.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.desired_spec(None, now)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
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
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
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
}
