//! The cluster-mode data path of a staged volume on its node: an engine over the volume's
//! member replicas (sessions opened with the attachment's epoch and token) serving NBD on a
//! unix socket, and nbdfuse exposing that export as one file, over which the node service (`node`) sets up the
//! loop device, filesystem and mounts exactly as for a local replica file. A watcher per
//! engine logs it stopping on its own (fenced, lease expired), which NodeGetVolumeStats
//! reports ([`ClusterLink::health`]); what a dead process left is torn down by
//! `node::reconcile`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{oneshot, Mutex};
use tracing::{error, info, warn};

use crate::engine::{
    Engine, EngineConfig, EngineState, Member, Membership, RebuildState, RebuildStatus,
};
use crate::model::{CONTEXT_EPOCH, CONTEXT_TOKEN, MAX_VOLUME_SIZE};
use crate::node::reconcile::{self, Reconciler, FUSE_FILE};
use crate::replica::client::ReplicaClient;
use crate::replica::server::LocalReplicas;
use crate::rpc::v1 as pb;
use crate::rpc::ControlClient;

/// How long the engine's socket and nbdfuse's file may take to appear.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the cluster data path could not be set up or torn down.
#[derive(Debug, thiserror::Error)]
pub enum EngineLinkError {
    #[error("volume {volume:?} was not published to this node: publish_context lacks {key:?} (ControllerPublishVolume must come first)")]
    NotPublished { volume: String, key: &'static str },
    #[error("volume {volume:?}: the controller did not answer: {why}")]
    Controller { volume: String, why: String },
    /// The controller refused the attachment the publish context names (a forged or stale
    /// epoch): retrying the same context cannot succeed.
    #[error("volume {volume:?}: publish_context names epoch {epoch} of this node, which is not the volume's current attachment ({why}); ControllerPublishVolume gives the current one")]
    NotCurrent {
        volume: String,
        epoch: u64,
        why: String,
    },
    #[error("volume {volume:?} does not exist ({why})")]
    VolumeNotFound { volume: String, why: String },
    #[error("volume {volume:?}: no member replica could be opened ({why})")]
    NoMembers { volume: String, why: String },
    #[error("volume {volume:?}: {what}: {why}")]
    Start {
        volume: String,
        what: &'static str,
        why: String,
    },
    #[error("volume {volume:?}: loop device {device:?} is still attached over the FUSE file of its previous engine, which {why}; unstage the volume first")]
    StillStaged {
        volume: String,
        device: PathBuf,
        why: String,
    },
}

/// How a volume's engine in this process stands, for NodeGetVolumeStats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineHealth {
    Serving,
    /// It stopped serving, or nbdfuse in front of it is gone: why, and what to do.
    Stopped(String),
    /// No engine of the volume runs in this process (it died with an earlier one).
    Gone,
}

/// Why an engine in `state` serves no I/O and what must happen; None while it serves.
pub fn stop_reason(volume: &str, state: EngineState) -> Option<String> {
    match state {
        EngineState::Serving => None,
        EngineState::Fenced => Some(format!(
            "the engine of volume {volume:?} was fenced by a newer attachment on another node: it serves no I/O any more; the volume must be unstaged here (restart the pod)"
        )),
        EngineState::LeaseExpired => Some(format!(
            "the engine of volume {volume:?} stopped serving I/O: its attachment lease expired (it could not renew it with the controller); the volume must be unstaged and staged again (restart the pod)"
        )),
    }
}

/// The message for a volume mounted over an engine that no longer runs in this process.
pub fn gone_message(volume: &str) -> String {
    format!(
        "the engine of volume {volume:?} is gone (the node plugin restarted): nothing serves this mount; the volume must be unstaged and staged again (restart the pod)"
    )
}

/// How often a runtime's watcher looks at its engine's state.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);

