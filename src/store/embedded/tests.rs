//! The embedded store's own tests: persistence across reopen, the file lock, corrupt
//! documents, commits a caller stopped waiting for, crashes at any moment, and speed with
//! many objects. The contract both backends keep (versions, conflicts, deletes, ordering,
//! read-your-writes, racing writers) is tested once for both in tests/store_contract.rs.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::*;
use crate::model::{ReplicaState, VolumeState};
use crate::params::{DataLocality, RecoveryPolicy, SoftAntiAffinity, VolumeParams};
use crate::store::SETTINGS_KEY;

fn node(id: &str, heartbeat: u64) -> Node {
    Node {
        id: id.to_string(),
        address: format!("{id}.example:7000"),
        agent_address: format!("{id}.example:7001"),
        zone: None,
        tags: vec![],
        schedulable: true,
        last_heartbeat_ms: heartbeat,
        disks: vec![],
    }
}

fn volume(id: &str) -> Volume {
    Volume {
        id: id.to_string(),
        name: id.to_string(),
        size: 1 << 30,
        params: VolumeParams {
            number_of_replicas: 3,
            data_locality: DataLocality::Disabled,
            stale_replica_timeout_minutes: 30,
            disk_selector: vec![],
            node_selector: vec![],
            replica_soft_anti_affinity: SoftAntiAffinity::Ignored,
            replica_zone_soft_anti_affinity: SoftAntiAffinity::Ignored,
            replica_disk_soft_anti_affinity: SoftAntiAffinity::Ignored,
            recovery_policy: Some(RecoveryPolicy::Wait),
            mkfs_params: vec![],
        },
        extra_params: BTreeMap::new(),
        capabilities: vec![],
        accessible_topology: vec![],
        state: VolumeState::Ready,
        degraded_reason: None,
        epoch: 0,
        attachment: None,
        created_ms: 0,
        planned_replicas: Vec::new(),
        next_replica: 0,
        engine_running: false,
        ready_replicas: 0,
        engine_lease: None,
    }
}

fn replica(volume_id: &str, n: u32) -> Replica {
    Replica {
        id: format!("{volume_id}-r-{n}"),
        volume_id: volume_id.to_string(),
        node_id: format!("node-{n}"),
        disk_id: "disk-0".to_string(),
        path: PathBuf::from(format!("/var/lib/palisade/replicas/{volume_id}-r-{n}")),
        size: 1 << 30,
        state: ReplicaState::Ready,
        failed_ms: 0,
        rebuilt_percent: None,
    }
}

fn db_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("state.redb")
}

/// The embedded store's versions count 1, 2, 3... per key, and start over at 1 when a key
/// is created again after a delete (the contract only asks that they grow).
#[tokio::test]
async fn versions_count_from_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&db_path(&dir)).unwrap();
    let settings = store.settings();
    let v1 = settings
        .put(SETTINGS_KEY, Settings::default(), None)
        .await
        .unwrap();
    let v2 = settings
        .put(SETTINGS_KEY, Settings::default(), Some(v1))
        .await
        .unwrap();
    assert_eq!((v1, v2), (1, 2));
    settings.delete(SETTINGS_KEY, v2).await.unwrap();
    let again = settings
        .put(SETTINGS_KEY, Settings::default(), None)
        .await
        .unwrap();
    assert_eq!(again, 1);
}

