use super::*;

/// bytes written as they are, then closing the connection. Returns its base URL.
async fn serve(respond: fn(&str) -> Vec<u8>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&request).into_owned();
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                // The client may hang up early (a refused body): ignore write errors.
                let _ = conn.write_all(&respond(&path)).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    base
}

fn response(status: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!("HTTP/1.1 {status}\r\nConnection: close\r\n{headers}\r\n").into_bytes();
    r.extend_from_slice(body);
    r
}

fn with_length(body: &[u8]) -> Vec<u8> {
    response("200 OK", &format!("Content-Length: {}\r\n", body.len()), body)
}

fn chunked(chunks: &[&[u8]]) -> Vec<u8> {
    let mut body = Vec::new();
    for c in chunks {
        body.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        body.extend_from_slice(c);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    response("200 OK", "Transfer-Encoding: chunked\r\n", &body)
}

fn routes(path: &str) -> Vec<u8> {
    match path {
        "/app.zip" => with_length(b"0123456789"),
        "/moved" => response("302 Found", "Location: /app.zip\r\nContent-Length: 0\r\n", b""),
        "/loop" => response("302 Found", "Location: /loop\r\nContent-Length: 0\r\n", b""),
        "/declared-big" => with_length(&[7u8; 11]),
        "/chunked-big" => chunked(&[&[1u8; 6], &[2u8; 6]]),
        "/chunked-ok" => chunked(&[&[1u8; 5], &[2u8; 5]]),
        // No length at all: the body ends when the connection closes.
        "/close-big" => response("200 OK", "", &[3u8; 11]),
        "/truncated" => response("200 OK", "Content-Length: 10\r\n", b"01234"),
        "/error" => response("500 Internal Server Error", "Content-Length: 0\r\n", b""),
        // Redirects out of the test server's exemption (see `get`).
        "/to-metadata" => redirect("http://169.254.169.254/latest/meta-data/"),
        "/to-other-port" => redirect("http://127.0.0.1:1/app.zip"),
        "/to-v6-loopback" => redirect("http://[::1]/app.zip"),
        "/to-private" => redirect("http://10.1.2.3/app.zip"),
        "/to-localhost" => redirect("http://localhost/app.zip"),
        "/to-moved-to-private" => redirect("/to-private"),
        _ => response("404 Not Found", "Content-Length: 9\r\n", b"not found"),
    }
}

fn redirect(to: &str) -> Vec<u8> {
    response("302 Found", &format!("Location: {to}\r\nContent-Length: 0\r\n"), b"")
}

/// A tenant's guard that lets the test server at `base` (and only it) through.
fn exempting(base: &str) -> Guard {
    let server: SocketAddr = base.strip_prefix("http://").unwrap().parse().unwrap();
    Guard { exempt: vec![server], ..Guard::public_only().unwrap() }
}

/// `base` + `path` as a tenant's download would go, the test server exempted, in the
/// host's network namespace.
async fn get(base: &str, path: &str, work: &Path) -> Result<PathBuf, ArtifactError> {
    fetch_http(&format!("{base}{path}"), work, Limits { max_bytes: 10, max_entries: 10 }, exempting(base), false).await
}

/// The refusal in `e`, as (host, address, kind).
fn refusal(e: &ArtifactError) -> (String, IpAddr, String) {
    match e {
        ArtifactError::Refused { host, addr, kind, .. } => (host.clone(), *addr, kind.clone()),
        other => panic!("not refused: {other:?}"),
    }
}

fn is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().next().is_none()
}

#[tokio::test]
async fn downloads_land_in_the_work_directory() {
    let base = serve(routes).await;
    let work = tempfile::tempdir().unwrap();
    for path in ["/app.zip", "/moved", "/chunked-ok"] {
        let file = get(&base, path, work.path()).await.unwrap();
        assert!(file.starts_with(work.path()), "{path}: {}", file.display());
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 10, "{path}");
    }
    let file = get(&base, "/app.zip", work.path()).await.unwrap();
    assert_eq!(std::fs::read(file).unwrap(), b"0123456789");
}

