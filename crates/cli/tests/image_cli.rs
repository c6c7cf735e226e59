//! `hearth images local …` end to end, on the minimal (busybox) base: building on another Hearth
//! image, an app that never becomes ready, bad code artifacts, and what each leaves behind.

use std::path::Path;
use std::process::{Command, Output};

fn hearth(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(args)
        .env("HEARTH_ACCEL", std::env::var("HEARTH_ACCEL").unwrap_or_else(|_| "auto".into()))
        .output()
        .expect("run hearth")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn nonce() -> String {
    let mut b = [0u8; 6];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn write(dir: &Path, files: &[(&str, &str)]) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, body) in files {
        std::fs::write(dir.join(name), body).unwrap();
    }
}

fn layer_files() -> usize {
    let dir = hearth_vmm::home::hearth_home().join("layers");
    std::fs::read_dir(dir).map(|d| d.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "qcow2")).count()).unwrap_or(0)
}

/// Removes the test's images whatever happens.
struct Images(Vec<String>);
impl Drop for Images {
    fn drop(&mut self) {
        for n in self.0.iter().rev() {
            let _ = hearth(&["images", "local", "rm", n]);
        }
    }
}

#[test]
fn images_build_on_images_and_failures_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (parent, child) = (format!("it-parent-{}", nonce()), format!("it-child-{}", nonce()));
    let _cleanup = Images(vec![parent.clone(), child.clone()]);

    // A parent image: busybox httpd serving /www, with an ENV and a WORKDIR to inherit.
    let pctx = tmp.path().join("parent");
    write(
        &pctx,
        &[
            ("Dockerfile", "FROM minimal\nARG WWW=/www\nENV WHO=parent DOCROOT=$WWW\nWORKDIR ${DOCROOT}\nCOPY ready $DOCROOT/\nRUN echo parent > /parent.txt\nCMD busybox httpd -f -p 8080 -h /www\n"),
            ("ready", "ok\n"),
        ],
    );
    let o = hearth(&[
        "images",
        "local",
        "build",
        pctx.to_str().unwrap(),
        "--name",
        &parent,
        "--base",
        "minimal",
        "--egress",
        "none",
        "--ready-timeout",
        "60",
    ]);
    assert!(o.status.success(), "parent build failed:\n{}", text(&o));

    // A child built FROM it (a zip this time): the parent's files, environment, working
    // directory and app carry over.
    let cctx = tmp.path().join("child");
    write(&cctx, &[("Dockerfile", &format!("FROM hearth/{parent}\nRUN cat /parent.txt > child.txt && echo \"$WHO\" >> child.txt\n"))]);
    let zip_path = tmp.path().join("child.zip");
    {
        let mut z = zip::ZipWriter::new(std::fs::File::create(&zip_path).unwrap());
        z.start_file("Dockerfile", zip::write::SimpleFileOptions::default()).unwrap();
        std::io::Write::write_all(&mut z, std::fs::read(cctx.join("Dockerfile")).unwrap().as_slice()).unwrap();
        z.finish().unwrap();
    }
    let uri = format!("file://{}", zip_path.display());
    let o = hearth(&["images", "local", "build", &uri, "--name", &child, "--base", "minimal", "--egress", "none", "--ready-timeout", "60"]);
    assert!(o.status.success(), "child build failed:\n{}", text(&o));
    let o = hearth(&[
        "images",
        "local",
        "run",
        &child,
        "--egress",
        "none",
        "--",
        "busybox",
        "sh",
        "-c",
        "cat child.txt; busybox wget -q -O- http://127.0.0.1:8080/ready",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "parent\nparent\nok\n", "{}", text(&o));
    let o = hearth(&["images", "local", "rm", &parent]);
    assert!(!o.status.success() && text(&o).contains(&child), "removing an image another is built on must be refused: {}", text(&o));

    // An app that never answers /ready: FAILED, its output in the error, no snapshot, no
    // layer file left behind.
    let before = layer_files();
    let nctx = tmp.path().join("never");
    write(&nctx, &[("Dockerfile", "FROM minimal\nCMD echo never-ready-$((6*7)); sleep 1000\n")]);
    let never = format!("it-never-{}", nonce());
    let _cleanup_never = Images(vec![never.clone()]);
    let o = hearth(&[
        "images",
        "local",
        "build",
        nctx.to_str().unwrap(),
        "--name",
        &never,
        "--base",
        "minimal",
        "--egress",
        "none",
        "--ready-timeout",
        "3",
    ]);
    assert!(!o.status.success());
    let out = text(&o);
    assert!(out.contains("did not become ready") && out.contains("never-ready-42"), "{out}");
    let show = hearth(&["images", "local", "show", &never]);
    let rec: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap_or_else(|_| panic!("{}", text(&show)));
    assert_eq!(rec["state"], "FAILED");
    let vdir = hearth_vmm::home::hearth_home().join("images").join(&never).join("v1");
    assert!(!vdir.join("snapshot").exists(), "a failed build left a snapshot");
    assert!(vdir.join("build.log").is_file());
    assert_eq!(layer_files(), before, "a failed build left a layer file");

    // Bad artifacts are refused before any version is recorded.
    let bad = format!("it-bad-{}", nonce());
    let nodf = tmp.path().join("nodf");
    write(&nodf, &[("app.py", "print()")]);
    let o = hearth(&["images", "local", "build", nodf.to_str().unwrap(), "--name", &bad, "--base", "minimal", "--egress", "none"]);
    assert!(!o.status.success() && text(&o).contains("Dockerfile"), "{}", text(&o));
    let o = hearth(&["images", "local", "build", "s3://bucket/code.zip", "--name", &bad, "--base", "minimal"]);
    assert!(!o.status.success() && text(&o).contains("http"), "{}", text(&o));
    let o = hearth(&["images", "local", "build", pctx.to_str().unwrap(), "--name", &bad, "--base", "no-such-base"]);
    assert!(!o.status.success() && text(&o).contains("no-such-base"), "{}", text(&o));
    // The API's name rule (no dots), checked before anything is recorded.
    let dotted = format!("it.bad-{}", nonce());
    let o = hearth(&["images", "local", "build", pctx.to_str().unwrap(), "--name", &dotted, "--base", "minimal", "--egress", "none"]);
    assert!(!o.status.success() && text(&o).contains("must be 1-64"), "{}", text(&o));
    assert!(!hearth_vmm::home::hearth_home().join("images").join(&bad).exists(), "bad input recorded a version");
    assert!(!hearth_vmm::home::hearth_home().join("images").join(&dotted).exists(), "bad input recorded a version");

    // The old spelling still works, with a one-line note on stderr.
    let o = hearth(&["image", "ls", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("use `hearth images local"), "{}", text(&o));
    serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap_or_else(|_| panic!("{}", text(&o)));
}