#[tokio::test]
async fn objects_persist_across_close_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    {
        let store = EmbeddedStore::open(&path).unwrap();
        let v = volume("pvc-1");
        store.volumes().put("pvc-1", v.clone(), None).await.unwrap();
        store.volumes().put("pvc-1", v, Some(1)).await.unwrap();
        store
            .volumes()
            .put("pvc-2", volume("pvc-2"), None)
            .await
            .unwrap();
        store.volumes().delete("pvc-2", 1).await.unwrap();
        let r = replica("pvc-1", 0);
        store.replicas().put(&r.id.clone(), r, None).await.unwrap();
        store.nodes().put("n1", node("n1", 5), None).await.unwrap();
        store
            .settings()
            .put(SETTINGS_KEY, Settings::default(), None)
            .await
            .unwrap();
    }
    let store = EmbeddedStore::open(&path).unwrap();
    let volumes = store.volumes().list().await.unwrap();
    assert_eq!(volumes.len(), 1);
    assert_eq!(
        (volumes[0].version, &*volumes[0].value),
        (2, &volume("pvc-1"))
    );
    let r = store.replicas().get("pvc-1-r-0").await.unwrap().unwrap();
    assert_eq!((r.version, &*r.value), (1, &replica("pvc-1", 0)));
    let n = store.nodes().get("n1").await.unwrap().unwrap();
    assert_eq!(&*n.value, &node("n1", 5));
    assert!(store.settings().get(SETTINGS_KEY).await.unwrap().is_some());
    // Versions carry on from the stored ones.
    assert_eq!(
        store
            .volumes()
            .put("pvc-1", volume("pvc-1"), Some(2))
            .await
            .unwrap(),
        3
    );
}

#[test]
fn a_second_open_of_the_same_file_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let first = EmbeddedStore::open(&path).unwrap();
    let err = match EmbeddedStore::open(&path) {
        Ok(_) => panic!("a second open of {} succeeded", path.display()),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("already open"), "{err}");
    assert!(err.contains(&path.display().to_string()), "{err}");
    drop(first);
    EmbeddedStore::open(&path).unwrap();
}

#[test]
fn a_file_that_is_not_a_database_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    std::fs::write(&path, vec![0x5a; 64 * 1024]).unwrap();
    let err = match EmbeddedStore::open(&path) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e.to_string(),
    };
    assert!(err.contains(&path.display().to_string()), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_whose_caller_stops_waiting_still_keeps_cache_and_file_in_step() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let store = EmbeddedStore::open(&path).unwrap();
    let nodes = store.nodes();
    for i in 0..40 {
        let current = nodes.get("n").await.unwrap().map(|v| v.version);
        let put = nodes.put("n", node("n", i), current);
        let patience = Duration::from_micros(random_below(3000));
        let _ = tokio::time::timeout(patience, put).await;
        // Let an abandoned commit finish before the next round reads the version.
        let _idle = nodes_writer_idle(&store).await;
    }
    let cached = nodes.get("n").await.unwrap().unwrap();
    drop(store);
    let reopened = EmbeddedStore::open(&path).unwrap();
    let stored = reopened.nodes().get("n").await.unwrap().unwrap();
    assert_eq!(
        (cached.version, &*cached.value),
        (stored.version, &*stored.value)
    );
}

/// Waits until no write of the nodes table is under way.
async fn nodes_writer_idle(store: &EmbeddedStore) -> tokio::sync::OwnedMutexGuard<()> {
    Arc::clone(&store.nodes.writer).lock_owned().await
}

/// Writes rows straight into the redb file, as the store would, bypassing it.
fn write_raw(path: &Path, table: &'static str, rows: &[(String, u64, Vec<u8>)]) {
    let db = Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut t = txn.open_table(definition(table)).unwrap();
        for (key, version, bytes) in rows {
            t.insert(key.as_str(), (*version, bytes.as_slice()))
                .unwrap();
        }
    }
    txn.commit().unwrap();
}

#[tokio::test]
async fn a_document_that_does_not_decode_is_reported_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    {
        let store = EmbeddedStore::open(&path).unwrap();
        store
            .nodes()
            .put("good", node("good", 1), None)
            .await
            .unwrap();
    }
    write_raw(
        &path,
        "nodes",
        &[("bad".to_string(), 4, b"{\"id\": 3".to_vec())],
    );

    let store = EmbeddedStore::open(&path).unwrap();
    let nodes = store.nodes();
    let err = nodes.get("bad").await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { kind: "node", key, .. } if key == "bad"),
        "{err}"
    );
    assert!(matches!(
        nodes.list().await,
        Err(StoreError::Corrupt { .. })
    ));
    assert!(matches!(
        nodes.list_prefix("b").await,
        Err(StoreError::Corrupt { .. })
    ));
    assert_eq!(nodes.list_prefix("g").await.unwrap().len(), 1);
    assert!(nodes.get("good").await.unwrap().is_some());

    // Naming its version, a put replaces it (and a delete would remove it).
    let err = nodes.put("bad", node("bad", 1), Some(3)).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    assert_eq!(nodes.put("bad", node("bad", 1), Some(4)).await.unwrap(), 5);
    assert_eq!(nodes.list().await.unwrap().len(), 2);
    nodes.delete("bad", 5).await.unwrap();
}

