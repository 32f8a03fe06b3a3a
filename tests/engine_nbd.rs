//! The engine end to end over its NBD socket: real NBD clients (nbdcopy, qemu-img, fio's
//! nbd engine) and a raw client written here against the spec, with members that are files
//! in a temporary directory (wrapped to count calls and inject failures) and a membership
//! double that records removals; then the same clients against engines whose members are
//! real replicas behind real replica servers on loopback (the cluster's data path).
//!
//! Needs `nbdcopy` (libnbd-bin), `qemu-img` (qemu-utils) and `fio` on the PATH; `.ci/run`
//! installs them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use palisade::engine::{Engine, EngineConfig, EngineError, FileReplica, Member, Membership};
use palisade::replica::client::ReplicaClient;
use palisade::replica::io::{ReplicaIo, ReplicaIoError};
use palisade::replica::server::{LocalReplicas, ReplicaServer};
use palisade::replica::{self, token};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinHandle;

const MIB: u64 = 1 << 20;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EPERM: u32 = 1;

// ---- members and membership doubles ----

/// A file member that counts what reaches it and can fail or fence on demand.
struct Probe {
    inner: FileReplica,
    local: bool,
    writes: AtomicU64,
    fua_writes: AtomicU64,
    flushes: AtomicU64,
    /// Writes fail once this many succeeded.
    fail_after: AtomicU64,
    /// Every request is answered Fenced once this many writes succeeded.
    fence_after: AtomicU64,
    /// Writes at this offset take 500 ms.
    slow_offset: AtomicU64,
}

impl Probe {
    fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    fn fenced(&self) -> Result<(), ReplicaIoError> {
        if self.writes() >= self.fence_after.load(Ordering::SeqCst) {
            return Err(ReplicaIoError::Fenced {
                replica: self.inner.id().to_string(),
                ours: 1,
                current: 2,
            });
        }
        Ok(())
    }
}

#[async_trait]
impl ReplicaIo for Probe {
    fn id(&self) -> &str {
        self.inner.id()
    }

