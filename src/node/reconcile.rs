//! What a node process finds of the cluster data path when it (re)starts, and how it tears
//! down the part that can never serve again.
//!
//! A staged volume is served in layers (see `node::engines`): the engine, in this process, on
//! `<state-dir>/engines/<volume>.sock`; nbdfuse, a child process, exposing it as the file
//! `<state-dir>/fuse/<volume>/nbd`; a loop device over that file; a filesystem on the loop
//! device mounted at the staging path; bind mounts of it at the pods' target paths. When the
//! process dies (kill -9, OOM, a crash) the engine dies with it, and nothing above it can
//! serve again: nbdfuse is orphaned with a broken NBD connection (or gone, and its FUSE mount
//! answers ENOTCONN), so every I/O through the loop device fails. A new engine cannot be
//! slid under the old loop device: the loop holds the dead FUSE file open.
//!
//! So at start-up, before it serves CSI, the node tears down every layer of every volume
//! under its own `<state-dir>/fuse/` (it has no engine yet): the mounts of the loop devices
//! over those files (lazily, `MNT_DETACH`, where a normal unmount fails: the device is dead,
//! nothing on it can be saved), the loop devices, the FUSE mounts, orphaned nbdfuse
//! processes, and stale engine sockets. It never touches anything that is not reached from
//! its own fuse directory: other node processes on the same machine (tests) have their own.
//!
//! The pods that used those mounts cannot be revived in place: their containers hold mounts
//! of a filesystem whose device is dead. The paths torn down are remembered in
//! `<state-dir>/torn-down/<volume>.json`, and NodeGetVolumeStats of such a path reports the
//! volume abnormal ("the engine is gone, the volume must be staged again"), which is what
//! makes the pod restart (DESIGN, "a volume detached unexpectedly"); the kubelet then
//! unpublishes and unstages (both succeed, and forget the path) and stages afresh, which
//! starts a new engine. What is mounted is still read from the kernel first: the record only
//! speaks for a path where nothing is mounted any more.
//!
//! A container normally holds its own copy of the pod's mount (private propagation), so
//! unmounting the target on the host leaves it on the dead filesystem, failing I/O. A
//! container that receives the host's mount events (HostToContainer or Bidirectional
//! propagation on that volume) would instead see the emptied target directory: not
//! guarded against here.

use std::collections::{BTreeSet, HashSet};
use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::MntFlags;
use tracing::{error, info, warn};

use crate::node::blockdev;
use crate::node::mount::{self, MountInfo};

/// Under the state directory: one FUSE mount point per staged volume.
pub const FUSE_DIR: &str = "fuse";
/// The file nbdfuse exposes inside its mount point.
pub const FUSE_FILE: &str = "nbd";
/// Under the state directory: the engines' NBD sockets, `<volume>.sock`.
pub const ENGINES_DIR: &str = "engines";
/// Under the state directory: the paths torn down at start-up, per volume.
pub const TORN_DOWN_DIR: &str = "torn-down";

/// How long an nbdfuse process may take to exit after SIGTERM before it is killed.
const NBDFUSE_EXIT: Duration = Duration::from_secs(3);

/// A volume's FUSE mount (or the directory it leaves) under the fuse directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FuseEntry {
    pub volume: String,
    pub dir: PathBuf,
    /// Whether a FUSE filesystem is mounted there.
    pub mounted: bool,
}

/// The volumes under `fuse_root` with no live engine: FUSE mounts directly below it (from
/// mountinfo) and leftover directories (`dir_names`, the entries of `fuse_root`), each once.
/// Mounts elsewhere, mounts deeper below, and mounts there that are not FUSE are ignored.
pub fn stale_fuse_entries(
    fuse_root: &Path,
    mounts: &[MountInfo],
    dir_names: &[String],
    live: &HashSet<String>,
) -> Vec<FuseEntry> {
    let mounted: BTreeSet<String> = mounts
        .iter()
        .filter(|m| m.fs_type == "fuse" || m.fs_type.starts_with("fuse."))
        .filter(|m| m.mount_point.parent() == Some(fuse_root))
        .filter_map(|m| m.mount_point.file_name()?.to_str().map(str::to_string))
        .collect();
    let names: BTreeSet<String> = mounted
        .iter()
        .cloned()
        .chain(dir_names.iter().cloned())
        .filter(|n| is_component(n))
        .collect();
    names
        .into_iter()
        .filter(|n| !live.contains(n))
        .map(|n| FuseEntry {
            dir: fuse_root.join(&n),
            mounted: mounted.contains(&n),
            volume: n,
        })
        .collect()
}

