//! IAM and STS over the AWS query protocol: a form-encoded body (`Action=…&Version=…`),
//! answered with `<ActionResponse><ActionResult>…</ActionResult>…` XML, as botocore reads
//! it (policy documents URL-encoded, as AWS sends them and botocore decodes them).
//!
//! IAM (Version 2010-05-08): CreateRole, GetRole, ListRoles, DeleteRole, PutRolePolicy,
//! GetRolePolicy, DeleteRolePolicy, ListRolePolicies. STS (Version 2011-06-15):
//! GetCallerIdentity, AssumeRole. Every call but GetCallerIdentity is authorized
//! ([`crate::auth::authorize`]) with its IAM action on the role's ARN.

use super::AwsError;
use crate::auth::{authorize, Caller, Principal};
use crate::service::{NewRole, Role, Service};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// IAM's namespace and API version.
pub const IAM_NS: &str = "https://iam.amazonaws.com/doc/2010-05-08/";
/// STS's.
pub const STS_NS: &str = "https://sts.amazonaws.com/doc/2011-06-15/";
/// Most parameters in one request.
const MAX_PARAMS: usize = 200;

/// `s` escaped for XML text and attribute values.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// `t` (seconds since the epoch) as ISO 8601 in UTC, `2026-01-02T03:04:05Z`.
pub fn iso8601(t: f64) -> String {
    crate::clock::iso8601(t)
}

/// A policy document as IAM answers it: URL-encoded.
pub fn url_encode(s: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');
    percent_encoding::utf8_percent_encode(s, SET).to_string()
}

/// A refusal in the query services' own codes (`AccessDenied`, `InvalidClientTokenId`, …)
/// rather than the JSON services' names [`AwsError::from`] gives.
pub fn to_query(e: AwsError) -> AwsError {
    let code = match e.code.as_str() {
        "AccessDeniedException" => "AccessDenied",
        "UnrecognizedClientException" => "InvalidClientTokenId",
        "InvalidSignatureException" => "SignatureDoesNotMatch",
        "ThrottlingException" => "Throttling",
        "ValidationException" => "ValidationError",
        "LimitExceededException" => "LimitExceeded",
        "RequestEntityTooLarge" => "RequestEntityTooLarge",
        _ => return e,
    };
    AwsError { code: code.to_owned(), ..e }
}

/// The request's parameters.
struct Params(Vec<(String, String)>);

impl Params {
    fn get(&self, k: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }

    fn required(&self, k: &str) -> Result<&str, AwsError> {
        self.get(k).ok_or_else(|| AwsError::bad("ValidationError", format!("1 validation error detected: {k} is required")))
    }

    fn number(&self, k: &str, lo: u64, hi: u64) -> Result<Option<u64>, AwsError> {
        self.get(k)
            .map(|v| v.parse::<u64>().ok().filter(|n| (lo..=hi).contains(n)))
            .map(|n| n.ok_or_else(|| AwsError::bad("ValidationError", format!("{k} must be a whole number from {lo} to {hi}"))))
            .transpose()
    }

    /// `Tags.member.N.Key` / `.Value`, N from 1, in order.
    fn tags(&self) -> Result<Vec<(String, String)>, AwsError> {
        let mut tags = Vec::new();
        for n in 1..=crate::service::MAX_ROLE_TAGS + 1 {
            match self.get(&format!("Tags.member.{n}.Key")) {
                Some(k) => tags.push((k.to_owned(), self.get(&format!("Tags.member.{n}.Value")).unwrap_or_default().to_owned())),
                None => break,
            }
        }
        Ok(tags)
    }
}

fn respond(action: &str, ns: &str, result: Option<String>) -> Response {
    let id = crate::keys::random_hex(16);
    let result = result.map(|r| format!("<{action}Result>{r}</{action}Result>")).unwrap_or_default();
    let body = format!(
        "<{action}Response xmlns=\"{ns}\">{result}<ResponseMetadata><RequestId>{id}</RequestId></ResponseMetadata></{action}Response>"
    );
    (http::StatusCode::OK, [("content-type", "text/xml"), ("x-amzn-requestid", id.as_str())], body).into_response()
}

