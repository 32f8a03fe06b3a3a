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
//! once by the controller and distributed out of band (a file copied, or a Kubernetes Secret
//! mounted) to every node and operator: it never travels on the wire.
//!
//! Palisade's own gRPC APIs (ControlPlane, NodeAgent) take another key derived from it, the
//! API credential `hex(HMAC-SHA256(secret, "palisade api v1"))`, presented as gRPC metadata
//! `authorization: Bearer <credential>`. It is derived, not the secret itself, so that
//! whoever reads it on the wire gets API access but cannot forge attachment tokens.

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

/// The shortest cluster secret accepted by the replica server and from a `--secret-file`.
pub const MIN_SECRET_LEN: usize = 16;

/// The longest `--secret-file` read: anything longer is not a cluster secret.
pub const MAX_SECRET_FILE_LEN: usize = 4096;

/// What the API credential is the MAC of. No attachment token's message can equal it (those
/// have a 0 byte 8 bytes before their end).
const API_CREDENTIAL_CONTEXT: &[u8] = b"palisade api v1";

/// The authentication scheme of the `authorization` metadata.
const BEARER: &str = "Bearer";

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
    /// A shared secret file is too short, or too long, to be a cluster secret.
    #[error("{path} holds {len} bytes, not a cluster secret (at least {MIN_SECRET_LEN}, at most {MAX_SECRET_FILE_LEN})")]
    BadLength { path: PathBuf, len: usize },
}

/// Why a call's `authorization` metadata was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing authorization metadata (every call needs `authorization: Bearer <credential>`, derived from the cluster secret)")]
    Missing,
    #[error("malformed authorization metadata (expected `authorization: Bearer <{TOKEN_LEN} hex digits>`)")]
    Malformed,
    #[error(
        "wrong credential for this cluster (the caller's cluster secret is not this cluster's)"
    )]
    Wrong,
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
    let mut mac = keyed(secret);
    mac.update(volume_id.as_bytes());
    mac.update(&[0]);
    mac.update(&epoch.to_be_bytes());
    mac
}

fn keyed(secret: &[u8]) -> HmacSha256 {
    // HMAC takes a key of any length; `new_from_slice` cannot fail for it.
    match HmacSha256::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(hmac::digest::InvalidLength) => unreachable!("HMAC accepts keys of any length"),
    }
}

fn api_mac(secret: &[u8]) -> HmacSha256 {
    let mut mac = keyed(secret);
    mac.update(API_CREDENTIAL_CONTEXT);
    mac
}

/// The API credential of the cluster whose secret is `secret` (hex, [`TOKEN_LEN`] long).
pub fn api_credential(secret: &[u8]) -> String {
    hex::encode(api_mac(secret).finalize().into_bytes())
}

/// The value of the `authorization` metadata that carries the API credential.
pub fn authorization(secret: &[u8]) -> String {
    format!("{BEARER} {}", api_credential(secret))
}

/// Checks a call's `authorization` metadata (None when the call has none) against the
/// cluster's secret. The credential is compared in constant time.
pub fn check_authorization(secret: &[u8], header: Option<&[u8]>) -> Result<(), AuthError> {
    let header = header.ok_or(AuthError::Missing)?;
    let header = std::str::from_utf8(header).map_err(|_| AuthError::Malformed)?;
    let (scheme, credential) = header.trim().split_once(' ').ok_or(AuthError::Malformed)?;
    if !scheme.eq_ignore_ascii_case(BEARER) {
        return Err(AuthError::Malformed);
    }
    let credential = credential.trim();
    if credential.len() != TOKEN_LEN {
        return Err(AuthError::Malformed);
    }
    let presented = hex::decode(credential).map_err(|_| AuthError::Malformed)?;
    api_mac(secret)
        .verify_slice(&presented)
        .map_err(|_| AuthError::Wrong)
}

