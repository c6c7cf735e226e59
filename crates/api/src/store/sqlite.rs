//! The SQLite store: one database (`$HEARTH_HOME/api/hearth.db`, WAL, synchronous=NORMAL).
//! Records are JSON documents beside the columns that queries need; every change is one
//! transaction.
//!
//! Two connections, each behind its own mutex: one writes, one reads. In WAL mode readers
//! never wait for the writer, so a GetMicrovm does not queue behind a launch's commit.
//! `synchronous=NORMAL` makes a commit an append to the WAL without an fsync (the WAL is
//! synced at checkpoints): a commit survives the daemon's crash, and only the host's own
//! crash may lose the last ones, when every microvm they describe is gone with it (the
//! daemon reconciles on start). FULL fsynced the WAL at every commit, several per launch,
//! each on a request's path.
//!
//! The calls are synchronous (the CLI's `hearth keys` and `hearth accounts` use the same
//! inherent methods); behind [`super::MetadataStore`] (`sqlite_trait.rs`) each runs inside
//! `tokio::task::block_in_place` on a multi-threaded runtime, so a call waiting for a
//! lock or the disk hands the worker's other tasks to another thread instead of stalling
//! them. The future is ready when it is returned, the call having run, as before.
//!
//! Access keys' secrets are sealed under the key in the same directory ([`crate::keys`]),
//! and opened on lookup. The schema is versioned (`PRAGMA user_version`, [`SCHEMA_VERSION`]):
//! opening a database brings it up to date step by step, seals secrets an older version
//! stored in plain text, and refuses a database written by a newer version.

use super::{AccessKey, ImageRecord, Meter, MicrovmRecord, Usage, VersionRecord};
use crate::keys::{SealingKey, SealingKeyError};
use crate::lifecycle::MicrovmState;
use rusqlite::{params, Connection, OptionalExtension};
use serde::{de::DeserializeOwned, Serialize};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A database error.
pub type DbResult<T> = Result<T, rusqlite::Error>;

/// The schema's version (`PRAGMA user_version`); `migrate` brings older ones up to it.
pub const SCHEMA_VERSION: i64 = 1;

/// The database.
pub struct Store {
    conn: Mutex<Connection>,
    /// A second connection for reads (`query_only`), which in WAL mode do not wait for
    /// the writer.
    read: Mutex<Connection>,
    sealing: SealingKey,
}

/// A failure to open the store.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// SQLite failed.
    #[error(transparent)]
    Db(#[from] rusqlite::Error),
    /// The sealing key file cannot be used.
    #[error(transparent)]
    SealingKey(#[from] SealingKeyError),
    /// Secrets are sealed, but their key file is gone.
    #[error(
        "the secrets key {0} is missing, but the database holds sealed secrets: restore the file \
         from a backup (without it no access key works)"
    )]
    KeyMissing(PathBuf),
    /// The key file opens none of the sealed secrets.
    #[error("the secrets key {0} opens none of the database's secrets: it is not the key they were sealed with; restore the right file")]
    WrongKey(PathBuf),
    /// A newer Hearth wrote the database.
    #[error("the database has schema version {found}, newer than this Hearth's {known}: run the newer Hearth")]
    NewerSchema {
        /// The database's version.
        found: i64,
        /// The newest this build knows.
        known: i64,
    },
}

/// Creates the API's state directory, or restricts an existing one, to its owner (0700):
/// it holds the database, the secrets key and the endpoint token key.
///
/// # Errors
///
/// When the directory cannot be created or its mode set.
pub fn create_state_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
}

/// Brings the schema up to [`SCHEMA_VERSION`], one step per version, in one transaction
/// (another process opening the database meanwhile waits, then finds it done).
fn migrate(conn: &mut Connection) -> Result<(), OpenError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let found: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > SCHEMA_VERSION {
        return Err(OpenError::NewerSchema { found, known: SCHEMA_VERSION });
    }
    if found < 1 {
        super::idempotency::migrate_to_1(&tx, crate::clock::now())?;
    }
    if found < SCHEMA_VERSION {
        tx.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))?;
    }
    tx.commit()?;
    Ok(())
}

pub(super) fn to_doc<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("records serialize")
}

pub(super) fn from_doc<T: DeserializeOwned>(s: String) -> DbResult<T> {
    serde_json::from_str(&s).map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)))
}

