//! The layer chain against what it promises: point-in-time views, trims that hide older
//! layers, merges that change no view, crash points at every step of snapshot, delete and
//! grow (the operation stopped there, the chain reopened, the operation re-run), malformed
//! files refused with their names, a model-based proptest, and the cost of a snapshot.

use std::path::Path;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;

const MIB: u64 = 1 << 20;
const BS: u64 = BLOCK_SIZE;

fn temp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 251) as u8) | 1)
        .collect()
}

/// The files in `dir`, sorted (leftovers show here).
fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn expected_files(chain: &Chain) -> usize {
    1 + 2 * chain.layers.len()
}

#[test]
fn writes_read_back_after_a_flush_and_a_reopen() {
    let dir = temp();
    let mut chain = Chain::create(dir.path(), 4 * MIB).unwrap();
    assert_eq!(chain.read(0, 8192).unwrap(), vec![0; 8192]);
    chain.write(BS, &pattern(1, 3 * BS as usize)).unwrap();
    // Unaligned, straddling blocks, partly over data and partly over nothing.
    chain.write(3 * BS + 100, &pattern(2, 5000)).unwrap();
    chain.flush().unwrap();
    let before = chain.read(0, 8 * BS as usize).unwrap();
    let mut model = vec![0u8; 8 * BS as usize];
    model[BS as usize..4 * BS as usize].copy_from_slice(&pattern(1, 3 * BS as usize));
    model[3 * BS as usize + 100..][..5000].copy_from_slice(&pattern(2, 5000));
    assert_eq!(before, model);
    drop(chain);
    let chain = Chain::open(dir.path()).unwrap();
    assert_eq!(chain.read(0, 8 * BS as usize).unwrap(), model);
    assert_eq!(chain.size(), 4 * MIB);
    let again = Chain::create(dir.path(), 4 * MIB).unwrap();
    assert_eq!(
        again.read(0, 8 * BS as usize).unwrap(),
        model,
        "create is idempotent"
    );
    assert!(matches!(
        Chain::create(dir.path(), 8 * MIB),
        Err(LayerError::SizeMismatch { .. })
    ));
}

#[test]
fn a_snapshot_keeps_its_point_in_time_view() {
    let dir = temp();
    let mut chain = Chain::create(dir.path(), MIB).unwrap();
    chain.write(0, &pattern(1, 4 * BS as usize)).unwrap();
    let s1 = chain.snapshot("s1").unwrap();
    assert_eq!(s1.bytes_held, 4 * BS);
    assert_eq!(s1.size, MIB);
    chain.write(BS, &pattern(2, BS as usize)).unwrap();
    chain.write(10 * BS, &pattern(3, 10)).unwrap();
    assert_eq!(
        chain.read_at_snapshot("s1", 0, 4 * BS as usize).unwrap(),
        pattern(1, 4 * BS as usize)
    );
    let head = chain.read(0, 4 * BS as usize).unwrap();
    assert_eq!(
        &head[BS as usize..2 * BS as usize],
        &pattern(2, BS as usize)[..]
    );
    assert_eq!(
        &head[..BS as usize],
        &pattern(1, 4 * BS as usize)[..BS as usize]
    );
    assert_eq!(
        chain.read_at_snapshot("s1", 10 * BS, 10).unwrap(),
        vec![0; 10]
    );
    assert_eq!(chain.snapshot("s1").unwrap(), s1, "idempotent by name");
    let listed = chain.list_snapshots();
    assert_eq!(listed, vec![s1]);
    assert!(matches!(
        chain.read_at_snapshot("nope", 0, 1),
        Err(LayerError::SnapshotNotFound { .. })
    ));
}