/// The volumes whose FUSE file under `fuse_root` a loop device is over (`loops`: device,
/// backing file as sysfs names it, maybe with ` (deleted)`), even where the FUSE mount and
/// its directory are gone.
pub fn loop_volumes(fuse_root: &Path, loops: &[(PathBuf, PathBuf)]) -> Vec<String> {
    let mut found: Vec<String> = loops
        .iter()
        .filter_map(|(_, backing)| {
            let text = backing.to_str()?;
            let file = Path::new(text.strip_suffix(" (deleted)").unwrap_or(text));
            if file.file_name()? != FUSE_FILE {
                return None;
            }
            let dir = file.parent()?;
            if dir.parent()? != fuse_root {
                return None;
            }
            dir.file_name()?.to_str().map(str::to_string)
        })
        .filter(|n| is_component(n))
        .collect();
    found.sort();
    found.dedup();
    found
}

/// A single, ordinary path component (what a volume id is here).
fn is_component(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/')
}

/// The loop devices over `file` among `loops` (device, backing file as sysfs names it): the
/// same path, or that path with the kernel's ` (deleted)` suffix. The path is compared as it
/// is, never resolved: resolving a file on a dead FUSE mount fails (ENOTCONN).
pub fn loops_over(file: &Path, loops: &[(PathBuf, PathBuf)]) -> Vec<PathBuf> {
    let deleted = {
        let mut s = file.as_os_str().to_owned();
        s.push(" (deleted)");
        PathBuf::from(s)
    };
    loops
        .iter()
        .filter(|(_, backing)| *backing == file || *backing == deleted)
        .map(|(device, _)| device.clone())
        .collect()
}

/// Whether `argv` (a process's command line) is nbdfuse serving the mount point `dir`.
pub fn is_nbdfuse_for(argv: &[OsString], dir: &Path) -> bool {
    let Some(program) = argv.first() else {
        return false;
    };
    Path::new(program).file_name() == Some("nbdfuse".as_ref())
        && argv[1..].iter().any(|a| Path::new(a) == dir)
}

/// The paths of a volume torn down at start-up, kept until the kubelet unpublishes or
/// unstages them.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TornDown {
    pub volume: String,
    /// Why, for NodeGetVolumeStats.
    pub reason: String,
    pub paths: Vec<PathBuf>,
}

impl TornDown {
    /// Adds paths not there yet; true when something was added.
    pub fn add(&mut self, paths: &[PathBuf]) -> bool {
        let before = self.paths.len();
        for p in paths {
            if !self.paths.contains(p) {
                self.paths.push(p.clone());
            }
        }
        self.paths.len() != before
    }

    /// Removes a path; true when it was there.
    pub fn forget(&mut self, path: &Path) -> bool {
        let before = self.paths.len();
        self.paths.retain(|p| p != path);
        self.paths.len() != before
    }
}

/// The message NodeGetVolumeStats gives for a path torn down at start-up.
pub fn torn_down_message(volume: &str) -> String {
    format!(
        "the engine of volume {volume:?} is gone: the node plugin restarted, and this mount, \
         which its dead engine served, was torn down; the volume must be unstaged and staged \
         again (restart the pod)"
    )
}

/// `path` as mountinfo names it (symlinks resolved); for a path that is gone (or cannot be
/// resolved), its resolved parent joined with its name, else the path as it is.
pub fn canonical(path: &Path) -> PathBuf {
    if let Ok(p) = std::fs::canonicalize(path) {
        return p;
    }
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent)
            .map(|p| p.join(name))
            .unwrap_or_else(|_| path.to_owned()),
        _ => path.to_owned(),
    }
}

/// The start-up teardown under one node's state directory.
pub struct Reconciler {
    /// The state directory, as the kernel names it (symlinks resolved).
    state_dir: PathBuf,
}

