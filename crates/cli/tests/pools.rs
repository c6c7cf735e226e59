//! Warm pools behind RunMicrovm, end to end with boto3 (`tests/api/test_pools.py`): a run
//! served from the pool is indistinguishable from a fresh launch (its own identity and
//! random bytes, its run hook with its payload, its egress, its start time), the image's
//! `hearth:pool-size` tag retires and restores the pool, and a pooled VM left by a daemon
//! killed with SIGKILL is killed by the next start while claimed microvms stay.

mod daemon;

use daemon::*;

#[test]
fn a_pooled_claim_is_a_fresh_launch_and_pools_never_outlive_their_daemon() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let (a, b) = (key(&state), key(&state));
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(ctx.join("hooked")).unwrap();
    std::fs::write(ctx.join("hooked/Dockerfile"), "FROM debian:bookworm\nCOPY app.py /app/app.py\nCMD [\"python3\", \"/app/app.py\"]\n")
        .unwrap();
    std::fs::write(ctx.join("hooked/app.py"), HOOKED_APP).unwrap();
    allow_artifacts(&state, &a, &ctx);
    let _microvms = Microvms(state.clone());

    // The pool's state is read from /metrics (a port picked here, then given to the daemon).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let metrics = format!("127.0.0.1:{port}");
    let mut daemon = Daemon::start_args(&state, &["--metrics-listen", &metrics]);
    let env = [("HEARTH_METRICS", format!("http://{metrics}"))];
    let out = run_script("test_pools.py", &daemon.1, (&a, &b), &ctx, &state, &["claims"], &env);
    assert!(out.contains("claims: ok"), "{out}");
    let left = out.lines().find(|l| l.starts_with('{')).expect("the pooled id").to_owned();

    daemon.kill9();
    let daemon = Daemon::start(&state);
    let out = run_script("test_pools.py", &daemon.1, (&a, &b), &ctx, &state, &["after-crash", &left], &[]);
    assert!(out.contains("after-crash: ok"), "{out}");
    drop(daemon);
}
