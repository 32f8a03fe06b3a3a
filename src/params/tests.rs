//! The parameters' parsing: every key, its accepted values and defaults, the errors that
//! name them, and the volume context round trip.

use super::*;
use crate::settings::Settings;

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