impl Reconciler {
    pub fn new(state_dir: &Path) -> Reconciler {
        Reconciler {
            state_dir: std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_owned()),
        }
    }

    fn fuse_root(&self) -> PathBuf {
        self.state_dir.join(FUSE_DIR)
    }

    fn record_path(&self, volume: &str) -> PathBuf {
        self.state_dir
            .join(TORN_DOWN_DIR)
            .join(format!("{volume}.json"))
    }

    /// Tears down every layer of every volume under the fuse directory that is not in
    /// `live` (at start-up: every one). Each step is logged; a step that fails is logged and
    /// the rest go on (what is left is retried at the next start-up, and NodeUnstage tears
    /// down a volume's layers too). Only call it while no volume is being staged.
    pub fn tear_down_stale(&self, live: &HashSet<String>) {
        let fuse_root = self.fuse_root();
        let mounts = match mount::read_mountinfo() {
            Ok(m) => m,
            Err(e) => {
                error!(error = %e, "start-up teardown: cannot read the mounts; nothing torn down");
                return;
            }
        };
        let mut names: Vec<String> = match std::fs::read_dir(&fuse_root) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                warn!(dir = %fuse_root.display(), error = %e, "start-up teardown: cannot list the FUSE directory; only its mounts are torn down");
                Vec::new()
            }
        };
        match blockdev::list_loops() {
            Ok(loops) => names.extend(loop_volumes(&fuse_root, &loops)),
            Err(e) => {
                warn!(error = %e, "start-up teardown: cannot list the loop devices; only FUSE mounts and directories are looked at")
            }
        }
        for entry in stale_fuse_entries(&fuse_root, &mounts, &names, live) {
            warn!(volume = %entry.volume, dir = %entry.dir.display(), mounted = entry.mounted,
                "start-up teardown: this volume's engine is gone (the node process restarted); tearing down its dead data path");
            self.tear_down_volume(&entry.volume, true);
        }
        self.remove_stale_sockets(live);
    }

    /// Tears down one volume whose engine is gone: with `loops`, first the mounts of the
    /// loop devices over its FUSE file and the loop devices (remembering the paths for
    /// NodeGetVolumeStats); then the FUSE mount, nbdfuse, the engine socket and the FUSE
    /// directory. Without `loops` (NodeUnstage, which has detached the loop device already)
    /// only the latter.
    pub fn tear_down_volume(&self, volume: &str, loops: bool) {
        let dir = self.fuse_root().join(volume);
        if loops {
            self.tear_down_loops(volume, &dir.join(FUSE_FILE));
        }
        unmount_dead(volume, &dir, "FUSE mount");
        stop_nbdfuse(volume, &dir);
        match std::fs::remove_dir(&dir) {
            Ok(()) => info!(volume, dir = %dir.display(), "removed the FUSE directory"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(volume, dir = %dir.display(), error = %e, "cannot remove the FUSE directory")
            }
        }
        remove_socket(
            volume,
            &self
                .state_dir
                .join(ENGINES_DIR)
                .join(format!("{volume}.sock")),
        );
    }

    fn tear_down_loops(&self, volume: &str, file: &Path) {
        let loops = match blockdev::list_loops() {
            Ok(l) => l,
            Err(e) => {
                error!(volume, error = %e, "cannot list the loop devices; the loop devices over the volume's FUSE file are left");
                return;
            }
        };
        for device in loops_over(file, &loops) {
            let users = match mount::find_mounts_of_source(&device) {
                Ok(found) => found,
                Err(e) => {
                    error!(volume, device = %device.display(), error = %e, "cannot find the mounts of the loop device; it is left");
                    continue;
                }
            };
            // Top of a stack first, then in reverse mount order: bind mounts before the
            // mount they were made from.
            let mut points: Vec<(u32, PathBuf)> =
                users.into_iter().map(|m| (m.id, m.mount_point)).collect();
            points.sort_by_key(|p| std::cmp::Reverse(p.0));
            let paths: Vec<PathBuf> = points.iter().map(|(_, p)| p.clone()).collect();
            if !paths.is_empty() {
                // Remembered before they are unmounted (crash-safe: a path recorded twice
                // or not unmounted yet is harmless).
                if let Err(e) = self.record_torn_down(volume, &paths) {
                    error!(volume, error = %e, "cannot record the torn-down paths; NodeGetVolumeStats will not report them abnormal");
                }
            }
            for path in &paths {
                unmount_dead(volume, path, "mount of the dead volume");
            }
            match blockdev::detach_loop(&device) {
                Ok(()) => {
                    info!(volume, device = %device.display(), "detached the loop device over the dead FUSE file")
                }
                Err(e) => warn!(volume, device = %device.display(), error = %e,
                    "the loop device over the dead FUSE file is not detached yet (a process, e.g. a pod's container, still holds what was mounted on it; the kernel detaches it when that ends)"),
            }
        }
    }

    /// Removes `<volume>.sock` files in the engines directory of volumes not in `live`.
    fn remove_stale_sockets(&self, live: &HashSet<String>) {
        let dir = self.state_dir.join(ENGINES_DIR);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in entries.filter_map(Result::ok) {
            let name = e.file_name();
            let Some(volume) = name.to_str().and_then(|n| n.strip_suffix(".sock")) else {
                continue;
            };
            if !live.contains(volume) {
                remove_socket(volume, &e.path());
            }
        }
    }

    /// Adds `paths` to the volume's torn-down record (written atomically).
    fn record_torn_down(&self, volume: &str, paths: &[PathBuf]) -> Result<(), String> {
        let mut record = self.torn_down(volume)?.unwrap_or_else(|| TornDown {
            volume: volume.to_string(),
            reason: torn_down_message(volume),
            paths: Vec::new(),
        });
        if record.add(paths) {
            self.write_record(&record)?;
        }
        Ok(())
    }

    /// The volume's torn-down record, if any.
    pub fn torn_down(&self, volume: &str) -> Result<Option<TornDown>, String> {
        let path = self.record_path(volume);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| format!("reading {}: {e}", path.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("reading {}: {e}", path.display())),
        }
    }

    /// Why `path` (torn down at start-up, nothing mounted there since) does not serve the
    /// volume; None when it was not torn down.
    pub fn torn_down_reason(&self, volume: &str, path: &Path) -> Option<String> {
        let path = canonical(path);
        match self.torn_down(volume) {
            Ok(Some(r)) if r.paths.contains(&path) => Some(r.reason),
            Ok(_) => None,
            Err(e) => {
                warn!(volume, error = %e, "cannot read the torn-down record");
                None
            }
        }
    }

    /// Forgets a torn-down path (the kubelet unpublished, unstaged or staged it again); the
    /// record goes when it is empty.
    pub fn forget(&self, volume: &str, path: &Path) -> Result<(), String> {
        let Some(mut record) = self.torn_down(volume)? else {
            return Ok(());
        };
        if !record.forget(&canonical(path)) {
            return Ok(());
        }
        if record.paths.is_empty() {
            let file = self.record_path(volume);
            match std::fs::remove_file(&file) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(format!("removing {}: {e}", file.display())),
            }
        } else {
            self.write_record(&record)
        }
    }

    /// Writes the record: temporary file, fsync, rename, so a crash leaves the old or the
    /// new one.
    fn write_record(&self, record: &TornDown) -> Result<(), String> {
        use std::io::Write;
        let path = self.record_path(&record.volume);
        let dir = self.state_dir.join(TORN_DOWN_DIR);
        let fail = |what: &str, p: &Path, e: &dyn std::fmt::Display| {
            format!("{what} {}: {e}", p.display())
        };
        std::fs::create_dir_all(&dir).map_err(|e| fail("creating", &dir, &e))?;
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| fail("encoding", &path, &e))?;
        let mut f = std::fs::File::create(&tmp).map_err(|e| fail("creating", &tmp, &e))?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(|e| fail("writing", &tmp, &e))?;
        std::fs::rename(&tmp, &path).map_err(|e| fail("renaming to", &path, &e))?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// Unmounts whatever is mounted at `path`; where a normal unmount fails (the device below
