//! IAM roles and STS sessions through boto3 and the AWS CLI against a real `hearth serve`
//! (`tests/api/test_iam.py`): roles and inline policies, malformed policies and unknown
//! actions refused with IAM's codes, AssumeRole and calls with the temporary credentials
//! (allowed, denied, explicitly denied) on IAM, STS and the Lambda API, expired, forged,
//! swapped and revoked session tokens, another tenant's roles refused as executionRoleArn,
//! a KMS key named as kmsKeyIdentifier without kms:GenerateDataKey and kms:Decrypt on it;
//! `hearth images create` making its build role. No microvm is started.

mod daemon;

use daemon::*;

#[test]
fn roles_sessions_and_policies_through_the_sdks() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let (a, b) = (key(&state), key(&state));
    let daemon = Daemon::start(&state);
    let aws = python().with_file_name("aws");
    let out = run_script("test_iam.py", &daemon.1, (&a, &b), tmp.path(), &state, &[], &[("HEARTH_AWS", aws.display().to_string())]);
    assert!(out.contains("iam: ok"), "{out}");

    // `hearth images create` without a role makes `hearth-build` in the caller's account
    // (once; then reuses it) before anything else: here the artifact is missing, so
    // nothing is built.
    let account: serde_json::Value = serde_json::from_str(&b).unwrap();
    let arn = format!("arn:aws:iam::{}:role/hearth-build", account["account"].as_str().unwrap());
    let missing = tmp.path().join("no-such-dir");
    let o = client(&daemon, &b).args(["images", "create", "img", "--base", "minimal"]).arg(&missing).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains(&format!("created role {arn}")), "{o:?}");
    let o = client(&daemon, &b).args(["images", "create", "img", "--base", "minimal"]).arg(&missing).output().unwrap();
    assert!(!o.status.success() && !String::from_utf8_lossy(&o.stderr).contains("created role"), "reused: {o:?}");
    // A role named by the user is taken as given: another account's own check applies.
    let o = client(&daemon, &b)
        .args(["images", "create", "img", "--base", "minimal", "--build-role-arn"])
        .arg(format!("arn:aws:iam::{}:role/missing", account["account"].as_str().unwrap()))
        .arg(format!("hearth://artifacts/{}", "0".repeat(64)))
        .output()
        .unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("ValidationException"), "{o:?}");
    drop(daemon);
}
