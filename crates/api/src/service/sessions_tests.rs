//! Roles, policies and sessions through the service, over a real store.

use super::*;
use crate::service::NewRole;

const A: &str = "111111111111";
const B: &str = "222222222222";

fn service(dir: &std::path::Path) -> Service {
    let store = crate::store::Store::open(&dir.join("hearth.db")).unwrap();
    let token_key = crate::ingress::TokenKey::load_or_create(dir).unwrap();
    let vm = hearth_vmm::VmConfig::new("/nonexistent/vmlinuz", "/nonexistent/initramfs");
    Service::new(store, dir.into(), dir.into(), vm, token_key)
}

fn trust(principal: &str) -> String {
    format!(
        r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Principal":{{"AWS":"{principal}"}},"Action":"sts:AssumeRole"}}]}}"#
    )
}

async fn role(svc: &Service, account: &str, name: &str) -> String {
    let r = NewRole { name: name.into(), trust: trust(account), ..Default::default() };
    svc.create_role(account, r).await.unwrap().arn
}

fn token(t: &str) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    h.insert("x-amz-security-token", t.parse().unwrap());
    h
}

async fn key(svc: &Service, c: &SessionCredentials) -> AccessKey {
    svc.session_key(&c.access_key_id).await.expect("the session's key")
}

#[tokio::test]
async fn sessions_need_their_token_and_end_with_expiry_revocation_and_their_role() {
    let dir = tempfile::tempdir().unwrap();
    let svc = service(dir.path());
    let arn = role(&svc, A, "app").await;
    let c = svc.issue_session(A, &arn, "s1", Some("mvm-1"), 900).await.unwrap();
    assert!(c.access_key_id.starts_with("HSIA") && c.access_key_id.len() == 20 && c.secret_access_key.len() == 40);
    assert!(base64::engine::general_purpose::STANDARD.decode(&c.session_token).unwrap().len() >= 32);
    let k = key(&svc, &c).await;
    assert_eq!((k.secret.as_str(), k.account.as_str()), (c.secret_access_key.as_str(), A));
    // The right token: the role session.
    let caller = svc.caller_of(&token(&c.session_token), &k).await.unwrap();
    assert_eq!(caller.arn(), format!("arn:aws:sts::{A}:assumed-role/app/s1"));
    assert_eq!(caller.principal, Principal::Role { role_arn: arn.clone(), session_name: "s1".into(), microvm: Some("mvm-1".into()) });
    // No token, a wrong one, a forged one: refused (403).
    let refused = |r: Result<Caller, SessionRefusal>| match r {
        Err(SessionRefusal::Invalid(e)) => assert_eq!(e.status(), 403, "{e:?}"),
        other => panic!("{other:?}"),
    };
    refused(svc.caller_of(&http::HeaderMap::new(), &k).await);
    refused(svc.caller_of(&token(&format!("{}x", c.session_token)), &k).await);
    let other = svc.issue_session(A, &arn, "s2", None, 900).await.unwrap();
    refused(svc.caller_of(&token(&other.session_token), &k).await);
    // The secret and token are not stored as given.
    let doc = svc.store.doc(KIND, "", &c.access_key_id).await.unwrap().unwrap();
    assert!(!doc.contains(&c.secret_access_key) && !doc.contains(&c.session_token), "{doc}");
    // Expired: its own refusal.
    let mut s: Session = serde_json::from_str(&doc).unwrap();
    s.expiration = crate::clock::now() - 1.0;
    svc.store.put_doc(KIND, "", &c.access_key_id, &serde_json::to_string(&s).unwrap(), false).await.unwrap();
    match svc.caller_of(&token(&c.session_token), &k).await {
        Err(r @ SessionRefusal::Expired(_)) => {
            assert_eq!(r.clone().into_aws(false).code, "ExpiredToken");
            assert_eq!(r.clone().into_aws(true).code, "ExpiredTokenException");
            assert_eq!(r.into_api().status(), 403);
        }
        other => panic!("{other:?}"),
    }
    // Revoked with its microvm: the key is gone.
    let c3 = svc.issue_session(A, &arn, "s3", Some("mvm-1"), 900).await.unwrap();
    let k3 = key(&svc, &c3).await;
    svc.revoke_sessions("mvm-1").await.unwrap();
    assert!(svc.session_key(&c3.access_key_id).await.is_none());
    refused(svc.caller_of(&token(&c3.session_token), &k3).await);
    // Sessions of other microvms (and none) stay.
    assert!(svc.session_key(&other.access_key_id).await.is_some());
    // The role deleted, or deleted and made again: its sessions stop.
    let ko = key(&svc, &other).await;
    svc.delete_role(A, "app").await.unwrap();
    refused(svc.caller_of(&token(&other.session_token), &ko).await);
    role(&svc, A, "app").await;
    refused(svc.caller_of(&token(&other.session_token), &ko).await);
    // An unknown session key: no key at all.
    assert!(svc.session_key("HSIAAAAAAAAAAAAAAAAA").await.is_none());
    // A role of another account, or none: no session.
    assert_eq!(svc.issue_session(B, &arn, "s", None, 900).await.unwrap_err().kind, Kind::Validation);
    assert_eq!(svc.issue_session(A, "arn:aws:iam::111111111111:role/nope", "s", None, 900).await.unwrap_err().kind, Kind::Validation);
}