/// Watches an engine until it stops serving on its own (fenced, or its lease lapsed), logs
/// that as an error naming the volume and the reason, and returns the state it saw.
/// Opens a session on one replica: in process when it is `node_id`'s, else over TCP.
async fn open_replica(
    local: Option<&LocalReplicas>,
    node_id: &str,
    timeout: Duration,
    volume_id: &str,
    r: &pb::ReplicaStatus,
    epoch: u64,
    token: &str,
) -> Result<(Member, u64), String> {
    let is_local = r.node_id == node_id;
    let opened = match (local, is_local) {
        (Some(replicas), true) => {
            tokio::time::timeout(timeout, replicas.open(volume_id, &r.id, epoch, token))
                .await
                .map(|opened| {
                    opened.map(|session| {
                        let held = session.size();
                        (Arc::new(session) as Member, held)
                    })
                })
        }
        _ => tokio::time::timeout(
            timeout,
            ReplicaClient::connect(
                r.node_address.as_str(),
                volume_id,
                &r.id,
                epoch,
                token,
                is_local,
            ),
        )
        .await
        .map(|opened| {
            opened.map(|client| {
                let held = client.size();
                (Arc::new(client) as Member, held)
            })
        }),
    };
    match opened {
        Ok(Ok(opened)) => Ok(opened),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer".to_string()),
    }
}

/// The member opened, if it holds the volume's `size` bytes: a replica not grown with the
/// volume would refuse writes past its end.
fn holding(opened: Result<(Member, u64), String>, size: u64) -> Result<Member, String> {
    match opened? {
        (_, held) if held < size => Err(format!(
            "it holds {held} bytes, less than the volume's {size}"
        )),
        (member, _) => Ok(member),
    }
}

/// How often an engine's node looks for replicas to rebuild and reports progress.
const FOLLOW_INTERVAL: Duration = Duration::from_secs(2);

/// Follows the volume's replicas in the store for its engine: starts rebuilding each
/// replica the controller marked `rebuilding` (in process when local), reports the rebuilds'
/// progress and outcome, and drops members the store no longer counts (retired replicas).
struct Follower {
    control: ControlClient,
    local: Option<LocalReplicas>,
    node_id: String,
    timeout: Duration,
    engine: Engine,
    epoch: u64,
    token: String,
}

impl Follower {
    async fn run(self) {
        let mut finished: Vec<RebuildStatus> = Vec::new();
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<RebuildStatus>();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(FOLLOW_INTERVAL) => {}
                Some(status) = done_rx.recv() => finished.push(status),
            }
            while let Ok(status) = done_rx.try_recv() {
                finished.push(status);
            }
            if self.engine.state() != EngineState::Serving {
                return;
            }
            let volume_id = self.engine.volume_id().to_string();
            let mut reports: Vec<RebuildStatus> = self.engine.rebuilds();
            reports.append(&mut finished);
            if !reports.is_empty() {
                if let Err(why) = self.report(&volume_id, &reports).await {
                    warn!(volume = %volume_id, %why, "could not report rebuild progress");
                    // Outcomes are reported again next time.
                    finished.extend(
                        reports
                            .into_iter()
                            .filter(|r| r.state != RebuildState::Running),
                    );
                }
            }
            // The members before the store is read: a replica promoted after this (store
            // first, engine second) must not be mistaken for one the store dropped.
            let members = self.engine.member_ids();
            let mut control = self.control.clone();
            let status = match tokio::time::timeout(
                self.timeout,
                control.get_volume(pb::GetVolumeRequest {
                    volume: volume_id.clone(),
                }),
            )
            .await
            {
                Ok(Ok(status)) => status.into_inner(),
                Ok(Err(s)) => {
                    warn!(volume = %volume_id, error = %s.message(), "cannot read the volume's replicas");
                    continue;
                }
                Err(_) => continue,
            };
            // An expansion recorded while this engine was starting (or whose call to it was
            // lost): every replica was grown before the size was recorded.
            if status.size > self.engine.size() {
                if let Err(e) = self.engine.grow(status.size) {
                    warn!(volume = %volume_id, error = %e, "cannot grow to the volume's recorded size");
                }
            }
            let running: Vec<String> = self
                .engine
                .rebuilds()
                .into_iter()
                .map(|r| r.replica)
                .collect();
            let current = self.engine.member_ids();
            for r in status.replicas.iter().filter(|r| r.state == "rebuilding") {
                if current.contains(&r.id) || running.contains(&r.id) {
                    continue;
                }
                let opened = open_replica(
                    self.local.as_ref(),
                    &self.node_id,
                    self.timeout,
                    &volume_id,
                    r,
                    self.epoch,
                    &self.token,
                )
                .await;
                let opened = holding(opened, self.engine.size());
                let rebuild =
                    opened.and_then(|m| self.engine.start_rebuild(m).map_err(|e| e.to_string()));
                match rebuild {
                    Ok(task) => {
                        let done = done_tx.clone();
                        tokio::spawn(async move {
                            if let Ok(status) = task.await {
                                let _ = done.send(status);
                            }
                        });
                    }
                    Err(why) => {
                        warn!(volume = %volume_id, replica = %r.id, %why, "cannot start a rebuild");
                        finished.push(failed_start(&r.id, why));
                    }
                }
            }
            // Members the store no longer counts (retired) leave the engine.
            for id in members {
                let counted = status
                    .replicas
                    .iter()
                    .any(|r| r.id == id && r.state == "ready");
                if !counted && self.engine.forget_member(&id) {
                    info!(volume = %volume_id, replica = %id, "replica is no longer a member in the store; the engine drops it");
                }
            }
        }
    }

    async fn report(&self, volume_id: &str, reports: &[RebuildStatus]) -> Result<(), String> {
        let mut control = self.control.clone();
        let request = pb::ReportRebuildsRequest {
            volume_id: volume_id.to_string(),
            node_id: self.node_id.clone(),
            epoch: self.epoch,
            rebuilds: reports
                .iter()
                .map(|r| pb::RebuildProgress {
                    replica_id: r.replica.clone(),
                    size: r.size,
                    done: r.done,
                    copied: r.copied,
                    bytes_per_second: r.bytes_per_second,
                    eta_seconds: r.eta.map_or(0, |d| d.as_secs().max(1)),
                    state: match r.state {
                        RebuildState::Running => "running",
                        RebuildState::Done => "done",
                        RebuildState::Failed => "failed",
                    }
                    .to_string(),
                    error: r.error.clone().unwrap_or_default(),
                })
                .collect(),
        };
        match tokio::time::timeout(self.timeout, control.report_rebuilds(request)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(s)) => Err(s.message().to_string()),
            Err(_) => Err("no answer".to_string()),
        }
    }
}