#[test]
fn a_large_read_is_one_pread_per_run_of_a_layer() {
    let dir = temp();
    let mut chain = Chain::create(dir.path(), 4 * MIB).unwrap();
    chain.write(0, &pattern(1, MIB as usize)).unwrap();
    chain.snapshot("s").unwrap();
    chain.write(MIB / 2, &pattern(2, 64 * BS as usize)).unwrap();
    let runs = chain.runs(1, 100, 2 * MIB);
    let at = |layer, start, end| Run { layer, start, end };
    let middle = MIB / 2 + 64 * BS;
    assert_eq!(
        runs,
        vec![
            at(Some(0), 100, MIB / 2),
            at(Some(1), MIB / 2, middle),
            at(Some(0), middle, MIB),
            at(None, MIB, 2 * MIB),
        ]
    );
    // The snapshot's own view stops at its layer.
    assert_eq!(chain.runs(0, 0, MIB), vec![at(Some(0), 0, MIB)]);
}

#[test]
fn a_trim_hides_older_layers_and_an_unflushed_write_never_resurfaces() {
    let dir = temp();
    let mut chain = Chain::create(dir.path(), MIB).unwrap();
    chain.write(0, &pattern(1, 8 * BS as usize)).unwrap();
    chain.snapshot("s").unwrap();
    chain.trim(BS + 10, 3 * BS).unwrap();
    let head = chain.read(0, 8 * BS as usize).unwrap();
    let mut model = pattern(1, 8 * BS as usize);
    model[BS as usize + 10..][..3 * BS as usize].fill(0);
    assert_eq!(head, model);
    assert_eq!(
        chain.read_at_snapshot("s", 0, 8 * BS as usize).unwrap(),
        pattern(1, 8 * BS as usize)
    );
    chain.flush().unwrap();
    drop(chain);

    // A write that was never flushed: its map bit is not on disk, so after a "crash" the
    // block reads from the snapshot; a later partial write copies up the snapshot's bytes,
    // not the stale ones in the head's file.
    let mut chain = Chain::open(dir.path()).unwrap();
    assert_eq!(chain.read(0, 8 * BS as usize).unwrap(), model);
    chain.write(6 * BS, &pattern(9, BS as usize)).unwrap();
    drop(chain);
    let mut chain = Chain::open(dir.path()).unwrap();
    assert_eq!(chain.read(0, 8 * BS as usize).unwrap(), model);
    chain.write(6 * BS + 100, &[7; 10]).unwrap();
    model[6 * BS as usize + 100..][..10].fill(7);
    assert_eq!(chain.read(0, 8 * BS as usize).unwrap(), model);
}

#[test]
fn deleting_snapshots_merges_without_changing_any_view_and_frees_their_files() {
    for up in [Some(false), Some(true), None] {
        deleting_snapshots_merges(up);
    }
}

fn deleting_snapshots_merges(up: Option<bool>) {
    let dir = temp();
    let mut chain = Chain::create(dir.path(), MIB).unwrap();
    chain.write(0, &pattern(1, 8 * BS as usize)).unwrap();
    chain.snapshot("s1").unwrap();
    chain.write(2 * BS, &pattern(2, 2 * BS as usize)).unwrap();
    chain.trim(6 * BS, BS).unwrap();
    chain.snapshot("s2").unwrap();
    chain.write(3 * BS, &pattern(3, 3 * BS as usize)).unwrap();
    chain.snapshot("s3").unwrap();
    chain.write(7 * BS, &pattern(4, BS as usize)).unwrap();
    chain.merge_up = up;
    let len = 8 * BS as usize;
    let views: Vec<Vec<u8>> = ["s2", "s3"]
        .iter()
        .map(|s| chain.read_at_snapshot(s, 0, len).unwrap())
        .collect();
    let head = chain.read(0, len).unwrap();

    chain.delete_snapshot("s2").unwrap(); // into a frozen child
    assert_eq!(chain.read_at_snapshot("s3", 0, len).unwrap(), views[1]);
    assert_eq!(chain.read(0, len).unwrap(), head);
    chain.delete_snapshot("s1").unwrap();
    assert_eq!(chain.read_at_snapshot("s3", 0, len).unwrap(), views[1]);
    chain.delete_snapshot("s3").unwrap(); // into the head
    assert_eq!(chain.read(0, len).unwrap(), head);
    assert!(chain.list_snapshots().is_empty());
    chain.delete_snapshot("s3").unwrap();
    assert_eq!(files_in(dir.path()).len(), expected_files(&chain));
    // Up keeps the oldest layer's files, down the head's.
    match up {
        Some(true) => assert_eq!(chain.manifest.layers[0].id, 0),
        Some(false) => assert_ne!(chain.manifest.layers[0].id, 0),
        None => {}
    }
    drop(chain);
    let chain = Chain::open(dir.path()).unwrap();
    assert_eq!(chain.read(0, len).unwrap(), head);
    assert_eq!(chain.layers[0].map.count(), 8);
}

