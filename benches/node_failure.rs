//! Node failure in Kubernetes, Palisade's recovery controller against Kubernetes alone, in
//! one run: each scenario of tests/common/failover.rs runs twice on a fresh real control
//! plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler from
//! `$KUBEBUILDER_ASSETS`, the real csi-provisioner and csi-attacher, three `palisade node`
//! processes and emulated kubelets), once with `palisade controller --kubernetes` as
//! deployed and once with `--no-recovery-controller`, which leaves the dead node's
//! VolumeAttachment and pods to Kubernetes as with any CSI driver. Every control-plane timing
//! is at its default (the Node goes NotReady ~50 s after its kubelet stops, pods tolerate it
//! 300 s).
//!
//! - `seed`: a Deployment's pod with an RWO claim runs and writes; its node dies; an operator
//!   force-deletes the pod once the Node is NotReady. Measured: the replacement's
//!   VolumeAttachment attached, after the force-delete.
//! - `death`: the same node death, nobody does anything; Palisade runs with
//!   node-down-failover-seconds=10. Measured: the replacement pod Running, after the death.
//!
//! Each phase's time from the node's death is printed for both runs, then the ratios. A run
//! of Kubernetes alone is capped (PALISADE_BENCH_CAP seconds after the death, 450 by default:
//! the attach-detach controller's 6-minute wait comes after the ~50 s to NotReady); a phase
//! not reached by then prints `>cap`, and the ratio is then a lower bound.
//!
//! Run: `cargo bench --bench node_failure` (about 20 minutes). Environment:
//! PALISADE_BENCH_ONLY (`seed` or `death`), PALISADE_BENCH_CAP (seconds). Without
//! KUBEBUILDER_ASSETS it prints SKIPPED.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::e2e::E2e;
use common::failover::{self, Log, Phases, Scenario, Trigger};

/// One side's run: its phases (None: it did not start).
type Run = Option<Phases>;

async fn one(name: &str, scenario: Scenario, recovery: bool) -> Run {
    let log: Log = Arc::default();
    let controller_args = if recovery {
        vec![]
    } else {
        vec!["--no-recovery-controller".to_string()]
    };
    let test = format!(
        "node_failure::{name}_{}",
        if recovery { "palisade" } else { "kubernetes" }
    );
    let e = E2e::start_with(
        &test,
        vec![],
        controller_args,
        failover::write_once_container(log.clone()),
    )
    .await?;
    let out: Arc<Mutex<Option<Phases>>> = Arc::default();
    let slot = out.clone();
    e.run(move |e| {
        Box::pin(async move {
            let outcome = failover::failover(e, &scenario, &log).await;
            *slot.lock().unwrap() = Some(outcome.phases);
        })
    })
    .await;
    let phases = out.lock().unwrap().take();
    phases
}

/// A phase's time; one never reached prints `>cap` in a run that was capped, `-` in one that
/// ended (the replacement ran) before it came.
fn cell(at: Option<f64>, cap: f64, ended: bool) -> String {
    match at {
        Some(s) => format!("{s:9.2} s"),
        None if ended => "-".to_string(),
        None => format!("  >{cap:.0} s"),
    }
}

/// The time from `from` to `to` in `p`, or a lower bound (from `from` to the cap) when `to`
/// was never reached.
fn span(
    p: &Phases,
    from: Option<std::time::Instant>,
    to: Option<std::time::Instant>,
    cap: f64,
) -> Option<(f64, bool)> {
    let from = from?;
    match to {
        Some(t) => Some((t.saturating_duration_since(from).as_secs_f64(), true)),
        None => {
            let died = p.died?;
            Some((
                cap - from.saturating_duration_since(died).as_secs_f64(),
                false,
            ))
        }
    }
}

fn report(
    name: &str,
    measured: &str,
    palisade: &Run,
    kubernetes: &Run,
    cap: f64,
    pick: fn(&Phases, f64) -> Option<(f64, bool)>,
) {
    println!("\n== {name}: phases from the node's death (default control-plane timings)");
    println!("  {:<40} {:>12} {:>12}", "phase", "Palisade", "Kubernetes");
    let rows = |r: &Run| r.as_ref().map(|p| p.rows()).unwrap_or_default();
    let ended = |r: &Run| r.as_ref().is_some_and(|p| p.running.is_some());
    let (a, b) = (rows(palisade), rows(kubernetes));
    for (i, (phase, at)) in a.iter().enumerate() {
        let other = b.get(i).and_then(|(_, t)| *t);
        println!(
            "  {phase:<40} {:>12} {:>12}",
            cell(*at, cap, ended(palisade)),
            cell(other, cap, ended(kubernetes))
        );
    }
    let (Some(p), Some(k)) = (
        palisade.as_ref().and_then(|p| pick(p, cap)),
        kubernetes.as_ref().and_then(|k| pick(k, cap)),
    ) else {
        println!("  {measured}: not measured (a run did not start)");
        return;
    };
    let bound = if k.1 { "" } else { " (capped: at least)" };
    println!(
        "  {measured}: Palisade {:.2} s, Kubernetes alone {}{:.2} s{bound}; ratio {}{:.1}x",
        p.0,
        if k.1 { "" } else { ">" },
        k.0,
        if k.1 { "" } else { ">" },
        k.0 / p.0.max(0.001)
    );
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    if !bench {
        // `cargo test --all-targets` runs benches as tests: this one takes 20 minutes.
        println!("node_failure: run with `cargo bench --bench node_failure`; nothing measured");
        return;
    }
    if std::env::var_os("KUBEBUILDER_ASSETS").is_none() {
        println!("SKIPPED: node_failure: KUBEBUILDER_ASSETS is not set (see README)");
        return;
    }
    let only = std::env::var("PALISADE_BENCH_ONLY").ok();
    let cap: u64 = std::env::var("PALISADE_BENCH_CAP")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(450);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let wants = |name: &str| only.as_deref().is_none_or(|o| o == name);
    runtime.block_on(async {
        if wants("seed") {
            let scenario = |recovery: bool| Scenario {
                deadline: Duration::from_secs(if recovery { 240 } else { cap }),
                must_finish: recovery,
                ..Scenario::new(Trigger::ForceDelete)
            };
            let palisade = one("seed", scenario(true), true).await;
            let kubernetes = one("seed", scenario(false), false).await;
            report(
                "seed: the pod force-deleted once its Node is NotReady",
                "new VolumeAttachment attached after the force-delete",
                &palisade,
                &kubernetes,
                cap as f64,
                |p, cap| span(p, p.trigger, p.attached, cap),
            );
        }
        if wants("death") {
            let scenario = |recovery: bool| Scenario {
                settings: if recovery {
                    vec![("node-down-failover-seconds", "10".to_string())]
                } else {
                    vec![]
                },
                deadline: Duration::from_secs(if recovery { 240 } else { cap }),
                must_finish: recovery,
                ..Scenario::new(Trigger::Nothing)
            };
            let palisade = one("death", scenario(true), true).await;
            let kubernetes = one("death", scenario(false), false).await;
            report(
                "death: nobody does anything (Palisade: node-down-failover-seconds=10)",
                "replacement pod Running after the node's death",
                &palisade,
                &kubernetes,
                cap as f64,
                |p, cap| span(p, p.died, p.running, cap),
            );
        }
    });
}
