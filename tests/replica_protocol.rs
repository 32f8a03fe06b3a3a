//! The replica server and client over real TCP on loopback, with real replica files: data
//! round trips, pipelining, tokens, epochs and fencing, malformed frames, restarts.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use palisade::replica;
use palisade::replica::client::ReplicaClient;
use palisade::replica::io::{ReplicaIo, ReplicaIoError};
use palisade::replica::server::{LocalReplicas, ReplicaServer};
use palisade::replica::token::{attachment_token, load_or_create_secret};
use palisade::replica::wire::{self, Open, Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const VOLUME: &str = "vol-1";
const REPLICA: &str = "r-1";

/// A replica server on loopback, over a tempdir with two disks (the replica on the second).
struct Node {
    dir: tempfile::TempDir,
    secret: Vec<u8>,
    addr: std::net::SocketAddr,
    running: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
    local: Option<LocalReplicas>,
}

impl Node {
    async fn new() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let secret = load_or_create_secret(&dir.path().join("secret")).unwrap();
        replica::init_disk(&dir.path().join("disk-a")).unwrap();
        replica::init_disk(&dir.path().join("disk-b")).unwrap();
        replica::create(&dir.path().join("disk-b"), REPLICA, VOLUME, SIZE).unwrap();
        replica::create(&dir.path().join("disk-b"), "r-other", "vol-other", SIZE).unwrap();
        let mut node = Node {
            dir,
            secret,
            addr: "127.0.0.1:0".parse().unwrap(),
            running: None,
            local: None,
        };
        node.start().await;
        node
    }

    fn disks(&self) -> Vec<PathBuf> {
        vec![
            self.dir.path().join("disk-a"),
            self.dir.path().join("disk-b"),
        ]
    }

    fn disk(&self) -> PathBuf {
        self.dir.path().join("disk-b")
    }

    async fn start(&mut self) {
        // The same port again after a restart, so clients keep their address.
        let server = ReplicaServer::bind(self.addr, self.disks(), self.secret.clone())
            .await
            .unwrap();
        self.addr = server.local_addr().unwrap();
        self.local = Some(server.local());
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(server.serve(async {
            let _ = stopped.await;
        }));
        self.running = Some((stop, task));
    }

    async fn stop(&mut self) {
        let (stop, task) = self.running.take().unwrap();
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the server stops")
            .unwrap();
    }

    async fn restart(&mut self) {
        self.stop().await;
        self.start().await;
    }

    fn token(&self, epoch: u64) -> String {
        attachment_token(&self.secret, VOLUME, epoch)
    }

    async fn connect(&self, epoch: u64) -> Result<ReplicaClient, ReplicaIoError> {
        ReplicaClient::connect(self.addr, VOLUME, REPLICA, epoch, &self.token(epoch), false).await
    }

    async fn open_local(&self, epoch: u64) -> Result<impl ReplicaIo, ReplicaIoError> {
        let local = self.local.as_ref().unwrap();
        local.open(VOLUME, REPLICA, epoch, &self.token(epoch)).await
    }

    fn stored_epoch(&self) -> u64 {
        replica::open(&self.disk(), REPLICA).unwrap().unwrap().epoch
    }

    fn data_file(&self) -> std::fs::File {
        let replica = replica::open(&self.disk(), REPLICA).unwrap().unwrap();
        std::fs::File::open(replica.data_path()).unwrap()
    }

    fn file_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.data_file().read_exact_at(&mut buf, offset).unwrap();
        buf
    }
}

fn pattern(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect::<Vec<_>>()
        .into()
}

