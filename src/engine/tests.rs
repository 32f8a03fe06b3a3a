//! The engine's rules, tested through its I/O methods with in-memory members and a
//! recording membership (the NBD path is tested end to end in `tests/engine_nbd.rs`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::*;

const SIZE: u64 = 1 << 20;

/// An in-memory member with failure injection.
struct MemReplica {
    id: String,
    local: bool,
    data: Mutex<Vec<u8>>,
    reads: AtomicU64,
    writes: AtomicU64,
    fua_writes: AtomicU64,
    flushes: AtomicU64,
    trims: AtomicU64,
    /// Writes succeed while fewer than this many were accepted.
    fail_writes_after: AtomicU64,
    /// Writes at this offset fail (u64::MAX: none).
    fail_writes_at: AtomicU64,
    fail_reads: AtomicBool,
    fail_flushes: AtomicBool,
    /// Every request is answered Fenced.
    fenced: AtomicBool,
    /// Writes sleep a pseudo-random time up to this many microseconds.
    jitter_us: u64,
}

impl MemReplica {
    fn new(id: &str, local: bool) -> Arc<MemReplica> {
        Self::with_jitter(id, local, 0)
    }

    fn with_jitter(id: &str, local: bool, jitter_us: u64) -> Arc<MemReplica> {
        Arc::new(MemReplica {
            id: id.into(),
            local,
            data: Mutex::new(vec![0; SIZE as usize]),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            fua_writes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            trims: AtomicU64::new(0),
            fail_writes_after: AtomicU64::new(u64::MAX),
            fail_writes_at: AtomicU64::new(u64::MAX),
            fail_reads: AtomicBool::new(false),
            fail_flushes: AtomicBool::new(false),
            fenced: AtomicBool::new(false),
            jitter_us,
        })
    }

    fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        self.data.lock().unwrap()[offset as usize..offset as usize + len].to_vec()
    }

    fn all(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }

    fn io_error(&self, why: &str) -> ReplicaIoError {
        ReplicaIoError::Io {
            replica: self.id.clone(),
            why: why.into(),
        }
    }

    fn check_fenced(&self) -> Result<(), ReplicaIoError> {
        if self.fenced.load(Ordering::SeqCst) {
            return Err(ReplicaIoError::Fenced {
                replica: self.id.clone(),
                ours: 1,
                current: 2,
            });
        }
        Ok(())
    }
}

#[async_trait]
impl ReplicaIo for MemReplica {
    fn id(&self) -> &str {
        &self.id
    }

