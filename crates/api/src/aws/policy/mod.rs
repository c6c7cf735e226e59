//! IAM policy documents: parsing (bounded, every element checked, unsupported conditions
//! refused) and evaluation as AWS documents it.
//!
//! Two kinds: a role's inline *permissions* policies (Action/NotAction,
//! Resource/NotResource, Condition; no Principal) and its *trust* policy (the
//! AssumeRolePolicyDocument: Principal, Action on `sts:*`, Condition; no Resource).
//! Anything this module cannot evaluate exactly (an unknown element, condition operator or
//! key, an action no known service has, a policy variable, `NotPrincipal`, a `Federated`
//! principal) is refused with MalformedPolicyDocument naming it, never ignored: a policy
//! that reads as narrower than it is evaluated would be a hole.
//!
//! Evaluation ([`Policy::evaluate`], [`evaluate_all`]): an explicit Deny in any statement
//! wins; else an Allow; else the implicit deny. `*` and `?` match in actions (without
//! regard to case) and in resources (with regard to case).

mod actions;
mod cond;
mod eval;
#[cfg(test)]
mod tests;

pub use actions::{is_known_action, known_actions, SERVICES};
pub use cond::{Context, SUPPORTED_KEYS, SUPPORTED_OPERATORS};
pub use eval::{evaluate_all, wildcard_match, Decision};

use serde_json::Value;

/// Most characters of an inline permissions policy, whitespace not counted (AWS's 10,240).
pub const MAX_POLICY_CHARS: usize = 10_240;
/// Most characters of a trust policy, whitespace not counted (AWS's default 2,048).
pub const MAX_TRUST_CHARS: usize = 2_048;
/// Most bytes of a document as sent, whitespace included.
pub const MAX_DOCUMENT_BYTES: usize = 128 << 10;
/// Most statements in one document.
pub const MAX_STATEMENTS: usize = 100;
/// Most entries in one Action, Resource, Principal or condition value list.
pub const MAX_LIST: usize = 200;
/// Longest single action, resource, principal or condition value.
pub const MAX_ELEMENT: usize = 2_048;

/// Which document a policy is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A role's inline policy: what its sessions may do.
    Permissions,
    /// A role's AssumeRolePolicyDocument: who may assume it.
    Trust,
}

/// A refusal: MalformedPolicyDocument with what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub String);

fn bad<T>(msg: impl Into<String>) -> Result<T, Malformed> {
    Err(Malformed(msg.into()))
}

/// Allow or Deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Grants.
    Allow,
    /// Refuses, over any Allow.
    Deny,
}

/// A list of patterns, or its negation (`NotAction`, `NotResource`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patterns {
    /// True for the `Not…` form: the statement applies to everything the list does not match.
    pub negated: bool,
    /// The patterns (`*`, `?` wildcards).
    pub items: Vec<String>,
}

/// Who a trust policy's statement names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// `"*"`: anyone.
    Any,
    /// AWS principals, as ARNs (an account id is stored as its root's ARN).
    Aws(Vec<String>),
    /// `Service` principals (`lambda.amazonaws.com`): recorded, never a caller of the daemon.
    Service(Vec<String>),
}

/// One statement.
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    /// Its `Sid`, if any.
    pub sid: Option<String>,
    /// Allow or Deny.
    pub effect: Effect,
    /// Action or NotAction.
    pub actions: Patterns,
    /// Resource or NotResource (none in a trust policy).
    pub resources: Option<Patterns>,
    /// Principals (trust policies only).
    pub principals: Vec<Principal>,
    /// Conditions, all of which must hold.
    pub conditions: Vec<cond::Condition>,
}

/// A parsed, checked policy document.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Permissions or trust.
    pub kind: Kind,
    /// Its statements.
    pub statements: Vec<Statement>,
}

/// One or many strings (`"x"` or `["x", "y"]`), bounded.
fn strings(v: &Value, what: &str) -> Result<Vec<String>, Malformed> {
    let list: Vec<&Value> = match v {
        Value::Array(a) => a.iter().collect(),
        one => vec![one],
    };
    if list.is_empty() {
        return bad(format!("{what} must not be empty"));
    }
    if list.len() > MAX_LIST {
        return bad(format!("{what} has {} entries; at most {MAX_LIST}", list.len()));
    }
    list.into_iter()
        .map(|x| match x {
            Value::String(s) if s.is_empty() => bad(format!("{what} has an empty entry")),
            Value::String(s) if s.len() > MAX_ELEMENT => bad(format!("{what} has an entry over {MAX_ELEMENT} characters")),
            Value::String(s) => Ok(s.clone()),
            other => bad(format!("{what} entries must be strings, not {other}")),
        })
        .collect()
}

