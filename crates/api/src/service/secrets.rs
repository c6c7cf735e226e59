//! A Secrets Manager-compatible store (signing name `secretsmanager`, JSON 1.1
//! `secretsmanager.<Op>`): CreateSecret, GetSecretValue, PutSecretValue, UpdateSecret,
//! DescribeSecret, ListSecrets, DeleteSecret (with a recovery window), RestoreSecret,
//! TagResource, UntagResource.
//!
//! Values are sealed under the secret's KMS key ([`super::kms`]: the tenant's `KmsKeyId`,
//! or the account's `aws/secretsmanager`, made on first use) before they reach the store
//! ([`super::secrets_doc`]). No value is logged or put in an error message. Reading a
//! secret under a customer key also needs `kms:Decrypt` on that key, as on AWS. Rotation,
//! replication, resource policies and random passwords are not served.

use super::secrets_doc::{valid_name, SecretDoc, VersionDoc, CURRENT};
use super::{Service, REGION};
use crate::auth::{authorize, Caller};
use crate::aws::json::{merge_tags, tags_json, unknown_operation, Input};
use crate::aws::AwsError;
use crate::clock::now;
use base64::Engine;
use serde_json::{json, Value};

/// The store's kind for secrets.
const SECRET: &str = "secret";
/// Secrets Manager's error for bad input.
const BAD: &str = "InvalidParameterException";
/// The largest value (SecretString or SecretBinary), as AWS.
pub const MAX_VALUE: usize = 65_536;
/// The most secrets per account.
pub const MAX_SECRETS: usize = 500;
const DAY: f64 = 86_400.0;

/// Read-modify-write of secrets is serialized: the document table has no compare-and-set,
/// and these calls are rare next to reads.
static WRITES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn not_found() -> AwsError {
    AwsError::bad("ResourceNotFoundException", "Secrets Manager can't find the specified secret.")
}

fn marked_for_deletion(op: &str) -> AwsError {
    AwsError::bad(
        "InvalidRequestException",
        format!("You can't perform this operation ({op}) on the secret because it was marked for deletion."),
    )
}

fn internal(e: impl std::fmt::Display) -> AwsError {
    AwsError::from(crate::error::ApiError::internal(e))
}

fn secret_arn(account: &str, name: &str) -> String {
    const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let suffix: String = crate::keys::random(6).iter().map(|b| ALNUM[(*b % 62) as usize] as char).collect();
    format!("arn:aws:secretsmanager:{REGION}:{account}:secret:{name}-{suffix}")
}

/// SecretString or SecretBinary (base64 on the wire): (binary, bytes).
fn value_of(input: &Input<'_>) -> Result<Option<(bool, Vec<u8>)>, AwsError> {
    let v = match (input.str("SecretString")?, input.str("SecretBinary")?) {
        (Some(_), Some(_)) => return Err(input.bad("give SecretString or SecretBinary, not both")),
        (Some(s), None) => (false, s.as_bytes().to_vec()),
        (None, Some(b)) => {
            (true, base64::engine::general_purpose::STANDARD.decode(b).map_err(|_| input.bad("SecretBinary is not base64"))?)
        }
        (None, None) => return Ok(None),
    };
    if v.1.len() > MAX_VALUE || v.1.is_empty() {
        return Err(input.bad(format!("the secret's value must be 1 to {MAX_VALUE} bytes; this one is {} bytes", v.1.len())));
    }
    Ok(Some(v))
}

/// ClientRequestToken (32-64 characters), or a new id.
fn version_id(input: &Input<'_>) -> Result<String, AwsError> {
    match input.str("ClientRequestToken")? {
        Some(t) if (32..=64).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') => Ok(t.to_owned()),
        Some(_) => Err(input.bad("ClientRequestToken must be 32 to 64 of [A-Za-z0-9-]")),
        None => {
            let h = crate::keys::random_hex(16);
            Ok(format!("{}-{}-4{}-a{}-{}", &h[..8], &h[8..12], &h[13..16], &h[17..20], &h[20..32]))
        }
    }
}

