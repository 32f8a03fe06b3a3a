//! Cluster-wide settings with Longhorn's names and defaults, read and changed by name (as
//! `palisade ctl settings` does) with every value validated here.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::params::{
    self, one_of, parse_digits, spelled_enum, DataLocality, RecoveryPolicy, UnknownSpelling,
    MAX_REPLICAS,
};

/// Longhorn's node-down pod deletion policy names.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeDownPodDeletionPolicy {
    DoNothing,
    DeleteStatefulSetPod,
    DeleteDeploymentPod,
    DeleteBothStatefulSetAndDeploymentPod,
}

spelled_enum!(NodeDownPodDeletionPolicy {
    DoNothing => "do-nothing",
    DeleteStatefulSetPod => "delete-statefulset-pod",
    DeleteDeploymentPod => "delete-deployment-pod",
    DeleteBothStatefulSetAndDeploymentPod => "delete-both-statefulset-and-deployment-pod",
});

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct Settings {
    pub default_replica_count: u32,
    pub default_data_locality: DataLocality,
    pub replica_soft_anti_affinity: bool,
    pub replica_zone_soft_anti_affinity: bool,
    pub replica_disk_soft_anti_affinity: bool,
    pub storage_over_provisioning_percentage: u64,
    pub storage_minimal_available_percentage: u64,
    pub allow_volume_creation_with_degraded_availability: bool,
    pub replica_replenishment_wait_interval_seconds: u64,
    pub concurrent_replica_rebuild_per_node_limit: u32,
    pub volume_attachment_recovery_policy: RecoveryPolicy,
    pub node_down_pod_deletion_policy: NodeDownPodDeletionPolicy,
    pub auto_delete_pod_when_volume_detached_unexpectedly: bool,
    /// Palisade's own: seconds a node must have been down before its volumes are fenced and
    /// the StatefulSet and Deployment pods using them are deleted, so that their
    /// replacements start elsewhere with no human; 0 (the default) turns it off.
    #[serde(default)]
    pub node_down_failover_seconds: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            default_replica_count: 3,
            default_data_locality: DataLocality::Disabled,
            replica_soft_anti_affinity: false,
            replica_zone_soft_anti_affinity: true,
            replica_disk_soft_anti_affinity: true,
            storage_over_provisioning_percentage: 100,
            storage_minimal_available_percentage: 25,
            allow_volume_creation_with_degraded_availability: true,
            replica_replenishment_wait_interval_seconds: 600,
            concurrent_replica_rebuild_per_node_limit: 5,
            volume_attachment_recovery_policy: RecoveryPolicy::Wait,
            node_down_pod_deletion_policy: NodeDownPodDeletionPolicy::DoNothing,
            auto_delete_pod_when_volume_detached_unexpectedly: true,
            node_down_failover_seconds: 0,
        }
    }
}

impl params::Defaults for Settings {
    fn replica_count(&self) -> u32 {
        self.default_replica_count
    }
    fn data_locality(&self) -> DataLocality {
        self.default_data_locality
    }
    fn node_soft_anti_affinity(&self) -> bool {
        self.replica_soft_anti_affinity
    }
    fn zone_soft_anti_affinity(&self) -> bool {
        self.replica_zone_soft_anti_affinity
    }
    fn disk_soft_anti_affinity(&self) -> bool {
        self.replica_disk_soft_anti_affinity
    }
}

/// A setting name or value that is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingError {
    #[error("setting {name:?} is not a known setting; known settings: {known}")]
    UnknownSetting { name: String, known: String },
    #[error("setting {name:?}: {value:?} is not accepted; expected {accepted}")]
    BadValue {
        name: String,
        value: String,
        accepted: String,
    },
}

