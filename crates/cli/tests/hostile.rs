//! The hostile-tenant suite: a real `hearth serve`, attacked through its public API only
//! by `tests/api/test_hostile.py` (boto3 and raw SigV4 requests): code artifacts that try
//! to write or read outside their context, host paths named through `file://`, downloads
//! aimed at the host and private networks, uploads that lie, another tenant's images
//! named in FROM. docs/SECURITY.md lists each attack and the check here that tries it.
//!
//! Afterwards the test itself checks what the script cannot see: nothing was written at
//! the host paths the archives aimed at, and the loopback server the downloads aimed at
//! was never reached.

mod daemon;

use daemon::*;
use std::io::Read;

#[test]
fn hostile_tenants_reach_nothing_of_the_host() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let (a, b) = (key(&state), key(&state));
    // The first tenant may name file:// artifacts beneath `root` only; inside it, a link
    // to the host's /etc and a directory context with a link escaping it.
    let root = tmp.path().join("root");
    std::fs::create_dir_all(root.join("web")).unwrap();
    std::fs::write(root.join("web/Dockerfile"), "FROM minimal\nRUN echo built > /built\n").unwrap();
    std::os::unix::fs::symlink("/etc", root.join("etc-link")).unwrap();
    std::fs::create_dir_all(root.join("sneaky")).unwrap();
    std::fs::write(root.join("sneaky/Dockerfile"), "FROM minimal\nCOPY secrets/shadow /stolen\n").unwrap();
    std::os::unix::fs::symlink("/etc", root.join("sneaky/secrets")).unwrap();
    allow_artifacts(&state, &a, &root);
    // Where the archives aim: a directory outside everything the daemon was given.
    let target = tmp.path().join("outside");
    std::fs::create_dir_all(&target).unwrap();

    // A loopback HTTP server that counts connections: downloads must never reach it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();

    let _microvms = Microvms(state.clone());
    let daemon = Daemon::start(&state);
    let env = [
        ("HEARTH_ROOT", root.display().to_string()),
        ("HEARTH_OUTSIDE", target.display().to_string()),
        ("HEARTH_LOOPBACK_PORT", port.to_string()),
    ];
    let out = run_script("test_hostile.py", &daemon.1, (&a, &b), &root, &state, &[], &env);
    assert!(out.contains("hostile: ok"), "{out}");

    // The CLI reaches the same daemon with no host path: a directory is zipped and uploaded
    // (links kept as links), for the tenant that may name no file:// path at all.
    let ctx = tmp.path().join("upload-ctx");
    std::fs::create_dir_all(ctx.join("www")).unwrap();
    std::fs::write(ctx.join("Dockerfile"), "FROM minimal\nCOPY www /www\nRUN test -L /www/passwd\n").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", ctx.join("www/passwd")).unwrap();
    let o = client(&daemon, &b).args(["images", "create", "uploaded", "--base", "minimal"]).arg(&ctx).output().unwrap();
    assert!(o.status.success(), "hearth images create with a directory: {o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("uploaded:v1 SUCCESSFUL"), "{o:?}");
    let account: serde_json::Value = serde_json::from_str(&b).unwrap();
    let uploads = std::fs::read_dir(state.join("artifacts").join(account["account"].as_str().unwrap())).unwrap().count();
    assert!(uploads >= 1, "the upload is kept in the tenant's own area");

    let written: Vec<_> = std::fs::read_dir(&target).unwrap().flatten().map(|e| e.path()).collect();
    assert!(written.is_empty(), "archives wrote outside their context: {written:?}");
    let mut reached = 0;
    while let Ok((mut c, _)) = listener.accept() {
        let mut buf = [0u8; 256];
        let _ = c.read(&mut buf);
        reached += 1;
    }
    assert_eq!(reached, 0, "a tenant's download reached a loopback server");
    // Nothing of a refused upload or a failed build stays behind.
    let uploads = state.join("artifacts");
    let stray: Vec<_> =
        walk(&uploads).into_iter().filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(".upload-"))).collect();
    assert!(stray.is_empty(), "temporary uploads left: {stray:?}");
    drop(daemon);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}
