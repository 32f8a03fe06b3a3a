//! Replica files on a real disk directory: creation, sparse data files, metadata rewritten
//! atomically, epochs, growth, deletion, and what a malformed or foreign file does.

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use super::*;

const GIB: u64 = 1 << 30;

fn disk() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn create_makes_a_sparse_data_file_and_metadata() {
    let disk = disk();
    let r = create(disk.path(), "pvc-1-r-0", "pvc-1", 4 * GIB).unwrap();
    assert_eq!(
        (
            r.id.as_str(),
            r.volume_id.as_str(),
            r.size,
            r.epoch,
            r.state
        ),
        ("pvc-1-r-0", "pvc-1", 4 * GIB, 0, ReplicaDataState::Complete)
    );
    assert_eq!(r.dir, disk.path().join("replicas/pvc-1-r-0"));
    let data = fs::metadata(r.data_path()).unwrap();
    assert_eq!(data.len(), 4 * GIB);
    // 512-byte blocks actually allocated: next to nothing.
    assert!(data.blocks() * 512 < (1 << 20), "{} blocks", data.blocks());
    assert_eq!(open(disk.path(), "pvc-1-r-0").unwrap(), Some(r.clone()));
    assert_eq!(names_in(&r.dir), [METADATA_FILE, DATA_FILE]);
    assert_eq!(list(disk.path()).unwrap(), [r]);
}

#[test]
fn create_is_idempotent_and_keeps_the_data() {
    let disk = disk();
    let first = create(disk.path(), "r1", "vol", GIB).unwrap();
    fs::write(first.data_path(), b"written data")
        .and_then(|()| fs::OpenOptions::new().write(true).open(first.data_path()))
        .and_then(|f| f.set_len(GIB))
        .unwrap();
    let first = set_epoch(disk.path(), "r1", 7).unwrap();
    let again = create(disk.path(), "r1", "vol", GIB).unwrap();
    assert_eq!(again, first);
    assert_eq!(again.epoch, 7);
    let mut head = [0u8; 12];
    File::open(again.data_path())
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    assert_eq!(&head, b"written data");
}

#[test]
fn an_existing_replica_of_another_size_or_volume_is_an_error() {
    let disk = disk();
    create(disk.path(), "r1", "vol", GIB).unwrap();
    for (volume, size) in [("vol", 2 * GIB), ("vol", GIB / 2), ("other", GIB)] {
        let err = create(disk.path(), "r1", volume, size).unwrap_err();
        assert!(matches!(err, ReplicaError::Mismatch(_)), "{err}");
        let message = err.to_string();
        assert!(
            message.contains("\"r1\"") && message.contains("replicas/r1"),
            "{message}"
        );
    }
    let r = open(disk.path(), "r1").unwrap().unwrap();
    assert_eq!((r.volume_id.as_str(), r.size), ("vol", GIB));
    assert_eq!(fs::metadata(r.data_path()).unwrap().len(), GIB);
}

#[test]
fn ids_must_be_single_safe_file_names() {
    let disk = disk();
    let long = "a".repeat(MAX_ID_LEN + 1);
    for id in [
        "",
        ".",
        "..",
        "../x",
        "a/b",
        ".hidden",
        "nul\0",
        long.as_str(),
    ] {
        let err = create(disk.path(), id, "vol", GIB).unwrap_err();
        assert!(
            matches!(err, ReplicaError::InvalidId { .. }),
            "{id:?}: {err}"
        );
        assert!(matches!(
            open(disk.path(), id),
            Err(ReplicaError::InvalidId { .. })
        ));
        assert!(matches!(
            delete(disk.path(), id),
            Err(ReplicaError::InvalidId { .. })
        ));
    }
    let err = create(disk.path(), "r1", "", GIB).unwrap_err();
    assert!(
        matches!(
            err,
            ReplicaError::InvalidId {
                what: "volume id",
                ..
            }
        ),
        "{err}"
    );
    // The longest id still leaves room for the delete's rename.
    let longest = "b".repeat(MAX_ID_LEN);
    create(disk.path(), &longest, "vol", GIB).unwrap();
    delete(disk.path(), &longest).unwrap();
    assert!(open(disk.path(), &longest).unwrap().is_none());
}

#[test]
fn grow_extends_and_never_shrinks() {
    let disk = disk();
    create(disk.path(), "r1", "vol", GIB).unwrap();
    let grown = grow(disk.path(), "r1", 3 * GIB).unwrap();
    assert_eq!(grown.size, 3 * GIB);
    let data = fs::metadata(grown.data_path()).unwrap();
    assert_eq!(data.len(), 3 * GIB);
    assert!(data.blocks() * 512 < (1 << 20));
    assert_eq!(open(disk.path(), "r1").unwrap().unwrap().size, 3 * GIB);
    assert_eq!(grow(disk.path(), "r1", 3 * GIB).unwrap(), grown);

    let err = grow(disk.path(), "r1", 2 * GIB).unwrap_err();
    assert!(
        matches!(err, ReplicaError::Shrink { size, requested, .. } if size == 3 * GIB && requested == 2 * GIB),
        "{err}"
    );
    assert_eq!(open(disk.path(), "r1").unwrap().unwrap().size, 3 * GIB);
    assert_eq!(fs::metadata(grown.data_path()).unwrap().len(), 3 * GIB);

    let err = grow(disk.path(), "missing", GIB).unwrap_err();
    assert!(matches!(err, ReplicaError::NotFound { .. }), "{err}");
}