impl Service {
    /// The secret `id` (name, ARN, or partial ARN without the random suffix) of `account`;
    /// one past its recovery window is purged now and not found.
    async fn find_secret(&self, account: &str, id: &str) -> Result<SecretDoc, AwsError> {
        let found = match id.strip_prefix("arn:") {
            None => self.store.doc(SECRET, account, id).await?,
            Some(_) => {
                let own = format!("arn:aws:secretsmanager:{REGION}:{account}:secret:");
                let rest = id.strip_prefix(&own).ok_or_else(not_found)?;
                match self.store.doc(SECRET, account, rest).await? {
                    Some(d) => Some(d),
                    // A full ARN: the name, a hyphen and 6 random characters.
                    None if rest.len() > 7 && rest.as_bytes()[rest.len() - 7] == b'-' => {
                        self.store.doc(SECRET, account, &rest[..rest.len() - 7]).await?
                    }
                    None => None,
                }
            }
        };
        let doc: SecretDoc = serde_json::from_str(&found.ok_or_else(not_found)?).map_err(internal)?;
        if id.starts_with("arn:") && doc.arn != id && !doc.arn.starts_with(&format!("{id}-")) {
            return Err(not_found());
        }
        if doc.deletion.is_some_and(|t| t <= now()) {
            self.store.delete_doc(SECRET, account, &doc.name).await?;
            tracing::info!(account, secret = %doc.arn, "secretsmanager: purged after its recovery window");
            return Err(not_found());
        }
        Ok(doc)
    }

    async fn save_secret(&self, d: &SecretDoc, create: bool) -> Result<bool, AwsError> {
        Ok(self.store.put_doc(SECRET, &d.account, &d.name, &serde_json::to_string(d).map_err(internal)?, create).await?)
    }

    /// The key for new values: `kms_key_id`, or the account's default.
    async fn secret_key(&self, account: &str, kms_key_id: Option<&str>) -> Result<(String, [u8; 32]), AwsError> {
        let k = match kms_key_id {
            Some(id) => self.find_key(account, id).await.map_err(|e| match e.code.as_str() {
                "NotFoundException" => {
                    AwsError::bad("ResourceNotFoundException", format!("the KMS key {id:?} does not exist in this account"))
                }
                _ => e,
            })?,
            None => self.default_secrets_key(account).await?,
        };
        let m = self.key_material(&k)?;
        Ok((k.arn, m))
    }

    fn describe(d: &SecretDoc) -> Value {
        let mut v = json!({ "ARN": d.arn, "Name": d.name, "CreatedDate": d.created, "LastChangedDate": d.last_changed });
        if let Some(x) = &d.description {
            v["Description"] = x.clone().into();
        }
        if let Some(x) = &d.kms_key_id {
            v["KmsKeyId"] = x.clone().into();
        }
        if let Some(x) = d.last_accessed {
            v["LastAccessedDate"] = x.into();
        }
        if let Some(x) = d.deleted {
            v["DeletedDate"] = x.into();
        }
        if !d.tags.is_empty() {
            v["Tags"] = tags_json(&d.tags);
        }
        v["RotationEnabled"] = false.into();
        let stages: serde_json::Map<String, Value> = d.versions.iter().map(|x| (x.id.clone(), json!(x.stages))).collect();
        v["VersionIdsToStages"] = Value::Object(stages);
        v
    }

