//! Mounts on this node, as the kernel sees them: parsing `/proc/self/mountinfo`, mounting a
//! filesystem from a block device (NodeStage), bind-mounting a staged directory or a raw block
//! device into a pod's target path (NodePublish), unmounting (NodeUnpublish, NodeUnstage), and
//! filesystem statistics (NodeGetVolumeStats).
//!
//! Every operation is synchronous (callers in async code wrap it in `spawn_blocking`) and
//! idempotent: it first reads what is mounted from the kernel, never from memory, so a retry
//! after a crash or a timeout converges. Something unexpected at a target path is an error
//! that names what is there; nothing is ever unmounted lazily or removed recursively.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::stat::{major, minor};
use nix::sys::statvfs::{statvfs, FsFlags};

/// Where the kernel lists the mounts of this process's mount namespace.
const MOUNTINFO: &str = "/proc/self/mountinfo";

/// How many times `unmount` unmounts the same path before giving up: more stacked mounts than
/// this at one point means something keeps mounting there.
const MAX_STACKED_MOUNTS: usize = 32;

/// Errors from mount operations. Each names the path and the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// A file could not be read, created, inspected or removed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done, e.g. "reading", "creating directory".
        action: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A line of mountinfo did not have the documented format.
    #[error("mountinfo line {line}: {reason}: {text:?}")]
    Parse {
        /// 1-based line number.
        line: usize,
        /// What was wrong with it.
        reason: String,
        /// The offending line.
        text: String,
    },

    /// mount(2) of a filesystem failed.
    #[error("mounting {source_device} ({fs_type}) on {target}: {errno}{hint}")]
    Mount {
        /// The device or source string.
        source_device: String,
        /// The mount point.
        target: PathBuf,
        /// The filesystem type.
        fs_type: String,
        /// The error mount(2) returned.
        #[source]
        errno: Errno,
        /// A hint at the likely cause, possibly empty.
        hint: &'static str,
    },

    /// A bind mount, or the remount that makes a bind mount read-only, failed.
    #[error("bind-mounting {source_path} on {target}: {step}: {errno}")]
    BindMount {
        /// The bind source.
        source_path: PathBuf,
        /// The bind target.
        target: PathBuf,
        /// "bind" or "remount read-only".
        step: &'static str,
        /// The error mount(2) returned.
        #[source]
        errno: Errno,
    },

    /// umount(2) failed for a reason other than "busy" or "not mounted".
    #[error("unmounting {target}: {errno}")]
    Unmount {
        /// The mount point.
        target: PathBuf,
        /// The error umount2(2) returned.
        #[source]
        errno: Errno,
    },

    /// The mount is in use (open files, a process's working directory, a mount below it).
    /// It is left mounted: nothing is ever detached lazily.
    #[error("{target} is busy (files open, or something mounted below it); not unmounting lazily")]
    Busy {
        /// The mount point.
        target: PathBuf,
    },

    /// Unmounting went on and on: something keeps mounting at this path.
    #[error("{target} still mounted after {MAX_STACKED_MOUNTS} unmounts")]
    TooManyStacked {
        /// The mount point.
        target: PathBuf,
    },

    /// Something other than the requested source is mounted at the target.
    #[error("{target} already has {what} mounted; wanted {wanted}")]
    Occupied {
        /// The mount point.
        target: PathBuf,
        /// What is mounted there: its source and filesystem type, e.g. `/dev/loop3 (ext4)`.
        what: String,
        /// What the caller asked to mount.
        wanted: String,
    },

    /// The requested source is mounted at the target, but not the way it was asked for (a
    /// different filesystem type, or read-write instead of read-only or the other way round).
    #[error("{target} already has {source_device} mounted, but {reason}")]
    Incompatible {
        /// The mount point.
        target: PathBuf,
        /// The source that is mounted there.
        source_device: String,
        /// How it differs from the request.
        reason: String,
    },

    /// A mount option that would change what the operation means (`bind`, `remount`, ...).
    #[error("mount option {option:?} is not allowed here: {reason}")]
    InvalidOption {
        /// The option.
        option: String,
        /// Why it is refused.
        reason: &'static str,
    },

    /// A bind source that is neither a directory, a regular file nor a block device.
    #[error("cannot bind-mount {path}: it is not a directory, a regular file or a block device")]
    UnsupportedSource {
        /// The source path.
        path: PathBuf,
    },

    /// statvfs(2) failed.
    #[error("statvfs {path}: {errno}")]
    Statvfs {
        /// The path.
        path: PathBuf,
        /// The error statvfs(2) returned.
        #[source]
        errno: Errno,
    },
}