/// Set in the environment of the child process of the crash test: the database path.
const CRASH_CHILD_ENV: &str = "PALISADE_STORE_CRASH_CHILD";
const CRASH_KEYS: u64 = 8;
const COUNTER_KEY: &str = "counter";

/// The child half of `a_writer_killed_at_any_moment_leaves_a_consistent_store`; does
/// nothing unless started by it.
#[test]
fn crash_child() {
    let Some(path) = std::env::var_os(CRASH_CHILD_ENV) else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(crash_child_writes(PathBuf::from(path)));
}

/// Puts forever: key `k<i>` holds a node whose heartbeat is its own version, and the
/// counter holds the sum of those versions, updated after each of them. Prints
/// "committed <key> <version>" once each put has returned.
async fn crash_child_writes(path: PathBuf) {
    let store = EmbeddedStore::open(&path).unwrap();
    let nodes = store.nodes();
    let version_of = |key: String| async move { nodes.get(&key).await.unwrap().map(|v| v.version) };
    let mut sum = 0;
    for k in 0..CRASH_KEYS {
        sum += version_of(format!("k{k}")).await.unwrap_or(0);
    }
    let mut counter = version_of(COUNTER_KEY.to_string()).await;
    counter = Some(
        nodes
            .put(COUNTER_KEY, node(COUNTER_KEY, sum), counter)
            .await
            .unwrap(),
    );
    for i in 0.. {
        let key = format!("k{}", i % CRASH_KEYS);
        let current = version_of(key.clone()).await;
        let version = current.map_or(1, |v| v + 1);
        nodes.put(&key, node(&key, version), current).await.unwrap();
        println!("committed {key} {version}");
        sum += 1;
        counter = Some(
            nodes
                .put(COUNTER_KEY, node(COUNTER_KEY, sum), counter)
                .await
                .unwrap(),
        );
    }
}

fn random_below(n: u64) -> u64 {
    RandomState::new().build_hasher().finish() % n
}

#[test]
fn a_writer_killed_at_any_moment_leaves_a_consistent_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let exe = std::env::current_exe().unwrap();
    let test_name = concat!(module_path!(), "::crash_child")
        .split_once("::")
        .unwrap()
        .1;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // The highest version the child reported committed, per key, over all rounds.
    let mut committed: BTreeMap<String, u64> = BTreeMap::new();
    let mut kills_after_commits = 0;
    for round in 0..20 {
        let mut child = Command::new(&exe)
            .args(["--exact", test_name, "--nocapture", "--test-threads=1"])
            .env(CRASH_CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("committed ") {
                    let (key, version) = rest.split_once(' ').unwrap();
                    tx.send((key.to_string(), version.parse::<u64>().unwrap()))
                        .unwrap();
                }
            }
        });
        // Even rounds kill once the child is writing; odd ones at any moment after the
        // start, which includes while it opens (and recovers) the file.
        let mut seen = vec![];
        if round % 2 == 0 {
            seen.push(rx.recv_timeout(Duration::from_secs(60)).unwrap());
        }
        std::thread::sleep(Duration::from_millis(random_below(150)));
        child.kill().unwrap();
        let status = child.wait().unwrap();
        // Killed, not dead of its own accord (a panic would exit with 101).
        assert_eq!(status.signal(), Some(libc::SIGKILL), "child: {status}");
        reader.join().unwrap();
        seen.extend(rx.try_iter());
        kills_after_commits += usize::from(!seen.is_empty());
        for (key, version) in seen {
            let max = committed.entry(key).or_default();
            *max = (*max).max(version);
        }

        runtime.block_on(async {
            let store = EmbeddedStore::open(&path).unwrap();
            let nodes = store.nodes().list().await.unwrap();
            let mut sum = 0;
            let mut counter = None;
            for n in &nodes {
                if n.value.id == COUNTER_KEY {
                    counter = Some(n.value.last_heartbeat_ms);
                    continue;
                }
                // Each object is one the child wrote whole, under the version it named.
                assert_eq!(n.value.last_heartbeat_ms, n.version, "{:?}", n.value);
                assert_eq!(*n.value, node(&n.value.id, n.version));
                let reported = committed.get(&n.value.id).copied().unwrap_or(0);
                assert!(
                    n.version >= reported,
                    "{} lost version {reported}",
                    n.value.id
                );
                sum += n.version;
            }
            for (key, version) in &committed {
                assert!(
                    nodes.iter().any(|n| &n.value.id == key),
                    "{key} (committed at {version}) is gone"
                );
            }
            // The counter follows each key's put; the kill may fall between the two.
            if let Some(counter) = counter {
                assert!(
                    counter == sum || counter + 1 == sum,
                    "counter {counter}, sum {sum}"
                );
            }
        });
    }
    assert!(kills_after_commits >= 10, "{kills_after_commits}");
    eprintln!(
        "{kills_after_commits} of 20 kills after the first commit; versions reached: {committed:?}"
    );
}

