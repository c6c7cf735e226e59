//! The agent-sandbox reference flow of issue 19, end to end with real VMs
//! (`tests/api/test_flow.py`): a secret under a KMS key, read at `/run` by an app with
//! boto3 through its execution role (IMDSv2 over the agent channel, no network), refused
//! to another role, and absent from the image, the suspended microvm's files, the guest's
//! environment, the daemon's store and its log. Its build runs with the build role: a RUN
//! step and the `/validate` hook read a build secret through IMDSv2 (and are refused one the
//! role may not read), the credentials they used are refused once the build is done, and a
//! build whose role may not read the secret fails.

mod daemon;

use daemon::*;
use std::path::Path;

/// Copies the pure-Python packages boto3 needs from the test venv into `lib`, botocore's
/// service models cut to the three the app calls (the rest is ~30 MB).
fn copy_boto3(lib: &Path) {
    let site = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/pyenv/lib/python3.11/site-packages");
    for pkg in ["boto3", "botocore", "s3transfer", "jmespath", "dateutil", "urllib3", "six.py"] {
        let from = site.join(pkg);
        assert!(from.exists(), "{} missing: scripts/test.sh installs boto3 in target/pyenv", from.display());
        let status = std::process::Command::new("cp").arg("-r").arg(&from).arg(lib).status().unwrap();
        assert!(status.success());
    }
    let data = lib.join("botocore/data");
    for e in std::fs::read_dir(&data).unwrap().flatten() {
        let keep = ["secretsmanager", "sts", "kms"].iter().any(|k| e.file_name() == *k);
        if e.path().is_dir() && !keep {
            std::fs::remove_dir_all(e.path()).unwrap();
        }
    }
    for e in walk(lib) {
        if e.ends_with("__pycache__") {
            let _ = std::fs::remove_dir_all(&e);
        }
    }
}

fn walk(p: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
        let path = e.path();
        if path.is_dir() {
            out.extend(walk(&path));
            out.push(path);
        }
    }
    out
}

#[test]
fn an_agents_secret_reaches_only_the_role_that_may_read_it_and_never_the_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let (a, b) = (key(&state), key(&state));
    let ctx = tmp.path().join("ctx");
    let web = ctx.join("web");
    std::fs::create_dir_all(web.join("lib")).unwrap();
    std::fs::write(
        web.join("Dockerfile"),
        "FROM debian:bookworm\nCOPY . /app/\nRUN python3 /app/flow_build.py\nCMD [\"python3\", \"/app/flow_app.py\"]\n",
    )
    .unwrap();
    for f in ["flow_app.py", "flow_build.py"] {
        std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/api").join(f), web.join(f)).unwrap();
    }
    copy_boto3(&web.join("lib"));
    allow_artifacts(&state, &a, &ctx);
    let log = tmp.path().join("daemon.log");
    let _microvms = Microvms(state.clone());
    // Debug logging: the secret must stay out of every line the daemon writes.
    let daemon = Daemon::start_with(&state, &[("RUST_LOG", "debug")], &log);
    let env = [("HEARTH_DAEMON_LOG", log.display().to_string())];
    let out = run_script("test_flow.py", &daemon.1, (&a, &b), &ctx, &state, &[], &env);
    assert!(out.contains("flow: ok"), "{out}");
    drop(daemon);
}
