//! Named egress connectors (a Hearth extension resource, `/hearth/v1/egress-connectors`):
//! CIDR and domain allow lists that microvms name by ARN in `egressNetworkConnectors`.
//! Tenants' are scoped to their account; the operator's (`hearth connectors set`) are
//! stored under the account [`OPERATOR`] and visible to every account.

use super::sqlite::{from_doc, to_doc};
use super::{DbResult, Store};
use rusqlite::OptionalExtension;
use serde::{Deserialize, Serialize};

/// The table, created with the others.
pub(super) const SCHEMA: &str =
    "CREATE TABLE IF NOT EXISTS egress_connectors (account TEXT NOT NULL, name TEXT NOT NULL, doc TEXT NOT NULL, PRIMARY KEY (account, name));";

/// The owner of operator-wide connectors, in their ARN's account field.
pub const OPERATOR: &str = "hearth";

/// One connector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectorRecord {
    /// Owner: an account, or [`OPERATOR`].
    pub account: String,
    /// Its name (an image name's form).
    pub name: String,
    /// Destinations, `CIDR[:PORT[-PORT]][/tcp|/udp]`, as given (validated).
    pub allow_cidrs: Vec<String>,
    /// Domains, normalised (`example.com`, `*.example.org`).
    pub allow_domains: Vec<String>,
    /// Seconds since the epoch.
    pub created_at: f64,
    /// Last change.
    pub updated_at: f64,
}

impl Store {
    /// Creates or replaces connector `c`.
    pub fn put_connector(&self, c: &ConnectorRecord) -> DbResult<()> {
        self.db().execute(
            "INSERT OR REPLACE INTO egress_connectors (account, name, doc) VALUES (?1, ?2, ?3)",
            [&c.account, &c.name, &to_doc(c)],
        )?;
        Ok(())
    }

    /// Connector `name` of `account`.
    pub fn connector(&self, account: &str, name: &str) -> DbResult<Option<ConnectorRecord>> {
        let doc: Option<String> = self
            .db()
            .query_row("SELECT doc FROM egress_connectors WHERE account = ?1 AND name = ?2", [account, name], |r| r.get(0))
            .optional()?;
        doc.map(from_doc).transpose()
    }

    /// `account`'s connectors by name; every account's with `None`.
    pub fn connectors(&self, account: Option<&str>) -> DbResult<Vec<ConnectorRecord>> {
        let db = self.db();
        let mut st = db.prepare("SELECT doc FROM egress_connectors WHERE ?1 IS NULL OR account = ?1 ORDER BY account, name")?;
        let rows = st.query_map([account], |r| r.get::<_, String>(0))?;
        rows.map(|r| r.and_then(from_doc)).collect()
    }

    /// Deletes connector `name` of `account`; false when there was none.
    pub fn delete_connector(&self, account: &str, name: &str) -> DbResult<bool> {
        Ok(self.db().execute("DELETE FROM egress_connectors WHERE account = ?1 AND name = ?2", [account, name])? > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connectors_round_trip_per_account() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let c = |account: &str, name: &str| ConnectorRecord {
            account: account.into(),
            name: name.into(),
            allow_cidrs: vec!["93.184.0.0/16:443/tcp".into()],
            allow_domains: vec!["example.com".into()],
            created_at: 1.0,
            updated_at: 2.0,
        };
        store.put_connector(&c("123456789012", "web")).unwrap();
        store.put_connector(&c(OPERATOR, "pypi")).unwrap();
        assert_eq!(store.connector("123456789012", "web").unwrap(), Some(c("123456789012", "web")));
        assert_eq!(store.connector("000000000000", "web").unwrap(), None);
        assert_eq!(store.connectors(Some(OPERATOR)).unwrap(), vec![c(OPERATOR, "pypi")]);
        assert_eq!(store.connectors(None).unwrap().len(), 2);
        assert!(store.delete_connector("123456789012", "web").unwrap());
        assert!(!store.delete_connector("123456789012", "web").unwrap());
    }
}
