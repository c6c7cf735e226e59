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
        Principal::Role { .. } => {
            if svc.caller_allowed(caller, action, resource).await? {
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

/// What a Lambda MicroVMs call hands to the service on the caller's behalf, checked for a
/// role session as AWS checks it: a role it names (`executionRoleArn`, `buildRoleArn`)
/// needs `iam:PassRole` on that role, so a narrow session cannot run a microvm under a
/// broader role and read its credentials from inside; a KMS key it names
/// (`kmsKeyIdentifier`: key id, key ARN, alias name or alias ARN, resolved to the key's
/// ARN) needs `kms:GenerateDataKey` and `kms:Decrypt` on that key, as a service using a
/// customer managed key for its caller needs the caller's own permission on it. A key
/// that names nothing of the account is left to the operation (ValidationException). The
/// account's root may hand over anything of its account.
///
/// # Errors
///
/// AccessDeniedException (403) naming the action and the role's or key's ARN; the store's.
pub async fn authorize_handed_over(
    svc: &crate::service::Service,
    caller: &Caller,
    input: &serde_json::Map<String, serde_json::Value>,
) -> Result<(), ApiError> {
    if caller.principal == Principal::Root {
        return Ok(());
    }
    for k in ["executionRoleArn", "buildRoleArn"] {
        if let Some(role) = input.get(k).and_then(serde_json::Value::as_str) {
            authorize(svc, caller, "iam:PassRole", role).await?;
        }
    }
    if let Some(ident) = input.get("kmsKeyIdentifier").and_then(serde_json::Value::as_str) {
        let arn = match svc.kms_key_material(&caller.account, ident).await {
            Ok((arn, _)) => arn,
            Err(e) if e.kind == Kind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for action in ["kms:GenerateDataKey", "kms:Decrypt"] {
            authorize(svc, caller, action, &arn).await?;
        }
    }
    Ok(())
}

/// The IAM action (`lambda:…`) and resource of a call to Hearth's extensions
/// (`/hearth/v1/…`, `method` and the whole `path`) by `account`: a microvm's ARN for calls on
/// one microvm, else `*`. A path this table does not know is `lambda:InvokeHearthExtension`
/// (which only `lambda:*` or that name grants).
pub fn extension_action(method: &http::Method, path: &str, account: &str) -> (String, String) {
    use crate::service::{PARTITION, REGION};
    let rest = path.strip_prefix("/hearth/v1/").unwrap_or(path);
    // Decoded segment by segment exactly as `crate::extensions::extension` routes them: a
    // percent-encoded name (`%65xec`) must meet the same action it runs as.
    let decoded = crate::extensions::segments(rest);
    let parts: Vec<&str> = decoded.iter().map(String::as_str).collect();
    let microvm = |id: &str| {
        let id = id.to_owned();
        let prefix = format!("arn:{PARTITION}:lambda:{REGION}:{account}:microvm:");
        if id.starts_with(&prefix) {
            id
        } else {
            format!("{prefix}{id}")
        }
    };
    let (action, resource) = match (method.as_str(), parts.as_slice()) {
        ("POST", ["microvms", id, "exec"]) => ("ExecuteMicrovmCommand", microvm(id)),
        ("GET", ["microvms", id, "files"]) => ("ReadMicrovmFile", microvm(id)),
        ("PUT", ["microvms", id, "files"]) => ("WriteMicrovmFile", microvm(id)),
        ("GET", ["microvms", id, "files", "list"]) => ("ListMicrovmFiles", microvm(id)),
        // A tree as a tar archive: the same permissions as its files.
        ("GET", ["microvms", id, "files", "archive"]) => ("ReadMicrovmFile", microvm(id)),
        ("PUT", ["microvms", id, "files", "archive"]) => ("WriteMicrovmFile", microvm(id)),
        ("POST", ["microvms", id, "link"]) => ("CreateMicrovmLink", microvm(id)),
        ("POST", ["microvms", id, "fork"]) => ("ForkMicrovm", microvm(id)),
        ("GET", ["microvms", id, "egress"]) => ("GetMicrovmEgress", microvm(id)),
        ("PUT", ["microvms", id, "egress"]) => ("PutMicrovmEgress", microvm(id)),
        ("GET", ["egress-connectors"]) => ("ListEgressConnectors", "*".to_owned()),
        ("GET", ["egress-connectors", _]) => ("GetEgressConnector", "*".to_owned()),
        ("PUT", ["egress-connectors", _]) => ("PutEgressConnector", "*".to_owned()),
        ("DELETE", ["egress-connectors", _]) => ("DeleteEgressConnector", "*".to_owned()),
        ("POST", ["artifacts"]) => ("UploadCodeArtifact", "*".to_owned()),
        ("GET", ["usage"]) => ("GetUsage", "*".to_owned()),
        _ => ("InvokeHearthExtension", "*".to_owned()),
    };
    (format!("lambda:{action}"), resource)
}

/// The resource of Lambda MicroVMs operation `input` names: the microvm's ARN for calls on
/// one microvm (`microvmIdentifier`), the image's for calls on one image
/// (`imageIdentifier`), else `*`.
pub fn operation_resource(input: &serde_json::Map<String, serde_json::Value>, account: &str) -> String {
    use crate::service::{image_arn, PARTITION, REGION};
    let s = |k: &str| input.get(k).and_then(serde_json::Value::as_str);
    if let Some(id) = s("microvmIdentifier") {
        let prefix = format!("arn:{PARTITION}:lambda:{REGION}:{account}:microvm:");
        return if id.starts_with("arn:") { id.to_owned() } else { format!("{prefix}{id}") };
    }
    if let Some(id) = s("imageIdentifier") {
        return if id.starts_with("arn:") { id.to_owned() } else { image_arn(account, id) };
    }
    // TagResource, UntagResource, ListTags: the resource's ARN as given.
    if let Some(arn) = s("Resource") {
        return arn.to_owned();
    }
    "*".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_are_authorized_as_lambda_actions_on_the_microvm() {
        let a = "123456789012";
        let arn = "arn:aws-hearth:lambda:hh-local-1:123456789012:microvm:mvm-1";
        let rows: &[(&str, &str, &str, &str)] = &[
            ("POST", "/hearth/v1/microvms/mvm-1/exec", "lambda:ExecuteMicrovmCommand", arn),
            ("PUT", "/hearth/v1/microvms/mvm-1/files", "lambda:WriteMicrovmFile", arn),
            ("PUT", "/hearth/v1/microvms/mvm-1/files/archive", "lambda:WriteMicrovmFile", arn),
            (
                "GET",
                "/hearth/v1/microvms/arn%3Aaws-hearth%3Alambda%3Ahh-local-1%3A123456789012%3Amicrovm%3Amvm-1/files",
                "lambda:ReadMicrovmFile",
                arn,
            ),
            // Percent-encoded names are the extension they route to.
            ("POST", "/hearth/v1/microvms/mvm-1/%65xec", "lambda:ExecuteMicrovmCommand", arn),
            ("PUT", "/hearth/v1/%6dicrovms/mvm-1/%66iles", "lambda:WriteMicrovmFile", arn),
            ("POST", "/hearth/v1/artifacts", "lambda:UploadCodeArtifact", "*"),
            ("GET", "/hearth/v1/somewhere-new", "lambda:InvokeHearthExtension", "*"),
        ];
        for (m, p, action, resource) in rows {
            let got = extension_action(&m.parse().unwrap(), p, a);
            assert_eq!((got.0.as_str(), got.1.as_str()), (*action, *resource), "{m} {p}");
            let name = action.trim_start_matches("lambda:");
            assert!(crate::aws::policy::is_known_action("lambda", name), "{action} must be a policy action");
        }
    }

    #[test]
    fn operations_name_their_resource() {
        let a = "123456789012";
        let input = |k: &str, v: &str| serde_json::json!({ k: v }).as_object().unwrap().clone();
        let image = "arn:aws-hearth:lambda:hh-local-1:123456789012:microvm-image:web";
        assert_eq!(operation_resource(&input("imageIdentifier", "web"), a), image);
        assert_eq!(operation_resource(&input("Resource", image), a), image, "tags are on the resource they name");
        assert_eq!(
            operation_resource(&input("microvmIdentifier", "mvm-1"), a),
            "arn:aws-hearth:lambda:hh-local-1:123456789012:microvm:mvm-1"
        );
        assert_eq!(operation_resource(&serde_json::Map::new(), a), "*");
    }
}
