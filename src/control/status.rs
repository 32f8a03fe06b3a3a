//! The operator's views and levers beyond nodes: volumes with their replicas as
//! `palisade ctl volumes` shows them, and changing a setting.

use super::*;

/// A volume with its replicas, as `palisade ctl volumes` shows it.
#[derive(Debug, Clone)]
pub struct VolumeStatus {
    pub volume: Arc<Volume>,
    /// Ordered by replica id.
    pub replicas: Vec<ReplicaStatus>,
}

/// One replica of a [`VolumeStatus`].
#[derive(Debug, Clone)]
pub struct ReplicaStatus {
    pub replica: Arc<Replica>,
    /// True for a replica only planned with a volume still `Creating` (not recorded yet).
    pub planned: bool,
}

/// Why a setting could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum SettingUpdateError {
    #[error(transparent)]
    Setting(#[from] crate::settings::SettingError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A volume with its recorded replicas and, while it is `Creating`, its planned ones.
pub(super) fn volume_status_of(volume: Arc<Volume>, recorded: Vec<Arc<Replica>>) -> VolumeStatus {
    let mut replicas: Vec<ReplicaStatus> = recorded
        .into_iter()
        .map(|replica| ReplicaStatus {
            replica,
            planned: false,
        })
        .collect();
    if volume.state == VolumeState::Creating {
        for p in &volume.planned_replicas {
            if !replicas.iter().any(|r| r.replica.id == p.id) {
                replicas.push(ReplicaStatus {
                    replica: Arc::new(p.clone()),
                    planned: true,
                });
            }
        }
    }
    replicas.sort_by(|a, b| a.replica.id.cmp(&b.replica.id));
    VolumeStatus { volume, replicas }
}

impl Controller {
    /// Every volume, in any state, with its replicas, ordered by id.
    pub async fn volume_statuses(&self) -> Result<Vec<VolumeStatus>, StoreError> {
        let mut by_volume: HashMap<String, Vec<Arc<Replica>>> = HashMap::new();
        for r in self.store.replicas().list().await? {
            by_volume
                .entry(r.value.volume_id.clone())
                .or_default()
                .push(r.value);
        }
        Ok(self
            .store
            .volumes()
            .list()
            .await?
            .into_iter()
            .map(|v| {
                let replicas = by_volume.remove(&v.value.id).unwrap_or_default();
                volume_status_of(v.value, replicas)
            })
            .collect())
    }

    /// One volume with its replicas, if it exists.
    pub async fn volume_status(&self, id: &str) -> Result<Option<VolumeStatus>, StoreError> {
        let Some(volume) = self.store.volumes().get(id).await? else {
            return Ok(None);
        };
        let replicas = self
            .volume_replicas(id)
            .await?
            .into_iter()
            .map(|r| r.value)
            .collect();
        Ok(Some(volume_status_of(volume.value, replicas)))
    }

    /// Changes one setting (validated by [`Settings::set`]) with a compare-and-swap that
    /// retries when another writer raced it. Returns the settings afterwards.
    pub async fn set_setting(
        &self,
        name: &str,
        value: &str,
    ) -> Result<Settings, SettingUpdateError> {
        for _ in 0..CAS_ATTEMPTS {
            let current = self.store.settings().get(SETTINGS_KEY).await?;
            let mut settings = current
                .as_ref()
                .map(|c| (*c.value).clone())
                .unwrap_or_default();
            settings.set(name, value)?;
            match self
                .store
                .settings()
                .put(SETTINGS_KEY, settings.clone(), current.map(|c| c.version))
                .await
            {
                Ok(_) => {
                    info!(setting = %name, value = %value.trim(), "setting changed");
                    return Ok(settings);
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(SettingUpdateError::Store(StoreError::Conflict {
            kind: "settings",
            key: SETTINGS_KEY.to_string(),
            expected: None,
        }))
    }
}
