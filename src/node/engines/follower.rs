//! The follower of a running engine: every couple of seconds it reads the volume from the
//! store and converges the engine to it (members added as rebuilding targets and rebuilt,
//! retired ones forgotten, the size grown), reporting rebuild progress to the controller.

use super::*;

/// Watches an engine until it stops serving on its own (fenced, or its lease lapsed), logs
/// that as an error naming the volume and the reason, and returns the state it saw.
/// Opens a session on one replica: in process when it is `node_id`'s, else over TCP.
pub(super) async fn open_replica(
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
pub(super) fn holding(opened: Result<(Member, u64), String>, size: u64) -> Result<Member, String> {
    match opened? {
        (_, held) if held < size => Err(format!(
            "it holds {held} bytes, less than the volume's {size}"
        )),
        (member, _) => Ok(member),
    }
}

/// How often an engine's node looks for replicas to rebuild and reports progress.
pub(super) const FOLLOW_INTERVAL: Duration = Duration::from_secs(2);

/// Follows the volume's replicas in the store for its engine: starts rebuilding each
/// replica the controller marked `rebuilding` (in process when local), reports the rebuilds'
/// progress and outcome, and drops members the store no longer counts (retired replicas).
pub(super) struct Follower {
    pub(super) control: ControlClient,
    pub(super) local: Option<LocalReplicas>,
    pub(super) node_id: String,
    pub(super) timeout: Duration,
    pub(super) engine: Engine,
    pub(super) epoch: u64,
    pub(super) token: String,
}

impl Follower {
    pub(super) async fn run(self) {
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

    pub(super) async fn report(
        &self,
        volume_id: &str,
        reports: &[RebuildStatus],
    ) -> Result<(), String> {
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
pub(super) fn failed_start(replica: &str, why: String) -> RebuildStatus {
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