/// `default-replica-count`: 1..=20.
pub const DEFAULT_REPLICA_COUNT: &str = "default-replica-count";
/// `default-data-locality`: disabled | best-effort | strict-local.
pub const DEFAULT_DATA_LOCALITY: &str = "default-data-locality";
/// `replica-soft-anti-affinity`: may two replicas of a volume share a node.
pub const REPLICA_SOFT_ANTI_AFFINITY: &str = "replica-soft-anti-affinity";
/// `replica-zone-soft-anti-affinity`: may two replicas of a volume share a zone.
pub const REPLICA_ZONE_SOFT_ANTI_AFFINITY: &str = "replica-zone-soft-anti-affinity";
/// `replica-disk-soft-anti-affinity`: may two replicas of a volume share a disk.
pub const REPLICA_DISK_SOFT_ANTI_AFFINITY: &str = "replica-disk-soft-anti-affinity";
/// `storage-over-provisioning-percentage`: 0..=10000.
pub const STORAGE_OVER_PROVISIONING_PERCENTAGE: &str = "storage-over-provisioning-percentage";
/// `storage-minimal-available-percentage`: 0..=100.
pub const STORAGE_MINIMAL_AVAILABLE_PERCENTAGE: &str = "storage-minimal-available-percentage";
/// `allow-volume-creation-with-degraded-availability`: true | false.
pub const ALLOW_VOLUME_CREATION_WITH_DEGRADED_AVAILABILITY: &str =
    "allow-volume-creation-with-degraded-availability";
/// `replica-replenishment-wait-interval`: seconds.
pub const REPLICA_REPLENISHMENT_WAIT_INTERVAL: &str = "replica-replenishment-wait-interval";
/// `concurrent-replica-rebuild-per-node-limit`: 0 disables rebuilding, as in Longhorn.
pub const CONCURRENT_REPLICA_REBUILD_PER_NODE_LIMIT: &str =
    "concurrent-replica-rebuild-per-node-limit";
/// `volume-attachment-recovery-policy`: never | wait | immediate.
pub const VOLUME_ATTACHMENT_RECOVERY_POLICY: &str = "volume-attachment-recovery-policy";
/// `node-down-pod-deletion-policy`: see [`NodeDownPodDeletionPolicy`].
pub const NODE_DOWN_POD_DELETION_POLICY: &str = "node-down-pod-deletion-policy";
/// `auto-delete-pod-when-volume-detached-unexpectedly`: true | false.
pub const AUTO_DELETE_POD_WHEN_VOLUME_DETACHED_UNEXPECTEDLY: &str =
    "auto-delete-pod-when-volume-detached-unexpectedly";
/// `node-down-failover-seconds` (Palisade's own, not Longhorn's): 0 (off) or the seconds a
/// node is down before Palisade fences its volumes and deletes their StatefulSet and
/// Deployment pods, at most [`MAX_NODE_DOWN_FAILOVER_SECONDS`].
pub const NODE_DOWN_FAILOVER_SECONDS: &str = "node-down-failover-seconds";

/// Every setting name, Longhorn's spelling, in the order `list` gives them.
pub const NAMES: &[&str] = &[
    DEFAULT_REPLICA_COUNT,
    DEFAULT_DATA_LOCALITY,
    REPLICA_SOFT_ANTI_AFFINITY,
    REPLICA_ZONE_SOFT_ANTI_AFFINITY,
    REPLICA_DISK_SOFT_ANTI_AFFINITY,
    STORAGE_OVER_PROVISIONING_PERCENTAGE,
    STORAGE_MINIMAL_AVAILABLE_PERCENTAGE,
    ALLOW_VOLUME_CREATION_WITH_DEGRADED_AVAILABILITY,
    REPLICA_REPLENISHMENT_WAIT_INTERVAL,
    CONCURRENT_REPLICA_REBUILD_PER_NODE_LIMIT,
    VOLUME_ATTACHMENT_RECOVERY_POLICY,
    NODE_DOWN_POD_DELETION_POLICY,
    AUTO_DELETE_POD_WHEN_VOLUME_DETACHED_UNEXPECTEDLY,
    NODE_DOWN_FAILOVER_SECONDS,
];

/// The largest storage-over-provisioning-percentage accepted (100×): Longhorn sets no upper
/// bound, but a value beyond this is far more likely a typo than an intent.
pub const MAX_OVER_PROVISIONING_PERCENTAGE: u64 = 10_000;

/// The largest node-down-failover-seconds accepted (a day): a failover that waits longer
/// is no failover, and such a value is far more likely a typo (milliseconds) than an intent.
pub const MAX_NODE_DOWN_FAILOVER_SECONDS: u64 = 86_400;

