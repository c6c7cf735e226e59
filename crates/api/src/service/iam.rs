//! IAM roles and their inline policies (documents `role` and `role-policy` of the account),
//! and whether a role allows an action. Sessions (temporary credentials) are in `sessions`.
//!
//! Role names are unique within an account without regard to case, as on AWS: a role is
//! stored under its name in lowercase and keeps its spelling in the document. Its policies
//! are stored under `<lowercase role name>/<policy name>`.

use super::Service;
use crate::auth::Caller;
use crate::aws::policy::{evaluate_all, Context, Decision, Kind as PolicyKind, Policy};
use crate::aws::AwsError;
use crate::error::{ApiError, Kind};
use serde::{Deserialize, Serialize};

pub use super::sessions::SessionCredentials;

/// Most roles of one account.
pub const MAX_ROLES: usize = 1000;
/// Most inline policies of one role.
pub const MAX_ROLE_POLICIES: usize = 20;
/// Most tags of one role (AWS's 50).
pub const MAX_TAGS: usize = 50;
/// The sessions' shortest and longest MaxSessionDuration (seconds).
pub const SESSION_BOUNDS: (u64, u64) = (3600, 43_200);

/// A role, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Role {
    /// Its name, as spelled at creation.
    pub name: String,
    /// `AROA…`: its unique id (a role deleted and created again gets another).
    pub id: String,
    /// `arn:aws:iam::<account>:role<path><name>`.
    pub arn: String,
    /// `/` or `/…/`.
    pub path: String,
    /// Seconds since the epoch.
    pub created: f64,
    /// The AssumeRolePolicyDocument as given.
    pub trust: String,
    /// Its description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Longest session (seconds).
    pub max_session: u64,
    /// Tags, in order.
    #[serde(default)]
    pub tags: Vec<(String, String)>,
}

/// What CreateRole asks for.
#[derive(Debug, Clone, Default)]
pub struct NewRole {
    /// RoleName.
    pub name: String,
    /// Path (default `/`).
    pub path: Option<String>,
    /// AssumeRolePolicyDocument.
    pub trust: String,
    /// Description.
    pub description: Option<String>,
    /// MaxSessionDuration.
    pub max_session: Option<u64>,
    /// Tags.
    pub tags: Vec<(String, String)>,
}

/// A ValidationError (400) as IAM answers it.
pub fn validation(msg: impl Into<String>) -> AwsError {
    AwsError::bad("ValidationError", msg)
}

fn no_role(name: &str) -> AwsError {
    AwsError::new(404, "NoSuchEntity", format!("The role with name {name} cannot be found."))
}

fn internal(e: impl std::fmt::Display) -> AwsError {
    AwsError::from(ApiError::internal(e))
}

/// Checks an IAM name (role, policy, session): 1-`max` of `[A-Za-z0-9_+=,.@-]`.
pub fn check_name(what: &str, v: &str, max: usize) -> Result<(), AwsError> {
    let ok = !v.is_empty() && v.len() <= max && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"_+=,.@-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(validation(format!("{what} {v:?} must be 1 to {max} characters of letters, digits and _+=,.@-")))
    }
}

fn check_path(p: &str) -> Result<(), AwsError> {
    let ok = p == "/"
        || (p.len() <= 512 && p.len() >= 2 && p.starts_with('/') && p.ends_with('/') && p.bytes().all(|b| (0x21..=0x7e).contains(&b)));
    if ok {
        Ok(())
    } else {
        Err(validation(format!("Path {p:?} must be / or begin and end with / (at most 512 printable characters)")))
    }
}

/// `(account, path, name)` of a role's ARN, `arn:aws:iam::<account>:role<path><name>`.
pub fn parse_role_arn(arn: &str) -> Option<(&str, &str, &str)> {
    let rest = arn.strip_prefix("arn:aws:iam::")?;
    let (account, res) = rest.split_once(':')?;
    let path_name = res.strip_prefix("role")?;
    if !path_name.starts_with('/') || account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let cut = path_name.rfind('/')?;
    Some((account, &path_name[..=cut], &path_name[cut + 1..]))
}

