//! Role sessions: temporary credentials (STS AssumeRole, a microvm's metadata service),
//! and how a request signed with them is authenticated.
//!
//! A session is an access key id `HSIA` + 16 base-32 characters, a 40-character secret and
//! a session token (48 random bytes, base64). It is stored as document `session` keyed by
//! its access key id (in no account: a request names only the key id), the secret sealed
//! under the daemon's sealing key ([`crate::keys::SealingKey`], bound to the key id), the
//! token only as its SHA-256, with its expiry, account, role (ARN and id), session name and
//! microvm. A request signed with it is accepted only with the matching
//! `X-Amz-Security-Token`, before expiry, while the session exists (terminate revokes a
//! microvm's) and while its role does: a role deleted, or deleted and created again, ends
//! its sessions.

use super::iam::{check_name, parse_role_arn, validation};
use super::Service;
use crate::auth::{Caller, Principal};
use crate::aws::AwsError;
use crate::error::{ApiError, Kind};
use crate::keys::SealingKey;
use crate::store::AccessKey;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

/// The access key id prefix of session credentials.
pub const SESSION_PREFIX: &str = "HSIA";
/// Shortest and longest session (seconds).
pub const TTL_BOUNDS: (u64, u64) = (60, 43_200);
/// The document kind of sessions, and of their index by microvm.
const KIND: &str = "session";
const BY_MICROVM: &str = "session-microvm";

/// Temporary credentials of a role session.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionCredentials {
    /// `HSIA…`: the access key id.
    pub access_key_id: String,
    /// The 40-character secret.
    pub secret_access_key: String,
    /// The session token (`X-Amz-Security-Token`).
    pub session_token: String,
    /// When they expire (seconds since the epoch).
    pub expiration: f64,
}

/// A session, as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Session {
    account: String,
    role_arn: String,
    role_id: String,
    session_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    microvm: Option<String>,
    /// Sealed.
    secret: String,
    /// SHA-256 of the token, hex.
    token_sha256: String,
    expiration: f64,
}

/// Why a request's session credentials are refused.
#[derive(Debug, Clone)]
pub enum SessionRefusal {
    /// Expired: ExpiredToken (400) on the query and JSON services, 403 on the Lambda API.
    Expired(String),
    /// Missing, wrong, forged or revoked (403).
    Invalid(ApiError),
}

impl SessionRefusal {
    /// As the Lambda API (and Hearth's extensions) answer it.
    pub fn into_api(self) -> ApiError {
        match self {
            SessionRefusal::Expired(m) => ApiError::new(Kind::UnrecognizedClient, m),
            SessionRefusal::Invalid(e) => e,
        }
    }

    /// As a query (`json == false`: `ExpiredToken`) or JSON service (`ExpiredTokenException`) answers it.
    pub fn into_aws(self, json: bool) -> AwsError {
        match self {
            SessionRefusal::Expired(m) => AwsError::bad(if json { "ExpiredTokenException" } else { "ExpiredToken" }, m),
            SessionRefusal::Invalid(e) => e.into(),
        }
    }
}

/// `n` random base-32 characters.
pub(crate) fn random_base32(n: usize) -> String {
    const B32: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    crate::keys::random(n).iter().map(|b| B32[(*b % 32) as usize] as char).collect()
}

fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// Equal without a timing difference (over two hex digests of one length).
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The sealing key of `dir`, loaded once per directory.
fn sealing_key(dir: &std::path::Path) -> Result<Arc<SealingKey>, ApiError> {
    static KEYS: OnceLock<Mutex<HashMap<PathBuf, Arc<SealingKey>>>> = OnceLock::new();
    let mut keys = KEYS.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some(k) = keys.get(dir) {
        return Ok(k.clone());
    }
    let k = Arc::new(SealingKey::create(dir).map_err(ApiError::internal)?);
    keys.insert(dir.to_path_buf(), k.clone());
    Ok(k)
}

fn invalid() -> SessionRefusal {
    SessionRefusal::Invalid(ApiError::new(Kind::UnrecognizedClient, "The security token included in the request is invalid."))
}

impl Service {
    async fn session(&self, access_key: &str) -> Result<Option<Session>, ApiError> {
        if !access_key.starts_with(SESSION_PREFIX) || access_key.len() != 20 {
            return Ok(None);
        }
        match self.store.doc(KIND, "", access_key).await? {
            Some(d) => serde_json::from_str(&d).map(Some).map_err(ApiError::internal),
            None => Ok(None),
        }
    }