    /// Runs Secrets Manager operation `op`.
    ///
    /// # Errors
    ///
    /// Secrets Manager's refusals.
    pub async fn secrets_call(&self, caller: &Caller, op: &str, v: &Value) -> Result<Value, AwsError> {
        let input = Input::new(v, BAD);
        let account = caller.account.as_str();
        let action = format!("secretsmanager:{op}");
        match op {
            "CreateSecret" => {
                let name = input.req("Name")?;
                if !valid_name(name) {
                    return Err(input.bad("Name must be 1 to 512 of [A-Za-z0-9/_+=.@-]"));
                }
                let arn = secret_arn(account, name);
                authorize(self, caller, &action, &arn).await?;
                let description = input.str("Description")?.map(str::to_owned);
                if description.as_ref().is_some_and(|d| d.chars().count() > 2048) {
                    return Err(input.bad("Description is over 2048 characters"));
                }
                for k in ["AddReplicaRegions", "Type", "CrossAccountPrimaryARN"] {
                    if input.get(k).is_some() {
                        return Err(input.bad(format!("{k} is not supported by Hearth's Secrets Manager")));
                    }
                }
                let tags = input.tags("Tags")?.unwrap_or_default();
                let value = value_of(&input)?;
                let vid = version_id(&input)?;
                let kms_key_id = input.str("KmsKeyId")?;
                let (key_arn, key) = self.secret_key(account, kms_key_id).await?;
                if kms_key_id.is_some() {
                    authorize(self, caller, "kms:GenerateDataKey", &key_arn).await?;
                }
                let _w = WRITES.lock().await;
                if let Some(old) = self.store.doc(SECRET, account, name).await? {
                    let old: SecretDoc = serde_json::from_str(&old).map_err(internal)?;
                    if old.deleted.is_some() {
                        return Err(AwsError::bad(
                            "InvalidRequestException",
                            format!(
                                "You can't create this secret because a secret with the name {name} is already scheduled for deletion."
                            ),
                        ));
                    }
                    // The same request again (its ClientRequestToken): the same answer.
                    if let Some(v) = old.version(&vid) {
                        if value.as_ref().is_some_and(|(b, p)| *b == v.binary && old.open(&key, v).ok().as_ref() == Some(p)) {
                            return Ok(json!({ "ARN": old.arn, "Name": old.name, "VersionId": vid }));
                        }
                    }
                    return Err(AwsError::bad(
                        "ResourceExistsException",
                        format!("The operation failed because the secret {name} already exists."),
                    ));
                }
                if self.store.docs(SECRET, account, "").await?.len() >= MAX_SECRETS {
                    return Err(AwsError::bad("LimitExceededException", format!("an account has at most {MAX_SECRETS} secrets")));
                }
                let t = now();
                let mut d = SecretDoc {
                    arn,
                    name: name.to_owned(),
                    account: account.to_owned(),
                    description,
                    kms_key_id: kms_key_id.map(str::to_owned),
                    key_arn,
                    created: t,
                    last_changed: t,
                    last_accessed: None,
                    deleted: None,
                    deletion: None,
                    tags,
                    versions: vec![],
                };
                let mut out = json!({ "ARN": d.arn, "Name": d.name });
                if let Some((binary, plain)) = value {
                    let value = d.seal(&key, &vid, binary, &plain);
                    d.add_version(VersionDoc { id: vid.clone(), stages: vec![], created: t, binary, value }, None)?;
                    out["VersionId"] = vid.into();
                }
                if !self.save_secret(&d, true).await? {
                    return Err(AwsError::bad(
                        "ResourceExistsException",
                        format!("The operation failed because the secret {name} already exists."),
                    ));
                }
                tracing::info!(account, secret = %d.arn, "secretsmanager: secret created");
                Ok(out)
            }
            "GetSecretValue" => {
                let d = self.find_secret(account, input.req("SecretId")?).await?;
                authorize(self, caller, &action, &d.arn).await?;
                if d.deleted.is_some() {
                    return Err(marked_for_deletion(op));
                }
                let (vid, stage) = (input.str("VersionId")?, input.str("VersionStage")?);
                let v = match (vid, stage) {
                    (Some(id), s) => d.version(id).filter(|v| s.is_none_or(|s| v.stages.iter().any(|x| x == s))),
                    (None, s) => d.staged(s.unwrap_or(CURRENT)),
                };
                let v = v.ok_or_else(|| {
                    AwsError::bad(
                        "ResourceNotFoundException",
                        "Secrets Manager can't find the specified secret value for the version or stage asked for.",
                    )
                })?;
                let k = self.find_key(account, &d.key_arn).await?;
                if !k.managed {
                    authorize(self, caller, "kms:Decrypt", &k.arn).await?;
                }
                let plain = d.open(&self.key_material(&k)?, v)?;
                let mut out =
                    json!({ "ARN": d.arn, "Name": d.name, "VersionId": v.id, "VersionStages": v.stages, "CreatedDate": v.created });
                if v.binary {
                    out["SecretBinary"] = base64::engine::general_purpose::STANDARD.encode(&plain).into();
                } else {
                    out["SecretString"] = String::from_utf8(plain).map_err(|_| internal("a SecretString that is not UTF-8"))?.into();
                }
                let today = (now() / DAY).floor() * DAY;
                if d.last_accessed != Some(today) {
                    let _w = WRITES.lock().await;
                    if let Ok(mut fresh) = self.find_secret(account, &d.arn).await {
                        fresh.last_accessed = Some(today);
                        self.save_secret(&fresh, false).await?;
                    }
                }
                Ok(out)
            }
            "PutSecretValue" | "UpdateSecret" => self.put_secret(caller, op, &input).await,
            "DescribeSecret" => {
                let d = self.find_secret(account, input.req("SecretId")?).await?;
                authorize(self, caller, &action, &d.arn).await?;
                Ok(Self::describe(&d))
            }
            "ListSecrets" => self.list_secrets(caller, &input).await,
            "DeleteSecret" => {
                let _w = WRITES.lock().await;
                let mut d = self.find_secret(account, input.req("SecretId")?).await?;
                authorize(self, caller, &action, &d.arn).await?;
                let window = input.int("RecoveryWindowInDays")?;
                let force = input.bool("ForceDeleteWithoutRecovery")?.unwrap_or(false);
                if force && window.is_some() {
                    return Err(input.bad("give RecoveryWindowInDays or ForceDeleteWithoutRecovery, not both"));
                }
                let window = window.unwrap_or(30);
                if !(7..=30).contains(&window) {
                    return Err(input.bad("RecoveryWindowInDays must be 7 to 30"));
                }
                let t = now();
                if force {
                    self.store.delete_doc(SECRET, account, &d.name).await?;
                    tracing::info!(account, secret = %d.arn, "secretsmanager: secret deleted without recovery");
                    return Ok(json!({ "ARN": d.arn, "Name": d.name, "DeletionDate": t }));
                }
                if d.deleted.is_some() {
                    return Err(marked_for_deletion(op));
                }
                d.deleted = Some(t);
                d.deletion = Some(t + window as f64 * DAY);
                self.save_secret(&d, false).await?;
                Ok(json!({ "ARN": d.arn, "Name": d.name, "DeletionDate": d.deletion }))
            }
            "RestoreSecret" => {
                let _w = WRITES.lock().await;
                let mut d = self.find_secret(account, input.req("SecretId")?).await?;
                authorize(self, caller, &action, &d.arn).await?;
                d.deleted = None;
                d.deletion = None;
                self.save_secret(&d, false).await?;
                Ok(json!({ "ARN": d.arn, "Name": d.name }))
            }
            "TagResource" | "UntagResource" => {
                let _w = WRITES.lock().await;
                let mut d = self.find_secret(account, input.req("SecretId")?).await?;
                authorize(self, caller, &action, &d.arn).await?;
                if d.deleted.is_some() {
                    return Err(marked_for_deletion(op));
                }
                if op == "TagResource" {
                    let tags = input.tags("Tags")?.ok_or_else(|| input.bad("Tags is required"))?;
                    merge_tags(&mut d.tags, tags, BAD)?;
                } else {
                    let keys = input.strings("TagKeys", 50)?.ok_or_else(|| input.bad("TagKeys is required"))?;
                    d.tags.retain(|(k, _)| !keys.contains(&k.as_str()));
                }
                self.save_secret(&d, false).await?;
                Ok(json!({}))
            }
            _ => Err(unknown_operation("secretsmanager", op)),
        }
    }

