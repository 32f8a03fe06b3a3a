//! `palisade ctl`: the operator's view of the cluster (nodes, volumes, replicas, attachments,
//! settings) and levers (settings, force-detach), through the controller's ControlPlane API,
//! printed as aligned tables or, with `--json`, as JSON. Its calls carry the API credential
//! derived from the cluster secret (`--secret-file`, or `--secret-from-kubernetes`).

use crate::scheduler::human;
use std::io::{self, Write};
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::rpc::v1 as pb;
use crate::rpc::{Auth, ControlClient};

/// `palisade ctl` and its options.
#[derive(Debug, clap::Args)]
pub struct CtlArgs {
    /// The controller's ControlPlane address.
    #[arg(
        long,
        global = true,
        env = "PALISADE_CONTROLLER",
        default_value = "http://127.0.0.1:9500"
    )]
    pub controller: String,
    /// A copy of the controller's cluster secret (its <state-dir>/cluster.secret).
    #[arg(
        long,
        global = true,
        env = "PALISADE_SECRET_FILE",
        default_value = crate::cmd::DEFAULT_SECRET_FILE
    )]
    pub secret_file: PathBuf,
    #[command(flatten)]
    pub kubernetes: crate::cmd::KubernetesArgs,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// Seconds to wait for the controller.
    #[arg(long, global = true, default_value_t = 10)]
    pub timeout_seconds: u64,
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// What `palisade ctl` shows or does.
#[derive(Debug, clap::Subcommand)]
pub enum CtlCommand {
    /// Nodes: health (up or down, and the last heartbeat's age), zone, disks, free and
    /// scheduled space.
    Nodes,
    /// Volumes: size, state, replicas (node:state), attachment node and epoch, why degraded.
    Volumes,
    /// One volume in detail (`volume NAME`, by id or CSI name), or `volume detach --force NAME`.
    Volume(VolumeArgs),
    /// Cluster settings: all of them, `get NAME` or `set NAME VALUE`.
    Settings {
        #[command(subcommand)]
        action: Option<SettingsAction>,
    },
}

/// `palisade ctl volume`.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct VolumeArgs {
    /// The volume's id or CSI name.
    pub name: Option<String>,
    #[command(subcommand)]
    pub action: Option<VolumeAction>,
}

/// What `palisade ctl volume` does to a volume.
#[derive(Debug, clap::Subcommand)]
pub enum VolumeAction {
    /// Releases the volume's attachment without its node, for the `never` recovery policy.
    /// The next attachment gets a higher epoch, which fences the released node.
    Detach {
        /// Required: the node is not asked, so make sure it no longer uses the volume.
        #[arg(long)]
        force: bool,
        /// The volume's id or CSI name.
        name: String,
    },
    /// Changes the volume's numberOfReplicas and/or dataLocality; the controller then adds
    /// and rebuilds or retires replicas (while the volume is attached).
    Set {
        /// The volume's id or CSI name.
        name: String,
        /// The new numberOfReplicas (1 to 20).
        #[arg(long)]
        replicas: Option<u32>,
        /// The new dataLocality: disabled or best-effort.
        #[arg(long)]
        data_locality: Option<String>,
    },
}

/// `palisade ctl settings` actions.
#[derive(Debug, clap::Subcommand)]
pub enum SettingsAction {
    /// Prints one setting's value.
    Get { name: String },
    /// Changes one setting (validated by the controller).
    Set { name: String, value: String },
}

