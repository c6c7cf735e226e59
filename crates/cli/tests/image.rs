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

fn nonce() -> String {
    let mut b = [0u8; 8];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Launches a clone of `snap` and checks its app answers with `greeting` from a server
/// started before the launch (so it was not restarted).
async fn clone_serves(snap: &hearth_vmm::Snapshot, greeting: &str) -> Vm {
    let launched_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let vm = Vm::launch(snap, &hearth_vmm::RestoreOptions::new()).await.unwrap();
    let r = vm.agent().hook(8080, "/", std::time::Duration::from_secs(30)).await.unwrap();
    assert_eq!(r.status, 200);
    let (said, started) = r.body.split_once(' ').unwrap();
    assert_eq!(said, greeting);
    let started: f64 = started.parse().unwrap();
    assert!(started < launched_at, "the server started after the launch ({started} vs {launched_at}): it was restarted");
    vm
}

/// A Python app built from a Dockerfile on debian-bookworm, with a package installed by
/// `apt-get` through the builder's network: its snapshot's clones answer with the server
/// started during the build. A rebuild after a code change reuses the cached layers up to
/// the COPY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dockerfile_app_is_built_and_clones_serve_without_restarting() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir(&ctx).unwrap();
    // The ARG's unique default gives this run its own cache keys, so the first build
    // really runs apt-get (a cached layer from an earlier run would hide a broken network).
    std::fs::write(
        ctx.join("Dockerfile"),
        format!(
            "FROM debian:bookworm\nARG NONCE={}\nENV GREETING=hello\n\
             RUN apt-get update && apt-get install -y --no-install-recommends python3 jq\n\
             WORKDIR /app\nCOPY app.py /app/\nRUN python3 -c 'import http.server' && test -f /app/app.py\n\
             CMD [\"python3\", \"/app/app.py\"]\n",
            nonce()
        ),
    )
    .unwrap();
    std::fs::write(ctx.join("app.py"), APP).unwrap();
    let home = hearth_vmm::home::hearth_home();
    let req = hearth_image::build::BuildRequest {
        context: ctx.clone(),
        base: hearth_image::base::Base::DebianBookworm,
        env: Default::default(),
        hooks_port: 8080,
        ready_hook: true,
        ready_timeout: std::time::Duration::from_secs(120),
        validate: true,
        validate_timeout: std::time::Duration::from_secs(120),
        network: Some(hearth_vmm::net::Egress::internet()),
        cache: Some(hearth_image::layers::LayerCache::new(&home)),
        images: std::sync::Arc::new(hearth_image::build::NoImages),
        disk_gib: None,
        cache_scope: None,
    };
    let mut lines = Vec::new();
    let (snap, cfg) = hearth_image::build::build(
        &req,
        common::config(hearth_image::base::Base::DebianBookworm),
        &home,
        &tmp.path().join("image"),
        &mut |l| lines.push(l.to_owned()),
    )
    .await
    .unwrap_or_else(|e| panic!("build failed: {e}"));
    assert_eq!(cfg.workdir, "/app");
    assert_eq!(cfg.env.get("GREETING").map(String::as_str), Some("hello"));
    assert!(!lines.iter().any(|l| l.contains("[cached]")), "the first build used the cache:\n{}", lines.join("\n"));

    let vm = clone_serves(&snap, "hello").await;
    let jq = vm.exec(&ExecRequest::shell("echo '{\"a\": 7}' | jq .a"), None, 1 << 16).await.unwrap();
    assert_eq!(jq.stdout_str().trim(), "7", "jq (installed by apt-get in a RUN step) does not work: {}", jq.stderr_str());
    vm.kill().await;

    // A code-only change: every step before the COPY comes from the cache.
    std::fs::write(ctx.join("app.py"), APP.replace("os.environ[\"GREETING\"]", "os.environ[\"GREETING\"].upper()")).unwrap();
    let mut lines = Vec::new();
    let (snap2, _) = hearth_image::build::build(
        &req,
        common::config(hearth_image::base::Base::DebianBookworm),
        &home,
        &tmp.path().join("image-v2"),
        &mut |l| lines.push(l.to_owned()),
    )
    .await
    .unwrap_or_else(|e| panic!("rebuild failed: {e}"));
    let log = lines.join("\n");
    assert!(log.contains("using cached layers up to step 4/7"), "{log}");
    assert!(lines.iter().any(|l| l.contains("[cached]") && l.contains("apt-get")), "{log}");
    assert!(!lines.iter().any(|l| l.starts_with("  |") && l.contains("Unpacking")), "apt-get ran again:\n{log}");
    let vm = clone_serves(&snap2, "HELLO").await;
    vm.kill().await;

    // A RUN that fails names its line and shows its output; nothing is left.
    std::fs::write(ctx.join("Dockerfile"), "FROM debian:bookworm\nRUN echo about to fail && exit 3\n").unwrap();
    let e = hearth_image::build::build(
        &req,
        common::config(hearth_image::base::Base::DebianBookworm),
        &home,
        &tmp.path().join("image2"),
        &mut |_| {},
    )
    .await
    .map(|_| ())
    .expect_err("a failing RUN built");
    let msg = e.to_string();
    assert!(msg.contains("line 2") && msg.contains("exit code 3") && msg.contains("about to fail"), "{msg}");
    assert!(!tmp.path().join("image2").exists());
}