impl Settings {
    /// The value of the setting `name`, as `set` accepts it.
    pub fn get(&self, name: &str) -> Result<String, SettingError> {
        let value = match name {
            DEFAULT_REPLICA_COUNT => self.default_replica_count.to_string(),
            DEFAULT_DATA_LOCALITY => self.default_data_locality.to_string(),
            REPLICA_SOFT_ANTI_AFFINITY => self.replica_soft_anti_affinity.to_string(),
            REPLICA_ZONE_SOFT_ANTI_AFFINITY => self.replica_zone_soft_anti_affinity.to_string(),
            REPLICA_DISK_SOFT_ANTI_AFFINITY => self.replica_disk_soft_anti_affinity.to_string(),
            STORAGE_OVER_PROVISIONING_PERCENTAGE => {
                self.storage_over_provisioning_percentage.to_string()
            }
            STORAGE_MINIMAL_AVAILABLE_PERCENTAGE => {
                self.storage_minimal_available_percentage.to_string()
            }
            ALLOW_VOLUME_CREATION_WITH_DEGRADED_AVAILABILITY => self
                .allow_volume_creation_with_degraded_availability
                .to_string(),
            REPLICA_REPLENISHMENT_WAIT_INTERVAL => {
                self.replica_replenishment_wait_interval_seconds.to_string()
            }
            CONCURRENT_REPLICA_REBUILD_PER_NODE_LIMIT => {
                self.concurrent_replica_rebuild_per_node_limit.to_string()
            }
            VOLUME_ATTACHMENT_RECOVERY_POLICY => self.volume_attachment_recovery_policy.to_string(),
            NODE_DOWN_POD_DELETION_POLICY => self.node_down_pod_deletion_policy.to_string(),
            AUTO_DELETE_POD_WHEN_VOLUME_DETACHED_UNEXPECTEDLY => self
                .auto_delete_pod_when_volume_detached_unexpectedly
                .to_string(),
            NODE_DOWN_FAILOVER_SECONDS => self.node_down_failover_seconds.to_string(),
            _ => return Err(unknown(name)),
        };
        Ok(value)
    }

    /// Sets the setting `name` from its text form (trimmed). On error nothing changes.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), SettingError> {
        let v = value.trim();
        match name {
            DEFAULT_REPLICA_COUNT => {
                self.default_replica_count = number(name, v, 1, Some(u64::from(MAX_REPLICAS)))?
            }
            DEFAULT_DATA_LOCALITY => self.default_data_locality = spelled(name, v)?,
            REPLICA_SOFT_ANTI_AFFINITY => self.replica_soft_anti_affinity = boolean(name, v)?,
            REPLICA_ZONE_SOFT_ANTI_AFFINITY => {
                self.replica_zone_soft_anti_affinity = boolean(name, v)?
            }
            REPLICA_DISK_SOFT_ANTI_AFFINITY => {
                self.replica_disk_soft_anti_affinity = boolean(name, v)?
            }
            STORAGE_OVER_PROVISIONING_PERCENTAGE => {
                self.storage_over_provisioning_percentage =
                    number(name, v, 0, Some(MAX_OVER_PROVISIONING_PERCENTAGE))?
            }
            STORAGE_MINIMAL_AVAILABLE_PERCENTAGE => {
                self.storage_minimal_available_percentage = number(name, v, 0, Some(100))?
            }
            ALLOW_VOLUME_CREATION_WITH_DEGRADED_AVAILABILITY => {
                self.allow_volume_creation_with_degraded_availability = boolean(name, v)?
            }
            REPLICA_REPLENISHMENT_WAIT_INTERVAL => {
                self.replica_replenishment_wait_interval_seconds = number(name, v, 0, None)?
            }
            CONCURRENT_REPLICA_REBUILD_PER_NODE_LIMIT => {
                self.concurrent_replica_rebuild_per_node_limit =
                    number(name, v, 0, Some(u64::from(u32::MAX)))?
            }
            VOLUME_ATTACHMENT_RECOVERY_POLICY => {
                self.volume_attachment_recovery_policy = spelled(name, v)?
            }
            NODE_DOWN_POD_DELETION_POLICY => self.node_down_pod_deletion_policy = spelled(name, v)?,
            AUTO_DELETE_POD_WHEN_VOLUME_DETACHED_UNEXPECTEDLY => {
                self.auto_delete_pod_when_volume_detached_unexpectedly = boolean(name, v)?
            }
            NODE_DOWN_FAILOVER_SECONDS => {
                self.node_down_failover_seconds =
                    number(name, v, 0, Some(MAX_NODE_DOWN_FAILOVER_SECONDS))?
            }
            _ => return Err(unknown(name)),
        }
        Ok(())
    }

    /// Every setting as (name, value), in the order of [`NAMES`].
    pub fn list(&self) -> Vec<(&'static str, String)> {
        NAMES
            .iter()
            .filter_map(|name| self.get(name).ok().map(|value| (*name, value)))
            .collect()
    }
}

