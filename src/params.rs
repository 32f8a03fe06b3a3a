//! StorageClass parameters: parsed once, here, into a typed struct. A bad value or an
//! unknown key is an error that names the key and what it accepts.
//!
//! Keys and values use Longhorn's spellings so that existing Longhorn StorageClasses carry
//! over. Values are trimmed; enum values match case-sensitively, as Longhorn spells them.
//! Longhorn parameters that Palisade does not implement yet are refused by name
//! ([`ParamError::Unsupported`]), except when their value asks for exactly what Palisade
//! does anyway (see [`NEUTRAL_VALUES`]): Longhorn's own default StorageClass carries
//! `fromBackup: ""`, `dataEngine: "v1"`, `disableRevisionCounter: "true"`,
//! `unmapMarkSnapChainRemoved: "ignored"` and `backupTargetName: "default"`, and refusing
//! those would refuse every class copied from it while ignoring nothing.
//!
//! The anti-affinity values are only `ignored`, `enabled` and `disabled`, as Longhorn's own
//! validation has it; `true` and `false` are refused with a message that names the accepted
//! spellings, so that a class never means something different here than in Longhorn.
//!
//! `fsType` (and `csi.storage.k8s.io/fstype`, should a CO pass it through) is validated
//! (ext4 or xfs) and returned in [`Parsed::fs_type`], not kept in [`VolumeParams`]:
//! external-provisioner already turns it into the volume capability's fs_type, which is
//! what the node formats with.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Declares, for a fieldless enum, its Longhorn spellings: `as_str`, `SPELLINGS`, `Display`
/// and a `FromStr` whose error lists every accepted spelling.
macro_rules! spelled_enum {
    ($ty:ident { $($variant:ident => $spelling:literal),+ $(,)? }) => {
        impl $ty {
            /// Every value, as Longhorn spells it.
            pub const SPELLINGS: &'static [&'static str] = &[$($spelling),+];

            /// Longhorn's spelling of this value.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $spelling),+
                }
            }
        }

        impl ::std::fmt::Display for $ty {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::std::str::FromStr for $ty {
            type Err = $crate::params::UnknownSpelling;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($spelling => Ok($ty::$variant),)+
                    _ => Err($crate::params::UnknownSpelling {
                        value: s.to_string(),
                        accepted: Self::SPELLINGS,
                    }),
                }
            }
        }
    };
}
pub(crate) use spelled_enum;

/// A value that is not one of an enum's spellings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not one of {}", one_of(accepted))]
pub struct UnknownSpelling {
    pub value: String,
    pub accepted: &'static [&'static str],
}

/// "a, b or c", for messages that list accepted values.
pub(crate) fn one_of(accepted: &[&str]) -> String {
    match accepted.split_last() {
        None => String::new(),
        Some((last, [])) => (*last).to_string(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

/// Longhorn's data locality modes.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataLocality {
    Disabled,
    BestEffort,
    StrictLocal,
}

spelled_enum!(DataLocality {
    Disabled => "disabled",
    BestEffort => "best-effort",
    StrictLocal => "strict-local",
});

/// A per-volume tri-state override of an anti-affinity setting.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SoftAntiAffinity {
    /// Use the cluster setting.
    Ignored,
    Enabled,
    Disabled,
}

spelled_enum!(SoftAntiAffinity {
    Ignored => "ignored",
    Enabled => "enabled",
    Disabled => "disabled",
});

impl SoftAntiAffinity {
    /// Whether the anti-affinity is soft for this volume: the override, else `setting`.
    pub fn resolve(self, setting: bool) -> bool {
        match self {
            SoftAntiAffinity::Ignored => setting,
            SoftAntiAffinity::Enabled => true,
            SoftAntiAffinity::Disabled => false,
        }
    }
}

/// What ControllerPublish may do when the volume is attached to a node that is down.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecoveryPolicy {
    Never,
    Wait,
    Immediate,
}

spelled_enum!(RecoveryPolicy {
    Never => "never",
    Wait => "wait",
    Immediate => "immediate",
});

/// The filesystems Palisade formats volumes with.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsType {
    Ext4,
    Xfs,
}

spelled_enum!(FsType {
    Ext4 => "ext4",
    Xfs => "xfs",
});