    /// PutSecretValue and UpdateSecret.
    async fn put_secret(&self, caller: &Caller, op: &str, input: &Input<'_>) -> Result<Value, AwsError> {
        let account = caller.account.as_str();
        let _w = WRITES.lock().await;
        let mut d = self.find_secret(account, input.req("SecretId")?).await?;
        authorize(self, caller, &format!("secretsmanager:{op}"), &d.arn).await?;
        if d.deleted.is_some() {
            return Err(marked_for_deletion(op));
        }
        let value = value_of(input)?;
        let t = now();
        let mut out = json!({ "ARN": d.arn, "Name": d.name });
        if op == "PutSecretValue" {
            if value.is_none() {
                return Err(input.bad("give SecretString or SecretBinary"));
            }
            if input.get("RotationToken").is_some() {
                return Err(input.bad("RotationToken is not supported: Hearth does not rotate secrets"));
            }
        } else {
            if let Some(x) = input.str("Description")? {
                if x.chars().count() > 2048 {
                    return Err(input.bad("Description is over 2048 characters"));
                }
                d.description = Some(x.to_owned());
            }
            if let Some(kid) = input.str("KmsKeyId")? {
                // Every version is opened under the old key and sealed again under the new
                // one: a role needs kms:Decrypt on the old key (unless it is the managed
                // one, as for GetSecretValue), or moving a secret to the managed key would
                // read it without.
                let old_key = self.find_key(account, &d.key_arn).await?;
                if !old_key.managed {
                    authorize(self, caller, "kms:Decrypt", &old_key.arn).await?;
                }
                let old = self.key_material(&old_key)?;
                let (arn, new) = self.secret_key(account, Some(kid)).await?;
                authorize(self, caller, "kms:GenerateDataKey", &arn).await?;
                let mut versions = std::mem::take(&mut d.versions);
                for v in &mut versions {
                    let plain = d.open(&old, v)?;
                    v.value = d.seal(&new, &v.id, v.binary, &plain);
                }
                d.versions = versions;
                d.key_arn = arn;
                d.kms_key_id = Some(kid.to_owned());
            }
        }
        if let Some((binary, plain)) = value {
            let vid = version_id(input)?;
            // A new value is sealed under the secret's key: a customer key needs
            // kms:GenerateDataKey, as CreateSecret checks.
            let k = self.find_key(account, &d.key_arn).await?;
            if !k.managed {
                authorize(self, caller, "kms:GenerateDataKey", &k.arn).await?;
            }
            let key = self.key_material(&k)?;
            if let Some(v) = d.version(&vid) {
                // A retry of the same request is answered again; another value under its id is not.
                if v.binary == binary && d.open(&key, v)? == plain {
                    out["VersionId"] = vid.into();
                    out["VersionStages"] = json!(v.stages);
                    return Ok(out);
                }
                return Err(AwsError::bad(
                    "ResourceExistsException",
                    "You can't modify an existing version, you can only create a new version.",
                ));
            }
            let stages = match op {
                "PutSecretValue" => input.strings("VersionStages", 20)?.map(|s| s.into_iter().map(str::to_owned).collect()),
                _ => None,
            };
            let value = d.seal(&key, &vid, binary, &plain);
            d.add_version(VersionDoc { id: vid.clone(), stages: vec![], created: t, binary, value }, stages)?;
            out["VersionStages"] = json!(d.version(&vid).map(|v| v.stages.clone()).unwrap_or_default());
            out["VersionId"] = vid.into();
        }
        if let (Some(o), "UpdateSecret") = (out.as_object_mut(), op) {
            o.remove("VersionStages");
        }
        d.last_changed = t;
        self.save_secret(&d, false).await?;
        Ok(out)
    }

