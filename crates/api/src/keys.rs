//! Tenants' accounts and access keys, and the key that seals their secrets at rest.
//!
//! SigV4 needs each secret in plain text to check a signature, so secrets cannot be
//! hashed; the store encrypts them instead (XChaCha20-Poly1305) under a 32-byte key kept
//! beside the database in [`SEALING_KEY_FILE`] (mode 0600, the daemon's user). A copy of
//! the database alone (a backup, a stray file) then holds no usable secret. Stored form:
//! `v1:<nonce>:<ciphertext>`, both standard base64, sealed with the access key id as
//! associated data, so a sealed secret copied onto another key's row does not open.

use crate::store::AccessKey;
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The sealing key's file, in the state directory beside the database.
pub const SEALING_KEY_FILE: &str = "secret.key";
/// Length of the sealing key (and of its file: the raw bytes).
const KEY_LEN: usize = 32;
/// XChaCha20's nonce: long enough that random nonces never repeat in practice.
const NONCE_LEN: usize = 24;
/// The stored form's version prefix.
const SEALED_V1: &str = "v1:";

/// Fills `buf` from the OS's random number generator (getrandom(2)): the control plane's
/// one source of randomness. Keys, ids, tokens and nonces all come from it; nothing falls
/// back to weaker bytes.
///
/// # Errors
///
/// When the OS gives no random bytes.
pub(crate) fn fill(buf: &mut [u8]) -> Result<(), getrandom::Error> {
    getrandom::fill(buf)
}

/// `n` bytes from [`fill`].
///
/// # Panics
///
/// When the OS gives no random bytes: keys, tokens and ids made from anything else could
/// be guessed, and no caller can go on without them.
pub(crate) fn random(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    if let Err(e) = fill(&mut b) {
        panic!("the OS random number generator failed ({e}); refusing to make keys or ids from predictable bytes");
    }
    b
}

/// `n` random bytes in hex (for ids: `mvm-…`, `build-…`).
///
/// # Panics
///
/// As [`random`].
pub(crate) fn random_hex(n: usize) -> String {
    random(n).iter().map(|x| format!("{x:02x}")).collect()
}

/// A new 12-digit account id.
pub fn new_account() -> String {
    let n = random(8).iter().fold(0u64, |a, b| (a << 8) | *b as u64);
    format!("{:012}", n % 1_000_000_000_000)
}

/// A new access key for `account`: `HKIA` + 16 base-32 characters, and a 40-character
/// secret, like AWS keys in shape.
pub fn new_key(account: &str) -> AccessKey {
    const B32: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let id: String = random(16).iter().map(|b| B32[(*b % 32) as usize] as char).collect();
    let secret: String = random(40).iter().map(|b| B64[(*b % 64) as usize] as char).collect();
    AccessKey { access_key: format!("HKIA{id}"), secret, account: account.to_owned() }
}

/// A key file (the sealing key, the ingress token key) that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SealingKeyError {
    /// The file could not be read.
    #[error("cannot read the key file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file could not be created.
    #[error("cannot create the key file {path}")]
    Create {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Group or others may read or write the file.
    #[error(
        "the key file {path} has mode {mode:03o}: group and others must have no access; \
         run `chmod 600 {path}` (and rotate the access keys if others may have read it)"
    )]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Another user owns the file.
    #[error("the key file {path} belongs to uid {owner}, not to this daemon's user (uid {me})")]
    NotOwned {
        /// The file.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The daemon's user.
        me: u32,
    },
    /// Not a file of exactly 32 bytes.
    #[error(
        "the key file {path} is not a file of {KEY_LEN} bytes; restore it from a backup \
         (a new key cannot open what the old one sealed or signed)"
    )]
    Malformed {
        /// The file.
        path: PathBuf,
    },
}

/// A stored secret that does not open.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UnsealError {
    /// Not in a stored form this version reads.
    #[error("the stored secret is not in a known sealed form")]
    Malformed,
    /// The authentication tag does not match: another key, another row, or damage.
    #[error("the stored secret does not open with this key (another key, another row, or damage)")]
    Inauthentic,
}

