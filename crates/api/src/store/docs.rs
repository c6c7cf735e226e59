//! Documents of the AWS-compatible resources the daemon keeps beside the Lambda MicroVMs
//! API's own ([`crate::aws`]): IAM roles and their policies, STS sessions, secrets and
//! KMS keys. One table keyed by (kind, account, name) holding each resource as JSON, so a
//! new resource kind needs no schema change and a second back end implements four
//! methods. Sensitive fields (secret values, key material, session secrets) are sealed by
//! their owner before they reach the store.

use super::sqlite::DbResult;
use super::Store;
use rusqlite::OptionalExtension;

/// The table, created with the others.
pub(super) const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS docs (kind TEXT NOT NULL, account TEXT NOT NULL, name TEXT NOT NULL, doc TEXT NOT NULL, PRIMARY KEY (kind, account, name));";

impl Store {
    /// Writes document `kind`/`account`/`name`. With `create_only`, writes it only when
    /// there is none yet, and says whether it did.
    pub fn put_doc(&self, kind: &str, account: &str, name: &str, doc: &str, create_only: bool) -> DbResult<bool> {
        let sql = if create_only {
            "INSERT OR IGNORE INTO docs (kind, account, name, doc) VALUES (?1, ?2, ?3, ?4)"
        } else {
            "INSERT OR REPLACE INTO docs (kind, account, name, doc) VALUES (?1, ?2, ?3, ?4)"
        };
        Ok(self.db().execute(sql, [kind, account, name, doc])? > 0)
    }

    /// Document `kind`/`account`/`name`.
    pub fn doc(&self, kind: &str, account: &str, name: &str) -> DbResult<Option<String>> {
        self.db()
            .query_row("SELECT doc FROM docs WHERE kind = ?1 AND account = ?2 AND name = ?3", [kind, account, name], |r| r.get(0))
            .optional()
    }

    /// `account`'s documents of `kind` whose name starts with `prefix`, by name.
    pub fn docs(&self, kind: &str, account: &str, prefix: &str) -> DbResult<Vec<(String, String)>> {
        let db = self.db();
        let mut st =
            db.prepare("SELECT name, doc FROM docs WHERE kind = ?1 AND account = ?2 AND substr(name, 1, length(?3)) = ?3 ORDER BY name")?;
        let rows = st.query_map([kind, account, prefix], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect()
    }

    /// Deletes document `kind`/`account`/`name`; false when there was none.
    pub fn delete_doc(&self, kind: &str, account: &str, name: &str) -> DbResult<bool> {
        Ok(self.db().execute("DELETE FROM docs WHERE kind = ?1 AND account = ?2 AND name = ?3", [kind, account, name])? > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_round_trip_per_kind_and_account() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db")).unwrap();
        assert!(s.put_doc("role", "111111111111", "a", "{}", true).unwrap());
        assert!(!s.put_doc("role", "111111111111", "a", "{\"x\":1}", true).unwrap(), "create_only keeps the first");
        assert_eq!(s.doc("role", "111111111111", "a").unwrap().as_deref(), Some("{}"));
        assert!(s.doc("role", "222222222222", "a").unwrap().is_none(), "another account's is not seen");
        assert!(s.doc("secret", "111111111111", "a").unwrap().is_none(), "another kind's is not seen");
        s.put_doc("role", "111111111111", "ab", "{}", false).unwrap();
        s.put_doc("role", "111111111111", "b", "{}", false).unwrap();
        let names: Vec<String> = s.docs("role", "111111111111", "a").unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["a", "ab"]);
        // `%` and `_` in a prefix are not patterns.
        assert!(s.docs("role", "111111111111", "%").unwrap().is_empty());
        assert!(s.delete_doc("role", "111111111111", "a").unwrap());
        assert!(!s.delete_doc("role", "111111111111", "a").unwrap());
    }
}
