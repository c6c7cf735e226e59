//! A KMS-compatible subset (signing name `kms`, JSON 1.1 `TrentService.<Op>`): symmetric
//! keys and their aliases (CreateKey, DescribeKey, ListKeys, CreateAlias, ListAliases) and
//! Encrypt, Decrypt, GenerateDataKey.
//!
//! A key is 32 random bytes of material, sealed with the daemon's sealing key
//! ([`crate::keys::SealingKey`], bound to the account and key id) before it reaches the
//! store; it never leaves the daemon. Secrets Manager encrypts secrets' values under it,
//! and a microvm's `kmsKeyIdentifier` its suspended files ([`Service::kms_key_material`]).
//! Key policies, grants, asymmetric and HMAC keys, multi-Region keys, deletion and
//! rotation are not served: asked for, they are refused, never ignored.

use super::{Service, REGION};
use crate::auth::{authorize, Caller};
use crate::aws::json::{merge_tags, unknown_operation, Input};
use crate::aws::AwsError;
use crate::clock::now;
use crate::error::{ApiError, Kind};
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The store's kind for keys (named by key id).
const KEY: &str = "kms-key";
/// The store's kind for aliases (named `alias/…`).
const ALIAS: &str = "kms-alias";
/// KMS's error for bad input.
const BAD: &str = "ValidationException";
/// The most keys (and aliases) per account.
pub const MAX_KEYS: usize = 100;
/// The alias of the key Secrets Manager uses when a secret names none.
pub const SECRETS_ALIAS: &str = "alias/aws/secretsmanager";
/// The largest Encrypt plain text (as KMS).
const MAX_PLAINTEXT: usize = 4096;

/// A key as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct KeyDoc {
    pub key_id: String,
    pub arn: String,
    pub account: String,
    pub description: String,
    pub created: f64,
    /// AWS-managed (`aws/secretsmanager`) rather than the tenant's.
    pub managed: bool,
    /// The material, sealed ([`crate::keys::SealingKey`]).
    pub material: String,
    #[serde(default)]
    pub tags: Vec<(String, String)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AliasDoc {
    name: String,
    arn: String,
    target: String,
    created: f64,
}

fn key_arn(account: &str, id: &str) -> String {
    format!("arn:aws:kms:{REGION}:{account}:key/{id}")
}

fn alias_arn(account: &str, name: &str) -> String {
    format!("arn:aws:kms:{REGION}:{account}:{name}")
}

fn new_key_id() -> String {
    let h = crate::keys::random_hex(16);
    format!("{}-{}-4{}-a{}-{}", &h[..8], &h[8..12], &h[13..16], &h[17..20], &h[20..32])
}

fn not_found(id: &str) -> AwsError {
    let shown: String = id.chars().take(300).collect();
    AwsError::bad("NotFoundException", format!("Key '{shown}' does not exist"))
}

fn internal(e: impl std::fmt::Display) -> AwsError {
    AwsError::from(ApiError::internal(e))
}

impl Service {
    /// The 32-byte data-encryption material of KMS key `key_id` (key id, key ARN, alias
    /// name `alias/x` or alias ARN) of `account`, and the key's ARN.
    ///
    /// # Errors
    ///
    /// NotFound (a key that does not exist, or another account's); internal when the
    /// material does not open.
    pub async fn kms_key_material(&self, account: &str, key_id: &str) -> Result<(String, [u8; 32]), ApiError> {
        let k = self.find_key(account, key_id).await.map_err(|e| match e.code.as_str() {
            "NotFoundException" => ApiError::new(Kind::NotFound, e.message),
            _ => ApiError::internal(e.message),
        })?;
        let m = self.key_material(&k).map_err(|e| ApiError::internal(e.message))?;
        Ok((k.arn, m))
    }

