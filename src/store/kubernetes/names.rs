//! Store keys as Kubernetes object names, and back.
//!
//! An object name must be a DNS-1123 subdomain: at most 253 characters, dot-separated labels
//! of lowercase alphanumerics and `-`, each beginning and ending with an alphanumeric. The
//! keys Palisade uses almost always are one already: volume ids (`volume_id_for_name` keeps
//! lowercase names of at most 63 characters, else `h-<40 hex>`), replica ids
//! (`<volume id>-r-<n>`), `settings`, and node ids, which in Kubernetes are Node names. Such a
//! key is the object's name as it is, so `kubectl get plv pvc-…` finds it.
//!
//! Any other key (a node id with capitals or `_`, given with `--node-id`) is encoded
//! reversibly as `x.` followed by the lowercase hex of its bytes; a key that is valid but
//! itself begins with `x.` is encoded too, so no two keys share a name. The object's spec
//! keeps the key as given (`spec.key`). Keys of more than 125 bytes that need encoding are
//! refused (the name would exceed 253 characters).

/// The prefix of names that encode their key in hex.
const ENCODED: &str = "x.";
/// The longest object name.
const MAX_NAME: usize = 253;

/// Why a key cannot be stored under any object name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("an empty key cannot name an object")]
    Empty,
    #[error(
        "a key of {len} bytes that is not a valid object name is too long to encode \
         (at most {} bytes)", (MAX_NAME - ENCODED.len()) / 2
    )]
    TooLong { len: usize },
}

/// The object name of `key`.
pub fn name_for_key(key: &str) -> Result<String, KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if is_subdomain(key) && !key.starts_with(ENCODED) {
        return Ok(key.to_string());
    }
    let name = format!("{ENCODED}{}", hex::encode(key.as_bytes()));
    if name.len() > MAX_NAME {
        return Err(KeyError::TooLong { len: key.len() });
    }
    Ok(name)
}

/// The key an object name stands for; None for a name [`name_for_key`] never produces (an
/// object made by hand).
pub fn key_for_name(name: &str) -> Option<String> {
    match name.strip_prefix(ENCODED) {
        Some(encoded) => {
            let key = String::from_utf8(hex::decode(encoded).ok()?).ok()?;
            // Only the canonical encoding: a key that would be kept as its own name is
            // never encoded, so such a name is not ours.
            (name_for_key(&key).ok()? == name).then_some(key)
        }
        None => is_subdomain(name).then(|| name.to_string()),
    }
}

/// A DNS-1123 subdomain, as Kubernetes validates object names.
fn is_subdomain(s: &str) -> bool {
    s.len() <= MAX_NAME
        && s.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_names_are_kept() {
        for key in [
            "pvc-0a1b",
            "pvc-0a1b-r-12",
            "h-0123456789abcdef0123456789abcdef01234567",
            "settings",
            "worker-1.example.com",
            "n",
            "1",
        ] {
            assert_eq!(name_for_key(key).unwrap(), key);
            assert_eq!(key_for_name(key).as_deref(), Some(key));
        }
    }

    #[test]
    fn other_keys_are_encoded_reversibly_and_without_collisions() {
        for key in [
            "Node-1", "node_1", "x.41", "x.", "-a", "a-", "a..b", ".a", "ü", "a b/c",
        ] {
            let name = name_for_key(key).unwrap();
            assert!(name.starts_with("x."), "{key:?} -> {name}");
            assert!(is_subdomain(&name), "{key:?} -> {name}");
            assert_ne!(name, key);
            assert_eq!(key_for_name(&name).as_deref(), Some(key), "{name}");
        }
        // "x.41" is a valid name, but it stands for the key "A" only as encoded; the key
        // "x.41" itself gets another name.
        assert_eq!(name_for_key("A").unwrap(), "x.41");
        assert_ne!(name_for_key("x.41").unwrap(), "x.41");
    }

    #[test]
    fn foreign_names_and_bad_keys_are_refused() {
        assert_eq!(key_for_name("x.zz"), None);
        assert_eq!(key_for_name("x.6e"), None, "\"n\" is its own name");
        assert_eq!(key_for_name("Upper"), None);
        assert_eq!(name_for_key(""), Err(KeyError::Empty));
        assert_eq!(
            name_for_key(&"A".repeat(126)),
            Err(KeyError::TooLong { len: 126 })
        );
        assert!(name_for_key(&"A".repeat(125)).is_ok());
        assert!(name_for_key(&"a".repeat(253)).is_ok());
        assert!(name_for_key(&"a".repeat(254)).is_err());
    }
}