#[tokio::test]
async fn failed_downloads_say_why_and_leave_nothing() {
    let base = serve(routes).await;
    let work = tempfile::tempdir().unwrap();
    let e = get(&base, "/missing", work.path()).await.unwrap_err();
    assert!(matches!(e, ArtifactError::Status { status: 404, .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("404") && msg.contains(&format!("{base}/missing")), "{msg}");
    let e = get(&base, "/error", work.path()).await.unwrap_err();
    assert!(matches!(e, ArtifactError::Status { status: 500, .. }), "{e}");
    for path in ["/declared-big", "/chunked-big", "/close-big"] {
        let e = get(&base, path, work.path()).await.unwrap_err();
        assert!(matches!(e, ArtifactError::DownloadTooLarge { limit: 10, .. }), "{path}: {e}");
        assert!(is_empty(work.path()), "{path}: partial download left behind");
    }
    let e = get(&base, "/truncated", work.path()).await.unwrap_err();
    assert!(matches!(e, ArtifactError::Fetch { .. }), "{e}");
    let e = get(&base, "/loop", work.path()).await.unwrap_err();
    assert!(matches!(e, ArtifactError::Fetch { ref what, .. } if what.contains("redirect")), "{e}");
    assert!(is_empty(work.path()), "partial download left behind");
}

#[tokio::test]
async fn unreachable_servers_and_bad_uris_are_errors() {
    // Bind then drop: nothing listens on that port any more.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let work = tempfile::tempdir().unwrap();
    let e = get(&format!("http://127.0.0.1:{port}"), "/a.zip", work.path()).await.unwrap_err();
    assert!(matches!(e, ArtifactError::Fetch { .. }), "{e}");
    let e = fetch("http://[::1", work.path(), Limits::default()).await.unwrap_err();
    assert!(matches!(e, ArtifactError::BadUri { .. }), "{e}");
    assert!(is_empty(work.path()));
}

#[tokio::test]
async fn tenants_cannot_fetch_from_the_host_or_private_networks() {
    let work = tempfile::tempdir().unwrap();
    let own = net::host_addresses().unwrap().into_iter().find(|a| non_public(*a).is_none());
    let mut cases = vec![
        ("http://127.0.0.1:8000/app.zip", "127.0.0.1", "a loopback address"),
        ("http://[::1]:8000/app.zip", "[::1]", "a loopback address"),
        ("http://10.1.2.3/app.zip", "10.1.2.3", "a private address"),
        ("http://192.168.1.1/app.zip", "192.168.1.1", "a private address"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254", "a link-local address"),
        ("http://100.64.0.1/app.zip", "100.64.0.1", "a shared (CGNAT) address"),
        ("http://0.0.0.0:8000/app.zip", "0.0.0.0", "a this-network address"),
        ("http://[::]:8000/app.zip", "[::]", "an unspecified address"),
        ("http://[fd00::1]/app.zip", "[fd00::1]", "a unique-local (private) address"),
        ("http://[fe80::1]/app.zip", "[fe80::1]", "a link-local address"),
        ("http://[ff02::1]/app.zip", "[ff02::1]", "a multicast address"),
        ("http://224.0.0.1/app.zip", "224.0.0.1", "a multicast address"),
        ("http://[::ffff:127.0.0.1]/app.zip", "[::ffff:7f00:1]", "a loopback address"),
        ("http://[64:ff9b::a9fe:a9fe]/app.zip", "[64:ff9b::a9fe:a9fe]", "a link-local address"),
        // Other spellings of loopback, normalized by the URL parser.
        ("http://2130706433/app.zip", "127.0.0.1", "a loopback address"),
        ("https://0x7f.1/app.zip", "127.0.0.1", "a loopback address"),
        // A name is checked as it resolves (here in /etc/hosts).
        ("http://localhost:8000/app.zip", "localhost", "a loopback address"),
    ];
    let own_url = own.map(|a| format!("http://{}/app.zip", SocketAddr::new(a, 8000)));
    if let (Some(a), Some(url)) = (own, own_url.as_deref()) {
        cases.push((url, "", "an address of this host"));
        assert!(non_public(a).is_none(), "{a}");
    }
    for (uri, host, kind) in cases {
        // The public entry point: in a network namespace of its own when root.
        let e = fetch(uri, work.path(), Limits::default()).await.unwrap_err();
        let (h, _, k) = refusal(&e);
        assert!(h == host || host.is_empty(), "{uri}: {e}");
        assert_eq!(k, kind, "{uri}: {e}");
        let msg = e.to_string();
        assert!(msg.contains("code artifacts are fetched from public addresses only") && msg.contains(&h), "{msg}");
    }
    // The message names the host and its address, without the URL's secrets.
    let e = fetch("http://user:pw@10.1.2.3/app.zip?sig=x", work.path(), Limits::default()).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "fetching http://10.1.2.3/app.zip?... refused: 10.1.2.3 resolves to 10.1.2.3, a private address; code artifacts are fetched from public addresses only"
    );
    assert!(is_empty(work.path()));
    // The operator's own tools may fetch from loopback (nothing listens on port 1).
    let e = fetch_with("http://127.0.0.1:1/app.zip", work.path(), Limits::default(), FetchPolicy::operator()).await.unwrap_err();
    assert!(matches!(e, ArtifactError::Fetch { .. }), "{e}");
}

#[tokio::test]
async fn redirects_to_the_host_or_private_networks_are_refused() {
    let base = serve(routes).await;
    let work = tempfile::tempdir().unwrap();
    // The exemption lets the test server through, so redirects are what is checked.
    get(&base, "/moved", work.path()).await.unwrap();
    let _ = std::fs::remove_dir_all(work.path()).and_then(|()| std::fs::create_dir(work.path()));
    for (path, host, kind) in [
        ("/to-metadata", "169.254.169.254", "a link-local address"),
        ("/to-other-port", "127.0.0.1", "a loopback address"),
        ("/to-v6-loopback", "[::1]", "a loopback address"),
        ("/to-private", "10.1.2.3", "a private address"),
        ("/to-moved-to-private", "10.1.2.3", "a private address"),
        ("/to-localhost", "localhost", "a loopback address"),
    ] {
        let e = get(&base, path, work.path()).await.unwrap_err();
        let (h, _, k) = refusal(&e);
        assert_eq!((h.as_str(), k.as_str()), (host, kind), "{path}: {e}");
        assert!(e.to_string().contains(&format!("{base}{path}")), "the message names the URL asked for: {e}");
        assert!(is_empty(work.path()), "{path}: partial download left behind");
    }
}

#[test]
fn addresses_are_public_or_say_what_they_are() {
    for public in ["93.184.216.34", "1.1.1.1", "100.128.0.1", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"] {
        assert_eq!(non_public(public.parse().unwrap()), None, "{public}");
    }
    for (addr, kind) in [
        ("172.31.255.255", "a private address"),
        ("255.255.255.255", "a reserved address"),
        ("::7f00:1", "a loopback address"),
        ("2002:a00:1::1", "a private address"),
        ("fec0::1", "a site-local address"),
        ("fc00::1", "a unique-local (private) address"),
    ] {
        assert_eq!(non_public(addr.parse().unwrap()).as_deref(), Some(kind), "{addr}");
    }
    let operator = Guard::default();
    assert_eq!(operator.refuses("127.0.0.1".parse().unwrap()), None);
}

/// The second layer, alone: with the first one exempting the host's addresses, a
/// download from the namespace still cannot reach the host; and the namespace is gone
/// afterwards (root only: skipped otherwise).
#[tokio::test]
async fn isolated_downloads_cannot_reach_the_host() {
    if !net::can_network() {
        eprintln!("skipped: needs root");
        return;
    }
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = tokio::io::AsyncReadExt::read(&mut conn, &mut buf).await;
                let _ = conn.write_all(&with_length(b"0123456789")).await;
            });
        }
    });
    let work = tempfile::tempdir().unwrap();
    let limits = Limits { max_bytes: 10, max_entries: 10 };
    let host_ip = net::host_addresses().unwrap().into_iter().find(|a| a.is_ipv4() && !a.is_loopback());
    let mut targets = vec![SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port)];
    targets.extend(host_ip.map(|a| SocketAddr::new(a, port)));
    for target in targets {
        let uri = format!("http://{target}/app.zip");
        let guard = || Guard { exempt: vec![target], ..Guard::public_only().unwrap() };
        // In the host's namespace the exempted server answers...
        let file = fetch_http(&uri, work.path(), limits, guard(), false).await.unwrap();
        std::fs::remove_file(file).unwrap();
        // ...from the download's own it is out of reach: its loopback is its own, the
        // host's addresses are dropped on the way in.
        let e = fetch_http(&uri, work.path(), limits, guard(), true).await.unwrap_err();
        assert!(
            matches!(e, ArtifactError::Fetch { ref what, .. } if what.contains("connect") || what.contains("no connection")),
            "{uri}: {e}"
        );
        assert!(is_empty(work.path()), "{uri}: partial download left behind");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let left = || {
        std::fs::read_dir("/run/netns")
            .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with("hearth-fetch-")))
            .unwrap_or(false)
    };
    while left() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(!left(), "a download's network namespace outlived it");
}