/// CreateVolume reads every node and replica and writes a volume and its replicas; with
/// 10,000 volumes and 10,000 replicas stored, the reads must stay a small part of its
/// 20 ms budget (a list that decoded documents would take tens of milliseconds).
#[tokio::test]
async fn reads_and_writes_stay_fast_with_ten_thousand_objects() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let encode = |key: String, json: Vec<u8>| (key, 1, json);
    let volumes: Vec<_> = (0..10_000)
        .map(|i| {
            let id = format!("pvc-{i:05}");
            encode(id.clone(), serde_json::to_vec(&volume(&id)).unwrap())
        })
        .collect();
    let replicas: Vec<_> = (0..10_000)
        .map(|i| {
            let r = replica(&format!("pvc-{:05}", i / 3), i % 3);
            encode(r.id.clone(), serde_json::to_vec(&r).unwrap())
        })
        .collect();
    let nodes: Vec<_> = (0..20)
        .map(|i| {
            let id = format!("node-{i}");
            encode(id.clone(), serde_json::to_vec(&node(&id, 1)).unwrap())
        })
        .collect();
    write_raw(&path, "volumes", &volumes);
    write_raw(&path, "replicas", &replicas);
    write_raw(&path, "nodes", &nodes);

    let opened = Instant::now();
    let store = EmbeddedStore::open(&path).unwrap();
    let open_time = opened.elapsed();
    assert_eq!(store.volumes().list().await.unwrap().len(), 10_000);

    // The reads CreateVolume does: they are served from memory and must cost next to
    // nothing. The writes are fsynced commits, whose latency is the disk's; the
    // end-to-end figure is benches/create_delete.rs's.
    let mut reads = vec![];
    let mut rounds = vec![];
    for i in 0..100 {
        let started = Instant::now();
        let id = format!("new-{i:03}");
        assert_eq!(store.nodes().list().await.unwrap().len(), 20);
        assert!(store.replicas().list().await.unwrap().len() >= 10_000);
        assert!(store.volumes().get(&id).await.unwrap().is_none());
        reads.push(started.elapsed());
        store.volumes().put(&id, volume(&id), None).await.unwrap();
        for n in 0..3 {
            let r = replica(&id, n);
            store.replicas().put(&r.id.clone(), r, None).await.unwrap();
        }
        rounds.push(started.elapsed());
    }
    reads.sort();
    rounds.sort();
    eprintln!(
        "open {open_time:?}; reads p50 {:?}, p99 {:?}; reads and four puts p50 {:?}, p99 {:?}",
        reads[50], reads[98], rounds[50], rounds[98]
    );
    // The median, not the tail: on a loaded machine the tail is the scheduler's.
    assert!(
        reads[50] < Duration::from_millis(5),
        "reads p50 {:?}",
        reads[50]
    );
}
