//! Secrets Manager and KMS through boto3 against a real `hearth serve`
//! (`tests/api/test_secrets.py`): the whole lifecycle of secrets and keys, the refusals as
//! 4xx with the services' codes, another tenant's ARNs not found, values absent from the
//! state directory in plain text, and a real microvm suspended under its
//! kmsKeyIdentifier: a marker written in the guest is not readable in its suspended files,
//! and is back after the resume. A keyed image's template is encrypted at rest (its app's
//! in-memory marker nowhere in the state directory, while the unkeyed control's template
//! RAM holds it); its microvms launch from a copy decrypted into memory, suspend and resume,
//! survive a SIGKILL of the daemon, and deleting the version removes the copy.
//!
//! Afterwards the test checks what the script cannot see: the value never reached the
//! daemon's log.

mod daemon;

use daemon::*;

#[test]
fn secrets_and_keys_are_encrypted_at_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let (a, b) = (key(&state), key(&state));
    let root = tmp.path().join("root");
    std::fs::create_dir_all(root.join("web")).unwrap();
    let nonce = format!("{:016x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
    // The app holds the marker in its memory only (its arguments, joined by the shell: no
    // file of the context or the disk holds it whole).
    let marker = format!("hh-tmpl-{nonce}");
    let dockerfile =
        format!("FROM minimal\nRUN mkdir -p /www\nCMD A=hh-tmpl; B=-{nonce}; exec busybox httpd -f -p 8080 -h /www -r \"$A$B\"\n");
    std::fs::write(root.join("web/Dockerfile"), dockerfile).unwrap();
    allow_artifacts(&state, &a, &root);
    let secret = format!("hh-secret-{nonce}");
    let _microvms = Microvms(state.clone());
    let log = tmp.path().join("daemon.log");
    let mut daemon = Daemon::start_with(&state, &[("RUST_LOG", "debug")], &log);
    let env = [("HEARTH_SECRET", secret.clone()), ("HEARTH_TMPL_MARKER", marker.clone())];
    let out = run_script("test_secrets.py", &daemon.1, (&a, &b), &root, &state, &[], &env);
    assert!(out.contains("secrets: ok"), "{out}");
    eprintln!("{}", out.lines().filter(|l| l.starts_with("timing:")).collect::<Vec<_>>().join("\n"));
    // Killed with a keyed template decrypted in memory and a microvm running from it: the
    // next start removes the stale copy, reattaches the microvm, and launches decrypt anew.
    let keyed = out.lines().find_map(|l| l.strip_prefix("keyed-microvm: ")).expect("the keyed microvm's id").to_owned();
    daemon.kill9();
    let daemon = Daemon::start_with(&state, &[("RUST_LOG", "debug")], &log);
    let env = [("HEARTH_SECRET", secret.clone()), ("HEARTH_TMPL_MARKER", marker), ("HEARTH_KEYED_MICROVM", keyed)];
    let out = run_script("test_secrets.py", &daemon.1, (&a, &b), &root, &state, &["after-restart"], &env);
    assert!(out.contains("after-restart: ok"), "{out}");
    drop(daemon);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("secretsmanager: secret created"), "the log is the daemon's, at debug");
    assert!(!logged.contains(&secret), "a secret's value reached the daemon's log");
    // The cost of encryption at rest, as the daemon measured it (BENCHMARKS.md).
    let costs = ["files encrypted at rest", "files decrypted", "template encrypted at rest", "template decrypted into memory"];
    for l in logged.lines().filter(|l| costs.iter().any(|c| l.contains(c))) {
        eprintln!("{l}");
    }
}
