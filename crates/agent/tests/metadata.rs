//! The metadata channel between the real agent (as a process, its listener on a loopback
//! port instead of 169.254.169.254:80) and the host's client: a guest connection reaches
//! the host through a pending accept, bytes flow both ways, an accept the host drops takes
//! no connection, and the SDK environment reaches execs unless the request sets it.

use hearth_proto::exec::ExecRequest;
use hearth_vmm::agent::AgentClient;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start() -> (tempfile::TempDir, Agent, AgentClient, u16) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_hearth-agent"))
        .arg("--listen")
        .arg(&sock)
        .env("HEARTH_AGENT_METADATA_LISTEN", format!("127.0.0.1:{port}"))
        .spawn()
        .unwrap();
    let agent = Agent(child);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (client, _) = AgentClient::connect_retrying(&sock, deadline).await.unwrap();
    (dir, agent, client, port)
}

async fn connect(port: u16) -> tokio::net::TcpStream {
    for _ in 0..200 {
        if let Ok(s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the agent's metadata listener never came up");
}

#[tokio::test]
async fn guest_connections_reach_the_host_through_pending_accepts() {
    let (_dir, _agent, client, port) = start().await;

    // An accept the host gives up on takes nothing from the queue.
    // (The guest connects right after: the dropped accept's stream may still be live in the
    // agent and take the connection, which must then come back to the queue.)
    let dropped = tokio::time::timeout(Duration::from_millis(300), client.accept_metadata()).await;
    assert!(dropped.is_err(), "no guest connection yet, so the accept is still pending");

    let pending = tokio::spawn({
        let client = client.clone();
        async move { client.accept_metadata().await }
    });
    let mut guest = connect(port).await;
    guest.write_all(b"GET /latest/meta-data/ HTTP/1.1\r\n\r\n").await.unwrap();
    let mut host = tokio::time::timeout(Duration::from_secs(30), pending).await.unwrap().unwrap().unwrap();
    let mut buf = vec![0u8; 64];
    let n = host.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"GET /latest/meta-data/ HTTP/1.1\r\n\r\n");
    host.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.unwrap();
    host.shutdown().await.unwrap();
    let mut answer = Vec::new();
    guest.read_to_end(&mut answer).await.unwrap();
    assert_eq!(answer, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");

    // A connection made while no accept is pending waits for the next one.
    let mut early = connect(port).await;
    early.write_all(b"early").await.unwrap();
    let mut host = tokio::time::timeout(Duration::from_secs(30), client.accept_metadata()).await.unwrap().unwrap();
    let n = host.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"early");
}

#[tokio::test]
async fn execs_find_the_sdk_environment_unless_they_set_it() {
    let (_dir, _agent, client, _port) = start().await;
    let mut req = ExecRequest::argv(["/bin/sh", "-c", "echo $AWS_REGION $AWS_ENDPOINT_URL_SECRETS_MANAGER $AWS_ENDPOINT_URL_STS"]);
    req.cwd = Some("/".into());
    let out = client.exec_collect(&req, None, 1 << 20).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hh-local-1 http://169.254.169.254 http://169.254.169.254");
    req.env.insert("AWS_REGION".into(), "eu-west-1".into());
    let out = client.exec_collect(&req, None, 1 << 20).await.unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("eu-west-1 "), "{:?}", out.stdout);
}
