//! Access keys' secrets at rest: sealed under the key file beside the database
//! ([`crate::keys::SealingKey`]), opened on lookup. Opening a database checks the key
//! against what it sealed and seals the secrets an older version stored in plain text.

use super::sqlite::{DbResult, OpenError};
use crate::keys::SealingKey;
use rusqlite::{params, Connection};
use std::path::Path;

/// The sealing key of the database in `dir`: loaded, or created while no secret is sealed
/// yet. Refuses a missing key once secrets are sealed and a key that opens none of them;
/// secrets of older versions, in plain text, are sealed with it.
pub(super) fn sealing_key(conn: &mut Connection, dir: &Path) -> Result<SealingKey, OpenError> {
    let rows: Vec<(String, String)> = {
        let mut st = conn.prepare("SELECT access_key, secret FROM access_keys")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect::<DbResult<_>>()?
    };
    let sealed: Vec<_> = rows.iter().filter(|(_, s)| crate::keys::is_sealed(s)).collect();
    let key = match SealingKey::load(dir)? {
        Some(k) => k,
        None if sealed.is_empty() => SealingKey::create(dir)?,
        None => return Err(OpenError::KeyMissing(SealingKey::path(dir))),
    };
    let unusable: Vec<_> = sealed.iter().filter(|(id, s)| key.open(id, s).is_err()).collect();
    if !sealed.is_empty() && unusable.len() == sealed.len() {
        return Err(OpenError::WrongKey(SealingKey::path(dir)));
    }
    for (id, _) in unusable {
        tracing::error!(access_key = %id, "the stored secret of this access key does not open: the key is unusable (create another with `hearth keys create`)");
    }
    if rows.len() > sealed.len() {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut n = 0;
        for (id, secret) in &rows {
            if !crate::keys::is_sealed(secret) {
                // Only if still plain: a process opening the database meanwhile may have sealed it.
                n += tx.execute(
                    "UPDATE access_keys SET secret = ?2 WHERE access_key = ?1 AND secret = ?3",
                    params![id, key.seal(id, secret), secret],
                )?;
            }
        }
        tx.commit()?;
        // With secure_delete the old cells are zeroed; the checkpoint empties the WAL, which
        // held the plain pages.
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
        tracing::info!(keys = n, "sealed access keys' secrets stored in plain text by an older version");
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::super::{OpenError, Store};
    use crate::keys::{SealingKey, SealingKeyError};
    use rusqlite::Connection;
    use std::path::Path;

    /// The database and its WAL as bytes.
    fn db_bytes(path: &Path) -> Vec<u8> {
        let mut b = std::fs::read(path).unwrap();
        b.extend(std::fs::read(path.with_extension("db-wal")).unwrap_or_default());
        b
    }

    fn contains(hay: &[u8], needle: &str) -> bool {
        hay.windows(needle.len()).any(|w| w == needle.as_bytes())
    }

    #[test]
    fn secrets_are_sealed_at_rest_and_opened_on_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hearth.db");
        let s = Store::open(&path).unwrap();
        let k = crate::keys::new_key("111111111111");
        s.add_key(&k).unwrap();
        assert!(!contains(&db_bytes(&path), &k.secret));
        assert_eq!(s.key(&k.access_key).unwrap().unwrap(), k);
        assert_eq!(s.keys().unwrap(), std::slice::from_ref(&k));
        let mode = |p: &Path| std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions()) & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&SealingKey::path(dir.path())), 0o600);
    }

    #[test]
    fn plain_secrets_of_older_versions_are_sealed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hearth.db");
        let secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYPLAINTEXT1";
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE access_keys (access_key TEXT PRIMARY KEY, secret TEXT NOT NULL, account TEXT NOT NULL);").unwrap();
            c.execute("INSERT INTO access_keys VALUES ('HKIAOLD', ?1, '111111111111')", [secret]).unwrap();
        }
        assert!(contains(&db_bytes(&path), secret));
        let s = Store::open(&path).unwrap();
        assert_eq!(s.key("HKIAOLD").unwrap().unwrap().secret, secret);
        let stored: String = s.db().query_row("SELECT secret FROM access_keys", [], |r| r.get(0)).unwrap();
        assert!(crate::keys::is_sealed(&stored));
        drop(s);
        assert!(!contains(&db_bytes(&path), secret));
    }

    #[test]
    fn a_wrong_or_missing_key_file_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hearth.db");
        let (k1, k2) = (crate::keys::new_key("111111111111"), crate::keys::new_key("111111111111"));
        {
            let s = Store::open(&path).unwrap();
            s.add_key(&k1).unwrap();
            s.add_key(&k2).unwrap();
        }
        let key_file = SealingKey::path(dir.path());
        let good = std::fs::read(&key_file).unwrap();
        // Another key: refused, naming the file.
        std::fs::write(&key_file, [9u8; 32]).unwrap();
        let e = Store::open(&path).err().unwrap();
        assert!(matches!(e, OpenError::WrongKey(_)), "{e}");
        // No key: refused (not replaced by a new one).
        std::fs::remove_file(&key_file).unwrap();
        assert!(matches!(Store::open(&path), Err(OpenError::KeyMissing(_))));
        assert!(!key_file.exists());
        // One damaged row: that key alone is unusable.
        std::fs::write(&key_file, &good).unwrap();
        std::fs::set_permissions(&key_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        {
            let c = Connection::open(&path).unwrap();
            c.execute("UPDATE access_keys SET secret = replace(secret, 'v1:', 'v1:AA') WHERE access_key = ?1", [&k1.access_key]).unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.key(&k1.access_key).unwrap(), None);
        assert_eq!(s.key(&k2.access_key).unwrap().unwrap(), k2);
        assert_eq!(s.keys().unwrap(), [k2]);
        assert!(s.has_keys().unwrap());
    }

    #[test]
    fn an_exposed_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hearth.db");
        drop(Store::open(&path).unwrap());
        let key_file = SealingKey::path(dir.path());
        std::fs::set_permissions(&key_file, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
        let e = Store::open(&path).err().unwrap();
        assert!(matches!(e, OpenError::SealingKey(SealingKeyError::Exposed { .. })), "{e}");
    }
}
