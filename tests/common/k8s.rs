//! A real Kubernetes control plane for tests: etcd and kube-apiserver (and, when asked,
//! kube-controller-manager and kube-scheduler) from `$KUBEBUILDER_ASSETS`, on loopback with
//! ephemeral ports, in a temporary directory per run, as `../shared/k8s/up.sh` starts them.
//!
//! The certificates are made in process with rcgen (ECDSA P-256): no openssl processes, no
//! CSR and extension files, and a few milliseconds instead of the seconds RSA key generation
//! takes. etcd's data lives on tmpfs (/dev/shm), which makes its fsyncs free (the etcd 3.4
//! here has no `--unsafe-no-fsync`).
//!
//! Everything started is stopped by PID when the [`ControlPlane`] is dropped, which includes
//! a test that panics; each process also gets SIGKILL if the test's thread dies first
//! (`setpriv --pdeathsig`), so a killed test run leaves nothing behind either.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

use super::cluster::free_port;

/// The binaries a control plane needs, in `$KUBEBUILDER_ASSETS`.
pub const BINARIES: &[&str] = &[
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
];

/// How long to wait for the API server's /readyz.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// The service network (the API server's own Service takes its first address).
const SERVICE_CIDR: &str = "10.96.0.0/16";

/// Which components to start besides etcd and the API server.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// kube-controller-manager (`--controllers=*`): garbage collection, the attach-detach
    /// controller, service accounts...
    pub controller_manager: bool,
    /// Extra kube-controller-manager flags, after the harness's own (a later flag wins), e.g.
    /// `--node-monitor-grace-period=20s` for a node that goes NotReady sooner.
    pub controller_manager_args: Vec<String>,
    /// kube-scheduler.
    pub scheduler: bool,
}

