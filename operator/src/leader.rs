//! Leader election over a `coordination.k8s.io/v1` Lease, so that two
//! operator replicas never reconcile at once.
//!
//! The same protocol as client-go's `leaderelection`: the holder renews
//! `spec.renewTime` well within `leaseDurationSeconds`; a candidate takes
//! the lease over only after it has seen the record unchanged for a whole
//! lease duration, measured on its own monotonic clock (so clock skew
//! between nodes does not matter). Every write carries the
//! `resourceVersion` it read, so two candidates racing for an expired lease
//! cannot both win: the loser gets a 409 Conflict.
//!
//! A leader that cannot renew (the API server hangs, or the network cut it
//! off) gives up once `renew_deadline` has passed since its last renewal,
//! which is shorter than the lease duration another replica waits out: so
//! the old leader has stopped before a new one can start. Every API call
//! has a timeout, so a hung call cannot hold it past the deadline.
//!
//! (kube-lease-manager fits kube 5 too; this elector is kept because its
//! give-up deadline is explicit and tested, and it needs no more than
//! get/create/update on one Lease.)

use std::sync::Mutex;
use std::sync::PoisonError;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::time::Instant;
use tracing::{info, warn};

/// Lease timing, as in client-go's defaults scaled for a small operator.
#[derive(Debug, Clone)]
pub struct LeaseTiming {
    /// How long a lease is valid without renewal.
    pub lease_duration: Duration,
    /// How long the leader keeps leading without a successful renewal;
    /// shorter than `lease_duration`.
    pub renew_deadline: Duration,
    /// How often the holder renews.
    pub renew_every: Duration,
    /// How often a candidate tries to acquire.
    pub retry_every: Duration,
    /// Longest wait for one API call.
    pub call_timeout: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            renew_every: Duration::from_secs(2),
            retry_every: Duration::from_secs(2),
            call_timeout: Duration::from_secs(3),
        }
    }
}

/// Why one round of the election failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(transparent)]
    Api(#[from] kube::Error),
    #[error("no answer from the API server within {0:?}")]
    Timeout(Duration),
}

/// One candidate for one Lease.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: LeaseTiming,
    /// The last record seen and when it was first seen (monotonic).
    observed: Mutex<Option<(LeaseSpec, Instant)>>,
}

impl LeaderElector {
    pub fn new(api: Api<Lease>, name: &str, identity: &str, timing: LeaseTiming) -> Self {
        Self {
            api,
            name: name.into(),
            identity: identity.into(),
            timing,
            observed: Mutex::new(None),
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn lease_seconds(&self) -> i32 {
        i32::try_from(self.timing.lease_duration.as_secs()).unwrap_or(i32::MAX)
    }

    /// Whether the record `spec` has stayed unchanged, in this process's
    /// view, for a whole lease duration.
    fn expired(&self, spec: &LeaseSpec) -> bool {
        let mut observed = self.observed.lock().unwrap_or_else(PoisonError::into_inner);
        match observed.as_ref() {
            Some((seen, since)) if seen == spec => {
                let duration = spec
                    .lease_duration_seconds
                    .and_then(|s| u64::try_from(s).ok())
                    .map_or(self.timing.lease_duration, Duration::from_secs);
                since.elapsed() >= duration
            }
            _ => {
                *observed = Some((spec.clone(), Instant::now()));
                false
            }
        }
    }

    /// One round: creates, renews or takes over the lease when it may.
    /// Returns whether this candidate holds the lease afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, LeaseError> {
        let limit = self.timing.call_timeout;
        let now = MicroTime(Timestamp::now());
        let read = tokio::time::timeout(limit, self.api.get_opt(&self.name))
            .await
            .map_err(|_| LeaseError::Timeout(limit))??;
        let Some(mut lease) = read else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(self.lease_seconds()),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            let created =
                tokio::time::timeout(limit, self.api.create(&PostParams::default(), &lease))
                    .await
                    .map_err(|_| LeaseError::Timeout(limit))?;
            return lost_race(created);
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let held_by_me = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let free = spec.holder_identity.as_deref().is_none_or(str::is_empty);
        let next = if held_by_me {
            LeaseSpec {
                renew_time: Some(now),
                lease_duration_seconds: Some(self.lease_seconds()),
                ..spec
            }
        } else if free || self.expired(&spec) {
            info!(previous = ?spec.holder_identity, "taking over the leader lease");
            LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(self.lease_seconds()),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + 1),
                ..spec
            }
        } else {
            return Ok(false);
        };
        lease.spec = Some(next);
        let written = tokio::time::timeout(
            limit,
            self.api.replace(&self.name, &PostParams::default(), &lease),
        )
        .await
        .map_err(|_| LeaseError::Timeout(limit))?;
        lost_race(written)
    }

    /// Waits until this candidate holds the lease. API errors are logged
    /// and retried.
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    info!(identity = %self.identity, lease = %self.name, "became leader");
                    return;
                }
                Ok(false) => {}
                Err(error) => warn!(%error, "leader lease request failed"),
            }
            tokio::time::sleep(self.timing.retry_every).await;
        }
    }

    /// Renews the lease until it is lost, which this returns on: taken by
    /// another replica, or not renewed for `renew_deadline` (another
    /// replica may take it over once the lease duration has passed, and
    /// this one must have stopped by then).
    pub async fn hold(&self) {
        let mut last_renewal = Instant::now();
        loop {
            let deadline = last_renewal + self.timing.renew_deadline;
            let wake = (Instant::now() + self.timing.renew_every).min(deadline);
            tokio::time::sleep_until(wake).await;
            if Instant::now() >= deadline {
                warn!(
                    deadline = ?self.timing.renew_deadline,
                    "could not renew the leader lease in time; stepping down"
                );
                return;
            }
            // A renewal counts from when it was sent, not answered: the
            // record it wrote may be that old in another replica's eyes.
            let sent = Instant::now();
            let attempt = tokio::time::timeout_at(deadline, self.try_acquire_or_renew()).await;
            match attempt {
                Ok(Ok(true)) => last_renewal = sent,
                Ok(Ok(false)) => {
                    warn!("the leader lease was taken by another replica");
                    return;
                }
                Ok(Err(error)) => warn!(%error, "could not renew the leader lease"),
                Err(_) => {}
            }
        }
    }

    /// Gives the lease up so a standby takes over at once, not after the
    /// lease expires. Best effort.
    pub async fn release(&self) {
        let limit = self.timing.call_timeout;
        let Ok(Ok(Some(mut lease))) =
            tokio::time::timeout(limit, self.api.get_opt(&self.name)).await
        else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        match tokio::time::timeout(
            limit,
            self.api.replace(&self.name, &PostParams::default(), &lease),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => warn!(%error, "could not release the leader lease"),
            Err(_) => warn!("could not release the leader lease: no answer"),
        }
    }
}

/// A 409 (another candidate wrote first) means "not leader", not an error.
fn lost_race(result: Result<Lease, kube::Error>) -> Result<bool, LeaseError> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(error) => Err(error.into()),
    }
}