    /// The key `id` names (key id, key ARN, alias name or alias ARN) in `account`.
    pub(super) async fn find_key(&self, account: &str, id: &str) -> Result<KeyDoc, AwsError> {
        let own = format!("arn:aws:kms:{REGION}:{account}:");
        let local = match id.strip_prefix("arn:") {
            Some(_) => id.strip_prefix(&own).ok_or_else(|| not_found(id))?,
            None => id,
        };
        let key_id = if local.starts_with("alias/") {
            let doc = self.store.doc(ALIAS, account, local).await?.ok_or_else(|| not_found(id))?;
            serde_json::from_str::<AliasDoc>(&doc).map_err(internal)?.target
        } else {
            local.strip_prefix("key/").unwrap_or(local).to_owned()
        };
        if key_id.is_empty() || key_id.len() > 64 {
            return Err(not_found(id));
        }
        let doc = self.store.doc(KEY, account, &key_id).await?.ok_or_else(|| not_found(id))?;
        serde_json::from_str(&doc).map_err(internal)
    }

    /// The key's material, opened.
    pub(super) fn key_material(&self, k: &KeyDoc) -> Result<[u8; 32], AwsError> {
        let sealing =
            crate::keys::SealingKey::load(&self.state).map_err(internal)?.ok_or_else(|| internal("the daemon has no sealing key"))?;
        let b64 = sealing.open(&format!("kms-key:{}:{}", k.account, k.key_id), &k.material).map_err(internal)?;
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64).map_err(internal)?;
        bytes.try_into().map_err(|_| internal("key material of the wrong length"))
    }

    /// Creates a key (its material random, sealed).
    async fn create_key_doc(
        &self,
        account: &str,
        description: &str,
        managed: bool,
        tags: Vec<(String, String)>,
    ) -> Result<KeyDoc, AwsError> {
        if self.store.docs(KEY, account, "").await?.len() >= MAX_KEYS {
            return Err(AwsError::bad("LimitExceededException", format!("an account has at most {MAX_KEYS} keys")));
        }
        // Loaded per use rather than cached: a 32-byte read, next to a database write.
        let sealing =
            crate::keys::SealingKey::load(&self.state).map_err(internal)?.ok_or_else(|| internal("the daemon has no sealing key"))?;
        let key_id = new_key_id();
        let mut raw = crate::keys::random(32);
        let material = sealing.seal(&format!("kms-key:{account}:{key_id}"), &base64::engine::general_purpose::STANDARD.encode(&raw));
        raw.fill(0);
        let k = KeyDoc {
            arn: key_arn(account, &key_id),
            key_id,
            account: account.to_owned(),
            description: description.to_owned(),
            created: now(),
            managed,
            material,
            tags,
        };
        self.store.put_doc(KEY, account, &k.key_id, &serde_json::to_string(&k).map_err(internal)?, true).await?;
        Ok(k)
    }

    /// The AWS-managed key `aws/secretsmanager` of `account`, made on first use.
    pub(super) async fn default_secrets_key(&self, account: &str) -> Result<KeyDoc, AwsError> {
        if let Ok(k) = self.find_key(account, SECRETS_ALIAS).await {
            return Ok(k);
        }
        let k = self
            .create_key_doc(account, "Default key that protects my Secrets Manager data when no other key is defined", true, vec![])
            .await?;
        let alias =
            AliasDoc { name: SECRETS_ALIAS.into(), arn: alias_arn(account, SECRETS_ALIAS), target: k.key_id.clone(), created: now() };
        if self.store.put_doc(ALIAS, account, SECRETS_ALIAS, &serde_json::to_string(&alias).map_err(internal)?, true).await? {
            return Ok(k);
        }
        // Another call made it first: theirs is the one.
        self.store.delete_doc(KEY, account, &k.key_id).await?;
        self.find_key(account, SECRETS_ALIAS).await
    }

    fn key_metadata(k: &KeyDoc) -> Value {
        json!({
            "AWSAccountId": k.account,
            "KeyId": k.key_id,
            "Arn": k.arn,
            "CreationDate": k.created,
            "Enabled": true,
            "Description": k.description,
            "KeyUsage": "ENCRYPT_DECRYPT",
            "KeyState": "Enabled",
            "Origin": "AWS_KMS",
            "KeyManager": if k.managed { "AWS" } else { "CUSTOMER" },
            "CustomerMasterKeySpec": "SYMMETRIC_DEFAULT",
            "KeySpec": "SYMMETRIC_DEFAULT",
            "EncryptionAlgorithms": ["SYMMETRIC_DEFAULT"],
            "MultiRegion": false,
        })
    }

    /// Runs KMS operation `op`.
    ///
    /// # Errors
    ///
    /// KMS's refusals.
    pub async fn kms_call(&self, caller: &Caller, op: &str, v: &Value) -> Result<Value, AwsError> {
        let input = Input::new(v, BAD);
        let account = caller.account.as_str();
        match op {
            "CreateKey" => {
                authorize(self, caller, "kms:CreateKey", "*").await?;
                let refuse = |m: String| AwsError::bad("UnsupportedOperationException", m);
                if let Some(u) = input.str("KeyUsage")?.filter(|u| *u != "ENCRYPT_DECRYPT") {
                    return Err(refuse(format!("KeyUsage {u} is not supported: Hearth's KMS makes ENCRYPT_DECRYPT keys only")));
                }
                for k in ["KeySpec", "CustomerMasterKeySpec"] {
                    if let Some(s) = input.str(k)?.filter(|s| *s != "SYMMETRIC_DEFAULT") {
                        return Err(refuse(format!("{k} {s} is not supported: Hearth's KMS makes SYMMETRIC_DEFAULT keys only")));
                    }
                }
                if let Some(o) = input.str("Origin")?.filter(|o| *o != "AWS_KMS") {
                    return Err(refuse(format!("Origin {o} is not supported: key material is made by the service (AWS_KMS)")));
                }
                if input.get("Policy").is_some() {
                    return Err(refuse("key policies are not supported: the IAM policies of roles govern access to keys".into()));
                }
                if input.bool("MultiRegion")? == Some(true) || input.get("CustomKeyStoreId").is_some() || input.get("XksKeyId").is_some() {
                    return Err(refuse("multi-Region keys and custom key stores are not supported".into()));
                }
                let description = input.str("Description")?.unwrap_or_default();
                if description.chars().count() > 8192 {
                    return Err(input.bad("Description is over 8192 characters"));
                }
                let tags = input.tags("Tags")?.unwrap_or_default();
                let k = self.create_key_doc(account, description, false, tags).await?;
                tracing::info!(account, key = %k.key_id, "kms: key created");
                Ok(json!({ "KeyMetadata": Self::key_metadata(&k) }))
            }
            "DescribeKey" => {
                let k = self.find_key(account, input.req("KeyId")?).await?;
                authorize(self, caller, "kms:DescribeKey", &k.arn).await?;
                Ok(json!({ "KeyMetadata": Self::key_metadata(&k) }))
            }
            "ListKeys" => {
                authorize(self, caller, "kms:ListKeys", "*").await?;
                let keys: Vec<Value> = self
                    .store
                    .docs(KEY, account, "")
                    .await?
                    .into_iter()
                    .filter_map(|(_, d)| serde_json::from_str::<KeyDoc>(&d).ok())
                    .map(|k| json!({ "KeyId": k.key_id, "KeyArn": k.arn }))
                    .collect();
                page(&input, keys, "Keys")
            }
            "CreateAlias" => {
                let name = input.req("AliasName")?;
                let valid = name.len() <= 256
                    && name
                        .strip_prefix("alias/")
                        .is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_alphanumeric() || b"/_-".contains(&b)));
                if !valid {
                    return Err(AwsError::bad(
                        "InvalidAliasNameException",
                        "AliasName must be alias/ followed by 1 to 250 of [a-zA-Z0-9/_-]",
                    ));
                }
                if name.starts_with("alias/aws/") {
                    return Err(AwsError::bad(
                        "InvalidAliasNameException",
                        "aliases beginning with alias/aws/ are reserved for AWS-managed keys",
                    ));
                }
                let target_id = input.req("TargetKeyId")?;
                if target_id.starts_with("alias/") || target_id.contains(":alias/") {
                    return Err(input.bad("TargetKeyId must be a key id or key ARN, not an alias"));
                }
                let k = self.find_key(account, target_id).await?;
                let arn = alias_arn(account, name);
                authorize(self, caller, "kms:CreateAlias", &arn).await?;
                authorize(self, caller, "kms:CreateAlias", &k.arn).await?;
                if self.store.docs(ALIAS, account, "").await?.len() >= MAX_KEYS {
                    return Err(AwsError::bad("LimitExceededException", format!("an account has at most {MAX_KEYS} aliases")));
                }
                let a = AliasDoc { name: name.to_owned(), arn, target: k.key_id, created: now() };
                if !self.store.put_doc(ALIAS, account, name, &serde_json::to_string(&a).map_err(internal)?, true).await? {
                    return Err(AwsError::bad("AlreadyExistsException", format!("An alias with the name {} already exists", a.arn)));
                }
                Ok(json!({}))
            }
            "ListAliases" => {
                authorize(self, caller, "kms:ListAliases", "*").await?;
                let only = match input.str("KeyId")? {
                    Some(id) => Some(self.find_key(account, id).await?.key_id),
                    None => None,
                };
                let aliases: Vec<Value> = self
                    .store
                    .docs(ALIAS, account, "")
                    .await?
                    .into_iter()
                    .filter_map(|(_, d)| serde_json::from_str::<AliasDoc>(&d).ok())
                    .filter(|a| only.as_ref().is_none_or(|k| *k == a.target))
                    .map(|a| json!({ "AliasName": a.name, "AliasArn": a.arn, "TargetKeyId": a.target, "CreationDate": a.created }))
                    .collect();
                page(&input, aliases, "Aliases")
            }
            "TagResource" => {
                let mut k = self.find_key(account, input.req("KeyId")?).await?;
                authorize(self, caller, "kms:TagResource", &k.arn).await?;
                let tags = input.tags("Tags")?.ok_or_else(|| input.bad("Tags is required"))?;
                merge_tags(&mut k.tags, tags, "TagException")?;
                self.store.put_doc(KEY, account, &k.key_id, &serde_json::to_string(&k).map_err(internal)?, false).await?;
                Ok(json!({}))
            }
            "ListResourceTags" => {
                let k = self.find_key(account, input.req("KeyId")?).await?;
                authorize(self, caller, "kms:ListResourceTags", &k.arn).await?;
                let tags: Vec<Value> = k.tags.iter().map(|(a, b)| json!({ "TagKey": a, "TagValue": b })).collect();
                Ok(json!({ "Tags": tags, "Truncated": false }))
            }
            "Encrypt" | "GenerateDataKey" => self.kms_encrypt(caller, op, &input).await,
            "Decrypt" => self.kms_decrypt(caller, &input).await,
            _ => Err(unknown_operation("kms", op)),
        }
    }

    async fn kms_encrypt(&self, caller: &Caller, op: &str, input: &Input<'_>) -> Result<Value, AwsError> {
        let k = self.find_key(&caller.account, input.req("KeyId")?).await?;
        authorize(self, caller, &format!("kms:{op}"), &k.arn).await?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let plain = if op == "Encrypt" {
            let p = b64.decode(input.req("Plaintext")?).map_err(|_| input.bad("Plaintext is not base64"))?;
            if p.is_empty() || p.len() > MAX_PLAINTEXT {
                return Err(input.bad(format!("Plaintext must be 1 to {MAX_PLAINTEXT} bytes")));
            }
            p
        } else {
            let n = match (input.int("NumberOfBytes")?, input.str("KeySpec")?) {
                (Some(n), None) if (1..=1024).contains(&n) => n as usize,
                (None, Some("AES_256")) | (None, None) => 32,
                (None, Some("AES_128")) => 16,
                _ => return Err(input.bad("give NumberOfBytes (1 to 1024) or KeySpec (AES_256, AES_128), not both")),
            };
            crate::keys::random(n)
        };
        let material = self.key_material(&k)?;
        let ctx = context(input)?;
        // The blob names its key (as KMS's does), so Decrypt needs no KeyId.
        let blob = [format!("hhkms1:{}:", k.key_id).into_bytes(), crate::at_rest::seal(&material, ctx.as_bytes(), &plain)].concat();
        let mut out = json!({ "CiphertextBlob": b64.encode(blob), "KeyId": k.arn, "EncryptionAlgorithm": "SYMMETRIC_DEFAULT" });
        if op == "GenerateDataKey" {
            out["Plaintext"] = b64.encode(&plain).into();
        }
        Ok(out)
    }

    async fn kms_decrypt(&self, caller: &Caller, input: &Input<'_>) -> Result<Value, AwsError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let invalid = || AwsError::bad("InvalidCiphertextException", "the ciphertext is not one this service made, or it was altered");
        let blob = b64.decode(input.req("CiphertextBlob")?).map_err(|_| invalid())?;
        let rest = blob.strip_prefix(b"hhkms1:").ok_or_else(invalid)?;
        let colon = rest.iter().position(|b| *b == b':').filter(|n| *n <= 64).ok_or_else(invalid)?;
        let key_id = std::str::from_utf8(&rest[..colon]).map_err(|_| invalid())?;
        let k = self.find_key(&caller.account, key_id).await?;
        if let Some(want) = input.str("KeyId")? {
            if self.find_key(&caller.account, want).await?.key_id != k.key_id {
                return Err(AwsError::bad("IncorrectKeyException", "the ciphertext was encrypted under another key than KeyId"));
            }
        }
        authorize(self, caller, "kms:Decrypt", &k.arn).await?;
        let plain = crate::at_rest::open(&self.key_material(&k)?, context(input)?.as_bytes(), &rest[colon + 1..]).map_err(|_| invalid())?;
        Ok(json!({ "KeyId": k.arn, "Plaintext": b64.encode(plain), "EncryptionAlgorithm": "SYMMETRIC_DEFAULT" }))
    }
}