fn malformed(e: crate::aws::policy::Malformed) -> AwsError {
    AwsError::bad("MalformedPolicyDocument", e.0)
}

impl Service {
    /// Role `name` of `account`.
    pub(crate) async fn role(&self, account: &str, name: &str) -> Result<Option<Role>, ApiError> {
        let Some(doc) = self.store.doc("role", account, &name.to_ascii_lowercase()).await? else {
            return Ok(None);
        };
        serde_json::from_str(&doc).map(Some).map_err(ApiError::internal)
    }

    /// The role `arn` names, when it is one of `account`'s (its path included).
    pub(crate) async fn role_by_arn(&self, account: &str, arn: &str) -> Result<Option<Role>, ApiError> {
        match parse_role_arn(arn) {
            Some((a, _, name)) if a == account => Ok(self.role(account, name).await?.filter(|r| r.arn == arn)),
            _ => Ok(None),
        }
    }

    /// CreateRole.
    pub(crate) async fn create_role(&self, account: &str, r: NewRole) -> Result<Role, AwsError> {
        check_name("RoleName", &r.name, 64)?;
        let path = r.path.unwrap_or_else(|| "/".to_owned());
        check_path(&path)?;
        Policy::parse(&r.trust, PolicyKind::Trust).map_err(malformed)?;
        if r.description.as_ref().is_some_and(|d| d.chars().count() > 1000) {
            return Err(validation("Description is at most 1000 characters"));
        }
        let max_session = r.max_session.unwrap_or(SESSION_BOUNDS.0);
        if !(SESSION_BOUNDS.0..=SESSION_BOUNDS.1).contains(&max_session) {
            return Err(validation(format!("MaxSessionDuration must be {} to {} seconds", SESSION_BOUNDS.0, SESSION_BOUNDS.1)));
        }
        check_tags(&r.tags)?;
        if self.store.docs("role", account, "").await?.len() >= MAX_ROLES {
            return Err(AwsError::new(409, "LimitExceeded", format!("Cannot exceed quota for RolesPerAccount: {MAX_ROLES}")));
        }
        let id = format!("AROA{}", super::sessions::random_base32(17));
        let role = Role {
            arn: format!("arn:aws:iam::{account}:role{path}{}", r.name),
            name: r.name,
            id,
            path,
            created: crate::clock::now().floor(),
            trust: r.trust,
            description: r.description,
            max_session,
            tags: r.tags,
        };
        let doc = serde_json::to_string(&role).map_err(internal)?;
        if !self.store.put_doc("role", account, &role.name.to_ascii_lowercase(), &doc, true).await? {
            return Err(AwsError::new(409, "EntityAlreadyExists", format!("Role with name {} already exists.", role.name)));
        }
        Ok(role)
    }

    /// GetRole.
    pub(crate) async fn get_role(&self, account: &str, name: &str) -> Result<Role, AwsError> {
        check_name("RoleName", name, 64)?;
        self.role(account, name).await?.ok_or_else(|| no_role(name))
    }

