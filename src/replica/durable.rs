//! Durable file writes shared by the replica directories (`replica.json`) and the layer
//! chain (`chain.json`): a file replaced atomically (a temporary file written and fsynced,
//! renamed over the old one, then the directory fsynced), so that a crash at any point leaves
//! the old contents or the new, never a torn file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// A file operation that failed: what was being done, on which path.
#[derive(Debug)]
pub struct FileError {
    pub action: &'static str,
    pub path: PathBuf,
    pub source: io::Error,
}

fn failed(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> FileError {
    let path = path.to_path_buf();
    move |source| FileError {
        action,
        path,
        source,
    }
}

/// Replaces `dir/name` with `value` as pretty JSON (mode 0600), atomically and durably.
pub fn replace_json(dir: &Path, name: &str, value: &impl Serialize) -> Result<(), FileError> {
    let path = dir.join(name);
    let temp = dir.join(format!(".{name}.tmp"));
    let mut bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| failed("encode", &path)(io::Error::other(e)))?;
    bytes.push(b'\n');
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)
        .map_err(failed("create", &temp))?;
    file.write_all(&bytes).map_err(failed("write", &temp))?;
    file.sync_all().map_err(failed("sync", &temp))?;
    drop(file);
    fs::rename(&temp, &path).map_err(failed("rename into place", &temp))?;
    sync_dir(dir)
}

/// fsync of the directory `path`, so that the names created or renamed in it are durable.
pub fn sync_dir(path: &Path) -> Result<(), FileError> {
    File::open(path)
        .and_then(|dir| dir.sync_all())
        .map_err(failed("sync directory", path))
}
