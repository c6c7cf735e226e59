//! Table-driven: each rule of parsing and of evaluation, one row each.

use super::*;

const ACCOUNT: &str = "123456789012";

fn ctx() -> Context {
    let mut c = Context::default();
    c.set("aws:PrincipalArn", format!("arn:aws:sts::{ACCOUNT}:assumed-role/app/s1"))
        .set("hearth:RoleArn", format!("arn:aws:iam::{ACCOUNT}:role/app"))
        .set("aws:PrincipalAccount", ACCOUNT)
        .set("aws:RequestedRegion", "hh-local-1")
        .set("hearth:SourceMicrovm", "mvm-1");
    c
}

fn allow(stmt: &str) -> String {
    format!(r#"{{"Version":"2012-10-17","Statement":{stmt}}}"#)
}

#[test]
fn malformed_documents_are_refused_naming_the_cause() {
    let big = format!(
        r#"{{"Version":"2012-10-17","Statement":[{}]}}"#,
        vec![r#"{"Effect":"Allow","Action":"kms:ListKeys","Resource":"*"}"#; 101].join(",")
    );
    let long =
        format!(r#"{{"Statement":{{"Effect":"Allow","Action":"kms:ListKeys","Resource":"arn:aws:kms:x:1:key/{}"}}}}"#, "a".repeat(11_000));
    let rows: &[(&str, &str)] = &[
        ("not json", "not JSON"),
        ("[]", "JSON object"),
        (r#"{"Version":"2012-10-17"}"#, "Statement"),
        (r#"{"Version":"2013-01-01","Statement":[]}"#, "Version"),
        (r#"{"Version":"2012-10-17","Statement":[]}"#, "1 to 100"),
        (&big, "1 to 100"),
        (&long, "at most 10240"),
        (r#"{"Statement":{"Effect":"Allow","Action":"kms:ListKeys","Resource":"*"},"Extra":1}"#, "unknown element \"Extra\""),
        (r#"{"Statement":{"Effect":"Maybe","Action":"kms:ListKeys","Resource":"*"}}"#, "Effect"),
        (r#"{"Statement":{"Effect":"Allow","Resource":"*"}}"#, "Action or NotAction"),
        (r#"{"Statement":{"Effect":"Allow","Action":"kms:ListKeys"}}"#, "Resource or NotResource"),
        (r#"{"Statement":{"Effect":"Allow","Action":"kms:ListKeys","NotAction":"kms:ListKeys","Resource":"*"}}"#, "not both"),
        (r#"{"Statement":{"Effect":"Allow","Action":"s3:GetObject","Resource":"*"}}"#, "unknown service prefix \"s3\""),
        (r#"{"Statement":{"Effect":"Allow","Action":"kms:Frobnicate","Resource":"*"}}"#, "matches no kms action"),
        (r#"{"Statement":{"Effect":"Allow","Action":"secretsmanager:Get*Zzz","Resource":"*"}}"#, "matches no secretsmanager action"),
        (r#"{"Statement":{"Effect":"Allow","Action":"GetSecretValue","Resource":"*"}}"#, "service:Action"),
        (r#"{"Statement":{"Effect":"Allow","Action":[],"Resource":"*"}}"#, "must not be empty"),
        (r#"{"Statement":{"Effect":"Allow","Action":["kms:ListKeys",3],"Resource":"*"}}"#, "must be strings"),
        (r#"{"Statement":{"Effect":"Allow","Action":"kms:ListKeys","Resource":"bucket"}}"#, "an ARN"),
        (r#"{"Statement":{"Effect":"Allow","Action":"kms:ListKeys","Resource":"arn:aws:kms:::${aws:username}"}}"#, "policy variables"),
        (r#"{"Statement":{"Effect":"Allow","Action":"kms:ListKeys","Resource":"*","Principal":"*"}}"#, "names no Principal"),
        (r#"{"Statement":{"Sid":"a-b","Effect":"Allow","Action":"kms:ListKeys","Resource":"*"}}"#, "Sid"),
        (
            r#"{"Statement":[{"Sid":"A","Effect":"Allow","Action":"kms:ListKeys","Resource":"*"},{"Sid":"A","Effect":"Deny","Action":"kms:ListKeys","Resource":"*"}]}"#,
            "used by two",
        ),
        (
            r#"{"Statement":{"Effect":"Allow","Action":"kms:ListKeys","Resource":"*","Condition":{"DateGreaterThan":{"aws:CurrentTime":"2020-01-01"}}}}"#,
            "operator \"DateGreaterThan\" is not supported",
        ),
        (
            r#"{"Statement":{"Effect":"Allow","Action":"kms:ListKeys","Resource":"*","Condition":{"ForAnyValue:StringEquals":{"aws:PrincipalArn":"x"}}}}"#,
            "is not supported",
        ),
        (
            r#"{"Statement":{"Effect":"Allow","Action":"kms:ListKeys","Resource":"*","Condition":{"StringEquals":{"aws:SourceIp":"1.2.3.4"}}}}"#,
            "key \"aws:SourceIp\" is not supported",
        ),
        (
            r#"{"Statement":{"Effect":"Allow","Action":"kms:ListKeys","Resource":"*","Condition":{"Bool":{"aws:PrincipalArn":"maybe"}}}}"#,
            "true or false",
        ),
        (
            r#"{"Statement":{"Effect":"Allow","Action":"kms:ListKeys","Resource":"*","Condition":{"StringEquals":{"aws:PrincipalArn":{"x":1}}}}}"#,
            "values are strings",
        ),
        (r#"{"Statement":{"Effect":"Allow","Action":"kms:ListKeys","Resource":"*","Condition":{"StringEquals":{}}}}"#, "names no key"),
    ];
    for (doc, want) in rows {
        let e = Policy::parse(doc, Kind::Permissions).unwrap_err();
        assert!(e.0.contains(want), "{doc:.120}: {e} (wanted {want:?})");
    }
}

#[test]
fn trust_policies_name_principals_and_no_resource() {
    let rows: &[(&str, Option<&str>)] = &[
        (r#"{"Statement":{"Effect":"Allow","Principal":{"AWS":"123456789012"},"Action":"sts:AssumeRole"}}"#, None),
        (
            r#"{"Statement":{"Effect":"Allow","Principal":{"AWS":["arn:aws:iam::123456789012:root","arn:aws:iam::123456789012:role/x"]},"Action":"sts:AssumeRole"}}"#,
            None,
        ),
        (r#"{"Statement":{"Effect":"Allow","Principal":{"Service":"lambda.amazonaws.com"},"Action":"sts:AssumeRole"}}"#, None),
        (r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"sts:*"}}"#, None),
        (r#"{"Statement":{"Effect":"Allow","Action":"sts:AssumeRole"}}"#, Some("needs a Principal")),
        (r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"sts:AssumeRole","Resource":"*"}}"#, Some("names no Resource")),
        (r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"kms:ListKeys"}}"#, Some("sts: actions")),
        (
            r#"{"Statement":{"Effect":"Allow","Principal":{"Federated":"x"},"Action":"sts:AssumeRole"}}"#,
            Some("\"Federated\" is not supported"),
        ),
        (r#"{"Statement":{"Effect":"Allow","NotPrincipal":{"AWS":"123456789012"},"Action":"sts:AssumeRole"}}"#, Some("NotPrincipal")),
        (
            r#"{"Statement":{"Effect":"Allow","Principal":{"AWS":"arn:aws:iam::1234:root"},"Action":"sts:AssumeRole"}}"#,
            Some("is not supported"),
        ),
        (
            r#"{"Statement":{"Effect":"Allow","Principal":{"AWS":"arn:aws:iam::123456789012:role/*"},"Action":"sts:AssumeRole"}}"#,
            Some("is not supported"),
        ),
        (r#"{"Statement":{"Effect":"Allow","Principal":{"Service":"evil"},"Action":"sts:AssumeRole"}}"#, Some("service's name")),
    ];
    for (doc, want) in rows {
        match (Policy::parse(doc, Kind::Trust), want) {
            (Ok(_), None) => {}
            (Err(e), Some(w)) => assert!(e.0.contains(w), "{doc}: {e} (wanted {w:?})"),
            (r, w) => panic!("{doc}: {r:?}, wanted {w:?}"),
        }
    }
}

#[test]
fn trust_evaluation_matches_the_callers_arns_or_its_account() {
    let p = |principal: &str| {
        Policy::parse(&allow(&format!(r#"{{"Effect":"Allow","Principal":{principal},"Action":"sts:AssumeRole"}}"#)), Kind::Trust).unwrap()
    };
    let root = {
        let mut c = Context::default();
        c.set("aws:PrincipalArn", format!("arn:aws:iam::{ACCOUNT}:root")).set("aws:PrincipalAccount", ACCOUNT);
        c
    };
    let rows: &[(&str, &Context, Decision)] = &[
        (r#"{"AWS":"123456789012"}"#, &root, Decision::Allow),
        (r#"{"AWS":"123456789012"}"#, &ctx(), Decision::Allow),
        (r#"{"AWS":"999999999999"}"#, &root, Decision::ImplicitDeny),
        (r#"{"AWS":"arn:aws:iam::123456789012:role/app"}"#, &ctx(), Decision::Allow),
        (r#"{"AWS":"arn:aws:iam::123456789012:role/other"}"#, &ctx(), Decision::ImplicitDeny),
        (r#"{"AWS":"arn:aws:iam::123456789012:role/app"}"#, &root, Decision::ImplicitDeny),
        (r#"{"Service":"lambda.amazonaws.com"}"#, &root, Decision::ImplicitDeny),
        (r#""*""#, &root, Decision::Allow),
    ];
    for (principal, c, want) in rows {
        assert_eq!(p(principal).evaluate("sts:AssumeRole", "*", c), *want, "{principal}");
    }
    assert_eq!(p(r#""*""#).evaluate("sts:GetCallerIdentity", "*", &root), Decision::ImplicitDeny);
}

#[test]
fn evaluation_follows_awss_rules() {
    let secret = "arn:aws:secretsmanager:hh-local-1:123456789012:secret:db-AbCdEf";
    // (statements, action, resource, decision)
    let rows: &[(&str, &str, &str, Decision)] = &[
        // No statement applies: the implicit deny.
        (r#"{"Effect":"Allow","Action":"kms:ListKeys","Resource":"*"}"#, "kms:CreateKey", "*", Decision::ImplicitDeny),
        (r#"{"Effect":"Allow","Action":"kms:ListKeys","Resource":"*"}"#, "kms:ListKeys", "*", Decision::Allow),
        // Actions: without regard to case, with wildcards.
        (r#"{"Effect":"Allow","Action":"KMS:listkeys","Resource":"*"}"#, "kms:ListKeys", "*", Decision::Allow),
        (r#"{"Effect":"Allow","Action":"secretsmanager:Get*","Resource":"*"}"#, "secretsmanager:GetSecretValue", secret, Decision::Allow),
        (
            r#"{"Effect":"Allow","Action":"secretsmanager:Get*","Resource":"*"}"#,
            "secretsmanager:PutSecretValue",
            secret,
            Decision::ImplicitDeny,
        ),
        (r#"{"Effect":"Allow","Action":"kms:?istKeys","Resource":"*"}"#, "kms:ListKeys", "*", Decision::Allow),
        (r#"{"Effect":"Allow","Action":"*","Resource":"*"}"#, "iam:GetRole", "*", Decision::Allow),
        // Resources: with regard to case, with wildcards.
        (
            r#"{"Effect":"Allow","Action":"secretsmanager:GetSecretValue","Resource":"arn:aws:secretsmanager:hh-local-1:123456789012:secret:db-*"}"#,
            "secretsmanager:GetSecretValue",
            secret,
            Decision::Allow,
        ),
        (
            r#"{"Effect":"Allow","Action":"secretsmanager:GetSecretValue","Resource":"arn:aws:secretsmanager:hh-local-1:123456789012:secret:DB-*"}"#,
            "secretsmanager:GetSecretValue",
            secret,
            Decision::ImplicitDeny,
        ),
        (
            r#"{"Effect":"Allow","Action":"secretsmanager:GetSecretValue","Resource":"arn:aws:secretsmanager:hh-local-1:123456789012:secret:db-??????"}"#,
            "secretsmanager:GetSecretValue",
            secret,
            Decision::Allow,
        ),
        (
            r#"{"Effect":"Allow","Action":"secretsmanager:GetSecretValue","Resource":"arn:aws:secretsmanager:hh-local-1:123456789012:secret:db-?????"}"#,
            "secretsmanager:GetSecretValue",
            secret,
            Decision::ImplicitDeny,
        ),
        // Explicit Deny wins over an Allow, in either order.
        (
            r#"[{"Effect":"Allow","Action":"secretsmanager:*","Resource":"*"},{"Effect":"Deny","Action":"secretsmanager:GetSecretValue","Resource":"*"}]"#,
            "secretsmanager:GetSecretValue",
            secret,
            Decision::ExplicitDeny,
        ),
        (
            r#"[{"Effect":"Deny","Action":"secretsmanager:GetSecretValue","Resource":"*"},{"Effect":"Allow","Action":"secretsmanager:*","Resource":"*"}]"#,
            "secretsmanager:GetSecretValue",
            secret,
            Decision::ExplicitDeny,
        ),
        (
            r#"[{"Effect":"Allow","Action":"secretsmanager:*","Resource":"*"},{"Effect":"Deny","Action":"secretsmanager:GetSecretValue","Resource":"*"}]"#,
            "secretsmanager:DescribeSecret",
            secret,
            Decision::Allow,
        ),
        // A Deny alone grants nothing.
        (r#"{"Effect":"Deny","Action":"kms:CreateKey","Resource":"*"}"#, "kms:ListKeys", "*", Decision::ImplicitDeny),
        // NotAction: everything but; NotResource likewise.
        (r#"{"Effect":"Allow","NotAction":"kms:CreateKey","Resource":"*"}"#, "kms:ListKeys", "*", Decision::Allow),
        (r#"{"Effect":"Allow","NotAction":"kms:CreateKey","Resource":"*"}"#, "kms:CreateKey", "*", Decision::ImplicitDeny),
        (
            r#"[{"Effect":"Allow","Action":"secretsmanager:*","Resource":"*"},{"Effect":"Deny","Action":"secretsmanager:*","NotResource":"arn:aws:secretsmanager:*:*:secret:db-*"}]"#,
            "secretsmanager:GetSecretValue",
            secret,
            Decision::Allow,
        ),
        (
            r#"[{"Effect":"Allow","Action":"secretsmanager:*","Resource":"*"},{"Effect":"Deny","Action":"secretsmanager:*","NotResource":"arn:aws:secretsmanager:*:*:secret:db-*"}]"#,
            "secretsmanager:GetSecretValue",
            "arn:aws:secretsmanager:hh-local-1:123456789012:secret:other-AbCdEf",
            Decision::ExplicitDeny,
        ),
        // Conditions: each operator, the missing-key rules, IfExists.
        (
            r#"{"Effect":"Allow","Action":"kms:ListKeys","Resource":"*","Condition":{"StringEquals":{"hearth:SourceMicrovm":"mvm-1"}}}"#,
            "kms:ListKeys",
            "*",
            Decision::Allow,
        ),
        (
            r#"{"Effect":"Allow","Action":"kms:ListKeys","Resource":"*","Condition":{"StringEquals":{"hearth:SourceMicrovm":["mvm-2","mvm-1"]}}}"#,
            "kms:ListKeys",
            "*",
            Decision::Allow,
        ),
        (
            r#"{"Effect":"Allow","Action":"kms:ListKeys","Resource":"*","Condition":{"StringEquals":{"hearth:SourceMicrovm":"MVM-1"}}}"#,
            "kms:ListKeys",
            "*",
            Decision::ImplicitDeny,
        ),
        (
            r#"{"Effect":"Allow","Action":"kms:ListKeys","Resource":"*","Condition":{"StringEqualsIgnoreCase":{"hearth:SourceMicrovm":"MVM-1"}}}"#,
            "kms:ListKeys",
            "*",
            Decision::Allow,
        ),
        (
            r#"{"Effect":"Allow","Action":"kms:ListKeys","Resource":"*","Condition":{"StringNotEquals":{"hearth:SourceMicrovm":["mvm-2","mvm-3"]}}}"#,
            "kms:ListKeys",
            "*",
            Decision::Allow,
        ),
        (
            r#"{"Effect":"Allow","Action":"kms:ListKeys","Resource":"*","Condition":{"StringNotEquals":{"hearth:SourceMicrovm":["mvm-2","mvm-1"]}}}"#,
            "kms:ListKeys",
            "*",
            Decision::ImplicitDeny,
        ),
        (
            r#"{"Effect":"Allow","Action":"kms:ListKeys","Resource":"*","Condition":{"StringLike":{"aws:PrincipalArn":"arn:aws:sts::*:assumed-role/app/*"}}}"#,
            "kms:ListKeys",
            "*",
            Decision::Allow,
        ),
        (
            r#"{"Effect":"Allow","Action":"kms:ListKeys","Resource":"*","Condition":{"StringNotLike":{"aws:PrincipalArn":"arn:aws:sts::*:assumed-role/app/*"}}}"#,
            "kms:ListKeys",
            "*",
            Decision::ImplicitDeny,
        ),
        (
            r#"{"Effect":"Allow","Action":"kms:ListKeys","Resource":"*","Condition":{"ArnLike":{"aws:PrincipalArn":"arn:aws:sts::123456789012:assumed-role/*"}}}"#,
            "kms:ListKeys",
            "*",
            Decision::Allow,
        ),
        (
            r#"{"Effect":"Allow","Action":"kms:ListKeys","Resource":"*","Condition":{"ArnEquals":{"aws:PrincipalArn":"arn:aws:sts::123456789012:assumed-role/app/s1"}}}"#,
            "kms:ListKeys",
            "*",
            Decision::Allow,
        ),
        (
            r#"{"Effect":"Allow","Action":"kms:ListKeys","Resource":"*","Condition":{"ArnNotLike":{"aws:PrincipalArn":"arn:aws:sts::123456789012:assumed-role/*"}}}"#,
            "kms:ListKeys",
            "*",
            Decision::ImplicitDeny,
        ),
        (
            r#"{"Effect":"Allow","Action":"kms:ListKeys","Resource":"*","Condition":{"ArnNotEquals":{"aws:PrincipalArn":"arn:aws:sts::123456789012:assumed-role/x/y"}}}"#,
            "kms:ListKeys",
            "*",
            Decision::Allow,
        ),
        (
            r#"{"Effect":"Allow","Action":"kms:ListKeys","Resource":"*","Condition":{"StringEquals":{"aws:PrincipalAccount":"123456789012","aws:RequestedRegion":"hh-local-1"}}}"#,
            "kms:ListKeys",
            "*",
            Decision::Allow,
        ),
        (
            r#"{"Effect":"Allow","Action":"kms:ListKeys","Resource":"*","Condition":{"StringEquals":{"aws:PrincipalAccount":"123456789012","aws:RequestedRegion":"us-east-1"}}}"#,
            "kms:ListKeys",
            "*",
            Decision::ImplicitDeny,
        ),
        // A missing key: positive operators fail, IfExists and negated ones hold, Null says which.
        (
            r#"{"Effect":"Allow","Action":"kms:ListKeys","Resource":"*","Condition":{"StringEquals":{"secretsmanager:SecretId":"x"}}}"#,
            "kms:ListKeys",
            "*",
            Decision::ImplicitDeny,
        ),
        (
            r#"{"Effect":"Allow","Action":"kms:ListKeys","Resource":"*","Condition":{"StringEqualsIfExists":{"secretsmanager:SecretId":"x"}}}"#,
            "kms:ListKeys",
            "*",
            Decision::Allow,
        ),
        (
            r#"{"Effect":"Allow","Action":"kms:ListKeys","Resource":"*","Condition":{"StringEqualsIfExists":{"hearth:SourceMicrovm":"mvm-9"}}}"#,
            "kms:ListKeys",
            "*",
            Decision::ImplicitDeny,
        ),
        (
            r#"{"Effect":"Allow","Action":"kms:ListKeys","Resource":"*","Condition":{"StringNotEquals":{"secretsmanager:SecretId":"x"}}}"#,
            "kms:ListKeys",
            "*",
            Decision::Allow,
        ),
        (
            r#"{"Effect":"Allow","Action":"kms:ListKeys","Resource":"*","Condition":{"Null":{"secretsmanager:SecretId":"true"}}}"#,
            "kms:ListKeys",
            "*",
            Decision::Allow,
        ),
        (
            r#"{"Effect":"Allow","Action":"kms:ListKeys","Resource":"*","Condition":{"Null":{"hearth:SourceMicrovm":"true"}}}"#,
            "kms:ListKeys",
            "*",
            Decision::ImplicitDeny,
        ),
        (
            r#"{"Effect":"Allow","Action":"kms:ListKeys","Resource":"*","Condition":{"Null":{"hearth:SourceMicrovm":"false"}}}"#,
            "kms:ListKeys",
            "*",
            Decision::Allow,
        ),
        (
            r#"{"Effect":"Allow","Action":"kms:ListKeys","Resource":"*","Condition":{"Bool":{"hearth:SourceMicrovm":"true"}}}"#,
            "kms:ListKeys",
            "*",
            Decision::ImplicitDeny,
        ),
        // A Deny conditioned on a key: denies only where it holds.
        (
            r#"[{"Effect":"Allow","Action":"kms:*","Resource":"*"},{"Effect":"Deny","Action":"kms:*","Resource":"*","Condition":{"StringNotEquals":{"hearth:SourceMicrovm":"mvm-1"}}}]"#,
            "kms:ListKeys",
            "*",
            Decision::Allow,
        ),
        (
            r#"[{"Effect":"Allow","Action":"kms:*","Resource":"*"},{"Effect":"Deny","Action":"kms:*","Resource":"*","Condition":{"StringNotEquals":{"hearth:SourceMicrovm":"mvm-2"}}}]"#,
            "kms:ListKeys",
            "*",
            Decision::ExplicitDeny,
        ),
    ];
    for (stmts, action, resource, want) in rows {
        let p = Policy::parse(&allow(stmts), Kind::Permissions).unwrap_or_else(|e| panic!("{stmts}: {e}"));
        assert_eq!(p.evaluate(action, resource, &ctx()), *want, "{stmts} / {action} on {resource}");
    }
}

#[test]
fn several_policies_deny_wins_across_them() {
    let a = Policy::parse(&allow(r#"{"Effect":"Allow","Action":"kms:*","Resource":"*"}"#), Kind::Permissions).unwrap();
    let d = Policy::parse(&allow(r#"{"Effect":"Deny","Action":"kms:CreateKey","Resource":"*"}"#), Kind::Permissions).unwrap();
    assert_eq!(evaluate_all([&a, &d], "kms:CreateKey", "*", &ctx()), Decision::ExplicitDeny);
    assert_eq!(evaluate_all([&a, &d], "kms:ListKeys", "*", &ctx()), Decision::Allow);
    assert_eq!(evaluate_all([&d], "kms:ListKeys", "*", &ctx()), Decision::ImplicitDeny);
    assert_eq!(evaluate_all([], "kms:ListKeys", "*", &ctx()), Decision::ImplicitDeny);
}

#[test]
fn wildcards_match_whole_strings() {
    let rows: &[(&str, &str, bool, bool)] = &[
        ("*", "", false, true),
        ("a*", "abc", false, true),
        ("a*c", "abbbc", false, true),
        ("a*c", "abbbd", false, false),
        ("a?c", "abc", false, true),
        ("a?c", "ac", false, false),
        ("*b*", "abc", false, true),
        ("ABC", "abc", false, false),
        ("ABC", "abc", true, true),
        ("a**b", "ab", false, true),
        ("a*b*c*d", "aXbYcZd", false, true),
        ("a*b*c*d", "aXbYcZ", false, false),
    ];
    for (p, s, ic, want) in rows {
        assert_eq!(wildcard_match(p, s, *ic), *want, "{p} ~ {s}");
    }
    // Many stars against a long string: no blow-up.
    assert!(!wildcard_match(&"*a".repeat(200), &"a".repeat(199), false));
}

#[test]
fn every_lambda_operation_and_extension_is_a_known_action() {
    assert!(is_known_action("lambda", "RunMicrovm"));
    assert!(is_known_action("lambda", "ExecuteMicrovmCommand"));
    assert!(is_known_action("lambda", "*Microvm*"));
    assert!(!is_known_action("lambda", "InvokeFunction"));
    assert!(is_known_action("iam", "CreateRole") && !is_known_action("iam", "CreateUser"));
    assert!(is_known_action("sts", "assumerole"));
}