/// A running control plane. Dropping it stops every process it started.
pub struct ControlPlane {
    /// Certificates, kubeconfigs and logs.
    pub dir: tempfile::TempDir,
    /// etcd's data, on tmpfs when there is one.
    _etcd_data: tempfile::TempDir,
    /// The admin kubeconfig (`system:masters`).
    pub kubeconfig: PathBuf,
    /// `https://127.0.0.1:<port>`.
    pub server: String,
    /// How long it took from the first process to a ready API server (and the other
    /// components asked for).
    pub startup: Duration,
    assets: PathBuf,
    processes: Vec<(&'static str, Child)>,
}

/// The assets directory if it has every binary, else prints a loud SKIPPED line naming the
/// test and what is missing, and returns None.
pub fn assets(test: &str) -> Option<PathBuf> {
    let Some(dir) = std::env::var_os("KUBEBUILDER_ASSETS").map(PathBuf::from) else {
        skipped(&format!(
            "SKIPPED: {test}: KUBEBUILDER_ASSETS is not set (a directory with {}; \
             ../shared/k8s/install.sh /opt/k8s/bin, then export KUBEBUILDER_ASSETS=/opt/k8s/bin)",
            BINARIES.join(", ")
        ));
        return None;
    };
    let missing: Vec<&str> = BINARIES
        .iter()
        .copied()
        .filter(|b| !is_executable(&dir.join(b)))
        .collect();
    if !missing.is_empty() {
        skipped(&format!(
            "SKIPPED: {test}: KUBEBUILDER_ASSETS={} is missing {}",
            dir.display(),
            missing.join(", ")
        ));
        return None;
    }
    Some(dir)
}

/// Writes `line` to the real standard error: the test harness captures `eprintln!` of tests
/// that pass, and a skip must be seen.
fn skipped(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

impl ControlPlane {
    /// etcd and kube-apiserver; None (after a SKIPPED line) when the binaries are missing.
    pub async fn start(test: &str) -> Option<ControlPlane> {
        ControlPlane::start_with(test, Options::default()).await
    }

    /// etcd, kube-apiserver and the components `options` asks for; None (after a SKIPPED
    /// line) when the binaries are missing. Panics, with the logs, if it does not come up.
    pub async fn start_with(test: &str, options: Options) -> Option<ControlPlane> {
        let assets = assets(test)?;
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("palisade-k8s-")
            .tempdir()
            .expect("temporary directory");
        let shm = Path::new("/dev/shm");
        let etcd_data = if shm.is_dir() {
            tempfile::Builder::new()
                .prefix("palisade-etcd-")
                .tempdir_in(shm)
        } else {
            tempfile::Builder::new().prefix("palisade-etcd-").tempdir()
        }
        .expect("etcd data directory");
        std::fs::create_dir_all(dir.path().join("logs")).expect("logs directory");
        let pki = Pki::write(dir.path());
        let apiserver_port = free_port();
        let server = format!("https://127.0.0.1:{apiserver_port}");
        let kubeconfig = dir.path().join("admin.kubeconfig");
        write_kubeconfig(&kubeconfig, &server, &pki, "admin");

        let mut plane = ControlPlane {
            dir,
            _etcd_data: etcd_data,
            kubeconfig,
            server,
            startup: Duration::ZERO,
            assets,
            processes: Vec::new(),
        };
        let (etcd_port, etcd_peer_port) = (free_port(), free_port());
        let etcd_data = plane._etcd_data.path().display().to_string();
        plane.spawn(
            "etcd",
            &[
                "--name=test".to_string(),
                format!("--data-dir={etcd_data}"),
                format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"),
                format!("--advertise-client-urls=http://127.0.0.1:{etcd_port}"),
                format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer_port}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer_port}"),
                format!("--initial-cluster=test=http://127.0.0.1:{etcd_peer_port}"),
                "--initial-cluster-state=new".to_string(),
                "--log-level=warn".to_string(),
                "--logger=zap".to_string(),
            ],
        );
        let p = |name: &str| pki.path(name);
        plane.spawn(
            "kube-apiserver",
            &[
                format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
                "--bind-address=127.0.0.1".to_string(),
                format!("--secure-port={apiserver_port}"),
                // Only recorded in the `kubernetes` Endpoints, which may not be loopback.
                "--advertise-address=10.255.255.1".to_string(),
                format!(
                    "--cert-dir={}",
                    plane.dir.path().join("apiserver").display()
                ),
                format!("--tls-cert-file={}", p("apiserver.crt")),
                format!("--tls-private-key-file={}", p("apiserver.key")),
                format!("--client-ca-file={}", p("ca.crt")),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".to_string(),
                format!("--service-account-key-file={}", p("sa.pub")),
                format!("--service-account-signing-key-file={}", p("sa.key")),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                "--authorization-mode=Node,RBAC".to_string(),
                "--allow-privileged=true".to_string(),
                "--profiling=false".to_string(),
                "--v=1".to_string(),
            ],
        );
        plane.wait_ready().await;
        if options.controller_manager {
            let config = plane.dir.path().join("kube-controller-manager.kubeconfig");
            write_kubeconfig(&config, &plane.server, &pki, "kube-controller-manager");
            let port = free_port();
            let mut args = vec![
                format!("--kubeconfig={}", config.display()),
                format!("--authentication-kubeconfig={}", config.display()),
                format!("--authorization-kubeconfig={}", config.display()),
                "--bind-address=127.0.0.1".to_string(),
                format!("--secure-port={port}"),
                format!("--cert-dir={}", plane.dir.path().join("kcm").display()),
                "--controllers=*".to_string(),
                "--use-service-account-credentials=true".to_string(),
                format!("--service-account-private-key-file={}", p("sa.key")),
                format!("--root-ca-file={}", p("ca.crt")),
                format!("--cluster-signing-cert-file={}", p("ca.crt")),
                format!("--cluster-signing-key-file={}", p("ca.key")),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                "--leader-elect=false".to_string(),
                "--v=1".to_string(),
            ];
            args.extend(options.controller_manager_args.iter().cloned());
            plane.spawn("kube-controller-manager", &args);
            // Its service account controller creates every namespace's `default` account:
            // that it did proves its controllers run.
            plane
                .wait_for("kube-controller-manager", |plane| {
                    plane
                        .kubectl(&["get", "serviceaccount", "default", "-n", "default"])
                        .status
                        .success()
                })
                .await;
        }
        if options.scheduler {
            let config = plane.dir.path().join("kube-scheduler.kubeconfig");
            write_kubeconfig(&config, &plane.server, &pki, "kube-scheduler");
            let port = free_port();
            plane.spawn(
                "kube-scheduler",
                &[
                    format!("--kubeconfig={}", config.display()),
                    format!("--authentication-kubeconfig={}", config.display()),
                    format!("--authorization-kubeconfig={}", config.display()),
                    "--bind-address=127.0.0.1".to_string(),
                    format!("--secure-port={port}"),
                    "--leader-elect=false".to_string(),
                    "--v=1".to_string(),
                ],
            );
            // Serving its secure port means it is past loading its configuration.
            plane
                .wait_for("kube-scheduler", |_| {
                    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                })
                .await;
        }
        plane.startup = started.elapsed();
        eprintln!(
            "control plane for {test} ready in {:.2} s at {} (kubeconfig {})",
            plane.startup.as_secs_f64(),
            plane.server,
            plane.kubeconfig.display()
        );
        Some(plane)
    }