/// The typed StorageClass parameters of one volume (defaults already resolved from the
/// settings at creation time, except the anti-affinity overrides, which stay tri-state).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct VolumeParams {
    pub number_of_replicas: u32,
    pub data_locality: DataLocality,
    pub stale_replica_timeout_minutes: u64,
    pub disk_selector: Vec<String>,
    pub node_selector: Vec<String>,
    pub replica_soft_anti_affinity: SoftAntiAffinity,
    pub replica_zone_soft_anti_affinity: SoftAntiAffinity,
    pub replica_disk_soft_anti_affinity: SoftAntiAffinity,
    /// The volume's own recovery policy; None: the setting volume-attachment-recovery-policy
    /// as it is when the take-over is decided.
    pub recovery_policy: Option<RecoveryPolicy>,
    /// Extra arguments for mkfs, split on whitespace.
    pub mkfs_params: Vec<String>,
}

/// A parameter the driver refuses, with the key it names.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ParamError {
    #[error("parameter {key:?}: {value:?} is not accepted; expected {accepted}")]
    BadValue {
        key: String,
        value: String,
        accepted: String,
    },
    #[error("parameter {key:?} is not a known parameter; known parameters: {known}")]
    UnknownKey { key: String, known: String },
    #[error("parameter {key:?} is not supported yet")]
    Unsupported { key: String },
    #[error("parameters {a:?} and {b:?} conflict: {why}")]
    Conflict { a: String, b: String, why: String },
}

/// The parsed parameters plus the `csi.storage.k8s.io/*` keys, kept verbatim.
#[derive(Clone, Debug, PartialEq)]
pub struct Parsed {
    pub params: VolumeParams,
    pub extra: BTreeMap<String, String>,
    /// The filesystem the class names (`fsType` or `csi.storage.k8s.io/fstype`), validated.
    /// It is not a volume parameter: external-provisioner puts it in the volume
    /// capability's fs_type, which is what the node formats with; a caller may check that
    /// the two agree.
    pub fs_type: Option<FsType>,
}

/// `numberOfReplicas`: 1..=20, default the setting default-replica-count.
pub const NUMBER_OF_REPLICAS: &str = "numberOfReplicas";
/// `dataLocality`: disabled | best-effort | strict-local, default default-data-locality.
pub const DATA_LOCALITY: &str = "dataLocality";
/// `staleReplicaTimeout`: minutes, > 0, default 2880.
pub const STALE_REPLICA_TIMEOUT: &str = "staleReplicaTimeout";
/// `diskSelector`: comma-separated disk tags, all required.
pub const DISK_SELECTOR: &str = "diskSelector";
/// `nodeSelector`: comma-separated node tags, all required.
pub const NODE_SELECTOR: &str = "nodeSelector";
/// `replicaSoftAntiAffinity`: ignored | enabled | disabled.
pub const REPLICA_SOFT_ANTI_AFFINITY: &str = "replicaSoftAntiAffinity";
/// `replicaZoneSoftAntiAffinity`: ignored | enabled | disabled.
pub const REPLICA_ZONE_SOFT_ANTI_AFFINITY: &str = "replicaZoneSoftAntiAffinity";
/// `replicaDiskSoftAntiAffinity`: ignored | enabled | disabled.
pub const REPLICA_DISK_SOFT_ANTI_AFFINITY: &str = "replicaDiskSoftAntiAffinity";
/// `volumeAttachmentRecoveryPolicy`: never | wait | immediate.
pub const VOLUME_ATTACHMENT_RECOVERY_POLICY: &str = "volumeAttachmentRecoveryPolicy";
/// `fsType`: ext4 | xfs.
pub const FS_TYPE: &str = "fsType";
/// `mkfsParams`: extra mkfs arguments, whitespace-separated.
pub const MKFS_PARAMS: &str = "mkfsParams";

/// The prefix of the keys external-provisioner adds (PVC and PV names); kept, not parsed.
pub const CSI_PREFIX: &str = "csi.storage.k8s.io/";
/// The filesystem key a StorageClass may carry under [`CSI_PREFIX`]; validated like `fsType`.
pub const CSI_FSTYPE: &str = "csi.storage.k8s.io/fstype";

/// Every parameter key Palisade parses.
pub const KNOWN_KEYS: &[&str] = &[
    NUMBER_OF_REPLICAS,
    DATA_LOCALITY,
    STALE_REPLICA_TIMEOUT,
    DISK_SELECTOR,
    NODE_SELECTOR,
    REPLICA_SOFT_ANTI_AFFINITY,
    REPLICA_ZONE_SOFT_ANTI_AFFINITY,
    REPLICA_DISK_SOFT_ANTI_AFFINITY,
    VOLUME_ATTACHMENT_RECOVERY_POLICY,
    FS_TYPE,
    MKFS_PARAMS,
];

