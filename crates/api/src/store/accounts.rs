//! Per-account settings the operator sets with `hearth accounts` (tenants cannot change
//! them): where the account may name `file://` code artifacts, its quotas and its request
//! rate.

use super::sqlite::{from_doc, to_doc};
use super::{DbResult, Store};
use rusqlite::OptionalExtension;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The table, created with the others.
pub(super) const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS accounts (account TEXT PRIMARY KEY, doc TEXT NOT NULL);";

/// What the operator allows one account.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccountSettings {
    /// The directory beneath which the account may name `file://` code artifacts; none
    /// (the default) refuses every `file://` artifact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_root: Option<PathBuf>,
    /// Quotas the operator set for this account (the rest are the defaults).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub quotas: crate::quota::Overrides,
    /// The account's request rate; none: the daemon's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<crate::ratelimit::Rate>,
}

impl Store {
    /// The settings of `account` (the defaults when the operator set none).
    pub fn account_settings(&self, account: &str) -> DbResult<AccountSettings> {
        let doc: Option<String> =
            self.reader().query_row("SELECT doc FROM accounts WHERE account = ?1", [account], |r| r.get(0)).optional()?;
        doc.map_or(Ok(AccountSettings::default()), from_doc)
    }

    /// Replaces the settings of `account`.
    pub fn set_account_settings(&self, account: &str, s: &AccountSettings) -> DbResult<()> {
        self.db().execute("INSERT OR REPLACE INTO accounts (account, doc) VALUES (?1, ?2)", [account, &to_doc(s)])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_default_to_nothing_allowed_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        assert_eq!(store.account_settings("123456789012").unwrap(), AccountSettings::default());
        let s = AccountSettings {
            artifact_root: Some("/srv/artifacts".into()),
            quotas: [(crate::quota::Quota::Microvms, 3)].into(),
            rate_limit: Some(crate::ratelimit::Rate { per_second: 1.5, burst: 3 }),
        };
        store.set_account_settings("123456789012", &s).unwrap();
        assert_eq!(store.account_settings("123456789012").unwrap(), s);
        assert_eq!(store.account_settings("000000000000").unwrap(), AccountSettings::default());
    }

    /// On a multi-threaded runtime the trait's calls run inside `block_in_place`, and a
    /// write is seen at once by the reading connection.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_trait_runs_off_the_workers_and_reads_see_writes() {
        use crate::store::MetadataStore;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let s = AccountSettings { artifact_root: Some("/srv/a".into()), ..Default::default() };
        store.set_account_settings("123456789012", &s).unwrap();
        assert_eq!(MetadataStore::account_settings(&store, "123456789012").await.unwrap(), s);
        let tags = [("k".to_owned(), "v".to_owned())];
        MetadataStore::tag(&store, "arn:x", &tags).await.unwrap();
        assert_eq!(MetadataStore::tags(&store, "arn:x").await.unwrap(), tags);
    }
}