/// One line of `/proc/self/mountinfo` (see proc(5)). Escaped characters (`\040` for a space,
/// `\011`, `\012`, `\134`) are decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// Unique id of the mount.
    pub id: u32,
    /// Id of the parent mount (itself for the root of the namespace's tree).
    pub parent: u32,
    /// `(major, minor)` of the filesystem's device (`st_dev` of files on it).
    pub major_minor: (u32, u32),
    /// The directory of the filesystem that forms the root of this mount: `/` for a plain
    /// mount, the bound directory (or file) for a bind mount.
    pub root: PathBuf,
    /// Where it is mounted, relative to the process's root.
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`/`ro`, `nosuid`, `relatime`, ...).
    pub options: Vec<String>,
    /// Optional fields (`shared:N`, `master:N`, `propagate_from:N`, `unbindable`).
    pub optional_fields: Vec<String>,
    /// Filesystem type, e.g. `ext4`, `xfs`, `tmpfs`, `fuse.foo`.
    pub fs_type: String,
    /// Filesystem-specific source, e.g. `/dev/loop3`, or `none`.
    pub source: String,
    /// Per-superblock options.
    pub super_options: Vec<String>,
}

impl MountInfo {
    /// Whether this mount is read-only (the per-mount `ro` option).
    pub fn is_read_only(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
    }
}

/// Parses the text of a mountinfo file. Blank lines are skipped; any malformed line is an
/// error naming its line number.
pub fn parse_mountinfo(text: &str) -> Result<Vec<MountInfo>, MountError> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            parse_line(line).map_err(|reason| MountError::Parse {
                line: i + 1,
                reason,
                text: line.to_owned(),
            })
        })
        .collect()
}

/// Parses one line: `id parent maj:min root mount_point options [optional...] - fstype source
/// super_options`. Fields are separated by single spaces (a field can be empty, e.g. an empty
/// source), since spaces inside fields are escaped.
fn parse_line(line: &str) -> Result<MountInfo, String> {
    let fields: Vec<&str> = line.split(' ').collect();
    let separator = fields
        .iter()
        .skip(6)
        .position(|f| *f == "-")
        .map(|p| p + 6)
        .ok_or_else(|| "no \" - \" separator after the sixth field".to_owned())?;
    let after = &fields[separator + 1..];
    if after.len() < 3 {
        return Err(format!(
            "{} fields after the separator, expected 3",
            after.len()
        ));
    }
    let number = |name: &str, s: &str| {
        s.parse::<u32>()
            .map_err(|_| format!("{name} {s:?} is not a number"))
    };
    let (maj, min) = fields[2]
        .split_once(':')
        .ok_or_else(|| format!("device {:?} is not major:minor", fields[2]))?;
    Ok(MountInfo {
        id: number("mount id", fields[0])?,
        parent: number("parent id", fields[1])?,
        major_minor: (number("major", maj)?, number("minor", min)?),
        root: PathBuf::from(unescape(fields[3])?),
        mount_point: PathBuf::from(unescape(fields[4])?),
        options: split_options(fields[5]),
        optional_fields: fields[6..separator]
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
        fs_type: unescape_lossy(after[0])?,
        source: unescape_lossy(after[1])?,
        // Super options are the last field; anything after a further space is kept in it.
        super_options: split_options(&after[2..].join(" ")),
    })
}

