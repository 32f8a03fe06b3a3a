//! csi-sanity, the upstream CSI conformance suite (kubernetes-csi/csi-test v5), against the
//! real sockets: `palisade standalone`, and a cluster (`palisade controller` + two `palisade
//! node`s) with a node's socket as csi-sanity's endpoint and the controller's as its
//! controller endpoint. Each is run with the mount access type (and the node attach-limit
//! spec) and with the block access type; every spec must pass, or be skipped for a
//! capability Palisade does not advertise (snapshots, group snapshots, cloning,
//! ControllerModifyVolume). csi-sanity is `$KUBEBUILDER_ASSETS/csi-sanity`, else
//! `csi-sanity` on PATH; where it is absent these tests say SKIPPED loudly and pass.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::cluster::{cleanup_mounts, ready_cluster, stop_all, Cluster};
use common::Driver;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// The size of the volumes csi-sanity creates (its default is 10 GiB). Small, because the
/// attach-limit spec creates one more volume than a node takes (257 of them).
const VOLUME_SIZE: u64 = 16 * MIB;

/// The size csi-sanity expands them to.
const EXPAND_SIZE: u64 = 32 * MIB;

/// Bounds a run that hangs; a whole run takes seconds (or a minute more with the connect
/// quirk, see [`Outcome::only_connect_timeouts`]).
const SUITE_TIMEOUT: &str = "10m";

/// Writes to the test's real standard error, which libtest does not capture, so that the
/// line shows in `cargo test` whether the test passes or not.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `$KUBEBUILDER_ASSETS/csi-sanity`, else `csi-sanity` on PATH.
fn find_csi_sanity() -> Option<PathBuf> {
    let assets =
        std::env::var_os("KUBEBUILDER_ASSETS").map(|d| PathBuf::from(d).join("csi-sanity"));
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("csi-sanity"))
            .find(|p| executable(p))
    });
    assets.filter(|p| executable(p)).or(on_path)
}

/// csi-sanity, or None after saying loudly that `what` is not run.
fn csi_sanity_or_skip(what: &str) -> Option<PathBuf> {
    let found = find_csi_sanity();
    if found.is_none() {
        say(&format!(
            "SKIPPED: csi-sanity not found (set KUBEBUILDER_ASSETS to the directory holding it, \
             e.g. `../shared/k8s/install.sh /opt/k8s/bin` and KUBEBUILDER_ASSETS=/opt/k8s/bin, \
             or put csi-sanity on PATH): {what} not run"
        ));
    }
    found
}

/// One csi-sanity run: which sockets, which access type.
struct Run<'a> {
    /// Names the run in messages and its files.
    name: &'a str,
    endpoint: &'a Path,
    controller_endpoint: Option<&'a Path>,
    /// `mount` or `block`.
    access_type: &'a str,
    /// numberOfReplicas of the test volumes.
    replicas: u32,
    /// Whether to run the spec that publishes one volume more than the node takes.
    attach_limit: bool,
    /// Where the run keeps its files (parameters, output, report, staging and mount dirs).
    dir: &'a Path,
}

/// A spec that did not pass or was skipped, and why.
struct Spec {
    name: String,
    state: String,
    message: String,
    /// Where the failure was raised, `file:line`.
    location: String,
}

/// What a run did: from csi-sanity's JSON report, with its whole output for when it failed.
struct Outcome {
    name: String,
    success: bool,
    output: String,
    elapsed: Duration,
    passed: usize,
    pending: usize,
    skipped: Vec<Spec>,
    failed: Vec<Spec>,
    /// Why there is no report, if there is none.
    no_report: Option<String>,
}

impl Outcome {
    fn new(name: String, success: bool, output: String, elapsed: Duration) -> Outcome {
        Outcome {
            name,
            success,
            output,
            elapsed,
            passed: 0,
            pending: 0,
            skipped: Vec::new(),
            failed: Vec::new(),
            no_report: None,
        }
    }

    /// Counts the specs of Ginkgo's JSON report (a list of suites).
    fn tally(&mut self, suites: &[Value]) {
        let specs = suites
            .iter()
            .filter_map(|s| s["SpecReports"].as_array())
            .flatten();
        for s in specs {
            // Suite-level nodes (BeforeSuite, ReportAfterSuite, …) count only when they fail.
            let is_spec = s["LeafNodeType"] == "It";
            match s["State"].as_str() {
                Some("passed") if is_spec => self.passed += 1,
                Some("pending") if is_spec => self.pending += 1,
                Some("skipped") if is_spec => self.skipped.push(spec_of(s)),
                Some("passed" | "pending" | "skipped") => {}
                _ => self.failed.push(spec_of(s)),
            }
        }
    }