fn is_fenced(result: &Result<impl Sized, ReplicaIoError>, ours: u64, current: u64) -> bool {
    matches!(result, Err(ReplicaIoError::Fenced { ours: o, current: c, .. }) if *o == ours && *c == current)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_write_flush_trim_round_trip() {
    let node = Node::new().await;
    let client = node.connect(1).await.unwrap();
    assert_eq!(client.size(), SIZE);
    assert_eq!(client.epoch(), 1);
    assert_eq!(client.id(), REPLICA);
    assert!(!client.is_local());
    assert_eq!(node.stored_epoch(), 1);

    // A new replica reads as zeros.
    assert_eq!(client.read(0, 4096).await.unwrap(), vec![0u8; 4096]);

    let a = pattern(1, 4096);
    let b = pattern(2, 128 << 10);
    client.write(0, a.clone(), false).await.unwrap();
    client.write(MIB + 7, b.clone(), true).await.unwrap();
    client.write(SIZE - 4096, a.clone(), false).await.unwrap();
    client.flush().await.unwrap();
    assert_eq!(client.read(0, 4096).await.unwrap(), a);
    assert_eq!(client.read(MIB + 7, b.len() as u32).await.unwrap(), b);
    assert_eq!(client.read(SIZE - 4096, 4096).await.unwrap(), a);
    assert_eq!(client.read(0, 0).await.unwrap().len(), 0);
    assert_eq!(node.file_bytes(MIB + 7, b.len()), b);

    // A write larger than one frame is split, and reads back whole.
    let big = pattern(3, wire::MAX_IO_LEN + 4096 + 5);
    client.write(8 * MIB, big.clone(), false).await.unwrap();
    let read = client.read(8 * MIB, big.len() as u32).await.unwrap();
    assert!(read == big, "the large read differs");

    // Trim: zeros, and a hole in the data file.
    let before = node.data_file().metadata().unwrap().blocks();
    client.trim(8 * MIB, 4 * MIB as u32).await.unwrap();
    client.trim(0, 0).await.unwrap();
    assert_eq!(
        client.read(8 * MIB, 4 * MIB as u32).await.unwrap(),
        vec![0u8; 4 * MIB as usize]
    );
    assert_eq!(
        client.read(12 * MIB, 4096).await.unwrap(),
        big.slice(4 * MIB as usize..4 * MIB as usize + 4096)
    );
    let after = node.data_file().metadata().unwrap().blocks();
    assert!(
        after < before,
        "trim punched no hole ({before} → {after} blocks)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_pipelined_writes_from_many_tasks_land_where_they_should() {
    let node = Node::new().await;
    let client = Arc::new(node.connect(1).await.unwrap());
    const TASKS: u64 = 64;
    const WRITES: u64 = 32;
    const BLOCK: usize = 4096;
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let client = Arc::clone(&client);
            tokio::spawn(async move {
                for w in 0..WRITES {
                    // Interleaved: task t owns every TASKS-th block.
                    let block = w * TASKS + t;
                    let data = pattern(block + 1, BLOCK);
                    client
                        .write(block * BLOCK as u64, data, w % 8 == 0)
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    client.flush().await.unwrap();
    // Read back through the protocol, concurrently too, and straight from the data file.
    let readers: Vec<_> = (0..TASKS * WRITES)
        .map(|block| {
            let client = Arc::clone(&client);
            tokio::spawn(async move {
                let data = client
                    .read(block * BLOCK as u64, BLOCK as u32)
                    .await
                    .unwrap();
                assert!(data == pattern(block + 1, BLOCK), "block {block} differs");
            })
        })
        .collect();
    for reader in readers {
        reader.await.unwrap();
    }
    let file = node.file_bytes(0, (TASKS * WRITES) as usize * BLOCK);
    for (block, data) in file.chunks(BLOCK).enumerate() {
        assert!(
            data == &pattern(block as u64 + 1, BLOCK)[..],
            "block {block} differs in the data file"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_token_is_refused_and_changes_nothing() {
    let node = Node::new().await;
    let client = node.connect(1).await.unwrap();
    client.write(0, pattern(1, 4096), true).await.unwrap();

    let wrong_tokens = [
        "0".repeat(64),
        node.token(2).chars().rev().collect(),
        attachment_token(b"another cluster's secret........", VOLUME, 2),
        attachment_token(&node.secret, "vol-other", 2),
        // The token of epoch 1 presented for epoch 2.
        node.token(1),
        String::new(),
        "not hex".to_string(),
    ];
    for token in &wrong_tokens {
        let refused = ReplicaClient::connect(node.addr, VOLUME, REPLICA, 2, token, false).await;
        match refused {
            Err(ReplicaIoError::Invalid { why, .. }) => assert!(why.contains("token"), "{why}"),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("a wrong token was accepted"),
        }
    }
    // The epoch did not move, the session of epoch 1 is not fenced, the data is unchanged.
    assert_eq!(node.stored_epoch(), 1);
    assert_eq!(client.read(0, 4096).await.unwrap(), pattern(1, 4096));
    assert_eq!(node.file_bytes(0, 4096), pattern(1, 4096));
    client.write(4096, pattern(2, 4096), false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_replicas_and_other_volumes_are_refused() {
    let node = Node::new().await;
    let token = node.token(1);
    let missing = ReplicaClient::connect(node.addr, VOLUME, "r-missing", 1, &token, false).await;
    assert!(
        matches!(&missing, Err(ReplicaIoError::Invalid { why, .. }) if why.contains("no such replica")),
        "{:?}",
        missing.err()
    );
    // A valid token for VOLUME, on a replica of another volume.
    let other = ReplicaClient::connect(node.addr, VOLUME, "r-other", 1, &token, false).await;
    assert!(
        matches!(&other, Err(ReplicaIoError::Invalid { why, .. }) if why.contains("vol-other")),
        "{:?}",
        other.err()
    );
    assert_eq!(
        replica::open(&node.disk(), "r-other")
            .unwrap()
            .unwrap()
            .epoch,
        0
    );
    // An id the replica layer refuses.
    let bad = ReplicaClient::connect(node.addr, VOLUME, "../r-1", 1, &token, false).await;
    assert!(
        matches!(bad, Err(ReplicaIoError::Invalid { .. })),
        "{:?}",
        bad.err()
    );
    // Nothing unreachable, and an id longer than the protocol allows never leaves the client.
    let long = "r".repeat(wire::MAX_ID_LEN + 1);
    let long = ReplicaClient::connect(node.addr, VOLUME, &long, 1, &token, false).await;
    assert!(
        matches!(long, Err(ReplicaIoError::Invalid { .. })),
        "{:?}",
        long.err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_old_epoch_is_refused() {
    let node = Node::new().await;
    let client = node.connect(5).await.unwrap();
    assert_eq!(node.stored_epoch(), 5);
    for old in [0, 1, 4] {
        let refused = node.connect(old).await;
        assert!(is_fenced(&refused, old, 5), "{:?}", refused.err());
    }
    // The same epoch may reconnect (an engine that lost its connection).
    let again = node.connect(5).await.unwrap();
    again.write(0, pattern(1, 512), false).await.unwrap();
    client.write(512, pattern(2, 512), false).await.unwrap();
    assert_eq!(node.stored_epoch(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_newer_epoch_fences_an_open_older_session_and_persists() {
    let mut node = Node::new().await;
    let old = node.connect(1).await.unwrap();
    old.write(0, pattern(1, 4096), false).await.unwrap();

    let new = node.connect(2).await.unwrap();
    assert_eq!(node.stored_epoch(), 2);

    // Every request of the old session is refused from now on, and its bytes never land.
    let fenced = old.write(4096, pattern(9, 4096), false).await;
    assert!(is_fenced(&fenced, 1, 2), "{fenced:?}");
    assert!(is_fenced(&old.write(0, pattern(9, 4096), true).await, 1, 2));
    assert!(is_fenced(&old.read(0, 4096).await, 1, 2));
    assert!(is_fenced(&old.flush().await, 1, 2));
    assert!(is_fenced(&old.trim(0, 4096).await, 1, 2));
    assert_eq!(node.file_bytes(4096, 4096), vec![0; 4096]);
    assert_eq!(node.file_bytes(0, 4096), pattern(1, 4096));

    // The new session reads what the old one wrote before it was fenced, and writes.
    assert_eq!(new.read(0, 4096).await.unwrap(), pattern(1, 4096));
    new.write(4096, pattern(2, 4096), true).await.unwrap();
    drop(new);

    // The epoch survives a restart of the server: the old epoch stays refused.
    node.restart().await;
    assert_eq!(node.stored_epoch(), 2);
    let refused = node.connect(1).await;
    assert!(is_fenced(&refused, 1, 2), "{:?}", refused.err());
    let again = node.connect(2).await.unwrap();
    assert_eq!(again.read(4096, 4096).await.unwrap(), pattern(2, 4096));
    // The old session's connection was closed by the restart.
    let broken = old.write(0, pattern(9, 4096), false).await;
    assert!(
        matches!(broken, Err(ReplicaIoError::Unreachable { .. })),
        "{broken:?}"
    );
}

/// Many writes of the old session in flight while the new epoch opens: once the new Open is
/// answered, no write of the old session lands, even one that was queued before it. Several
/// rounds, each with a fresh old session, to give a race every chance to show.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_write_of_a_fenced_session_lands_after_the_newer_open() {
    let node = Node::new().await;
    // Large writes, so that some are in the middle of their I/O when the new Open comes.
    const REGION: u64 = 8 * MIB;
    const BLOCK: usize = MIB as usize;
    const WRITERS: u64 = 16;
    for round in 1..=5u64 {
        let (old_epoch, new_epoch) = (2 * round - 1, 2 * round);
        let old = Arc::new(node.connect(old_epoch).await.unwrap());
        let written = Arc::new(AtomicU64::new(0));
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let old = Arc::clone(&old);
                let written = Arc::clone(&written);
                let data = Bytes::from(vec![0xaa; BLOCK]);
                tokio::spawn(async move {
                    let mut accepted = 0u64;
                    let mut fenced = 0;
                    let mut i = w;
                    // Keep writing until fenced, then try a little more to be sure.
                    while fenced < 10 {
                        let offset = (i * BLOCK as u64) % REGION;
                        i += WRITERS;
                        match old.write(offset, data.clone(), false).await {
                            Ok(()) => {
                                assert!(fenced == 0, "a write accepted after a Fenced answer");
                                accepted += 1;
                                written.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(ReplicaIoError::Fenced { current, .. }) => {
                                assert_eq!(current, new_epoch);
                                fenced += 1;
                            }
                            Err(e) => panic!("{e}"),
                        }
                    }
                    accepted
                })
            })
            .collect();
        // Let the old session get going, then open the new one and take a snapshot of the
        // region at once: it must not change after that, until the new session writes.
        let going = Instant::now();
        while written.load(Ordering::Relaxed) < WRITERS {
            assert!(
                going.elapsed() < Duration::from_secs(20),
                "the old session is stuck"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let new = node.connect(new_epoch).await.unwrap();
        let at_open = new.read(0, REGION as u32).await.unwrap();
        let mut accepted = 0;
        for writer in writers {
            accepted += writer.await.unwrap();
        }
        assert_eq!(accepted, written.load(Ordering::Relaxed));
        let after = node.file_bytes(0, REGION as usize);
        let changed = at_open.iter().zip(&after).filter(|(a, b)| a != b).count();
        assert_eq!(
            changed, 0,
            "round {round}: bytes of the fenced session landed after the newer open"
        );
        // The new session writes over all of it.
        let mark = round as u8;
        for block in 0..REGION / BLOCK as u64 {
            let data = Bytes::from(vec![mark; BLOCK]);
            new.write(block * BLOCK as u64, data, false).await.unwrap();
        }
        let region = node.file_bytes(0, REGION as usize);
        let stray = region.iter().filter(|b| **b != mark).count();
        assert_eq!(
            stray, 0,
            "round {round}: bytes of the fenced session landed after the newer open"
        );
    }
}

/// Reads what the server sends until it closes the connection; fails if it does not close.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<Response> {
    let mut buf = BytesMut::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the server did not close the connection");
    let mut responses = vec![];
    while let Some((_, response)) = wire::decode_response(&mut buf).unwrap() {
        responses.push(response);
    }
    assert!(buf.is_empty(), "a partial answer");
    responses
}

fn open_frame(node: &Node, epoch: u64) -> BytesMut {
    let mut out = BytesMut::new();
    let open = Open {
        volume_id: VOLUME.into(),
        replica_id: REPLICA.into(),
        epoch,
        token: node.token(epoch),
    };
    wire::encode_request(1, &Request::Open(open), &mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_frames_close_only_their_connection() {
    let node = Node::new().await;
    let good = node.connect(1).await.unwrap();
    good.write(0, pattern(1, 4096), false).await.unwrap();

    let write = |tag, offset| {
        let mut out = BytesMut::new();
        let request = Request::Write {
            offset,
            fua: false,
            data: pattern(9, 4096),
        };
        wire::encode_request(tag, &request, &mut out).unwrap();
        out
    };

    // Garbage, a huge length, a length too short, an unknown opcode: each before and after Open.
    let mut huge = BytesMut::new();
    huge.put_u32(u32::MAX);
    let mut short = BytesMut::new();
    short.put_u32(3);
    short.put_slice(b"abc");
    let mut unknown = BytesMut::new();
    unknown.put_u32(9);
    unknown.put_u8(77);
    unknown.put_u64(5);
    let garbage = BytesMut::from(&b"GET / HTTP/1.1\r\nHost: palisade\r\n\r\n"[..]);
    for bad in [garbage, huge, short, unknown] {
        for after_open in [false, true] {
            let mut stream = TcpStream::connect(node.addr).await.unwrap();
            if after_open {
                stream.write_all(&open_frame(&node, 1)).await.unwrap();
            }
            stream.write_all(&bad).await.unwrap();
            // More bytes after the bad frame are never read as requests.
            stream.write_all(&write(2, 4096)).await.unwrap();
            let responses = read_until_closed(&mut stream).await;
            let last = responses.last().cloned();
            assert!(
                matches!(last, Some(Response::Protocol(_))),
                "{responses:?} after {bad:?}"
            );
            if after_open {
                assert!(matches!(responses[0], Response::Opened { epoch: 1, .. }));
            }
        }
    }

    // A request before Open: NotOpen, closed, and the write after it never ran.
    let mut stream = TcpStream::connect(node.addr).await.unwrap();
    let mut frames = write(7, 4096);
    frames.unsplit(write(8, 8192));
    stream.write_all(&frames).await.unwrap();
    assert_eq!(read_until_closed(&mut stream).await, [Response::NotOpen]);

    // A second Open in a session: refused and closed.
    let mut stream = TcpStream::connect(node.addr).await.unwrap();
    let mut frames = open_frame(&node, 1);
    frames.unsplit(open_frame(&node, 1));
    stream.write_all(&frames).await.unwrap();
    let responses = read_until_closed(&mut stream).await;
    assert!(
        matches!(
            &responses[..],
            [Response::Opened { .. }, Response::Invalid(_)]
        ),
        "{responses:?}"
    );

    // A truncated frame: the connection ends inside it, nothing is written.
    let mut stream = TcpStream::connect(node.addr).await.unwrap();
    let mut frames = open_frame(&node, 1);
    let whole = write(3, 4096);
    frames.extend_from_slice(&whole[..whole.len() - 100]);
    stream.write_all(&frames).await.unwrap();
    stream.shutdown().await.unwrap();
    let responses = read_until_closed(&mut stream).await;
    assert!(
        matches!(&responses[..], [Response::Opened { .. }]),
        "{responses:?}"
    );

    // Random garbage on many connections at once.
    let mut garbage = vec![];
    for seed in 0..32u64 {
        let addr = node.addr;
        garbage.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let _ = stream.write_all(&pattern(seed, 10_000)).await;
            let _ = stream.shutdown().await;
            let mut sink = vec![];
            let _ = stream.read_to_end(&mut sink).await;
        }));
    }
    for g in garbage {
        g.await.unwrap();
    }

    // None of it wrote a byte, and the open session and new ones work on.
    assert_eq!(node.file_bytes(4096, 8192), vec![0; 8192]);
    assert_eq!(good.read(0, 4096).await.unwrap(), pattern(1, 4096));
    good.write(4096, pattern(2, 4096), false).await.unwrap();
    let another = node.connect(1).await.unwrap();
    assert_eq!(another.read(4096, 4096).await.unwrap(), pattern(2, 4096));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_beyond_the_volume_are_invalid() {
    let node = Node::new().await;
    let client = node.connect(1).await.unwrap();
    let invalid = |r: &Result<_, ReplicaIoError>| matches!(r, Err(ReplicaIoError::Invalid { .. }));
    assert!(invalid(&client.read(SIZE, 1).await.map(|_| ())));
    assert!(invalid(&client.read(SIZE - 4096, 4097).await.map(|_| ())));
    assert!(invalid(&client.read(u64::MAX, 4096).await.map(|_| ())));
    assert!(invalid(&client.write(SIZE - 1, pattern(1, 2), false).await));
    assert!(invalid(
        &client.write(u64::MAX - 1, pattern(1, 4096), true).await
    ));
    assert!(invalid(&client.trim(SIZE - 4096, 8192).await));
    match client.write(SIZE, pattern(1, 1), false).await {
        Err(ReplicaIoError::Invalid { why, .. }) => assert!(why.contains("beyond"), "{why}"),
        other => panic!("{other:?}"),
    }
    // The edges themselves are fine, and the session is still open.
    client.write(SIZE - 1, pattern(1, 1), false).await.unwrap();
    assert_eq!(client.read(SIZE - 1, 1).await.unwrap(), pattern(1, 1));
    client.read(SIZE, 0).await.unwrap();
    client.trim(SIZE - 4096, 4096).await.unwrap();
    assert_eq!(node.data_file().metadata().unwrap().len(), SIZE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_server_fails_pending_and_later_calls_fast() {
    let mut node = Node::new().await;
    let client = Arc::new(node.connect(1).await.unwrap());
    client.write(0, pattern(1, 4096), false).await.unwrap();
    node.stop().await;
    let started = Instant::now();
    let calls: Vec<_> = (0..16u64)
        .map(|i| {
            let client = Arc::clone(&client);
            tokio::spawn(async move { client.write(i * 4096, pattern(i, 4096), false).await })
        })
        .collect();
    for call in calls {
        let result = call.await.unwrap();
        assert!(
            matches!(result, Err(ReplicaIoError::Unreachable { .. })),
            "{result:?}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    // Nothing listens any more.
    let refused = node.connect(1).await;
    assert!(
        matches!(refused, Err(ReplicaIoError::Unreachable { .. })),
        "{:?}",
        refused.err()
    );
}

/// Not a benchmark: a sanity check that pipelining works, printed, never asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn throughput_sanity() {
    let node = Node::new().await;
    let client = Arc::new(node.connect(1).await.unwrap());
    for (name, block, depth, total) in [
        ("4k random write, depth 64", 4096usize, 64u64, 16 * MIB),
        ("128k sequential write, depth 16", 128 << 10, 16, 48 * MIB),
        ("4k random read, depth 64", 4096, 64, 16 * MIB),
    ] {
        let ops = total / block as u64;
        let started = Instant::now();
        let workers: Vec<_> = (0..depth)
            .map(|w| {
                let client = Arc::clone(&client);
                let data = pattern(w, block);
                let read = name.contains("read");
                tokio::spawn(async move {
                    let mut i = w;
                    while i < ops {
                        // A scattered but collision-free order for the random cases.
                        let slot = if block == 4096 { (i * 7919) % ops } else { i };
                        let offset = slot * block as u64;
                        if read {
                            client.read(offset, block as u32).await.unwrap();
                        } else {
                            client.write(offset, data.clone(), false).await.unwrap();
                        }
                        i += depth;
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.await.unwrap();
        }
        let elapsed = started.elapsed().as_secs_f64();
        eprintln!(
            "{name}: {:.0} MB/s, {:.0} IOPS",
            total as f64 / elapsed / 1e6,
            ops as f64 / elapsed
        );
    }
    client.flush().await.unwrap();
}

/// An in-process session (the engine's local member) obeys the network session's rules: the
/// token, the epoch rules of Open, and fencing in both directions with network sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_sessions_obey_tokens_epochs_and_fencing() {
    let mut node = Node::new().await;
    let local = node.local.clone().unwrap();

    let wrong = local
        .open(
            VOLUME,
            REPLICA,
            1,
            &attachment_token(b"another secret, 32 bytes long...", VOLUME, 1),
        )
        .await
        .err();
    assert!(
        matches!(wrong, Some(ReplicaIoError::Invalid { .. })),
        "{wrong:?}"
    );
    assert_eq!(node.stored_epoch(), 0, "a refused open persists nothing");

    let first = node.open_local(1).await.unwrap();
    assert!(first.is_local());
    assert_eq!(node.stored_epoch(), 1);
    let data = pattern(1, 64 << 10);
    first.write(MIB, data.clone(), false).await.unwrap();
    first.write(2 * MIB, data.clone(), true).await.unwrap();
    first.flush().await.unwrap();
    assert_eq!(first.read(MIB, 64 << 10).await.unwrap(), data);
    assert_eq!(node.file_bytes(2 * MIB, 64 << 10), data.to_vec());
    first.trim(MIB, 4096).await.unwrap();
    assert_eq!(first.read(MIB, 4096).await.unwrap(), vec![0u8; 4096]);

    // A network session with a newer epoch fences the local one: its next write fails with
    // Fenced and nothing of it lands.
    let network = node.connect(2).await.unwrap();
    let late = first.write(3 * MIB, pattern(2, 4096), false).await;
    assert!(is_fenced(&late, 1, 2), "{:?}", late.err());
    assert_eq!(node.file_bytes(3 * MIB, 4096), vec![0u8; 4096]);
    assert!(is_fenced(&first.read(MIB, 4096).await, 1, 2));
    assert!(is_fenced(&first.flush().await, 1, 2));
    // An older local Open is refused like a network one.
    let stale = node.open_local(1).await.err();
    assert!(
        matches!(stale, Some(ReplicaIoError::Fenced { current: 2, .. })),
        "{stale:?}"
    );

    // And the other way round: a newer local Open fences the network session.
    let second = node.open_local(3).await.unwrap();
    let late = network.write(3 * MIB, pattern(3, 4096), false).await;
    assert!(is_fenced(&late, 2, 3), "{:?}", late.err());
    assert_eq!(node.file_bytes(3 * MIB, 4096), vec![0u8; 4096]);
    second
        .write(3 * MIB, pattern(4, 4096), false)
        .await
        .unwrap();
    assert_eq!(node.file_bytes(3 * MIB, 4096), pattern(4, 4096).to_vec());

    // A restarted server in the same process shares the replica's state with sessions opened
    // before: a newer Open through it still fences them.
    node.restart().await;
    let _newest = node.connect(4).await.unwrap();
    let late = second.write(4 * MIB, pattern(5, 4096), false).await;
    assert!(is_fenced(&late, 3, 4), "{:?}", late.err());
    assert_eq!(node.file_bytes(4 * MIB, 4096), vec![0u8; 4096]);
    node.stop().await;
}

/// Before its session is open, a connection may send no frame larger than an Open: a peer
/// without a token that starts a large frame is refused and closed, and an honest session on
/// the same server goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unopened_connection_cannot_make_the_server_buffer_a_large_frame() {
    let mut node = Node::new().await;
    let mut stream = TcpStream::connect(node.addr).await.unwrap();
    let mut frame = BytesMut::new();
    // A write frame of 1 MiB (length, kind 3 = write, tag), of which 16 KiB are sent.
    frame.put_u32(1 << 20);
    frame.put_u8(3);
    frame.put_u64(1);
    frame.put_slice(&vec![0xab; 16 << 10]);
    // The server may close while the bytes are still being sent.
    let _ = stream.write_all(&frame).await;
    let answers = read_until_closed(&mut stream).await;
    assert!(
        matches!(answers.as_slice(), [Response::Protocol(m)] if m.contains("before the session is open")),
        "{answers:?}"
    );
    let client = node.connect(1).await.unwrap();
    client.write(0, pattern(9, 4096), false).await.unwrap();
    assert_eq!(node.file_bytes(0, 4096), pattern(9, 4096).to_vec());
    node.stop().await;
}
