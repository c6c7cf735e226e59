//! Credentials inside microvms through IMDSv2, end to end with real VMs
//! (`tests/api/test_imds.py`): a role from the IAM API, a microvm with no network at all
//! reading its credentials at 169.254.169.254 over the agent channel and calling STS with
//! them, IMDSv1 refused, no role no credentials, another microvm unreachable through the
//! relay, fresh credentials after a resume, after a daemon restart and for a pooled claim,
//! and none that work after terminate.

mod daemon;

use daemon::*;

#[test]
fn a_microvm_reads_its_role_credentials_through_imdsv2() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let (a, b) = (key(&state), key(&state));
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(ctx.join("web")).unwrap();
    std::fs::write(
        ctx.join("web/Dockerfile"),
        "FROM debian:bookworm\nCOPY app.py /app/app.py\nCOPY imds_guest.py /app/imds_guest.py\nCMD [\"python3\", \"/app/app.py\"]\n",
    )
    .unwrap();
    std::fs::write(ctx.join("web/app.py"), HOOKED_APP).unwrap();
    let guest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/api/imds_guest.py");
    std::fs::copy(guest, ctx.join("web/imds_guest.py")).unwrap();
    allow_artifacts(&state, &a, &ctx);
    let _microvms = Microvms(state.clone());
    // The pool's state is read from /metrics (a port picked here, then given to the daemon).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let metrics = format!("127.0.0.1:{port}");
    let env = [("HEARTH_METRICS", format!("http://{metrics}"))];
    let mut daemon = Daemon::start_args(&state, &["--metrics-listen", &metrics]);
    let out = run_script("test_imds.py", &daemon.1, (&a, &b), &ctx, &state, &[], &env);
    assert!(out.contains("imds: ok"), "{out}");
    let left = out.lines().find(|l| l.starts_with('{')).expect("what the first phase leaves").to_owned();

    // A restarted daemon reattaches the microvm, and with it a new relay.
    daemon.kill9();
    let daemon = Daemon::start_args(&state, &["--metrics-listen", &metrics]);
    let out = run_script("test_imds.py", &daemon.1, (&a, &b), &ctx, &state, &["after-restart", &left], &env);
    assert!(out.contains("after-restart: ok"), "{out}");
    drop(daemon);
}
