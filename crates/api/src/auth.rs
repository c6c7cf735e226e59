//! Who is calling, and what they may do.
//!
//! Every signed request is made by a [`Caller`]: a tenant's own access key (the account's
//! root: everything in its account is allowed, as on AWS) or temporary credentials of a
//! role (from STS AssumeRole, or handed to a microvm through its metadata service), which
//! carry exactly the permissions of the role's policies ([`crate::aws::policy`]).
//! [`authorize`] is the one check; each operation calls it with its IAM action
//! (`secretsmanager:GetSecretValue`, `lambda:RunMicrovm`, …) and the resource's ARN.

use crate::error::{ApiError, Kind};

/// The principal behind a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The account's own access key: its root user.
    Root,
    /// Temporary credentials of a role.
    Role {
        /// The role's ARN (`arn:aws:iam::<account>:role/<name>`).
        role_arn: String,
        /// The session's name (`hearth-<microvm id>` for a microvm's credentials).
        session_name: String,
        /// The microvm the credentials were issued to, if any.
        microvm: Option<String>,
    },
}

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The 12-digit account.
    pub account: String,
    /// The access key id the request was signed with.
    pub access_key: String,
    /// Who it is.
    pub principal: Principal,
}

impl Caller {
    /// The account's root user, signing with `access_key`.
    pub fn root(account: &str, access_key: &str) -> Caller {
        Caller { account: account.to_owned(), access_key: access_key.to_owned(), principal: Principal::Root }
    }

    /// The caller's ARN as GetCallerIdentity answers it.
    pub fn arn(&self) -> String {
        match &self.principal {
            Principal::Root => format!("arn:aws:iam::{}:root", self.account),
            Principal::Role { role_arn, session_name, .. } => {
                let name = role_arn.rsplit('/').next().unwrap_or_default();
                format!("arn:aws:sts::{}:assumed-role/{name}/{session_name}", self.account)
            }
        }
    }
}

/// Whether `caller` may do `action` (`service:Operation`) on `resource` (an ARN, or `*`).
/// The root user may do anything in its account; a role what its policies allow and none
/// denies.
///
/// # Errors
///
/// AccessDeniedException (403) naming the action, the resource and the caller.
pub async fn authorize(svc: &crate::service::Service, caller: &Caller, action: &str, resource: &str) -> Result<(), ApiError> {
    match &caller.principal {
        Principal::Root => Ok(()),
        Principal::Role { role_arn, .. } => {
            if svc.role_allows(&caller.account, role_arn, action, resource).await? {
                Ok(())
            } else {
                Err(ApiError::new(
                    Kind::AccessDenied,
                    format!("{} is not authorized to perform: {action} on resource: {resource}", caller.arn()),
                ))
            }
        }
    }
}