fn el(name: &str, v: &str) -> String {
    format!("<{name}>{}</{name}>", xml_escape(v))
}

/// A role as IAM's `Role` shape.
pub fn role_xml(r: &Role) -> String {
    let mut s = String::new();
    s += &el("Path", &r.path);
    s += &el("RoleName", &r.name);
    s += &el("RoleId", &r.id);
    s += &el("Arn", &r.arn);
    s += &el("CreateDate", &iso8601(r.created));
    s += &el("AssumeRolePolicyDocument", &url_encode(&r.trust));
    if let Some(d) = &r.description {
        s += &el("Description", d);
    }
    s += &el("MaxSessionDuration", &r.max_session.to_string());
    if !r.tags.is_empty() {
        s += "<Tags>";
        for (k, v) in &r.tags {
            s += &format!("<member>{}{}</member>", el("Key", k), el("Value", v));
        }
        s += "</Tags>";
    }
    s
}

/// The ARN of role `name` as the resource of an IAM action: the role's own when it exists.
async fn role_resource(svc: &Service, account: &str, name: &str) -> String {
    match svc.role(account, name).await {
        Ok(Some(r)) => r.arn,
        _ => format!("arn:aws:iam::{account}:role/{name}"),
    }
}

/// One page of `items` after `marker`, at most `max`: the page, and the next marker.
fn page<T>(items: Vec<(String, T)>, marker: Option<&str>, max: usize) -> (Vec<T>, Option<String>) {
    let mut rest: Vec<(String, T)> = items.into_iter().filter(|(k, _)| marker.is_none_or(|m| k.as_str() >= m)).collect();
    let next = (rest.len() > max).then(|| rest[max].0.clone());
    rest.truncate(max);
    (rest.into_iter().map(|(_, t)| t).collect(), next)
}

fn truncated(next: Option<String>) -> String {
    match next {
        Some(m) => format!("<IsTruncated>true</IsTruncated>{}", el("Marker", &m)),
        None => "<IsTruncated>false</IsTruncated>".to_owned(),
    }
}

