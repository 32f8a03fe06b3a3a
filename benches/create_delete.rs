//! CreateVolume + DeleteVolume latency over the real socket of the real binary, with 100,
//! 1,000 and 10,000 volumes already in the store, beside a reference: the bare durable work
//! one create+delete needs (one fsynced redb commit and one fsynced sparse file, created and
//! removed) done in-process on the same disk. Prints p50/p99 and the ratios.
//!
//! Run: `cargo bench --bench create_delete` (PALISADE_BENCH_MAX=1000 for a shorter run).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::{mount_cap, Driver};
use palisade::csi::v1 as pb;

const SAMPLES: usize = 200;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Latencies of CreateVolume, DeleteVolume and the pair, each sorted.
struct Latencies {
    create: Vec<Duration>,
    delete: Vec<Duration>,
    pair: Vec<Duration>,
}

async fn measure(d: &mut Driver, tag: &str) -> Latencies {
    let mut out = Latencies {
        create: Vec::with_capacity(SAMPLES),
        delete: Vec::with_capacity(SAMPLES),
        pair: Vec::with_capacity(SAMPLES),
    };
    for i in 0..SAMPLES {
        let name = format!("bench-{tag}-{i}");
        let start = Instant::now();
        let v = d
            .controller
            .create_volume(common::create_req(
                &name,
                common::MIB,
                vec![mount_cap("ext4")],
                &[("numberOfReplicas", "1")],
            ))
            .await
            .expect("create")
            .into_inner()
            .volume
            .expect("volume");
        let created = start.elapsed();
        d.controller
            .delete_volume(pb::DeleteVolumeRequest {
                volume_id: v.volume_id,
                secrets: Default::default(),
            })
            .await
            .expect("delete");
        let pair = start.elapsed();
        out.create.push(created);
        out.delete.push(pair - created);
        out.pair.push(pair);
    }
    out.create.sort();
    out.delete.sort();
    out.pair.sort();
    out
}

/// The reference: what one create+delete must at least do durably.
fn reference(dir: &std::path::Path) -> Vec<Duration> {
    let db = redb::Database::create(dir.join("ref.redb")).expect("ref db");
    let table: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("t");
    let mut out = Vec::with_capacity(SAMPLES);
    let doc = vec![b'x'; 600];
    for i in 0..SAMPLES {
        let start = Instant::now();
        let key = format!("ref-{i}");
        let w = db.begin_write().expect("begin");
        w.open_table(table)
            .expect("table")
            .insert(key.as_str(), doc.as_slice())
            .expect("insert");
        w.commit().expect("commit");
        let path = dir.join(&key);
        let mut f = std::fs::File::create(&path).expect("file");
        f.set_len(1 << 20).expect("set_len");
        f.write_all(b"m").expect("write");
        f.sync_all().expect("fsync");
        std::fs::remove_file(&path).expect("remove");
        let w = db.begin_write().expect("begin");
        w.open_table(table)
            .expect("table")
            .remove(key.as_str())
            .expect("remove");
        w.commit().expect("commit");
        out.push(start.elapsed());
    }
    out.sort();
    out
}

#[tokio::main]
async fn main() {
    let max: usize = std::env::var("PALISADE_BENCH_MAX")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let mut d = Driver::start(&["disk0"]).await;
    let reference = reference(d.state_dir());
    println!(
        "reference (redb commit + fsynced sparse file, create+delete): p50 {:.2} ms  p99 {:.2} ms",
        ms(percentile(&reference, 0.5)),
        ms(percentile(&reference, 0.99))
    );
    let mut existing = 0usize;
    let mut p99_at_100 = None;
    for level in [100usize, 1_000, 10_000].into_iter().filter(|l| *l <= max) {
        let fill_start = Instant::now();
        while existing < level {
            common::create(
                &mut d,
                &format!("fill-{existing}"),
                common::MIB,
                vec![mount_cap("ext4")],
            )
            .await;
            existing += 1;
        }
        let fill = fill_start.elapsed();
        let lat = measure(&mut d, &level.to_string()).await;
        let (p50, p99) = (percentile(&lat.pair, 0.5), percentile(&lat.pair, 0.99));
        let base = *p99_at_100.get_or_insert(p99);
        println!(
            "{level:>6} volumes: create p50 {:.2} ms p99 {:.2} ms | delete p50 {:.2} ms p99 {:.2} ms | pair p50 {:.2} ms p99 {:.2} ms | pair p99 / p99@100 = {:.2} | pair p50 / reference p50 = {:.2} (filled in {:.1} s)",
            ms(percentile(&lat.create, 0.5)),
            ms(percentile(&lat.create, 0.99)),
            ms(percentile(&lat.delete, 0.5)),
            ms(percentile(&lat.delete, 0.99)),
            ms(p50),
            ms(p99),
            p99.as_secs_f64() / base.as_secs_f64(),
            p50.as_secs_f64() / percentile(&reference, 0.5).as_secs_f64(),
            fill.as_secs_f64()
        );
    }
}