/// Reads the 32-byte key file at `path`; `Ok(None)` when there is none.
///
/// # Errors
///
/// When the file cannot be read, is not 32 bytes, is not owned by this process's user,
/// or group or others have any access to it.
pub fn load_key_file(path: &Path) -> Result<Option<[u8; KEY_LEN]>, SealingKeyError> {
    let path = path.to_path_buf();
    let read = |source| SealingKeyError::Read { path: path.clone(), source };
    // No symlinks: the file checked is the file read.
    let mut f = match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read(e)),
    };
    let meta = f.metadata().map_err(read)?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(SealingKeyError::NotOwned { path, owner: meta.uid(), me });
    }
    if meta.mode() & 0o077 != 0 {
        return Err(SealingKeyError::Exposed { path, mode: meta.mode() & 0o777 });
    }
    if !meta.is_file() || meta.len() != KEY_LEN as u64 {
        return Err(SealingKeyError::Malformed { path });
    }
    let mut bytes = [0u8; KEY_LEN];
    f.read_exact(&mut bytes).map_err(read)?;
    Ok(Some(bytes))
}

/// Creates the key file at `path` from the OS's random number generator (mode 0600), or
/// loads the one another process created first (a daemon and `hearth keys` starting
/// together).
///
/// # Errors
///
/// As [`load_key_file`], and when the file cannot be written.
pub fn create_key_file(path: &Path) -> Result<[u8; KEY_LEN], SealingKeyError> {
    let create = |source| SealingKeyError::Create { path: path.to_path_buf(), source };
    let dir = path.parent().ok_or_else(|| create(std::io::ErrorKind::InvalidInput.into()))?;
    let mut bytes = [0u8; KEY_LEN];
    fill(&mut bytes).map_err(|e| create(e.into()))?;
    // Written whole to a temporary file (0600 from the start), then linked into place
    // without replacing: a reader never sees half a key, and a racing creator's key wins.
    let mut tmp = tempfile::Builder::new()
        .prefix(".key.")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .tempfile_in(dir)
        .map_err(create)?;
    std::io::Write::write_all(&mut tmp, &bytes).map_err(create)?;
    tmp.as_file().sync_all().map_err(create)?;
    bytes.fill(0);
    match tmp.persist_noclobber(path) {
        Ok(_) => {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(create(e.error)),
    }
    load_key_file(path)?.ok_or_else(|| create(std::io::ErrorKind::NotFound.into()))
}

/// The key that seals access keys' secrets in the store.
pub struct SealingKey(XChaCha20Poly1305);

impl std::fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealingKey(..)")
    }
}

impl SealingKey {
    /// A key from its bytes.
    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> SealingKey {
        SealingKey(XChaCha20Poly1305::new(&(*bytes).into()))
    }

    /// The path of the key file in `dir`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(SEALING_KEY_FILE)
    }

    /// Loads `dir`'s key file; `Ok(None)` when there is none.
    ///
    /// # Errors
    ///
    /// As [`load_key_file`].
    pub fn load(dir: &Path) -> Result<Option<SealingKey>, SealingKeyError> {
        Ok(load_key_file(&Self::path(dir))?.map(|mut bytes| {
            let key = SealingKey::from_bytes(&bytes);
            bytes.fill(0);
            key
        }))
    }

    /// Creates `dir`'s key file, or loads the one another process created first.
    ///
    /// # Errors
    ///
    /// As [`create_key_file`].
    pub fn create(dir: &Path) -> Result<SealingKey, SealingKeyError> {
        let mut bytes = create_key_file(&Self::path(dir))?;
        let key = SealingKey::from_bytes(&bytes);
        bytes.fill(0);
        Ok(key)
    }

    /// Seals `secret` of `access_key` into its stored form.
    pub fn seal(&self, access_key: &str, secret: &str) -> String {
        let nonce = XNonce::try_from(&random(NONCE_LEN)[..]).expect("a nonce of NONCE_LEN bytes");
        let sealed = self
            .0
            .encrypt(&nonce, Payload { msg: secret.as_bytes(), aad: access_key.as_bytes() })
            .expect("a secret is far below XChaCha20's message limit");
        let b64 = base64::engine::general_purpose::STANDARD;
        format!("{SEALED_V1}{}:{}", b64.encode(nonce), b64.encode(sealed))
    }

    /// Opens the stored form of `access_key`'s secret.
    ///
    /// # Errors
    ///
    /// [`UnsealError::Malformed`] for anything but the `v1` form (a plain-text secret
    /// included); [`UnsealError::Inauthentic`] when it was sealed with another key or for
    /// another access key, or was altered.
    pub fn open(&self, access_key: &str, stored: &str) -> Result<String, UnsealError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let (nonce, sealed) = stored.strip_prefix(SEALED_V1).and_then(|s| s.split_once(':')).ok_or(UnsealError::Malformed)?;
        let nonce = b64.decode(nonce).ok().and_then(|n| XNonce::try_from(&n[..]).ok()).ok_or(UnsealError::Malformed)?;
        let sealed = b64.decode(sealed).map_err(|_| UnsealError::Malformed)?;
        let plain = self.0.decrypt(&nonce, Payload { msg: &sealed, aad: access_key.as_bytes() }).map_err(|_| UnsealError::Inauthentic)?;
        String::from_utf8(plain).map_err(|_| UnsealError::Malformed)
    }
}