/// The encryption context, canonical (sorted keys), bound as associated data.
fn context(input: &Input<'_>) -> Result<String, AwsError> {
    match input.get("EncryptionContext") {
        None => Ok(String::new()),
        Some(Value::Object(m)) if m.values().all(Value::is_string) && m.len() <= 64 => {
            let sorted: std::collections::BTreeMap<_, _> = m.iter().collect();
            Ok(serde_json::to_string(&sorted).unwrap_or_default())
        }
        Some(_) => Err(input.bad("EncryptionContext must be a map of strings")),
    }
}

/// A page of `items` (`Limit` 1-1000, `Marker`), KMS's way.
fn page(input: &Input<'_>, items: Vec<Value>, member: &str) -> Result<Value, AwsError> {
    let limit = match input.int("Limit")? {
        None => 100,
        Some(n) if (1..=1000).contains(&n) => n as usize,
        Some(_) => return Err(input.bad("Limit must be 1 to 1000")),
    };
    let start = match input.str("Marker")? {
        None => 0,
        Some(m) => m
            .strip_prefix('m')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| AwsError::bad("InvalidMarkerException", "Marker is not one this service returned"))?,
    };
    let total = items.len();
    let mut out =
        json!({ member: items.into_iter().skip(start).take(limit).collect::<Vec<_>>(), "Truncated": start.saturating_add(limit) < total });
    if start.saturating_add(limit) < total {
        out["NextMarker"] = format!("m{}", start.saturating_add(limit)).into();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids_look_like_kms_ids() {
        let id = new_key_id();
        let re = regex::Regex::new("^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-a[0-9a-f]{3}-[0-9a-f]{12}$").unwrap();
        assert!(re.is_match(&id), "{id}");
        assert_eq!(key_arn("123456789012", &id), format!("arn:aws:kms:hh-local-1:123456789012:key/{id}"));
    }
}