    /// The signing key of session `access_key` (its secret opened), to check a request's
    /// signature before its token; `None` for no such session.
    pub(crate) async fn session_key(&self, access_key: &str) -> Option<AccessKey> {
        let s = self.session(access_key).await.ok().flatten()?;
        let secret = sealing_key(&self.state).ok()?.open(access_key, &s.secret).ok()?;
        Some(AccessKey { access_key: access_key.to_owned(), secret, account: s.account })
    }

    /// The caller of a request whose signature `key` verified: the account's root for an
    /// access key; for session credentials, the role session, once the request's
    /// `X-Amz-Security-Token` matches, the session is live and its role still exists.
    ///
    /// # Errors
    ///
    /// [`SessionRefusal`].
    pub async fn caller_of(&self, headers: &http::HeaderMap, key: &AccessKey) -> Result<Caller, SessionRefusal> {
        if !key.access_key.starts_with(SESSION_PREFIX) {
            return Ok(Caller::root(&key.account, &key.access_key));
        }
        let token = headers.get("x-amz-security-token").and_then(|v| v.to_str().ok()).filter(|t| t.len() <= 4096);
        let token = token.ok_or_else(|| {
            SessionRefusal::Invalid(ApiError::new(
                Kind::UnrecognizedClient,
                "temporary credentials need their session token in X-Amz-Security-Token",
            ))
        })?;
        let s = self.session(&key.access_key).await.map_err(SessionRefusal::Invalid)?.ok_or_else(invalid)?;
        if !same(&sha256_hex(token), &s.token_sha256) {
            return Err(invalid());
        }
        if s.expiration <= crate::clock::now() {
            return Err(SessionRefusal::Expired("The security token included in the request is expired".to_owned()));
        }
        let role = self.role_by_arn(&s.account, &s.role_arn).await.map_err(SessionRefusal::Invalid)?;
        if role.is_none_or(|r| r.id != s.role_id) {
            return Err(invalid());
        }
        Ok(Caller {
            account: s.account,
            access_key: key.access_key.clone(),
            principal: Principal::Role { role_arn: s.role_arn, session_name: s.session_name, microvm: s.microvm },
        })
    }

    /// Temporary credentials for `role_arn` (a role of `account`), scoped to (account, role,
    /// microvm), lasting `ttl_secs` (bounded to [`TTL_BOUNDS`]).
    ///
    /// # Errors
    ///
    /// ValidationException for a role that is not the account's or a bad session name; the
    /// store's.
    pub async fn issue_session(
        &self,
        account: &str,
        role_arn: &str,
        session_name: &str,
        microvm: Option<&str>,
        ttl_secs: u64,
    ) -> Result<SessionCredentials, ApiError> {
        check_name("RoleSessionName", session_name, 64).map_err(|e| ApiError::validation(e.message))?;
        self.check_role(account, role_arn).await?;
        let role = self.role_by_arn(account, role_arn).await?.ok_or_else(|| ApiError::validation(format!("{role_arn}: no such role")))?;
        self.purge_expired_sessions().await;
        let access_key_id = format!("{SESSION_PREFIX}{}", random_base32(16));
        let secret = crate::keys::new_key(account).secret;
        let token = base64::engine::general_purpose::STANDARD.encode(crate::keys::random(48));
        let expiration = (crate::clock::now() + ttl_secs.clamp(TTL_BOUNDS.0, TTL_BOUNDS.1) as f64).floor();
        let s = Session {
            account: account.to_owned(),
            role_arn: role.arn,
            role_id: role.id,
            session_name: session_name.to_owned(),
            microvm: microvm.map(str::to_owned),
            secret: sealing_key(&self.state)?.seal(&access_key_id, &secret),
            token_sha256: sha256_hex(&token),
            expiration,
        };
        let doc = serde_json::to_string(&s).map_err(ApiError::internal)?;
        if let Some(m) = microvm {
            self.store.put_doc(BY_MICROVM, "", &format!("{m}/{access_key_id}"), &expiration.to_string(), false).await?;
        }
        self.store.put_doc(KIND, "", &access_key_id, &doc, true).await?;
        Ok(SessionCredentials { access_key_id, secret_access_key: secret, session_token: token, expiration })
    }

