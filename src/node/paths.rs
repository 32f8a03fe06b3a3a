//! What the node may do at the paths a CO names (staging_target_path, target_path): which
//! paths it takes at all, what it may mount on, and what it may remove afterwards.
//!
//! - A path is taken only as it is written: absolute, without `..`, and through no
//!   symbolic link, so that it cannot lead the driver somewhere else on the host.
//! - The driver mounts only on an empty directory (a filesystem) or an empty regular file (a
//!   raw block device); a missing one it creates, and marks as made for the volume
//!   (extended attribute [`MADE_FOR`], kept with the inode and settable by root alone).
//! - It removes only what it made for that volume, and only once it is empty again: a path
//!   the CO made, or anything else found there, is left as it is.
//!
//! Whether something is mounted at a path, and whose it is, is read from the kernel by the
//! callers (node.rs); this module looks at the path alone.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Component, Path, PathBuf};

/// The extended attribute on a directory or file the driver made: the volume id it was
/// made for. A `trusted.` attribute, which only a process with CAP_SYS_ADMIN can set, so no
/// unprivileged user can have the driver remove a file of theirs.
pub const MADE_FOR: &str = "trusted.palisade.made-for";

/// Why a path is refused or could not be prepared. Each names the request field.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("{field}: {path:?} is not an absolute path")]
    NotAbsolute { field: &'static str, path: String },
    #[error("{field}: {path:?} has a \"..\" component; the driver takes a path only as it is written, never going up from it")]
    GoesUp { field: &'static str, path: PathBuf },
    #[error("{field}: {path:?} goes through the symbolic link {link:?} (to {to:?}); the driver follows no links in the paths it is given")]
    Symlink {
        field: &'static str,
        path: PathBuf,
        link: PathBuf,
        to: PathBuf,
    },
    #[error("{field}: {path:?} {why}; the driver mounts only on {wanted} (or creates it when it is missing), so nothing there is hidden or replaced")]
    NotUsable {
        field: &'static str,
        path: PathBuf,
        why: String,
        wanted: &'static str,
    },
    #[error("{field}: {op} {path:?}: {source}")]
    Io {
        field: &'static str,
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The form of a path field: absolute, no NUL byte, no `..` component. Pure: the file
/// system is not looked at (see [`check_no_symlinks`]).
pub fn check_form<'a>(field: &'static str, value: &'a str) -> Result<&'a Path, PathError> {
    if !value.starts_with('/') || value.contains('\0') {
        return Err(PathError::NotAbsolute {
            field,
            path: value.to_string(),
        });
    }
    let path = Path::new(value);
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(PathError::GoesUp {
            field,
            path: path.to_path_buf(),
        });
    }
    Ok(path)
}

/// Refuses a path any existing component of which is a symbolic link (the kernel would
/// follow it: a mount or a removal would happen where it points). Components from the first
/// missing one on are the driver's or the CO's to create. A component that cannot be looked
/// at (a dead FUSE or network mount answers ENOTCONN or ESTALE) is a mount point, never a
/// link, and nothing below it can be looked at either.
pub fn check_no_symlinks(field: &'static str, path: &Path) -> Result<(), PathError> {
    let mut prefix = PathBuf::new();
    for component in path.components() {
        match component {
            Component::ParentDir => {
                return Err(PathError::GoesUp {
                    field,
                    path: path.to_path_buf(),
                })
            }
            Component::CurDir => continue,
            Component::RootDir | Component::Prefix(_) | Component::Normal(_) => {
                prefix.push(component)
            }
        }
        match std::fs::symlink_metadata(&prefix) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(PathError::Symlink {
                    field,
                    path: path.to_path_buf(),
                    to: std::fs::read_link(&prefix).unwrap_or_default(),
                    link: prefix,
                })
            }
            Ok(_) => {}
            Err(_) => return Ok(()),
        }
    }
    Ok(())
}

/// What is at a path (not following a link there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    Missing,
    EmptyDir,
    Dir,
    EmptyFile,
    File,
    /// A symbolic link, device node, socket or fifo.
    Other(&'static str),
}