fn check_action(a: &str) -> Result<String, Malformed> {
    if a == "*" {
        return Ok(a.to_owned());
    }
    let Some((service, name)) = a.split_once(':') else {
        return bad(format!("action {a:?} is not of the form service:Action"));
    };
    let service = service.to_ascii_lowercase();
    if !SERVICES.contains(&service.as_str()) {
        return bad(format!("action {a:?}: unknown service prefix {service:?} (supported: {})", SERVICES.join(", ")));
    }
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '*' || c == '?') {
        return bad(format!("action {a:?}: the action name must be letters, digits, * and ?"));
    }
    if !is_known_action(&service, name) {
        return bad(format!("action {a:?} matches no {service} action this service knows"));
    }
    Ok(format!("{service}:{name}"))
}

fn check_resource(r: &str) -> Result<String, Malformed> {
    if r.contains("${") {
        return bad(format!("resource {r:?}: policy variables are not supported"));
    }
    if r == "*" || (r.starts_with("arn:") && r.matches(':').count() >= 5) {
        return Ok(r.to_owned());
    }
    bad(format!("resource {r:?} must be \"*\" or an ARN (arn:partition:service:region:account:resource)"))
}

/// An AWS principal as an ARN: account ids become their root's ARN.
fn check_aws_principal(p: &str) -> Result<String, Malformed> {
    let digits12 = |s: &str| s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit());
    if digits12(p) {
        return Ok(format!("arn:aws:iam::{p}:root"));
    }
    let parts: Vec<&str> = p.splitn(6, ':').collect();
    if let ["arn", "aws", svc, "", account, rest] = parts.as_slice() {
        let ok = digits12(account)
            && !rest.contains('*')
            && !rest.contains('?')
            && match *svc {
                "iam" => *rest == "root" || rest.strip_prefix("role/").is_some_and(|n| !n.is_empty()),
                "sts" => rest.strip_prefix("assumed-role/").is_some_and(|n| n.split('/').count() == 2),
                _ => false,
            };
        if ok {
            return Ok(p.to_owned());
        }
    }
    bad(format!(
        "principal {p:?} is not supported: name \"*\", an account id, arn:aws:iam::<account>:root, a role's ARN or an assumed-role ARN"
    ))
}

fn principals(v: &Value) -> Result<Vec<Principal>, Malformed> {
    match v {
        Value::String(s) if s == "*" => Ok(vec![Principal::Any]),
        Value::Object(m) if !m.is_empty() => m
            .iter()
            .map(|(k, v)| match k.as_str() {
                "AWS" => {
                    let list = strings(v, "Principal.AWS")?;
                    if list.iter().any(|p| p == "*") {
                        return Ok(Principal::Any);
                    }
                    Ok(Principal::Aws(list.iter().map(|p| check_aws_principal(p)).collect::<Result<_, _>>()?))
                }
                "Service" => {
                    let list = strings(v, "Principal.Service")?;
                    if let Some(s) = list.iter().find(|s| !s.ends_with(".amazonaws.com") || s.contains('*')) {
                        return bad(format!("service principal {s:?} must be a service's name, such as lambda.amazonaws.com"));
                    }
                    Ok(Principal::Service(list))
                }
                other => bad(format!("principal type {other:?} is not supported (AWS and Service are)")),
            })
            .collect(),
        _ => bad("Principal must be \"*\" or an object such as {\"AWS\": \"arn:aws:iam::123456789012:root\"}"),
    }
}