/// The status reported for a rebuild that could not start.
fn failed_start(replica: &str, why: String) -> RebuildStatus {
    RebuildStatus {
        replica: replica.to_string(),
        size: 0,
        done: 0,
        copied: 0,
        bytes_per_second: 0.0,
        eta: None,
        elapsed: Duration::ZERO,
        state: RebuildState::Failed,
        error: Some(why),
    }
}

async fn watch_engine(engine: Engine, every: Duration) -> EngineState {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let state = engine.state();
        if let Some(reason) = stop_reason(engine.volume_id(), state) {
            error!(volume = %engine.volume_id(), state = ?state, reason = %reason, "the engine stopped serving I/O; the volume is reported abnormal until it is unstaged");
            return state;
        }
    }
}

/// The node's link to the controller and where its engines keep their sockets.
#[derive(Clone)]
pub struct ClusterLink {
    pub control: ControlClient,
    pub node_id: String,
    pub state_dir: PathBuf,
    pub engine: EngineConfig,
    pub call_timeout: Duration,
    /// In-process sessions on this node's replicas: a local member is opened through it
    /// (same token and epoch rules, no socket) rather than over loopback TCP.
    local: Option<LocalReplicas>,
    runtimes: Arc<Mutex<HashMap<String, Runtime>>>,
}

struct Runtime {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    fuse: tokio::process::Child,
    fuse_dir: PathBuf,
    membership: Arc<ControlMembership>,
    /// Starts and reports the engine's rebuilds.
    follower: tokio::task::JoinHandle<()>,
    engine: Engine,
    /// Logs the engine stopping on its own.
    watcher: tokio::task::JoinHandle<EngineState>,
}

/// The engine's membership and lease, kept by the controller.
struct ControlMembership {
    control: ControlClient,
    volume_id: String,
    node_id: String,
    epoch: u64,
    timeout: Duration,
}