fn split_options(s: &str) -> Vec<String> {
    s.split(',')
        .filter(|o| !o.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Decodes the kernel's octal escapes (`\ooo`) into raw bytes.
fn unescape(s: &str) -> Result<OsString, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            let digits = bytes
                .get(i + 1..i + 4)
                .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)))
                .ok_or_else(|| format!("bad escape in {s:?}"))?;
            let value = digits
                .iter()
                .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
            out.push(u8::try_from(value).map_err(|_| format!("bad escape in {s:?}"))?);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(OsString::from_vec(out))
}

fn unescape_lossy(s: &str) -> Result<String, String> {
    Ok(unescape(s)?.to_string_lossy().into_owned())
}

/// Reads and parses this process's mountinfo. The file is read until two reads agree (at most
/// three times), because kernels before 5.8 could skip or repeat lines while the mount table
/// changed under a read.
pub fn read_mountinfo() -> Result<Vec<MountInfo>, MountError> {
    let read = || {
        fs::read_to_string(MOUNTINFO).map_err(|source| MountError::Io {
            action: "reading",
            path: PathBuf::from(MOUNTINFO),
            source,
        })
    };
    let mut text = read()?;
    for _ in 0..2 {
        let again = read()?;
        if again == text {
            break;
        }
        text = again;
    }
    parse_mountinfo(&text)
}

/// The path as mountinfo would show it: symlinks resolved. `None` if it does not exist (then
/// nothing can be mounted on it). If the path itself cannot be inspected (a dead FUSE or
/// stale network mount answers ENOTCONN or ESTALE), its parent is resolved instead.
fn resolve(path: &Path) -> Result<Option<PathBuf>, MountError> {
    match fs::canonicalize(path) {
        Ok(p) => Ok(Some(p)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => {
            let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
                return Err(MountError::Io {
                    action: "resolving",
                    path: path.to_owned(),
                    source: e,
                });
            };
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            tracing::debug!(path = %path.display(), error = %e, "resolving the parent instead");
            let parent = fs::canonicalize(parent).map_err(|source| MountError::Io {
                action: "resolving",
                path: parent.to_owned(),
                source,
            })?;
            Ok(Some(parent.join(name)))
        }
    }
}

/// The mounts whose mount point is `path` (symlinks resolved), in mountinfo order: when mounts
/// are stacked, the last one is on top and is what the path shows. Empty if nothing is mounted
/// there or the path does not exist.
pub fn mounts_at(path: &Path) -> Result<Vec<MountInfo>, MountError> {
    let Some(path) = resolve(path)? else {
        return Ok(Vec::new());
    };
    Ok(read_mountinfo()?
        .into_iter()
        .filter(|m| m.mount_point == path)
        .collect())
}

/// Whether anything is mounted at `path` (a directory, or a file for a bind-mounted block
/// device). False if the path does not exist.
pub fn is_mount_point(path: &Path) -> Result<bool, MountError> {
    Ok(!mounts_at(path)?.is_empty())
}

/// Every mount that uses `source`:
/// - when `source` is a block device: the filesystems on it (matched by device number, so any
///   name of the device works), and bind mounts of its device node (volumeMode Block targets);
/// - in any case: mounts whose source string is `source` (e.g. `tmpfs`, or a device path
///   that no longer exists).
pub fn find_mounts_of_source(source: &Path) -> Result<Vec<MountInfo>, MountError> {
    let mounts = read_mountinfo()?;
    let source_str = source.to_string_lossy();
    let node = match fs::metadata(source) {
        Ok(meta) if meta.file_type().is_block_device() => Some(meta),
        Ok(_) => None,
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(source_err) => {
            return Err(MountError::Io {
                action: "inspecting",
                path: source.to_owned(),
                source: source_err,
            })
        }
    };
    let mut found = Vec::new();
    for m in mounts {
        let uses = m.source == source_str
            || node.as_ref().is_some_and(|node| {
                m.major_minor == dev_numbers(node.rdev()) || is_bind_of_node(&m, node)
            });
        if uses {
            found.push(m);
        }
    }
    Ok(found)
}

