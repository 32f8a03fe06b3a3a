//! Leader election among controller replicas with a `coordination.k8s.io/v1` Lease, after
//! client-go's `leaderelection` (the rules, not the code):
//!
//! - a candidate creates the Lease when there is none, holding it;
//! - it takes a Lease that nobody holds (its holder gave it up) or whose holder has not
//!   renewed it for the Lease's `leaseDurationSeconds`, counted on the candidate's own clock
//!   from when it first saw the current record, so that the clocks of the candidates never
//!   matter (only their rates);
//! - the holder renews every [`RETRY_PERIOD`], and stops leading — stops the leader-only
//!   work — when it has not renewed for [`RENEW_DEADLINE`], whether or not a request is still
//!   hanging: before any other candidate can take the Lease over ([`RENEW_DEADLINE`] <
//!   [`LEASE_DURATION`], and the others count from after the last renewal they saw);
//! - every write names the `resourceVersion` it read (optimistic concurrency), so two
//!   candidates cannot both take a Lease; the loser reads the winner's record next time.
//!
//! With [`LEASE_DURATION`] 10 s and [`RETRY_PERIOD`] 2 s, a leader killed with SIGKILL is
//! replaced within about 12 s: the survivor saw its last renewal within a retry period and
//! tries again as soon as that record has been left unrenewed for a lease. A leader that
//! stops cleanly gives the Lease up (no holder), and another takes it at its next try.
//!
//! The decision is a pure function of what the candidate observed and its clock
//! ([`decide`], [`still_leading`]); [`Elector`] runs it against the API server and reports
//! leadership as a [`Leadership`].

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

use super::status_code;
use crate::control::leadership::Leadership;

/// How long a Lease stays with a holder that stopped renewing it.
pub const LEASE_DURATION: Duration = Duration::from_secs(10);
/// How long a leader keeps leading without a successful renewal.
pub const RENEW_DEADLINE: Duration = Duration::from_secs(7);
/// How often the leader renews, and a follower looks.
pub const RETRY_PERIOD: Duration = Duration::from_secs(2);

/// One candidate's election.
#[derive(Debug, Clone)]
pub struct ElectionConfig {
    /// The Lease's namespace.
    pub namespace: String,
    /// The Lease's name.
    pub lease_name: String,
    /// This candidate, as the Lease's `holderIdentity` names it: unique per process.
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl ElectionConfig {
    /// An election with the default timings.
    pub fn new(namespace: &str, lease_name: &str, identity: &str) -> ElectionConfig {
        ElectionConfig {
            namespace: namespace.to_string(),
            lease_name: lease_name.to_string(),
            identity: identity.to_string(),
            lease_duration: LEASE_DURATION,
            renew_deadline: RENEW_DEADLINE,
            retry_period: RETRY_PERIOD,
        }
    }
}

/// What an election reads of a Lease: the holder and the fields whose change shows that the
/// holder (or anyone) wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// None when nobody holds it (never held, or given up).
    pub holder: Option<String>,
    pub duration: Duration,
    /// Microseconds since the Unix epoch, as written (on the writer's clock: only compared
    /// for equality).
    pub renew_time_us: Option<i64>,
    pub acquire_time_us: Option<i64>,
    pub transitions: i32,
}

impl Record {
    /// The record of `lease`; a Lease without a duration counts as one of `default`.
    pub fn of(lease: &Lease, default: Duration) -> Record {
        let spec = lease.spec.clone().unwrap_or_default();
        Record {
            holder: spec.holder_identity.filter(|h| !h.is_empty()),
            duration: spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(default, Duration::from_secs),
            renew_time_us: spec.renew_time.map(|t| t.0.as_microsecond()),
            acquire_time_us: spec.acquire_time.map(|t| t.0.as_microsecond()),
            transitions: spec.lease_transitions.unwrap_or(0),
        }
    }
}

/// The last record a candidate read, and when (on its own clock) it first saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub record: Record,
    pub since: Instant,
}

