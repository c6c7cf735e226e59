//! `hearth serve` end to end: the Python test (`tests/api/test_api.py`) drives it with
//! boto3 and the AWS CLI (installed into `target/pyenv` by `scripts/test.sh`), then the
//! daemon is killed with SIGKILL and restarted: the new one reattaches the running
//! microvm (its QEMU outlived the daemon) and resumes the suspended one.

mod daemon;

use daemon::*;

#[test]
fn the_api_through_boto3_and_the_aws_cli_survives_a_daemon_kill() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let (a, b) = (key(&state), key(&state));
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(ctx.join("web")).unwrap();
    std::fs::write(
        ctx.join("web/Dockerfile"),
        "FROM minimal\nRUN mkdir -p /www && echo ok > /www/ready\nCMD busybox httpd -f -p 8080 -h /www\n",
    )
    .unwrap();
    std::fs::create_dir_all(ctx.join("listens")).unwrap();
    std::fs::write(ctx.join("listens/Dockerfile"), "FROM minimal\nRUN mkdir -p /empty\nCMD busybox httpd -f -p 8080 -h /empty\n").unwrap();
    std::fs::create_dir_all(ctx.join("hooked")).unwrap();
    std::fs::write(ctx.join("hooked/Dockerfile"), "FROM debian:bookworm\nCOPY app.py /app/app.py\nCMD [\"python3\", \"/app/app.py\"]\n")
        .unwrap();
    std::fs::write(ctx.join("hooked/app.py"), HOOKED_APP).unwrap();

    // The first tenant's operator lets it build from the test's directories; the second
    // may name no host path at all.
    allow_artifacts(&state, &a, &ctx);
    let _microvms = Microvms(state.clone());
    // The ARM64 pool's state is read from /metrics (a port picked here, then given to the
    // daemon), as tests/pools.rs does.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let metrics = format!("127.0.0.1:{port}");
    let mut daemon = Daemon::start_args(&state, &["--metrics-listen", &metrics]);
    let env = [("HEARTH_METRICS", format!("http://{metrics}"))];
    let out = run_script("test_api.py", &daemon.1, (&a, &b), &ctx, &state, &[], &env);
    assert!(out.contains("\"suspended\"") && out.contains("\"running\""), "{out}");

    // The `hearth` CLI as a client of the same daemon.
    let ids: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let alive = ids["running"].as_str().unwrap();
    let cli = |args: &[&str]| client(&daemon, &a).args(args).output().unwrap();
    let o = cli(&["exec", alive, "--", "cat", "/workspace/a"]);
    assert!(o.status.success() && o.stdout == b"alive\n", "{o:?}");
    let o = cli(&["exec", alive, "--shell", "--", "echo oops >&2; exit 3"]);
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    assert_eq!(o.stderr, b"oops\n");
    let local = tmp.path().join("blob");
    std::fs::write(&local, (0..100_000u32).flat_map(|i| i.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    let o = cli(&["cp", local.to_str().unwrap(), &format!("{alive}:/workspace/blob")]);
    assert!(o.status.success(), "{o:?}");
    let back = tmp.path().join("blob.back");
    let o = cli(&["cp", &format!("{alive}:/workspace/blob"), back.to_str().unwrap()]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(std::fs::read(&local).unwrap(), std::fs::read(&back).unwrap());
    let o = cli(&["ls", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|_| panic!("{o:?}"));
    assert!(listed.as_array().unwrap().iter().any(|m| m["microvmId"] == alive && m["state"] == "RUNNING"), "{listed}");
    let o = cli(&["get", alive, "--json"]);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("RUNNING"), "{o:?}");
    let o = cli(&["get", "mvm-nope"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("ResourceNotFoundException"), "{o:?}");
    let o = cli(&["usage", "--json"]);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("vcpuSeconds"), "{o:?}");
    let o = hearth().args(["ls"]).env("HEARTH_ENDPOINT", &daemon.1).env_remove("AWS_ACCESS_KEY_ID").output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("hearth keys create"), "{o:?}");

    // kill -9: the suspended microvm and the images survive; a new daemon serves them.
    daemon.kill9();
    let daemon = Daemon::start(&state);
    let out = run_py(&daemon.1, (&a, &b), &ctx, &state, &["after-restart"]);
    assert!(out.contains("ok"), "{out}");
    drop(daemon);
}