impl ControlMembership {
    /// Awaits a controller call within the time limit; its answer, or its error message.
    async fn call<T>(
        &self,
        call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(answer)) => Ok(answer.into_inner()),
            Ok(Err(status)) => Err(status.message().to_string()),
            Err(_) => Err(format!(
                "the controller did not answer within {:?}",
                self.timeout
            )),
        }
    }
}

#[async_trait]
impl Membership for ControlMembership {
    async fn remove_member(&self, replica_id: &str, reason: &str) -> Result<(), String> {
        let mut control = self.control.clone();
        let call = control.remove_member(pb::RemoveMemberRequest {
            volume_id: self.volume_id.clone(),
            replica_id: replica_id.to_string(),
            node_id: self.node_id.clone(),
            epoch: self.epoch,
            reason: reason.to_string(),
        });
        self.call(call).await.map(|_| ())
    }

    async fn renew_lease(&self) -> Result<Duration, String> {
        let mut control = self.control.clone();
        let call = control.renew_lease(pb::RenewLeaseRequest {
            volume_id: self.volume_id.clone(),
            node_id: self.node_id.clone(),
            epoch: self.epoch,
            ..Default::default()
        });
        let granted = self.call(call).await?;
        Ok(Duration::from_millis(granted.lease_ms))
    }

    async fn promote_member(&self, replica_id: &str) -> Result<(), String> {
        let mut control = self.control.clone();
        let call = control.promote_member(pb::PromoteMemberRequest {
            volume_id: self.volume_id.clone(),
            replica_id: replica_id.to_string(),
            node_id: self.node_id.clone(),
            epoch: self.epoch,
        });
        self.call(call).await.map(|_| ())
    }
}

impl ControlMembership {
    /// The first lease of a starting engine, before it opens its members: the controller
    /// first makes the members identical again if the previous engine did not stop cleanly
    /// (one kept, the others to be rebuilt).
    /// A refusal is told apart from a controller that did not answer: an epoch that is not
    /// the volume's current attachment, or a volume that does not exist, stays so however
    /// often the stage is retried.
    async fn start_lease(&self) -> Result<Duration, EngineLinkError> {
        let mut control = self.control.clone();
        let call = control.renew_lease(pb::RenewLeaseRequest {
            volume_id: self.volume_id.clone(),
            node_id: self.node_id.clone(),
            epoch: self.epoch,
            start: true,
            ..Default::default()
        });
        let status = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(granted)) => return Ok(Duration::from_millis(granted.into_inner().lease_ms)),
            Ok(Err(status)) => status,
            Err(_) => {
                return Err(EngineLinkError::Controller {
                    volume: self.volume_id.clone(),
                    why: format!("the controller did not answer within {:?}", self.timeout),
                })
            }
        };
        let (volume, why) = (self.volume_id.clone(), status.message().to_string());
        Err(match status.code() {
            tonic::Code::FailedPrecondition => EngineLinkError::NotCurrent {
                volume,
                epoch: self.epoch,
                why,
            },
            tonic::Code::NotFound => EngineLinkError::VolumeNotFound { volume, why },
            _ => EngineLinkError::Controller { volume, why },
        })
    }

    /// Gives the lease back once the engine has stopped (best effort: when the controller
    /// does not hear it, the next attachment waits for the lease to lapse instead), saying
    /// whether it stopped `clean` (see [`Engine::is_clean`]). A clean stop the controller
    /// does not hear only costs the next engine a rebuild of the members.
    async fn release_lease(&self, clean: bool) {
        let mut control = self.control.clone();
        let call = control.renew_lease(pb::RenewLeaseRequest {
            volume_id: self.volume_id.clone(),
            node_id: self.node_id.clone(),
            epoch: self.epoch,
            release: true,
            clean,
            ..Default::default()
        });
        if let Err(why) = self.call(call).await {
            warn!(volume = %self.volume_id, %why, "could not give the attachment lease back; the next attachment waits for it to lapse");
        }
    }
}

impl ClusterLink {
    pub fn new(
        control: ControlClient,
        node_id: String,
        state_dir: PathBuf,
        engine: EngineConfig,
    ) -> Self {
        ClusterLink {
            control,
            node_id,
            // As the kernel names it (sysfs, mountinfo), so paths under it compare as they are.
            state_dir: std::fs::canonicalize(&state_dir).unwrap_or(state_dir),
            engine,
            call_timeout: Duration::from_secs(10),
            local: None,
            runtimes: Arc::default(),
        }
    }