    /// ListRoles: the account's roles under `prefix`, by name.
    pub(crate) async fn list_roles(&self, account: &str, prefix: &str) -> Result<Vec<Role>, AwsError> {
        let mut out = Vec::new();
        for (_, doc) in self.store.docs("role", account, "").await? {
            let r: Role = serde_json::from_str(&doc).map_err(internal)?;
            if r.path.starts_with(prefix) {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// DeleteRole: refused while it has inline policies (DeleteConflict, as AWS). Its
    /// sessions stop working at once (each request checks its role).
    pub(crate) async fn delete_role(&self, account: &str, name: &str) -> Result<(), AwsError> {
        let role = self.get_role(account, name).await?;
        if !self.store.docs("role-policy", account, &format!("{}/", name.to_ascii_lowercase())).await?.is_empty() {
            return Err(AwsError::new(409, "DeleteConflict", "Cannot delete entity, must delete policies first."));
        }
        self.store.delete_doc("role", account, &role.name.to_ascii_lowercase()).await?;
        Ok(())
    }

    /// PutRolePolicy (create or replace).
    pub(crate) async fn put_role_policy(&self, account: &str, role: &str, policy: &str, doc: &str) -> Result<(), AwsError> {
        check_name("PolicyName", policy, 128)?;
        let role = self.get_role(account, role).await?;
        Policy::parse(doc, PolicyKind::Permissions).map_err(malformed)?;
        let prefix = format!("{}/", role.name.to_ascii_lowercase());
        let existing = self.store.docs("role-policy", account, &prefix).await?;
        let key = format!("{prefix}{policy}");
        if existing.len() >= MAX_ROLE_POLICIES && !existing.iter().any(|(n, _)| *n == key) {
            return Err(AwsError::new(409, "LimitExceeded", format!("a role has at most {MAX_ROLE_POLICIES} inline policies")));
        }
        let stored = serde_json::json!({ "name": policy, "document": doc }).to_string();
        self.store.put_doc("role-policy", account, &key, &stored, false).await?;
        Ok(())
    }

    /// GetRolePolicy: the document as given.
    pub(crate) async fn get_role_policy(&self, account: &str, role: &str, policy: &str) -> Result<(String, String), AwsError> {
        check_name("PolicyName", policy, 128)?;
        let role = self.get_role(account, role).await?;
        let doc = self.store.doc("role-policy", account, &format!("{}/{policy}", role.name.to_ascii_lowercase())).await?;
        let doc = doc.ok_or_else(|| AwsError::new(404, "NoSuchEntity", format!("The role policy with name {policy} cannot be found.")))?;
        let v: serde_json::Value = serde_json::from_str(&doc).map_err(internal)?;
        Ok((role.name, v["document"].as_str().unwrap_or_default().to_owned()))
    }

    /// DeleteRolePolicy.
    pub(crate) async fn delete_role_policy(&self, account: &str, role: &str, policy: &str) -> Result<(), AwsError> {
        check_name("PolicyName", policy, 128)?;
        let role = self.get_role(account, role).await?;
        if !self.store.delete_doc("role-policy", account, &format!("{}/{policy}", role.name.to_ascii_lowercase())).await? {
            return Err(AwsError::new(404, "NoSuchEntity", format!("The role policy with name {policy} cannot be found.")));
        }
        Ok(())
    }

    /// ListRolePolicies: the names, in order.
    pub(crate) async fn list_role_policies(&self, account: &str, role: &str) -> Result<Vec<String>, AwsError> {
        let role = self.get_role(account, role).await?;
        let docs = self.store.docs("role-policy", account, &format!("{}/", role.name.to_ascii_lowercase())).await?;
        Ok(docs.into_iter().filter_map(|(n, _)| n.split_once('/').map(|(_, p)| p.to_owned())).collect())
    }

    /// What a build's layers are keyed by for its build role `arn`
    /// (`BuildRequest::cache_scope`): the role's ARN, its id (a role deleted and made again
    /// under the name is another) and a digest of its inline policies (a policy changed
    /// is another scope), so a layer made under one set of permissions is reused only
    /// under the same set. No role, or one that is not the account's, has scopes of its own.
    pub(crate) async fn role_scope(&self, account: &str, arn: Option<&str>) -> Result<String, ApiError> {
        use sha2::Digest;
        let Some(arn) = arn else { return Ok("role=".into()) };
        let Some(role) = self.role_by_arn(account, arn).await? else { return Ok(format!("role={arn}#none")) };
        let docs = self.store.docs("role-policy", account, &format!("{}/", role.name.to_ascii_lowercase())).await?;
        let mut h = sha2::Sha256::new();
        for (name, doc) in &docs {
            h.update(name.as_bytes());
            h.update([0]);
            h.update(doc.as_bytes());
            h.update([0]);
        }
        let digest: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        Ok(format!("role={arn}#{}#{digest}", role.id))
    }

    /// The decision of `role`'s inline policies on `action` on `resource` in `ctx`.
    pub(crate) async fn role_decision(
        &self,
        account: &str,
        role: &Role,
        action: &str,
        resource: &str,
        ctx: &Context,
    ) -> Result<Decision, ApiError> {
        let docs = self.store.docs("role-policy", account, &format!("{}/", role.name.to_ascii_lowercase())).await?;
        let mut policies = Vec::with_capacity(docs.len());
        for (name, doc) in docs {
            let v: serde_json::Value = serde_json::from_str(&doc).map_err(ApiError::internal)?;
            // Checked when written; a document this version no longer reads grants nothing.
            match Policy::parse(v["document"].as_str().unwrap_or_default(), PolicyKind::Permissions) {
                Ok(p) => policies.push(p),
                Err(e) => tracing::warn!(%account, policy = %name, error = %e, "a stored role policy no longer parses; it grants nothing"),
            }
        }
        Ok(evaluate_all(&policies, action, resource, ctx))
    }

    /// Whether `caller` (a role session) may do `action` on `resource`: its role's
    /// policies, with the request's condition keys.
    ///
    /// # Errors
    ///
    /// The store's.
    pub async fn caller_allowed(&self, caller: &Caller, action: &str, resource: &str) -> Result<bool, ApiError> {
        let crate::auth::Principal::Role { role_arn, microvm, .. } = &caller.principal else {
            return Ok(true);
        };
        let Some(role) = self.role_by_arn(&caller.account, role_arn).await? else {
            return Ok(false);
        };
        let mut ctx = request_context(caller, &role);
        if let Some(m) = microvm {
            ctx.set("hearth:SourceMicrovm", m.as_str());
        }
        if action.to_ascii_lowercase().starts_with("secretsmanager:") && resource != "*" {
            ctx.set("secretsmanager:SecretId", resource);
        }
        Ok(self.role_decision(&caller.account, &role, action, resource, &ctx).await? == Decision::Allow)
    }

    /// Whether role `role_arn` of `account` allows `action` on `resource`: some statement of
    /// its policies allows it and none denies it (condition keys: the account's and the
    /// role's only; [`Service::caller_allowed`] evaluates a request's).
    ///
    /// # Errors
    ///
    /// The store's.
    pub async fn role_allows(&self, account: &str, role_arn: &str, action: &str, resource: &str) -> Result<bool, ApiError> {
        let Some(role) = self.role_by_arn(account, role_arn).await? else {
            return Ok(false);
        };
        let mut ctx = Context::default();
        ctx.set("aws:PrincipalAccount", account).set("kms:CallerAccount", account).set("aws:RequestedRegion", super::REGION);
        ctx.set("hearth:RoleArn", role.arn.as_str());
        Ok(self.role_decision(account, &role, action, resource, &ctx).await? == Decision::Allow)
    }

    /// Validates that `role_arn` names an existing role of `account` (the model's
    /// ValidationException otherwise: for a bad `executionRoleArn`, `buildRoleArn`).
    ///
    /// # Errors
    ///
    /// ValidationException naming the ARN and what to do.
    pub async fn check_role(&self, account: &str, role_arn: &str) -> Result<(), ApiError> {
        let refuse = |why: &str| {
            ApiError::new(
                Kind::Validation,
                format!("{role_arn} {why}: create it with `aws iam create-role --role-name <name> …` (IAM is served by this endpoint)"),
            )
        };
        match parse_role_arn(role_arn) {
            None => Err(refuse("is not a role ARN (arn:aws:iam::<account>:role/<name>)")),
            Some((a, _, _)) if a != account => Err(refuse(&format!("is not a role of account {account}"))),
            Some(_) => match self.role_by_arn(account, role_arn).await? {
                Some(_) => Ok(()),
                None => Err(refuse(&format!("is not a role of account {account}"))),
            },
        }
    }

    /// Checks a `buildRoleArn`: a role of the caller's own account must exist
    /// ([`Service::check_role`]). One naming another account is accepted for now (recorded;
    /// it yields no credentials: [`Service::issue_session`] refuses another account's role),
    /// so that clients written before roles were served keep working.
    ///
    /// # Errors
    ///
    /// ValidationException for a role of the account that does not exist, or no role ARN.
    pub async fn check_build_role(&self, account: &str, role_arn: &str) -> Result<(), ApiError> {
        match parse_role_arn(role_arn) {
            Some((a, _, _)) if a != account => {
                tracing::debug!(%account, %role_arn, "a buildRoleArn of another account: recorded, not checked");
                Ok(())
            }
            _ => self.check_role(account, role_arn).await,
        }
    }
}

/// The condition keys of a request by `caller` in `role`.
pub(crate) fn request_context(caller: &Caller, role: &Role) -> Context {
    let mut ctx = Context::default();
    ctx.set("aws:PrincipalArn", caller.arn())
        .set("aws:PrincipalAccount", caller.account.as_str())
        .set("kms:CallerAccount", caller.account.as_str())
        .set("aws:RequestedRegion", super::REGION)
        .set("hearth:RoleArn", role.arn.as_str());
    match &caller.principal {
        crate::auth::Principal::Root => {
            ctx.set("aws:PrincipalType", "Account").set("aws:userid", caller.account.as_str());
        }
        crate::auth::Principal::Role { session_name, .. } => {
            ctx.set("aws:PrincipalType", "AssumedRole").set("aws:userid", format!("{}:{session_name}", role.id));
        }
    }
    ctx
}

fn check_tags(tags: &[(String, String)]) -> Result<(), AwsError> {
    if tags.len() > MAX_TAGS {
        return Err(validation(format!("at most {MAX_TAGS} tags")));
    }
    for (k, v) in tags {
        if k.is_empty() || k.chars().count() > 128 || v.chars().count() > 256 {
            return Err(validation("a tag's Key is 1 to 128 characters, its Value at most 256"));
        }
    }
    let mut keys: Vec<&str> = tags.iter().map(|(k, _)| k.as_str()).collect();
    keys.sort_unstable();
    if keys.windows(2).any(|w| w[0] == w[1]) {
        return Err(AwsError::bad("InvalidInput", "Duplicate tag keys found."));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_arns_parse_with_their_path() {
        assert_eq!(parse_role_arn("arn:aws:iam::123456789012:role/app"), Some(("123456789012", "/", "app")));
        assert_eq!(parse_role_arn("arn:aws:iam::123456789012:role/a/b/app"), Some(("123456789012", "/a/b/", "app")));
        for bad in
            ["arn:aws:iam::12345:role/app", "arn:aws:iam::123456789012:user/app", "arn:aws-hearth:iam::123456789012:role/x", "role/x"]
        {
            assert_eq!(parse_role_arn(bad), None, "{bad}");
        }
    }

    #[test]
    fn names_and_paths_are_bounded() {
        assert!(check_name("RoleName", "a+=,.@-_1", 64).is_ok());
        for bad in ["", "a b", "a/b", &"x".repeat(65), "é"] {
            assert_eq!(check_name("RoleName", bad, 64).unwrap_err().code, "ValidationError", "{bad}");
        }
        assert!(check_path("/").is_ok() && check_path("/a/b/").is_ok());
        for bad in ["", "a/", "/a", "/a b/", &format!("/{}/", "x".repeat(511))] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
    }
}