/// Longhorn parameters that Palisade does not implement yet, each with the values that ask
/// for nothing beyond what Palisade does (no backup source, no encryption, the v1 engine,
/// no snapshots...). Such a value is accepted and dropped; any other value is
/// [`ParamError::Unsupported`].
pub const NEUTRAL_VALUES: &[(&str, &[&str])] = &[
    ("fromBackup", &[""]),
    ("dataSource", &[""]),
    ("backingImage", &[""]),
    ("backingImageChecksum", &[""]),
    ("backingImageDataSourceType", &[""]),
    ("backingImageDataSourceParameters", &["", "{}"]),
    ("encrypted", &["false"]),
    ("migratable", &["false"]),
    ("share", &["false"]),
    ("exclusive", &["false"]),
    ("recurringJobSelector", &["", "[]"]),
    ("shareManagerNodeSelector", &[""]),
    ("shareManagerTolerations", &[""]),
    ("nfsOptions", &[""]),
    ("dataEngine", &["v1"]),
    ("backupTargetName", &["", "default"]),
    ("snapshotDataIntegrity", &["ignored", "disabled"]),
    ("unmapMarkSnapChainRemoved", &["ignored", "disabled"]),
    ("replicaAutoBalance", &["ignored", "disabled"]),
    ("disableRevisionCounter", &["true"]),
    ("revisionCounterDisabled", &["true"]),
    ("freezeFilesystemForSnapshot", &["ignored", "disabled"]),
    ("snapshotMaxCount", &[]),
    ("snapshotMaxSize", &[]),
    ("replicaRebuildingBandwidthLimit", &[]),
    ("backupBlockSize", &[]),
    ("cloneMode", &[]),
];

/// The default of `staleReplicaTimeout`, in minutes (48 hours, as Longhorn).
pub const DEFAULT_STALE_REPLICA_TIMEOUT_MINUTES: u64 = 2880;
/// The most replicas a volume may have.
pub const MAX_REPLICAS: u32 = 20;

/// The cluster-wide defaults a StorageClass parameter falls back to when it is absent: the
/// settings (`crate::settings::Settings` implements this), kept behind a trait so that the
/// parameters do not depend on the settings that are built from their types.
pub trait Defaults {
    /// default-replica-count.
    fn replica_count(&self) -> u32;
    /// default-data-locality.
    fn data_locality(&self) -> DataLocality;
    /// replica-soft-anti-affinity: may two replicas share a node.
    fn node_soft_anti_affinity(&self) -> bool;
    /// replica-zone-soft-anti-affinity: may two replicas share a zone.
    fn zone_soft_anti_affinity(&self) -> bool;
    /// replica-disk-soft-anti-affinity: may two replicas share a disk.
    fn disk_soft_anti_affinity(&self) -> bool;
}

/// Parses a CreateVolume `parameters` map against the cluster settings.
///
/// Keys are checked in sorted order, so that the error reported first does not depend on
/// the map's iteration order.
pub fn parse(
    map: &HashMap<String, String>,
    settings: &impl Defaults,
) -> Result<Parsed, ParamError> {
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    let mut extra = BTreeMap::new();
    for key in keys {
        let value = map.get(key).map(String::as_str).unwrap_or_default();
        if key.starts_with(CSI_PREFIX) {
            extra.insert(key.clone(), value.to_string());
        } else if !KNOWN_KEYS.contains(&key.as_str()) {
            check_unsupported(key, value)?;
        }
    }
    let get = |key: &str| map.get(key).map(|v| v.trim());
    let params = VolumeParams {
        number_of_replicas: match get(NUMBER_OF_REPLICAS) {
            Some(v) => parse_replica_count(NUMBER_OF_REPLICAS, v)?,
            None => settings.replica_count(),
        },
        data_locality: parse_or(get(DATA_LOCALITY), DATA_LOCALITY, settings.data_locality())?,
        stale_replica_timeout_minutes: match get(STALE_REPLICA_TIMEOUT) {
            Some(v) => parse_positive_minutes(STALE_REPLICA_TIMEOUT, v)?,
            None => DEFAULT_STALE_REPLICA_TIMEOUT_MINUTES,
        },
        disk_selector: parse_selector(DISK_SELECTOR, get(DISK_SELECTOR))?,
        node_selector: parse_selector(NODE_SELECTOR, get(NODE_SELECTOR))?,
        replica_soft_anti_affinity: parse_or(
            get(REPLICA_SOFT_ANTI_AFFINITY),
            REPLICA_SOFT_ANTI_AFFINITY,
            SoftAntiAffinity::Ignored,
        )?,
        replica_zone_soft_anti_affinity: parse_or(
            get(REPLICA_ZONE_SOFT_ANTI_AFFINITY),
            REPLICA_ZONE_SOFT_ANTI_AFFINITY,
            SoftAntiAffinity::Ignored,
        )?,
        replica_disk_soft_anti_affinity: parse_or(
            get(REPLICA_DISK_SOFT_ANTI_AFFINITY),
            REPLICA_DISK_SOFT_ANTI_AFFINITY,
            SoftAntiAffinity::Ignored,
        )?,
        recovery_policy: get(VOLUME_ATTACHMENT_RECOVERY_POLICY)
            .map(|v| {
                parse_or(
                    Some(v),
                    VOLUME_ATTACHMENT_RECOVERY_POLICY,
                    RecoveryPolicy::Wait,
                )
            })
            .transpose()?,
        mkfs_params: parse_mkfs_params(get(MKFS_PARAMS).unwrap_or_default())?,
    };
    let fs_type = parse_fs_type(get(FS_TYPE), get(CSI_FSTYPE))?;
    check_strict_local(&params, map.contains_key(NUMBER_OF_REPLICAS))?;
    Ok(Parsed {
        params,
        extra,
        fs_type,
    })
}