/// The bytes the files in `dir` take on disk.
fn allocated(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().blocks() * 512)
        .sum()
}

#[test]
fn deleting_a_snapshot_frees_the_space_its_child_shadows() {
    for up in [false, true] {
        let dir = temp();
        let mut chain = Chain::create(dir.path(), 16 * MIB).unwrap();
        chain.write(0, &pattern(1, 4 * MIB as usize)).unwrap();
        chain.snapshot("old").unwrap();
        chain.write(0, &pattern(2, 4 * MIB as usize)).unwrap();
        chain.flush().unwrap();
        let before = allocated(dir.path());
        chain.merge_up = Some(up);
        chain.delete_snapshot("old").unwrap();
        let after = allocated(dir.path());
        assert!(
            before - after >= 4 * MIB - 64 * 1024,
            "up {up}: {before} -> {after}"
        );
        assert_eq!(
            chain.read(0, 4 * MIB as usize).unwrap(),
            pattern(2, 4 * MIB as usize)
        );
    }
}

#[test]
fn growing_adds_zeros_and_older_snapshots_keep_their_size() {
    let dir = temp();
    let mut chain = Chain::create(dir.path(), MIB).unwrap();
    chain.write(MIB - BS, &pattern(1, BS as usize)).unwrap();
    chain.snapshot("small").unwrap();
    chain.grow(2 * MIB).unwrap();
    chain.grow(2 * MIB).unwrap();
    assert!(matches!(chain.grow(MIB), Err(LayerError::Shrink { .. })));
    assert_eq!(chain.read(MIB, BS as usize).unwrap(), vec![0; BS as usize]);
    chain.write(MIB, &pattern(2, BS as usize)).unwrap();
    chain.snapshot("big").unwrap();
    assert!(matches!(
        chain.read_at_snapshot("small", MIB, 1),
        Err(LayerError::OutOfRange { .. })
    ));
    chain.delete_snapshot("small").unwrap();
    let both = chain
        .read_at_snapshot("big", MIB - BS, 2 * BS as usize)
        .unwrap();
    assert_eq!(&both[..BS as usize], &pattern(1, BS as usize)[..]);
    assert_eq!(&both[BS as usize..], &pattern(2, BS as usize)[..]);
    drop(chain);
    let chain = Chain::open(dir.path()).unwrap();
    assert_eq!(chain.size(), 2 * MIB);
    assert_eq!(chain.list_snapshots()[0].size, 2 * MIB);
}

#[test]
fn extents_are_the_coalesced_union_of_the_views_layers() {
    let dir = temp();
    let mut chain = Chain::create(dir.path(), MIB).unwrap();
    chain.write(0, &pattern(1, 2 * BS as usize)).unwrap();
    chain.snapshot("s").unwrap();
    chain.write(2 * BS + 1, &[5]).unwrap();
    chain.write(10 * BS, &pattern(2, 2 * BS as usize)).unwrap();
    chain.trim(20 * BS, BS).unwrap();
    let head: Vec<_> = chain.extents(None).unwrap().collect();
    assert_eq!(head, vec![(0, 3 * BS), (10 * BS, 2 * BS), (20 * BS, BS)]);
    let snap: Vec<_> = chain.extents(Some("s")).unwrap().collect();
    assert_eq!(snap, vec![(0, 2 * BS)]);
}

