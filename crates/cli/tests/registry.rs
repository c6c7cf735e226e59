//! `FROM <any OCI image>` end to end against real registries: Debian's `docker-registry`
//! (the CNCF distribution registry) started on loopback ports with their own storage, one
//! of them behind htpasswd; images built here as OCI layouts (a busybox root with a fake
//! `python3`) and pushed with `skopeo`. The first registry is `hearth serve
//! --registry-mirror docker.io=…`, so `FROM python:3.12-slim` pulls from it. Builds go
//! through the API (CreateMicrovmImage) in builder VMs, and a microvm runs the result.
//! Also: a digest reference, a multi-stage build, a registry needing credentials, and
//! failures that must end FAILED with a reason a user can act on (a bad reference, a
//! missing tag, an unreachable registry, a missing architecture, a loopback registry the
//! operator did not configure, a registry refusing anonymous pulls, and a hostile image
//! whose whiteout reaches through a link out of its root).

mod daemon;

use daemon::*;
use hearth_api::client::Client;
use http::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `docker-registry` on a loopback port, killed (by its PID) when dropped.
struct Registry {
    child: Child,
    port: u16,
}

impl Registry {
    fn start(dir: &Path, htpasswd: Option<&Path>) -> Registry {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        std::fs::create_dir_all(dir.join("storage")).unwrap();
        let auth = htpasswd.map_or(String::new(), |p| format!("auth:\n  htpasswd:\n    realm: hearth-test\n    path: {}\n", p.display()));
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}",
                dir.join("storage").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("docker-registry (Debian's docker-registry package: scripts/setup-host.sh installs it)");
        let reg = Registry { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the registry never listened: {}",
                std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        reg
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sha(b: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(b))
}

fn header(size: u64, mode: u32, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

/// A layer entry: `(path, Some((bytes, mode)))` for a file, `(path, None)` for a directory.
type Entry<'a> = (&'a str, Option<(&'a [u8], u32)>);

/// A layer of `files` and `links` (`(path, target)`).
fn layer(files: &[Entry], links: &[(&str, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        match data {
            Some((d, mode)) => b.append_data(&mut header(d.len() as u64, *mode, tar::EntryType::Regular), path, *d).unwrap(),
            None => b.append_data(&mut header(0, 0o755, tar::EntryType::Directory), path, &[][..]).unwrap(),
        }
    }
    for (path, target) in links {
        b.append_link(&mut header(0, 0o777, tar::EntryType::Symlink), path, target).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, b).unwrap();
    gz.finish().unwrap()
}

/// An OCI image layout at `dir` tagged `tag`: a busybox root (layer 1) and a fake
/// `python3` with a whiteout of layer 1's `/etc/motd` (layer 2), for `arch`.
fn python_layout(dir: &Path, tag: &str, arch: &str) {
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (busybox-static)");
    let list = Command::new("/bin/busybox").arg("--list-full").output().unwrap();
    let applets: Vec<String> = String::from_utf8(list.stdout).unwrap().lines().filter(|a| *a != "bin/busybox").map(str::to_owned).collect();
    let links: Vec<(&str, &str)> = applets.iter().map(|a| (a.as_str(), "/bin/busybox")).collect();
    let l1 = layer(
        &[
            ("bin/", None),
            ("sbin/", None),
            ("usr/bin/", None),
            ("usr/sbin/", None),
            ("etc/", None),
            ("tmp/", None),
            ("bin/busybox", Some((&busybox, 0o755))),
            ("etc/passwd", Some((b"root:x:0:0:root:/root:/bin/sh\n", 0o644))),
            ("etc/group", Some((b"root:x:0:\n", 0o644))),
            ("etc/motd", Some((b"lower layer\n", 0o644))),
        ],
        &links,
    );
    let python = b"#!/bin/sh\necho \"Python 3.12.0 (hearth test image)\"\n";
    let l2 = layer(
        &[
            ("usr/local/", None),
            ("usr/local/bin/", None),
            ("usr/local/bin/python3", Some((python, 0o755))),
            ("srv/", None),
            ("etc/.wh.motd", Some((b"", 0o644))),
        ],
        &[],
    );
    write_layout(dir, tag, arch, &[l1, l2]);
}

/// Writes an OCI image layout of `layers` (uncompressed tars, gzipped here) tagged `tag`,
/// whose top manifest is a one-platform index.
fn write_layout(dir: &Path, tag: &str, arch: &str, layers: &[Vec<u8>]) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |b: &[u8]| {
        let d = sha(b);
        std::fs::write(blobs.join(d.trim_start_matches("sha256:")), b).unwrap();
        (d, b.len())
    };
    let config = json!({
        "architecture": arch, "os": "linux",
        "config": {"Env": ["PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "PYTHON_VERSION=3.12.0"], "WorkingDir": "/srv", "Cmd": ["python3"]},
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| sha(l)).collect::<Vec<_>>()},
    });
    let (cd, cs) = put(&serde_json::to_vec(&config).unwrap());
    let gz = "application/vnd.oci.image.layer.v1.tar+gzip";
    let descriptors: Vec<Value> = layers
        .iter()
        .map(|l| {
            let (d, size) = put(&gzip(l));
            json!({"mediaType": gz, "digest": d, "size": size})
        })
        .collect();
    let manifest = json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
        "layers": descriptors,
    });
    let (md, ms) = put(&serde_json::to_vec(&manifest).unwrap());
    let platform = json!({"architecture": arch, "os": "linux"});
    // A multi-platform index with only this architecture, as `docker buildx` makes them.
    let index = json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms, "platform": platform}],
    });
    let (id, is) = put(&serde_json::to_vec(&index).unwrap());
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let top = json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.index.v1+json", "digest": id, "size": is,
        "annotations": {"org.opencontainers.image.ref.name": tag},
    }]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
}