    /// Opens this node's own replicas in process, through `local`.
    pub fn with_local_replicas(mut self, local: LocalReplicas) -> Self {
        self.local = Some(local);
        self
    }

    /// The file a staged volume's loop device is over.
    pub fn backing_file(&self, volume_id: &str) -> PathBuf {
        self.fuse_dir(volume_id).join(FUSE_FILE)
    }

    fn fuse_dir(&self, volume_id: &str) -> PathBuf {
        self.state_dir.join(reconcile::FUSE_DIR).join(volume_id)
    }

    fn socket(&self, volume_id: &str) -> PathBuf {
        self.state_dir
            .join(reconcile::ENGINES_DIR)
            .join(format!("{volume_id}.sock"))
    }

    /// Starts the volume's engine and nbdfuse (once; a second call finds them running) and
    /// returns the file to put the loop device over.
    pub async fn start(
        &self,
        volume_id: &str,
        ctx: &HashMap<String, String>,
    ) -> Result<PathBuf, EngineLinkError> {
        // The map is locked only to look and to insert: starting an engine opens network
        // sessions, and other volumes' stages must not wait on them. The caller holds the
        // volume's own lock, so no second start of the same volume runs meanwhile.
        let stale = {
            let mut runtimes = self.runtimes.lock().await;
            if let Some(r) = runtimes.get_mut(volume_id) {
                if r.engine.state() == EngineState::Serving
                    && !r.task.is_finished()
                    && matches!(r.fuse.try_wait(), Ok(None))
                {
                    return Ok(self.backing_file(volume_id));
                }
            }
            // A loop device still over the old FUSE file would be taken for the new one's.
            self.refuse_if_still_staged(volume_id, runtimes.get_mut(volume_id))?;
            runtimes.remove(volume_id)
        };
        if let Some(old) = stale {
            self.stop_runtime(volume_id, old).await;
        }
        let context = |key: &'static str| {
            ctx.get(key).cloned().ok_or(EngineLinkError::NotPublished {
                volume: volume_id.to_string(),
                key,
            })
        };
        let epoch: u64 =
            context(CONTEXT_EPOCH)?
                .parse()
                .map_err(|_| EngineLinkError::NotPublished {
                    volume: volume_id.to_string(),
                    key: CONTEXT_EPOCH,
                })?;
        let token = context(CONTEXT_TOKEN)?;
        let controller_error = |why: String| EngineLinkError::Controller {
            volume: volume_id.to_string(),
            why,
        };
        let membership = Arc::new(ControlMembership {
            control: self.control.clone(),
            volume_id: volume_id.to_string(),
            node_id: self.node_id.clone(),
            epoch,
            timeout: self.call_timeout,
        });
        // The first lease, asked for before anything is opened and counted from the asking:
        // the controller's record of it bounds when this engine stops without renewals. It
        // comes before the members are read: the controller may change them first.
        let asked = tokio::time::Instant::now();
        let first_lease = membership.start_lease().await?;
        let mut control = self.control.clone();
        let status = tokio::time::timeout(
            self.call_timeout,
            control.get_volume(pb::GetVolumeRequest {
                volume: volume_id.to_string(),
            }),
        )
        .await
        .map_err(|_| controller_error("timed out".to_string()))?
        .map_err(|s| controller_error(s.message().to_string()))?
        .into_inner();
        let members = self
            .open_members(volume_id, &status, epoch, &token, &membership)
            .await?;
        // The export is as large as any volume can grow, fixed for nbdfuse's life; the
        // loop device over it is bounded to the volume's size (see `size`).
        let config = EngineConfig {
            export_size: MAX_VOLUME_SIZE.max(status.size),
            ..self.engine.clone()
        };
        let engine = Engine::with_config(
            volume_id,
            status.size,
            members,
            Arc::clone(&membership) as Arc<dyn Membership>,
            config,
        )
        .map_err(|e| EngineLinkError::Start {
            volume: volume_id.to_string(),
            what: "engine",
            why: e.to_string(),
        })?;
        engine.bound_lease(asked + first_lease);
        let socket = self.socket(volume_id);
        if let Some(parent) = socket.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| self.start_error(volume_id, "engine socket directory", e))?;
        }
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = engine.clone();
        let socket_path = socket.clone();
        let volume = volume_id.to_string();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            if let Err(e) = serving.serve_unix(&socket_path, shutdown).await {
                warn!(volume = %volume, error = %e, "engine stopped with an error");
            }
        });
        wait_for(&socket, |p| p.exists())
            .await
            .map_err(|why| EngineLinkError::Start {
                volume: volume_id.to_string(),
                what: "engine socket",
                why,
            })?;
        let fuse_dir = self.fuse_dir(volume_id);
        // A mount left by a process that died is stale: clear it first.
        let _ = crate::node::mount::unmount(&fuse_dir);
        std::fs::create_dir_all(&fuse_dir)
            .map_err(|e| self.start_error(volume_id, "fuse directory", e))?;
        let fuse = tokio::process::Command::new("nbdfuse")
            .arg(&fuse_dir)
            .arg("--unix")
            .arg(&socket)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| self.start_error(volume_id, "nbdfuse", e))?;
        let file = self.backing_file(volume_id);
        let size = engine.exported_size();
        let exposed = wait_for(&file, |p| {
            std::fs::metadata(p).is_ok_and(|m| m.len() == size)
        })
        .await;
        let mut runtime = Runtime {
            stop: Some(stop),
            task,
            fuse,
            fuse_dir,
            membership: Arc::clone(&membership),
            follower: tokio::spawn(
                Follower {
                    control: self.control.clone(),
                    local: self.local.clone(),
                    node_id: self.node_id.clone(),
                    timeout: self.call_timeout,
                    engine: engine.clone(),
                    epoch,
                    token: token.clone(),
                }
                .run(),
            ),
            watcher: tokio::spawn(watch_engine(engine.clone(), WATCH_INTERVAL)),
            engine: engine.clone(),
        };
        if let Err(why) = exposed {
            self.stop_runtime(volume_id, runtime).await;
            return Err(EngineLinkError::Start {
                volume: volume_id.to_string(),
                what: "nbdfuse file",
                why,
            });
        }
        if let Ok(Some(exit)) = runtime.fuse.try_wait() {
            self.stop_runtime(volume_id, runtime).await;
            return Err(EngineLinkError::Start {
                volume: volume_id.to_string(),
                what: "nbdfuse",
                why: format!("exited: {exit}"),
            });
        }
        info!(volume = %volume_id, epoch, members = ?engine.member_ids(), file = %file.display(), "engine serving");
        self.runtimes
            .lock()
            .await
            .insert(volume_id.to_string(), runtime);
        Ok(file)
    }

    fn start_error(&self, volume: &str, what: &'static str, e: std::io::Error) -> EngineLinkError {
        EngineLinkError::Start {
            volume: volume.to_string(),
            what,
            why: e.to_string(),
        }
    }

    /// Opens a session on every ready member; a member that cannot be opened is removed
    /// from the membership first (so that no write it misses is ever acknowledged).
    async fn open_members(
        &self,
        volume_id: &str,
        status: &pb::VolumeStatus,
        epoch: u64,
        token: &str,
        membership: &Arc<ControlMembership>,
    ) -> Result<Vec<Member>, EngineLinkError> {
        let mut members: Vec<Member> = Vec::new();
        let mut failures = Vec::new();
        for r in status.replicas.iter().filter(|r| r.state == "ready") {
            match self
                .open_replica(volume_id, r, epoch, token, status.size)
                .await
            {
                Ok(member) => members.push(member),
                Err(why) => failures.push((r.id.clone(), why)),
            }
        }
        if members.is_empty() {
            return Err(EngineLinkError::NoMembers {
                volume: volume_id.to_string(),
                why: failures
                    .iter()
                    .map(|(id, why)| format!("{id}: {why}"))
                    .collect::<Vec<_>>()
                    .join("; "),
            });
        }
        for (id, why) in failures {
            membership
                .remove_member(&id, &format!("unreachable when the engine started: {why}"))
                .await
                .map_err(|e| EngineLinkError::Controller {
                    volume: volume_id.to_string(),
                    why: format!("removing unreachable member {id}: {e}"),
                })?;
        }
        Ok(members)
    }

    /// Opens a session on one replica: in process when it is this node's, else over TCP.
    async fn open_replica(
        &self,
        volume_id: &str,
        r: &pb::ReplicaStatus,
        epoch: u64,
        token: &str,
        size: u64,
    ) -> Result<Member, String> {
        let opened = open_replica(
            self.local.as_ref(),
            &self.node_id,
            self.call_timeout,
            volume_id,
            r,
            epoch,
            token,
        )
        .await;
        holding(opened, size)
    }

    /// The size of the volume as its running engine serves it: what the loop device over
    /// [`ClusterLink::backing_file`] (larger, for online growth) is bounded to. None when no
    /// engine runs for it here.
    pub async fn size(&self, volume_id: &str) -> Option<u64> {
        let runtimes = self.runtimes.lock().await;
        runtimes.get(volume_id).map(|r| r.engine.size())
    }

    /// Online expansion: the engine of attachment `epoch` serves `size` bytes from now on.
    /// Returns its size afterwards, or None when no engine of that attachment runs here.
    pub async fn grow(
        &self,
        volume_id: &str,
        epoch: u64,
        size: u64,
    ) -> Result<Option<u64>, String> {
        let runtimes = self.runtimes.lock().await;
        match runtimes.get(volume_id) {
            Some(r) if r.membership.epoch == epoch && r.engine.state() == EngineState::Serving => {
                r.engine.grow(size).map(Some).map_err(|e| e.to_string())
            }
            _ => Ok(None),
        }
    }

    /// Stops the volume's nbdfuse and engine; Ok when none runs.
    pub async fn stop(&self, volume_id: &str) {
        let runtime = self.runtimes.lock().await.remove(volume_id);
        match runtime {
            Some(r) => self.stop_runtime(volume_id, r).await,
            // Nothing runs (its engine died with an earlier process): clear what that left,
            // the FUSE mount (dead), an orphaned nbdfuse, the socket.
            None => {
                let reconciler = self.reconciler();
                let volume = volume_id.to_string();
                let _ = tokio::task::spawn_blocking(move || {
                    reconciler.tear_down_volume(&volume, false)
                })
                .await;
            }
        }
    }

    /// Start-up: tears down the data path of every volume under the state directory that
    /// has no engine in this process (see `node::reconcile`). Only before CSI is served.
    pub async fn tear_down_stale(&self) {
        let live: std::collections::HashSet<String> =
            self.runtimes.lock().await.keys().cloned().collect();
        let reconciler = self.reconciler();
        let _ = tokio::task::spawn_blocking(move || reconciler.tear_down_stale(&live)).await;
    }

    /// The start-up teardown and its record of torn-down paths, for this state directory.
    pub fn reconciler(&self) -> Reconciler {
        Reconciler::new(&self.state_dir)
    }

    /// How the volume's engine stands.
    pub async fn health(&self, volume_id: &str) -> EngineHealth {
        let mut runtimes = self.runtimes.lock().await;
        let Some(r) = runtimes.get_mut(volume_id) else {
            return EngineHealth::Gone;
        };
        if let Some(reason) = stop_reason(volume_id, r.engine.state()) {
            return EngineHealth::Stopped(reason);
        }
        if let Ok(Some(exit)) = r.fuse.try_wait() {
            return EngineHealth::Stopped(format!(
                "nbdfuse, which exposed the engine of volume {volume_id:?} to the loop device, exited ({exit}); the volume must be unstaged and staged again (restart the pod)"
            ));
        }
        if r.task.is_finished() {
            return EngineHealth::Stopped(format!(
                "the NBD server of the engine of volume {volume_id:?} stopped; the volume must be unstaged and staged again (restart the pod)"
            ));
        }
        EngineHealth::Serving
    }

    /// Err when a loop device is still attached over the volume's FUSE file while no
    /// serving engine is behind it (`runtime`: the stopped one, if any).
    fn refuse_if_still_staged(
        &self,
        volume_id: &str,
        runtime: Option<&mut Runtime>,
    ) -> Result<(), EngineLinkError> {
        let loops = crate::node::blockdev::list_loops().map_err(|e| EngineLinkError::Start {
            volume: volume_id.to_string(),
            what: "listing loop devices",
            why: e.to_string(),
        })?;
        let Some(device) = reconcile::loops_over(&self.backing_file(volume_id), &loops)
            .into_iter()
            .next()
        else {
            return Ok(());
        };
        let why = match runtime {
            Some(r) => match stop_reason(volume_id, r.engine.state()) {
                Some(_) => format!("stopped ({:?})", r.engine.state()),
                None => "no longer serves".to_string(),
            },
            None => "died with an earlier node process".to_string(),
        };
        Err(EngineLinkError::StillStaged {
            volume: volume_id.to_string(),
            device,
            why,
        })
    }

    async fn stop_runtime(&self, volume_id: &str, mut r: Runtime) {
        r.watcher.abort();
        r.follower.abort();
        if let Err(e) = crate::node::mount::unmount(&r.fuse_dir) {
            warn!(volume = %volume_id, error = %e, "unmounting the nbdfuse mount failed");
        }
        if tokio::time::timeout(Duration::from_secs(5), r.fuse.wait())
            .await
            .is_err()
        {
            let _ = r.fuse.kill().await;
        }
        if let Some(stop) = r.stop.take() {
            let _ = stop.send(());
        }
        let drained = tokio::time::timeout(Duration::from_secs(15), &mut r.task)
            .await
            .is_ok();
        if !drained {
            r.task.abort();
        }
        let _ = std::fs::remove_dir(&r.fuse_dir);
        // Only an engine that finished its requests gives its lease back.
        if drained {
            r.membership.release_lease(r.engine.is_clean()).await;
        }
        info!(volume = %volume_id, "engine stopped");
    }
}