/// The minimal base is a full busybox (every applet of its default configuration, `wget`
/// with `-T`, names resolved from `/etc/hosts`) on an 8 GiB root disk that costs the host
/// a few MiB; a full disk is refused to a file write with the reason and what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_minimal_base_is_a_full_busybox_on_a_roomy_sparse_disk() {
    let home = hearth_vmm::home::hearth_home();
    let base = hearth_image::base::Base::Busybox.path(&home);
    let m = std::fs::metadata(&base).unwrap();
    assert!(m.len() >= 8 << 30, "the base is {} bytes long", m.len());
    let on_host = std::os::unix::fs::MetadataExt::blocks(&m) * 512;
    assert!(on_host < 64 << 20, "the 8 GiB base takes {on_host} bytes on the host");

    let vm = Vm::boot(common::config(hearth_image::base::Base::Busybox)).await.unwrap();
    let sh = |s: &str| ExecRequest::shell(s.to_owned());
    let out = vm.exec(&sh("busybox --list | wc -l && nohup true && echo nohup"), None, 1 << 16).await.unwrap();
    let lines: Vec<String> = out.stdout_str().lines().map(str::to_owned).collect();
    assert!(lines.len() == 2 && lines[0].trim().parse::<u32>().unwrap() >= 390 && lines[1] == "nohup", "{lines:?} {}", out.stderr_str());
    // `-T` crashed Debian's busybox-static; `localhost` comes from /etc/hosts (no network).
    let out = vm.exec(&sh("wget -T 5 -q -O /dev/null http://localhost:9/"), None, 1 << 16).await.unwrap();
    assert_eq!(out.exit.code, Some(1), "{out:?}");
    assert!(out.stderr_str().contains("127.0.0.1"), "{}", out.stderr_str());
    let out = vm.exec(&sh("df -k / | tail -1"), None, 1 << 16).await.unwrap();
    let total_kib: u64 = out.stdout_str().split_whitespace().nth(1).and_then(|k| k.parse().ok()).unwrap_or(0);
    assert!(total_kib >= 15 << 19, "df / says {}", out.stdout_str());

    // Fill the disk: fallocate keeps what it could allocate (no data written by the host).
    let out = vm.exec(&sh("fallocate -l 20G /fill"), None, 1 << 16).await.unwrap();
    assert!(out.stderr_str().contains("No space left on device"), "{out:?}");
    let e = vm.agent().write_file_bytes(&"/more".into(), None, bytes::Bytes::from(vec![7u8; 1 << 20])).await.unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("No space left on device") && msg.contains("hearth:disk-size-gib"), "{msg}");
    vm.kill().await;
}