    async fn list_secrets(&self, caller: &Caller, input: &Input<'_>) -> Result<Value, AwsError> {
        authorize(self, caller, "secretsmanager:ListSecrets", "*").await?;
        let limit = match input.int("MaxResults")? {
            None => 100,
            Some(n) if (1..=100).contains(&n) => n as usize,
            Some(_) => return Err(input.bad("MaxResults must be 1 to 100")),
        };
        let start = match input.str("NextToken")? {
            None => 0,
            Some(t) => t
                .strip_prefix('n')
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| AwsError::bad("InvalidNextTokenException", "NextToken is not one this service returned"))?,
        };
        let mut prefixes: Vec<String> = vec![];
        for f in input.list("Filters")?.into_iter().flatten() {
            let values = f.get("Values").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str);
            match f.get("Key").and_then(Value::as_str) {
                Some("name") => prefixes.extend(values.map(str::to_owned)),
                other => return Err(input.bad(format!("filter key {other:?} is not supported: only name"))),
            }
        }
        let planned = input.bool("IncludePlannedDeletion")?.unwrap_or(false);
        let now = now();
        let mut all: Vec<SecretDoc> = Vec::new();
        for (name, doc) in self.store.docs(SECRET, &caller.account, "").await? {
            let Ok(d) = serde_json::from_str::<SecretDoc>(&doc) else { continue };
            if d.deletion.is_some_and(|t| t <= now) {
                self.store.delete_doc(SECRET, &caller.account, &name).await?;
                continue;
            }
            if (d.deleted.is_none() || planned) && (prefixes.is_empty() || prefixes.iter().any(|p| d.name.starts_with(p.as_str()))) {
                all.push(d);
            }
        }
        match input.str("SortBy")? {
            None | Some("name") => {}
            Some("created-date") => all.sort_by(|a, b| a.created.total_cmp(&b.created)),
            Some(other) => return Err(input.bad(format!("SortBy {other:?} is not supported: name or created-date"))),
        }
        if input.str("SortOrder")? == Some("desc") {
            all.reverse();
        }
        let total = all.len();
        let list: Vec<Value> = all.iter().skip(start).take(limit).map(Self::describe).collect();
        let mut out = json!({ "SecretList": list });
        if start.saturating_add(limit) < total {
            out["NextToken"] = format!("n{}", start.saturating_add(limit)).into();
        }
        Ok(out)
    }
}