#[test]
fn a_grow_interrupted_before_its_metadata_converges() {
    let disk = disk();
    let r = create(disk.path(), "r1", "vol", GIB).unwrap();
    // The crash came after set_len, before the metadata was rewritten.
    OpenOptions::new()
        .write(true)
        .open(r.data_path())
        .unwrap()
        .set_len(2 * GIB)
        .unwrap();
    assert_eq!(open(disk.path(), "r1").unwrap().unwrap().size, GIB);
    assert_eq!(grow(disk.path(), "r1", 2 * GIB).unwrap().size, 2 * GIB);
    assert_eq!(open(disk.path(), "r1").unwrap().unwrap().size, 2 * GIB);
}

#[test]
fn delete_removes_the_replica_and_is_idempotent() {
    let disk = disk();
    create(disk.path(), "r1", "vol", GIB).unwrap();
    create(disk.path(), "r2", "vol", GIB).unwrap();
    delete(disk.path(), "r1").unwrap();
    delete(disk.path(), "r1").unwrap();
    delete(disk.path(), "never-was").unwrap();
    assert!(open(disk.path(), "r1").unwrap().is_none());
    let ids: Vec<_> = list(disk.path())
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, ["r2"]);
    assert_eq!(names_in(&disk.path().join(REPLICAS_DIR)), [LOCK_FILE, "r2"]);
    // A disk that never held a replica.
    let empty = tempfile::tempdir().unwrap();
    delete(empty.path(), "r1").unwrap();
    assert!(list(empty.path()).unwrap().is_empty());
}

#[test]
fn leftovers_of_a_crash_mid_delete_or_mid_create_are_never_replicas() {
    let disk = disk();
    let root = disk.path().join(REPLICAS_DIR);
    let r1 = create(disk.path(), "r1", "vol", GIB).unwrap();
    create(disk.path(), "r2", "vol", GIB).unwrap();
    create(disk.path(), "r3", "vol", GIB).unwrap();
    // r1: renamed, then the crash came halfway through the removal.
    let doomed = root.join(".deleting-r1");
    fs::rename(&r1.dir, &doomed).unwrap();
    fs::remove_file(doomed.join(DATA_FILE)).unwrap();
    // r2: renamed, nothing removed yet.
    fs::rename(root.join("r2"), root.join(".deleting-r2")).unwrap();
    // r4: a create that crashed before its rename into place.
    fs::create_dir(root.join(".creating-r4")).unwrap();
    fs::write(root.join(".creating-r4").join(DATA_FILE), b"").unwrap();

    assert!(open(disk.path(), "r1").unwrap().is_none());
    assert!(open(disk.path(), "r4").unwrap().is_none());
    // Deleting r1 again finishes its removal.
    delete(disk.path(), "r1").unwrap();
    assert!(!doomed.exists());
    // list ignores and cleans the rest.
    let ids: Vec<_> = list(disk.path())
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, ["r3"]);
    assert_eq!(names_in(&root), [LOCK_FILE, "r3"]);
    // A create of r4 after its crashed attempt converges.
    fs::create_dir(root.join(".creating-r4")).unwrap();
    fs::write(root.join(".creating-r4").join(METADATA_FILE), b"{").unwrap();
    let r4 = create(disk.path(), "r4", "vol", GIB).unwrap();
    assert_eq!(open(disk.path(), "r4").unwrap(), Some(r4));
    assert_eq!(names_in(&root), [LOCK_FILE, "r3", "r4"]);
}

#[test]
fn malformed_metadata_is_an_error_naming_the_file() {
    let disk = disk();
    let r = create(disk.path(), "r1", "vol", GIB).unwrap();
    let original = fs::read(r.metadata_path()).unwrap();
    let torn = &original[..original.len() / 2];
    let wrong_id = String::from_utf8(original.clone())
        .unwrap()
        .replace("\"r1\"", "\"r9\"");
    let wrong_format = String::from_utf8(original.clone())
        .unwrap()
        .replace("\"format_version\": 1", "\"format_version\": 99");
    let cases: [(&[u8], &str); 5] = [
        (torn, "malformed"),
        (b"", "malformed"),
        (b"\xff\xfe garbage", "malformed"),
        (wrong_id.as_bytes(), "names replica \"r9\""),
        (wrong_format.as_bytes(), "format version 99"),
    ];
    for (contents, expected) in cases {
        fs::write(r.metadata_path(), contents).unwrap();
        for err in [
            open(disk.path(), "r1").unwrap_err(),
            list(disk.path()).unwrap_err(),
            set_epoch(disk.path(), "r1", 1).unwrap_err(),
            create(disk.path(), "r1", "vol", GIB).unwrap_err(),
        ] {
            let message = err.to_string();
            assert!(message.contains("replicas/r1/replica.json"), "{message}");
            assert!(message.contains(expected), "{message}");
        }
    }
    // Metadata gone altogether, and a data file shorter than recorded.
    fs::remove_file(r.metadata_path()).unwrap();
    let err = open(disk.path(), "r1").unwrap_err();
    assert!(err.to_string().contains("has no replica.json"), "{err}");
    fs::write(r.metadata_path(), &original).unwrap();
    OpenOptions::new()
        .write(true)
        .open(r.data_path())
        .unwrap()
        .set_len(GIB - 1)
        .unwrap();
    let err = open(disk.path(), "r1").unwrap_err();
    assert!(err.to_string().contains("shorter"), "{err}");
    // Deleting it still works.
    delete(disk.path(), "r1").unwrap();
    assert!(list(disk.path()).unwrap().is_empty());
}

