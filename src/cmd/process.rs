//! Process plumbing shared by the serving subcommands (`standalone`, `controller`, `node`):
//! the disks given on the command line, the readiness that Probe reports, and serving several
//! servers until SIGINT or SIGTERM with a bounded grace.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use crate::csi::identity;
use crate::model::Disk;
use crate::replica::{self, ReplicaError};
use crate::store::{Store, SETTINGS_KEY};

/// How long a shutdown waits for connected clients before it stops regardless.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A disk given on the command line: `PATH` or `PATH:tag1,tag2`.
#[derive(Debug, Clone)]
pub struct DiskArg {
    pub path: PathBuf,
    pub tags: Vec<String>,
}

impl std::str::FromStr for DiskArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (path, tags) = match s.split_once(':') {
            Some((p, t)) => (
                p,
                t.split(',')
                    .filter(|t| !t.is_empty())
                    .map(str::to_string)
                    .collect(),
            ),
            None => (s, Vec::new()),
        };
        if !path.starts_with('/') {
            return Err(format!("--disk {s:?}: the path must be absolute"));
        }
        Ok(DiskArg {
            path: PathBuf::from(path),
            tags,
        })
    }
}

/// A disk prepared for use: its stable id and how it was given.
#[derive(Debug, Clone)]
pub struct ReadyDisk {
    pub id: String,
    pub arg: DiskArg,
}

/// Prepares every disk (creating its directory and id on first use).
pub fn init_disks(disks: &[DiskArg]) -> Result<Vec<ReadyDisk>, ReplicaError> {
    disks
        .iter()
        .map(|d| {
            let info = replica::init_disk(&d.path)?;
            info!(disk = %info.id, path = %d.path.display(), "disk ready");
            Ok(ReadyDisk {
                id: info.id,
                arg: d.clone(),
            })
        })
        .collect()
}

/// Each disk's (id, directory), as the local agent and the node service take them.
pub fn disk_dirs(disks: &[ReadyDisk]) -> Vec<(String, PathBuf)> {
    disks
        .iter()
        .map(|d| (d.id.clone(), d.arg.path.clone()))
        .collect()
}

/// The disks as they are now, with their capacity read again, as the node reports them.
pub fn read_disks(disks: &[ReadyDisk]) -> Result<Vec<Disk>, ReplicaError> {
    disks
        .iter()
        .map(|d| {
            let info = replica::init_disk(&d.arg.path)?;
            Ok(Disk {
                id: info.id,
                path: d.arg.path.clone(),
                tags: d.arg.tags.clone(),
                schedulable: true,
                storage_maximum: info.storage_maximum,
                storage_available: info.storage_available,
                storage_reserved: 0,
            })
        })
        .collect()
}

/// The ids of the replica directories on these disks. A disk that cannot be listed is
/// logged and skipped.
pub fn replica_ids(disks: &[ReadyDisk]) -> Vec<String> {
    let mut ids = Vec::new();
    for d in disks {
        match replica::list(&d.arg.path) {
            Ok(found) => ids.extend(found.into_iter().map(|r| r.id)),
            Err(e) => {
                warn!(disk = %d.arg.path.display(), error = %e, "listing replicas failed")
            }
        }
    }
    ids
}

/// Probe's answer: ready while the store (where this process has one) answers and every
/// disk's filesystem can be read. Never depends on another process, so that a liveness
/// probe does not restart a node because the controller is away.
pub struct LocalReadiness {
    pub store: Option<Arc<dyn Store>>,
    pub disks: Vec<PathBuf>,
}

#[tonic::async_trait]
impl identity::Readiness for LocalReadiness {
    async fn ready(&self) -> Result<(), String> {
        if let Some(store) = &self.store {
            store
                .settings()
                .get(SETTINGS_KEY)
                .await
                .map_err(|e| format!("store: {e}"))?;
        }
        for d in &self.disks {
            nix::sys::statvfs::statvfs(d).map_err(|e| format!("disk {d:?}: {e}"))?;
        }
        Ok(())
    }
}

/// Why serving stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("serving {name} failed: {source}")]
    Failed {
        name: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{name} stopped on its own, before any signal")]
    EndedEarly { name: &'static str },
    #[error("a server task panicked: {0}")]
    Panicked(String),
}

/// Resolves when the process is shutting down. Hand it to a server as its shutdown future.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// Waits for the shutdown.
    pub async fn wait(mut self) {
        // An error means the sender is gone, which happens only once serving is over.
        let _ = self.0.wait_for(|stopping| *stopping).await;
    }
}

type Run =
    Pin<Box<dyn Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>> + Send>>;

/// One server of a process, named for the logs.
pub struct Server {
    name: &'static str,
    run: Run,
}

impl Server {
    /// A server that runs until its future ends (which it must do once `Shutdown` resolves).
    pub fn new<F, E>(name: &'static str, run: F) -> Server
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
    {
        Server {
            name,
            run: Box::pin(async move { run.await.map_err(|e| Box::new(e) as _) }),
        }
    }
}

/// Runs the servers `make` builds until SIGINT or SIGTERM, or until one of them ends (an
/// error), then tells every one to stop and waits at most [`SHUTDOWN_GRACE`] for them: a
/// wedged client must not keep the process alive until SIGKILL.
pub async fn serve_until_signal(
    make: impl FnOnce(Shutdown) -> Vec<Server>,
) -> Result<(), ServeError> {
    let (stop, stopping) = watch::channel(false);
    let mut running = JoinSet::new();
    for server in make(Shutdown(stopping)) {
        let Server { name, run } = server;
        running.spawn(async move { (name, run.await) });
    }
    let first = tokio::select! {
        _ = shutdown_signal() => None,
        ended = running.join_next() => ended,
    };
    let _ = stop.send(true);
    let mut outcome = match first {
        None => Ok(()),
        Some(Ok((name, Ok(())))) => Err(ServeError::EndedEarly { name }),
        Some(Ok((name, Err(source)))) => Err(ServeError::Failed { name, source }),
        Some(Err(e)) => Err(ServeError::Panicked(e.to_string())),
    };
    if let Err(e) = &outcome {
        error!(error = %e, "stopping every server");
    }
    let drain = async {
        while let Some(done) = running.join_next().await {
            let failure = match done {
                Ok((_, Ok(()))) => continue,
                Ok((name, Err(source))) => ServeError::Failed { name, source },
                Err(e) => ServeError::Panicked(e.to_string()),
            };
            if outcome.is_ok() {
                outcome = Err(failure);
            } else {
                warn!(error = %failure, "another server failed while stopping");
            }
        }
    };
    if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
        warn!(
            "clients still connected {} s after the signal; stopping anyway",
            SHUTDOWN_GRACE.as_secs()
        );
        running.abort_all();
    }
    outcome
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("could not install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
    }
}