#[test]
fn a_chain_copied_layer_by_layer_has_every_view() {
    let (from, to) = (temp(), temp());
    let mut source = Chain::create(from.path(), MIB).unwrap();
    source.write(0, &pattern(1, 8 * BS as usize)).unwrap();
    source.snapshot("a").unwrap();
    source.trim(2 * BS, 2 * BS).unwrap();
    source.write(6 * BS + 5, &pattern(2, 100)).unwrap();
    source.snapshot("b").unwrap();
    source.write(BS, &pattern(3, BS as usize)).unwrap();

    let mut copy = Chain::create(to.path(), MIB).unwrap();
    let layers: Vec<Option<String>> = source
        .list_snapshots()
        .into_iter()
        .map(|s| Some(s.name))
        .chain([None])
        .collect();
    for layer in &layers {
        for (offset, len) in source.layer_extents(layer.as_deref()).unwrap() {
            let bytes = match layer {
                Some(name) => source.read_at_snapshot(name, offset, len as usize),
                None => source.read(offset, len as usize),
            };
            copy.write(offset, &bytes.unwrap()).unwrap();
        }
        if let Some(name) = layer {
            copy.snapshot(name).unwrap();
        }
    }
    let (head, snaps) = views(&source);
    assert_eq!(views(&copy), (head, snaps));
    assert_eq!(
        source.layer_extents(Some("b")).unwrap().collect::<Vec<_>>(),
        vec![(2 * BS, 2 * BS), (6 * BS, BS)]
    );
}

#[test]
fn bad_requests_are_errors() {
    let dir = temp();
    assert!(matches!(
        Chain::create(dir.path(), MIB + 1),
        Err(LayerError::UnalignedSize { .. })
    ));
    let mut chain = Chain::create(dir.path(), MIB).unwrap();
    assert!(matches!(
        chain.read(MIB - 1, 2),
        Err(LayerError::OutOfRange { .. })
    ));
    assert!(matches!(
        chain.read(u64::MAX, 2),
        Err(LayerError::OutOfRange { .. })
    ));
    assert!(matches!(
        chain.snapshot(""),
        Err(LayerError::InvalidName { .. })
    ));
    assert!(matches!(
        chain.snapshot("a\nb"),
        Err(LayerError::InvalidName { .. })
    ));
    // A request refused before it starts leaves the chain usable.
    assert!(matches!(
        chain.write(MIB, &[1]),
        Err(LayerError::OutOfRange { .. })
    ));
    assert!(matches!(
        chain.trim(MIB, 1),
        Err(LayerError::OutOfRange { .. })
    ));
    chain.write(0, &[1]).unwrap();
    assert!(matches!(
        Chain::open(&dir.path().join("nothing")),
        Err(LayerError::NotAChain { .. })
    ));
}

/// Two snapshots and a head, on disk, for the malformed-file tests.
fn chain_on_disk(dir: &Path) {
    let mut chain = Chain::create(dir, MIB).unwrap();
    chain.write(0, &pattern(1, 2 * BS as usize)).unwrap();
    chain.snapshot("a").unwrap();
    chain.write(BS, &pattern(2, BS as usize)).unwrap();
    chain.snapshot("b").unwrap();
}

