//! The host against agents that misbehave: garbage, huge lengths, endless bodies, silence,
//! the wrong protocol version. Each must end in a clean error with bounded memory.

use bytes::Bytes;
use hearth_proto::exec::ExecRequest;
use hearth_vmm::agent::{AgentClient, AgentError};
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use std::convert::Infallible;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;

type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|n| match n {}).boxed()
}

fn hello_json(protocol: u32) -> Body {
    full(format!(r#"{{"protocol":{protocol},"agent_version":"fake","kernel":"fake","uptime_ms":1}}"#))
}

/// An HTTP/2 "agent" whose answers come from `respond`.
async fn fake_h2<F>(respond: F) -> (tempfile::TempDir, std::path::PathBuf)
where
    F: Fn(Request<hyper::body::Incoming>) -> Response<Body> + Send + Sync + Clone + 'static,
{
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let respond = respond.clone();
            tokio::spawn(async move {
                answer_sync(&mut stream).await;
                let svc = hyper::service::service_fn(move |req| {
                    let r = respond(req);
                    async move { Ok::<_, Infallible>(r) }
                });
                let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (dir, path)
}

/// Plays the agent's side of the resync handshake: answers the first probe.
async fn answer_sync(stream: &mut tokio::net::UnixStream) {
    use tokio::io::AsyncReadExt;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while stream.read(&mut b).await.unwrap_or(0) == 1 {
        line.push(b[0]);
        if b[0] == b'\n' {
            if let Some(nonce) = hearth_proto::sync::parse_probe(&line) {
                stream.write_all(&hearth_proto::sync::ready(nonce)).await.unwrap();
                return;
            }
            line.clear();
        }
    }
}

/// A raw socket "agent" that answers the resync probe (unless `bytes` is empty: then it
/// stays silent), writes `bytes`, and keeps the connection open.
async fn fake_raw(bytes: Vec<u8>) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let bytes = bytes.clone();
            tokio::spawn(async move {
                if !bytes.is_empty() {
                    answer_sync(&mut stream).await;
                }
                let _ = stream.write_all(&bytes).await;
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    (dir, path)
}

#[tokio::test]
async fn garbage_is_a_protocol_error_not_a_hang() {
    let junk: Vec<u8> = (0..(256u32 << 10)).map(|i| (i * 7919 % 251) as u8).collect();
    let (_d, p) = fake_raw(junk).await;
    // h2 skips frames of unknown type, so junk may also just never complete a handshake:
    // then the handshake's timeout ends it. Either way: an error, never a hang.
    let r = AgentClient::connect(&p, Duration::from_secs(3)).await;
    match r {
        Err(AgentError::Connection(_)) | Err(AgentError::Protocol(_)) | Err(AgentError::Timeout(_)) => {}
        Err(e) => panic!("expected a connection/protocol error, got {e}"),
        Ok(_) => panic!("garbage accepted as an agent"),
    }
}

#[tokio::test]
async fn an_http2_frame_claiming_16_mib_is_refused() {
    // A SETTINGS-less frame header claiming the largest HTTP/2 length, after the server
    // preface would be expected.
    let (_d, p) = fake_raw(vec![0xff, 0xff, 0xff, 0x00, 0x00, 0, 0, 0, 0]).await;
    let r = AgentClient::connect(&p, Duration::from_secs(10)).await;
    assert!(matches!(r, Err(AgentError::Connection(_)) | Err(AgentError::Protocol(_))), "{:?}", r.err());
}

#[tokio::test]
async fn silent_agent_times_out() {
    let (_d, p) = fake_raw(Vec::new()).await;
    let r = AgentClient::connect(&p, Duration::from_millis(500)).await;
    assert!(matches!(r, Err(AgentError::Timeout(_))), "{:?}", r.err());
}

#[tokio::test]
async fn wrong_protocol_version_is_refused() {
    let (_d, p) = fake_h2(|_| Response::new(hello_json(99))).await;
    let r = AgentClient::connect(&p, Duration::from_secs(5)).await;
    assert!(matches!(r, Err(AgentError::Version { agent: 99 })), "{:?}", r.err());
}

#[tokio::test]
async fn endless_json_body_is_cut_off() {
    let (_d, p) = fake_h2(|_| {
        // An infinite body of spaces: valid JSON whitespace, never a complete document.
        let chunk = Bytes::from(vec![b' '; 64 << 10]);
        let s = futures_util::stream::repeat_with(move || Ok::<_, std::io::Error>(hyper::body::Frame::data(chunk.clone())));
        Response::new(StreamBody::new(s).boxed())
    })
    .await;
    let r = AgentClient::connect(&p, Duration::from_secs(20)).await;
    match r {
        Err(AgentError::Protocol(m)) => assert!(m.contains("length limit") || m.contains("reading"), "{m}"),
        other => panic!("expected a protocol error, got {:?}", other.err()),
    }
}

#[tokio::test]
async fn exec_frame_of_4_gib_is_refused_before_buffering() {
    let (_d, p) = fake_h2(|req| {
        if req.uri().path() == "/v1/hello" {
            return Response::new(hello_json(hearth_proto::PROTOCOL_VERSION));
        }
        // A stdout frame header declaring 4 GiB - 1 bytes, then a trickle.
        Response::new(full(vec![3u8, 0xff, 0xff, 0xff, 0xff, b'x', b'y']))
    })
    .await;
    let (client, _) = AgentClient::connect(&p, Duration::from_secs(5)).await.unwrap();
    let stream = client.exec(&ExecRequest::argv(["true"])).await.unwrap();
    let r = stream.collect(1 << 20).await;
    match r {
        Err(AgentError::Protocol(m)) => assert!(m.contains("limit"), "{m}"),
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

#[tokio::test]
async fn exec_output_beyond_the_callers_limit_is_refused() {
    let (_d, p) = fake_h2(|req| {
        if req.uri().path() == "/v1/hello" {
            return Response::new(hello_json(hearth_proto::PROTOCOL_VERSION));
        }
        let frame = hearth_proto::exec::Frame::new(hearth_proto::exec::FrameKind::Stdout, vec![b'a'; 1 << 20]).encode();
        let s = futures_util::stream::repeat_with(move || Ok::<_, std::io::Error>(hyper::body::Frame::data(frame.clone())));
        Response::new(StreamBody::new(s).boxed())
    })
    .await;
    let (client, _) = AgentClient::connect(&p, Duration::from_secs(5)).await.unwrap();
    let r = client.exec_collect(&ExecRequest::argv(["yes"]), None, 8 << 20).await;
    assert!(matches!(r, Err(AgentError::OutputTooLarge(_))), "{r:?}");
}

#[tokio::test]
async fn exec_stream_ending_without_exit_is_an_error() {
    let (_d, p) = fake_h2(|req| {
        if req.uri().path() == "/v1/hello" {
            return Response::new(hello_json(hearth_proto::PROTOCOL_VERSION));
        }
        Response::new(full(hearth_proto::exec::Frame::new(hearth_proto::exec::FrameKind::Stdout, "hi").encode()))
    })
    .await;
    let (client, _) = AgentClient::connect(&p, Duration::from_secs(5)).await.unwrap();
    let r = client.exec_collect(&ExecRequest::argv(["true"]), None, 1 << 20).await;
    assert!(matches!(r, Err(AgentError::Connection(_))), "{r:?}");
}