fn dev_numbers(dev: u64) -> (u32, u32) {
    // Linux device numbers are 12-bit major, 20-bit minor: both fit in u32.
    (
        u32::try_from(major(dev)).unwrap_or(u32::MAX),
        u32::try_from(minor(dev)).unwrap_or(u32::MAX),
    )
}

/// Whether `m` is a bind mount of the device node `node`: the mount lives on the filesystem
/// that holds the node (devtmpfs) and its mount point is that very inode. Only mounts on that
/// filesystem are inspected, so no network or FUSE mount is ever touched.
fn is_bind_of_node(m: &MountInfo, node: &fs::Metadata) -> bool {
    m.major_minor == dev_numbers(node.dev())
        && m.root != Path::new("/")
        && fs::metadata(&m.mount_point)
            .is_ok_and(|meta| meta.dev() == node.dev() && meta.ino() == node.ino())
}

/// Mount flags and filesystem data translated from mount option strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// Generic VFS flags for mount(2).
    pub flags: MsFlags,
    /// Filesystem-specific options, comma-separated, for mount(2)'s data argument.
    pub data: String,
}

/// Translates mount option strings (a StorageClass's `mountOptions`, as CSI's `mount_flags`;
/// an entry may itself be comma-separated) into mount(2) flags and data:
///
/// - `ro`, `nosuid`, `nodev`, `noexec`, `sync`, `dirsync`, `noatime`, `nodiratime`,
///   `relatime`, `strictatime`, `lazytime` set the matching `MS_*` flag;
/// - `rw`, `defaults`, `async`, `suid`, `dev`, `exec`, `atime`, `diratime` are the defaults
///   and set nothing (`rw` does not override `readonly`);
/// - `bind`, `rbind`, `remount`, `move` and the propagation options are refused: they would
///   change what the operation is;
/// - everything else (`discard`, `nouuid`, `data=ordered`, `errors=remount-ro`, ...) goes to
///   the data string unchanged, where the filesystem validates it: an option it does not know
///   makes the mount fail with EINVAL.
///
/// `readonly` adds `MS_RDONLY`.
pub fn translate_options(options: &[String], readonly: bool) -> Result<MountOptions, MountError> {
    let mut flags = MsFlags::empty();
    let mut data: Vec<&str> = Vec::new();
    if readonly {
        flags |= MsFlags::MS_RDONLY;
    }
    for option in options.iter().flat_map(|o| o.split(',')) {
        let option = option.trim();
        let flag = match option {
            "" | "rw" | "defaults" | "async" | "suid" | "dev" | "exec" | "atime" | "diratime" => {
                continue
            }
            "ro" => MsFlags::MS_RDONLY,
            "nosuid" => MsFlags::MS_NOSUID,
            "nodev" => MsFlags::MS_NODEV,
            "noexec" => MsFlags::MS_NOEXEC,
            "sync" => MsFlags::MS_SYNCHRONOUS,
            "dirsync" => MsFlags::MS_DIRSYNC,
            "noatime" => MsFlags::MS_NOATIME,
            "nodiratime" => MsFlags::MS_NODIRATIME,
            "relatime" => MsFlags::MS_RELATIME,
            "strictatime" => MsFlags::MS_STRICTATIME,
            "lazytime" => MsFlags::MS_LAZYTIME,
            "bind" | "rbind" | "remount" | "move" => {
                return Err(MountError::InvalidOption {
                    option: option.to_owned(),
                    reason: "it changes the kind of mount, which the driver decides",
                })
            }
            "shared" | "rshared" | "slave" | "rslave" | "private" | "rprivate" | "unbindable"
            | "runbindable" => {
                return Err(MountError::InvalidOption {
                    option: option.to_owned(),
                    reason: "mount propagation is not a filesystem option",
                })
            }
            other => {
                data.push(other);
                continue;
            }
        };
        flags |= flag;
    }
    Ok(MountOptions {
        flags,
        data: data.join(","),
    })
}

