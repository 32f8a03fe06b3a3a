//! Helpers for tests here and in other modules that mount things.

use super::*;

/// Unmounts the listed paths (everything stacked on each) when dropped, so a failed
/// assertion leaves no mount behind.
pub(crate) struct MountGuard(pub(crate) Vec<PathBuf>);

impl MountGuard {
    /// Unmounts the listed paths, last first; lazily, since this is clean-up.
    pub(crate) fn unmount_all(&mut self) {
        for path in self.0.iter().rev() {
            while is_mount_point(path).unwrap_or(false) {
                if nix::mount::umount2(path, MntFlags::MNT_DETACH).is_err() {
                    break;
                }
            }
        }
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        self.unmount_all();
    }
}

/// [`unmount`]s `target`, then removes it: an empty directory, or a file (a block volume's
/// target); for tests, which know what is at their paths (the node removes only what it
/// made, node/paths.rs). Ok if it is already gone. A directory that is not empty after unmounting is an
/// error, never removed recursively: its contents would be a volume's data written to the
/// node's own disk.
pub(crate) fn unmount_and_remove(target: &Path) -> Result<(), MountError> {
    unmount(target)?;
    let meta = match fs::symlink_metadata(target) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(MountError::Io {
                action: "inspecting",
                path: target.to_owned(),
                source,
            })
        }
    };
    let (action, result) = if meta.is_dir() {
        ("removing directory", fs::remove_dir(target))
    } else {
        ("removing", fs::remove_file(target))
    };
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(MountError::Io {
            action,
            path: target.to_owned(),
            source,
        }),
    }
}

/// Whether the test runs as root; says that it skips when not.
pub(crate) fn is_root() -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        eprintln!("skipping: this test mounts or attaches devices and needs root");
    }
    root
}
