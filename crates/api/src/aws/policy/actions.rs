//! The actions a policy may name: `service:Operation` of a service Hearth serves. A name (or
//! a pattern with `*` and `?`) that matches none of them is refused: a typo would otherwise
//! grant or deny nothing without a word.

/// The service prefixes of actions.
pub const SERVICES: [&str; 5] = ["iam", "sts", "secretsmanager", "kms", "lambda"];

/// IAM's actions served here.
const IAM: &[&str] = &[
    "CreateRole",
    "GetRole",
    "ListRoles",
    "DeleteRole",
    "PutRolePolicy",
    "GetRolePolicy",
    "DeleteRolePolicy",
    "ListRolePolicies",
    "PassRole",
];

/// STS's.
const STS: &[&str] = &["AssumeRole", "GetCallerIdentity"];

/// Secrets Manager's actions (AWS's list: a policy written for AWS reads the same here).
const SECRETSMANAGER: &[&str] = &[
    "BatchGetSecretValue",
    "CancelRotateSecret",
    "CreateSecret",
    "DeleteResourcePolicy",
    "DeleteSecret",
    "DescribeSecret",
    "GetRandomPassword",
    "GetResourcePolicy",
    "GetSecretValue",
    "ListSecretVersionIds",
    "ListSecrets",
    "PutResourcePolicy",
    "PutSecretValue",
    "RemoveRegionsFromReplication",
    "ReplicateSecretToRegions",
    "RestoreSecret",
    "RotateSecret",
    "StopReplicationToReplica",
    "TagResource",
    "UntagResource",
    "UpdateSecret",
    "UpdateSecretVersionStage",
    "ValidateResourcePolicy",
];

/// KMS's actions (AWS's, for keys and aliases).
const KMS: &[&str] = &[
    "CancelKeyDeletion",
    "CreateAlias",
    "CreateGrant",
    "CreateKey",
    "Decrypt",
    "DeleteAlias",
    "DescribeKey",
    "DisableKey",
    "DisableKeyRotation",
    "EnableKey",
    "EnableKeyRotation",
    "Encrypt",
    "GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext",
    "GenerateRandom",
    "GetKeyPolicy",
    "GetKeyRotationStatus",
    "GetPublicKey",
    "ListAliases",
    "ListGrants",
    "ListKeyPolicies",
    "ListKeys",
    "ListResourceTags",
    "PutKeyPolicy",
    "ReEncryptFrom",
    "ReEncryptTo",
    "RetireGrant",
    "RevokeGrant",
    "ScheduleKeyDeletion",
    "Sign",
    "TagResource",
    "UntagResource",
    "UpdateAlias",
    "UpdateKeyDescription",
    "Verify",
];

/// Hearth's extensions (`/hearth/v1/…`), authorized as `lambda:` actions
/// ([`crate::auth::extension_action`]).
pub const HEARTH_EXTENSIONS: &[&str] = &[
    "ExecuteMicrovmCommand",
    "ReadMicrovmFile",
    "WriteMicrovmFile",
    "ListMicrovmFiles",
    "CreateMicrovmLink",
    "ForkMicrovm",
    "GetMicrovmEgress",
    "PutMicrovmEgress",
    "ListEgressConnectors",
    "GetEgressConnector",
    "PutEgressConnector",
    "DeleteEgressConnector",
    "UploadCodeArtifact",
    "GetUsage",
    "InvokeHearthExtension",
];

/// The action names of `service` (lowercase prefix).
pub fn known_actions(service: &str) -> Vec<&'static str> {
    match service {
        "iam" => IAM.to_vec(),
        "sts" => STS.to_vec(),
        "secretsmanager" => SECRETSMANAGER.to_vec(),
        "kms" => KMS.to_vec(),
        "lambda" => crate::model::model().operations().iter().map(|o| o.name.as_str()).chain(HEARTH_EXTENSIONS.iter().copied()).collect(),
        _ => Vec::new(),
    }
}

/// Whether `name` (an action name or a pattern of one) matches some action of `service`.
pub fn is_known_action(service: &str, name: &str) -> bool {
    known_actions(service).iter().any(|a| super::wildcard_match(name, a, true))
}
