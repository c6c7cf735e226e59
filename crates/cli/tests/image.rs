//! Images built elsewhere: an OCI image layout archive imported as a root filesystem and
//! booted in a real VM.

mod common;

use hearth_proto::exec::ExecRequest;
use hearth_vmm::{Disk, DiskFormat, Vm};

fn header(size: u64, mode: u32, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(size);
    h.set_mode(mode);
    h.set_entry_type(kind);
    h
}

fn layer(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data, mode) in files {
        let mut h = header(data.len() as u64, *mode, tar::EntryType::Regular);
        b.append_data(&mut h, path, *data).unwrap();
    }
    b.into_inner().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_oci_image_boots() {
    let tmp = tempfile::tempdir().unwrap();
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static (installed by the set-up)");
    let l1 = layer(&[
        ("bin/busybox", &busybox, 0o755),
        ("etc/passwd", b"root:x:0:0:root:/root:/bin/busybox\n", 0o644),
        ("etc/doomed", b"lower layer\n", 0o644),
    ]);
    let l2 = layer(&[("etc/.wh.doomed", b"", 0o644), ("marker", b"from the upper layer\n", 0o644)]);
    // An OCI image layout, as `skopeo copy … oci-archive:` or `docker save` (25+) write.
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8]| {
        let mut h = header(data.len() as u64, 0o644, tar::EntryType::Regular);
        b.append_data(&mut h, path, data).unwrap();
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    add("blobs/sha256/0001", &l1);
    add("blobs/sha256/0002", &l2);
    add("blobs/sha256/00ff", br#"{"layers":[{"digest":"sha256:0001"},{"digest":"sha256:0002"}]}"#);
    add("index.json", br#"{"manifests":[{"digest":"sha256:00ff"}]}"#);
    let archive = tmp.path().join("image.tar");
    std::fs::write(&archive, b.into_inner().unwrap()).unwrap();

    let rootfs = tmp.path().join("imported.ext4");
    hearth_image::oci::import(&archive, &rootfs, 64).unwrap();

    let mut cfg = common::config(hearth_image::base::Base::Busybox);
    cfg.root = Some(Disk::base(&rootfs, DiskFormat::Raw));
    let vm = Vm::boot(cfg).await.unwrap();
    let out = vm.exec(&ExecRequest::argv(["/bin/busybox", "cat", "/marker"]), None, 1 << 16).await.unwrap();
    assert_eq!(out.stdout_str(), "from the upper layer\n");
    let out = vm.exec(&ExecRequest::argv(["/bin/busybox", "ls", "/etc"]), None, 1 << 16).await.unwrap();
    assert_eq!(out.stdout_str(), "passwd\n", "the whiteout did not hide the lower file");
    vm.shutdown().await;
}

const APP: &str = r#"
import http.server, os, time
STARTED = time.time()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = {"/ready": b"ok", "/validate": b"ok"}.get(self.path, ("%s %.3f" % (os.environ["GREETING"], STARTED)).encode())
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", 8080), H).serve_forever()
"#;

/// A Python app built from a Dockerfile on debian-bookworm: its snapshot's clones answer
/// with the server that was started during the build (its start time predates the launch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dockerfile_app_is_built_and_clones_serve_without_restarting() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM debian:bookworm\nENV GREETING=hello\nWORKDIR /app\nCOPY app.py /app/\nRUN python3 -c 'import http.server' && test -f /app/app.py\nCMD [\"python3\", \"/app/app.py\"]\n",
    )
    .unwrap();
    std::fs::write(ctx.join("app.py"), APP).unwrap();
    let home = hearth_vmm::home::hearth_home();
    let req = hearth_image::build::BuildRequest {
        context: ctx.clone(),
        base: hearth_image::base::Base::DebianBookworm,
        env: Default::default(),
        hooks_port: 8080,
        ready_timeout: std::time::Duration::from_secs(120),
        validate: true,
    };
    let mut lines = Vec::new();
    let (snap, cfg) = hearth_image::build::build(&req, common::config(hearth_image::base::Base::DebianBookworm), &home, &tmp.path().join("image"), &mut |l| lines.push(l.to_owned()))
        .await
        .unwrap_or_else(|e| panic!("build failed: {e}"));
    assert_eq!(cfg.workdir, "/app");
    assert_eq!(cfg.env.get("GREETING").map(String::as_str), Some("hello"));

    let launched_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let vm = Vm::launch(&snap, &hearth_vmm::RestoreOptions::new()).await.unwrap();
    let r = vm.agent().hook(8080, "/", std::time::Duration::from_secs(30)).await.unwrap();
    assert_eq!(r.status, 200);
    let (greeting, started) = r.body.split_once(' ').unwrap();
    assert_eq!(greeting, "hello");
    let started: f64 = started.parse().unwrap();
    assert!(started < launched_at, "the server started after the launch ({started} vs {launched_at}): it was restarted");
    vm.kill().await;

    // A RUN that fails names its line and shows its output; nothing is left.
    std::fs::write(ctx.join("Dockerfile"), "FROM debian:bookworm\nRUN echo about to fail && exit 3\n").unwrap();
    let e = hearth_image::build::build(&req, common::config(hearth_image::base::Base::DebianBookworm), &home, &tmp.path().join("image2"), &mut |_| {})
        .await
        .err()
        .expect("a failing RUN built");
    let msg = e.to_string();
    assert!(msg.contains("line 2") && msg.contains("exit code 3") && msg.contains("about to fail"), "{msg}");
    assert!(!tmp.path().join("image2").exists());
}