#[test]
fn the_epoch_is_persisted_and_never_lowered() {
    let disk = disk();
    create(disk.path(), "r1", "vol", GIB).unwrap();
    assert_eq!(set_epoch(disk.path(), "r1", 3).unwrap().epoch, 3);
    assert_eq!(set_epoch(disk.path(), "r1", 3).unwrap().epoch, 3);
    let err = set_epoch(disk.path(), "r1", 2).unwrap_err();
    assert!(
        matches!(
            err,
            ReplicaError::EpochLowered {
                current: 3,
                requested: 2,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(open(disk.path(), "r1").unwrap().unwrap().epoch, 3);
    assert_eq!(set_epoch(disk.path(), "r1", 10).unwrap().epoch, 10);
    assert_eq!(open(disk.path(), "r1").unwrap().unwrap().epoch, 10);
    assert!(matches!(
        set_epoch(disk.path(), "missing", 1),
        Err(ReplicaError::NotFound { .. })
    ));
    // No temp file is left beside the metadata.
    let r = open(disk.path(), "r1").unwrap().unwrap();
    assert_eq!(names_in(&r.dir), [METADATA_FILE, DATA_FILE]);
}

#[test]
fn concurrent_epoch_raises_end_at_the_highest() {
    let disk = Arc::new(disk());
    create(disk.path(), "r1", "vol", GIB).unwrap();
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let disk = Arc::clone(&disk);
            std::thread::spawn(move || {
                for epoch in (1..=40).map(|e| e * 8 + t) {
                    match set_epoch(disk.path(), "r1", epoch) {
                        Ok(r) => assert!(r.epoch == epoch),
                        Err(ReplicaError::EpochLowered { current, .. }) => {
                            assert!(current > epoch)
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(open(disk.path(), "r1").unwrap().unwrap().epoch, 40 * 8 + 7);
}

#[test]
fn the_state_is_persisted() {
    let disk = disk();
    create(disk.path(), "r1", "vol", GIB).unwrap();
    let r = set_state(disk.path(), "r1", ReplicaDataState::Rebuilding).unwrap();
    assert_eq!(r.state, ReplicaDataState::Rebuilding);
    assert_eq!(open(disk.path(), "r1").unwrap(), Some(r));
}

#[test]
fn list_orders_by_id_and_ignores_stray_files() {
    let disk = disk();
    for id in ["c", "a", "b"] {
        create(disk.path(), id, "vol", GIB).unwrap();
    }
    let root = disk.path().join(REPLICAS_DIR);
    fs::write(root.join("stray-file"), b"").unwrap();
    fs::write(root.join(".stray-hidden"), b"").unwrap();
    let ids: Vec<_> = list(disk.path())
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, ["a", "b", "c"]);
}

#[test]
fn the_disk_id_is_stable_and_capacity_is_reported() {
    let parent = tempfile::tempdir().unwrap();
    let path = parent.path().join("disks/one");
    let first = init_disk(&path).unwrap();
    assert_eq!(first.id.len(), 36, "{}", first.id);
    assert!(first.storage_maximum > 0);
    assert!(first.storage_available <= first.storage_maximum);
    assert_eq!(init_disk(&path).unwrap().id, first.id);
    assert!(path.join(DISK_MARKER_FILE).is_file());

    let other = init_disk(&parent.path().join("disks/two")).unwrap();
    assert_ne!(other.id, first.id);

    // Replicas live beside the marker, and do not disturb it.
    create(&path, "r1", "vol", GIB).unwrap();
    assert_eq!(init_disk(&path).unwrap().id, first.id);

    fs::write(path.join(DISK_MARKER_FILE), b"{\"format_version\":").unwrap();
    let err = init_disk(&path).unwrap_err();
    assert!(err.to_string().contains(DISK_MARKER_FILE), "{err}");
}

#[test]
fn concurrent_first_inits_agree_on_the_id() {
    let parent = Arc::new(tempfile::tempdir().unwrap());
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let parent = Arc::clone(&parent);
            std::thread::spawn(move || init_disk(&parent.path().join("d")).unwrap().id)
        })
        .collect();
    let ids: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
}