#[tokio::test]
async fn roles_policies_and_check_role() {
    let dir = tempfile::tempdir().unwrap();
    let svc = service(dir.path());
    let arn = role(&svc, A, "App").await;
    // Names are unique without regard to case.
    let again = NewRole { name: "app".into(), trust: trust(A), ..Default::default() };
    assert_eq!(svc.create_role(A, again).await.unwrap_err().code, "EntityAlreadyExists");
    assert_eq!(svc.get_role(A, "APP").await.unwrap().arn, arn);
    // Another account sees none of it.
    assert_eq!(svc.get_role(B, "App").await.unwrap_err().code, "NoSuchEntity");
    svc.check_role(A, &arn).await.unwrap();
    for bad in [
        format!("arn:aws:iam::{B}:role/App"),
        format!("arn:aws:iam::{A}:role/missing"),
        format!("arn:aws:iam::{A}:role/x/App"),
        "nope".into(),
    ] {
        let e = svc.check_role(A, &bad).await.unwrap_err();
        assert_eq!(e.kind, Kind::Validation, "{bad}");
        assert!(e.message.contains("create-role"), "{e:?}");
    }
    // buildRoleArn: the account's own must exist; another account's is let through.
    assert!(svc.check_build_role(A, &format!("arn:aws:iam::{A}:role/missing")).await.is_err());
    assert!(svc.check_build_role(A, &format!("arn:aws:iam::{B}:role/x")).await.is_ok());
    // Policies: malformed refused, evaluated once stored, deletion blocked while any remain.
    let e = svc.put_role_policy(A, "App", "p", r#"{"Statement":{"Effect":"Allow","Action":"s3:*","Resource":"*"}}"#).await.unwrap_err();
    assert_eq!((e.code.as_str(), e.status), ("MalformedPolicyDocument", 400));
    assert!(!svc.role_allows(A, &arn, "kms:ListKeys", "*").await.unwrap());
    svc.put_role_policy(A, "App", "p", r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"kms:List*","Resource":"*"}}"#)
        .await
        .unwrap();
    assert!(svc.role_allows(A, &arn, "kms:ListKeys", "*").await.unwrap());
    assert!(!svc.role_allows(A, &arn, "kms:CreateKey", "*").await.unwrap());
    assert!(!svc.role_allows(B, &arn, "kms:ListKeys", "*").await.unwrap(), "not B's role");
    assert_eq!(svc.list_role_policies(A, "app").await.unwrap(), ["p"]);
    assert_eq!(svc.delete_role(A, "App").await.unwrap_err().code, "DeleteConflict");
    svc.delete_role_policy(A, "App", "p").await.unwrap();
    assert_eq!(svc.delete_role_policy(A, "App", "p").await.unwrap_err().code, "NoSuchEntity");
    svc.delete_role(A, "App").await.unwrap();
    // A malformed trust policy, a bad name, bounds.
    let bad = NewRole { name: "t".into(), trust: "{}".into(), ..Default::default() };
    assert_eq!(svc.create_role(A, bad).await.unwrap_err().code, "MalformedPolicyDocument");
    let bad = NewRole { name: "a/b".into(), trust: trust(A), ..Default::default() };
    assert_eq!(svc.create_role(A, bad).await.unwrap_err().code, "ValidationError");
    let bad = NewRole { name: "t".into(), trust: trust(A), max_session: Some(100), ..Default::default() };
    assert_eq!(svc.create_role(A, bad).await.unwrap_err().code, "ValidationError");
}

