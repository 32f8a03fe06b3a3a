//! Per-attachment secret tokens, and the cluster secret they are derived from.
//!
//! The controller issues a token at ControllerPublish for (volume, epoch); the engine presents
//! it when it opens a session on a replica server, which recomputes it with the same cluster
//! secret. A token is `hex(HMAC-SHA256(secret, volume_id || 0x00 || epoch as u64 big-endian))`:
//! it proves that the attachment authority granted that epoch of that volume, so a process
//! that merely reaches a replica server's port cannot raise a replica's epoch (and so fence
//! the real engine) or touch its data.
//!
//! The cluster secret is 32 random bytes kept in a file readable only by its owner, created
//! once and then shared by the controller and every node.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The length of the cluster secret, in bytes.
pub const SECRET_LEN: usize = 32;

/// The length of a token, in characters (hex of a SHA-256 MAC).
pub const TOKEN_LEN: usize = 64;

type HmacSha256 = Hmac<Sha256>;

/// Why the cluster secret could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// A file operation on the secret (or its temporary file) failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The secret file exists but does not hold a secret of the right length.
    #[error("{path} holds {len} bytes, not a {SECRET_LEN}-byte cluster secret")]
    WrongLength { path: PathBuf, len: usize },
}

/// The token that grants attachment `epoch` of `volume_id`.
pub fn attachment_token(secret: &[u8], volume_id: &str, epoch: u64) -> String {
    hex::encode(mac(secret, volume_id, epoch).finalize().into_bytes())
}

/// True when `token` is the token of attachment `epoch` of `volume_id`. The comparison of the
/// MACs takes the same time wherever they differ.
pub fn verify(secret: &[u8], volume_id: &str, epoch: u64, token: &str) -> bool {
    let Ok(presented) = hex::decode(token) else {
        return false;
    };
    mac(secret, volume_id, epoch)
        .verify_slice(&presented)
        .is_ok()
}

fn mac(secret: &[u8], volume_id: &str, epoch: u64) -> HmacSha256 {
    // HMAC takes a key of any length; `new_from_slice` cannot fail for it.
    let mut mac = match HmacSha256::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(hmac::digest::InvalidLength) => unreachable!("HMAC accepts keys of any length"),
    };
    mac.update(volume_id.as_bytes());
    mac.update(&[0]);
    mac.update(&epoch.to_be_bytes());
    mac
}

/// Reads the cluster secret from `path`, or creates it (32 bytes from /dev/urandom, mode 0600)
/// if the file does not exist. Creation is atomic and durable: the secret is written to a
/// temporary file, synced, then linked into place, which fails if another process created
/// the secret meanwhile (that secret is then read and used), and the directory is synced. An
/// existing file of the wrong length is an error, never silently replaced.
pub fn load_or_create_secret(path: &Path) -> Result<Vec<u8>, SecretError> {
    match read_secret(path) {
        Ok(secret) => return Ok(secret),
        Err(SecretError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "secret".to_string());

    let mut secret = vec![0u8; SECRET_LEN];
    let urandom = Path::new("/dev/urandom");
    File::open(urandom)
        .and_then(|mut f| f.read_exact(&mut secret))
        .map_err(io_error("read", urandom))?;

    // Unique among the processes and threads that may race to create the secret.
    static ATTEMPT: AtomicU64 = AtomicU64::new(0);
    let attempt = ATTEMPT.fetch_add(1, Ordering::Relaxed);
    let temp = dir.join(format!(".{name}.{}.{attempt}.tmp", std::process::id()));
    let written = write_synced(&temp, &secret);
    let linked = written.and_then(|()| match fs::hard_link(&temp, path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io_error("link into place", path)(e)),
    });
    // The temporary file goes whatever happened; a failure to remove it is not the caller's.
    if let Err(e) = fs::remove_file(&temp) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(path = %temp.display(), error = %e, "cannot remove a temporary secret file");
        }
    }
    if !linked? {
        // Another process created the secret first: use theirs.
        return read_secret(path);
    }
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("sync directory", &dir))?;
    tracing::info!(path = %path.display(), "created the cluster secret");
    Ok(secret)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), SecretError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_error("create", path))?;
    file.write_all(bytes).map_err(io_error("write", path))?;
    file.sync_all().map_err(io_error("sync", path))
}