    /// csi-sanity v5.3.1's known quirk: its connect (utils.Connect) reads the connection's
    /// state and then waits for it to change, so a connection that became ready in between
    /// waits out the 60 s timeout ("Connection timed out", raised by the suite's setup in
    /// sanity.go; upstream now checks for ready first). True when that, and only that,
    /// failed.
    fn only_connect_timeouts(&self) -> bool {
        !self.failed.is_empty()
            && self.failed.iter().all(|s| {
                s.message.contains("Connection timed out")
                    && s.location.contains("pkg/sanity/sanity.go:")
            })
    }

    /// The specs skipped for a reason other than a capability Palisade does not advertise
    /// (or, in a run without it, the attach-limit spec): a skip that hides a regression.
    fn unexpected_skips(&self) -> Vec<&Spec> {
        self.skipped
            .iter()
            .filter(|s| {
                let why = s.message.to_lowercase();
                ![
                    "snapshot",
                    "modify volume",
                    "modifyvolume",
                    "groupcontroller",
                    "cloning",
                ]
                .iter()
                .any(|k| why.contains(k))
                    && why != "testnodevolumeattachlimit not enabled"
            })
            .collect()
    }

    fn summary(&self) -> String {
        format!(
            "csi-sanity {}: {} passed, {} failed, {} skipped, {} pending in {:.1} s",
            self.name,
            self.passed,
            self.failed.len(),
            self.skipped.len(),
            self.pending,
            self.elapsed.as_secs_f64()
        )
    }
}