fn open_error(dir: &Path) -> String {
    match Chain::open(dir) {
        Ok(_) => panic!("opened a damaged chain"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn malformed_files_are_errors_naming_them() {
    let dir = temp();
    chain_on_disk(dir.path());
    let manifest_path = dir.path().join(files::MANIFEST);
    let good = std::fs::read(&manifest_path).unwrap();
    let manifest: Manifest = serde_json::from_slice(&good).unwrap();

    std::fs::write(&manifest_path, b"{ torn").unwrap();
    assert!(open_error(dir.path()).contains("chain.json is malformed"));
    let mut unknown: serde_json::Value = serde_json::from_slice(&good).unwrap();
    unknown["layers"][0]["reflink"] = true.into();
    std::fs::write(&manifest_path, unknown.to_string()).unwrap();
    assert!(open_error(dir.path()).contains("chain.json is malformed"));
    let edits: Vec<fn(&mut Manifest)> = vec![
        |m| m.format_version = 9,
        |m| m.block_size = 512,
        |m| m.layers.clear(),
        |m| m.layers[0].name = Some("b".into()),
        |m| m.layers[1].map_digest = None,
        |m| m.layers[2].name = Some("head".into()),
        |m| m.layers[0].id = 1000,
        |m| m.layers[1].map = "../x".into(),
        |m| m.layers[0].size = 2 * MIB,
        |m| m.size = 3 * BS + 1,
    ];
    for edit in edits {
        let mut bad = manifest.clone();
        edit(&mut bad);
        std::fs::write(&manifest_path, serde_json::to_vec(&bad).unwrap()).unwrap();
        let error = open_error(dir.path());
        assert!(error.contains("chain.json"), "{error}");
    }
    std::fs::write(&manifest_path, &good).unwrap();

    let map = dir.path().join(&manifest.layers[0].map);
    let bytes = std::fs::read(&map).unwrap();
    let mut flipped = bytes.clone();
    flipped[files::MAP_HEADER as usize + 5] ^= 1;
    std::fs::write(&map, &flipped).unwrap();
    assert!(open_error(dir.path()).contains("digest"));
    std::fs::write(&map, &bytes[..100]).unwrap();
    assert!(open_error(dir.path()).contains(&manifest.layers[0].map));
    let mut bad_magic = bytes.clone();
    bad_magic[0] = b'X';
    std::fs::write(&map, &bad_magic).unwrap();
    assert!(open_error(dir.path()).contains("magic"));
    std::fs::write(&map, &bytes).unwrap();

    let data = dir.path().join(manifest.layers[1].data_name());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .unwrap()
        .set_len(BS)
        .unwrap();
    assert!(open_error(dir.path()).contains("shorter"));
    std::fs::remove_file(&data).unwrap();
    assert!(open_error(dir.path()).contains(&manifest.layers[1].data_name()));
}

/// The bytes of the head and of every snapshot, by name.
fn views(chain: &Chain) -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
    let head = chain.read(0, chain.size() as usize).unwrap();
    let snaps = chain
        .list_snapshots()
        .into_iter()
        .map(|s| {
            let bytes = chain.read_at_snapshot(&s.name, 0, s.size as usize).unwrap();
            (s.name, bytes)
        })
        .collect();
    (head, snaps)
}

/// Stops `run` at `point`, reopens the chain, lets `mid` check that it is the old or the
/// new one, re-runs `run`, and returns the chain.
fn crash_then_retry(
    dir: &Path,
    point: &'static str,
    run: impl Fn(&mut Chain) -> Result<(), LayerError>,
    mid: impl Fn(&Chain),
) -> Chain {
    let mut chain = Chain::open(dir).unwrap();
    chain.crash_at = Some(point);
    match run(&mut chain) {
        Err(LayerError::Injected { point: p }) => assert_eq!(p, point),
        other => panic!("{point}: the operation did not stop: {other:?}"),
    }
    assert!(matches!(run(&mut chain), Err(LayerError::Poisoned { .. })));
    drop(chain);
    let mut chain = Chain::open(dir).unwrap();
    assert_eq!(
        files_in(dir).len(),
        expected_files(&chain),
        "{point}: leftovers"
    );
    mid(&chain);
    run(&mut chain).unwrap();
    chain
}

#[test]
fn a_snapshot_stopped_at_any_step_leaves_the_old_or_new_chain_and_converges() {
    for point in [
        "snapshot: head flushed",
        "snapshot: new head created",
        "snapshot: manifest written",
    ] {
        let dir = temp();
        chain_on_disk(dir.path());
        let mut chain = Chain::open(dir.path()).unwrap();
        chain.write(3 * BS, &pattern(3, BS as usize)).unwrap();
        chain.flush().unwrap();
        let (head, mut snaps) = views(&chain);
        drop(chain);
        let old = (head.clone(), snaps.clone());
        let mut new = old.clone();
        new.1.push(("c".to_string(), head.clone()));
        let chain = crash_then_retry(
            dir.path(),
            point,
            |c| c.snapshot("c").map(drop),
            |c| {
                let now = views(c);
                assert!(now == old || now == new, "{point}: a mix");
            },
        );
        snaps.push(("c".to_string(), head.clone()));
        assert_eq!(views(&chain), (head, snaps), "{point}");
    }
}

#[test]
fn a_delete_stopped_at_any_step_leaves_the_old_or_new_chain_and_converges() {
    let cases = [
        (false, "delete: blocks copied"),
        (false, "delete: child map written"),
        (false, "delete: manifest written"),
        (true, "delete: intent written"),
        (true, "delete: blocks copied"),
        (true, "delete: child map written"),
        (true, "delete: manifest written"),
    ];
    for victim in ["a", "b"] {
        for (up, point) in cases {
            let dir = temp();
            chain_on_disk(dir.path());
            let mut chain = Chain::open(dir.path()).unwrap();
            chain.write(0, &pattern(4, 10)).unwrap();
            let (head, mut snaps) = views(&chain);
            chain.flush().unwrap();
            drop(chain);
            let old = (head.clone(), snaps.clone());
            let mut new = old.clone();
            new.1.retain(|(name, _)| name != victim);
            let chain = crash_then_retry(
                dir.path(),
                point,
                |c| {
                    c.merge_up = Some(up);
                    c.delete_snapshot(victim)
                },
                |c| {
                    let now = views(c);
                    assert!(now == old || now == new, "{victim} {up} {point}: a mix");
                },
            );
            snaps.retain(|(name, _)| name != victim);
            assert_eq!(
                views(&chain),
                (head.clone(), snaps),
                "{victim} {up} {point}"
            );
        }
    }
}

#[test]
fn a_grow_stopped_after_extending_the_files_converges() {
    let dir = temp();
    chain_on_disk(dir.path());
    let chain = crash_then_retry(
        dir.path(),
        "grow: files extended",
        |c| c.grow(2 * MIB),
        |c| assert_eq!(c.size(), MIB),
    );
    assert_eq!(chain.size(), 2 * MIB);
    drop(chain);
    let chain = Chain::open(dir.path()).unwrap();
    assert_eq!(chain.size(), 2 * MIB);
    assert_eq!(chain.read(MIB, 10).unwrap(), vec![0; 10]);
}

/// A chain of `size` bytes with one run of `run` bytes held in every `stride`, flushed, in a
/// fresh directory; `real` writes data, else the runs are trimmed (held in the map, zeros,
/// no disk space).
fn ten_percent(dir: &Path, size: u64, run: u64, stride: u64, real: bool) -> Chain {
    let mut chain = Chain::create(dir, size).unwrap();
    let data = pattern(7, run as usize);
    let mut at = 0;
    while at + run <= size {
        if real {
            chain.write(at, &data).unwrap();
        } else {
            chain.trim(at, run).unwrap();
        }
        at += stride;
    }
    chain.flush().unwrap();
    chain
}

fn timed_snapshot(chain: &mut Chain, name: &str) -> Duration {
    let started = Instant::now();
    chain.snapshot(name).unwrap();
    started.elapsed()
}

#[test]
fn a_snapshot_of_a_1_gib_chain_written_10_percent_takes_well_under_50_ms() {
    let dir = temp();
    // 4 KiB of real data every 40 KiB: 100 MiB written, scattered.
    let mut chain = ten_percent(dir.path(), 1 << 30, BS, 10 * BS, true);
    let took = timed_snapshot(&mut chain, "s");
    println!("snapshot of 1 GiB written 10% (4 KiB every 40 KiB): {took:?}");
    assert!(took < Duration::from_millis(50), "{took:?}");
    assert_eq!(
        chain.list_snapshots()[0].bytes_held,
        (1 << 30) / 10 / BS * BS + BS
    );
}

#[test]
fn snapshot_time_does_not_grow_with_the_volume() {
    // 64 KiB held every 640 KiB (10% of the map, scattered), by trims so that 64 GiB costs
    // no disk: what a snapshot costs depends on the map, never on the bytes behind it.
    let mut times = vec![];
    for (label, size) in [("1 GiB", 1u64 << 30), ("64 GiB", 64 << 30)] {
        let dir = temp();
        let mut chain = ten_percent(dir.path(), size, 16 * BS, 160 * BS, false);
        let took = timed_snapshot(&mut chain, "s");
        chain.write(0, &[1]).unwrap();
        let second = timed_snapshot(&mut chain, "t");
        println!("snapshot of {label} held 10%: {took:?}, then another: {second:?}");
        times.push(took.max(second));
    }
    assert!(
        times.iter().all(|t| *t < Duration::from_millis(500)),
        "{times:?}"
    );
}

/// A small deterministic generator (an LCG), for scattering blocks without a dependency.
fn scatter(seed: &mut u64, below: u64) -> u64 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (*seed >> 33) % below
}

/// The time of `reads` random 4 KiB reads of `chain`.
fn random_reads(chain: &Chain, reads: usize) -> Duration {
    let blocks = chain.size() / BS;
    let mut seed = 7;
    let started = Instant::now();
    for _ in 0..reads {
        let block = scatter(&mut seed, blocks);
        chain.read(block * BS, BS as usize).unwrap();
    }
    started.elapsed()
}

#[test]
fn random_reads_through_ten_snapshots_cost_about_as_much_as_through_none() {
    // 64 MiB; ten rounds of 10% of the blocks written at random, a snapshot after each in
    // one chain, all in the head of the other; then the same 20 000 random 4 KiB reads.
    let (flat_dir, deep_dir) = (temp(), temp());
    let size = 64 * MIB;
    let mut flat = Chain::create(flat_dir.path(), size).unwrap();
    let mut deep = Chain::create(deep_dir.path(), size).unwrap();
    let mut seed = 1;
    let block = pattern(5, BS as usize);
    for round in 0..10 {
        for _ in 0..size / BS / 10 {
            let at = scatter(&mut seed, size / BS) * BS;
            flat.write(at, &block).unwrap();
            deep.write(at, &block).unwrap();
        }
        deep.snapshot(&format!("s{round}")).unwrap();
    }
    flat.flush().unwrap();
    let base = random_reads(&flat, 20_000);
    let chained = random_reads(&deep, 20_000);
    println!("20 000 random 4 KiB reads: no snapshot {base:?}, ten snapshots {chained:?}");
    assert!(
        chained < base * 3 + Duration::from_millis(200),
        "{base:?} vs {chained:?}"
    );
}

/// What the proptest does to a chain and to the model.
#[derive(Clone, Debug)]
enum Op {
    Write {
        offset: u64,
        len: usize,
        seed: u8,
    },
    Trim {
        offset: u64,
        len: u64,
    },
    Snapshot,
    Delete(usize, Option<bool>),
    ReadAt(usize, u64, usize),
    Reopen,
    /// Reopened without a flush: each block reads as at the last flush or as now.
    Crash,
    Grow(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let span = 16 * BS;
    prop_oneof![
        4 => (0..span, 1..3 * BS as usize, any::<u8>())
            .prop_map(|(offset, len, seed)| Op::Write { offset, len, seed }),
        2 => (0..span, 1..4 * BS).prop_map(|(offset, len)| Op::Trim { offset, len }),
        2 => Just(Op::Snapshot),
        2 => (any::<usize>(), any::<Option<bool>>()).prop_map(|(i, up)| Op::Delete(i, up)),
        1 => (any::<usize>(), 0..span, 1..2 * BS as usize).prop_map(|(s, o, l)| Op::ReadAt(s, o, l)),
        1 => Just(Op::Reopen),
        1 => Just(Op::Crash),
        1 => (0..3u64).prop_map(Op::Grow),
    ]
}

/// The model: the head's bytes and each snapshot's, oldest first.
struct Model {
    head: Vec<u8>,
    /// The head's bytes at the last flush.
    flushed: Vec<u8>,
    snaps: Vec<(String, Vec<u8>)>,
    named: usize,
}

/// Clips `offset..offset+len` to `size`.
fn clip(offset: u64, len: u64, size: usize) -> (usize, usize) {
    let start = (offset as usize).min(size);
    (start, (start + len as usize).min(size))
}

fn apply(chain: &mut Chain, model: &mut Model, op: &Op, dir: &Path) {
    match op {
        Op::Write { offset, len, seed } => {
            let (start, end) = clip(*offset, *len as u64, model.head.len());
            let data = pattern(*seed, end - start);
            chain.write(start as u64, &data).unwrap();
            model.head[start..end].copy_from_slice(&data);
        }
        Op::Trim { offset, len } => {
            let (start, end) = clip(*offset, *len, model.head.len());
            chain.trim(start as u64, (end - start) as u64).unwrap();
            model.head[start..end].fill(0);
        }
        Op::Snapshot => {
            model.named += 1;
            let name = format!("s{}", model.named);
            chain.snapshot(&name).unwrap();
            model.snaps.push((name, model.head.clone()));
            model.flushed = model.head.clone();
        }
        Op::Delete(i, up) if !model.snaps.is_empty() => {
            let index = i % model.snaps.len();
            if index == model.snaps.len() - 1 {
                // Merging into the head flushes it first.
                model.flushed = model.head.clone();
            }
            let (name, _) = model.snaps.remove(index);
            chain.merge_up = *up;
            chain.delete_snapshot(&name).unwrap();
        }
        Op::ReadAt(i, offset, len) if !model.snaps.is_empty() => {
            let (name, bytes) = &model.snaps[i % model.snaps.len()];
            let (start, end) = clip(*offset, *len as u64, bytes.len());
            let got = chain
                .read_at_snapshot(name, start as u64, end - start)
                .unwrap();
            assert_eq!(got, bytes[start..end]);
        }
        Op::Reopen => {
            chain.flush().unwrap();
            *chain = Chain::open(dir).unwrap();
            model.flushed = model.head.clone();
        }
        Op::Crash => {
            *chain = Chain::open(dir).unwrap();
            let got = chain.read(0, model.head.len()).unwrap();
            let blocks = got.chunks(BS as usize).zip(model.head.chunks(BS as usize));
            for (i, (got, now)) in blocks.enumerate() {
                let then = &model.flushed[i * BS as usize..][..BS as usize];
                assert!(
                    got == now || got == then,
                    "block {i} is neither as flushed nor as now"
                );
            }
            model.head = got.clone();
            model.flushed = got;
        }
        Op::Grow(blocks) => {
            let size = model.head.len() + (*blocks * BS) as usize;
            chain.grow(size as u64).unwrap();
            model.head.resize(size, 0);
            model.flushed.resize(size, 0);
        }
        Op::Delete(..) | Op::ReadAt(..) => {}
    }
}

/// Panics at the first byte where `got` and `want` differ (not with 64 KiB of both).
fn same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: byte {i} is {}, the model has {}", got[i], want[i]);
    }
}