/// is dead, or a process still uses the mount) it is detached lazily (`MNT_DETACH`): the
/// data it would have flushed can no longer reach the volume anyway.
fn unmount_dead(volume: &str, path: &Path, what: &str) {
    match mount::is_mount_point(path) {
        Ok(false) => return,
        Ok(true) => {}
        Err(e) => {
            warn!(volume, path = %path.display(), error = %e, "cannot tell whether this is mounted; unmounting anyway")
        }
    }
    match mount::unmount(path) {
        Ok(()) => {
            info!(volume, path = %path.display(), "unmounted the {what}");
            return;
        }
        Err(mount::MountError::Busy { .. }) => {
            warn!(volume, path = %path.display(), "the {what} is busy (a process has files open on it); detaching it lazily")
        }
        Err(e) => {
            warn!(volume, path = %path.display(), error = %e, "unmounting the {what} failed; detaching it lazily")
        }
    }
    // Stacked mounts: one lazy unmount each, up to a bound.
    for _ in 0..32 {
        match nix::mount::umount2(path, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
            Ok(()) => info!(volume, path = %path.display(), "detached the {what} lazily"),
            Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => return,
            Err(errno) => {
                error!(volume, path = %path.display(), %errno, "cannot detach the {what}; it is left");
                return;
            }
        }
    }
}

