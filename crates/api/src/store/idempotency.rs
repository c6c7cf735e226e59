//! Idempotency records: a `clientToken`'s claim, then the response its call returned,
//! replayed to retries with the same parameters. A record lives [`IDEMPOTENCY_TTL`] from
//! when it was last written (AWS, too, remembers client tokens for a bounded time; past it
//! the token is new again). Each claim first deletes the expired records through an index on
//! their time, so the table holds about one TTL's worth of calls and pruning costs a range
//! scan of what expired since the last call.

use super::{DbResult, Store};
use rusqlite::params;
use std::time::Duration;

/// How long a `clientToken` is remembered: 8 hours, the longest a microvm may live
/// ([`crate::service::MAX_DURATION`]), so a retry of a launch finds it while it can run.
pub const IDEMPOTENCY_TTL: Duration = Duration::from_secs(8 * 3600);

/// Schema version 1: records carry the time they were written (seconds since the epoch);
/// those of older versions count from the upgrade (`now`).
pub(super) fn migrate_to_1(tx: &rusqlite::Transaction<'_>, now: f64) -> DbResult<()> {
    tx.execute_batch(
        "ALTER TABLE idempotency ADD COLUMN created REAL NOT NULL DEFAULT 0;
         CREATE INDEX IF NOT EXISTS idempotency_by_created ON idempotency(created);",
    )?;
    tx.execute("UPDATE idempotency SET created = ?1", [now])?;
    Ok(())
}

impl Store {
    /// Claims `token` for a call with `hash`: `Ok(None)` when this call now owns it,
    /// `Ok(Some((hash, response)))` when it was claimed before (response empty while that
    /// call is still running) and has not expired.
    pub fn claim(&self, account: &str, op: &str, token: &str, hash: &str) -> DbResult<Option<(String, String)>> {
        self.claim_at(account, op, token, hash, crate::clock::now())
    }

    fn claim_at(&self, account: &str, op: &str, token: &str, hash: &str, now: f64) -> DbResult<Option<(String, String)>> {
        let db = self.db();
        db.execute("DELETE FROM idempotency WHERE created < ?1", [now - IDEMPOTENCY_TTL.as_secs_f64()])?;
        let n = db.execute(
            "INSERT OR IGNORE INTO idempotency (account, operation, token, request_hash, response, created) VALUES (?1, ?2, ?3, ?4, '', ?5)",
            params![account, op, token, hash, now],
        )?;
        if n == 1 {
            return Ok(None);
        }
        db.query_row(
            "SELECT request_hash, response FROM idempotency WHERE account = ?1 AND operation = ?2 AND token = ?3",
            [account, op, token],
            |r| Ok(Some((r.get(0)?, r.get(1)?))),
        )
    }

    /// Releases a claim whose call failed (a retry may run it again).
    pub fn unclaim(&self, account: &str, op: &str, token: &str) -> DbResult<()> {
        self.db().execute(
            "DELETE FROM idempotency WHERE account = ?1 AND operation = ?2 AND token = ?3 AND response = ''",
            [account, op, token],
        )?;
        Ok(())
    }

    /// Records an idempotent call's response (remembered [`IDEMPOTENCY_TTL`] from now).
    pub fn remember(&self, account: &str, op: &str, token: &str, hash: &str, response: &str) -> DbResult<()> {
        self.db().execute(
            "INSERT OR REPLACE INTO idempotency (account, operation, token, request_hash, response, created) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![account, op, token, hash, response, crate::clock::now()],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_replays_until_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db")).unwrap();
        let (a, op) = ("111111111111", "RunMicrovm");
        let t = crate::clock::now();
        assert_eq!(s.claim_at(a, op, "tok", "h1", t).unwrap(), None);
        assert_eq!(s.claim_at(a, op, "tok", "h1", t + 1.0).unwrap(), Some(("h1".into(), String::new())));
        s.remember(a, op, "tok", "h1", "{\"ok\":1}").unwrap();
        let ttl = IDEMPOTENCY_TTL.as_secs_f64();
        assert_eq!(s.claim_at(a, op, "tok", "h1", t + ttl - 60.0).unwrap(), Some(("h1".into(), "{\"ok\":1}".into())));
        // Expired: the token is new again (even with other parameters), and the old row is gone.
        assert_eq!(s.claim_at(a, op, "tok", "h2", t + ttl + 60.0).unwrap(), None);
        let rows: i64 = s.db().query_row("SELECT COUNT(*) FROM idempotency", [], |r| r.get(0)).unwrap();
        assert_eq!(rows, 1);
    }

    #[test]
    fn records_of_an_older_schema_get_a_time_and_still_replay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let c = rusqlite::Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE idempotency (account TEXT NOT NULL, operation TEXT NOT NULL, token TEXT NOT NULL, request_hash TEXT NOT NULL, response TEXT NOT NULL, PRIMARY KEY (account, operation, token));
                 INSERT INTO idempotency VALUES ('111111111111', 'RunMicrovm', 'tok', 'h', '{}');",
            )
            .unwrap();
        }
        let s = Store::open(&path).unwrap();
        let version: i64 = s.db().query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, super::super::SCHEMA_VERSION);
        assert_eq!(s.claim("111111111111", "RunMicrovm", "tok", "h").unwrap(), Some(("h".into(), "{}".into())));
        drop(s);
        // Opening again migrates nothing twice.
        let s = Store::open(&path).unwrap();
        assert_eq!(s.claim("111111111111", "RunMicrovm", "tok", "h").unwrap(), Some(("h".into(), "{}".into())));
    }
}