fn check(chain: &Chain, model: &Model) {
    same(
        &chain.read(0, model.head.len()).unwrap(),
        &model.head,
        "head",
    );
    let names: Vec<String> = chain.list_snapshots().into_iter().map(|s| s.name).collect();
    let model_names: Vec<String> = model.snaps.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(names, model_names);
    // Every nonzero byte lies in an extent.
    let extents: Vec<(u64, u64)> = chain.extents(None).unwrap().collect();
    for (i, byte) in model.head.iter().enumerate() {
        if *byte != 0 {
            let i = i as u64;
            assert!(
                extents.iter().any(|(o, l)| *o <= i && i < o + l),
                "byte {i}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_chain_reads_as_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        let dir = temp();
        let size = 16 * BS;
        let mut chain = Chain::create(dir.path(), size).unwrap();
        let mut model = Model {
            head: vec![0; size as usize],
            flushed: vec![0; size as usize],
            snaps: vec![],
            named: 0,
        };
        for op in &ops {
            apply(&mut chain, &mut model, op, dir.path());
            check(&chain, &model);
        }
        for (name, bytes) in &model.snaps {
            same(&chain.read_at_snapshot(name, 0, bytes.len()).unwrap(), bytes, name);
        }
        chain.flush().unwrap();
        drop(chain);
        let chain = Chain::open(dir.path()).unwrap();
        check(&chain, &model);
        prop_assert_eq!(files_in(dir.path()).len(), expected_files(&chain));
    }
}