impl VolumeParams {
    /// The parameters as volume_context (string map) for the CO to hand back to the node:
    /// Longhorn's keys and spellings, every parameter present, so that [`parse`] of this map
    /// gives back the same `VolumeParams` under any settings.
    pub fn to_context(&self) -> HashMap<String, String> {
        [
            (NUMBER_OF_REPLICAS, self.number_of_replicas.to_string()),
            (DATA_LOCALITY, self.data_locality.to_string()),
            (
                STALE_REPLICA_TIMEOUT,
                self.stale_replica_timeout_minutes.to_string(),
            ),
            (DISK_SELECTOR, self.disk_selector.join(",")),
            (NODE_SELECTOR, self.node_selector.join(",")),
            (
                REPLICA_SOFT_ANTI_AFFINITY,
                self.replica_soft_anti_affinity.to_string(),
            ),
            (
                REPLICA_ZONE_SOFT_ANTI_AFFINITY,
                self.replica_zone_soft_anti_affinity.to_string(),
            ),
            (
                REPLICA_DISK_SOFT_ANTI_AFFINITY,
                self.replica_disk_soft_anti_affinity.to_string(),
            ),
            (MKFS_PARAMS, self.mkfs_params.join(" ")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .chain(
            self.recovery_policy
                .map(|p| (VOLUME_ATTACHMENT_RECOVERY_POLICY.to_string(), p.to_string())),
        )
        .collect()
    }

    /// Whether two replicas of this volume may share a node (replicaSoftAntiAffinity, else
    /// the setting replica-soft-anti-affinity).
    pub fn effective_node_soft_anti_affinity(&self, settings: &impl Defaults) -> bool {
        self.replica_soft_anti_affinity
            .resolve(settings.node_soft_anti_affinity())
    }

    /// Whether two replicas of this volume may share a zone (replicaZoneSoftAntiAffinity,
    /// else the setting replica-zone-soft-anti-affinity).
    pub fn effective_zone_soft_anti_affinity(&self, settings: &impl Defaults) -> bool {
        self.replica_zone_soft_anti_affinity
            .resolve(settings.zone_soft_anti_affinity())
    }

    /// Whether two replicas of this volume may share a disk (replicaDiskSoftAntiAffinity,
    /// else the setting replica-disk-soft-anti-affinity).
    pub fn effective_disk_soft_anti_affinity(&self, settings: &impl Defaults) -> bool {
        self.replica_disk_soft_anti_affinity
            .resolve(settings.disk_soft_anti_affinity())
    }
}

/// Refuses a key that is not a Palisade parameter: `Unsupported` for Longhorn's other
/// parameters (unless the value is neutral), `UnknownKey` for anything else.
fn check_unsupported(key: &str, value: &str) -> Result<(), ParamError> {
    match NEUTRAL_VALUES.iter().find(|(k, _)| *k == key) {
        Some((_, neutral)) if neutral.contains(&value.trim()) => Ok(()),
        Some(_) => Err(ParamError::Unsupported {
            key: key.to_string(),
        }),
        None => Err(ParamError::UnknownKey {
            key: key.to_string(),
            known: format!("{}, and keys under {CSI_PREFIX}", KNOWN_KEYS.join(", ")),
        }),
    }
}

fn bad_value(key: &str, value: &str, accepted: impl Into<String>) -> ParamError {
    ParamError::BadValue {
        key: key.to_string(),
        value: value.to_string(),
        accepted: accepted.into(),
    }
}

/// Parses an enum value by its Longhorn spelling, or returns `default` when absent.
fn parse_or<T>(value: Option<&str>, key: &str, default: T) -> Result<T, ParamError>
where
    T: FromStr<Err = UnknownSpelling>,
{
    match value {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|e: UnknownSpelling| bad_value(key, v, one_of(e.accepted))),
    }
}

/// A decimal number made of ASCII digits only (no sign, no spaces inside).
pub(crate) fn parse_digits(value: &str) -> Option<u64> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

fn parse_replica_count(key: &str, value: &str) -> Result<u32, ParamError> {
    parse_digits(value)
        .filter(|n| (1..=u64::from(MAX_REPLICAS)).contains(n))
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| bad_value(key, value, format!("an integer from 1 to {MAX_REPLICAS}")))
}