/// Looks at `path` without following a link there.
pub fn inspect(path: &Path) -> io::Result<Found> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Found::Missing),
        Err(e) => return Err(e),
    };
    let kind = meta.file_type();
    Ok(if kind.is_dir() {
        if std::fs::read_dir(path)?.next().is_none() {
            Found::EmptyDir
        } else {
            Found::Dir
        }
    } else if kind.is_file() {
        if meta.len() == 0 {
            Found::EmptyFile
        } else {
            Found::File
        }
    } else if kind.is_symlink() {
        Found::Other("symbolic link")
    } else if kind.is_block_device() {
        Found::Other("block device")
    } else if kind.is_char_device() {
        Found::Other("character device")
    } else if kind.is_socket() {
        Found::Other("socket")
    } else {
        Found::Other("fifo")
    })
}

/// What the driver mounts on a path: a directory (a filesystem, or a staged one
/// bind-mounted) or a regular file (a raw block device bind-mounted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountOn {
    Dir,
    File,
}

impl MountOn {
    fn wanted(self) -> &'static str {
        match self {
            MountOn::Dir => "an empty directory",
            MountOn::File => "an empty regular file",
        }
    }
}

/// Whether the driver may mount on what it found at a path where nothing is mounted: only
/// on an empty node of the kind it mounts on; `Ok(true)` when the path is missing and is to
/// be created. Otherwise why not.
pub fn may_mount_on(found: Found, on: MountOn) -> Result<bool, String> {
    match (found, on) {
        (Found::Missing, _) => Ok(true),
        (Found::EmptyDir, MountOn::Dir) | (Found::EmptyFile, MountOn::File) => Ok(false),
        (Found::Dir, _) => Err("is a directory that is not empty".to_string()),
        (Found::File, _) => Err("is a regular file that is not empty".to_string()),
        (Found::EmptyDir, MountOn::File) => {
            Err("is a directory, and a block volume is published on a file".to_string())
        }
        (Found::EmptyFile, MountOn::Dir) => {
            Err("is a file, and a filesystem is mounted on a directory".to_string())
        }
        (Found::Other(kind), _) => Err(format!("is a {kind}")),
    }
}

/// Makes `path` ready to be mounted on for `volume`, where nothing is mounted: an empty
/// node of the right kind is used as it is; a missing one is created (with its missing
/// parents, for a directory; a file's parent must exist) and marked as made for the
/// volume; anything else is refused.
pub fn prepare_mount_point(
    field: &'static str,
    path: &Path,
    on: MountOn,
    volume: &str,
) -> Result<(), PathError> {
    let io_error = |op: &'static str| {
        move |source| PathError::Io {
            field,
            op,
            path: path.to_path_buf(),
            source,
        }
    };
    let found = inspect(path).map_err(io_error("inspect"))?;
    let create = may_mount_on(found, on).map_err(|why| PathError::NotUsable {
        field,
        path: path.to_path_buf(),
        why,
        wanted: on.wanted(),
    })?;
    if !create {
        return Ok(());
    }
    match on {
        MountOn::Dir => std::fs::create_dir_all(path).map_err(io_error("create directory"))?,
        MountOn::File => {
            // A file that appeared meanwhile is not ours: create_new refuses it.
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map(drop)
                .map_err(io_error("create file"))?
        }
    }
    mark_made_for(path, volume);
    Ok(())
}

/// Marks `path` as made by the driver for `volume`. Where the filesystem keeps no extended
/// attributes the mark is missing, and the path is left in place when the volume is
/// unpublished or unstaged (logged now).
fn mark_made_for(path: &Path, volume: &str) {
    if let Err(e) = rustix::fs::lsetxattr(
        path,
        MADE_FOR,
        volume.as_bytes(),
        rustix::fs::XattrFlags::empty(),
    ) {
        tracing::warn!(path = %path.display(), volume, error = %e,
            "cannot mark the path as made by the driver; it will be left in place when the volume is unpublished or unstaged");
    }
}

/// The volume the driver made `path` for, if it made it.
pub fn made_for(path: &Path) -> Option<String> {
    let mut buf = [0u8; 256];
    let len = rustix::fs::lgetxattr(path, MADE_FOR, &mut buf[..]).ok()?;
    String::from_utf8(buf.get(..len)?.to_vec()).ok()
}

/// What [`remove_made_for`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Nothing is there (any more).
    Gone,
    /// The driver made it for the volume, and it was empty: removed.
    Removed,
    /// The driver did not make it for this volume: left as it is.
    NotMade,
    /// The driver made it for the volume, but it is not empty (files were written into it
    /// while nothing was mounted there): left as it is.
    NotEmpty,
}

