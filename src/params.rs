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

use crate::settings::Settings;

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

/// Parses a CreateVolume `parameters` map against the cluster settings.
///
/// Keys are checked in sorted order, so that the error reported first does not depend on
/// the map's iteration order.
pub fn parse(map: &HashMap<String, String>, settings: &Settings) -> Result<Parsed, ParamError> {
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
            None => settings.default_replica_count,
        },
        data_locality: parse_or(
            get(DATA_LOCALITY),
            DATA_LOCALITY,
            settings.default_data_locality,
        )?,
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
    pub fn effective_node_soft_anti_affinity(&self, settings: &Settings) -> bool {
        self.replica_soft_anti_affinity
            .resolve(settings.replica_soft_anti_affinity)
    }

    /// Whether two replicas of this volume may share a zone (replicaZoneSoftAntiAffinity,
    /// else the setting replica-zone-soft-anti-affinity).
    pub fn effective_zone_soft_anti_affinity(&self, settings: &Settings) -> bool {
        self.replica_zone_soft_anti_affinity
            .resolve(settings.replica_zone_soft_anti_affinity)
    }

    /// Whether two replicas of this volume may share a disk (replicaDiskSoftAntiAffinity,
    /// else the setting replica-disk-soft-anti-affinity).
    pub fn effective_disk_soft_anti_affinity(&self, settings: &Settings) -> bool {
        self.replica_disk_soft_anti_affinity
            .resolve(settings.replica_disk_soft_anti_affinity)
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
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn parsed(pairs: &[(&str, &str)]) -> Parsed {
        match parse(&map(pairs), &Settings::default()) {
            Ok(parsed) => parsed,
            Err(e) => panic!("{pairs:?} should parse: {e}"),
        }
    }

    fn ok(pairs: &[(&str, &str)]) -> VolumeParams {
        parsed(pairs).params
    }

    fn fs(pairs: &[(&str, &str)]) -> Option<FsType> {
        parsed(pairs).fs_type
    }

    fn err(pairs: &[(&str, &str)]) -> ParamError {
        match parse(&map(pairs), &Settings::default()) {
            Ok(p) => panic!("{pairs:?} should fail, got {p:?}"),
            Err(e) => e,
        }
    }

    fn assert_bad_value(pairs: &[(&str, &str)], key: &str, accepted_contains: &str) {
        match err(pairs) {
            ParamError::BadValue {
                key: k, accepted, ..
            } => {
                assert_eq!(k, key);
                assert!(
                    accepted.contains(accepted_contains),
                    "{accepted:?} should mention {accepted_contains:?}"
                );
            }
            other => panic!("expected BadValue for {key}, got {other:?}"),
        }
    }

    #[test]
    fn empty_map_takes_the_defaults_from_settings() {
        let p = ok(&[]);
        assert_eq!(
            p,
            VolumeParams {
                number_of_replicas: 3,
                data_locality: DataLocality::Disabled,
                stale_replica_timeout_minutes: 2880,
                disk_selector: vec![],
                node_selector: vec![],
                replica_soft_anti_affinity: SoftAntiAffinity::Ignored,
                replica_zone_soft_anti_affinity: SoftAntiAffinity::Ignored,
                replica_disk_soft_anti_affinity: SoftAntiAffinity::Ignored,
                recovery_policy: None,
                mkfs_params: vec![],
            }
        );
    }

    #[test]
    fn non_default_settings_change_the_defaults() {
        let settings = Settings {
            default_replica_count: 2,
            default_data_locality: DataLocality::BestEffort,
            volume_attachment_recovery_policy: RecoveryPolicy::Immediate,
            ..Settings::default()
        };
        let p = parse(&HashMap::new(), &settings).map(|p| p.params);
        let p = p.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.number_of_replicas, 2);
        assert_eq!(p.data_locality, DataLocality::BestEffort);
        // The recovery policy is not copied from the setting: without the parameter, the
        // setting as it is at take-over time decides.
        assert_eq!(p.recovery_policy, None);
    }

    #[test]
    fn every_parameter_is_parsed() {
        let all = parsed(&[
            ("numberOfReplicas", " 2 "),
            ("dataLocality", "best-effort"),
            ("staleReplicaTimeout", "30"),
            ("diskSelector", " ssd, fast ,,"),
            ("nodeSelector", "storage"),
            ("replicaSoftAntiAffinity", "enabled"),
            ("replicaZoneSoftAntiAffinity", "disabled"),
            ("replicaDiskSoftAntiAffinity", "ignored"),
            ("volumeAttachmentRecoveryPolicy", "never"),
            ("fsType", "xfs"),
            ("mkfsParams", "-I 256  -b 4096 -O ^metadata_csum,^64bit"),
        ]);
        assert_eq!(all.fs_type, Some(FsType::Xfs));
        let p = all.params;
        assert_eq!(p.number_of_replicas, 2);
        assert_eq!(p.data_locality, DataLocality::BestEffort);
        assert_eq!(p.stale_replica_timeout_minutes, 30);
        assert_eq!(p.disk_selector, vec!["ssd", "fast"]);
        assert_eq!(p.node_selector, vec!["storage"]);
        assert_eq!(p.replica_soft_anti_affinity, SoftAntiAffinity::Enabled);
        assert_eq!(
            p.replica_zone_soft_anti_affinity,
            SoftAntiAffinity::Disabled
        );
        assert_eq!(p.replica_disk_soft_anti_affinity, SoftAntiAffinity::Ignored);
        assert_eq!(p.recovery_policy, Some(RecoveryPolicy::Never));
        assert_eq!(
            p.mkfs_params,
            vec!["-I", "256", "-b", "4096", "-O", "^metadata_csum,^64bit"]
        );
    }

    #[test]
    fn replica_count_bounds() {
        assert_eq!(ok(&[("numberOfReplicas", "1")]).number_of_replicas, 1);
        assert_eq!(ok(&[("numberOfReplicas", "20")]).number_of_replicas, 20);
        for bad in [
            "0",
            "21",
            "-1",
            "+3",
            "three",
            "",
            "3.0",
            "99999999999999999999",
        ] {
            assert_bad_value(&[("numberOfReplicas", bad)], "numberOfReplicas", "1 to 20");
        }
    }

    #[test]
    fn stale_replica_timeout_must_be_positive() {
        assert_eq!(
            ok(&[("staleReplicaTimeout", "1")]).stale_replica_timeout_minutes,
            1
        );
        for bad in ["0", "-5", "1h", ""] {
            assert_bad_value(
                &[("staleReplicaTimeout", bad)],
                "staleReplicaTimeout",
                "greater than 0",
            );
        }
    }

    #[test]
    fn enum_values_are_case_sensitive_and_listed() {
        assert_bad_value(
            &[("dataLocality", "Best-Effort")],
            "dataLocality",
            "disabled, best-effort or strict-local",
        );
        assert_bad_value(
            &[("replicaSoftAntiAffinity", "true")],
            "replicaSoftAntiAffinity",
            "ignored, enabled or disabled",
        );
        assert_bad_value(
            &[("replicaZoneSoftAntiAffinity", "false")],
            "replicaZoneSoftAntiAffinity",
            "ignored, enabled or disabled",
        );
        assert_bad_value(
            &[("replicaDiskSoftAntiAffinity", "Enabled")],
            "replicaDiskSoftAntiAffinity",
            "ignored, enabled or disabled",
        );
        assert_bad_value(
            &[("volumeAttachmentRecoveryPolicy", "always")],
            "volumeAttachmentRecoveryPolicy",
            "never, wait or immediate",
        );
        assert_bad_value(&[("fsType", "btrfs")], "fsType", "ext4 or xfs");
    }

    #[test]
    fn selectors_reject_bad_tags_and_drop_duplicates() {
        assert_eq!(
            ok(&[("diskSelector", "a,a,b")]).disk_selector,
            vec!["a", "b"]
        );
        assert_eq!(
            ok(&[("nodeSelector", " , ")]).node_selector,
            Vec::<String>::new()
        );
        assert_eq!(
            ok(&[("nodeSelector", "rack-1.zone_a")]).node_selector,
            vec!["rack-1.zone_a"]
        );
        assert_bad_value(
            &[("diskSelector", "ssd,f ast")],
            "diskSelector",
            "\"f ast\"",
        );
        assert_bad_value(&[("nodeSelector", "a=b")], "nodeSelector", "\"a=b\"");
    }

    #[test]
    fn mkfs_params_reject_shell_metacharacters() {
        assert_eq!(ok(&[("mkfsParams", "")]).mkfs_params, Vec::<String>::new());
        assert_eq!(
            ok(&[("mkfsParams", "-m 0 -L data")]).mkfs_params,
            vec!["-m", "0", "-L", "data"]
        );
        for bad in [
            "-L $(reboot)",
            "-m 0; rm",
            "a|b",
            "`x`",
            "-L 'x'",
            "a>b",
            "-E \"x\"",
        ] {
            assert_bad_value(&[("mkfsParams", bad)], "mkfsParams", "is not one");
        }
    }

    #[test]
    fn strict_local_needs_one_replica() {
        let p = ok(&[("dataLocality", "strict-local"), ("numberOfReplicas", "1")]);
        assert_eq!(p.data_locality, DataLocality::StrictLocal);
        match err(&[("dataLocality", "strict-local"), ("numberOfReplicas", "2")]) {
            ParamError::Conflict { a, b, why } => {
                assert_eq!(
                    (a.as_str(), b.as_str()),
                    ("dataLocality", "numberOfReplicas")
                );
                assert!(why.contains("exactly 1"), "{why}");
            }
            other => panic!("expected Conflict, got {other:?}"),
        }
        // The replica count from the setting conflicts too, and the message says so.
        match err(&[("dataLocality", "strict-local")]) {
            ParamError::Conflict { why, .. } => {
                assert!(why.contains("default-replica-count"), "{why}")
            }
            other => panic!("expected Conflict, got {other:?}"),
        }
    }

    #[test]
    fn unknown_keys_are_refused_with_the_known_list() {
        match err(&[("numberOfReplica", "3")]) {
            ParamError::UnknownKey { key, known } => {
                assert_eq!(key, "numberOfReplica");
                assert!(known.contains("numberOfReplicas"), "{known}");
                assert!(known.contains("csi.storage.k8s.io/"), "{known}");
            }
            other => panic!("expected UnknownKey, got {other:?}"),
        }
        // Keys are not trimmed: a stray space is a different key, never a silent default.
        assert!(matches!(
            err(&[(" fsType", "ext4")]),
            ParamError::UnknownKey { .. }
        ));
    }

    #[test]
    fn unsupported_longhorn_parameters_are_named() {
        for (key, value) in [
            ("fromBackup", "s3://bucket?backup=b"),
            ("backingImage", "img"),
            ("encrypted", "true"),
            ("dataEngine", "v2"),
            (
                "recurringJobSelector",
                r#"[{"name":"snap","isGroup":false}]"#,
            ),
            ("migratable", "true"),
            ("replicaAutoBalance", "best-effort"),
            ("snapshotMaxCount", "5"),
        ] {
            assert_eq!(
                err(&[(key, value)]),
                ParamError::Unsupported {
                    key: key.to_string()
                },
                "{key}={value}"
            );
        }
        let e = err(&[("encrypted", "true")]).to_string();
        assert!(
            e.contains("\"encrypted\"") && e.contains("not supported"),
            "{e}"
        );
    }

    #[test]
    fn longhorns_default_storage_class_is_accepted() {
        let all = parsed(&[
            ("numberOfReplicas", "3"),
            ("staleReplicaTimeout", "30"),
            ("fromBackup", ""),
            ("fsType", "ext4"),
            ("dataLocality", "disabled"),
            ("unmapMarkSnapChainRemoved", "ignored"),
            ("disableRevisionCounter", "true"),
            ("dataEngine", "v1"),
            ("backupTargetName", "default"),
        ]);
        assert_eq!(all.params.number_of_replicas, 3);
        assert_eq!(all.params.stale_replica_timeout_minutes, 30);
        assert_eq!(all.fs_type, Some(FsType::Ext4));
    }

    #[test]
    fn csi_keys_are_kept_verbatim() {
        let parsed = parse(
            &map(&[
                ("csi.storage.k8s.io/pvc/name", " data-0 "),
                ("csi.storage.k8s.io/pvc/namespace", "default"),
                ("csi.storage.k8s.io/pv/name", "pvc-1"),
            ]),
            &Settings::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed.extra.len(), 3);
        assert_eq!(parsed.extra["csi.storage.k8s.io/pvc/name"], " data-0 ");
        assert_eq!(parsed.params, ok(&[]));
    }

    #[test]
    fn csi_fstype_is_validated_and_must_agree_with_fs_type() {
        assert_eq!(fs(&[]), None);
        assert_eq!(
            fs(&[("csi.storage.k8s.io/fstype", "xfs")]),
            Some(FsType::Xfs)
        );
        assert_bad_value(
            &[("csi.storage.k8s.io/fstype", "ntfs")],
            "csi.storage.k8s.io/fstype",
            "ext4 or xfs",
        );
        assert!(matches!(
            err(&[("fsType", "ext4"), ("csi.storage.k8s.io/fstype", "xfs")]),
            ParamError::Conflict { .. }
        ));
        assert_eq!(
            fs(&[("fsType", "xfs"), ("csi.storage.k8s.io/fstype", "xfs")]),
            Some(FsType::Xfs)
        );
    }

    #[test]
    fn first_error_is_deterministic() {
        // Two bad keys: the error names the first in sorted order, every time.
        for _ in 0..20 {
            match err(&[("zzz", "1"), ("aaa", "1")]) {
                ParamError::UnknownKey { key, .. } => assert_eq!(key, "aaa"),
                other => panic!("{other:?}"),
            }
        }
    }

    fn round_trip(p: &VolumeParams, settings: &Settings) {
        let back = parse(&p.to_context(), settings).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&back.params, p);
        assert!(back.extra.is_empty());
    }

    #[test]
    fn context_round_trips_under_any_settings() {
        let odd_settings = Settings {
            default_replica_count: 5,
            default_data_locality: DataLocality::BestEffort,
            replica_soft_anti_affinity: true,
            volume_attachment_recovery_policy: RecoveryPolicy::Never,
            ..Settings::default()
        };
        let defaults = ok(&[]);
        let custom = ok(&[
            ("numberOfReplicas", "1"),
            ("dataLocality", "strict-local"),
            ("staleReplicaTimeout", "7"),
            ("diskSelector", "ssd,nvme"),
            ("nodeSelector", "storage"),
            ("replicaSoftAntiAffinity", "enabled"),
            ("replicaZoneSoftAntiAffinity", "disabled"),
            ("replicaDiskSoftAntiAffinity", "disabled"),
            ("volumeAttachmentRecoveryPolicy", "immediate"),
            ("fsType", "xfs"),
            ("mkfsParams", "-m 0 -O ^has_journal"),
        ]);
        for p in [&defaults, &custom] {
            round_trip(p, &Settings::default());
            round_trip(p, &odd_settings);
        }
        // Parsed under odd settings, the defaults are resolved; they round-trip under the
        // stock settings as well.
        let resolved = parse(&HashMap::new(), &odd_settings)
            .unwrap_or_else(|e| panic!("{e}"))
            .params;
        assert_eq!(resolved.number_of_replicas, 5);
        round_trip(&resolved, &Settings::default());
    }

    #[test]
    fn effective_anti_affinity_resolves_overrides() {
        let settings = Settings::default();
        let p = ok(&[]);
        assert!(!p.effective_node_soft_anti_affinity(&settings));
        assert!(p.effective_zone_soft_anti_affinity(&settings));
        assert!(p.effective_disk_soft_anti_affinity(&settings));
        let p = ok(&[
            ("replicaSoftAntiAffinity", "enabled"),
            ("replicaZoneSoftAntiAffinity", "disabled"),
            ("replicaDiskSoftAntiAffinity", "disabled"),
        ]);
        assert!(p.effective_node_soft_anti_affinity(&settings));
        assert!(!p.effective_zone_soft_anti_affinity(&settings));
        assert!(!p.effective_disk_soft_anti_affinity(&settings));
        let flipped = Settings {
            replica_soft_anti_affinity: true,
            replica_zone_soft_anti_affinity: false,
            replica_disk_soft_anti_affinity: false,
            ..Settings::default()
        };
        let p = ok(&[]);
        assert!(p.effective_node_soft_anti_affinity(&flipped));
        assert!(!p.effective_zone_soft_anti_affinity(&flipped));
        assert!(!p.effective_disk_soft_anti_affinity(&flipped));
    }

    #[test]
    fn enums_parse_and_print_longhorn_spellings() {
        for s in DataLocality::SPELLINGS {
            let v: DataLocality = s.parse().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(v.as_str(), *s);
            assert_eq!(v.to_string(), *s);
        }
        let e = "nope"
            .parse::<RecoveryPolicy>()
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("\"nope\" is not one of never, wait or immediate")
        );
    }
}