#[tokio::test]
async fn assume_role_follows_the_trust_policy_and_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let svc = service(dir.path());
    let root = Caller::root(A, "HKIAX");
    let arn = role(&svc, A, "app").await;
    let (c, id) = svc.assume_role(&root, &arn, "me", Some(900)).await.unwrap();
    assert!(id.starts_with("AROA") && c.access_key_id.starts_with("HSIA"));
    for d in [899, 3601, 50_000] {
        assert_eq!(svc.assume_role(&root, &arn, "me", Some(d)).await.unwrap_err().code, "ValidationError", "{d}");
    }
    // Another account's role: denied (as one that does not exist).
    let theirs = role(&svc, B, "app").await;
    assert_eq!(svc.assume_role(&root, &theirs, "me", None).await.unwrap_err().status, 403);
    // A trust policy naming only another principal: denied.
    let r = NewRole { name: "only".into(), trust: trust(&format!("arn:aws:iam::{A}:role/app")), ..Default::default() };
    let only = svc.create_role(A, r).await.unwrap().arn;
    assert_eq!(svc.assume_role(&root, &only, "me", None).await.unwrap_err().code, "AccessDenied");
    // A session of `app` may assume `only` once its own policy allows it too.
    let k = key(&svc, &c).await;
    let session = svc.caller_of(&token(&c.session_token), &k).await.unwrap();
    assert_eq!(svc.assume_role(&session, &only, "chain", None).await.unwrap_err().code, "AccessDenied");
    svc.put_role_policy(A, "app", "p", r#"{"Statement":{"Effect":"Allow","Action":"sts:AssumeRole","Resource":"*"}}"#).await.unwrap();
    svc.assume_role(&session, &only, "chain", None).await.unwrap();
    // Chained sessions last at most an hour.
    assert_eq!(svc.assume_role(&session, &only, "chain", Some(7200)).await.unwrap_err().code, "ValidationError");
}

#[tokio::test]
async fn a_builds_sessions_are_revoked_by_its_build_id_only() {
    let dir = tempfile::tempdir().unwrap();
    let svc = service(dir.path());
    let arn = role(&svc, A, "builder").await;
    let policy = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"kms:ListKeys","Resource":"*","Condition":{"StringLike":{"hearth:SourceMicrovm":"build-*"}}}]}"#;
    svc.put_role_policy(A, "builder", "builds-only", policy).await.unwrap();
    // As the relay of a builder issues them: to the build id, session hearth-<build id>.
    let b = svc.issue_session(A, &arn, "hearth-build-0a1b", Some("build-0a1b"), 900).await.unwrap();
    let longer = svc.issue_session(A, &arn, "hearth-build-0a1b2", Some("build-0a1b2"), 900).await.unwrap();
    let m = svc.issue_session(A, &arn, "hearth-mvm-1", Some("mvm-1"), 900).await.unwrap();
    let caller = |c: SessionCredentials| {
        let svc = &svc;
        async move { svc.caller_of(&token(&c.session_token), &key(svc, &c).await).await }
    };
    // hearth:SourceMicrovm is the build id: a policy tells a build's session from a microvm's.
    assert!(svc.caller_allowed(&caller(b.clone()).await.unwrap(), "kms:ListKeys", "*").await.unwrap());
    assert!(!svc.caller_allowed(&caller(m.clone()).await.unwrap(), "kms:ListKeys", "*").await.unwrap());
    svc.revoke_sessions("build-0a1b").await.unwrap();
    assert!(svc.session_key(&b.access_key_id).await.is_none(), "the build's session is revoked");
    assert!(caller(longer).await.is_ok(), "another build's (whose id it prefixes) stays");
    assert!(caller(m).await.is_ok(), "a microvm's stays");
}
