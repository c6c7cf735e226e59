//! Files at any size and directories through `hearth serve` (issue 20, item 5): `hearth
//! cp` of a file just over 1 MiB both ways, a 300 MB download (its hash compared with the
//! guest's), `hearth cp -r` of a tree with symbolic links both ways; a full guest disk is
//! a 413 that says how to grow it and leaves no partial file (declared and undeclared
//! sizes); a missing path is a 404; hostile archives (`..`, absolute paths, a link leading
//! out, a size the data does not have, a Content-Length beyond any disk) are refused
//! with a 4xx and leave nothing behind.

use super::*;
use std::io::{Read, Write};

/// A tar whose entries' names are written raw (the tar crate's builder refuses `..` and
/// absolute names, as a hostile client would not).
fn raw_tar(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, kind, data, link) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.extend(vec![0u8; 1024]);
    out
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(b))
}

/// Polls `cmd`'s output in the microvm until `ok` holds (the agent removes its temporary
/// files once it sees a stream fail, which may be just after the daemon answered).
fn eventually(cli: &dyn Fn(&[&str]) -> std::process::Output, id: &str, cmd: &str, ok: impl Fn(&str) -> bool) {
    let t = std::time::Instant::now();
    loop {
        let o = cli(&["exec", id, "--", "sh", "-c", cmd]);
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        if ok(&out) {
            return;
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(20), "{cmd}: {out}");
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
}

#[test]
fn files_of_any_size_directories_and_refusals() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let key = key(&state);
    let _microvms = Microvms(state.clone());
    let d = Daemon::start(&state);
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), "FROM minimal\n").unwrap();
    let o = client(&d, &key).args(["images", "create", "files", "--base", "minimal"]).arg(&ctx).output().unwrap();
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("SUCCESSFUL"), "{o:?}");
    let v = json_of(&client(&d, &key).args(["run", "files", "--json"]).output().unwrap());
    let id = v["microvmId"].as_str().unwrap().to_owned();
    let cli = |args: &[&str]| client(&d, &key).args(args).output().unwrap();
    let at = |p: &str| format!("{id}:{p}");
    let local = |p: &str| tmp.path().join(p).to_str().unwrap().to_owned();

    // Just over the old 1 MiB limit, both ways, the same bytes (`--json` stays JSON).
    let small = tmp.path().join("small");
    std::fs::write(&small, (0..1_100_000u32).map(|i| (i * 7 % 251) as u8).collect::<Vec<_>>()).unwrap();
    let v = json_of(&cli(&["cp", "--json", small.to_str().unwrap(), &at("/workspace/small")]));
    assert_eq!(v["size"], 1_100_000, "{v}");
    let o = cli(&["cp", &at("/workspace/small"), &local("small.back")]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(std::fs::read(tmp.path().join("small.back")).unwrap(), std::fs::read(&small).unwrap());

    // 300 MB out (mostly zeros, so the guest makes it fast, with random bytes at its end),
    // compared by hash with the guest's own.
    let o = cli(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "dd if=/dev/zero of=/workspace/big bs=1M count=300 2>/dev/null && head -c 65536 /dev/urandom >> /workspace/big && sha256sum /workspace/big",
    ]);
    let want = String::from_utf8_lossy(&o.stdout).split_whitespace().next().unwrap_or_default().to_owned();
    assert_eq!(want.len(), 64, "{o:?}");
    let o = cli(&["cp", &at("/workspace/big"), &local("big")]);
    assert!(o.status.success(), "cp out 300 MB: {o:?}");
    assert_eq!(std::fs::metadata(tmp.path().join("big")).unwrap().len(), (300 << 20) + 65536);
    assert_eq!(sha256(&tmp.path().join("big")), want);
    std::fs::remove_file(tmp.path().join("big")).unwrap();
    let names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(!names.iter().any(|n| n.to_string_lossy().starts_with(".hearth-part")), "{names:?}");

    // A tree with links, into the microvm and back: the same tree, links kept as links.
    let tree = tmp.path().join("tree");
    std::fs::create_dir_all(tree.join("a/b")).unwrap();
    std::fs::write(tree.join("a/b/f"), b"deep\n").unwrap();
    std::fs::write(tree.join("top"), vec![3u8; 200_000]).unwrap();
    std::os::unix::fs::symlink("a/b/f", tree.join("link")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", tree.join("abs")).unwrap();
    let v = json_of(&cli(&["cp", "-r", "--json", tree.to_str().unwrap(), &at("/workspace/tree")]));
    assert_eq!((v["entries"].as_u64(), v["size"].as_u64()), (Some(6), Some(200_005)), "{v}");
    let o = cli(&["exec", &id, "--", "sh", "-c", "readlink /workspace/tree/link; cat /workspace/tree/link; readlink /workspace/tree/abs"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "a/b/f\ndeep\n/etc/hostname\n", "{o:?}");
    let o = cli(&["cp", "-r", tree.to_str().unwrap(), &at("/workspace/tree")]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("(409)"), "a second copy onto it: {o:?}");
    let o = cli(&["cp", "-r", &at("/workspace/tree"), &local("tree.back")]);
    assert!(o.status.success(), "cp -r out: {o:?}");
    let o = Command::new("diff").args(["-r", "--no-dereference"]).arg(&tree).arg(tmp.path().join("tree.back")).output().unwrap();
    assert!(o.status.success(), "the tree came back different: {o:?}");
    let o = cli(&["cp", tree.to_str().unwrap(), &at("/workspace/t2")]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("-r"), "{o:?}");

    // Missing paths: 404 for a file and a directory.
    for args in [vec!["cp", &at("/workspace/nothing")[..], &local("x")[..]], vec!["cp", "-r", &at("/nothing")[..], &local("y")[..]]] {
        let o = cli(&args);
        assert!(String::from_utf8_lossy(&o.stderr).contains("(404)"), "{o:?}");
    }

    // A full disk (an 8 MiB tmpfs stands in for the root disk): 413 saying how to grow it,
    // whether the size was declared (refused before the body is read) or not (ENOSPC as
    // it is written), and no partial file either way.
    let o = cli(&["exec", &id, "--", "sh", "-c", "mkdir -p /workspace/tiny && mount -t tmpfs -o size=8m tmpfs /workspace/tiny"]);
    assert!(o.status.success(), "{o:?}");
    let twenty = tmp.path().join("twenty");
    std::fs::write(&twenty, vec![9u8; 20 << 20]).unwrap();
    let o = cli(&["cp", twenty.to_str().unwrap(), &at("/workspace/tiny/f")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("(413)") && err.contains("hearth:disk-size-gib"), "{o:?}");
    let data = std::fs::read(&twenty).unwrap();
    let hash = sha256_hex(&data);
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = data.chunks(1 << 20).map(|c| Ok(c.to_vec())).collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let (status, text) = put_signed(&d, &key, &format!("/hearth/v1/microvms/{id}/files?path=/workspace/tiny/g"), body, &hash);
    assert_eq!(status, 413, "undeclared size into a full disk: {text}");
    assert!(text.contains("disk is full"), "{text}");
    eventually(&cli, &id, "ls -A /workspace/tiny; echo end", |o| o == "end\n");

    // Hostile archives: refused (4xx), nothing outside the target, nothing left behind.
    let archive = |path: &str, body: Vec<u8>| {
        let hash = sha256_hex(&body);
        put_signed(&d, &key, &format!("/hearth/v1/microvms/{id}/files/archive?path={path}"), reqwest::Body::from(body), &hash)
    };
    let r = tar::EntryType::Regular;
    let hostile: Vec<(&str, Vec<u8>)> = vec![
        ("'..'", raw_tar(&[("../../escaped", r, b"x", None)])),
        ("absolute", raw_tar(&[("/escaped", r, b"x", None)])),
        ("goes through the link", raw_tar(&[("out", tar::EntryType::Symlink, b"", Some("/")), ("out/escaped", r, b"x", None)])),
        ("character device", raw_tar(&[("dev", tar::EntryType::Char, b"", None)])),
    ];
    for (why, body) in hostile {
        let (status, text) = archive("/workspace/h/t", body);
        assert_eq!(status, 400, "{why}: {text}");
        assert!(text.contains(why), "{why}: {text}");
    }
    // An entry that claims a terabyte and brings 4 KiB.
    let mut huge = raw_tar(&[("huge", r, &[0u8; 4096], None)]);
    {
        let mut h = tar::Header::new_gnu();
        h.set_path("huge").unwrap();
        h.set_size(1 << 40);
        h.set_cksum();
        huge[..512].copy_from_slice(h.as_bytes());
    }
    let (status, text) = archive("/workspace/h/t", huge);
    assert!((400..500).contains(&status), "a lying entry size: {status} {text}");
    eventually(&cli, &id, "ls -A /workspace/h / | grep -c escaped; ls -A /workspace/h", |o| o == "0\n");

    // A Content-Length no disk holds: refused before the body is read, connection closed.
    let keyv: Value = serde_json::from_str(&key).unwrap();
    let url = format!("{}/hearth/v1/microvms/{id}/files?path=/workspace/huge", d.1);
    let uri: http::Uri = url.parse().unwrap();
    let mut headers = http::HeaderMap::new();
    headers.insert("host", uri.authority().unwrap().as_str().parse().unwrap());
    hearth_api::sigv4::sign_streamed(
        &http::Method::PUT,
        &uri,
        &mut headers,
        &"0".repeat(64),
        keyv["accessKeyId"].as_str().unwrap(),
        keyv["secretAccessKey"].as_str().unwrap(),
        "us-east-1",
        std::time::SystemTime::now(),
    )
    .unwrap();
    let mut s = std::net::TcpStream::connect(uri.authority().unwrap().as_str()).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    let mut head = format!("PUT {} HTTP/1.1\r\ncontent-length: 1000000000000000\r\nconnection: close\r\n", uri.path_and_query().unwrap());
    for (k, v) in &headers {
        head.push_str(&format!("{k}: {}\r\n", v.to_str().unwrap()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&[0u8; 4096]).unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "a petabyte declared: {answer}");
    eventually(&cli, &id, "ls -A /workspace | grep -c hearth-upload", |o| o == "0\n");
}