#[tokio::test]
async fn fetch_uses_local_paths_in_place_and_refuses_other_schemes() {
    let work = tempfile::tempdir().unwrap();
    assert_eq!(fetch("/tmp/a.zip", work.path(), Limits::default()).await.unwrap(), PathBuf::from("/tmp/a.zip"));
    assert_eq!(fetch("file:///tmp/a.zip", work.path(), Limits::default()).await.unwrap(), PathBuf::from("/tmp/a.zip"));
    for uri in ["s3://bucket/a.zip", "ftp://host/a.zip", "gs://b/a.zip"] {
        let e = fetch(uri, work.path(), Limits::default()).await.unwrap_err();
        assert!(matches!(e, ArtifactError::Scheme(_)), "{uri}: {e}");
        assert!(e.to_string().contains("https://"), "{e}");
    }
    assert!(is_empty(work.path()));
}

#[test]
fn secrets_stay_out_of_messages() {
    assert_eq!(redact("https://user:hunter2@host.invalid/a.zip?X-Sig=abc#f"), "https://host.invalid/a.zip?...");
    assert_eq!(redact("https://token@host.invalid/a.zip"), "https://host.invalid/a.zip");
    assert_eq!(redact("https://host.invalid/a.zip"), "https://host.invalid/a.zip");
    assert_eq!(redact("http://u:p@[::1/a@b?sig"), "http://[::1/a@b?...");
}

#[test]
fn locations() {
    assert_eq!(locate("file:///tmp/a.zip").unwrap(), PathBuf::from("/tmp/a.zip"));
    assert_eq!(locate("./a.zip").unwrap(), PathBuf::from("./a.zip"));
    assert!(matches!(locate("s3://bucket/a.zip"), Err(ArtifactError::Scheme(_))));
}