/// True when `stored` is in a sealed form (not a plain-text secret of an older version).
pub fn is_sealed(stored: &str) -> bool {
    stored.starts_with(SEALED_V1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn seals_open_only_with_their_key_and_row() {
        let dir = tempfile::tempdir().unwrap();
        let k = SealingKey::create(dir.path()).unwrap();
        let stored = k.seal("HKIAAAAA", "s3cret");
        assert!(is_sealed(&stored) && !stored.contains("s3cret"));
        assert_eq!(k.open("HKIAAAAA", &stored).unwrap(), "s3cret");
        assert_eq!(k.open("HKIABBBB", &stored), Err(UnsealError::Inauthentic));
        let other = SealingKey::from_bytes(&[7; KEY_LEN]);
        assert_eq!(other.open("HKIAAAAA", &stored), Err(UnsealError::Inauthentic));
        assert_eq!(k.open("HKIAAAAA", "s3cret"), Err(UnsealError::Malformed));
        // Two seals of one secret differ (fresh nonces).
        assert_ne!(k.seal("HKIAAAAA", "s3cret"), stored);
    }

    #[test]
    fn the_key_file_is_private_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        assert!(SealingKey::load(dir.path()).unwrap().is_none());
        let k = SealingKey::create(dir.path()).unwrap();
        let path = SealingKey::path(dir.path());
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!((meta.permissions().mode() & 0o777, meta.len()), (0o600, 32));
        // Loading (or a second create) gives the same key.
        let stored = k.seal("HKIAAAAA", "x");
        assert_eq!(SealingKey::load(dir.path()).unwrap().unwrap().open("HKIAAAAA", &stored).unwrap(), "x");
        assert_eq!(SealingKey::create(dir.path()).unwrap().open("HKIAAAAA", &stored).unwrap(), "x");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = SealingKey::load(dir.path()).unwrap_err();
        assert!(matches!(e, SealingKeyError::Exposed { mode: 0o640, .. }), "{e}");
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o604)).unwrap();
        assert!(matches!(SealingKey::load(dir.path()), Err(SealingKeyError::Exposed { .. })));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, [1u8; 31]).unwrap();
        assert!(matches!(SealingKey::load(dir.path()), Err(SealingKeyError::Malformed { .. })));
        // A symlink in its place is not followed.
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), &path).unwrap();
        assert!(matches!(SealingKey::load(dir.path()), Err(SealingKeyError::Read { .. })));
    }

    #[test]
    fn new_keys_look_like_aws_keys() {
        let k = new_key("123456789012");
        assert!(k.access_key.starts_with("HKIA") && k.access_key.len() == 20);
        assert_eq!(k.secret.len(), 40);
        assert_ne!(new_key("123456789012").secret, k.secret);
        assert_eq!(new_account().len(), 12);
    }
}