fn put_microvm(db: &Connection, m: &MicrovmRecord) -> DbResult<()> {
    let seq: i64 = db
        .query_row("SELECT seq FROM microvms WHERE id = ?1", [&m.microvm_id], |r| r.get(0))
        .optional()?
        .map_or_else(|| db.query_row("SELECT COALESCE(MAX(seq), 0) + 1 FROM microvms", [], |r| r.get(0)), Ok)?;
    db.execute(
        "INSERT OR REPLACE INTO microvms (id, account, seq, state, doc) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![m.microvm_id, m.account, seq, m.state.as_str(), to_doc(m)],
    )?;
    Ok(())
}

impl Store {
    /// Opens (creating) the database at `path`, with its sealing key in the same directory
    /// ([`crate::keys::SEALING_KEY_FILE`], created with the database).
    ///
    /// # Errors
    ///
    /// SQLite's; a key file that is exposed, malformed, missing or not the database's
    /// ([`OpenError`]); a database of a newer version.
    pub fn open(path: &Path) -> Result<Store, OpenError> {
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        // Owner only from its first byte (SQLite gives the WAL the database's mode).
        let _ = std::fs::OpenOptions::new().write(true).create(true).truncate(false).mode(0o600).open(path);
        let mut conn = Connection::open(path)?;
        let _ = std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600));
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=NORMAL;
             PRAGMA busy_timeout=5000;
             PRAGMA secure_delete=ON;
             CREATE TABLE IF NOT EXISTS access_keys (access_key TEXT PRIMARY KEY, secret TEXT NOT NULL, account TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS microvms (id TEXT PRIMARY KEY, account TEXT NOT NULL, seq INTEGER NOT NULL, state TEXT NOT NULL, doc TEXT NOT NULL);
             CREATE INDEX IF NOT EXISTS microvms_by_account ON microvms(account, seq);
             CREATE TABLE IF NOT EXISTS images (account TEXT NOT NULL, name TEXT NOT NULL, doc TEXT NOT NULL, PRIMARY KEY (account, name));
             CREATE TABLE IF NOT EXISTS image_versions (account TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL, doc TEXT NOT NULL, PRIMARY KEY (account, name, version));
             CREATE TABLE IF NOT EXISTS tags (arn TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (arn, key));
             CREATE TABLE IF NOT EXISTS idempotency (account TEXT NOT NULL, operation TEXT NOT NULL, token TEXT NOT NULL, request_hash TEXT NOT NULL, response TEXT NOT NULL, PRIMARY KEY (account, operation, token));
             CREATE TABLE IF NOT EXISTS usage (account TEXT NOT NULL, microvm_id TEXT NOT NULL, kind TEXT NOT NULL, start REAL NOT NULL, end REAL, vcpus INTEGER NOT NULL, memory_mib INTEGER NOT NULL, bytes INTEGER NOT NULL DEFAULT 0);
             CREATE INDEX IF NOT EXISTS usage_by_account ON usage(account, start);",
        )?;
        conn.execute_batch(super::accounts::SCHEMA)?;
        conn.execute_batch(super::connectors::SCHEMA)?;
        conn.execute_batch(super::docs::SCHEMA)?;
        migrate(&mut conn)?;
        let sealing = super::sealing::sealing_key(&mut conn, dir)?;
        let read = Connection::open(path)?;
        read.execute_batch("PRAGMA busy_timeout=5000; PRAGMA query_only=ON;")?;
        Ok(Store { conn: Mutex::new(conn), read: Mutex::new(read), sealing })
    }

    pub(super) fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The reading connection (statements that change nothing).
    pub(super) fn reader(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.read.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The key with its secret opened; `None` (logged) when the secret does not open: the
    /// key is then unusable, and requests signed with it fail authentication.
    fn unsealed(&self, access_key: String, stored: &str, account: String) -> Option<AccessKey> {
        match self.sealing.open(&access_key, stored) {
            Ok(secret) => Some(AccessKey { access_key, secret, account }),
            Err(e) => {
                tracing::error!(%access_key, "access key unusable: {e}");
                None
            }
        }
    }

    /// Every usable access key.
    pub fn keys(&self) -> DbResult<Vec<AccessKey>> {
        let db = self.reader();
        let mut st = db.prepare("SELECT access_key, secret, account FROM access_keys ORDER BY rowid")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))?;
        let rows: Vec<_> = rows.collect::<DbResult<_>>()?;
        Ok(rows.into_iter().filter_map(|(id, stored, account)| self.unsealed(id, &stored, account)).collect())
    }

    /// True when any access key exists (usable or not).
    pub fn has_keys(&self) -> DbResult<bool> {
        self.reader().query_row("SELECT EXISTS (SELECT 1 FROM access_keys)", [], |r| r.get(0))
    }

    /// The key with id `access_key`, its secret opened (`None` also when it does not open).
    pub fn key(&self, access_key: &str) -> DbResult<Option<AccessKey>> {
        let row = self
            .reader()
            .query_row("SELECT access_key, secret, account FROM access_keys WHERE access_key = ?1", [access_key], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
            })
            .optional()?;
        Ok(row.and_then(|(id, stored, account)| self.unsealed(id, &stored, account)))
    }

    /// Adds a key (its secret sealed).
    pub fn add_key(&self, k: &AccessKey) -> DbResult<()> {
        let sealed = self.sealing.seal(&k.access_key, &k.secret);
        self.db().execute(
            "INSERT INTO access_keys (access_key, secret, account) VALUES (?1, ?2, ?3)",
            params![k.access_key, sealed, k.account],
        )?;
        Ok(())
    }

    /// Inserts or replaces a microvm.
    pub fn put_microvm(&self, m: &MicrovmRecord) -> DbResult<()> {
        put_microvm(&self.db(), m)
    }

    /// A microvm's change of state: its record and the usage meter's change, in one
    /// transaction.
    pub fn put_microvm_metered(&self, m: &MicrovmRecord, meter: Meter, now: f64) -> DbResult<()> {
        let mut db = self.db();
        let tx = db.transaction()?;
        put_microvm(&tx, m)?;
        if meter.close {
            tx.execute("UPDATE usage SET end = ?2 WHERE microvm_id = ?1 AND end IS NULL", params![m.microvm_id, now])?;
        }
        if let Some((kind, bytes)) = meter.open {
            tx.execute(
                "INSERT INTO usage (account, microvm_id, kind, start, vcpus, memory_mib, bytes) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![m.account, m.microvm_id, kind.as_str(), now, m.vcpus, m.memory_mib, bytes as i64],
            )?;
        }
        tx.commit()
    }

    /// Records activity on a microvm (one field, so it never overwrites a concurrent
    /// state change).
    pub fn touch(&self, id: &str, t: f64) -> DbResult<()> {
        self.db().execute("UPDATE microvms SET doc = json_set(doc, '$.lastActivity', ?2) WHERE id = ?1", params![id, t])?;
        Ok(())
    }

    /// Sets one member of a microvm's `spec` (one field, as `touch`).
    pub fn set_spec_field(&self, id: &str, key: &str, value: &serde_json::Value) -> DbResult<()> {
        let path = format!("$.spec.{key}");
        self.db().execute("UPDATE microvms SET doc = json_set(doc, ?2, json(?3)) WHERE id = ?1", params![id, path, value.to_string()])?;
        Ok(())
    }

    /// A microvm of `account`.
    pub fn microvm(&self, account: &str, id: &str) -> DbResult<Option<MicrovmRecord>> {
        let doc: Option<String> =
            self.reader().query_row("SELECT doc FROM microvms WHERE id = ?1 AND account = ?2", [id, account], |r| r.get(0)).optional()?;
        doc.map(from_doc).transpose()
    }

    /// A page of `account`'s microvms after position `after`, `limit` long; returns the
    /// records and the position of the last one.
    pub fn list_microvms(&self, account: &str, after: i64, limit: usize) -> DbResult<Vec<(i64, MicrovmRecord)>> {
        let db = self.reader();
        let mut st = db.prepare("SELECT seq, doc FROM microvms WHERE account = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3")?;
        let rows = st.query_map(params![account, after, limit as i64], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
        rows.map(|r| r.and_then(|(s, d)| Ok((s, from_doc(d)?)))).collect()
    }

    /// Every microvm not TERMINATED (all tenants).
    pub fn live_microvms(&self) -> DbResult<Vec<MicrovmRecord>> {
        let db = self.reader();
        let mut st = db.prepare("SELECT doc FROM microvms WHERE state != 'TERMINATED' ORDER BY seq")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        rows.map(|r| r.and_then(from_doc)).collect()
    }

    /// Counts microvms by state (all tenants).
    pub fn count_by_state(&self) -> DbResult<Vec<(String, i64)>> {
        let db = self.reader();
        let mut st = db.prepare("SELECT state, COUNT(*) FROM microvms GROUP BY state")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect()
    }

    /// Inserts or replaces an image.
    pub fn put_image(&self, i: &ImageRecord) -> DbResult<()> {
        self.db()
            .execute("INSERT OR REPLACE INTO images (account, name, doc) VALUES (?1, ?2, ?3)", params![i.account, i.name, to_doc(i)])?;
        Ok(())
    }

    /// An image.
    pub fn image(&self, account: &str, name: &str) -> DbResult<Option<ImageRecord>> {
        let doc: Option<String> =
            self.reader().query_row("SELECT doc FROM images WHERE account = ?1 AND name = ?2", [account, name], |r| r.get(0)).optional()?;
        doc.map(from_doc).transpose()
    }

    /// `account`'s images, by name.
    pub fn images(&self, account: &str) -> DbResult<Vec<ImageRecord>> {
        let db = self.reader();
        let mut st = db.prepare("SELECT doc FROM images WHERE account = ?1 ORDER BY name")?;
        let rows = st.query_map([account], |r| r.get::<_, String>(0))?;
        rows.map(|r| r.and_then(from_doc)).collect()
    }

    /// Removes an image and its versions.
    pub fn delete_image(&self, account: &str, name: &str) -> DbResult<()> {
        let mut db = self.db();
        let tx = db.transaction()?;
        tx.execute("DELETE FROM images WHERE account = ?1 AND name = ?2", [account, name])?;
        tx.execute("DELETE FROM image_versions WHERE account = ?1 AND name = ?2", [account, name])?;
        tx.commit()
    }

    /// Inserts or replaces a version.
    pub fn put_version(&self, v: &VersionRecord) -> DbResult<()> {
        self.db().execute(
            "INSERT OR REPLACE INTO image_versions (account, name, version, doc) VALUES (?1, ?2, ?3, ?4)",
            params![v.account, v.name, v.version, to_doc(v)],
        )?;
        Ok(())
    }

    /// The versions of an image, oldest first.
    pub fn versions(&self, account: &str, name: &str) -> DbResult<Vec<VersionRecord>> {
        let db = self.reader();
        let mut st = db.prepare("SELECT doc FROM image_versions WHERE account = ?1 AND name = ?2 ORDER BY version")?;
        let rows = st.query_map([account, name], |r| r.get::<_, String>(0))?;
        rows.map(|r| r.and_then(from_doc)).collect()
    }

    /// Versions still PENDING or IN_PROGRESS (all tenants).
    pub fn unfinished_versions(&self) -> DbResult<Vec<VersionRecord>> {
        let db = self.reader();
        let mut st = db.prepare("SELECT doc FROM image_versions")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        let all: Vec<VersionRecord> = rows.map(|r| r.and_then(from_doc)).collect::<DbResult<_>>()?;
        Ok(all.into_iter().filter(|v| v.state.is_building()).collect())
    }

    /// Removes one version.
    pub fn delete_version(&self, account: &str, name: &str, version: u32) -> DbResult<()> {
        self.db()
            .execute("DELETE FROM image_versions WHERE account = ?1 AND name = ?2 AND version = ?3", params![account, name, version])?;
        Ok(())
    }

    /// Tags of a resource.
    pub fn tags(&self, arn: &str) -> DbResult<Vec<(String, String)>> {
        let db = self.reader();
        let mut st = db.prepare("SELECT key, value FROM tags WHERE arn = ?1 ORDER BY key")?;
        let rows = st.query_map([arn], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect()
    }

    /// Sets tags (one transaction).
    pub fn tag(&self, arn: &str, tags: &[(String, String)]) -> DbResult<()> {
        let mut db = self.db();
        let tx = db.transaction()?;
        for (k, v) in tags {
            tx.execute("INSERT OR REPLACE INTO tags (arn, key, value) VALUES (?1, ?2, ?3)", params![arn, k, v])?;
        }
        tx.commit()
    }

    /// Removes tags.
    pub fn untag(&self, arn: &str, keys: &[String]) -> DbResult<()> {
        let mut db = self.db();
        let tx = db.transaction()?;
        for k in keys {
            tx.execute("DELETE FROM tags WHERE arn = ?1 AND key = ?2", params![arn, k])?;
        }
        tx.commit()
    }

    /// Usage of `account` between `from` and `to` (seconds since the epoch): vCPU-seconds
    /// and GiB-seconds while running, snapshot GiB-hours while suspended.
    pub fn usage(&self, account: &str, from: f64, to: f64, now: f64) -> DbResult<Usage> {
        let db = self.reader();
        let mut st = db.prepare("SELECT kind, start, COALESCE(end, ?4), vcpus, memory_mib, bytes FROM usage WHERE account = ?1 AND start < ?3 AND COALESCE(end, ?4) > ?2")?;
        let rows = st.query_map(params![account, from, to, now], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, f64>(1)?,
                r.get::<_, f64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })?;
        let mut u = Usage::default();
        for r in rows {
            let (kind, start, end, vcpus, mem, bytes) = r?;
            let secs = (end.min(to) - start.max(from)).max(0.0);
            if kind == MicrovmState::Running.as_str() {
                u.vcpu_seconds += secs * vcpus as f64;
                u.gib_seconds += secs * mem as f64 / 1024.0;
            } else {
                u.snapshot_gib_hours += secs / 3600.0 * bytes as f64 / (1u64 << 30) as f64;
            }
        }
        Ok(u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mvm(id: &str, account: &str) -> MicrovmRecord {
        MicrovmRecord {
            microvm_id: id.into(),
            account: account.into(),
            image_name: "img".into(),
            image_version: 1,
            state: MicrovmState::Running,
            state_reason: None,
            spec: serde_json::json!({}),
            started_at: 0.0,
            terminated_at: None,
            last_activity: 0.0,
            suspended_at: None,
            maximum_duration_in_seconds: 60,
            memory_mib: 1024,
            vcpus: 2,
            vm_dir: None,
        }
    }

    #[test]
    fn tenants_see_only_their_own_and_pages_are_stable() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db")).unwrap();
        for i in 0..5 {
            s.put_microvm(&mvm(&format!("a{i}"), "111111111111")).unwrap();
        }
        s.put_microvm(&mvm("b0", "222222222222")).unwrap();
        assert!(s.microvm("222222222222", "a0").unwrap().is_none());
        let p1 = s.list_microvms("111111111111", 0, 2).unwrap();
        let p2 = s.list_microvms("111111111111", p1.last().unwrap().0, 10).unwrap();
        let ids: Vec<_> = p1.iter().chain(&p2).map(|(_, m)| m.microvm_id.clone()).collect();
        assert_eq!(ids, ["a0", "a1", "a2", "a3", "a4"]);
        // Updating keeps the position.
        let mut m = mvm("a0", "111111111111");
        m.state = MicrovmState::Suspended;
        s.put_microvm(&m).unwrap();
        assert_eq!(s.list_microvms("111111111111", 0, 1).unwrap()[0].1.state, MicrovmState::Suspended);
    }

    #[test]
    fn usage_is_prorated_to_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db")).unwrap();
        let m = mvm("a", "111111111111");
        s.put_microvm_metered(&m, Meter { close: false, open: Some((MicrovmState::Running, 0)) }, 100.0).unwrap();
        let open = Some((MicrovmState::Suspended, 1 << 30));
        s.put_microvm_metered(&m, Meter { close: true, open }, 200.0).unwrap();
        let u = s.usage("111111111111", 150.0, 3800.0, 3800.0).unwrap();
        assert_eq!(u.vcpu_seconds, 100.0);
        assert_eq!(u.gib_seconds, 50.0);
        assert!((u.snapshot_gib_hours - 1.0).abs() < 1e-9);
        assert_eq!(s.usage("222222222222", 0.0, 1e9, 1e9).unwrap(), Usage::default());
    }

    #[test]
    fn the_state_dir_is_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions()) & 0o777;
        let fresh = dir.path().join("a/api");
        create_state_dir(&fresh).unwrap();
        assert_eq!(mode(&fresh), 0o700);
        let old = dir.path().join("old");
        std::fs::create_dir(&old).unwrap();
        std::fs::set_permissions(&old, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        create_state_dir(&old).unwrap();
        assert_eq!(mode(&old), 0o700);
    }

    #[test]
    fn a_database_of_a_newer_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hearth.db");
        drop(Store::open(&path).unwrap());
        Connection::open(&path).unwrap().execute_batch(&format!("PRAGMA user_version = {}", SCHEMA_VERSION + 1)).unwrap();
        assert!(matches!(Store::open(&path), Err(OpenError::NewerSchema { .. })));
    }
}