fn statement(v: &Value, kind: Kind, index: usize) -> Result<Statement, Malformed> {
    let Value::Object(m) = v else {
        return bad(format!("statement {index} must be an object"));
    };
    let at = |s: &str| format!("statement {index}: {s}");
    for k in m.keys() {
        let allowed = match k.as_str() {
            "Sid" | "Effect" | "Action" | "NotAction" | "Condition" => true,
            "Resource" | "NotResource" => kind == Kind::Permissions,
            "Principal" => kind == Kind::Trust,
            _ => false,
        };
        if !allowed {
            let why = match (k.as_str(), kind) {
                ("Principal", Kind::Permissions) => "a role's permissions policy names no Principal",
                ("Resource" | "NotResource", Kind::Trust) => "a trust policy names no Resource",
                ("NotPrincipal", _) => "NotPrincipal is not supported",
                _ => "unknown element",
            };
            return bad(at(&format!("{k}: {why}")));
        }
    }
    let sid = match m.get("Sid") {
        None => None,
        Some(Value::String(s)) if s.len() <= 128 && s.chars().all(|c| c.is_ascii_alphanumeric()) => Some(s.clone()),
        Some(_) => return bad(at("Sid must be letters and digits (at most 128)")),
    };
    let effect = match m.get("Effect").and_then(Value::as_str) {
        Some("Allow") => Effect::Allow,
        Some("Deny") => Effect::Deny,
        _ => return bad(at("Effect must be \"Allow\" or \"Deny\"")),
    };
    let pick = |a: &str, not: &str| -> Result<Option<Patterns>, Malformed> {
        match (m.get(a), m.get(not)) {
            (Some(_), Some(_)) => bad(at(&format!("give {a} or {not}, not both"))),
            (Some(v), None) => Ok(Some(Patterns { negated: false, items: strings(v, a)? })),
            (None, Some(v)) => Ok(Some(Patterns { negated: true, items: strings(v, not)? })),
            (None, None) => Ok(None),
        }
    };
    let mut actions = pick("Action", "NotAction")?.ok_or_else(|| Malformed(at("it needs an Action or NotAction")))?;
    actions.items = actions.items.iter().map(|a| check_action(a).map_err(|e| Malformed(at(&e.0)))).collect::<Result<_, _>>()?;
    let resources = match kind {
        Kind::Permissions => {
            let mut r = pick("Resource", "NotResource")?.ok_or_else(|| Malformed(at("it needs a Resource or NotResource")))?;
            r.items = r.items.iter().map(|x| check_resource(x).map_err(|e| Malformed(at(&e.0)))).collect::<Result<_, _>>()?;
            Some(r)
        }
        Kind::Trust => {
            if let Some(a) = actions.items.iter().find(|a| *a != "*" && !a.starts_with("sts:")) {
                return bad(at(&format!("a trust policy's actions are sts: actions, not {a:?}")));
            }
            None
        }
    };
    let principals = match (kind, m.get("Principal")) {
        (Kind::Trust, Some(p)) => principals(p).map_err(|e| Malformed(at(&e.0)))?,
        (Kind::Trust, None) => return bad(at("a trust policy's statement needs a Principal")),
        (Kind::Permissions, _) => Vec::new(),
    };
    let conditions = match m.get("Condition") {
        None => Vec::new(),
        Some(c) => cond::parse(c).map_err(|e| Malformed(at(&e.0)))?,
    };
    Ok(Statement { sid, effect, actions, resources, principals, conditions })
}

impl Policy {
    /// Parses and checks `text` as a policy of `kind`.
    ///
    /// # Errors
    ///
    /// [`Malformed`] naming the first thing wrong or unsupported.
    pub fn parse(text: &str, kind: Kind) -> Result<Policy, Malformed> {
        let limit = if kind == Kind::Trust { MAX_TRUST_CHARS } else { MAX_POLICY_CHARS };
        if text.len() > MAX_DOCUMENT_BYTES {
            return bad(format!("the policy document is over {MAX_DOCUMENT_BYTES} bytes"));
        }
        let chars = text.chars().filter(|c| !c.is_whitespace()).count();
        if chars > limit {
            return bad(format!("the policy document has {chars} characters (whitespace not counted); at most {limit}"));
        }
        let v: Value = serde_json::from_str(text).map_err(|e| Malformed(format!("the policy document is not JSON: {e}")))?;
        let Value::Object(m) = v else {
            return bad("the policy document must be a JSON object");
        };
        if let Some(k) = m.keys().find(|k| !matches!(k.as_str(), "Version" | "Id" | "Statement")) {
            return bad(format!("unknown element {k:?} (a policy has Version, Id and Statement)"));
        }
        match m.get("Version") {
            None => {}
            Some(Value::String(v)) if v == "2012-10-17" || v == "2008-10-17" => {}
            Some(other) => return bad(format!("Version {other} is not 2012-10-17 or 2008-10-17")),
        }
        if m.get("Id").is_some_and(|i| !i.is_string()) {
            return bad("Id must be a string");
        }
        let list: Vec<&Value> = match m.get("Statement") {
            Some(Value::Array(a)) => a.iter().collect(),
            Some(one @ Value::Object(_)) => vec![one],
            _ => return bad("Statement must be an object or a list of them"),
        };
        if list.is_empty() || list.len() > MAX_STATEMENTS {
            return bad(format!("a policy has 1 to {MAX_STATEMENTS} statements, not {}", list.len()));
        }
        let statements = list.iter().enumerate().map(|(i, s)| statement(s, kind, i)).collect::<Result<Vec<_>, _>>()?;
        let mut sids: Vec<&str> = statements.iter().filter_map(|s| s.sid.as_deref()).collect();
        sids.sort_unstable();
        if let Some(w) = sids.windows(2).find(|w| w[0] == w[1]) {
            return bad(format!("Sid {:?} is used by two statements", w[0]));
        }
        Ok(Policy { kind, statements })
    }
}
