//! The upstream CSI sidecars (csi-provisioner and csi-attacher from `$KUBEBUILDER_ASSETS`) as
//! host processes on a driver's CSI socket, each supervised the way the kubelet keeps a
//! container of a pod running: one that exits is started again with the same arguments.
//! They need that: both exit on purpose when they lose the driver's socket ("Lost connection
//! to CSI driver, exiting"), which is what a kill -9 of the controller does to them.
//!
//! Each sidecar's output (all its starts, separated by a marker line) is in its log file.
//! Dropping a [`Sidecar`] stops it by PID; each start also gets SIGKILL if its supervising
//! thread dies first (`setpriv --pdeathsig`), so a killed test run leaves nothing behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a sidecar that exited waits before it is started again (the kubelet's
/// CrashLoopBackOff starts at 10 s; the tests have no time for that).
const RESTART_DELAY: Duration = Duration::from_millis(500);

/// How often the supervisor looks at its process.
const POLL: Duration = Duration::from_millis(100);

/// One sidecar process, restarted whenever it exits, stopped on drop.
pub struct Sidecar {
    pub name: String,
    pub log: PathBuf,
    stop: Arc<AtomicBool>,
    starts: Arc<AtomicU32>,
    thread: Option<JoinHandle<()>>,
}

impl Sidecar {
    /// Starts `binary` from `assets` with `args`, its output appended to `log`.
    pub fn start(assets: &Path, binary: &str, args: Vec<String>, log: PathBuf) -> Sidecar {
        let exe = assets.join(binary);
        let stop = Arc::new(AtomicBool::new(false));
        let starts = Arc::new(AtomicU32::new(0));
        let thread = {
            let (stop, starts, log, name) = (
                stop.clone(),
                starts.clone(),
                log.clone(),
                binary.to_string(),
            );
            std::thread::Builder::new()
                .name(format!("supervise {binary}"))
                .spawn(move || supervise(&name, &exe, &args, &log, &stop, &starts))
                .expect("a supervisor thread")
        };
        Sidecar {
            name: binary.to_string(),
            log,
            stop,
            starts,
            thread: Some(thread),
        }
    }

    /// How many times the process was started (1 + its restarts).
    pub fn starts(&self) -> u32 {
        self.starts.load(Ordering::SeqCst)
    }

    /// Waits until the process has been started at least `n` times.
    pub async fn wait_starts(&self, n: u32, within: Duration) {
        let deadline = Instant::now() + within;
        while self.starts() < n {
            assert!(
                Instant::now() < deadline,
                "{} was started {} times, not {n}, within {within:?}:\n{}",
                self.name,
                self.starts(),
                self.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn supervise(
    name: &str,
    exe: &Path,
    args: &[String],
    log: &Path,
    stop: &AtomicBool,
    starts: &AtomicU32,
) {
    while !stop.load(Ordering::SeqCst) {
        let n = starts.fetch_add(1, Ordering::SeqCst) + 1;
        let mut child = spawn(name, exe, args, log, n);
        loop {
            if stop.load(Ordering::SeqCst) {
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(POLL);
        }
        let until = Instant::now() + RESTART_DELAY;
        while Instant::now() < until && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(POLL);
        }
    }
}

fn spawn(name: &str, exe: &Path, args: &[String], log: &Path, n: u32) -> Child {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("a sidecar log file");
    let _ = writeln!(file, "===== start {n} of {name}: {}", args.join(" "));
    let err = file.try_clone().expect("a sidecar log file");
    let mut command = if Path::new("/usr/bin/setpriv").exists() {
        let mut c = Command::new("/usr/bin/setpriv");
        c.arg("--pdeathsig=KILL").arg("--").arg(exe);
        c
    } else {
        Command::new(exe)
    };
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", exe.display()))
}

/// csi-provisioner on `socket`, as the deploy's controller runs it (without leader election:
/// there is one), with quick retries so that a test does not wait out the default backoff.
pub fn provisioner(assets: &Path, socket: &Path, kubeconfig: &Path, log: PathBuf) -> Sidecar {
    Sidecar::start(
        assets,
        "csi-provisioner",
        vec![
            format!("--csi-address={}", socket.display()),
            format!("--kubeconfig={}", kubeconfig.display()),
            "--leader-election=false".into(),
            "--extra-create-metadata".into(),
            "--default-fstype=ext4".into(),
            "--timeout=30s".into(),
            "--retry-interval-start=500ms".into(),
            "--retry-interval-max=5s".into(),
            "--v=4".into(),
        ],
        log,
    )
}

/// csi-attacher on `socket`, without leader election, with quick retries.
pub fn attacher(assets: &Path, socket: &Path, kubeconfig: &Path, log: PathBuf) -> Sidecar {
    Sidecar::start(
        assets,
        "csi-attacher",
        vec![
            format!("--csi-address={}", socket.display()),
            format!("--kubeconfig={}", kubeconfig.display()),
            "--leader-election=false".into(),
            "--timeout=30s".into(),
            "--retry-interval-start=500ms".into(),
            "--retry-interval-max=5s".into(),
            "--v=4".into(),
        ],
        log,
    )
}