impl Observation {
    /// The observation after reading `record` at `now`: its time moves only when the record
    /// changed.
    pub fn observe(previous: Option<Observation>, record: Record, now: Instant) -> Observation {
        match previous {
            Some(p) if p.record == record => p,
            _ => Observation { record, since: now },
        }
    }
}

/// What a candidate does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// There is no Lease: create it, holding it.
    Create,
    /// It holds the Lease: renew it.
    Renew,
    /// Nobody holds the Lease, or its holder let it expire: take it over.
    Acquire,
    /// Another holds it, live until `expires` unless renewed.
    Follow { expires: Instant },
}

/// Decides from what `me` observed of the Lease (None: there is none) at `now`.
pub fn decide(observed: Option<&Observation>, me: &str, now: Instant) -> Decision {
    let Some(o) = observed else {
        return Decision::Create;
    };
    match &o.record.holder {
        Some(holder) if holder == me => Decision::Renew,
        None => Decision::Acquire,
        Some(_) => {
            let expires = o.since + o.record.duration;
            if now >= expires {
                Decision::Acquire
            } else {
                Decision::Follow { expires }
            }
        }
    }
}

/// Whether a leader whose last successful renewal started at `renewed` still leads at `now`.
pub fn still_leading(renewed: Instant, now: Instant, renew_deadline: Duration) -> bool {
    now < renewed + renew_deadline
}

/// What one attempt found.
enum Attempt {
    /// This candidate holds the Lease, written by the request that started at the attempt.
    Leading,
    /// Another holds it (None: unknown, e.g. it created the Lease first).
    Following { holder: Option<String> },
}

/// A campaign for leadership, running until stopped. Dropping it stops it without giving
/// the Lease up (as a kill would): another candidate takes over once the Lease expires.
pub struct Elector {
    leading: watch::Receiver<bool>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    identity: String,
}

impl Elector {
    /// Starts campaigning with `client`.
    pub fn start(client: kube::Client, config: ElectionConfig) -> Elector {
        let (tx, rx) = watch::channel(false);
        let (stop_tx, stop_rx) = oneshot::channel();
        let identity = config.identity.clone();
        let api = Api::<Lease>::namespaced(client, &config.namespace);
        let task = tokio::spawn(campaign(api, config, tx, stop_rx));
        Elector {
            leading: rx,
            stop: Some(stop_tx),
            task: Some(task),
            identity,
        }
    }

    /// Whether this candidate leads, for the work that runs only on the leader.
    pub fn leadership(&self) -> Leadership {
        Leadership::from_channel(self.leading.clone())
    }

    /// This candidate's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Stops campaigning; a leader gives the Lease up so that another candidate takes over
    /// at its next try rather than after the Lease expired.
    pub async fn step_down(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            if tokio::time::timeout(RETRY_PERIOD * 2, task).await.is_err() {
                warn!("giving up the leader's Lease took too long; it expires on its own");
            }
        }
    }
}