/// Removes `path`, where nothing is mounted, if the driver made it for `volume` and it is
/// empty: never anything else, and never recursively.
pub fn remove_made_for(
    field: &'static str,
    path: &Path,
    volume: &str,
) -> Result<Removal, PathError> {
    let io_error = |op: &'static str| {
        move |source| PathError::Io {
            field,
            op,
            path: path.to_path_buf(),
            source,
        }
    };
    let found = inspect(path).map_err(io_error("inspect"))?;
    if found == Found::Missing {
        return Ok(Removal::Gone);
    }
    if made_for(path).as_deref() != Some(volume) {
        return Ok(Removal::NotMade);
    }
    let removed = match found {
        Found::EmptyDir => std::fs::remove_dir(path),
        Found::EmptyFile => std::fs::remove_file(path),
        _ => return Ok(Removal::NotEmpty),
    };
    match removed {
        Ok(()) => Ok(Removal::Removed),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Removal::Gone),
        // Something was written into the directory since it was looked at.
        Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => Ok(Removal::NotEmpty),
        Err(e) => Err(io_error("remove")(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_form_of_a_path_field() {
        for ok in [
            "/",
            "/var/lib/kubelet/pods/p/volumes/v/mount",
            "/a/./b",
            "/a//b",
            "/a/b/",
        ] {
            assert!(check_form("target_path", ok).is_ok(), "{ok:?}");
        }
        for relative in ["", "a/b", "./a", "../a", "relative/../x"] {
            let e = check_form("target_path", relative).unwrap_err();
            assert!(
                matches!(e, PathError::NotAbsolute { .. }),
                "{relative:?}: {e:?}"
            );
        }
        assert!(matches!(
            check_form("target_path", "/a\0b"),
            Err(PathError::NotAbsolute { .. })
        ));
        for up in ["/tmp/../etc", "/..", "/a/b/..", "/a/../../b", "/a/..//b"] {
            let e = check_form("staging_target_path", up).unwrap_err();
            assert!(matches!(e, PathError::GoesUp { .. }), "{up:?}: {e:?}");
            assert!(e.to_string().starts_with("staging_target_path: "), "{e}");
        }
        // A name that merely contains dots is a name.
        assert!(check_form("target_path", "/a/..b/c.. /...").is_ok());
    }

    #[test]
    fn what_may_be_mounted_on() {
        use Found::{EmptyDir, EmptyFile, Missing, Other};
        let (dir, file) = (MountOn::Dir, MountOn::File);
        assert_eq!(may_mount_on(Missing, dir), Ok(true));
        assert_eq!(may_mount_on(Missing, file), Ok(true));
        assert_eq!(may_mount_on(EmptyDir, dir), Ok(false));
        assert_eq!(may_mount_on(EmptyFile, file), Ok(false));
        for (found, on) in [
            (Found::Dir, dir),
            (Found::Dir, file),
            (Found::File, file),
            (Found::File, dir),
            (EmptyDir, file),
            (EmptyFile, dir),
            (Other("symbolic link"), dir),
            (Other("block device"), file),
            (Other("character device"), file),
            (Other("socket"), dir),
            (Other("fifo"), file),
        ] {
            assert!(may_mount_on(found, on).is_err(), "{found:?} {on:?}");
        }
        assert_eq!(
            may_mount_on(Other("block device"), file),
            Err("is a block device".to_string())
        );
    }

    #[test]
    fn symlinks_anywhere_in_the_path_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir_all(real.join("sub")).unwrap();
        std::fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, real.join("link")).unwrap();
        std::os::unix::fs::symlink(elsewhere.join("file"), real.join("dangling")).unwrap();

        check_no_symlinks("target_path", &real.join("sub")).unwrap();
        check_no_symlinks("target_path", &real.join("sub/missing/deeper")).unwrap();
        for through in [
            real.join("link"),
            real.join("link/x"),
            real.join("dangling"),
            real.join("./link/x"),
        ] {
            match check_no_symlinks("target_path", &through) {
                Err(PathError::Symlink { link, to, .. }) => {
                    assert!(
                        link.ends_with("link") || link.ends_with("dangling"),
                        "{link:?}"
                    );
                    assert!(to.starts_with(&elsewhere), "{to:?}");
                }
                other => panic!("{through:?}: {other:?}"),
            }
        }
        assert!(matches!(
            check_no_symlinks("target_path", &real.join("sub/../link")),
            Err(PathError::GoesUp { .. })
        ));
    }

    #[test]
    fn inspect_tells_empty_from_not_empty() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        std::fs::create_dir(p("empty-dir")).unwrap();
        std::fs::create_dir(p("dir")).unwrap();
        std::fs::write(p("dir/f"), b"").unwrap();
        std::fs::write(p("empty-file"), b"").unwrap();
        std::fs::write(p("file"), b"x").unwrap();
        std::os::unix::fs::symlink(p("dir"), p("link")).unwrap();
        assert_eq!(inspect(&p("missing")).unwrap(), Found::Missing);
        assert_eq!(inspect(&p("empty-dir")).unwrap(), Found::EmptyDir);
        assert_eq!(inspect(&p("dir")).unwrap(), Found::Dir);
        assert_eq!(inspect(&p("empty-file")).unwrap(), Found::EmptyFile);
        assert_eq!(inspect(&p("file")).unwrap(), Found::File);
        assert_eq!(inspect(&p("link")).unwrap(), Found::Other("symbolic link"));
        assert_eq!(
            inspect(Path::new("/dev/null")).unwrap(),
            Found::Other("character device")
        );
    }

    /// Needs root (a `trusted.` attribute) and a filesystem with extended attributes.
    #[test]
    fn only_what_was_made_for_the_volume_is_removed() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: trusted extended attributes need root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);

        prepare_mount_point("target_path", &p("made/dir"), MountOn::Dir, "v1").unwrap();
        prepare_mount_point("target_path", &p("made-file"), MountOn::File, "v1").unwrap();
        assert_eq!(made_for(&p("made/dir")).as_deref(), Some("v1"));
        assert_eq!(made_for(&p("made")), None, "only the path itself is marked");
        // Another volume's unpublish leaves them; this volume's removes them.
        for path in [p("made/dir"), p("made-file")] {
            assert_eq!(
                remove_made_for("target_path", &path, "v2").unwrap(),
                Removal::NotMade
            );
            assert_eq!(
                remove_made_for("target_path", &path, "v1").unwrap(),
                Removal::Removed
            );
            assert_eq!(
                remove_made_for("target_path", &path, "v1").unwrap(),
                Removal::Gone
            );
        }
        // Made for the volume, but written into: kept.
        prepare_mount_point("target_path", &p("written"), MountOn::Dir, "v1").unwrap();
        std::fs::write(p("written/f"), b"x").unwrap();
        assert_eq!(
            remove_made_for("target_path", &p("written"), "v1").unwrap(),
            Removal::NotEmpty
        );
        assert!(p("written/f").exists());

        // What the driver did not make is used, never marked, and never removed.
        std::fs::create_dir(p("co-dir")).unwrap();
        std::fs::write(p("co-file"), b"").unwrap();
        prepare_mount_point("target_path", &p("co-dir"), MountOn::Dir, "v1").unwrap();
        prepare_mount_point("target_path", &p("co-file"), MountOn::File, "v1").unwrap();
        assert_eq!(
            remove_made_for("target_path", &p("co-dir"), "v1").unwrap(),
            Removal::NotMade
        );
        assert_eq!(
            remove_made_for("target_path", &p("co-file"), "v1").unwrap(),
            Removal::NotMade
        );
        assert!(p("co-dir").is_dir() && p("co-file").is_file());

        // Anything with content, or of the wrong kind, is refused and left untouched.
        std::fs::write(p("decoy"), b"keep me").unwrap();
        std::fs::create_dir(p("full")).unwrap();
        std::fs::write(p("full/f"), b"x").unwrap();
        for (path, on) in [
            (p("decoy"), MountOn::File),
            (p("decoy"), MountOn::Dir),
            (p("full"), MountOn::Dir),
            (p("co-dir"), MountOn::File),
        ] {
            let e = prepare_mount_point("target_path", &path, on, "v1").unwrap_err();
            assert!(
                matches!(e, PathError::NotUsable { .. }),
                "{path:?} {on:?}: {e:?}"
            );
            assert!(e.to_string().starts_with("target_path: "), "{e}");
        }
        assert_eq!(std::fs::read(p("decoy")).unwrap(), b"keep me");
        assert!(p("full/f").exists());
    }
}
