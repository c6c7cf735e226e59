//! Quotas, host capacity and request rates of `hearth serve`, end to end with boto3
//! (`tests/api/test_quotas.py`): one daemon per phase on the same state directory.
//!
//! - Quotas set with `hearth accounts set` on a running daemon refuse runs, resumes, images
//!   and versions with ServiceQuotaExceededException and leave nothing behind; a rate limit
//!   throttles with `Retry-After`, and botocore's retries get through.
//! - With room for two 1-vCPU microvms (`--cpu-overcommit`), the third is refused with
//!   InsufficientCapacityException; with `--reclaim-idle` the longest-idle one is suspended
//!   instead.

mod daemon;

use daemon::*;

#[test]
fn quotas_capacity_and_rates_hold_through_the_api() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let (a, b) = (key(&state), key(&state));
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(ctx.join("web")).unwrap();
    std::fs::write(ctx.join("web/Dockerfile"), "FROM minimal\nRUN echo ok > /ok\n").unwrap();
    allow_artifacts(&state, &a, &ctx);
    let _microvms = Microvms(state.clone());
    let bin = [("HEARTH_BIN", env!("CARGO_BIN_EXE_hearth").to_owned())];
    let phase = |daemon: &Daemon, name: &str| {
        let out = run_script("test_quotas.py", &daemon.1, (&a, &b), &ctx, &state, &[name], &bin);
        assert!(out.contains(&format!("{name}: ok")), "{out}");
    };

    let daemon = Daemon::start(&state);
    phase(&daemon, "quotas");
    drop(daemon);

    // Room for exactly two 1-vCPU microvms: CPUs × ratio = 2.5, rounded down.
    let cpus = std::thread::available_parallelism().unwrap().get() as f64;
    let ratio = format!("{}", 2.5 / cpus);
    let daemon = Daemon::start_args(&state, &["--cpu-overcommit", &ratio]);
    phase(&daemon, "capacity");
    drop(daemon);

    let daemon = Daemon::start_args(&state, &["--cpu-overcommit", &ratio, "--reclaim-idle", "2"]);
    phase(&daemon, "reclaim");
    drop(daemon);
}
