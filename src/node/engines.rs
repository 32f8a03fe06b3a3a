//! The cluster-mode data path of a staged volume on its node: an engine over the volume's
//! member replicas (sessions opened with the attachment's epoch and token) serving NBD on a
//! unix socket, and nbdfuse exposing that export as one file, over which the node service (`node`) sets up the
//! loop device, filesystem and mounts exactly as for a local replica file. A watcher per
//! engine logs it stopping on its own (fenced, lease expired), which NodeGetVolumeStats
//! reports ([`ClusterLink::health`]); what a dead process left is torn down by
//! `node::reconcile`.

mod follower;
mod membership;
use follower::*;
use membership::*;

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
mod tests;
