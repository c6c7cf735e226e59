//! A secret as stored, and the rules on its versions and their stages, apart from the
//! operations ([`super::secrets`]) so they can be tested without a store.
//!
//! Each version's value is sealed under the secret's KMS key material with the account,
//! the secret's ARN, the version id and the value's kind as associated data
//! ([`value_aad`]): a ciphertext copied onto another version, secret or account does not
//! open.

use crate::aws::AwsError;
use base64::Engine;
use serde::{Deserialize, Serialize};

/// Secrets Manager's stage of the current version.
pub const CURRENT: &str = "AWSCURRENT";
/// The stage of the version that was current before.
pub const PREVIOUS: &str = "AWSPREVIOUS";
/// Most versions a secret keeps.
pub const MAX_VERSIONS: usize = 100;
/// The most stages on one version (as AWS).
const MAX_STAGES: usize = 20;

/// A secret as stored (kind `secret`, named by its name).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretDoc {
    /// `arn:aws:secretsmanager:hh-local-1:<account>:secret:<name>-<6 random>`.
    pub arn: String,
    /// Its name.
    pub name: String,
    /// Its account.
    pub account: String,
    /// Description.
    pub description: Option<String>,
    /// `KmsKeyId` as the tenant gave it (None: the default key `aws/secretsmanager`).
    pub kms_key_id: Option<String>,
    /// The ARN of the key its values are sealed under.
    pub key_arn: String,
    /// Seconds since the epoch.
    pub created: f64,
    /// Last change.
    pub last_changed: f64,
    /// Last read (a day's start, as AWS records it).
    pub last_accessed: Option<f64>,
    /// When DeleteSecret was called.
    pub deleted: Option<f64>,
    /// When it is purged.
    pub deletion: Option<f64>,
    /// Tags, in order.
    pub tags: Vec<(String, String)>,
    /// Versions with at least one stage, oldest first.
    pub versions: Vec<VersionDoc>,
}

/// One version.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VersionDoc {
    /// Its id (ClientRequestToken).
    pub id: String,
    /// Its stages.
    pub stages: Vec<String>,
    /// Seconds since the epoch.
    pub created: f64,
    /// SecretBinary rather than SecretString.
    pub binary: bool,
    /// The value sealed ([`crate::at_rest::seal`]), base64.
    pub value: String,
}

/// The associated data of a version's value.
pub fn value_aad(account: &str, arn: &str, version: &str, binary: bool) -> Vec<u8> {
    format!("secretsmanager\0{account}\0{arn}\0{version}\0{}", if binary { "b" } else { "s" }).into_bytes()
}

impl SecretDoc {
    /// Seals `plain` as version `id`'s value under `key`.
    pub fn seal(&self, key: &[u8; 32], id: &str, binary: bool, plain: &[u8]) -> String {
        let sealed = crate::at_rest::seal(key, &value_aad(&self.account, &self.arn, id, binary), plain);
        base64::engine::general_purpose::STANDARD.encode(sealed)
    }

    /// Opens version `v`'s value under `key`.
    ///
    /// # Errors
    ///
    /// DecryptionFailure when it does not open (another key, moved, damaged); the
    /// message names the secret, never the value.
    pub fn open(&self, key: &[u8; 32], v: &VersionDoc) -> Result<Vec<u8>, AwsError> {
        let fail = || AwsError::bad("DecryptionFailure", format!("the value of version {} of secret {} does not decrypt", v.id, self.name));
        let sealed = base64::engine::general_purpose::STANDARD.decode(&v.value).map_err(|_| fail())?;
        crate::at_rest::open(key, &value_aad(&self.account, &self.arn, &v.id, v.binary), &sealed).map_err(|_| fail())
    }

    /// The version with `id`.
    pub fn version(&self, id: &str) -> Option<&VersionDoc> {
        self.versions.iter().find(|v| v.id == id)
    }

    /// The version holding `stage`.
    pub fn staged(&self, stage: &str) -> Option<&VersionDoc> {
        self.versions.iter().find(|v| v.stages.iter().any(|s| s == stage))
    }

