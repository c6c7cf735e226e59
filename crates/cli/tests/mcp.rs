//! `hearth mcp` end to end: the official MCP Python SDK (`mcp`, installed into
//! `target/pyenv` by `scripts/test.sh`) drives it over stdio and over Streamable HTTP
//! (`tests/api/test_mcp.py`) against a real daemon and real microvms, and the daemon's own
//! MCP server at `/mcp` (tokens from the mcp-tokens extension, two tenants); then the agent
//! example (`examples/agent/`) replays its transcript through it, checking every tool result.

mod daemon;

use daemon::*;
use std::path::Path;

#[test]
fn mcp_tools_over_stdio_and_http_and_the_agent_example() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let a = key(&state);
    let _microvms = Microvms(state.clone());
    let daemon = Daemon::start(&state);
    let env = [("HEARTH_BIN", env!("CARGO_BIN_EXE_hearth").to_owned())];
    // stdio builds the default image (hearth-mcp-python) on its first tool call; http reuses it.
    let out = run_script("test_mcp.py", &daemon.1, (&a, &a), tmp.path(), &state, &["stdio"], &env);
    assert!(out.contains("\"stdio\": \"ok\""), "{out}");
    eprintln!("{out}");
    let out = run_script("test_mcp.py", &daemon.1, (&a, &a), tmp.path(), &state, &["http"], &env);
    assert!(out.contains("\"http\": \"ok\""), "{out}");
    // The daemon's /mcp: tenant A's token, then tenant B's (a second account).
    let b = key(&state);
    let out = run_script("test_mcp.py", &daemon.1, (&a, &b), tmp.path(), &state, &["daemon"], &env);
    assert!(out.contains("\"daemon\": \"ok\""), "{out}");
    // `hearth mcp token` prints the URL, the token and a client configuration.
    let o = client(&daemon, &a).args(["mcp", "token", "--minutes", "5", "--json"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(t["url"], format!("{}/mcp", daemon.1));
    let bearer = format!("Bearer {}", t["token"].as_str().unwrap());
    assert_eq!(t["config"]["mcpServers"]["hearth"]["headers"]["Authorization"], bearer.as_str(), "{t}");
    let o = client(&daemon, &a).args(["mcp", "token", "--minutes", "0"]).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("1 to 1440"));

    // The agent loop, replayed: it must pass, and a transcript whose expectations do not
    // hold must fail (the replay checks every tool result).
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/agent");
    let agent = |transcript: &Path| {
        let key: serde_json::Value = serde_json::from_str(&a).unwrap();
        std::process::Command::new(python())
            .arg(example.join("agent.py"))
            .arg("--transcript")
            .arg(transcript)
            .env("HEARTH_MCP_COMMAND", env!("CARGO_BIN_EXE_hearth"))
            .env("HEARTH_ENDPOINT", &daemon.1)
            .env("AWS_ACCESS_KEY_ID", key["accessKeyId"].as_str().unwrap())
            .env("AWS_SECRET_ACCESS_KEY", key["secretAccessKey"].as_str().unwrap())
            .output()
            .unwrap()
    };
    let o = agent(&example.join("transcript.json"));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("all tool results matched"), "{stdout}");
    // The same transcript with the fix left out: the second test run fails, and so does the replay.
    let mut t: serde_json::Value = serde_json::from_slice(&std::fs::read(example.join("transcript.json")).unwrap()).unwrap();
    let turns = t["turns"].as_array_mut().unwrap();
    turns.retain(|turn| turn["tool_call"]["name"] != "edit_file");
    let broken = tmp.path().join("broken.json");
    std::fs::write(&broken, t.to_string()).unwrap();
    let o = agent(&broken);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(!o.status.success() && stdout.contains("MISMATCH"), "{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    drop(daemon);
}

/// A POST of a JSON-RPC `initialize` to `url` (`http://host:port/path`) with `bearer`:
/// the status line and the body.
fn post_mcp(url: &str, bearer: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap();
    let (authority, path) = rest.split_at(rest.find('/').unwrap());
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"test","version":"1"}}}"#;
    let mut s = std::net::TcpStream::connect(authority).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\nAuthorization: Bearer {bearer}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out)
}

#[test]
fn the_daemons_mcp_sessions_are_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let (a, b) = (key(&state), key(&state));
    let daemon = Daemon::start_args(&state, &["--mcp-max-sessions", "1"]);
    let token = |k: &str| {
        let o = client(&daemon, k).args(["mcp", "token", "--json"]).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        (v["url"].as_str().unwrap().to_owned(), v["token"].as_str().unwrap().to_owned())
    };
    let (url, ta) = token(&a);
    let (_, tb) = token(&b);
    // A's session takes the one place; B's is refused while A's is in use, clearly.
    let (status, out) = post_mcp(&url, &ta);
    assert_eq!(status, 200, "{out}");
    assert!(out.contains("\"name\":\"hearth\""), "{out}");
    let (status, out) = post_mcp(&url, &tb);
    assert_eq!(status, 503, "{out}");
    assert!(out.contains("sessions in use") && out.to_ascii_lowercase().contains("retry-after"), "{out}");
    assert_eq!(post_mcp(&url, &ta).0, 200);
    drop(daemon);
    // --no-mcp: no MCP server, and the path says so.
    let daemon = Daemon::start_args(&state, &["--no-mcp"]);
    let (status, out) = post_mcp(&format!("{}/mcp", daemon.1), &ta);
    assert_eq!(status, 404, "{out}");
    assert!(out.contains("no MCP server here"), "{out}");
}