/// Reads a cluster secret distributed to this process (`--secret-file`): the file's bytes,
/// at least [`MIN_SECRET_LEN`] and at most [`MAX_SECRET_FILE_LEN`] of them. Never creates it.
pub fn read_secret_file(path: &Path) -> Result<Vec<u8>, SecretError> {
    let mut file = File::open(path).map_err(io_error("open", path))?;
    let metadata = file.metadata().map_err(io_error("stat", path))?;
    if metadata.permissions().mode() & 0o077 != 0 {
        tracing::warn!(path = %path.display(), "the cluster secret is readable by other users");
    }
    let mut secret = Vec::with_capacity(SECRET_LEN);
    (&mut file)
        .take(MAX_SECRET_FILE_LEN as u64 + 1)
        .read_to_end(&mut secret)
        .map_err(io_error("read", path))?;
    if !(MIN_SECRET_LEN..=MAX_SECRET_FILE_LEN).contains(&secret.len()) {
        let len = usize::try_from(metadata.len()).unwrap_or(usize::MAX);
        return Err(SecretError::BadLength {
            path: path.to_path_buf(),
            len: len.max(secret.len()),
        });
    }
    Ok(secret)
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

    let secret = new_secret()?;

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

/// A new cluster secret: [`SECRET_LEN`] bytes from /dev/urandom.
pub fn new_secret() -> Result<Vec<u8>, SecretError> {
    let mut secret = vec![0u8; SECRET_LEN];
    let urandom = Path::new("/dev/urandom");
    File::open(urandom)
        .and_then(|mut f| f.read_exact(&mut secret))
        .map_err(io_error("read", urandom))?;
    Ok(secret)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), SecretError> {
    // A new file only: never through a symlink or into a file someone placed there.
    let _ = std::fs::remove_file(path);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
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

    #[test]
    fn the_api_credential_is_the_documented_hmac_and_not_a_token_or_the_secret() {
        // Python: hmac.new(SECRET, b"palisade api v1", hashlib.sha256).hexdigest()
        let credential = api_credential(SECRET);
        assert_eq!(
            credential,
            "98e94cf2a279d6d8a3f2344cc0725e954757fe8ce62c6f67015be6dfda4ecd2f"
        );
        assert_eq!(credential.len(), TOKEN_LEN);
        assert!(!credential.contains(&hex::encode(SECRET)));
        assert_ne!(api_credential(b"another secret, 16+ bytes"), credential);
        assert_eq!(authorization(SECRET), format!("Bearer {credential}"));
    }

    #[test]
    fn authorization_metadata_is_checked() {
        let right = authorization(SECRET);
        assert_eq!(check_authorization(SECRET, Some(right.as_bytes())), Ok(()));
        // The scheme is case-insensitive, the hex too; surrounding blanks are tolerated.
        let lower = right.replacen("Bearer", "bearer", 1);
        assert_eq!(check_authorization(SECRET, Some(lower.as_bytes())), Ok(()));
        let upper = format!("Bearer {}", api_credential(SECRET).to_uppercase());
        assert_eq!(check_authorization(SECRET, Some(upper.as_bytes())), Ok(()));
        let padded = format!("  {right} ");
        assert_eq!(check_authorization(SECRET, Some(padded.as_bytes())), Ok(()));

        // Missing.
        assert_eq!(check_authorization(SECRET, None), Err(AuthError::Missing));
        // Another cluster's credential, and one bit off.
        let other = authorization(b"0123456789abcdef0123456789abcdeX");
        assert_eq!(
            check_authorization(SECRET, Some(other.as_bytes())),
            Err(AuthError::Wrong)
        );
        let mut flipped = right.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
        assert_eq!(
            check_authorization(SECRET, Some(&flipped)),
            Err(AuthError::Wrong)
        );
        // The secret itself, or an attachment token, is not the credential.
        let secret_hex = format!("Bearer {}", hex::encode(SECRET));
        assert_eq!(
            check_authorization(SECRET, Some(secret_hex.as_bytes())),
            Err(AuthError::Wrong)
        );
        let token = format!("Bearer {}", attachment_token(SECRET, "v", 1));
        assert_eq!(
            check_authorization(SECRET, Some(token.as_bytes())),
            Err(AuthError::Wrong)
        );
        // Malformed: no scheme, another scheme, empty, truncated, not hex, not UTF-8.
        let credential = api_credential(SECRET);
        let basic = format!("Basic {credential}");
        let truncated = format!("Bearer {}", &credential[..62]);
        let not_hex = format!("Bearer {}", "z".repeat(TOKEN_LEN));
        for bad in [
            credential.as_bytes(),
            basic.as_bytes(),
            b"".as_slice(),
            b"Bearer".as_slice(),
            b"Bearer ".as_slice(),
            truncated.as_bytes(),
            not_hex.as_bytes(),
            b"Bearer \xff\xfe".as_slice(),
        ] {
            assert_eq!(
                check_authorization(SECRET, Some(bad)),
                Err(AuthError::Malformed),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // The messages say what is wrong.
        assert!(AuthError::Missing
            .to_string()
            .contains("missing authorization metadata"));
        assert!(AuthError::Wrong
            .to_string()
            .contains("wrong credential for this cluster"));
    }

    #[test]
    fn a_distributed_secret_file_is_read_never_created() {
        let dir = tempfile::tempdir().unwrap();
        let created = load_or_create_secret(&dir.path().join("cluster.secret")).unwrap();
        assert_eq!(
            read_secret_file(&dir.path().join("cluster.secret")).unwrap(),
            created
        );
        // Any length from the minimum up is a secret.
        for len in [MIN_SECRET_LEN, 64, MAX_SECRET_FILE_LEN] {
            let path = dir.path().join(format!("ok-{len}"));
            fs::write(&path, vec![9u8; len]).unwrap();
            assert_eq!(read_secret_file(&path).unwrap(), vec![9u8; len]);
        }
        for len in [0, 1, MIN_SECRET_LEN - 1, MAX_SECRET_FILE_LEN + 1, 1 << 20] {
            let path = dir.path().join(format!("bad-{len}"));
            fs::write(&path, vec![9u8; len]).unwrap();
            let err = read_secret_file(&path).unwrap_err();
            assert!(
                matches!(&err, SecretError::BadLength { len: l, .. } if *l == len),
                "{err}"
            );
            assert!(err.to_string().contains(&format!("bad-{len}")), "{err}");
        }
        let missing = dir.path().join("missing");
        let err = read_secret_file(&missing).unwrap_err();
        assert!(
            matches!(&err, SecretError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound),
            "{err}"
        );
        assert!(err.to_string().contains("missing"), "{err}");
        assert!(!missing.exists());
        let err = read_secret_file(dir.path()).unwrap_err();
        assert!(matches!(err, SecretError::Io { .. }), "{err}");
    }
}