    /// Starts `binary` from the assets, logging to `logs/<binary>.log`, killed if the calling
    /// thread dies.
    fn spawn(&mut self, binary: &'static str, args: &[String]) {
        let log_path = self.log_path(binary);
        let log = std::fs::File::create(&log_path).expect("log file");
        let err = log.try_clone().expect("log file");
        let exe = self.assets.join(binary);
        let mut command = if is_executable(Path::new("/usr/bin/setpriv")) {
            let mut c = Command::new("/usr/bin/setpriv");
            c.arg("--pdeathsig=KILL").arg("--").arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let child = command
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", exe.display()));
        self.processes.push((binary, child));
    }

    fn log_path(&self, component: &str) -> PathBuf {
        self.dir
            .path()
            .join("logs")
            .join(format!("{component}.log"))
    }

    /// The last lines of a component's log.
    pub fn log_tail(&self, component: &str, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path(component)).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Panics with the logs if a process this control plane started has exited.
    fn check_alive(&mut self) {
        let mut dead = None;
        for (name, child) in &mut self.processes {
            if let Ok(Some(status)) = child.try_wait() {
                dead = Some((*name, status));
                break;
            }
        }
        if let Some((name, status)) = dead {
            let tail = self.log_tail(name, 40);
            panic!("{name} exited ({status}); the end of its log:\n{tail}");
        }
    }

    async fn wait_ready(&mut self) {
        let client = self.client().await;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let request = http::Request::get("/readyz")
                .body(Vec::new())
                .expect("request");
            if let Ok(body) = client.request_text(request).await {
                if body.trim() == "ok" {
                    return;
                }
            }
            self.check_alive();
            if Instant::now() > deadline {
                let tail = self.log_tail("kube-apiserver", 40);
                panic!("kube-apiserver not ready after {READY_TIMEOUT:?}:\n{tail}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_for(&mut self, component: &str, ready: impl Fn(&ControlPlane) -> bool) {
        let deadline = Instant::now() + READY_TIMEOUT;
        while !ready(self) {
            self.check_alive();
            if Instant::now() > deadline {
                let tail = self.log_tail(component, 40);
                panic!("{component} not ready after {READY_TIMEOUT:?}:\n{tail}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A client with the admin credentials.
    pub async fn client(&self) -> kube::Client {
        let file = kube::config::Kubeconfig::read_from(&self.kubeconfig).expect("kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(file, &Default::default())
            .await
            .expect("client config");
        kube::Client::try_from(config).expect("client")
    }

    /// Runs kubectl with the admin kubeconfig.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        Command::new(self.assets.join("kubectl"))
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args)
            .output()
            .expect("running kubectl")
    }

    /// Runs kubectl and returns its stdout; panics with its stderr if it fails.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {}: {}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Applies deploy/cluster/crds.yaml (the checked-in file, so that a real API server
    /// accepts it) and waits until every CRD is established.
    pub fn apply_crds(&self) {
        let crds = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/cluster/crds.yaml");
        self.kubectl_ok(&["apply", "-f", crds]);
        self.kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "-f",
            crds,
        ]);
    }

    /// Creates a namespace.
    pub fn create_namespace(&self, name: &str) {
        self.kubectl_ok(&["create", "namespace", name]);
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // The dependents first, etcd last; SIGKILL: nothing of a test's control plane is kept.
        for (_, child) in self.processes.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The certificates and keys of one control plane, as files in `<dir>/pki`.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn write(dir: &Path) -> Pki {
        let pki = Pki {
            dir: dir.join("pki"),
        };
        std::fs::create_dir_all(&pki.dir).expect("pki directory");
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.distinguished_name = name(None, "palisade-test-kubernetes-ca");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        pki.file("ca.key", &ca_key.serialize_pem());
        let ca = CertifiedIssuer::self_signed(ca, ca_key).expect("CA certificate");
        pki.file("ca.crt", &ca.pem());

        let serving = [
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1))),
            SanType::DnsName("localhost".try_into().expect("DNS name")),
            SanType::DnsName("kubernetes.default.svc".try_into().expect("DNS name")),
        ];
        pki.leaf(&ca, "apiserver", None, "kube-apiserver", &serving);
        pki.leaf(
            &ca,
            "admin",
            Some("system:masters"),
            "kubernetes-admin",
            &[],
        );
        for component in ["kube-controller-manager", "kube-scheduler"] {
            pki.leaf(&ca, component, None, &format!("system:{component}"), &[]);
        }
        let sa = KeyPair::generate().expect("service account key");
        pki.file("sa.key", &sa.serialize_pem());
        pki.file("sa.pub", &sa.public_key_pem());
        pki
    }

    /// A certificate signed by the CA: a server's when `sans` are given, else a client's.
    fn leaf(
        &self,
        ca: &CertifiedIssuer<'_, KeyPair>,
        file: &str,
        organization: Option<&str>,
        common_name: &str,
        sans: &[SanType],
    ) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name = name(organization, common_name);
        params.subject_alt_names = sans.to_vec();
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = if sans.is_empty() {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        } else {
            vec![ExtendedKeyUsagePurpose::ServerAuth]
        };
        let cert = params.signed_by(&key, ca).expect("certificate");
        self.file(&format!("{file}.crt"), &cert.pem());
        self.file(&format!("{file}.key"), &key.serialize_pem());
    }

    fn file(&self, name: &str, contents: &str) {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(self.dir.join(name))
            .expect("pki file");
        f.write_all(contents.as_bytes()).expect("pki file");
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

fn name(organization: Option<&str>, common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    if let Some(o) = organization {
        dn.push(DnType::OrganizationName, o);
    }
    dn.push(DnType::CommonName, common_name);
    dn
}

/// A kubeconfig for `user`, whose certificate is `<pki>/<user>.crt`.
fn write_kubeconfig(path: &Path, server: &str, pki: &Pki, user: &str) {
    let text = format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: test\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\n\
         users:\n\
         - name: {user}\n  user:\n    client-certificate: {crt}\n    client-key: {key}\n\
         contexts:\n\
         - name: {user}@test\n  context: {{cluster: test, user: {user}}}\n\
         current-context: {user}@test\n",
        ca = pki.path("ca.crt"),
        crt = pki.path(&format!("{user}.crt")),
        key = pki.path(&format!("{user}.key")),
    );
    std::fs::write(path, text).expect("kubeconfig");
}
