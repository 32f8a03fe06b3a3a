//! The `palisade` binary: one subcommand per process role.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use palisade::standalone::{self, DiskArg, StandaloneConfig};

#[derive(Parser)]
#[command(
    name = "palisade",
    version,
    about = "Replicated block volumes from local disks, with fencing"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Controller and one node in one process, embedded store, one CSI socket.
    Standalone {
        /// CSI endpoint (default: unix://<state-dir>/csi.sock).
        #[arg(long, env = "CSI_ENDPOINT")]
        endpoint: Option<String>,
        /// Where the store and (by default) the disk live.
        #[arg(long, default_value = "/var/lib/palisade")]
        state_dir: PathBuf,
        /// A disk for replicas: PATH or PATH:tag1,tag2. Repeat for several (default: <state-dir>/disk0).
        #[arg(long = "disk")]
        disks: Vec<DiskArg>,
        /// This node's id (default: the host name).
        #[arg(long, env = "NODE_ID")]
        node_id: Option<String>,
        /// This node's zone, reported as topology.kubernetes.io/zone.
        #[arg(long)]
        zone: Option<String>,
        /// Node tags for nodeSelector, comma-separated.
        #[arg(long, value_delimiter = ',')]
        node_tags: Vec<String>,
        /// The CSI driver name.
        #[arg(long, default_value = "driver.palisade.io")]
        driver_name: String,
        /// Seconds between the node's heartbeats.
        #[arg(long, default_value_t = 2)]
        heartbeat_seconds: u64,
    },
}

fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node-1".to_string())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("palisade: starting the runtime failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Standalone {
            endpoint,
            state_dir,
            disks,
            node_id,
            zone,
            node_tags,
            driver_name,
            heartbeat_seconds,
        } => {
            let disks = if disks.is_empty() {
                vec![DiskArg {
                    path: state_dir.join("disk0"),
                    tags: Vec::new(),
                }]
            } else {
                disks
            };
            let endpoint = endpoint
                .unwrap_or_else(|| format!("unix://{}", state_dir.join("csi.sock").display()));
            let cfg = StandaloneConfig {
                endpoint,
                state_dir,
                disks,
                node_id: node_id.unwrap_or_else(host_name),
                zone,
                node_tags,
                driver_name,
                heartbeat_interval: Duration::from_secs(heartbeat_seconds.max(1)),
            };
            runtime
                .block_on(standalone::run(cfg))
                .map_err(|e| e.to_string())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("palisade: {e}");
            ExitCode::FAILURE
        }
    }
}
