//! The short soak in CI: `hearth-bench soak --check` with a few cycles of each phase
//! (suspend/resume keeping a process and a file, run → exec → terminate with descriptors,
//! RSS and disk bounded, concurrent launches all reaching RUNNING). The long one —
//! 100 / 300 / 30, recorded in docs/RELIABILITY.md — is the same command with its defaults.

#[test]
fn a_short_soak_leaks_nothing() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hearth-bench"))
        .args(["soak", "--cycles", "5", "--runs", "12", "--concurrent", "6", "--check", "--accel", "tcg"])
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "soak failed:\n{stdout}\n{stderr}");
    assert!(stderr.contains("within bounds") && stdout.contains("GetMicrovm during the launches"), "{stdout}\n{stderr}");
}
