//! The replica server over real TCP sessions and real files: Open and its refusals (token,
//! epoch, fencing), every request, pipelining, bounds, and the in-process sessions.

use super::*;

const SECRET: &[u8] = b"a cluster secret of 32 bytes....";

fn shared(disk: &Path) -> Arc<Shared> {
    Arc::new(Shared {
        disks: vec![disk.to_path_buf()],
        secret: SECRET.to_vec(),
    })
}

fn open(epoch: u64) -> Open {
    Open {
        volume_id: "vol".into(),
        replica_id: "r1".into(),
        epoch,
        token: token::attachment_token(SECRET, "vol", epoch),
    }
}

fn peer() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9))
}

/// The fencing discipline without the network: a newer Open waits for the I/O in flight
/// (here, a held read lock stands for a slow write), and then every request of the older
/// session is refused.
#[tokio::test]
async fn a_newer_open_waits_for_io_in_flight_then_fences() {
    let disk = tempfile::tempdir().unwrap();
    replica::create(disk.path(), "r1", "vol", 1 << 20).unwrap();
    let shared = shared(disk.path());
    let (old, opened) = open_replica(&shared, &open(1), &peer()).await.unwrap();
    assert_eq!(
        opened,
        Response::Opened {
            size: 1 << 20,
            epoch: 1
        }
    );
    let write = |data: &'static [u8]| Request::Write {
        offset: 0,
        fua: false,
        data: Bytes::from_static(data),
    };
    let response = execute(Arc::clone(&old.replica), old.epoch, write(b"old")).await;
    assert_eq!(response, Response::Done);

    let in_flight = Arc::clone(&old.replica.state).read_owned().await;
    let newer = {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move { open_replica(&shared, &open(2), &peer()).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!newer.is_finished(), "the newer Open did not wait");
    assert_eq!(replica::open(disk.path(), "r1").unwrap().unwrap().epoch, 1);
    drop(in_flight);
    let (new, _) = newer.await.unwrap().unwrap();
    assert!(Arc::ptr_eq(&new.replica, &old.replica));
    assert_eq!(replica::open(disk.path(), "r1").unwrap().unwrap().epoch, 2);

    for request in [
        write(b"OLD"),
        Request::Read { offset: 0, len: 3 },
        Request::Flush,
        Request::Trim { offset: 0, len: 3 },
    ] {
        let response = execute(Arc::clone(&old.replica), old.epoch, request).await;
        assert_eq!(response, Response::Fenced { current: 2 });
    }
    let response = execute(
        Arc::clone(&new.replica),
        new.epoch,
        Request::Read { offset: 0, len: 3 },
    )
    .await;
    assert_eq!(response, Response::Data(Bytes::from_static(b"old")));
    // A later Open of the old epoch is refused; the same epoch is accepted again.
    let refused = open_replica(&shared, &open(1), &peer()).await.err();
    assert_eq!(refused, Some(Response::StaleEpoch { current: 2 }));
    assert!(open_replica(&shared, &open(2), &peer()).await.is_ok());
}

#[tokio::test]
async fn a_recreated_replica_is_served_from_its_new_file() {
    let disk = tempfile::tempdir().unwrap();
    replica::create(disk.path(), "r1", "vol", 1 << 20).unwrap();
    let shared = shared(disk.path());
    let (session, _) = open_replica(&shared, &open(1), &peer()).await.unwrap();
    let write = Request::Write {
        offset: 0,
        fua: true,
        data: Bytes::from_static(b"first"),
    };
    assert_eq!(
        execute(Arc::clone(&session.replica), 1, write).await,
        Response::Done
    );
    replica::delete(disk.path(), "r1").unwrap();
    replica::create(disk.path(), "r1", "vol", 2 << 20).unwrap();
    // The served replica is still alive (the session holds it): the next Open sees the
    // new incarnation, at epoch 0 on disk, but the epoch in memory is not forgotten.
    let refused = open_replica(&shared, &open(0), &peer()).await.err();
    assert_eq!(refused, Some(Response::StaleEpoch { current: 1 }));
    let (again, opened) = open_replica(&shared, &open(1), &peer()).await.unwrap();
    assert_eq!(
        opened,
        Response::Opened {
            size: 2 << 20,
            epoch: 1
        }
    );
    let read = Request::Read { offset: 0, len: 5 };
    let response = execute(Arc::clone(&again.replica), 1, read).await;
    assert_eq!(response, Response::Data(Bytes::from(vec![0; 5])));
}

/// Online expansion: once the agent grew the replica, an open session serves the new
/// bytes without a new Open; before, it refuses them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_session_serves_a_grown_replica() {
    let disk = tempfile::tempdir().unwrap();
    replica::create(disk.path(), "r1", "vol", 1 << 20).unwrap();
    let shared = shared(disk.path());
    let (session, _) = open_replica(&shared, &open(1), &peer()).await.unwrap();
    let past_the_end = || Request::Write {
        offset: 1 << 20,
        fua: true,
        data: Bytes::from_static(b"grown"),
    };
    let refused = execute(Arc::clone(&session.replica), 1, past_the_end()).await;
    assert!(matches!(refused, Response::Invalid(_)), "{refused:?}");

    // What the agent does: the files first, then the sessions.
    let path = disk.path().to_path_buf();
    tokio::task::spawn_blocking(move || {
        replica::grow(&path, "r1", 2 << 20).unwrap();
        replica_grown(&path, "r1", 2 << 20);
        // Another replica id, or a smaller size, changes nothing.
        replica_grown(&path, "r2", 4 << 20);
        replica_grown(&path, "r1", 1 << 20);
    })
    .await
    .unwrap();
    let response = execute(Arc::clone(&session.replica), 1, past_the_end()).await;
    assert_eq!(response, Response::Done);
    let read = Request::Read {
        offset: 1 << 20,
        len: 5,
    };
    let response = execute(Arc::clone(&session.replica), 1, read).await;
    assert_eq!(response, Response::Data(Bytes::from_static(b"grown")));
    let beyond = Request::Read {
        offset: 2 << 20,
        len: 1,
    };
    let refused = execute(Arc::clone(&session.replica), 1, beyond).await;
    assert!(matches!(refused, Response::Invalid(_)), "{refused:?}");
}

/// A connection that never opens its session is closed after [`OPEN_TIMEOUT`].
#[tokio::test(start_paused = true)]
async fn a_connection_without_open_is_closed() {
    let disk = tempfile::tempdir().unwrap();
    let server = ReplicaServer::bind(
        "127.0.0.1:0",
        vec![disk.path().to_path_buf()],
        SECRET.to_vec(),
    )
    .await
    .unwrap();
    let addr = server.local_addr().unwrap();
    let serving = tokio::spawn(server.serve(std::future::pending()));
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // Half a frame, then nothing.
    stream.write_all(b"\x00\x00").await.unwrap();
    let started = tokio::time::Instant::now();
    let mut rest = vec![];
    assert_eq!(stream.read_to_end(&mut rest).await.unwrap(), 0);
    assert!(started.elapsed() >= OPEN_TIMEOUT);
    serving.abort();
}

#[test]
fn ranges_are_checked_without_overflow() {
    assert!(check_range("read", 0, 10, 10).is_ok());
    assert!(check_range("read", 10, 0, 10).is_ok());
    assert!(check_range("read", 10, 1, 10).is_err());
    assert!(check_range("read", u64::MAX, 1, u64::MAX).is_err());
    assert!(check_range("read", u64::MAX, 0, u64::MAX).is_ok());
}