    /// Adds version `v` with `stages` (AWSCURRENT when none are given): each stage moves
    /// to it from the version that held it; a new AWSCURRENT makes the old one
    /// AWSPREVIOUS (the older AWSPREVIOUS loses its stage). Versions left without a stage
    /// are dropped (AWS keeps them as deprecated; Hearth keeps no value nobody can name).
    ///
    /// # Errors
    ///
    /// InvalidParameterException for a bad stage list.
    pub fn add_version(&mut self, mut v: VersionDoc, stages: Option<Vec<String>>) -> Result<(), AwsError> {
        let stages = stages.unwrap_or_else(|| vec![CURRENT.to_owned()]);
        if stages.is_empty() || stages.len() > MAX_STAGES || stages.iter().any(|s| s.is_empty() || s.len() > 256) {
            return Err(AwsError::bad(
                "InvalidParameterException",
                format!("VersionStages takes 1 to {MAX_STAGES} stages of 1 to 256 characters"),
            ));
        }
        if stages.iter().any(|s| s == CURRENT) {
            let old = self.staged(CURRENT).map(|o| o.id.clone());
            if let Some(old) = old.filter(|o| *o != v.id) {
                for x in &mut self.versions {
                    x.stages.retain(|s| s != PREVIOUS);
                    if x.id == old {
                        x.stages.retain(|s| s != CURRENT);
                        x.stages.push(PREVIOUS.to_owned());
                    }
                }
            }
        }
        for x in &mut self.versions {
            x.stages.retain(|s| !stages.contains(s));
        }
        v.stages = stages;
        v.stages.dedup();
        // At most MAX_VERSIONS kept (AWS keeps about 100): past it a new version is
        // refused, so custom stages cannot grow one secret without bound.
        if self.versions.len() >= MAX_VERSIONS {
            return Err(AwsError::bad(
                "LimitExceededException",
                format!("a secret keeps at most {MAX_VERSIONS} versions that hold a stage; move or remove stages of older versions first"),
            ));
        }
        self.versions.push(v);
        self.versions.retain(|x| !x.stages.is_empty());
        Ok(())
    }
}

/// True for a name Secrets Manager takes: 1-512 of `[A-Za-z0-9/_+=.@-]`.
pub fn valid_name(name: &str) -> bool {
    (1..=512).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"/_+=.@-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> SecretDoc {
        SecretDoc {
            arn: "arn:aws:secretsmanager:hh-local-1:111111111111:secret:db-AbCdEf".into(),
            name: "db".into(),
            account: "111111111111".into(),
            description: None,
            kms_key_id: None,
            key_arn: String::new(),
            created: 0.0,
            last_changed: 0.0,
            last_accessed: None,
            deleted: None,
            deletion: None,
            tags: vec![],
            versions: vec![],
        }
    }

    fn version(d: &SecretDoc, key: &[u8; 32], id: &str, plain: &str) -> VersionDoc {
        VersionDoc { id: id.into(), stages: vec![], created: 0.0, binary: false, value: d.seal(key, id, false, plain.as_bytes()) }
    }

    fn stages(d: &SecretDoc) -> Vec<(String, Vec<String>)> {
        d.versions.iter().map(|v| (v.id.clone(), v.stages.clone())).collect()
    }

    #[test]
    fn versions_move_through_current_and_previous() {
        let k = [3u8; 32];
        let mut d = doc();
        d.add_version(version(&d, &k, "v1", "one"), None).unwrap();
        d.add_version(version(&d, &k, "v2", "two"), None).unwrap();
        assert_eq!(stages(&d), vec![("v1".into(), vec![PREVIOUS.into()]), ("v2".into(), vec![CURRENT.into()])]);
        d.add_version(version(&d, &k, "v3", "three"), None).unwrap();
        // v1 lost its stage and is gone; v2 is previous.
        assert_eq!(stages(&d), vec![("v2".into(), vec![PREVIOUS.into()]), ("v3".into(), vec![CURRENT.into()])]);
        // A custom stage leaves AWSCURRENT where it is.
        d.add_version(version(&d, &k, "v4", "four"), Some(vec!["AWSPENDING".into()])).unwrap();
        assert_eq!(d.staged(CURRENT).unwrap().id, "v3");
        assert_eq!(d.open(&k, d.staged("AWSPENDING").unwrap()).unwrap(), b"four");
        assert!(d.add_version(version(&d, &k, "v5", "x"), Some(vec![String::new()])).is_err());
    }

    #[test]
    fn a_value_moved_to_another_version_or_secret_does_not_open() {
        let k = [3u8; 32];
        let mut d = doc();
        d.add_version(version(&d, &k, "v1", "s3cret"), None).unwrap();
        d.add_version(version(&d, &k, "v2", "other"), None).unwrap();
        let stolen = d.versions[0].value.clone();
        assert_eq!(d.open(&k, &d.versions[0]).unwrap(), b"s3cret");
        let mut moved = d.versions[1].clone();
        moved.value = stolen.clone();
        assert_eq!(d.open(&k, &moved).unwrap_err().code, "DecryptionFailure");
        let mut other = doc();
        other.arn = "arn:aws:secretsmanager:hh-local-1:111111111111:secret:db2-XyZxYz".into();
        assert!(other.open(&k, &d.versions[0]).is_err());
        let mut acct = doc();
        acct.account = "222222222222".into();
        assert!(acct.open(&k, &d.versions[0]).is_err());
        assert!(d.open(&[4u8; 32], &d.versions[0]).is_err(), "another key");
        let e = d.open(&[4u8; 32], &d.versions[0]).unwrap_err();
        assert!(!e.message.contains("s3cret"));
    }

    #[test]
    fn names_follow_the_service() {
        assert!(valid_name("prod/db+x=y.z@w-1_"));
        assert!(!valid_name(""));
        assert!(!valid_name("a b"));
        assert!(!valid_name(&"a".repeat(513)));
        assert!(!valid_name("a\u{e9}"));
    }
}