    /// Revokes every session issued to microvm `microvm` (called at terminate).
    ///
    /// # Errors
    ///
    /// The store's.
    pub async fn revoke_sessions(&self, microvm: &str) -> Result<(), ApiError> {
        for (name, _) in self.store.docs(BY_MICROVM, "", &format!("{microvm}/")).await? {
            if let Some((_, key)) = name.rsplit_once('/') {
                self.store.delete_doc(KIND, "", key).await?;
            }
            self.store.delete_doc(BY_MICROVM, "", &name).await?;
        }
        Ok(())
    }

    /// Deletes expired sessions, at most once a minute (they are refused anyway; this
    /// keeps the table from growing).
    async fn purge_expired_sessions(&self) {
        static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let now = crate::clock::now();
        let last = LAST.load(std::sync::atomic::Ordering::Relaxed);
        if now < last as f64 + 60.0
            || LAST.compare_exchange(last, now as u64, std::sync::atomic::Ordering::Relaxed, std::sync::atomic::Ordering::Relaxed).is_err()
        {
            return;
        }
        let Ok(all) = self.store.docs(KIND, "", "").await else { return };
        for (key, doc) in all {
            let Ok(s) = serde_json::from_str::<Session>(&doc) else { continue };
            if s.expiration <= now {
                let _ = self.store.delete_doc(KIND, "", &key).await;
                if let Some(m) = s.microvm {
                    let _ = self.store.delete_doc(BY_MICROVM, "", &format!("{m}/{key}")).await;
                }
            }
        }
    }

    /// STS AssumeRole by `caller`: the role must be of the caller's account and its trust
    /// policy allow the caller (the account's root, or the caller's role or session ARN)
    /// `sts:AssumeRole`; a role session also needs its own policies to allow it. Returns the
    /// credentials and the role's id.
    pub(crate) async fn assume_role(
        &self,
        caller: &Caller,
        role_arn: &str,
        session_name: &str,
        duration: Option<u64>,
    ) -> Result<(SessionCredentials, String), AwsError> {
        check_name("RoleSessionName", session_name, 64)?;
        if session_name.len() < 2 {
            return Err(validation("RoleSessionName is 2 to 64 characters"));
        }
        if role_arn.len() > 2048 || parse_role_arn(role_arn).is_none() {
            return Err(validation(format!("RoleArn {role_arn:.100} is not a role ARN (arn:aws:iam::<account>:role/<name>)")));
        }
        let denied = || {
            AwsError::new(
                403,
                "AccessDenied",
                format!("User: {} is not authorized to perform: sts:AssumeRole on resource: {role_arn}", caller.arn()),
            )
        };
        let role = self.role_by_arn(&caller.account, role_arn).await?.ok_or_else(denied)?;
        let trust = crate::aws::policy::Policy::parse(&role.trust, crate::aws::policy::Kind::Trust).map_err(|_| denied())?;
        let mut ctx = super::iam::request_context(caller, &role);
        if let Principal::Role { role_arn: own, .. } = &caller.principal {
            ctx.set("hearth:RoleArn", own.as_str());
        } else {
            ctx.set("hearth:RoleArn", "");
        }
        if trust.evaluate("sts:AssumeRole", role_arn, &ctx) != crate::aws::policy::Decision::Allow {
            return Err(denied());
        }
        let chained = matches!(caller.principal, Principal::Role { .. });
        if chained && !self.caller_allowed(caller, "sts:AssumeRole", role_arn).await? {
            return Err(denied());
        }
        // Role chaining is limited to an hour, as on AWS.
        let max = if chained { 3600 } else { role.max_session };
        let d = duration.unwrap_or(3600);
        if d < 900 || d > max {
            return Err(validation(format!(
                "DurationSeconds {d} must be 900 to {max} (the role's MaxSessionDuration{})",
                if chained { "; one hour when a role session assumes a role" } else { "" }
            )));
        }
        // A session chained from a microvm's (or a build's) credentials belongs to it too:
        // revoked with it, so code in a guest cannot outlast its microvm or its build by
        // assuming another role.
        let source = match &caller.principal {
            Principal::Role { microvm, .. } => microvm.as_deref(),
            Principal::Root => None,
        };
        let creds = self.issue_session(&caller.account, &role.arn, session_name, source, d).await?;
        Ok((creds, role.id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_compare_whole() {
        let a = sha256_hex("token");
        assert!(same(&a, &sha256_hex("token")));
        assert!(!same(&a, &sha256_hex("token2")));
        assert!(!same(&a, &a[..63]));
    }
}

#[cfg(test)]
#[path = "sessions_tests.rs"]
mod flow_tests;