fn parse_positive_minutes(key: &str, value: &str) -> Result<u64, ParamError> {
    parse_digits(value)
        .filter(|n| *n > 0)
        .ok_or_else(|| bad_value(key, value, "a whole number of minutes greater than 0"))
}

/// True for a tag: one or more of `[A-Za-z0-9._-]`.
pub fn is_valid_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Splits a comma-separated tag list: items trimmed, empty items dropped, duplicates
/// dropped (first one kept), every item a valid tag.
fn parse_selector(key: &str, value: Option<&str>) -> Result<Vec<String>, ParamError> {
    let mut tags: Vec<String> = Vec::new();
    for item in value.unwrap_or_default().split(',').map(str::trim) {
        if item.is_empty() || tags.iter().any(|t| t == item) {
            continue;
        }
        if !is_valid_tag(item) {
            return Err(bad_value(
                key,
                value.unwrap_or_default(),
                format!(
                    "comma-separated tags made of letters, digits, '.', '_' and '-' \
                     ({item:?} is not one)"
                ),
            ));
        }
        tags.push(item.to_string());
    }
    Ok(tags)
}

/// True for a byte allowed in an mkfs argument: letters, digits and `= , . _ : / - ^`
/// (`^` negates an ext4 feature, as in `-O ^metadata_csum`).
fn is_mkfs_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'=' | b',' | b'.' | b'_' | b':' | b'/' | b'-' | b'^')
}

/// Splits mkfsParams on whitespace. The tokens are passed to mkfs as argv (never to a
/// shell); still, anything but plain option and value characters is refused.
fn parse_mkfs_params(value: &str) -> Result<Vec<String>, ParamError> {
    let tokens: Vec<String> = value.split_whitespace().map(str::to_string).collect();
    match tokens.iter().find(|t| !t.bytes().all(is_mkfs_byte)) {
        Some(bad) => Err(bad_value(
            MKFS_PARAMS,
            value,
            format!(
                "whitespace-separated mkfs arguments made of letters, digits and = , . _ : / - ^ \
                 ({bad:?} is not one)"
            ),
        )),
        None => Ok(tokens),
    }
}

/// `fsType` and `csi.storage.k8s.io/fstype` both name the filesystem; each must be ext4 or
/// xfs, and when both are given they must agree.
fn parse_fs_type(plain: Option<&str>, csi: Option<&str>) -> Result<Option<FsType>, ParamError> {
    let parse_one = |key: &str, v: Option<&str>| -> Result<Option<FsType>, ParamError> {
        v.map(|v| parse_or(Some(v), key, FsType::Ext4)).transpose()
    };
    let plain_fs = parse_one(FS_TYPE, plain)?;
    let csi_fs = parse_one(CSI_FSTYPE, csi)?;
    match (plain_fs, csi_fs) {
        (Some(a), Some(b)) if a != b => Err(ParamError::Conflict {
            a: FS_TYPE.to_string(),
            b: CSI_FSTYPE.to_string(),
            why: format!("they name different filesystems ({a} and {b})"),
        }),
        (a, b) => Ok(a.or(b)),
    }
}

/// strict-local keeps the only replica on the consumer's node, so it needs exactly one.
fn check_strict_local(params: &VolumeParams, count_given: bool) -> Result<(), ParamError> {
    if params.data_locality != DataLocality::StrictLocal || params.number_of_replicas == 1 {
        return Ok(());
    }
    let source = if count_given {
        ""
    } else {
        " (from the setting default-replica-count)"
    };
    Err(ParamError::Conflict {
        a: DATA_LOCALITY.to_string(),
        b: NUMBER_OF_REPLICAS.to_string(),
        why: format!(
            "strict-local needs exactly 1 replica, but numberOfReplicas is {}{source}",
            params.number_of_replicas
        ),
    })
}

#[cfg(test)]
mod tests;