fn spec_name(spec: &Value) -> String {
    let mut parts: Vec<&str> = spec["ContainerHierarchyTexts"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    parts.extend(spec["LeafNodeText"].as_str());
    parts.join(" ")
}

fn spec_of(spec: &Value) -> Spec {
    let failure = &spec["Failure"];
    Spec {
        name: spec_name(spec),
        state: spec["State"].as_str().unwrap_or("?").to_string(),
        message: failure["Message"].as_str().unwrap_or("").trim().to_string(),
        location: format!(
            "{}:{}",
            failure["Location"]["FileName"].as_str().unwrap_or("?"),
            failure["Location"]["LineNumber"]
        ),
    }
}

async fn run_once(csi_sanity: &Path, run: &Run<'_>, attempt: u32) -> Outcome {
    let file = |what: &str| run.dir.join(format!("{}-{attempt}.{what}", run.name));
    let params = run.dir.join(format!("{}-parameters.yaml", run.name));
    std::fs::write(&params, format!("numberOfReplicas: \"{}\"\n", run.replicas))
        .expect("write the test volume parameters");
    let (report, log) = (file("json"), file("log"));
    // csi-sanity creates these (their parent must exist) and removes them around each spec.
    let (staging, mount) = (file("staging"), file("mount"));

    let mut cmd = tokio::process::Command::new(csi_sanity);
    cmd.arg(format!("--csi.endpoint=unix://{}", run.endpoint.display()));
    if let Some(controller) = run.controller_endpoint {
        cmd.arg(format!(
            "--csi.controllerendpoint=unix://{}",
            controller.display()
        ));
    }
    cmd.arg(format!("--csi.stagingdir={}", staging.display()))
        .arg(format!("--csi.mountdir={}", mount.display()))
        .arg(format!("--csi.testvolumeparameters={}", params.display()))
        .arg(format!("--csi.testvolumesize={VOLUME_SIZE}"))
        .arg(format!("--csi.testvolumeexpandsize={EXPAND_SIZE}"))
        .arg(format!("--csi.testvolumeaccesstype={}", run.access_type))
        .arg(format!("--ginkgo.json-report={}", report.display()))
        .arg(format!("--ginkgo.timeout={SUITE_TIMEOUT}"))
        .args(["--ginkgo.v", "--ginkgo.no-color"]);
    if run.attach_limit {
        cmd.arg("--csi.testnodevolumeattachlimit");
    }
    let out = std::fs::File::create(&log).expect("create the csi-sanity log");
    cmd.stdout(out.try_clone().expect("clone the log file"))
        .stderr(out)
        // Narrows the connect quirk (see Outcome::only_connect_timeouts) to nearly nothing:
        // with one P, the goroutines that make the connection ready cannot run between
        // csi-sanity's reading the state and its waiting for a change of it. Without this,
        // on a loaded machine a third of the cluster runs lost a minute (or two) to it.
        .env("GOMAXPROCS", "1")
        .kill_on_drop(true);

    let started = Instant::now();
    let status = cmd
        .status()
        .await
        .unwrap_or_else(|e| panic!("run {csi_sanity:?}: {e}"));
    let elapsed = started.elapsed();
    let output = std::fs::read_to_string(&log).unwrap_or_else(|e| format!("(no output: {e})"));

    let name = if attempt == 1 {
        run.name.to_string()
    } else {
        format!("{} (attempt {attempt})", run.name)
    };
    let mut outcome = Outcome::new(name, status.success(), output, elapsed);
    let parsed = std::fs::read_to_string(&report)
        .map_err(|e| format!("cannot read {report:?}: {e}"))
        .and_then(|text| {
            serde_json::from_str::<Value>(&text).map_err(|e| format!("{report:?}: {e}"))
        });
    let suites = match parsed {
        Ok(Value::Array(suites)) => suites,
        Ok(_) => {
            outcome.no_report = Some(format!("{report:?} is not a list of suites"));
            return outcome;
        }
        Err(why) => {
            outcome.no_report = Some(why);
            return outcome;
        }
    };
    outcome.tally(&suites);
    outcome
}

/// Runs csi-sanity, once more if the first run failed only by the connect quirk.
async fn run(csi_sanity: &Path, run: Run<'_>) -> Vec<Outcome> {
    let first = run_once(csi_sanity, &run, 1).await;
    say(&first.summary());
    if !first.only_connect_timeouts() {
        return vec![first];
    }
    let hit: Vec<String> = first
        .failed
        .iter()
        .map(|s| format!("{} (at {})", s.name, s.location))
        .collect();
    say(&format!(
        "csi-sanity {}: only csi-sanity v5.3.1's connect timeout failed ({}); running it once more",
        run.name,
        hit.join("; ")
    ));
    let second = run_once(csi_sanity, &run, 2).await;
    say(&second.summary());
    vec![first, second]
}

/// Panics, with csi-sanity's output, unless the last attempt of every run succeeded with
/// nothing failed and nothing skipped that Palisade should have run.
fn check(runs: &[Vec<Outcome>]) {
    let mut problems = Vec::new();
    for attempts in runs {
        let Some(o) = attempts.last() else { continue };
        let mut why = Vec::new();
        if let Some(no_report) = &o.no_report {
            why.push(format!("no report: {no_report}"));
        }
        for s in &o.failed {
            // The gist; Gomega's dump of the error follows in the output.
            let gist: Vec<&str> = s.message.lines().map(str::trim).take(3).collect();
            why.push(format!(
                "{} [{}] at {}: {}",
                s.name,
                s.state,
                s.location,
                gist.join(" ")
            ));
        }
        for s in o.unexpected_skips() {
            why.push(format!("{} skipped: {}", s.name, s.message));
        }
        if o.no_report.is_none() && o.passed == 0 {
            why.push("no spec passed".into());
        }
        if !o.success && why.is_empty() {
            why.push("csi-sanity exited with failure".into());
        }
        if !why.is_empty() {
            eprintln!(
                "======== csi-sanity {} output ========\n{}\n======== end of csi-sanity {} output ========",
                o.name, o.output, o.name
            );
            problems.push(format!("{}:\n  {}", o.summary(), why.join("\n  ")));
        }
    }
    assert!(
        problems.is_empty(),
        "csi-sanity failed (its output is printed above):\n{}",
        problems.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csi_sanity_passes_against_standalone() {
    let Some(csi_sanity) = csi_sanity_or_skip("csi-sanity against standalone") else {
        return;
    };
    let driver = Driver::start(&["disk0"]).await;
    let dir = driver.path("csi-sanity");
    std::fs::create_dir_all(&dir).expect("create the csi-sanity directory");
    let mut runs = Vec::new();
    for (access_type, attach_limit) in [("mount", true), ("block", false)] {
        let name = format!("standalone-{access_type}");
        runs.push(
            run(
                &csi_sanity,
                Run {
                    name: &name,
                    endpoint: &driver.socket,
                    controller_endpoint: None,
                    access_type,
                    replicas: 1,
                    attach_limit,
                    dir: &dir,
                },
            )
            .await,
        );
    }
    drop(driver); // unmounts whatever a failed spec left behind
    check(&runs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csi_sanity_passes_against_a_controller_and_two_nodes() {
    let Some(csi_sanity) = csi_sanity_or_skip("csi-sanity against a cluster") else {
        return;
    };
    let mut cluster = Cluster::start(2).await;
    ready_cluster(&cluster).await;
    let root = cluster.dir.path().to_path_buf();
    let dir = root.join("csi-sanity");
    std::fs::create_dir_all(&dir).expect("create the csi-sanity directory");
    let controller = cluster.controller_socket.clone();
    let mut runs = Vec::new();
    // Mount on one node, block on the other: each node's socket gets a whole run.
    for (node, access_type, attach_limit) in [("n1", "mount", true), ("n2", "block", false)] {
        let name = format!("cluster-{node}-{access_type}");
        let socket = cluster.node(node).socket.clone();
        runs.push(
            run(
                &csi_sanity,
                Run {
                    name: &name,
                    endpoint: &socket,
                    controller_endpoint: Some(&controller),
                    access_type,
                    replicas: 2,
                    attach_limit,
                    dir: &dir,
                },
            )
            .await,
        );
    }
    stop_all(&mut cluster);
    cleanup_mounts(&root);
    check(&runs);
}

/// A spec of a report, as Ginkgo writes it.
fn report_spec(state: &str, message: &str, file: &str, line: u32) -> Value {
    serde_json::json!({
        "ContainerHierarchyTexts": ["Node Service"],
        "LeafNodeType": "It",
        "LeafNodeText": "should work",
        "State": state,
        "Failure": {
            "Message": message,
            "Location": {"FileName": file, "LineNumber": line},
        },
    })
}

#[test]
fn the_connect_quirk_is_recognised_only_when_it_is_all_that_failed() {
    const SANITY_GO: &str = "github.com/kubernetes-csi/csi-test/v5/pkg/sanity/sanity.go";
    const NODE_GO: &str = "github.com/kubernetes-csi/csi-test/v5/pkg/sanity/node.go";
    let timed_out = "Unexpected error:\n    <*errors.errorString | 0xc0001>: \n    Connection timed out\n    {s: \"Connection timed out\"}\noccurred";
    let outcome = |specs: Vec<Value>| {
        let mut o = Outcome::new("t".into(), false, String::new(), Duration::ZERO);
        o.tally(&[serde_json::json!({ "SpecReports": specs })]);
        o
    };
    let passed = report_spec("passed", "", "", 0);
    let quirk = report_spec("failed", timed_out, SANITY_GO, 272);
    let controller_quirk = report_spec("failed", timed_out, SANITY_GO, 289);
    let real = report_spec("failed", "rpc error: code = Internal", NODE_GO, 248);
    let skipped = report_spec("skipped", "CreateSnapshot not supported", NODE_GO, 1);
    let hidden = report_spec("skipped", "Controller Service not provided", NODE_GO, 1);

    let o = outcome(vec![
        passed.clone(),
        quirk.clone(),
        controller_quirk,
        skipped.clone(),
    ]);
    assert_eq!((o.passed, o.failed.len(), o.skipped.len()), (1, 2, 1));
    assert!(o.only_connect_timeouts());
    assert!(o.unexpected_skips().is_empty());
    assert!(!outcome(vec![passed.clone(), quirk, real.clone()]).only_connect_timeouts());
    assert!(!outcome(vec![passed.clone(), real]).only_connect_timeouts());
    assert!(!outcome(vec![passed.clone(), skipped]).only_connect_timeouts());
    // Connection timed out elsewhere than in the suite's setup is a real failure.
    let elsewhere = report_spec("failed", timed_out, NODE_GO, 248);
    assert!(!outcome(vec![elsewhere]).only_connect_timeouts());
    // A skip for a capability Palisade does advertise is not a pass.
    let o = outcome(vec![passed, hidden]);
    assert_eq!(o.unexpected_skips().len(), 1);
}