impl Drop for Elector {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn campaign(
    api: Api<Lease>,
    config: ElectionConfig,
    leading: watch::Sender<bool>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut observed: Option<Observation> = None;
    // The start of the last attempt that found this candidate holding the Lease, while it
    // leads.
    let mut renewed: Option<Instant> = None;
    let step_down = |renewed: &mut Option<Instant>, why: &str| {
        if renewed.take().is_some() {
            warn!(identity = %config.identity, lease = %config.lease_name, why, "no longer the leader");
            leading.send_replace(false);
        }
    };
    loop {
        let started = Instant::now();
        // A leader must know by its deadline whether it still leads, whatever the request.
        let limit = match renewed {
            Some(r) => (r + config.renew_deadline).saturating_duration_since(started),
            None => config.renew_deadline,
        };
        match tokio::time::timeout(limit, attempt(&api, &config, &mut observed)).await {
            Ok(Ok(Attempt::Leading)) => {
                if renewed.replace(started).is_none() {
                    info!(identity = %config.identity, lease = %config.lease_name, namespace = %config.namespace, "became the leader");
                    leading.send_replace(true);
                }
            }
            Ok(Ok(Attempt::Following { holder })) => {
                if renewed.is_some() {
                    let why = format!(
                        "the Lease is held by {}",
                        holder.as_deref().unwrap_or("another candidate")
                    );
                    step_down(&mut renewed, &why);
                }
            }
            Ok(Err(e)) => {
                warn!(identity = %config.identity, lease = %config.lease_name, error = %e, "leader election: reading or writing the Lease failed")
            }
            Err(_) => {
                warn!(identity = %config.identity, lease = %config.lease_name, "leader election: the Lease request timed out")
            }
        }
        if let Some(r) = renewed {
            if !still_leading(r, Instant::now(), config.renew_deadline) {
                step_down(
                    &mut renewed,
                    "the Lease could not be renewed within the renew deadline",
                );
            }
        }
        // A follower tries again as soon as the holder's Lease would expire, if sooner.
        let now = Instant::now();
        let pause = match (renewed, decide(observed.as_ref(), &config.identity, now)) {
            (None, Decision::Follow { expires }) => config
                .retry_period
                .min(expires.saturating_duration_since(now) + Duration::from_millis(50)),
            _ => config.retry_period,
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = &mut stop => {
                if renewed.is_some() {
                    release(&api, &config).await;
                    step_down(&mut renewed, "stopping");
                }
                return;
            }
        }
    }
}

/// One read of the Lease, and the write its decision calls for.
async fn attempt(
    api: &Api<Lease>,
    config: &ElectionConfig,
    observed: &mut Option<Observation>,
) -> Result<Attempt, kube::Error> {
    let me = config.identity.as_str();
    let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
    let seconds = i32::try_from(config.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX);
    let Some(mut lease) = api.get_opt(&config.lease_name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(config.lease_name.clone()),
                namespace: Some(config.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(me.to_string()),
                lease_duration_seconds: Some(seconds),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(created) => {
                *observed = Some(Observation::observe(
                    None,
                    Record::of(&created, config.lease_duration),
                    Instant::now(),
                ));
                Ok(Attempt::Leading)
            }
            // Another candidate created it first; its record is read next time.
            Err(e) if status_code(&e) == Some(409) => Ok(Attempt::Following { holder: None }),
            Err(e) => Err(e),
        };
    };
    let record = Record::of(&lease, config.lease_duration);
    let holder = record.holder.clone();
    let read_at = Instant::now();
    *observed = Some(Observation::observe(observed.take(), record, read_at));
    let decision = decide(observed.as_ref(), me, read_at);
    if let Decision::Follow { .. } | Decision::Create = decision {
        return Ok(Attempt::Following { holder });
    }
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    if decision == Decision::Acquire {
        spec.holder_identity = Some(me.to_string());
        spec.acquire_time = Some(now.clone());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
    }
    spec.renew_time = Some(now);
    spec.lease_duration_seconds = Some(seconds);
    // The write names the resourceVersion read: a candidate that wrote since makes it fail.
    match api
        .replace(&config.lease_name, &PostParams::default(), &lease)
        .await
    {
        Ok(written) => {
            *observed = Some(Observation::observe(
                None,
                Record::of(&written, config.lease_duration),
                Instant::now(),
            ));
            if decision == Decision::Acquire {
                info!(identity = %me, previous = ?holder, "took the leader's Lease over");
            }
            Ok(Attempt::Leading)
        }
        Err(e) if status_code(&e) == Some(409) && decision == Decision::Acquire => {
            Ok(Attempt::Following { holder: None })
        }
        Err(e) => Err(e),
    }
}

/// Gives the Lease up, if this candidate still holds it: no holder, so that another takes it
/// at once.
async fn release(api: &Api<Lease>, config: &ElectionConfig) {
    let lease = match api.get_opt(&config.lease_name).await {
        Ok(Some(lease)) => lease,
        Ok(None) => return,
        Err(e) => {
            warn!(error = %e, "giving up the leader's Lease: reading it failed; it expires on its own");
            return;
        }
    };
    let mut lease = lease;
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
        return;
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(MicroTime(k8s_openapi::jiff::Timestamp::now()));
    match api
        .replace(&config.lease_name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => {
            info!(identity = %config.identity, lease = %config.lease_name, "gave the leader's Lease up")
        }
        Err(e) => warn!(error = %e, "giving up the leader's Lease failed; it expires on its own"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(holder: Option<&str>, renew_us: i64) -> Record {
        Record {
            holder: holder.map(str::to_string),
            duration: Duration::from_secs(10),
            renew_time_us: Some(renew_us),
            acquire_time_us: Some(0),
            transitions: 0,
        }
    }

    #[test]
    fn a_candidate_creates_renews_takes_free_or_expired_leases_and_follows_live_ones() {
        let t0 = Instant::now();
        assert_eq!(decide(None, "a", t0), Decision::Create);
        let ours = Observation::observe(None, record(Some("a"), 1), t0);
        assert_eq!(decide(Some(&ours), "a", t0), Decision::Renew);
        assert_eq!(
            decide(Some(&ours), "a", t0 + Duration::from_secs(60)),
            Decision::Renew,
            "a holder renews its own however late"
        );
        let free = Observation::observe(None, record(None, 1), t0);
        assert_eq!(decide(Some(&free), "a", t0), Decision::Acquire);
        let theirs = Observation::observe(None, record(Some("b"), 1), t0);
        let expires = t0 + Duration::from_secs(10);
        assert_eq!(
            decide(Some(&theirs), "a", t0 + Duration::from_secs(9)),
            Decision::Follow { expires }
        );
        assert_eq!(decide(Some(&theirs), "a", expires), Decision::Acquire);
    }

    #[test]
    fn expiry_counts_from_when_the_record_last_changed_as_seen_here() {
        let t0 = Instant::now();
        let seen = Observation::observe(None, record(Some("b"), 1), t0);
        // The same record read again later: the observation keeps its time.
        let again = Observation::observe(
            Some(seen.clone()),
            record(Some("b"), 1),
            t0 + Duration::from_secs(8),
        );
        assert_eq!(again.since, t0);
        assert_eq!(
            decide(Some(&again), "a", t0 + Duration::from_secs(10)),
            Decision::Acquire
        );
        // A renewal (the record changed): counted from when it was seen, whatever time the
        // holder wrote into it.
        let renewed_at = t0 + Duration::from_secs(8);
        let renewed = Observation::observe(Some(seen), record(Some("b"), -5), renewed_at);
        assert_eq!(renewed.since, renewed_at);
        assert_eq!(
            decide(Some(&renewed), "a", t0 + Duration::from_secs(17)),
            Decision::Follow {
                expires: renewed_at + Duration::from_secs(10)
            }
        );
        // A Lease's own duration counts, not the candidate's.
        let short = Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: Some(String::new()),
                lease_duration_seconds: Some(1),
                ..LeaseSpec::default()
            }),
        };
        let r = Record::of(&short, Duration::from_secs(10));
        assert_eq!((r.holder, r.duration), (None, Duration::from_secs(1)));
        assert_eq!(
            Record::of(&Lease::default(), Duration::from_secs(10)).duration,
            Duration::from_secs(10)
        );
    }

    #[test]
    fn a_leader_steps_down_at_the_deadline_before_anyone_may_take_over() {
        let renewed = Instant::now();
        assert!(still_leading(
            renewed,
            renewed + Duration::from_secs(6),
            RENEW_DEADLINE
        ));
        assert!(!still_leading(
            renewed,
            renewed + RENEW_DEADLINE,
            RENEW_DEADLINE
        ));
        // Others see the renewal no earlier than it was made, and wait a whole lease from
        // then: the leader has stopped by then, with this much to spare.
        assert!(RENEW_DEADLINE + Duration::from_secs(2) < LEASE_DURATION);
        // A kill -9 is noticed within a lease and a retry period of the last renewal.
        assert!(LEASE_DURATION + RETRY_PERIOD < Duration::from_secs(15));
    }
}