fn unknown(name: &str) -> SettingError {
    SettingError::UnknownSetting {
        name: name.to_string(),
        known: NAMES.join(", "),
    }
}

fn bad(name: &str, value: &str, accepted: String) -> SettingError {
    SettingError::BadValue {
        name: name.to_string(),
        value: value.to_string(),
        accepted,
    }
}

/// `true` or `false`, exactly (Longhorn's boolean settings).
fn boolean(name: &str, value: &str) -> Result<bool, SettingError> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(bad(name, value, "true or false".to_string())),
    }
}

/// A decimal integer of at least `min` and at most `max` (if any), in the field's type.
fn number<T: TryFrom<u64>>(
    name: &str,
    value: &str,
    min: u64,
    max: Option<u64>,
) -> Result<T, SettingError> {
    let accepted = || match max {
        Some(max) => format!("an integer from {min} to {max}"),
        None => format!("an integer of at least {min}"),
    };
    parse_digits(value)
        .filter(|n| *n >= min && max.is_none_or(|max| *n <= max))
        .and_then(|n| T::try_from(n).ok())
        .ok_or_else(|| bad(name, value, accepted()))
}

/// One of an enum's Longhorn spellings.
fn spelled<T>(name: &str, value: &str) -> Result<T, SettingError>
where
    T: std::str::FromStr<Err = UnknownSpelling>,
{
    value
        .parse()
        .map_err(|e: UnknownSpelling| bad(name, value, one_of(e.accepted)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_ok(s: &mut Settings, name: &str, value: &str) {
        if let Err(e) = s.set(name, value) {
            panic!("{name}={value} should be accepted: {e}");
        }
    }

    fn set_bad(name: &str, value: &str, accepted_contains: &str) {
        let mut s = Settings::default();
        match s.set(name, value) {
            Err(SettingError::BadValue {
                name: n, accepted, ..
            }) => {
                assert_eq!(n, name);
                assert!(
                    accepted.contains(accepted_contains),
                    "{name}={value}: {accepted:?} should mention {accepted_contains:?}"
                );
            }
            other => panic!("{name}={value}: expected BadValue, got {other:?}"),
        }
        assert_eq!(
            s,
            Settings::default(),
            "a refused value must change nothing"
        );
    }

    #[test]
    fn defaults_are_longhorns() {
        let listed = Settings::default().list();
        let expected = [
            ("default-replica-count", "3"),
            ("default-data-locality", "disabled"),
            ("replica-soft-anti-affinity", "false"),
            ("replica-zone-soft-anti-affinity", "true"),
            ("replica-disk-soft-anti-affinity", "true"),
            ("storage-over-provisioning-percentage", "100"),
            ("storage-minimal-available-percentage", "25"),
            ("allow-volume-creation-with-degraded-availability", "true"),
            ("replica-replenishment-wait-interval", "600"),
            ("concurrent-replica-rebuild-per-node-limit", "5"),
            ("volume-attachment-recovery-policy", "wait"),
            ("node-down-pod-deletion-policy", "do-nothing"),
            ("auto-delete-pod-when-volume-detached-unexpectedly", "true"),
            ("node-down-failover-seconds", "0"),
        ];
        let listed: Vec<(&str, &str)> = listed.iter().map(|(n, v)| (*n, v.as_str())).collect();
        assert_eq!(listed, expected);
    }

    #[test]
    fn every_setting_round_trips_through_set_and_get() {
        let changes = [
            ("default-replica-count", "2"),
            ("default-data-locality", "strict-local"),
            ("replica-soft-anti-affinity", "true"),
            ("replica-zone-soft-anti-affinity", "false"),
            ("replica-disk-soft-anti-affinity", "false"),
            ("storage-over-provisioning-percentage", "250"),
            ("storage-minimal-available-percentage", "10"),
            ("allow-volume-creation-with-degraded-availability", "false"),
            ("replica-replenishment-wait-interval", "0"),
            ("concurrent-replica-rebuild-per-node-limit", "0"),
            ("volume-attachment-recovery-policy", "immediate"),
            (
                "node-down-pod-deletion-policy",
                "delete-both-statefulset-and-deployment-pod",
            ),
            ("auto-delete-pod-when-volume-detached-unexpectedly", "false"),
            ("node-down-failover-seconds", "20"),
        ];
        assert_eq!(changes.len(), NAMES.len());
        let mut s = Settings::default();
        for (name, value) in changes {
            assert_ne!(s.get(name).as_deref(), Ok(value), "{name} must change");
            set_ok(&mut s, name, &format!(" {value} "));
            assert_eq!(s.get(name).as_deref(), Ok(value));
        }
        assert_eq!(s.default_replica_count, 2);
        assert_eq!(s.default_data_locality, DataLocality::StrictLocal);
        assert!(s.replica_soft_anti_affinity);
        assert_eq!(s.storage_over_provisioning_percentage, 250);
        assert_eq!(
            s.node_down_pod_deletion_policy,
            NodeDownPodDeletionPolicy::DeleteBothStatefulSetAndDeploymentPod
        );
    }

    #[test]
    fn ranges_are_enforced_at_their_bounds() {
        let mut s = Settings::default();
        set_ok(&mut s, "default-replica-count", "1");
        set_ok(&mut s, "default-replica-count", "20");
        set_bad("default-replica-count", "0", "1 to 20");
        set_bad("default-replica-count", "21", "1 to 20");
        set_ok(&mut s, "storage-minimal-available-percentage", "0");
        set_ok(&mut s, "storage-minimal-available-percentage", "100");
        set_bad("storage-minimal-available-percentage", "101", "0 to 100");
        set_ok(&mut s, "storage-over-provisioning-percentage", "0");
        set_ok(&mut s, "storage-over-provisioning-percentage", "10000");
        set_bad(
            "storage-over-provisioning-percentage",
            "10001",
            "0 to 10000",
        );
        set_bad("storage-over-provisioning-percentage", "-1", "0 to 10000");
        set_bad("replica-replenishment-wait-interval", "10m", "at least 0");
        set_bad(
            "concurrent-replica-rebuild-per-node-limit",
            "4294967296",
            "0 to 4294967295",
        );
        set_ok(&mut s, "node-down-failover-seconds", "0");
        set_ok(&mut s, "node-down-failover-seconds", "86400");
        set_bad("node-down-failover-seconds", "86401", "0 to 86400");
        set_bad("node-down-failover-seconds", "30s", "0 to 86400");
        set_bad("node-down-failover-seconds", "-1", "0 to 86400");
    }

    /// Settings stored before node-down-failover-seconds existed still decode, with it off.
    #[test]
    fn settings_stored_without_the_failover_setting_decode_with_it_off() {
        let mut stored = serde_json::to_value(Settings::default()).unwrap();
        stored
            .as_object_mut()
            .unwrap()
            .remove("node_down_failover_seconds");
        let decoded: Settings = serde_json::from_value(stored).unwrap();
        assert_eq!(decoded.node_down_failover_seconds, 0);
    }

    #[test]
    fn bad_values_name_the_accepted_ones() {
        set_bad("replica-soft-anti-affinity", "yes", "true or false");
        set_bad("replica-soft-anti-affinity", "True", "true or false");
        set_bad(
            "default-data-locality",
            "local",
            "disabled, best-effort or strict-local",
        );
        set_bad(
            "volume-attachment-recovery-policy",
            "Wait",
            "never, wait or immediate",
        );
        set_bad(
            "node-down-pod-deletion-policy",
            "delete",
            "do-nothing, delete-statefulset-pod, delete-deployment-pod or \
             delete-both-statefulset-and-deployment-pod",
        );
        let mut s = Settings::default();
        let e = s
            .set("replica-soft-anti-affinity", "yes")
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some(
                "setting \"replica-soft-anti-affinity\": \"yes\" is not accepted; \
                 expected true or false"
            )
        );
    }

    #[test]
    fn unknown_names_are_refused_with_the_list() {
        let mut s = Settings::default();
        for result in [
            s.get("default-replica-counts").map(|_| ()),
            s.set("default-replica-counts", "3"),
        ] {
            match result {
                Err(SettingError::UnknownSetting { name, known }) => {
                    assert_eq!(name, "default-replica-counts");
                    assert!(known.contains("default-replica-count,"), "{known}");
                }
                other => panic!("expected UnknownSetting, got {other:?}"),
            }
        }
    }

    #[test]
    fn list_covers_every_name() {
        let listed: Vec<&str> = Settings::default()
            .list()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(listed, NAMES);
    }
}