fn read_secret(path: &Path) -> Result<Vec<u8>, SecretError> {
    let mut file = File::open(path).map_err(io_error("open", path))?;
    let metadata = file.metadata().map_err(io_error("stat", path))?;
    if metadata.permissions().mode() & 0o077 != 0 {
        tracing::warn!(path = %path.display(), "the cluster secret is readable by other users");
    }
    // Read one byte more than a secret, to tell a long file from a secret.
    let mut secret = Vec::with_capacity(SECRET_LEN + 1);
    (&mut file)
        .take(SECRET_LEN as u64 + 1)
        .read_to_end(&mut secret)
        .map_err(io_error("read", path))?;
    if secret.len() != SECRET_LEN {
        let len = usize::try_from(metadata.len()).unwrap_or(usize::MAX);
        return Err(SecretError::WrongLength {
            path: path.to_path_buf(),
            len: len.max(secret.len()),
        });
    }
    Ok(secret)
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SecretError {
    let path = path.to_path_buf();
    move |source| SecretError::Io {
        action,
        path,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn a_token_verifies_only_for_its_volume_epoch_and_secret() {
        let token = attachment_token(SECRET, "vol-1", 7);
        assert_eq!(token.len(), TOKEN_LEN);
        assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(token, attachment_token(SECRET, "vol-1", 7));
        assert!(verify(SECRET, "vol-1", 7, &token));

        assert!(!verify(SECRET, "vol-1", 8, &token));
        assert!(!verify(SECRET, "vol-1", 6, &token));
        assert!(!verify(SECRET, "vol-2", 7, &token));
        assert!(!verify(b"another secret", "vol-1", 7, &token));
        // The separator keeps the volume id and the epoch apart.
        assert_ne!(
            attachment_token(SECRET, "vol-1", 7),
            attachment_token(SECRET, "vol-1\0", 7)
        );
        // Malformed tokens: truncated, not hex, empty, upper-case of a valid one is still hex.
        assert!(!verify(SECRET, "vol-1", 7, &token[..62]));
        assert!(!verify(SECRET, "vol-1", 7, "zz"));
        assert!(!verify(SECRET, "vol-1", 7, ""));
        assert!(verify(SECRET, "vol-1", 7, &token.to_uppercase()));
        let mut flipped = token.clone().into_bytes();
        flipped[10] = if flipped[10] == b'0' { b'1' } else { b'0' };
        assert!(!verify(
            SECRET,
            "vol-1",
            7,
            &String::from_utf8(flipped).unwrap()
        ));
    }

    #[test]
    fn the_token_is_the_documented_hmac() {
        // Computed independently: Python's hmac.new(SECRET, b"v\x00" +
        // (0x0102).to_bytes(8, "big"), hashlib.sha256).hexdigest().
        assert_eq!(
            attachment_token(SECRET, "v", 0x0102),
            "44ec1663bad48e85bf1a94bc4db6e6831cc4d4abed600a7136a460ab100321ec"
        );
    }

    #[test]
    fn the_secret_is_created_once_with_tight_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster-secret");
        let first = load_or_create_secret(&path).unwrap();
        assert_eq!(first.len(), SECRET_LEN);
        assert_ne!(first, vec![0; SECRET_LEN]);
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load_or_create_secret(&path).unwrap(), first);
        assert_eq!(fs::read(&path).unwrap(), first);
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["cluster-secret"]);
        // Another place, another secret.
        let other = load_or_create_secret(&dir.path().join("other")).unwrap();
        assert_ne!(other, first);
    }

    #[test]
    fn concurrent_first_loads_agree_on_the_secret() {
        let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let dir = std::sync::Arc::clone(&dir);
                std::thread::spawn(move || load_or_create_secret(&dir.path().join("s")).unwrap())
            })
            .collect();
        let secrets: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(secrets.iter().all(|s| *s == secrets[0]));
    }

    #[test]
    fn a_secret_file_of_the_wrong_length_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        for len in [0, 1, SECRET_LEN - 1, SECRET_LEN + 1, 4096] {
            let path = dir.path().join(format!("secret-{len}"));
            fs::write(&path, vec![7u8; len]).unwrap();
            let err = load_or_create_secret(&path).unwrap_err();
            assert!(
                matches!(&err, SecretError::WrongLength { len: l, .. } if *l == len),
                "{err}"
            );
            assert!(err.to_string().contains(&format!("secret-{len}")), "{err}");
            // Never replaced.
            assert_eq!(fs::read(&path).unwrap().len(), len);
        }
        // A directory where the file should be, and a missing parent directory.
        let err = load_or_create_secret(dir.path()).unwrap_err();
        assert!(matches!(err, SecretError::Io { .. }), "{err}");
        let err = load_or_create_secret(&dir.path().join("missing/secret")).unwrap_err();
        assert!(matches!(err, SecretError::Io { .. }), "{err}");
    }
}