/// Mounts the filesystem of type `fs_type` on `device` at `target`, creating the `target`
/// directory if it is missing. `options` are translated by [`translate_options`];
/// `readonly` mounts it read-only.
///
/// Idempotent: if `device` is already mounted at `target` (matched by device number, or by
/// source string when `device` is not a block device, e.g. `tmpfs`) with the same type and
/// read-only state, this is Ok. The same device mounted differently is
/// [`MountError::Incompatible`]; anything else mounted there is [`MountError::Occupied`].
/// Other options of an existing mount are not compared.
pub fn mount_fs(
    device: &Path,
    target: &Path,
    fs_type: &str,
    options: &[String],
    readonly: bool,
) -> Result<(), MountError> {
    let translated = translate_options(options, readonly)?;
    let want_ro = translated.flags.contains(MsFlags::MS_RDONLY);
    if let Some(top) = mounts_at(target)?.pop() {
        let device_numbers = fs::metadata(device)
            .ok()
            .filter(|m| m.file_type().is_block_device())
            .map(|m| dev_numbers(m.rdev()));
        let same_source = match device_numbers {
            Some(numbers) => top.major_minor == numbers,
            None => Path::new(&top.source) == device,
        };
        if !same_source {
            return Err(MountError::Occupied {
                target: target.to_owned(),
                what: format!("{} ({})", top.source, top.fs_type),
                wanted: device.display().to_string(),
            });
        }
        let reason = if top.fs_type != fs_type {
            Some(format!("as {}, not {fs_type}", top.fs_type))
        } else if top.is_read_only() != want_ro {
            Some(read_only_mismatch(top.is_read_only()))
        } else {
            None
        };
        return match reason {
            Some(reason) => Err(MountError::Incompatible {
                target: target.to_owned(),
                source_device: top.source,
                reason,
            }),
            None => Ok(()),
        };
    }
    create_dir(target)?;
    let data = (!translated.data.is_empty()).then_some(translated.data.as_str());
    tracing::info!(
        device = %device.display(),
        target = %target.display(),
        fs_type,
        flags = ?translated.flags,
        data = data.unwrap_or(""),
        "mounting"
    );
    nix::mount::mount(
        Some(device),
        target,
        Some(fs_type),
        translated.flags,
        data,
    )
    .map_err(|errno| MountError::Mount {
        source_device: device.display().to_string(),
        target: target.to_owned(),
        fs_type: fs_type.to_owned(),
        errno,
        hint: match errno {
            Errno::EINVAL => {
                " (wrong filesystem type, an option the filesystem does not know, or a bad superblock; the kernel log says which)"
            }
            Errno::ENODEV => " (the kernel does not support this filesystem type)",
            Errno::ENOTBLK => " (the source is not a block device)",
            _ => "",
        },
    })
}

fn read_only_mismatch(mounted_ro: bool) -> String {
    if mounted_ro {
        "read-only, and read-write was asked for".to_owned()
    } else {
        "read-write, and read-only was asked for".to_owned()
    }
}