/// Polls until `ready(path)` holds, up to START_TIMEOUT.
async fn wait_for(path: &Path, ready: impl Fn(&Path) -> bool) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    while !ready(path) {
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "{} did not appear within {:?}",
                path.display(),
                START_TIMEOUT
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::FileReplica;

    /// A controller that refuses every renewal (the attachment has moved on).
    struct Refusing;

    #[async_trait]
    impl Membership for Refusing {
        async fn remove_member(&self, _: &str, _: &str) -> Result<(), String> {
            Ok(())
        }
        async fn renew_lease(&self) -> Result<Duration, String> {
            Err("the attachment has moved on".into())
        }
    }

    #[test]
    fn stop_reasons_name_the_cause_and_the_volume() {
        assert_eq!(stop_reason("v1", EngineState::Serving), None);
        let fenced = stop_reason("v1", EngineState::Fenced).unwrap();
        assert!(
            fenced.contains("fenced by a newer attachment on another node")
                && fenced.contains("\"v1\""),
            "{fenced}"
        );
        let expired = stop_reason("v1", EngineState::LeaseExpired).unwrap();
        assert!(
            expired.contains("attachment lease expired") && expired.contains("\"v1\""),
            "{expired}"
        );
        assert!(gone_message("v1").contains("staged again"));
    }

    #[tokio::test]
    async fn the_watcher_sees_an_engine_whose_lease_lapsed() {
        let dir = tempfile::tempdir().unwrap();
        let size = 1 << 20;
        let data = dir.path().join("data");
        std::fs::File::create(&data).unwrap().set_len(size).unwrap();
        let member = FileReplica::open("r1", &data, size).unwrap();
        let config = EngineConfig {
            lease: Duration::from_millis(300),
            renew_interval: Duration::from_millis(50),
            ..EngineConfig::default()
        };
        let engine = Engine::with_config(
            "v1",
            size,
            vec![Arc::new(member)],
            Arc::new(Refusing),
            config,
        )
        .unwrap();
        let renewing = engine.clone();
        let lease = tokio::spawn(async move { renewing.keep_lease(std::future::pending()).await });
        let watcher = tokio::spawn(watch_engine(engine.clone(), Duration::from_millis(20)));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!watcher.is_finished(), "the lease has not lapsed yet");
        let seen = tokio::time::timeout(Duration::from_secs(5), watcher)
            .await
            .expect("the watcher notices within the lease")
            .unwrap();
        assert_eq!(seen, EngineState::LeaseExpired);
        lease.abort();
    }
}