    fn is_local(&self) -> bool {
        self.local
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ReplicaIoError> {
        self.check_fenced()?;
        if self.fail_reads.load(Ordering::SeqCst) {
            return Err(self.io_error("bad sector"));
        }
        self.reads.fetch_add(1, Ordering::SeqCst);
        Ok(Bytes::from(self.bytes(offset, len as usize)))
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ReplicaIoError> {
        self.check_fenced()?;
        if self.jitter_us > 0 {
            // Different on every member, so that without range locks the members would
            // apply overlapping writes in different orders.
            let salt = self
                .id
                .bytes()
                .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
            let seed =
                (offset ^ salt ^ u64::from(data[0]) << 20).wrapping_mul(6_364_136_223_846_793_005);
            tokio::time::sleep(Duration::from_micros((seed >> 40) % self.jitter_us)).await;
        }
        if offset == self.fail_writes_at.load(Ordering::SeqCst)
            || self.writes.load(Ordering::SeqCst) >= self.fail_writes_after.load(Ordering::SeqCst)
        {
            return Err(self.io_error("disk gone"));
        }
        self.writes.fetch_add(1, Ordering::SeqCst);
        if fua {
            self.fua_writes.fetch_add(1, Ordering::SeqCst);
        }
        self.data.lock().unwrap()[offset as usize..offset as usize + data.len()]
            .copy_from_slice(&data);
        Ok(())
    }

    async fn flush(&self) -> Result<(), ReplicaIoError> {
        self.check_fenced()?;
        if self.fail_flushes.load(Ordering::SeqCst) {
            return Err(self.io_error("fsync failed"));
        }
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u32) -> Result<(), ReplicaIoError> {
        self.check_fenced()?;
        self.trims.fetch_add(1, Ordering::SeqCst);
        self.data.lock().unwrap()[offset as usize..(offset + u64::from(len)) as usize].fill(0);
        Ok(())
    }
}

/// Records removals; can refuse them, hold them at a gate, and stop renewing the lease.
#[derive(Default)]
struct TestMembership {
    removals: Mutex<Vec<String>>,
    refuse_removals: AtomicBool,
    /// When set, a removal waits for a permit.
    gate: Option<tokio::sync::Semaphore>,
    refuse_renewals: AtomicBool,
    renewals: AtomicU64,
    /// The lease a renewal grants, in ms (0: unbounded).
    grant_ms: AtomicU64,
    promotions: Mutex<Vec<String>>,
    refuse_promotions: AtomicBool,
}

impl TestMembership {
    fn removed(&self) -> Vec<String> {
        self.removals.lock().unwrap().clone()
    }
}

#[async_trait]
impl Membership for TestMembership {
    async fn remove_member(&self, replica_id: &str, _reason: &str) -> Result<(), String> {
        if let Some(gate) = &self.gate {
            gate.acquire().await.map_err(|e| e.to_string())?.forget();
        }
        if self.refuse_removals.load(Ordering::SeqCst) {
            return Err("store unavailable".into());
        }
        self.removals.lock().unwrap().push(replica_id.to_string());
        Ok(())
    }

    async fn renew_lease(&self) -> Result<Duration, String> {
        if self.refuse_renewals.load(Ordering::SeqCst) {
            return Err("controller unreachable".into());
        }
        self.renewals.fetch_add(1, Ordering::SeqCst);
        Ok(match self.grant_ms.load(Ordering::SeqCst) {
            0 => Duration::MAX,
            ms => Duration::from_millis(ms),
        })
    }

    async fn promote_member(&self, replica_id: &str) -> Result<(), String> {
        if self.refuse_promotions.load(Ordering::SeqCst) {
            return Err("store unavailable".into());
        }
        self.promotions.lock().unwrap().push(replica_id.to_string());
        Ok(())
    }
}

fn engine(replicas: &[Arc<MemReplica>], membership: Arc<TestMembership>) -> Engine {
    engine_with(replicas, membership, EngineConfig::default())
}

fn engine_with(
    replicas: &[Arc<MemReplica>],
    membership: Arc<TestMembership>,
    config: EngineConfig,
) -> Engine {
    let members: Vec<Member> = replicas.iter().map(|r| Arc::clone(r) as Member).collect();
    Engine::with_config("vol-1", SIZE, members, membership, config).unwrap()
}

fn three() -> Vec<Arc<MemReplica>> {
    vec![
        MemReplica::new("a", true),
        MemReplica::new("b", false),
        MemReplica::new("c", false),
    ]
}

fn block(byte: u8) -> Bytes {
    Bytes::from(vec![byte; 4096])
}

#[tokio::test]
async fn writes_reach_every_member_and_read_back() {
    let r = three();
    let e = engine(&r, Arc::default());
    e.write(4096, block(1), false).await.unwrap();
    e.write(10, Bytes::from_static(b"hello"), true)
        .await
        .unwrap();
    assert_eq!(&e.read(10, 5).await.unwrap()[..], b"hello");
    for m in &r {
        assert_eq!(m.bytes(4096, 4096), vec![1; 4096]);
        assert_eq!(
            m.fua_writes.load(Ordering::SeqCst),
            1,
            "FUA reaches {}",
            m.id
        );
    }
    e.flush().await.unwrap();
    assert!(r.iter().all(|m| m.flushes.load(Ordering::SeqCst) == 1));
    let stats = e.stats();
    assert_eq!((stats.writes, stats.written_bytes), (2, 4101));
    assert_eq!((stats.reads, stats.flushes, stats.errors), (1, 1, 0));
}

#[tokio::test]
async fn a_failed_member_is_removed_before_the_write_is_acknowledged() {
    let r = three();
    r[1].fail_writes_after.store(1, Ordering::SeqCst);
    let membership = Arc::new(TestMembership {
        gate: Some(tokio::sync::Semaphore::new(0)),
        ..Default::default()
    });
    let e = engine(&r, Arc::clone(&membership));
    e.write(0, block(1), false).await.unwrap();

    let write = tokio::spawn({
        let e = e.clone();
        async move { e.write(4096, block(2), false).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !write.is_finished(),
        "acknowledged before b's removal was persisted"
    );
    assert!(membership.removed().is_empty());
    membership.gate.as_ref().unwrap().add_permits(1);
    write.await.unwrap().unwrap();
    assert_eq!(membership.removed(), vec!["b"]);
    assert_eq!(e.member_ids(), vec!["a", "c"]);
    assert_eq!(e.stats().member_removals, 1);

    // Later writes go to the remaining members only, and need no removal.
    e.write(8192, block(3), false).await.unwrap();
    assert_eq!(r[1].writes.load(Ordering::SeqCst), 1);
    for m in [&r[0], &r[2]] {
        assert_eq!(
            m.bytes(0, 12288),
            [vec![1; 4096], vec![2; 4096], vec![3; 4096]].concat()
        );
    }
}

#[tokio::test]
async fn a_refused_removal_fails_the_write_and_is_retried_by_the_next() {
    let r = three();
    r[2].fail_writes_after.store(0, Ordering::SeqCst);
    let membership = Arc::new(TestMembership::default());
    membership.refuse_removals.store(true, Ordering::SeqCst);
    let e = engine(&r, Arc::clone(&membership));
    assert!(e.is_clean());
    let err = e.write(0, block(1), false).await.unwrap_err();
    assert!(matches!(err, EngineError::RemovalFailed { ref replica, .. } if replica == "c"));
    assert_eq!(err.errno(), nbd::Errno::Io);
    assert_eq!(e.member_ids(), vec!["a", "b", "c"]);
    assert_eq!(e.state(), EngineState::Serving);
    // a and b took the write, c did not and is still a member: the next engine must not
    // take the members for identical.
    assert!(!e.is_clean());

    membership.refuse_removals.store(false, Ordering::SeqCst);
    e.write(0, block(2), false).await.unwrap();
    assert_eq!(membership.removed(), vec!["c"]);
    assert_eq!(e.member_ids(), vec!["a", "b"]);
}

#[tokio::test]
async fn a_write_no_member_took_fails_and_removes_nobody() {
    let r = three();
    for m in &r {
        m.fail_writes_after.store(0, Ordering::SeqCst);
    }
    let membership = Arc::new(TestMembership::default());
    let e = engine(&r, Arc::clone(&membership));
    let err = e.write(0, block(1), false).await.unwrap_err();
    assert!(matches!(err, EngineError::Unavailable { .. }), "{err}");
    assert!(membership.removed().is_empty());
    assert_eq!(e.member_ids().len(), 3);

    // One member, failing: never removed, the volume keeps serving once it recovers.
    let one = vec![MemReplica::new("solo", true)];
    one[0].fail_writes_after.store(0, Ordering::SeqCst);
    let membership = Arc::new(TestMembership::default());
    let e = engine(&one, Arc::clone(&membership));
    assert!(e.write(0, block(1), false).await.is_err());
    assert_eq!(e.member_ids(), vec!["solo"]);
    one[0].fail_writes_after.store(u64::MAX, Ordering::SeqCst);
    e.write(0, block(1), false).await.unwrap();
    assert!(membership.removed().is_empty());
}

#[tokio::test]
async fn two_writes_failing_on_different_members_cannot_empty_the_volume() {
    let r = vec![MemReplica::new("a", true), MemReplica::new("b", false)];
    r[0].fail_writes_at.store(0, Ordering::SeqCst);
    r[1].fail_writes_at.store(4096, Ordering::SeqCst);
    let membership = Arc::new(TestMembership {
        gate: Some(tokio::sync::Semaphore::new(0)),
        ..Default::default()
    });
    let e = engine(&r, Arc::clone(&membership));
    let w1 = tokio::spawn({
        let e = e.clone();
        async move { e.write(0, block(1), false).await }
    });
    let w2 = tokio::spawn({
        let e = e.clone();
        async move { e.write(4096, block(2), false).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    membership.gate.as_ref().unwrap().add_permits(2);
    let (w1, w2) = (w1.await.unwrap(), w2.await.unwrap());
    assert_eq!(
        w1.is_ok() as u8 + w2.is_ok() as u8,
        1,
        "exactly one write is acknowledged: {w1:?} {w2:?}"
    );
    assert_eq!(membership.removed().len(), 1);
    let left = e.member_ids();
    assert_eq!(left.len(), 1);
    // The member left holds the acknowledged write.
    let survivor = r.iter().find(|m| m.id == left[0]).unwrap();
    if w1.is_ok() {
        assert_eq!(survivor.id, "b");
        assert_eq!(survivor.bytes(0, 4096), vec![1; 4096]);
    } else {
        assert_eq!(survivor.id, "a");
        assert_eq!(survivor.bytes(4096, 4096), vec![2; 4096]);
    }
}

#[tokio::test]
async fn fenced_stops_the_engine_for_good() {
    let r = three();
    let e = engine(&r, Arc::default());
    e.write(0, block(1), false).await.unwrap();
    r[2].fenced.store(true, Ordering::SeqCst);
    let err = e.write(0, block(2), false).await.unwrap_err();
    assert!(matches!(err, EngineError::Fenced { .. }));
    assert_eq!(err.errno(), nbd::Errno::Perm);
    assert_eq!(e.state(), EngineState::Fenced);
    r[2].fenced.store(false, Ordering::SeqCst);
    let writes: Vec<u64> = r.iter().map(|m| m.writes.load(Ordering::SeqCst)).collect();
    assert!(matches!(
        e.write(8192, block(3), false).await,
        Err(EngineError::Fenced { .. })
    ));
    assert!(matches!(
        e.read(0, 10).await,
        Err(EngineError::Fenced { .. })
    ));
    assert!(matches!(e.flush().await, Err(EngineError::Fenced { .. })));
    assert!(e.trim(0, 10, false).await.is_err());
    let after: Vec<u64> = r.iter().map(|m| m.writes.load(Ordering::SeqCst)).collect();
    assert_eq!(writes, after, "a fenced engine writes nothing more");
    assert_eq!(e.member_ids().len(), 3, "a fenced engine removes nobody");
}

#[tokio::test]
async fn a_fenced_read_stops_the_engine() {
    let r = three();
    let e = engine(&r, Arc::default());
    r[0].fenced.store(true, Ordering::SeqCst);
    assert!(matches!(
        e.read(0, 1).await,
        Err(EngineError::Fenced { .. })
    ));
    assert_eq!(e.state(), EngineState::Fenced);
}

#[tokio::test(start_paused = true)]
async fn the_lease_is_renewed_and_an_engine_that_cannot_renew_stops() {
    let r = three();
    let membership = Arc::new(TestMembership::default());
    let config = EngineConfig {
        lease: Duration::from_secs(3),
        renew_interval: Duration::from_secs(1),
        ..EngineConfig::default()
    };
    let e = engine_with(&r, Arc::clone(&membership), config);
    let keeper = tokio::spawn({
        let e = e.clone();
        async move { e.keep_lease(std::future::pending()).await }
    });
    tokio::time::sleep(Duration::from_millis(10_500)).await;
    assert_eq!(e.state(), EngineState::Serving);
    assert!(membership.renewals.load(Ordering::SeqCst) >= 9);
    e.write(0, block(1), false).await.unwrap();

    membership.refuse_renewals.store(true, Ordering::SeqCst);
    // The last renewal, at 10 s, holds the lease until 13 s.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(e.state(), EngineState::Serving, "within the lease");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(e.state(), EngineState::LeaseExpired);
    let writes = r[0].writes.load(Ordering::SeqCst);
    let err = e.write(0, block(2), false).await.unwrap_err();
    assert!(matches!(err, EngineError::LeaseExpired { .. }));
    assert_eq!(err.errno(), nbd::Errno::Perm);
    assert!(e.read(0, 1).await.is_err());
    assert_eq!(r[0].writes.load(Ordering::SeqCst), writes);
    // Renewals that work again do not revive it, and the keeper has stopped.
    membership.refuse_renewals.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(keeper.is_finished());
    assert_eq!(e.state(), EngineState::LeaseExpired);
}

/// Regression: a lease granted shorter than three renew intervals is renewed every third of
/// it, and a failed renewal used to bring the configured (longer) interval back, so that the
/// next try came after the lease had lapsed: one missed renewal (a controller restarting in
/// under a second) stopped the engine.
#[tokio::test(start_paused = true)]
async fn a_failed_renewal_of_a_short_lease_is_retried_within_the_lease() {
    let r = three();
    let membership = Arc::new(TestMembership::default());
    membership.grant_ms.store(3000, Ordering::SeqCst);
    let config = EngineConfig {
        lease: Duration::from_secs(15),
        renew_interval: Duration::from_secs(5),
        ..EngineConfig::default()
    };
    let e = engine_with(&r, Arc::clone(&membership), config);
    e.bound_lease(Instant::now() + Duration::from_secs(3));
    let keeper = tokio::spawn({
        let e = e.clone();
        async move { e.keep_lease(std::future::pending()).await }
    });
    // Renewals at 0, 1 and 2 s; the one at 3 s fails; the lease runs until 5 s.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    membership.refuse_renewals.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    membership.refuse_renewals.store(false, Ordering::SeqCst);
    // The try at 4 s renews it.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert_eq!(e.state(), EngineState::Serving);
    e.write(0, block(1), false).await.unwrap();
    keeper.abort();
}

#[tokio::test(start_paused = true)]
async fn without_a_lease_keeper_the_lease_lapses() {
    let r = three();
    let config = EngineConfig {
        lease: Duration::from_secs(2),
        ..EngineConfig::default()
    };
    let e = engine_with(&r, Arc::default(), config);
    e.write(0, block(1), false).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(matches!(
        e.write(0, block(1), false).await,
        Err(EngineError::LeaseExpired { .. })
    ));
}

#[tokio::test]
async fn reads_prefer_the_local_member_and_spread_over_remote_ones() {
    let r = three();
    let e = engine(&r, Arc::default());
    for _ in 0..10 {
        e.read(0, 512).await.unwrap();
    }
    assert_eq!(r[0].reads.load(Ordering::SeqCst), 10);
    assert_eq!(r[1].reads.load(Ordering::SeqCst), 0);

    let remote = vec![MemReplica::new("x", false), MemReplica::new("y", false)];
    let e = engine(&remote, Arc::default());
    for _ in 0..10 {
        e.read(0, 512).await.unwrap();
    }
    assert_eq!(remote[0].reads.load(Ordering::SeqCst), 5);
    assert_eq!(remote[1].reads.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn a_member_that_fails_a_read_is_removed_and_another_serves_it() {
    let r = three();
    let membership = Arc::new(TestMembership::default());
    let e = engine(&r, Arc::clone(&membership));
    e.write(0, block(7), false).await.unwrap();
    r[0].fail_reads.store(true, Ordering::SeqCst);
    assert_eq!(e.read(0, 4096).await.unwrap(), block(7));
    assert_eq!(membership.removed(), vec!["a"]);
    assert_eq!(e.member_ids(), vec!["b", "c"]);

    // Every member failing: the read fails, the last members stay.
    r[1].fail_reads.store(true, Ordering::SeqCst);
    r[2].fail_reads.store(true, Ordering::SeqCst);
    assert!(matches!(
        e.read(0, 1).await,
        Err(EngineError::Unavailable { .. })
    ));
    assert_eq!(e.member_ids(), vec!["b", "c"]);
}

#[tokio::test]
async fn a_member_that_fails_a_flush_is_removed() {
    let r = three();
    r[1].fail_flushes.store(true, Ordering::SeqCst);
    let membership = Arc::new(TestMembership::default());
    let e = engine(&r, Arc::clone(&membership));
    e.flush().await.unwrap();
    assert_eq!(membership.removed(), vec!["b"]);
    assert_eq!(r[0].flushes.load(Ordering::SeqCst), 1);
    assert_eq!(r[2].flushes.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn trim_and_write_zeroes_reach_every_member() {
    let r = three();
    let e = engine(&r, Arc::default());
    e.write(0, Bytes::from(vec![9; 3 << 20 >> 2]), false)
        .await
        .unwrap();
    e.trim(0, 4096, false).await.unwrap();
    e.write_zeroes(4096, 4096, false, true).await.unwrap();
    let trims = r[0].trims.load(Ordering::SeqCst);
    assert_eq!(trims, 2, "write-zeroes without NO_HOLE trims");
    assert!(
        r.iter().all(|m| m.flushes.load(Ordering::SeqCst) == 1),
        "FUA trim flushes"
    );
    // NO_HOLE writes real zeroes, in chunks, with FUA on each.
    e.write_zeroes(8192, (1 << 20) / 2 + 1, true, true)
        .await
        .unwrap();
    for m in &r {
        assert_eq!(m.trims.load(Ordering::SeqCst), 2);
        assert_eq!(m.fua_writes.load(Ordering::SeqCst), 1);
        assert!(m.bytes(0, 8192 + (1 << 19) + 1).iter().all(|b| *b == 0));
        assert_eq!(m.bytes(8192 + (1 << 19) + 1, 1), vec![9]);
    }
    let stats = e.stats();
    assert_eq!((stats.trims, stats.write_zeroes), (1, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapping_concurrent_writes_leave_the_members_identical() {
    let r = vec![
        MemReplica::with_jitter("a", true, 3000),
        MemReplica::with_jitter("b", false, 3000),
        MemReplica::with_jitter("c", false, 3000),
    ];
    let e = engine(&r, Arc::default());
    let mut tasks = Vec::new();
    for i in 0..400u64 {
        let e = e.clone();
        // Overlapping, unaligned ranges over a few blocks.
        let offset = (i * 1531) % 16384;
        let len = 512 + (i * 977) % 8192;
        tasks.push(tokio::spawn(async move {
            e.write(
                offset,
                Bytes::from(vec![(i % 251) as u8 + 1; len as usize]),
                false,
            )
            .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let a = r[0].all();
    assert!(a.iter().any(|b| *b != 0));
    assert!(r[1].all() == a && r[2].all() == a, "members diverged");
}

#[tokio::test]
async fn bad_ranges_and_bad_configurations_are_refused() {
    let r = three();
    let e = engine(&r, Arc::default());
    for err in [
        e.read(SIZE, 1).await.unwrap_err(),
        e.read(0, 0).await.unwrap_err(),
        e.write(u64::MAX, block(1), false).await.unwrap_err(),
        e.trim(SIZE - 1, 2, false).await.unwrap_err(),
        e.write_zeroes(SIZE, 1, true, false).await.unwrap_err(),
    ] {
        assert!(matches!(err, EngineError::OutOfRange { .. }), "{err}");
        assert_eq!(err.errno(), nbd::Errno::Inval);
    }
    let membership: Arc<dyn Membership> = Arc::new(TestMembership::default());
    let member = |id: &str| MemReplica::new(id, true) as Member;
    assert!(Engine::new("v", SIZE, vec![], Arc::clone(&membership)).is_err());
    assert!(Engine::new("v", 0, vec![member("a")], Arc::clone(&membership)).is_err());
    assert!(Engine::new("v", SIZE, vec![member("a"), member("a")], membership).is_err());
}

/// Online expansion: an engine exports more than the volume; past the volume's end reads
/// are zeroes without touching a member and writes are refused, until it grows.
#[tokio::test]
async fn an_engine_grows_online_within_its_export() {
    let r = three();
    let half = SIZE / 2;
    // What the members hold past the volume's end must not be served.
    for m in &r {
        m.data.lock().unwrap()[half as usize..].fill(0xee);
    }
    let members: Vec<Member> = r.iter().map(|m| Arc::clone(m) as Member).collect();
    let config = EngineConfig {
        export_size: SIZE,
        ..EngineConfig::default()
    };
    let e = Engine::with_config(
        "vol-1",
        half,
        members,
        Arc::new(TestMembership::default()),
        config,
    )
    .unwrap();
    assert_eq!((e.size(), e.exported_size()), (half, SIZE));
    assert_eq!(e.export().size, SIZE);
    e.write(half - 4096, block(1), false).await.unwrap();
    let refused = e.write(half, block(2), false).await.unwrap_err();
    assert!(
        matches!(refused, EngineError::OutOfRange { size, .. } if size == half),
        "{refused}"
    );
    assert!(e.trim(half, 4096, false).await.is_err());
    let across = e.read(half - 4096, 8192).await.unwrap();
    assert_eq!(&across[..4096], &block(1)[..]);
    assert!(across[4096..].iter().all(|b| *b == 0));
    let reads = r
        .iter()
        .map(|m| m.reads.load(Ordering::SeqCst))
        .sum::<u64>();
    assert!(e.read(half, 4096).await.unwrap().iter().all(|b| *b == 0));
    assert_eq!(
        reads,
        r.iter()
            .map(|m| m.reads.load(Ordering::SeqCst))
            .sum::<u64>()
    );
    assert!(matches!(
        e.read(SIZE, 1).await,
        Err(EngineError::OutOfRange { .. })
    ));

    assert!(e.grow(SIZE + 1).is_err(), "beyond the export");
    assert_eq!(e.grow(half - 4096).unwrap(), half, "a volume never shrinks");
    assert_eq!(e.grow(SIZE).unwrap(), SIZE);
    assert_eq!(e.grow(SIZE).unwrap(), SIZE, "idempotent");
    e.write(half, block(2), false).await.unwrap();
    e.write(SIZE - 4096, block(3), true).await.unwrap();
    assert_eq!(e.read(half, 4096).await.unwrap(), block(2));
    assert_eq!(e.read(SIZE - 4096, 4096).await.unwrap(), block(3));
    for m in &r {
        assert_eq!(m.bytes(half, 4096), block(2).to_vec());
        assert_eq!(m.bytes(SIZE - 4096, 4096), block(3).to_vec());
    }

    let member = MemReplica::new("a", true) as Member;
    let small = EngineConfig {
        export_size: half,
        ..EngineConfig::default()
    };
    let membership: Arc<dyn Membership> = Arc::new(TestMembership::default());
    assert!(Engine::with_config("v", SIZE, vec![member], membership, small).is_err());
}

/// Random 4 KiB writes until `stop`, returning how many were acknowledged.
async fn write_until(e: Engine, stop: Arc<AtomicBool>, seed: u64) -> u64 {
    let mut x = seed | 1;
    let mut acked = 0;
    while !stop.load(Ordering::SeqCst) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let offset = (x % (SIZE / 4096)) * 4096;
        e.write(offset, block((x >> 32) as u8), false)
            .await
            .unwrap();
        acked += 1;
        tokio::task::yield_now().await;
    }
    acked
}

/// A replica joining under writes is filled, verified and promoted; it then holds exactly
/// what the members hold, stale bytes it had included, and is a member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuilt_replica_catches_up_under_writes_and_becomes_a_member() {
    let replicas = three();
    let membership = Arc::new(TestMembership::default());
    // Small chunks, so that the writer's writes land before, inside and after the copy.
    let config = EngineConfig {
        rebuild_chunk: 16 << 10,
        ..EngineConfig::default()
    };
    let e = engine_with(&replicas, Arc::clone(&membership), config);
    for i in 0..64u64 {
        e.write(i * 16384, block(i as u8 + 1), false).await.unwrap();
    }
    let target = MemReplica::with_jitter("r-new", false, 50);
    // A returning replica: stale bytes everywhere.
    target.data.lock().unwrap().fill(0xee);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_until(e.clone(), Arc::clone(&stop), 7));
    let rebuild = e.start_rebuild(Arc::clone(&target) as Member).unwrap();
    assert_eq!(e.rebuilds().len(), 1);
    let status = rebuild.await.unwrap();
    stop.store(true, Ordering::SeqCst);
    let acked = writer.await.unwrap();
    // Writes went on while the copy ran (64 chunks, each a write to the target), so some
    // reached the target directly.
    assert!(acked >= 10, "only {acked} writes during the rebuild");
    assert!(target.writes.load(Ordering::SeqCst) > 64);
    assert_eq!(status.state, RebuildState::Done, "{status:?}");
    assert_eq!(status.done, SIZE);
    assert_eq!(
        *membership.promotions.lock().unwrap(),
        vec!["r-new".to_string()]
    );
    assert!(e.member_ids().contains(&"r-new".to_string()));
    assert!(e.rebuilds().is_empty());
    // Writes after the promotion reach it as a member.
    e.write(0, block(0x42), false).await.unwrap();
    let expected = replicas[0].all();
    for r in replicas.iter().chain([&target]) {
        assert!(r.all() == expected, "{} differs from the members", r.id);
    }
    assert_eq!(target.bytes(0, 4096), block(0x42).to_vec());
}

/// A volume grown while a replica rebuilds: the copy covers the old size, and what lies
/// past it reaches the target as ordinary writes (the grown range is zeros everywhere
/// before), so the promoted replica holds exactly what the members hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_grown_during_a_rebuild_ends_identical_on_the_target() {
    let half = SIZE / 2;
    let replicas = three();
    let members: Vec<Member> = replicas.iter().map(|r| Arc::clone(r) as Member).collect();
    let config = EngineConfig {
        rebuild_chunk: 16 << 10,
        export_size: SIZE,
        ..EngineConfig::default()
    };
    let membership = Arc::new(TestMembership::default());
    let e = Engine::with_config("vol-1", half, members, membership, config).unwrap();
    for i in 0..32u64 {
        e.write(i * 16384, block(i as u8 + 1), false).await.unwrap();
    }
    let target = MemReplica::with_jitter("r-new", false, 200);
    target.data.lock().unwrap()[..half as usize].fill(0xee);
    let rebuild = e.start_rebuild(Arc::clone(&target) as Member).unwrap();
    while e.rebuilds().first().is_none_or(|s| s.done == 0) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(e.grow(SIZE).unwrap(), SIZE);
    for i in 0..16u64 {
        e.write(half + i * 8192, block(0x80 + i as u8), false)
            .await
            .unwrap();
    }
    e.write(0, block(0x42), false).await.unwrap();
    let status = rebuild.await.unwrap();
    assert_eq!(status.state, RebuildState::Done, "{status:?}");
    assert!(
        status.done < SIZE,
        "the copy was meant to cover the old size only"
    );
    let expected = replicas[0].all();
    assert_eq!(replicas[0].bytes(half, 4096), block(0x80).to_vec());
    for r in replicas.iter().chain([&target]) {
        assert!(r.all() == expected, "{} differs from the members", r.id);
    }
}

/// A target that fails stops only its rebuild: the writes are acknowledged, nobody is
/// removed, nothing is promoted; a failed promotion leaves it out too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_target_stops_its_rebuild_and_nothing_else() {
    let replicas = three();
    let membership = Arc::new(TestMembership::default());
    let config = EngineConfig {
        rebuild_chunk: 16 << 10,
        ..EngineConfig::default()
    };
    let e = engine_with(&replicas, Arc::clone(&membership), config);
    // The target fails part-way while a writer's writes reach it: every one of them is
    // acknowledged (write_until unwraps each), and nobody is removed.
    let target = MemReplica::with_jitter("r-bad", false, 50);
    target.fail_writes_after.store(20, Ordering::SeqCst);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_until(e.clone(), Arc::clone(&stop), 3));
    let status = e
        .start_rebuild(Arc::clone(&target) as Member)
        .unwrap()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    stop.store(true, Ordering::SeqCst);
    assert!(writer.await.unwrap() > 0);
    assert_eq!(status.state, RebuildState::Failed);
    let why = status.error.unwrap();
    // Either the copy's write or a forwarded write met the failure first.
    assert!(
        why.contains("target") || why.contains("write failed"),
        "{why}"
    );
    e.write(4096, block(9), false).await.unwrap();
    assert!(membership.removed().is_empty());
    assert!(membership.promotions.lock().unwrap().is_empty());
    assert!(!e.member_ids().contains(&"r-bad".to_string()));

    membership.refuse_promotions.store(true, Ordering::SeqCst);
    let target = MemReplica::new("r-unpromoted", false);
    let status = e
        .start_rebuild(Arc::clone(&target) as Member)
        .unwrap()
        .await
        .unwrap();
    assert_eq!(status.state, RebuildState::Failed);
    assert!(status.error.unwrap().contains("promotion"));
    assert!(!e.member_ids().contains(&"r-unpromoted".to_string()));
    // And a member cannot be rebuilt onto itself.
    assert!(e.start_rebuild(Arc::clone(&replicas[0]) as Member).is_err());
}