/// Bind-mounts `source` at `target`: a directory onto a directory (a staged volume into a
/// pod's target path), or a block device or regular file onto a regular file (volumeMode
/// Block). A missing `target` is created as the kind of node that fits the source (its
/// parent must exist). `readonly` makes the bind mount read-only, which takes a second step
/// (remount with `MS_BIND | MS_REMOUNT | MS_RDONLY`) that keeps the flags the bind inherited
/// (`nosuid`, `nodev`, ...).
///
/// Idempotent: if `target` already shows the same inode as `source`, this is Ok; if it is
/// read-write and read-only was asked for (a crash between the two steps), the remount is
/// done now; if it is read-only and read-write was asked for, [`MountError::Incompatible`].
/// Anything else mounted there is [`MountError::Occupied`]. If the remount fails, the
/// fresh bind mount is undone, so no writable mount is left behind.
pub fn bind_mount(source: &Path, target: &Path, readonly: bool) -> Result<(), MountError> {
    let source_meta = fs::metadata(source).map_err(|e| MountError::Io {
        action: "inspecting",
        path: source.to_owned(),
        source: e,
    })?;
    let source_type = source_meta.file_type();
    let source_is_dir = source_type.is_dir();
    if !(source_is_dir || source_type.is_file() || source_type.is_block_device()) {
        return Err(MountError::UnsupportedSource {
            path: source.to_owned(),
        });
    }

    if let Some(top) = mounts_at(target)?.pop() {
        let same = fs::metadata(target)
            .is_ok_and(|t| t.dev() == source_meta.dev() && t.ino() == source_meta.ino());
        if !same {
            return Err(MountError::Occupied {
                target: target.to_owned(),
                what: format!("{}:{} ({})", top.source, top.root.display(), top.fs_type),
                wanted: source.display().to_string(),
            });
        }
        return match (top.is_read_only(), readonly) {
            (true, true) | (false, false) => Ok(()),
            (false, true) => remount_bind_read_only(source, target),
            (true, false) => Err(MountError::Incompatible {
                target: target.to_owned(),
                source_device: source.display().to_string(),
                reason: read_only_mismatch(true),
            }),
        };
    }

    if source_is_dir {
        create_dir(target)?;
    } else {
        create_file(target)?;
    }
    tracing::info!(source = %source.display(), target = %target.display(), readonly, "bind-mounting");
    nix::mount::mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|errno| MountError::BindMount {
        source_path: source.to_owned(),
        target: target.to_owned(),
        step: "bind",
        errno,
    })?;
    if readonly {
        if let Err(e) = remount_bind_read_only(source, target) {
            if let Err(undo) = nix::mount::umount2(target, MntFlags::empty()) {
                tracing::error!(target = %target.display(), error = %undo,
                    "could not undo a bind mount that failed to become read-only");
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Makes the bind mount at `target` read-only, keeping the per-mount flags it has.
fn remount_bind_read_only(source: &Path, target: &Path) -> Result<(), MountError> {
    let current = statvfs(target).map_err(|errno| MountError::Statvfs {
        path: target.to_owned(),
        errno,
    })?;
    let kept = [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ]
    .into_iter()
    .filter(|(st, _)| current.flags().contains(*st))
    .fold(MsFlags::empty(), |acc, (_, ms)| acc | ms);
    nix::mount::mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | kept,
        None::<&str>,
    )
    .map_err(|errno| MountError::BindMount {
        source_path: source.to_owned(),
        target: target.to_owned(),
        step: "remount read-only",
        errno,
    })
}

/// How often an unmount that finds its target busy is tried again, and the pause between.
const BUSY_RETRIES: u32 = 10;
const BUSY_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

/// Unmounts everything mounted at `target`, top first, until nothing is. Ok if nothing was
/// mounted or the path does not exist. A busy mount is [`MountError::Busy`] and stays
/// mounted: nothing is detached lazily. The path itself is left in place.
pub fn unmount(target: &Path) -> Result<(), MountError> {
    let Some(resolved) = resolve(target)? else {
        return Ok(());
    };
    for _ in 0..MAX_STACKED_MOUNTS {
        if !unmount_once(target, &resolved)? {
            return Ok(());
        }
    }
    if is_mount_point(&resolved)? {
        return Err(MountError::TooManyStacked {
            target: target.to_owned(),
        });
    }
    Ok(())
}

/// Unmounts the mount on top at `target` (when mounts are stacked, the one the path shows),
/// and only that one: true when something was mounted there. Errors as [`unmount`].
pub fn unmount_top(target: &Path) -> Result<bool, MountError> {
    match resolve(target)? {
        Some(resolved) => unmount_once(target, &resolved),
        None => Ok(false),
    }
}

/// One unmount of the top mount at `resolved` (`target`, symlinks resolved): false when
/// nothing was mounted there.
fn unmount_once(target: &Path, resolved: &Path) -> Result<bool, MountError> {
    let mut busy_retries = 0;
    loop {
        if !is_mount_point(resolved)? {
            return Ok(false);
        }
        tracing::info!(target = %resolved.display(), "unmounting");
        match nix::mount::umount2(resolved, MntFlags::UMOUNT_NOFOLLOW) {
            Ok(()) => return Ok(true),
            // A device probe (udev, blkid) can hold a freshly used device for a moment:
            // retry briefly before saying the mount is busy.
            Err(Errno::EBUSY) if busy_retries < BUSY_RETRIES => {
                busy_retries += 1;
                std::thread::sleep(BUSY_RETRY_PAUSE);
            }
            Err(Errno::EBUSY) => {
                return Err(MountError::Busy {
                    target: target.to_owned(),
                })
            }
            // "Not a mount point" / "no such path": someone else unmounted or removed it
            // between our look and our unmount; the next look decides.
            Err(errno @ (Errno::EINVAL | Errno::ENOENT)) => {
                if is_mount_point(resolved)? {
                    return Err(MountError::Unmount {
                        target: target.to_owned(),
                        errno,
                    });
                }
                return Ok(true);
            }
            Err(errno) => {
                return Err(MountError::Unmount {
                    target: target.to_owned(),
                    errno,
                })
            }
        }
    }
}

fn create_dir(path: &Path) -> Result<(), MountError> {
    fs::create_dir_all(path).map_err(|source| MountError::Io {
        action: "creating directory",
        path: path.to_owned(),
        source,
    })
}

/// Creates an empty regular file to bind a block device or file onto; an existing file is
/// kept as it is.
fn create_file(path: &Path) -> Result<(), MountError> {
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map(drop)
        .map_err(|source| MountError::Io {
            action: "creating file",
            path: path.to_owned(),
            source,
        })
}

/// Capacity and usage of a mounted filesystem, for NodeGetVolumeStats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsStats {
    /// Size of the filesystem in bytes.
    pub bytes_total: u64,
    /// Bytes available to unprivileged users.
    pub bytes_available: u64,
    /// Bytes in use (total minus free, including space reserved for root).
    pub bytes_used: u64,
    /// Total inodes (0 for filesystems without a fixed inode count).
    pub inodes_total: u64,
    /// Free inodes.
    pub inodes_free: u64,
    /// Inodes in use.
    pub inodes_used: u64,
}

/// statvfs(2) of the filesystem that holds `path`. The caller checks [`is_mount_point`] first
/// if it must not report the filesystem below an unmounted path.
// `c_ulong` and `fsblkcnt_t` are u64 here but narrower on some targets.
#[allow(clippy::useless_conversion)]
pub fn stats(path: &Path) -> Result<FsStats, MountError> {
    let st = statvfs(path).map_err(|errno| MountError::Statvfs {
        path: path.to_owned(),
        errno,
    })?;
    let unit = u64::from(st.fragment_size());
    let blocks = u64::from(st.blocks());
    let free = u64::from(st.blocks_free());
    let files = u64::from(st.files());
    let files_free = u64::from(st.files_free());
    Ok(FsStats {
        bytes_total: blocks.saturating_mul(unit),
        bytes_available: u64::from(st.blocks_available()).saturating_mul(unit),
        bytes_used: blocks.saturating_sub(free).saturating_mul(unit),
        inodes_total: files,
        inodes_free: files_free,
        inodes_used: files.saturating_sub(files_free),
    })
}

/// Helpers for tests here and in other modules that mount things.
#[cfg(test)]
pub(crate) mod test_support;

#[cfg(test)]
mod tests;