/// Why `palisade ctl` failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("controller address {address:?}: {source}")]
    Address {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("reading the cluster secret (--secret-file {path:?}) failed: {source}; give the path of a copy of the controller's secret file (<controller state dir>/cluster.secret) with --secret-file")]
    Secret {
        path: PathBuf,
        #[source]
        source: crate::replica::token::SecretError,
    },
    #[error(transparent)]
    KubernetesSecret(#[from] crate::k8s::secret::SecretError),
    #[error(transparent)]
    Kubernetes(#[from] crate::k8s::connection::ConnectionError),
    #[error("the Secret {name:?} does not exist (yet): `palisade controller --secret-from-kubernetes {name}` creates it")]
    NoSecret { name: String },
    #[error("{what} failed ({code:?}, controller {controller}): {message}")]
    Rpc {
        what: &'static str,
        controller: String,
        code: tonic::Code,
        message: String,
    },
    #[error("{0}")]
    Usage(String),
    #[error("writing the output failed: {0}")]
    Output(#[from] io::Error),
    #[error("encoding JSON failed: {0}")]
    Json(#[from] serde_json::Error),
}

/// The cluster secret from the Secret `name`, which must exist.
async fn kubernetes_secret(
    name: &str,
    connection: &crate::k8s::connection::Connection,
) -> Result<Vec<u8>, CtlError> {
    let client = connection.client().await?;
    let namespace = connection.namespace()?;
    crate::k8s::secret::ClusterSecret::new(client, &namespace, name)
        .read()
        .await?
        .ok_or_else(|| CtlError::NoSecret {
            name: name.to_string(),
        })
}

/// Runs one `palisade ctl` command, printing to `out`.
pub async fn run(args: CtlArgs, out: &mut dyn Write) -> Result<(), CtlError> {
    let timeout = Duration::from_secs(args.timeout_seconds.max(1));
    let secret = match args.kubernetes.secret_source(args.secret_file.clone()) {
        crate::cmd::SecretSource::File(path) => crate::replica::token::read_secret_file(&path)
            .map_err(|source| CtlError::Secret { path, source })?,
        crate::cmd::SecretSource::Kubernetes { name, connection } => {
            kubernetes_secret(&name, &connection).await?
        }
    };
    let channel =
        crate::rpc::channel(&args.controller, timeout).map_err(|source| CtlError::Address {
            address: args.controller.clone(),
            source,
        })?;
    let ctl = Ctl {
        client: crate::rpc::control_client(channel, Auth::new(&secret)),
        controller: args.controller.clone(),
        json: args.json,
    };
    match args.command {
        CtlCommand::Nodes => ctl.nodes(out).await,
        CtlCommand::Volumes => ctl.volumes(out).await,
        CtlCommand::Volume(VolumeArgs {
            action: Some(VolumeAction::Detach { force, name }),
            ..
        }) => {
            if !force {
                return Err(CtlError::Usage(format!(
                    "volume detach releases volume {name:?} without asking its node; add --force if that node is down or no longer uses the volume (otherwise unpublish it through the CO)"
                )));
            }
            ctl.force_detach(&name, out).await
        }
        CtlCommand::Volume(VolumeArgs {
            action:
                Some(VolumeAction::Set {
                    name,
                    replicas,
                    data_locality,
                }),
            ..
        }) => {
            if replicas == Some(0) {
                return Err(CtlError::Usage("--replicas must be 1 to 20".to_string()));
            }
            if replicas.is_none() && data_locality.is_none() {
                return Err(CtlError::Usage(
                    "volume set needs --replicas N and/or --data-locality MODE".to_string(),
                ));
            }
            ctl.update_volume(&name, replicas, data_locality, out).await
        }
        CtlCommand::Volume(VolumeArgs {
            name: Some(name),
            action: None,
        }) => ctl.volume(&name, out).await,
        CtlCommand::Volume(VolumeArgs {
            name: None,
            action: None,
        }) => Err(CtlError::Usage(
            "volume: give a volume id or name (`volume NAME`), or `volume detach --force NAME`"
                .to_string(),
        )),
        CtlCommand::Settings { action: None } => ctl.settings(out).await,
        CtlCommand::Settings {
            action: Some(SettingsAction::Get { name }),
        } => ctl.setting(&name, out).await,
        CtlCommand::Settings {
            action: Some(SettingsAction::Set { name, value }),
        } => ctl.set_setting(name, value, out).await,
    }
}

struct Ctl {
    client: ControlClient,
    controller: String,
    json: bool,
}

impl Ctl {
    fn failed(&self, what: &'static str) -> impl FnOnce(tonic::Status) -> CtlError + '_ {
        move |s| CtlError::Rpc {
            what,
            controller: self.controller.clone(),
            code: s.code(),
            message: crate::rpc::message(&s),
        }
    }

    fn print_json(&self, out: &mut dyn Write, value: &impl Serialize) -> Result<(), CtlError> {
        serde_json::to_writer_pretty(&mut *out, value)?;
        writeln!(out)?;
        Ok(())
    }

    async fn nodes(&self, out: &mut dyn Write) -> Result<(), CtlError> {
        let reply = self
            .client
            .clone()
            .list_nodes(pb::ListNodesRequest {})
            .await
            .map_err(self.failed("listing nodes"))?
            .into_inner();
        let nodes: Vec<NodeJson> = reply.nodes.into_iter().map(NodeJson::from).collect();
        if self.json {
            return self.print_json(out, &nodes);
        }
        let rows = nodes
            .iter()
            .map(|n| {
                vec![
                    n.id.clone(),
                    format!("{} ({})", n.health, age(n.heartbeat_age_ms)),
                    n.zone.clone().unwrap_or_else(|| "-".to_string()),
                    n.disks.len().to_string(),
                    human(n.storage_available),
                    human(n.storage_scheduled),
                    human(n.storage_maximum),
                    if n.schedulable { "yes" } else { "no" }.to_string(),
                    n.agent_address.clone(),
                    dash(&n.replica_address),
                ]
            })
            .collect();
        table(
            out,
            &[
                "ID",
                "HEALTH",
                "ZONE",
                "DISKS",
                "FREE",
                "SCHEDULED",
                "SIZE",
                "SCHEDULABLE",
                "AGENT",
                "REPLICA-SERVER",
            ],
            rows,
        )
    }

    async fn volumes(&self, out: &mut dyn Write) -> Result<(), CtlError> {
        let reply = self
            .client
            .clone()
            .list_volumes(pb::ListVolumesRequest {})
            .await
            .map_err(self.failed("listing volumes"))?
            .into_inner();
        let volumes: Vec<VolumeJson> = reply.volumes.into_iter().map(VolumeJson::from).collect();
        if self.json {
            return self.print_json(out, &volumes);
        }
        let rows = volumes
            .iter()
            .map(|v| {
                let replicas: Vec<String> = v
                    .replicas
                    .iter()
                    .map(|r| match &r.rebuild {
                        Some(p) => format!("{}:{}({})", r.node_id, r.state, p.describe()),
                        None => format!("{}:{}", r.node_id, r.state),
                    })
                    .collect();
                vec![
                    v.id.clone(),
                    human(v.size),
                    v.state.clone(),
                    format!("{}/{}", v.replicas.len(), v.number_of_replicas),
                    if replicas.is_empty() {
                        "-".to_string()
                    } else {
                        replicas.join(",")
                    },
                    v.attachment
                        .as_ref()
                        .map_or("-".to_string(), |a| a.node_id.clone()),
                    v.epoch.to_string(),
                    v.degraded_reason.clone().unwrap_or_else(|| "-".to_string()),
                ]
            })
            .collect();
        table(
            out,
            &[
                "ID", "SIZE", "STATE", "COUNT", "REPLICAS", "ATTACHED", "EPOCH", "DEGRADED",
            ],
            rows,
        )
    }

    async fn volume(&self, name: &str, out: &mut dyn Write) -> Result<(), CtlError> {
        let v = self
            .client
            .clone()
            .get_volume(pb::GetVolumeRequest {
                volume: name.to_string(),
            })
            .await
            .map_err(self.failed("reading the volume"))?
            .into_inner();
        let v = VolumeJson::from(v);
        if self.json {
            return self.print_json(out, &v);
        }
        let attachment = match &v.attachment {
            Some(a) => format!(
                "{} (epoch {}, {}, for {})",
                a.node_id,
                a.epoch,
                if a.readonly {
                    "read-only"
                } else {
                    "read-write"
                },
                age(crate::model::now_ms().saturating_sub(a.since_ms))
            ),
            None => "-".to_string(),
        };
        let fields = [
            ("Volume", v.id.clone()),
            ("Name", v.name.clone()),
            ("Size", format!("{} ({} bytes)", human(v.size), v.size)),
            ("State", v.state.clone()),
            (
                "Replicas",
                format!("{} of {} asked", v.replicas.len(), v.number_of_replicas),
            ),
            ("Attached", attachment),
            ("Epoch", v.epoch.to_string()),
            ("Recovery", v.recovery_policy.clone()),
            ("Locality", v.data_locality.clone()),
            (
                "Degraded",
                v.degraded_reason.clone().unwrap_or_else(|| "-".to_string()),
            ),
        ];
        for (k, value) in fields {
            writeln!(out, "{:<10}{value}", format!("{k}:"))?;
        }
        writeln!(out)?;
        let rows = v
            .replicas
            .iter()
            .map(|r| {
                vec![
                    r.id.clone(),
                    r.node_id.clone(),
                    if r.node_up { "up" } else { "down" }.to_string(),
                    r.disk_id.clone(),
                    match &r.rebuild {
                        Some(p) => format!("{} {}", r.state, p.describe()),
                        None => r.state.clone(),
                    },
                    dash(&r.node_address),
                    r.path.clone(),
                ]
            })
            .collect();
        table(
            out,
            &[
                "REPLICA", "NODE", "HEALTH", "DISK", "STATE", "ADDRESS", "PATH",
            ],
            rows,
        )
    }

    async fn settings(&self, out: &mut dyn Write) -> Result<(), CtlError> {
        let reply = self
            .client
            .clone()
            .get_settings(pb::GetSettingsRequest {
                name: String::new(),
            })
            .await
            .map_err(self.failed("reading the settings"))?
            .into_inner();
        let settings: Vec<SettingJson> =
            reply.settings.into_iter().map(SettingJson::from).collect();
        if self.json {
            return self.print_json(out, &settings);
        }
        let rows = settings
            .into_iter()
            .map(|s| vec![s.name, s.value])
            .collect();
        table(out, &["NAME", "VALUE"], rows)
    }

    async fn setting(&self, name: &str, out: &mut dyn Write) -> Result<(), CtlError> {
        let reply = self
            .client
            .clone()
            .get_settings(pb::GetSettingsRequest {
                name: name.to_string(),
            })
            .await
            .map_err(self.failed("reading the setting"))?
            .into_inner();
        let Some(setting) = reply.settings.into_iter().next().map(SettingJson::from) else {
            return Err(CtlError::Usage(format!(
                "the controller returned no value for setting {name:?}"
            )));
        };
        if self.json {
            return self.print_json(out, &setting);
        }
        writeln!(out, "{}", setting.value)?;
        Ok(())
    }

    async fn set_setting(
        &self,
        name: String,
        value: String,
        out: &mut dyn Write,
    ) -> Result<(), CtlError> {
        let setting = self
            .client
            .clone()
            .set_setting(pb::SetSettingRequest { name, value })
            .await
            .map_err(self.failed("changing the setting"))?
            .into_inner();
        let setting = SettingJson::from(setting);
        if self.json {
            return self.print_json(out, &setting);
        }
        writeln!(out, "{} = {}", setting.name, setting.value)?;
        Ok(())
    }

    async fn update_volume(
        &self,
        name: &str,
        replicas: Option<u32>,
        data_locality: Option<String>,
        out: &mut dyn Write,
    ) -> Result<(), CtlError> {
        self.client
            .clone()
            .update_volume(pb::UpdateVolumeRequest {
                volume: name.to_string(),
                number_of_replicas: replicas.unwrap_or(0),
                data_locality: data_locality.unwrap_or_default(),
            })
            .await
            .map_err(self.failed("updating the volume"))?;
        self.volume(name, out).await
    }

    async fn force_detach(&self, name: &str, out: &mut dyn Write) -> Result<(), CtlError> {
        let reply = self
            .client
            .clone()
            .force_detach(pb::ForceDetachRequest {
                volume: name.to_string(),
            })
            .await
            .map_err(self.failed("force-detaching the volume"))?
            .into_inner();
        let result = DetachJson {
            volume_id: reply.volume_id,
            released: reply.released.map(AttachmentJson::from),
        };
        if self.json {
            return self.print_json(out, &result);
        }
        match &result.released {
            Some(a) => writeln!(
                out,
                "released volume {} from node {} (epoch {}); its next attachment gets a higher epoch, which fences that node",
                result.volume_id,
                a.node_id,
                a.epoch
            )?,
            None => writeln!(out, "volume {} was not attached", result.volume_id)?,
        }
        Ok(())
    }
}

/// Prints rows under headers in columns as wide as their widest cell.
fn table(out: &mut dyn Write, headers: &[&str], rows: Vec<Vec<String>>) -> Result<(), CtlError> {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

/// A duration for people: "850ms", "12s", "3m04s", "2h05m".
fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0 => format!("{ms}ms"),
        1..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_string()
    } else {
        s.to_string()
    }
}

fn non_empty(s: String) -> Option<String> {
    Some(s).filter(|s| !s.is_empty())
}

/// A node as `ctl nodes --json` prints it.
#[derive(Debug, Serialize)]
pub struct NodeJson {
    pub id: String,
    /// "up" or "down".
    pub health: &'static str,
    pub up: bool,
    pub heartbeat_age_ms: u64,
    pub zone: Option<String>,
    pub tags: Vec<String>,
    pub schedulable: bool,
    pub agent_address: String,
    pub replica_address: String,
    /// Sums over the node's disks.
    pub storage_maximum: u64,
    pub storage_available: u64,
    pub storage_scheduled: u64,
    pub disks: Vec<DiskJson>,
}

/// A disk of a [`NodeJson`].
#[derive(Debug, Serialize)]
pub struct DiskJson {
    pub id: String,
    pub path: String,
    pub tags: Vec<String>,
    pub schedulable: bool,
    pub storage_maximum: u64,
    pub storage_available: u64,
    pub storage_reserved: u64,
    pub storage_scheduled: u64,
}

impl From<pb::NodeStatus> for NodeJson {
    fn from(n: pb::NodeStatus) -> Self {
        let disks: Vec<DiskJson> = n
            .disks
            .into_iter()
            .map(|d| DiskJson {
                id: d.id,
                path: d.path,
                tags: d.tags,
                schedulable: d.schedulable,
                storage_maximum: d.storage_maximum,
                storage_available: d.storage_available,
                storage_reserved: d.storage_reserved,
                storage_scheduled: d.storage_scheduled,
            })
            .collect();
        let sum = |f: fn(&DiskJson) -> u64| disks.iter().map(f).fold(0u64, u64::saturating_add);
        NodeJson {
            id: n.id,
            health: if n.up { "up" } else { "down" },
            up: n.up,
            heartbeat_age_ms: n.heartbeat_age_ms,
            zone: non_empty(n.zone),
            tags: n.tags,
            schedulable: n.schedulable,
            agent_address: n.agent_address,
            replica_address: n.replica_address,
            storage_maximum: sum(|d| d.storage_maximum),
            storage_available: sum(|d| d.storage_available),
            storage_scheduled: sum(|d| d.storage_scheduled),
            disks,
        }
    }
}

/// A volume as `ctl volumes --json` and `ctl volume NAME --json` print it.
#[derive(Debug, Serialize)]
pub struct VolumeJson {
    pub id: String,
    pub name: String,
    pub size: u64,
    pub state: String,
    pub number_of_replicas: u32,
    pub replicas: Vec<ReplicaJson>,
    pub attachment: Option<AttachmentJson>,
    pub epoch: u64,
    pub degraded_reason: Option<String>,
    pub recovery_policy: String,
    pub data_locality: String,
    pub created_ms: u64,
}

/// A replica of a [`VolumeJson`].
#[derive(Debug, Serialize)]
pub struct ReplicaJson {
    pub id: String,
    pub node_id: String,
    pub node_up: bool,
    pub node_address: String,
    pub disk_id: String,
    pub path: String,
    pub size: u64,
    pub state: String,
    /// While it is rebuilt: the engine's last progress report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<RebuildJson>,
}

/// A rebuild's progress.
#[derive(Debug, Serialize)]
pub struct RebuildJson {
    pub done: u64,
    pub size: u64,
    pub copied: u64,
    pub bytes_per_second: f64,
    pub eta_seconds: Option<u64>,
}

impl RebuildJson {
    /// "37% 120 MiB/s eta 8s".
    fn describe(&self) -> String {
        let pct = self
            .done
            .saturating_mul(100)
            .checked_div(self.size)
            .unwrap_or(0);
        let mut text = format!("{pct}% {}/s", human(self.bytes_per_second as u64));
        if let Some(eta) = self.eta_seconds {
            text.push_str(&format!(" eta {eta}s"));
        }
        text
    }
}

/// A volume's attachment.
#[derive(Debug, Serialize)]
pub struct AttachmentJson {
    pub node_id: String,
    pub epoch: u64,
    pub readonly: bool,
    pub since_ms: u64,
}

impl From<pb::AttachmentStatus> for AttachmentJson {
    fn from(a: pb::AttachmentStatus) -> Self {
        AttachmentJson {
            node_id: a.node_id,
            epoch: a.epoch,
            readonly: a.readonly,
            since_ms: a.since_ms,
        }
    }
}

impl From<pb::VolumeStatus> for VolumeJson {
    fn from(v: pb::VolumeStatus) -> Self {
        VolumeJson {
            id: v.id,
            name: v.name,
            size: v.size,
            state: v.state,
            number_of_replicas: v.number_of_replicas,
            replicas: v
                .replicas
                .into_iter()
                .map(|r| ReplicaJson {
                    id: r.id,
                    node_id: r.node_id,
                    node_up: r.node_up,
                    node_address: r.node_address,
                    disk_id: r.disk_id,
                    path: r.path,
                    size: r.size,
                    state: r.state,
                    rebuild: r.rebuild.map(|p| RebuildJson {
                        done: p.done,
                        size: p.size,
                        copied: p.copied,
                        bytes_per_second: p.bytes_per_second,
                        eta_seconds: (p.eta_seconds > 0).then_some(p.eta_seconds),
                    }),
                })
                .collect(),
            attachment: v.attachment.map(AttachmentJson::from),
            epoch: v.epoch,
            degraded_reason: non_empty(v.degraded_reason),
            recovery_policy: v.recovery_policy,
            data_locality: v.data_locality,
            created_ms: v.created_ms,
        }
    }
}

/// One setting.
#[derive(Debug, Serialize)]
pub struct SettingJson {
    pub name: String,
    pub value: String,
}

impl From<pb::Setting> for SettingJson {
    fn from(s: pb::Setting) -> Self {
        SettingJson {
            name: s.name,
            value: s.value,
        }
    }
}

/// What `ctl volume detach --force --json` prints.
#[derive(Debug, Serialize)]
pub struct DetachJson {
    pub volume_id: String,
    /// None when the volume was not attached.
    pub released: Option<AttachmentJson>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_their_columns() {
        let mut out = Vec::new();
        table(
            &mut out,
            &["ID", "HEALTH", "ZONE"],
            vec![
                vec!["node-1".into(), "up (1s)".into(), "-".into()],
                vec!["n2".into(), "down (12s)".into(), "z1".into()],
            ],
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "ID      HEALTH      ZONE\nnode-1  up (1s)     -\nn2      down (12s)  z1\n"
        );
    }

    #[test]
    fn ages_read_well() {
        assert_eq!(age(850), "850ms");
        assert_eq!(age(12_400), "12s");
        assert_eq!(age(184_000), "3m04s");
        assert_eq!(age(7_500_000), "2h05m");
    }
}