/// Removes an engine socket left by a dead process (only a socket).
fn remove_socket(volume: &str, path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match std::fs::remove_file(path) {
            Ok(()) => info!(volume, socket = %path.display(), "removed the stale engine socket"),
            Err(e) => {
                warn!(volume, socket = %path.display(), error = %e, "cannot remove the stale engine socket")
            }
        },
        Ok(_) => {
            warn!(volume, path = %path.display(), "not a socket where an engine socket belongs; left alone")
        }
        Err(_) => {}
    }
}

/// Ends the nbdfuse processes serving the mount point `dir` (orphans of a dead node
/// process): SIGTERM, then SIGKILL after a moment.
fn stop_nbdfuse(volume: &str, dir: &Path) {
    use nix::sys::signal::{kill, Signal};
    let pids = nbdfuse_pids(dir);
    if pids.is_empty() {
        return;
    }
    for pid in &pids {
        warn!(volume, pid, dir = %dir.display(), "ending an orphaned nbdfuse");
        let _ = kill(nix::unistd::Pid::from_raw(*pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + NBDFUSE_EXIT;
    loop {
        let left = nbdfuse_pids(dir);
        if left.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            for pid in left {
                warn!(volume, pid, "nbdfuse did not exit on SIGTERM; killing it");
                let _ = kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The live processes that are nbdfuse serving `dir` (zombies have no command line).
fn nbdfuse_pids(dir: &Path) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let argv: Vec<OsString> = cmdline
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| OsString::from_vec(a.to_vec()))
                .collect();
            is_nbdfuse_for(&argv, dir).then_some(pid)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(id: u32, point: &str, fs_type: &str) -> MountInfo {
        MountInfo {
            id,
            parent: 1,
            major_minor: (0, 50),
            root: PathBuf::from("/"),
            mount_point: PathBuf::from(point),
            options: vec!["rw".into()],
            optional_fields: vec![],
            fs_type: fs_type.into(),
            source: "nbdfuse".into(),
            super_options: vec![],
        }
    }

    #[test]
    fn stale_fuse_entries_are_only_this_state_dirs_and_not_live() {
        let root = Path::new("/var/lib/palisade-a/fuse");
        let mounts = vec![
            mount(10, "/var/lib/palisade-a/fuse/v1", "fuse"),
            mount(11, "/var/lib/palisade-a/fuse/v2", "fuse.nbdfuse"),
            // Another node process's state directory.
            mount(12, "/var/lib/palisade-b/fuse/v3", "fuse"),
            // Not directly below the fuse directory.
            mount(13, "/var/lib/palisade-a/fuse/v1/deeper", "fuse"),
            mount(14, "/var/lib/palisade-a/fuse", "fuse"),
            // Not FUSE.
            mount(15, "/var/lib/palisade-a/fuse/v4", "ext4"),
            // A prefix of the fuse directory's name, not below it.
            mount(16, "/var/lib/palisade-a/fuse2/v5", "fuse"),
            mount(17, "/var/lib/palisade-a/fuse/live", "fuse"),
        ];
        let dirs = vec!["v1".to_string(), "v6".to_string(), "live".to_string()];
        let live: HashSet<String> = ["live".to_string()].into();
        let found = stale_fuse_entries(root, &mounts, &dirs, &live);
        let entry = |v: &str, mounted| FuseEntry {
            volume: v.into(),
            dir: root.join(v),
            mounted,
        };
        assert_eq!(
            found,
            vec![entry("v1", true), entry("v2", true), entry("v6", false)]
        );
        // Every live volume is kept whatever is mounted.
        let all_live: HashSet<String> = ["v1", "v2", "v6", "live"].map(String::from).into();
        assert_eq!(stale_fuse_entries(root, &mounts, &dirs, &all_live), vec![]);
    }

    #[test]
    fn loops_over_match_the_file_exactly_or_deleted() {
        let file = Path::new("/s/fuse/v1/nbd");
        let loops = vec![
            (PathBuf::from("/dev/loop0"), PathBuf::from("/s/fuse/v1/nbd")),
            (
                PathBuf::from("/dev/loop1"),
                PathBuf::from("/s/fuse/v1/nbd (deleted)"),
            ),
            (
                PathBuf::from("/dev/loop2"),
                PathBuf::from("/s/fuse/v10/nbd"),
            ),
            (PathBuf::from("/dev/loop3"), PathBuf::from("/t/fuse/v1/nbd")),
            (
                PathBuf::from("/dev/loop4"),
                PathBuf::from("/s/fuse/v1/nbd2"),
            ),
        ];
        assert_eq!(
            loops_over(file, &loops),
            vec![PathBuf::from("/dev/loop0"), PathBuf::from("/dev/loop1")]
        );
        assert_eq!(
            loops_over(Path::new("/s/fuse/v2/nbd"), &loops),
            Vec::<PathBuf>::new()
        );
    }

    #[test]
    fn loop_volumes_are_those_over_this_fuse_directorys_files() {
        let root = Path::new("/s/fuse");
        let l = |dev: &str, backing: &str| (PathBuf::from(dev), PathBuf::from(backing));
        let loops = vec![
            l("/dev/loop0", "/s/fuse/v1/nbd"),
            l("/dev/loop1", "/s/fuse/v2/nbd (deleted)"),
            l("/dev/loop2", "/s/fuse/v1/nbd"),
            l("/dev/loop3", "/t/fuse/v3/nbd"),
            l("/dev/loop4", "/s/fuse/v4/other"),
            l("/dev/loop5", "/s/fuse/v5/deeper/nbd"),
            l("/dev/loop6", "/s/disk/replicas/v6-r-1/data"),
            l("/dev/loop7", "/s/fuse/nbd"),
        ];
        assert_eq!(loop_volumes(root, &loops), vec!["v1", "v2"]);
    }

    #[test]
    fn nbdfuse_processes_are_matched_by_their_mount_point() {
        let argv = |args: &[&str]| args.iter().map(OsString::from).collect::<Vec<_>>();
        let dir = Path::new("/s/fuse/v1");
        assert!(is_nbdfuse_for(
            &argv(&["nbdfuse", "/s/fuse/v1", "--unix", "/s/engines/v1.sock"]),
            dir
        ));
        assert!(is_nbdfuse_for(
            &argv(&["/usr/bin/nbdfuse", "/s/fuse/v1/", "--unix", "x"]),
            dir
        ));
        assert!(!is_nbdfuse_for(&argv(&["nbdfuse", "/s/fuse/v10"]), dir));
        assert!(!is_nbdfuse_for(&argv(&["nbdfuse", "/t/fuse/v1"]), dir));
        assert!(!is_nbdfuse_for(&argv(&["nbdkit", "/s/fuse/v1"]), dir));
        assert!(!is_nbdfuse_for(&argv(&["nbdfuse"]), dir));
        assert!(!is_nbdfuse_for(&[], dir));
    }

    #[test]
    fn torn_down_records_add_forget_and_survive_a_rewrite() {
        let dir = tempfile::tempdir().unwrap();
        let r = Reconciler::new(dir.path());
        assert_eq!(r.torn_down("v1").unwrap(), None);
        let target = dir.path().join("target");
        let staging = dir.path().join("staging");
        std::fs::create_dir(&target).unwrap();
        std::fs::create_dir(&staging).unwrap();
        let (target, staging) = (
            std::fs::canonicalize(target).unwrap(),
            std::fs::canonicalize(staging).unwrap(),
        );
        r.record_torn_down("v1", &[target.clone(), staging.clone()])
            .unwrap();
        r.record_torn_down("v1", std::slice::from_ref(&target))
            .unwrap();
        let record = r.torn_down("v1").unwrap().unwrap();
        assert_eq!(record.paths, vec![target.clone(), staging.clone()]);
        let reason = r.torn_down_reason("v1", &target).unwrap();
        assert!(reason.contains("staged again"), "{reason}");
        assert_eq!(r.torn_down_reason("v2", &target), None);
        assert_eq!(r.torn_down_reason("v1", Path::new("/elsewhere")), None);

        r.forget("v1", &target).unwrap();
        r.forget("v1", &target).unwrap();
        assert_eq!(r.torn_down_reason("v1", &target), None);
        assert!(r.torn_down_reason("v1", &staging).is_some());
        r.forget("v1", &staging).unwrap();
        assert!(!dir.path().join(TORN_DOWN_DIR).join("v1.json").exists());
        r.forget("v9", &staging).unwrap();
    }

    #[test]
    fn leftovers_of_stale_volumes_go_and_live_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path();
        for v in ["v1", "live"] {
            std::fs::create_dir_all(state.join(FUSE_DIR).join(v)).unwrap();
        }
        std::fs::create_dir_all(state.join(ENGINES_DIR)).unwrap();
        let _sockets: Vec<std::os::unix::net::UnixListener> = ["v1", "v2", "live"]
            .iter()
            .map(|v| {
                std::os::unix::net::UnixListener::bind(
                    state.join(ENGINES_DIR).join(format!("{v}.sock")),
                )
                .unwrap()
            })
            .collect();
        // Not a socket: never removed.
        std::fs::write(state.join(ENGINES_DIR).join("v3.sock"), b"").unwrap();
        let live: HashSet<String> = ["live".to_string()].into();
        Reconciler::new(state).tear_down_stale(&live);
        assert!(!state.join(FUSE_DIR).join("v1").exists());
        assert!(state.join(FUSE_DIR).join("live").exists());
        let mut left: Vec<String> = std::fs::read_dir(state.join(ENGINES_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, vec!["live.sock", "v3.sock"]);
    }

    #[test]
    fn an_orphaned_nbdfuse_is_ended() {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let fuse_dir = dir.path().join(FUSE_DIR).join("v1");
        std::fs::create_dir_all(&fuse_dir).unwrap();
        // A process whose command line is that of nbdfuse serving `fuse_dir` (cat blocks
        // reading its standard input), and one serving another directory.
        let stand_in = |d: &Path| {
            std::process::Command::new("cat")
                .arg0("nbdfuse")
                .arg("-")
                .arg(d)
                .stdin(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        };
        let mut ours = stand_in(&fuse_dir);
        let other_dir = dir.path().join("other");
        let mut other = stand_in(&other_dir);
        let deadline = Instant::now() + Duration::from_secs(5);
        while nbdfuse_pids(&fuse_dir).is_empty() {
            assert!(Instant::now() < deadline, "the stand-in never showed up");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(nbdfuse_pids(&fuse_dir), vec![ours.id() as i32]);
        stop_nbdfuse("v1", &fuse_dir);
        let status = ours.wait().unwrap();
        assert!(!status.success(), "ended by a signal: {status:?}");
        assert_eq!(
            other.try_wait().unwrap(),
            None,
            "another mount's nbdfuse was ended"
        );
        other.kill().unwrap();
        other.wait().unwrap();
    }

    #[test]
    fn a_corrupt_record_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let r = Reconciler::new(dir.path());
        std::fs::create_dir(dir.path().join(TORN_DOWN_DIR)).unwrap();
        std::fs::write(dir.path().join(TORN_DOWN_DIR).join("v1.json"), b"{not json").unwrap();
        let e = r.torn_down("v1").unwrap_err();
        assert!(e.contains("v1.json"), "{e}");
        assert_eq!(r.torn_down_reason("v1", dir.path()), None);
    }
}