async fn iam(svc: &Service, caller: &Caller, action: &str, p: &Params) -> Result<Response, AwsError> {
    let account = caller.account.as_str();
    let ok = |inner: Option<String>| Ok(respond(action, IAM_NS, inner));
    match action {
        "CreateRole" => {
            let name = p.required("RoleName")?;
            let path = p.get("Path").unwrap_or("/");
            authorize(svc, caller, "iam:CreateRole", &format!("arn:aws:iam::{account}:role{path}{name}")).await?;
            let r = NewRole {
                name: name.to_owned(),
                path: p.get("Path").map(str::to_owned),
                trust: p.required("AssumeRolePolicyDocument")?.to_owned(),
                description: p.get("Description").map(str::to_owned),
                max_session: p.number("MaxSessionDuration", 0, u64::MAX)?,
                tags: p.tags()?,
            };
            let role = svc.create_role(account, r).await?;
            ok(Some(format!("<Role>{}</Role>", role_xml(&role))))
        }
        "GetRole" => {
            let name = p.required("RoleName")?;
            authorize(svc, caller, "iam:GetRole", &role_resource(svc, account, name).await).await?;
            let role = svc.get_role(account, name).await?;
            ok(Some(format!("<Role>{}</Role>", role_xml(&role))))
        }
        "ListRoles" => {
            authorize(svc, caller, "iam:ListRoles", "*").await?;
            let prefix = p.get("PathPrefix").unwrap_or("/");
            let max = p.number("MaxItems", 1, 1000)?.unwrap_or(100) as usize;
            let roles = svc.list_roles(account, prefix).await?;
            let (roles, next) = page(roles.into_iter().map(|r| (r.name.to_ascii_lowercase(), r)).collect(), p.get("Marker"), max);
            let members: String = roles.iter().map(|r| format!("<member>{}</member>", role_xml(r))).collect();
            ok(Some(format!("<Roles>{members}</Roles>{}", truncated(next))))
        }
        "DeleteRole" => {
            let name = p.required("RoleName")?;
            authorize(svc, caller, "iam:DeleteRole", &role_resource(svc, account, name).await).await?;
            svc.delete_role(account, name).await?;
            ok(None)
        }
        "PutRolePolicy" => {
            let name = p.required("RoleName")?;
            authorize(svc, caller, "iam:PutRolePolicy", &role_resource(svc, account, name).await).await?;
            svc.put_role_policy(account, name, p.required("PolicyName")?, p.required("PolicyDocument")?).await?;
            ok(None)
        }
        "GetRolePolicy" => {
            let name = p.required("RoleName")?;
            authorize(svc, caller, "iam:GetRolePolicy", &role_resource(svc, account, name).await).await?;
            let policy = p.required("PolicyName")?;
            let (role, doc) = svc.get_role_policy(account, name, policy).await?;
            ok(Some(format!("{}{}{}", el("RoleName", &role), el("PolicyName", policy), el("PolicyDocument", &url_encode(&doc)))))
        }
        "DeleteRolePolicy" => {
            let name = p.required("RoleName")?;
            authorize(svc, caller, "iam:DeleteRolePolicy", &role_resource(svc, account, name).await).await?;
            svc.delete_role_policy(account, name, p.required("PolicyName")?).await?;
            ok(None)
        }
        "ListRolePolicies" => {
            let name = p.required("RoleName")?;
            authorize(svc, caller, "iam:ListRolePolicies", &role_resource(svc, account, name).await).await?;
            let max = p.number("MaxItems", 1, 1000)?.unwrap_or(100) as usize;
            let names = svc.list_role_policies(account, name).await?;
            let (names, next) = page(names.into_iter().map(|n| (n.clone(), n)).collect(), p.get("Marker"), max);
            let members: String = names.iter().map(|n| el("member", n)).collect();
            ok(Some(format!("<PolicyNames>{members}</PolicyNames>{}", truncated(next))))
        }
        other => {
            Err(AwsError::bad("InvalidAction", format!("IAM action {other:.64} is not served here (roles and their inline policies are)")))
        }
    }
}

async fn sts(svc: &Service, caller: &Caller, action: &str, p: &Params) -> Result<Response, AwsError> {
    match action {
        // Always allowed, as on AWS.
        "GetCallerIdentity" => {
            let user_id = match &caller.principal {
                Principal::Root => caller.account.clone(),
                Principal::Role { role_arn, session_name, .. } => {
                    let id = svc.role_by_arn(&caller.account, role_arn).await?.map(|r| r.id).unwrap_or_default();
                    format!("{id}:{session_name}")
                }
            };
            let inner = format!("{}{}{}", el("Arn", &caller.arn()), el("UserId", &user_id), el("Account", &caller.account));
            Ok(respond(action, STS_NS, Some(inner)))
        }
        "AssumeRole" => {
            let role_arn = p.required("RoleArn")?;
            let session = p.required("RoleSessionName")?;
            let duration = p.number("DurationSeconds", 0, u64::MAX)?;
            let (c, role_id) = svc.assume_role(caller, role_arn, session, duration).await?;
            let role_name = role_arn.rsplit('/').next().unwrap_or_default();
            let inner = format!(
                "<Credentials>{}{}{}{}</Credentials><AssumedRoleUser>{}{}</AssumedRoleUser>",
                el("AccessKeyId", &c.access_key_id),
                el("SecretAccessKey", &c.secret_access_key),
                el("SessionToken", &c.session_token),
                el("Expiration", &iso8601(c.expiration)),
                el("AssumedRoleId", &format!("{role_id}:{session}")),
                el("Arn", &format!("arn:aws:sts::{}:assumed-role/{role_name}/{session}", caller.account)),
            );
            Ok(respond(action, STS_NS, Some(inner)))
        }
        other => {
            Err(AwsError::bad("InvalidAction", format!("STS action {other:.64} is not served here (GetCallerIdentity and AssumeRole are)")))
        }
    }
}