fn skopeo(args: &[&str]) -> String {
    let o = Command::new("skopeo").args(args).output().expect("skopeo (scripts/setup-host.sh installs it)");
    assert!(o.status.success(), "skopeo {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Pushes the layout `dir:tag` to `dest` (`host/repo:tag`), the whole index.
fn push(dir: &Path, tag: &str, dest: &str, creds: Option<&str>) {
    let src = format!("oci:{}:{tag}", dir.display());
    let dst = format!("docker://{dest}");
    let mut args = vec!["copy", "--all", "--dest-tls-verify=false"];
    if let Some(c) = creds {
        args.extend(["--dest-creds", c]);
    }
    args.extend([src.as_str(), dst.as_str()]);
    skopeo(&args);
}

struct Tenant {
    c: Client,
    ctx: PathBuf,
    state: PathBuf,
    account: String,
}

impl Tenant {
    async fn create(&self, name: &str, dockerfile: &str) {
        let dir = self.ctx.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
        let body = json!({
            "name": name,
            "baseImageArn": hearth_api::service::managed_arn("minimal"),
            "buildRoleArn": "arn:aws:iam::000000000000:role/hearth-test",
            "codeArtifact": { "uri": format!("file://{}", dir.display()) },
        });
        self.c.call(Method::POST, "/2025-09-09/microvm-images", Some(&body)).await.unwrap_or_else(|e| panic!("{name}: {e:?}"));
    }

    async fn ended(&self, name: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(900);
        loop {
            let v = self.c.call(Method::GET, &format!("/2025-09-09/microvm-images/{name}/versions/1"), None).await.unwrap();
            if matches!(v["state"].as_str(), Some("SUCCESSFUL" | "FAILED")) {
                return v;
            }
            assert!(Instant::now() < deadline, "{name} still {}", v["state"]);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn build_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.state.join("images").join(&self.account).join(name).join("1/build.log")).unwrap_or_default()
    }

    /// Expects `name` to have built; returns its build log.
    async fn built(&self, name: &str) -> String {
        let v = self.ended(name).await;
        let log = self.build_log(name);
        assert_eq!(v["state"], "SUCCESSFUL", "{name}: {v}\n{log}");
        log
    }

    /// Expects `name` to have failed with a reason containing every one of `words`.
    async fn failed(&self, name: &str, words: &[&str]) {
        let v = self.ended(name).await;
        let reason = v["stateReason"].as_str().unwrap_or_default();
        assert_eq!(v["state"], "FAILED", "{name}: {v}");
        for w in words {
            assert!(reason.contains(w), "{name}: {w:?} not in {reason:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_from_pulls_from_real_registries() {
    let tmp = tempfile::tempdir().unwrap();
    // The public registry (the mirror of docker.io) and a private one behind htpasswd.
    let public = Registry::start(&tmp.path().join("public"), None);
    let htpasswd = tmp.path().join("htpasswd");
    let o = Command::new("htpasswd").args(["-Bbn", "hearth", "s3cret"]).output().expect("htpasswd (apache2-utils)");
    assert!(o.status.success());
    std::fs::write(&htpasswd, &o.stdout).unwrap();
    let private = Registry::start(&tmp.path().join("private"), Some(&htpasswd));
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();

    let amd = tmp.path().join("amd");
    python_layout(&amd, "3.12-slim", "amd64");
    push(&amd, "3.12-slim", &format!("{}/library/python:3.12-slim", public.host()), None);
    push(&amd, "3.12-slim", &format!("{}/team/secret:1", private.host()), Some("hearth:s3cret"));
    let arm = tmp.path().join("arm");
    python_layout(&arm, "1", "arm64");
    push(&arm, "1", &format!("{}/library/armonly:1", public.host()), None);
    // A hostile image: a link out of its root, then a whiteout through it.
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("victim"), b"keep").unwrap();
    let evil = tmp.path().join("evil");
    write_layout(
        &evil,
        "1",
        "amd64",
        &[layer(&[], &[("escape", outside.to_str().unwrap())]), layer(&[("escape/.wh.victim", Some((b"", 0o644)))], &[])],
    );
    push(&evil, "1", &format!("{}/library/evil:1", public.host()), None);
    let inspected: Value =
        serde_json::from_str(&skopeo(&["inspect", "--tls-verify=false", &format!("docker://{}/library/python:3.12-slim", public.host())]))
            .unwrap();
    let digest = inspected["Digest"].as_str().unwrap().to_owned();

    // The operator's settings: credentials for the private registry (spoken over plain
    // HTTP, so named as its own mirror), a registry nothing listens on, and `localhost`
    // for the private one without credentials.
    let state = tmp.path().join("state");
    let k = key(&state);
    std::fs::write(
        state.join("registries.json"),
        json!({
            "mirrors": {
                private.host(): format!("http://{}", private.host()),
                "unreachable.test": format!("http://127.0.0.1:{closed}"),
                format!("localhost:{}", private.port): format!("http://localhost:{}", private.port),
            },
            "credentials": { private.host(): {"username": "hearth", "password": "s3cret"} },
        })
        .to_string(),
    )
    .unwrap();
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    allow_artifacts(&state, &k, &ctx);
    let kv: Value = serde_json::from_str(&k).unwrap();
    let account = kv["account"].as_str().unwrap().to_owned();
    let o = hearth().args(["accounts", "set", &account, "--quota", "builds=20", "--state-dir"]).arg(&state).output().unwrap();
    assert!(o.status.success(), "{o:?}");
    let _microvms = Microvms(state.clone());
    let mirror = format!("docker.io=http://{}", public.host());
    let daemon = Daemon::start_args(&state, &["--registry-mirror", &mirror]);
    let t = Tenant {
        c: Client::new(&daemon.1, kv["accessKeyId"].as_str().unwrap(), kv["secretAccessKey"].as_str().unwrap()),
        ctx,
        state: state.clone(),
        account,
    };

    // The first line most people write; ENV and WORKDIR come from the image's config.
    let app = "FROM python:3.12-slim\nRUN python3 > v.txt && echo \"$PYTHON_VERSION\" > env.txt && test ! -e /etc/motd\n";
    t.create("py", app).await;
    let log = t.built("py").await;
    assert!(log.contains("docker.io/library/python:3.12-slim") && log.contains("cached as sha256:"), "{log}");
    let ext4s = |dir: &Path| {
        std::fs::read_dir(dir).into_iter().flatten().flatten().filter(|e| e.path().extension().is_some_and(|x| x == "ext4")).count()
    };
    assert_eq!(ext4s(&state.join("oci/shared")), 1, "a public image is cached once, for everyone");

    // The rest at once: they queue behind the host's build limit.
    t.create("pinned", &format!("FROM python@{digest}\nRUN python3 > /pinned.txt\n")).await;
    t.create(
        "staged",
        "FROM python:3.12-slim AS build\nRUN mkdir -p /out && python3 > /out/version.txt && ln -s version.txt /out/link\n\
         FROM minimal\nCOPY --from=build /out /app/\nRUN test \"$(cat /app/link)\" = \"Python 3.12.0 (hearth test image)\"\n",
    )
    .await;
    t.create("secret", &format!("FROM {}/team/secret:1\nRUN python3 > /s.txt\n", private.host())).await;
    t.create("evil", "FROM evil:1\n").await;
    t.create("badref", "FROM Python/Slim:3\n").await;
    t.create("notag", "FROM python:9.99\n").await;
    t.create("down", "FROM unreachable.test/x/y:1\n").await;
    t.create("arm", "FROM armonly:1\n").await;
    t.create("loopback", &format!("FROM 127.0.0.2:{}/library/python:3.12-slim\n", public.port)).await;
    t.create("anonymous", &format!("FROM localhost:{}/team/secret:1\n", private.port)).await;

    t.failed("evil", &["escape/.wh.victim", "passes through a link"]).await;
    assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"keep");
    t.failed("badref", &["FROM Python/Slim:3", "not an image reference", "lower case"]).await;
    t.failed("notag", &["docker.io/library/python:9.99", "no such image", "check the name"]).await;
    t.failed("down", &["cannot reach the registry 127.0.0.1", "mirror of unreachable.test", "reachable from the Hearth host"]).await;
    t.failed("arm", &["no linux/amd64 variant", "linux/arm64"]).await;
    t.failed("loopback", &["127.0.0.2", "loopback", "operator configured"]).await;
    t.failed("anonymous", &["refused access", "credentials"]).await;
    let log = t.built("pinned").await;
    assert!(log.contains(&format!("cached as {}", digest)) || log.contains("cached as sha256:"), "{log}");
    assert_eq!(ext4s(&state.join("oci/shared")), 1, "the digest reference reused the cache:\n{log}");
    t.built("staged").await;
    t.built("secret").await;
    let own = state.join("oci/accounts").join(&t.account);
    assert_eq!(ext4s(&own), 1, "an image pulled with credentials is cached for its tenant only");
    assert_eq!(ext4s(&state.join("oci/shared")), 1);

    // A microvm runs the image built FROM python:3.12-slim.
    let out = client(&daemon, &k).args(["run", "py", "--json"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let run: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{out:?}"));
    let id = run["microvmId"].as_str().unwrap().to_owned();
    let exec = |args: &[&str]| {
        let mut a = vec!["exec", id.as_str(), "--"];
        a.extend_from_slice(args);
        client(&daemon, &k).args(&a).output().unwrap()
    };
    let o = exec(&["cat", "/srv/v.txt", "/srv/env.txt"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "Python 3.12.0 (hearth test image)\n3.12.0\n", "{o:?}");
    let o = exec(&["/usr/local/bin/python3"]);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("Python 3.12.0"), "{o:?}");
    let _ = client(&daemon, &k).args(["rm", &id]).output();
}