    fn is_local(&self) -> bool {
        self.local
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ReplicaIoError> {
        self.fenced()?;
        self.inner.read(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ReplicaIoError> {
        self.fenced()?;
        if offset == self.slow_offset.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if self.writes() >= self.fail_after.load(Ordering::SeqCst) {
            return Err(ReplicaIoError::Unreachable {
                replica: self.id().to_string(),
                why: "injected failure".into(),
            });
        }
        self.inner.write(offset, data, fua).await?;
        self.writes.fetch_add(1, Ordering::SeqCst);
        if fua {
            self.fua_writes.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), ReplicaIoError> {
        self.fenced()?;
        self.inner.flush().await?;
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u32) -> Result<(), ReplicaIoError> {
        self.fenced()?;
        self.inner.trim(offset, len).await
    }
}

/// Records removals (each waits for a permit of `gate`) and renews the lease until told
/// not to.
struct Recorder {
    removals: Mutex<Vec<String>>,
    gate: Semaphore,
    refuse_renewals: AtomicBool,
}

impl Recorder {
    fn new(open: bool) -> Arc<Recorder> {
        Arc::new(Recorder {
            removals: Mutex::new(Vec::new()),
            gate: Semaphore::new(if open { Semaphore::MAX_PERMITS } else { 0 }),
            refuse_renewals: AtomicBool::new(false),
        })
    }

    fn removed(&self) -> Vec<String> {
        self.removals.lock().unwrap().clone()
    }
}

#[async_trait]
impl Membership for Recorder {
    async fn remove_member(&self, replica_id: &str, _reason: &str) -> Result<(), String> {
        self.gate
            .acquire()
            .await
            .map_err(|e| e.to_string())?
            .forget();
        self.removals.lock().unwrap().push(replica_id.to_string());
        Ok(())
    }

    async fn renew_lease(&self) -> Result<Duration, String> {
        if self.refuse_renewals.load(Ordering::SeqCst) {
            return Err("controller unreachable".into());
        }
        Ok(Duration::MAX)
    }
}

// ---- a volume served on a socket ----

struct Volume {
    dir: tempfile::TempDir,
    socket: PathBuf,
    paths: Vec<PathBuf>,
    probes: Vec<Arc<Probe>>,
    engine: Engine,
    membership: Arc<Recorder>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), EngineError>>>,
}

impl Volume {
    async fn start(members: usize, size: u64) -> Volume {
        Volume::start_with(members, size, Recorder::new(true), EngineConfig::default()).await
    }

    async fn start_with(
        members: usize,
        size: u64,
        membership: Arc<Recorder>,
        config: EngineConfig,
    ) -> Volume {
        let dir = tempfile::Builder::new()
            .prefix("palisade-engine-")
            .tempdir()
            .unwrap();
        let mut paths = Vec::new();
        let mut probes = Vec::new();
        for i in 0..members {
            let path = dir.path().join(format!("r{i}.img"));
            std::fs::File::create(&path).unwrap().set_len(size).unwrap();
            probes.push(Arc::new(Probe {
                inner: FileReplica::open(format!("r{i}"), &path, size).unwrap(),
                local: i == 0,
                writes: AtomicU64::new(0),
                fua_writes: AtomicU64::new(0),
                flushes: AtomicU64::new(0),
                fail_after: AtomicU64::new(u64::MAX),
                fence_after: AtomicU64::new(u64::MAX),
                slow_offset: AtomicU64::new(u64::MAX),
            }));
            paths.push(path);
        }
        let member_list: Vec<Member> = probes.iter().map(|p| Arc::clone(p) as Member).collect();
        let engine = Engine::with_config(
            "vol-test",
            size,
            member_list,
            Arc::clone(&membership) as Arc<dyn Membership>,
            config,
        )
        .unwrap();
        let socket = dir.path().join("nbd.sock");
        let (stop, server) = serve(&engine, &socket).await;
        Volume {
            dir,
            socket,
            paths,
            probes,
            engine,
            membership,
            stop: Some(stop),
            server: Some(server),
        }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap().unwrap();
        }
        assert!(!self.socket.exists(), "the socket is removed on shutdown");
    }

    fn file(&self, i: usize) -> Vec<u8> {
        std::fs::read(&self.paths[i]).unwrap()
    }

    /// Every listed member's file is byte-identical to the first listed one's.
    fn assert_identical(&self, members: &[usize]) {
        let first = self.file(members[0]);
        for &i in &members[1..] {
            assert!(
                self.file(i) == first,
                "member r{i} differs from r{}",
                members[0]
            );
        }
    }
}

/// Serves `engine` on `socket` until the returned sender is used; returns once the socket
/// accepts connections.
async fn serve(
    engine: &Engine,
    socket: &Path,
) -> (oneshot::Sender<()>, JoinHandle<Result<(), EngineError>>) {
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn({
        let engine = engine.clone();
        let socket = socket.to_path_buf();
        async move {
            engine
                .serve_unix(&socket, async move {
                    let _ = stopped.await;
                })
                .await
        }
    });
    for _ in 0..500 {
        if UnixStream::connect(socket).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (stop, server)
}

// ---- external tools ----

async fn run(program: &str, args: &[&str]) -> String {
    let out = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!("cannot run {program} ({e}); install nbdkit libnbd-bin qemu-utils fio")
        });
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Pseudo-random bytes, with a zero stretch in the middle so that copies exercise zeroing.
fn random_image(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    data[len / 4..len / 2].fill(0);
    std::fs::write(path, &data).unwrap();
    data
}

// ---- a raw client, written from the spec ----

struct Client {
    stream: UnixStream,
    size: u64,
    flags: u16,
    next: u64,
}

impl Client {
    async fn connect(socket: &Path) -> Client {
        let mut stream = UnixStream::connect(socket).await.unwrap();
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting).await.unwrap();
        assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
        stream.write_all(&3u32.to_be_bytes()).await.unwrap();
        // NBD_OPT_GO, default export, asking for the block size.
        let mut go = Vec::new();
        go.extend_from_slice(b"IHAVEOPT");
        go.extend_from_slice(&7u32.to_be_bytes());
        go.extend_from_slice(&8u32.to_be_bytes());
        go.extend_from_slice(&0u32.to_be_bytes());
        go.extend_from_slice(&1u16.to_be_bytes());
        go.extend_from_slice(&3u16.to_be_bytes());
        stream.write_all(&go).await.unwrap();
        let (mut size, mut flags) = (0, 0);
        loop {
            let mut header = [0u8; 20];
            stream.read_exact(&mut header).await.unwrap();
            let reply = u32::from_be_bytes(header[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(header[16..20].try_into().unwrap()) as usize;
            let mut data = vec![0u8; len];
            stream.read_exact(&mut data).await.unwrap();
            match reply {
                1 => break,
                3 if data[..2] == [0, 0] => {
                    size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                    flags = u16::from_be_bytes(data[10..12].try_into().unwrap());
                }
                3 => {}
                other => panic!("unexpected option reply {other:#x}"),
            }
        }
        Client {
            stream,
            size,
            flags,
            next: 1,
        }
    }

    async fn send(&mut self, flags: u16, ty: u16, offset: u64, len: u32, payload: &[u8]) -> u64 {
        let handle = self.next;
        self.next += 1;
        let mut req = Vec::with_capacity(28 + payload.len());
        req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        req.extend_from_slice(&flags.to_be_bytes());
        req.extend_from_slice(&ty.to_be_bytes());
        req.extend_from_slice(&handle.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&len.to_be_bytes());
        req.extend_from_slice(payload);
        self.stream.write_all(&req).await.unwrap();
        handle
    }

    /// Reads one simple reply: (handle, error).
    async fn reply(&mut self) -> (u64, u32) {
        let mut header = [0u8; 16];
        self.stream.read_exact(&mut header).await.unwrap();
        assert_eq!(header[..4], 0x6744_6698u32.to_be_bytes());
        let error = u32::from_be_bytes(header[4..8].try_into().unwrap());
        let handle = u64::from_be_bytes(header[8..16].try_into().unwrap());
        (handle, error)
    }

    async fn request(&mut self, flags: u16, ty: u16, offset: u64, len: u32, payload: &[u8]) -> u32 {
        let handle = self.send(flags, ty, offset, len, payload).await;
        let (h, error) = self.reply().await;
        assert_eq!(h, handle);
        error
    }

    async fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> u32 {
        self.request(u16::from(fua), 1, offset, data.len() as u32, data)
            .await
    }

    async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        let handle = self.send(0, 0, offset, len, &[]).await;
        let (h, error) = self.reply().await;
        assert_eq!(h, handle);
        if error != 0 {
            return Err(error);
        }
        let mut data = vec![0u8; len as usize];
        self.stream.read_exact(&mut data).await.unwrap();
        Ok(data)
    }

    async fn flush(&mut self) -> u32 {
        self.request(0, 3, 0, 0, &[]).await
    }

    /// True when the server closed the connection (within a few seconds).
    async fn closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), self.stream.read(&mut byte)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

// ---- tests ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nbdcopy_in_and_out_on_one_two_and_three_members() {
    for members in 1..=3 {
        let size = 32 * MIB;
        let mut v = Volume::start(members, size).await;
        let src = v.dir.path().join("src.img");
        let data = random_image(&src, size as usize, 7 + members as u64);
        let out = v.dir.path().join("out.img");
        std::fs::File::create(&out).unwrap().set_len(size).unwrap();
        run("nbdcopy", &["--flush", src.to_str().unwrap(), &v.uri()]).await;
        run("nbdcopy", &[&v.uri(), out.to_str().unwrap()]).await;
        assert!(
            std::fs::read(&out).unwrap() == data,
            "{members} members: copy differs"
        );
        let flushes: Vec<u64> = v
            .probes
            .iter()
            .map(|p| p.flushes.load(Ordering::SeqCst))
            .collect();
        assert!(
            flushes.iter().all(|f| *f > 0),
            "flush reached every member: {flushes:?}"
        );
        v.stop().await;
        for i in 0..members {
            assert!(v.file(i) == data, "{members} members: member r{i} differs");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn qemu_img_convert_and_compare() {
    let size = 16 * MIB;
    let mut v = Volume::start(2, size).await;
    let src = v.dir.path().join("src.img");
    let data = random_image(&src, size as usize, 42);
    let uri = v.uri();
    let src = src.to_str().unwrap();
    run(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src, &uri],
    )
    .await;
    run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src, &uri],
    )
    .await;
    let info = run("qemu-img", &["info", "--output=json", &uri]).await;
    assert!(
        info.contains(&format!("\"virtual-size\": {size}")),
        "{info}"
    );
    v.stop().await;
    assert!(v.file(0) == data);
    v.assert_identical(&[0, 1]);
}

async fn fio_verify(uri: &str, size: u64, name: &str) {
    run(
        "fio",
        &[
            &format!("--name={name}"),
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            &format!("--size={size}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--randrepeat=0",
            "--verify_state_save=0",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fio_random_writes_verify_on_one_two_and_three_members() {
    for members in 1..=3 {
        let size = 32 * MIB;
        let mut v = Volume::start(members, size).await;
        fio_verify(&v.uri(), size, &format!("verify{members}")).await;
        let stats = v.engine.stats();
        assert!(stats.writes >= size / 4096, "{stats:?}");
        assert_eq!(stats.errors, 0);
        v.stop().await;
        v.assert_identical(&(0..members).collect::<Vec<_>>());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_member_is_removed_before_the_next_acknowledged_write() {
    let size = 4 * MIB;
    let membership = Recorder::new(false);
    let mut v = Volume::start_with(3, size, Arc::clone(&membership), EngineConfig::default()).await;
    v.probes[2].fail_after.store(20, Ordering::SeqCst);
    let mut model = vec![0u8; size as usize];
    let mut client = Client::connect(&v.socket).await;
    for i in 0..20u64 {
        let block = vec![i as u8 + 1; 4096];
        assert_eq!(client.write(i * 4096, &block, false).await, 0);
        model[(i * 4096) as usize..((i + 1) * 4096) as usize].copy_from_slice(&block);
    }
    // The 21st write fails on r2: no acknowledgement while the removal is not persisted.
    let handle = client.send(0, 1, 20 * 4096, 4096, &[21u8; 4096]).await;
    let early = tokio::time::timeout(Duration::from_millis(300), client.reply()).await;
    assert!(early.is_err(), "acknowledged before r2 was removed");
    assert!(membership.removed().is_empty());
    membership.gate.add_permits(1);
    assert_eq!(client.reply().await, (handle, 0));
    model[20 * 4096..21 * 4096].fill(21);
    assert_eq!(membership.removed(), vec!["r2"]);
    assert_eq!(v.engine.member_ids(), vec!["r0", "r1"]);

    // Writes go on, on the two members left.
    for i in 21..200u64 {
        let block = vec![(i % 250) as u8 + 1; 4096];
        let offset = (i * 7919 % 1000) * 4096;
        assert_eq!(client.write(offset, &block, i % 10 == 0).await, 0);
        model[offset as usize..offset as usize + 4096].copy_from_slice(&block);
    }
    assert_eq!(client.read(0, 4096).await.unwrap(), vec![1u8; 4096]);
    assert_eq!(client.flush().await, 0);
    assert_eq!(
        v.probes[2].writes(),
        20,
        "nothing more went to the removed member"
    );
    v.stop().await;
    assert!(v.file(0) == model, "r0 holds every acknowledged write");
    v.assert_identical(&[0, 1]);
    assert!(v.file(2) != model);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fio_verify_passes_while_a_member_fails_midway() {
    let size = 16 * MIB;
    let mut v = Volume::start(3, size).await;
    v.probes[1].fail_after.store(1000, Ordering::SeqCst);
    fio_verify(&v.uri(), size, "failing").await;
    assert_eq!(v.membership.removed(), vec!["r1"]);
    assert_eq!(v.engine.stats().member_removals, 1);
    v.stop().await;
    v.assert_identical(&[0, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fenced_by_a_member_the_engine_stops_serving() {
    let size = 4 * MIB;
    let mut v = Volume::start(3, size).await;
    v.probes[1].fence_after.store(10, Ordering::SeqCst);
    let mut client = Client::connect(&v.socket).await;
    for i in 0..10u64 {
        assert_eq!(client.write(i * 4096, &[1u8; 4096], false).await, 0);
    }
    assert_eq!(client.write(0, &[2u8; 4096], false).await, EPERM);
    let files: Vec<Vec<u8>> = (0..3).map(|i| v.file(i)).collect();
    let writes: Vec<u64> = v.probes.iter().map(|p| p.writes()).collect();
    assert_eq!(client.write(8192 * 100, &[3u8; 4096], false).await, EPERM);
    assert_eq!(client.read(0, 4096).await, Err(EPERM));
    assert_eq!(client.flush().await, EPERM);
    // A new client gets the same answer.
    let mut other = Client::connect(&v.socket).await;
    assert_eq!(other.write(4096 * 500, &[4u8; 4096], true).await, EPERM);
    assert_eq!(
        v.probes.iter().map(|p| p.writes()).collect::<Vec<_>>(),
        writes,
        "a fenced engine writes nothing more"
    );
    assert_eq!(v.engine.state(), palisade::engine::EngineState::Fenced);
    assert!(v.membership.removed().is_empty());
    v.stop().await;
    for (i, before) in files.iter().enumerate() {
        assert!(&v.file(i) == before);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_engine_whose_lease_lapses_stops_serving() {
    let size = 4 * MIB;
    let membership = Recorder::new(true);
    let config = EngineConfig {
        lease: Duration::from_millis(800),
        renew_interval: Duration::from_millis(100),
        ..EngineConfig::default()
    };
    let mut v = Volume::start_with(2, size, Arc::clone(&membership), config).await;
    let mut client = Client::connect(&v.socket).await;
    // Renewals keep it serving well past one lease.
    for i in 0..20u64 {
        assert_eq!(client.write(i * 4096, &[1u8; 4096], false).await, 0);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    membership.refuse_renewals.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let files: Vec<Vec<u8>> = (0..2).map(|i| v.file(i)).collect();
    assert_eq!(client.write(0, &[2u8; 4096], false).await, EPERM);
    assert_eq!(client.read(0, 10).await, Err(EPERM));
    assert_eq!(
        v.engine.state(),
        palisade::engine::EngineState::LeaseExpired
    );
    membership.refuse_renewals.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        client.write(0, &[2u8; 4096], false).await,
        EPERM,
        "no revival"
    );
    v.stop().await;
    for (i, before) in files.iter().enumerate() {
        assert!(&v.file(i) == before, "r{i} changed after the lease lapsed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_disconnects_that_client_only_and_changes_nothing() {
    let size = 4 * MIB;
    let mut v = Volume::start(2, size).await;
    let mut good = Client::connect(&v.socket).await;
    assert_eq!(good.write(0, &[5u8; 8192], false).await, 0);
    assert_eq!(good.flush().await, 0);
    let files: Vec<Vec<u8>> = (0..2).map(|i| v.file(i)).collect();

    // Bad request magic.
    let mut c = Client::connect(&v.socket).await;
    c.stream.write_all(&[0xde; 28]).await.unwrap();
    assert!(c.closed().await, "bad magic");
    // Unknown command.
    let mut c = Client::connect(&v.socket).await;
    c.send(0, 99, 0, 4096, &[]).await;
    assert!(c.closed().await, "unknown command");
    // A write announcing more than 32 MiB.
    let mut c = Client::connect(&v.socket).await;
    c.send(0, 1, 0, 33 << 20, &[7u8; 4096]).await;
    assert!(c.closed().await, "oversized write");
    // A read asking for more than 32 MiB.
    let mut c = Client::connect(&v.socket).await;
    c.send(0, 0, 0, u32::MAX, &[]).await;
    assert!(c.closed().await, "oversized read");
    // Garbage during the handshake.
    let mut raw = UnixStream::connect(&v.socket).await.unwrap();
    let mut greeting = [0u8; 18];
    raw.read_exact(&mut greeting).await.unwrap();
    raw.write_all(&[0u8, 0, 0, 1]).await.unwrap();
    raw.write_all(b"NOTANOPTION.....").await.unwrap();
    let mut byte = [0u8; 1];
    assert!(matches!(raw.read(&mut byte).await, Ok(0) | Err(_)));

    // The good client is unaffected and the data unchanged.
    assert_eq!(good.read(0, 8192).await.unwrap(), vec![5u8; 8192]);
    assert_eq!(good.write(8192, &[6u8; 4096], false).await, 0);
    assert_eq!(good.read(8192, 4096).await.unwrap(), vec![6u8; 4096]);
    let mut expected = files[0].clone();
    expected[8192..12288].fill(6);
    v.stop().await;
    for i in 0..2 {
        assert!(v.file(i) == expected, "r{i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_beyond_the_end_are_refused_and_the_connection_goes_on() {
    let size = 4 * MIB;
    let mut v = Volume::start(1, size).await;
    let mut c = Client::connect(&v.socket).await;
    assert_eq!(c.size, size);
    // HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES, CAN_MULTI_CONN.
    assert_eq!(c.flags, 1 | 4 | 8 | 32 | 64 | 256);
    assert_eq!(c.read(size, 1).await, Err(EINVAL));
    assert_eq!(c.read(size - 10, 11).await, Err(EINVAL));
    assert_eq!(c.read(u64::MAX - 1, 4096).await, Err(EINVAL));
    assert_eq!(c.request(0, 4, size - 1, 2, &[]).await, EINVAL, "trim");
    // The NBD spec asks for ENOSPC on writes past the end.
    assert_eq!(c.write(size - 1, &[1, 2], false).await, ENOSPC);
    assert_eq!(
        c.request(0, 6, size, 4096, &[]).await,
        ENOSPC,
        "write zeroes"
    );
    // Zero lengths, unadvertised commands and flags.
    assert_eq!(c.read(0, 0).await, Err(EINVAL));
    assert_eq!(c.request(0, 5, 0, 4096, &[]).await, EINVAL, "cache");
    assert_eq!(c.request(1 << 2, 0, 0, 4096, &[]).await, EINVAL, "DF flag");
    assert_eq!(
        c.request(2, 1, 0, 1, &[9]).await,
        EINVAL,
        "NO_HOLE on a write"
    );
    // Still serving, and nothing was written.
    assert_eq!(c.write(size - 2, &[1, 2], true).await, 0);
    assert_eq!(c.read(size - 4, 4).await.unwrap(), vec![0, 0, 1, 2]);
    v.stop().await;
    assert_eq!(v.engine.stats().writes, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_on_one_connection_run_concurrently_and_replies_come_out_of_order() {
    let size = 4 * MIB;
    let mut v = Volume::start(2, size).await;
    v.probes[1].slow_offset.store(0, Ordering::SeqCst);
    let mut c = Client::connect(&v.socket).await;
    let slow = c.send(1, 1, 0, 4096, &[1u8; 4096]).await;
    let fast = c.send(0, 1, 8192, 4096, &[2u8; 4096]).await;
    assert_eq!(c.reply().await, (fast, 0));
    assert_eq!(c.reply().await, (slow, 0));
    // An overlapping write queued behind the slow one lands after it on every member.
    let slow = c.send(0, 1, 0, 4096, &[3u8; 4096]).await;
    let behind = c.send(0, 1, 2048, 4096, &[4u8; 4096]).await;
    let first = c.reply().await;
    let second = c.reply().await;
    assert_eq!((first, second), ((slow, 0), (behind, 0)));
    assert_eq!(&c.read(0, 4096).await.unwrap()[..2048], &[3u8; 2048][..]);
    assert_eq!(c.read(2048, 4096).await.unwrap(), vec![4u8; 4096]);
    let fua = v.probes.iter().map(|p| p.fua_writes.load(Ordering::SeqCst));
    assert!(fua.into_iter().all(|n| n == 1), "FUA reached every member");
    // NBD_CMD_DISC: outstanding requests are answered, then the connection closes.
    let last = c.send(0, 1, 4096 * 10, 4096, &[5u8; 4096]).await;
    c.send(0, 2, 0, 0, &[]).await;
    assert_eq!(c.reply().await, (last, 0));
    assert!(c.closed().await);
    v.stop().await;
    v.assert_identical(&[0, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_zeroes_and_trim_reach_every_member() {
    let size = 4 * MIB;
    let mut v = Volume::start(3, size).await;
    let mut c = Client::connect(&v.socket).await;
    assert_eq!(c.write(0, &vec![9u8; 1 << 20], false).await, 0);
    assert_eq!(c.request(0, 4, 4096, 4096, &[]).await, 0, "trim");
    assert_eq!(c.request(0, 6, 65536, 65536, &[]).await, 0, "write zeroes");
    assert_eq!(
        c.request(2 | 1, 6, 200_000, 100_000, &[]).await,
        0,
        "no hole, fua"
    );
    let data = c.read(0, 1 << 20).await.unwrap();
    let mut expected = vec![9u8; 1 << 20];
    expected[4096..8192].fill(0);
    expected[65536..131072].fill(0);
    expected[200_000..300_000].fill(0);
    assert!(data == expected);
    v.stop().await;
    v.assert_identical(&[0, 1, 2]);
    assert!(v.file(0)[..1 << 20] == expected[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_socket_is_replaced_and_another_file_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.img");
    std::fs::File::create(&path).unwrap().set_len(MIB).unwrap();
    let member = Arc::new(FileReplica::open("r0", &path, MIB).unwrap()) as Member;
    let engine = Engine::new("v", MIB, vec![member], Recorder::new(true)).unwrap();
    let in_the_way = dir.path().join("file");
    std::fs::write(&in_the_way, b"keep").unwrap();
    let err = engine
        .serve_unix(&in_the_way, std::future::pending())
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::Socket { .. }), "{err}");
    assert_eq!(std::fs::read(&in_the_way).unwrap(), b"keep");

    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let served = engine.serve_unix(&stale, tokio::time::sleep(Duration::from_millis(200)));
    let probe = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        Client::connect(&stale).await.size
    };
    let (served, size) = tokio::join!(served, probe);
    served.unwrap();
    assert_eq!(size, MIB);
}

// ---- network members: real replicas behind real replica servers on loopback ----

/// The cluster secret the network tests' replica servers verify tokens with.
const SECRET: [u8; 32] = [7; 32];
/// The attachment epoch of the network tests' engines.
const EPOCH: u64 = 1;

/// One node's replica server on loopback, serving a disk that holds one replica of the
/// volume.
struct ReplicaNode {
    replica: replica::ReplicaDir,
    addr: std::net::SocketAddr,
    /// In-process sessions on the server's replicas, as the node's own engines open them.
    local: LocalReplicas,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl ReplicaNode {
    async fn start(disk: &Path, volume: &str, replica_id: &str, size: u64) -> ReplicaNode {
        replica::init_disk(disk).unwrap();
        let replica = replica::create(disk, replica_id, volume, size).unwrap();
        let server = ReplicaServer::bind("127.0.0.1:0", vec![disk.to_path_buf()], SECRET.to_vec())
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        let local = server.local();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async move {
            let _ = stopped.await;
        }));
        ReplicaNode {
            replica,
            addr,
            local,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops the server as a stopping node would: it reads no more requests, answers those
    /// it has read, and closes its sessions.
    async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("the replica server stops")
                .unwrap();
        }
    }

    /// The replica's data file, as the server left it on disk.
    fn file(&self) -> Vec<u8> {
        std::fs::read(self.replica.data_path()).unwrap()
    }
}

/// A replica session (over TCP, or in process) that counts the writes the replica
/// completed.
struct Tap {
    inner: Member,
    completed_writes: AtomicU64,
}

#[async_trait]
impl ReplicaIo for Tap {
    fn id(&self) -> &str {
        self.inner.id()
    }

    fn is_local(&self) -> bool {
        self.inner.is_local()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ReplicaIoError> {
        self.inner.read(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ReplicaIoError> {
        self.inner.write(offset, data, fua).await?;
        self.completed_writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn flush(&self) -> Result<(), ReplicaIoError> {
        self.inner.flush().await
    }

    async fn trim(&self, offset: u64, len: u32) -> Result<(), ReplicaIoError> {
        self.inner.trim(offset, len).await
    }
}

/// A removal as [`Witness`] recorded it.
#[derive(Debug)]
struct Removal {
    replica: String,
    /// Writes the engine had counted as acknowledged when the removal was recorded (it
    /// counts a write before it answers the client).
    acknowledged: u64,
    /// Writes the removed replica had completed by then (read after `acknowledged`).
    completed_by_replica: u64,
}

/// A membership that records removals and, at each, what the engine had acknowledged and
/// what the removed replica had completed. It holds each removal for a while before
/// recording it, so that an engine that acknowledged writes the replica missed before the
/// removal was persisted would have done so by then: until the removal is recorded, every
/// acknowledged write must have been completed by the replica (acknowledged ≤ completed).
#[derive(Default)]
struct Witness {
    engine: Mutex<Option<Engine>>,
    taps: Mutex<Vec<Arc<Tap>>>,
    removals: Mutex<Vec<Removal>>,
}

#[async_trait]
impl Membership for Witness {
    async fn remove_member(&self, replica_id: &str, _reason: &str) -> Result<(), String> {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let engine = self.engine.lock().unwrap().clone();
        let acknowledged = engine.map_or(0, |e| e.stats().writes);
        let completed_by_replica = self
            .taps
            .lock()
            .unwrap()
            .iter()
            .find(|t| t.id() == replica_id)
            .map_or(0, |t| t.completed_writes.load(Ordering::SeqCst));
        self.removals.lock().unwrap().push(Removal {
            replica: replica_id.to_string(),
            acknowledged,
            completed_by_replica,
        });
        Ok(())
    }

    async fn renew_lease(&self) -> Result<Duration, String> {
        Ok(Duration::MAX)
    }
}

/// A volume whose engine's members are sessions on replica servers on loopback, one server
/// per member (as on separate nodes), opened with the attachment's token; the first member
/// is the local one: over TCP like the others, or (`local_in_process`) in process as a
/// node's engine opens its own node's replica.
struct NetVolume {
    dir: tempfile::TempDir,
    socket: PathBuf,
    nodes: Vec<ReplicaNode>,
    engine: Engine,
    witness: Arc<Witness>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), EngineError>>>,
}

impl NetVolume {
    async fn start(members: usize, size: u64) -> NetVolume {
        NetVolume::start_with(members, size, false).await
    }

    async fn start_with(members: usize, size: u64, local_in_process: bool) -> NetVolume {
        let dir = tempfile::Builder::new()
            .prefix("palisade-engine-net-")
            .tempdir()
            .unwrap();
        let volume = "vol-net";
        let token = token::attachment_token(&SECRET, volume, EPOCH);
        let mut nodes = Vec::new();
        let mut taps = Vec::new();
        for i in 0..members {
            let replica_id = format!("r{i}");
            let disk = dir.path().join(format!("node{i}-disk"));
            let node = ReplicaNode::start(&disk, volume, &replica_id, size).await;
            let session: Member = if i == 0 && local_in_process {
                let session = node
                    .local
                    .open(volume, &replica_id, EPOCH, &token)
                    .await
                    .unwrap();
                assert_eq!(session.size(), size);
                Arc::new(session)
            } else {
                let client =
                    ReplicaClient::connect(node.addr, volume, &replica_id, EPOCH, &token, i == 0)
                        .await
                        .unwrap();
                assert_eq!(client.size(), size);
                Arc::new(client)
            };
            taps.push(Arc::new(Tap {
                inner: session,
                completed_writes: AtomicU64::new(0),
            }));
            nodes.push(node);
        }
        let witness = Arc::new(Witness::default());
        *witness.taps.lock().unwrap() = taps.clone();
        let members: Vec<Member> = taps.iter().map(|t| Arc::clone(t) as Member).collect();
        let engine = Engine::new(
            volume,
            size,
            members,
            Arc::clone(&witness) as Arc<dyn Membership>,
        )
        .unwrap();
        *witness.engine.lock().unwrap() = Some(engine.clone());
        let socket = dir.path().join("nbd.sock");
        let (stop, server) = serve(&engine, &socket).await;
        NetVolume {
            dir,
            socket,
            nodes,
            engine,
            witness,
            stop: Some(stop),
            server: Some(server),
        }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// Flushes the engine, stops it, then stops every replica server still running.
    async fn stop(&mut self) {
        self.engine.flush().await.unwrap();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap().unwrap();
        }
        assert!(!self.socket.exists(), "the socket is removed on shutdown");
        self.witness.engine.lock().unwrap().take();
        for node in &mut self.nodes {
            node.stop().await;
        }
    }

    /// Every listed member's data file is byte-identical to the first listed one's, which
    /// holds data (not only zeros).
    fn assert_identical(&self, members: &[usize]) {
        let first = self.nodes[members[0]].file();
        assert!(
            first.iter().any(|b| *b != 0),
            "r{} holds no data at all",
            members[0]
        );
        for &i in &members[1..] {
            assert!(
                self.nodes[i].file() == first,
                "the data file of r{i} differs from r{}'s",
                members[0]
            );
        }
    }
}

/// fio's nbd engine writing at random with mixed block sizes from 4 jobs (4 NBD
/// connections, each on its own quarter of the volume) at queue depth 16, with a flush every
/// 32 writes, then reading everything back to verify it against crc32c checksums.
fn fio_mixed_verify(uri: &str, size: u64, name: &str) -> tokio::process::Command {
    let mut fio = tokio::process::Command::new("fio");
    fio.args([
        &format!("--name={name}"),
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--numjobs=4",
        &format!("--size={}", size / 4),
        &format!("--offset_increment={}", size / 4),
        "--rw=randwrite",
        "--bssplit=4k/40:16k/20:64k/20:256k/20",
        "--iodepth=16",
        "--fsync=32",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--randrepeat=0",
        "--group_reporting",
        "--verify_state_save=0",
    ]);
    fio
}

async fn run_command(mut command: tokio::process::Command) -> String {
    let out = command
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {command:?} ({e}); install fio"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{command:?} failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nbdcopy_round_trip_on_one_two_and_three_network_members() {
    for members in 1..=3 {
        let size = 32 * MIB;
        let mut v = NetVolume::start(members, size).await;
        let src = v.dir.path().join("src.img");
        let data = random_image(&src, size as usize, 70 + members as u64);
        let out = v.dir.path().join("out.img");
        std::fs::File::create(&out).unwrap().set_len(size).unwrap();
        run("nbdcopy", &["--flush", src.to_str().unwrap(), &v.uri()]).await;
        run("nbdcopy", &[&v.uri(), out.to_str().unwrap()]).await;
        assert!(
            std::fs::read(&out).unwrap() == data,
            "{members} network members: the copy read back differs"
        );
        v.stop().await;
        for (i, node) in v.nodes.iter().enumerate() {
            assert!(
                node.file() == data,
                "{members} network members: r{i}'s data file differs"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fio_mixed_random_writes_verify_on_one_two_and_three_network_members() {
    // 1, 2 and 3 members over TCP; then 3 with the local one in process, as in a cluster.
    for (members, local_in_process) in [(1, false), (2, false), (3, false), (3, true)] {
        let size = 32 * MIB;
        let mut v = NetVolume::start_with(members, size, local_in_process).await;
        let name = format!(
            "net{members}{}",
            if local_in_process { "-local" } else { "" }
        );
        let out = run_command(fio_mixed_verify(&v.uri(), size, &name)).await;
        let stats = v.engine.stats();
        assert!(stats.written_bytes >= size, "{stats:?}\n{out}");
        assert!(stats.flushes > 0, "{stats:?}");
        assert_eq!(stats.errors, 0, "{stats:?}");
        assert!(v.witness.removals.lock().unwrap().is_empty());
        v.stop().await;
        v.assert_identical(&(0..members).collect::<Vec<_>>());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fio_verify_passes_while_a_members_replica_server_stops_midway() {
    let size = 32 * MIB;
    let mut v = NetVolume::start(3, size).await;
    let fio = tokio::spawn(run_command(fio_mixed_verify(&v.uri(), size, "stopping")));
    // Part-way through fio's write phase, the local member's server stops (its node goes
    // away); the engine must drop that member and go on with the other two.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while v.engine.stats().written_bytes < size / 3 {
        assert!(!fio.is_finished(), "fio ended before a third was written");
        assert!(tokio::time::Instant::now() < deadline, "fio is not writing");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    v.nodes[0].stop().await;
    fio.await.unwrap();

    let stats = v.engine.stats();
    assert_eq!(stats.member_removals, 1, "{stats:?}");
    assert_eq!(v.engine.member_ids(), vec!["r1", "r2"]);
    let removals = std::mem::take(&mut *v.witness.removals.lock().unwrap());
    assert_eq!(removals.len(), 1, "{removals:?}");
    let removal = &removals[0];
    println!("{removal:?}; engine at the end: {stats:?}");
    assert_eq!(removal.replica, "r0");
    assert!(
        removal.acknowledged <= removal.completed_by_replica,
        "writes r0 missed were acknowledged before its removal was recorded: {removal:?}"
    );
    assert!(
        stats.writes > removal.acknowledged,
        "no write after the removal: the server did not stop part-way ({removal:?}, {stats:?})"
    );
    v.stop().await;
    v.assert_identical(&[1, 2]);
}