/// Runs one IAM or STS call.
///
/// # Errors
///
/// The service's refusals, in the query services' codes.
pub async fn handle(svc: &Arc<Service>, caller: &Caller, service: &str, body: &[u8]) -> Result<Response, AwsError> {
    let form = std::str::from_utf8(body).map_err(|_| AwsError::bad("MalformedQueryString", "the form body is not UTF-8"))?;
    let pairs = crate::server::query_pairs(Some(form));
    if pairs.len() > MAX_PARAMS {
        return Err(AwsError::bad("MalformedQueryString", format!("at most {MAX_PARAMS} parameters")));
    }
    let p = Params(pairs);
    let action = p.get("Action").ok_or_else(|| AwsError::bad("MissingAction", "the request names no Action"))?.to_owned();
    let version = if service == "iam" { "2010-05-08" } else { "2011-06-15" };
    if p.get("Version") != Some(version) {
        return Err(AwsError::bad("InvalidParameterValue", format!("{service} speaks Version {version}")));
    }
    let r = if service == "iam" { iam(svc, caller, &action, &p).await } else { sts(svc, caller, &action, &p).await };
    r.map_err(to_query)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_iso8601_utc() {
        assert_eq!(iso8601(0.0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601(951_782_400.0), "2000-02-29T00:00:00Z");
        assert_eq!(iso8601(1_767_225_599.9), "2025-12-31T23:59:59Z");
        assert_eq!(iso8601(4_102_444_800.0), "2100-01-01T00:00:00Z");
    }

    #[test]
    fn policies_are_url_encoded_as_iam_sends_them() {
        assert_eq!(url_encode(r#"{"a": "b*"}"#), "%7B%22a%22%3A%20%22b%2A%22%7D");
        let enc = url_encode("é ~x");
        assert_eq!(percent_encoding::percent_decode_str(&enc).decode_utf8().unwrap(), "é ~x");
    }

    #[test]
    fn pages_continue_at_their_marker() {
        let items: Vec<(String, u32)> = (0..5).map(|i| (format!("r{i}"), i)).collect();
        let (a, next) = page(items.clone(), None, 2);
        assert_eq!((a, next.as_deref()), (vec![0, 1], Some("r2")));
        let (b, next) = page(items.clone(), Some("r2"), 2);
        assert_eq!((b, next.as_deref()), (vec![2, 3], Some("r4")));
        let (c, next) = page(items, Some("r4"), 2);
        assert_eq!((c, next), (vec![4], None));
    }

    #[test]
    fn roles_answer_in_iams_shape() {
        let r = Role {
            name: "app".into(),
            id: "AROAABCDEFGHIJKLMNOPQ".into(),
            arn: "arn:aws:iam::123456789012:role/app".into(),
            path: "/".into(),
            created: 0.0,
            trust: "{\"x\":\"<&>\"}".into(),
            description: Some("a & b".into()),
            max_session: 3600,
            tags: vec![("k".into(), "v".into())],
        };
        let x = role_xml(&r);
        assert!(x.starts_with("<Path>/</Path><RoleName>app</RoleName><RoleId>AROAABCDEFGHIJKLMNOPQ</RoleId>"), "{x}");
        assert!(x.contains("<CreateDate>1970-01-01T00:00:00Z</CreateDate>"));
        assert!(x.contains("<AssumeRolePolicyDocument>%7B%22x%22%3A%22%3C%26%3E%22%7D</AssumeRolePolicyDocument>"), "{x}");
        assert!(x.contains("<Description>a &amp; b</Description>"));
        assert!(x.contains("<Tags><member><Key>k</Key><Value>v</Value></member></Tags>"));
        let codes: Vec<String> = ["AccessDeniedException", "UnrecognizedClientException", "NoSuchEntity"]
            .iter()
            .map(|c| to_query(AwsError::new(403, c, "m")).code)
            .collect();
        assert_eq!(codes, ["AccessDenied", "InvalidClientTokenId", "NoSuchEntity"]);
    }
}
