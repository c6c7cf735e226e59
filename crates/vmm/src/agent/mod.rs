//! The host's client of the in-guest agent (see `hearth_proto` for the protocol).
//!
//! The guest is hostile, so everything read from it is bounded: HTTP/2 settings cap frame
//! and header sizes and flow-control windows (the most the agent can make us buffer), JSON
//! bodies are read through a length limit, exec frames are length-checked before their
//! payload is buffered, and collected output has a caller-chosen ceiling.

use bytes::Bytes;
use futures_util::Stream;
use hearth_proto::binpath::BinPath;
use hearth_proto::exec::{ExecExit, ExecRequest, Frame, FrameDecoder, FrameKind};
use hearth_proto::files::{FileInfo, FsRequest, FsResponse};
use hearth_proto::{ErrorBody, Hello, MAX_JSON_BODY, PROTOCOL_HEADER, PROTOCOL_VERSION};
use http::{Method, Request, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, Limited, StreamBody};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tracing::Instrument;

mod exec;
mod transfer;
pub use exec::{ExecEvent, ExecInput, ExecOutput, ExecStream};

type ReqBody = BoxBody<Bytes, std::io::Error>;

/// The chunks of a guest file as [`AgentClient::read_file`] streams them.
pub type FileChunks = std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, AgentError>> + Send + Sync + 'static>>;

/// Default ceiling on output collected by [`AgentClient::exec_collect`].
pub const DEFAULT_MAX_OUTPUT: usize = 64 << 20;

/// A failure talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Could not reach the agent socket.
    #[error("cannot connect to the agent")]
    Connect(#[source] std::io::Error),
    /// The HTTP/2 connection failed or closed.
    #[error("agent connection failed: {0}")]
    Connection(String),
    /// The agent speaks another protocol version.
    #[error("agent speaks protocol {agent}, this host speaks {PROTOCOL_VERSION}; rebuild the initramfs with `hearth setup`")]
    Version {
        /// The agent's version.
        agent: u32,
    },
    /// The agent sent something that breaks the protocol or its limits.
    #[error("agent protocol violation: {0}")]
    Protocol(String),
    /// The agent reported an error.
    #[error("agent: {0}")]
    Remote(ErrorBody),
    /// Output exceeded the caller's limit.
    #[error("exec output exceeded {0} bytes")]
    OutputTooLarge(usize),
    /// No answer in time.
    #[error("agent did not answer within {0:?}")]
    Timeout(Duration),
}

impl AgentError {
    /// True when the error means the connection (or the guest) is gone.
    pub fn is_disconnect(&self) -> bool {
        matches!(self, AgentError::Connection(_) | AgentError::Connect(_))
    }
}

fn conn_err(e: hyper::Error) -> AgentError {
    AgentError::Connection(e.to_string())
}

fn empty() -> ReqBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn full(b: impl Into<Bytes>) -> ReqBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// A connected agent.
#[derive(Clone)]
pub struct AgentClient {
    sender: SendRequest<ReqBody>,
    conn: std::sync::Arc<ConnTask>,
}

/// Aborts the connection task (closing the socket) when the last client clone goes.
struct ConnTask {
    abort: tokio::task::AbortHandle,
    done: tokio::sync::watch::Receiver<bool>,
    /// A duplicate of the socket that keeps it open after the HTTP/2 connection ends, so a
    /// new HTTP/2 connection can start on it (see [`AgentClient::reattach`]) without the
    /// guest ever seeing the host disconnect.
    anchor: Option<std::os::unix::net::UnixStream>,
}

impl Drop for ConnTask {
    fn drop(&mut self) {
        self.abort.abort();
    }
}

impl AgentClient {
    /// Connects to an agent socket and performs the handshake within `timeout`.
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<(AgentClient, Hello), AgentError> {
        let stream = std::os::unix::net::UnixStream::connect(socket).map_err(AgentError::Connect)?;
        Self::connect_stream(stream, timeout).await
    }

    /// Performs the handshake over an already connected socket, keeping a duplicate of it
    /// so the socket outlives this HTTP/2 connection.
    pub async fn connect_stream(stream: std::os::unix::net::UnixStream, timeout: Duration) -> Result<(AgentClient, Hello), AgentError> {
        let anchor = stream.try_clone().map_err(AgentError::Connect)?;
        stream.set_nonblocking(true).map_err(AgentError::Connect)?;
        let io = tokio::net::UnixStream::from_std(stream).map_err(AgentError::Connect)?;
        let (mut client, hello) = Self::handshake(io, timeout).await?;
        if let Some(conn) = std::sync::Arc::get_mut(&mut client.conn) {
            conn.anchor = Some(anchor);
        }
        Ok((client, hello))
    }

    /// Starts a fresh HTTP/2 connection on the same socket (after [`AgentClient::detach`]).
    /// The guest never sees a disconnect, so nothing stale can reach the new connection.
    pub async fn reattach(&self, timeout: Duration) -> Result<(AgentClient, Hello), AgentError> {
        let anchor = self.conn.anchor.as_ref().ok_or_else(|| AgentError::Connection("no socket to reattach to".into()))?;
        let stream = anchor.try_clone().map_err(AgentError::Connect)?;
        Self::connect_stream(stream, timeout).await
    }

    /// Performs the HTTP/2 and protocol handshake over any byte stream.
    pub async fn handshake<IO>(mut io: IO, timeout: Duration) -> Result<(AgentClient, Hello), AgentError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let fut = async {
            resync(&mut io).await?;
            let (sender, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .max_frame_size(1 << 20)
                .max_header_list_size(64 << 10)
                .initial_stream_window_size(4 << 20)
                .initial_connection_window_size(16 << 20)
                .max_concurrent_reset_streams(64)
                .max_send_buf_size(1 << 20)
                .handshake(hyper_util::rt::TokioIo::new(io))
                .await
                .map_err(conn_err)?;
            let (done_tx, done) = tokio::sync::watch::channel(false);
            // In the caller's span (a VM's), so the connection's lines name the VM.
            let task = tokio::spawn(
                async move {
                    if let Err(e) = conn.await {
                        tracing::debug!("agent connection ended: {e}");
                    }
                    let _ = done_tx.send(true);
                }
                .instrument(tracing::Span::current()),
            );
            let conn = ConnTask { abort: task.abort_handle(), done, anchor: None };
            let client = AgentClient { sender, conn: std::sync::Arc::new(conn) };
            let hello = client.hello().await?;
            Ok((client, hello))
        };
        tokio::time::timeout(timeout, fut).await.map_err(|_| AgentError::Timeout(timeout))?
    }

    /// Closes the connection now, for every clone of this client.
    pub fn close(&self) {
        self.conn.abort.abort();
        if let Some(a) = &self.conn.anchor {
            let _ = a.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Ends the HTTP/2 connection cleanly: the agent acknowledges, shuts it down (GOAWAY)
    /// and goes back to waiting for a connection preface, so whatever the host sends next
    /// starts a fresh connection. The socket itself stays open (see [`Self::reattach`]);
    /// [`Self::close`] closes it. Call this before snapshots and before replacing a
    /// connection.
    pub async fn detach(&self, timeout: Duration) -> Result<(), AgentError> {
        let fut = async {
            let req = Request::post("/v1/detach").body(empty()).expect("static request");
            let _: serde_json::Value = Self::json_response(self.send(req).await?).await?;
            let mut done = self.conn.done.clone();
            let _ = done.wait_for(|d| *d).await;
            Ok(())
        };
        let r = tokio::time::timeout(timeout, fut).await.map_err(|_| AgentError::Timeout(timeout));
        self.conn.abort.abort();
        r?
    }

    /// Connects, retrying until `deadline` when the socket cannot be reached or the
    /// connection breaks (a slow guest is simply waited for: the resync handshake copes
    /// with whatever is still in the pipe).
    pub async fn connect_retrying(socket: &Path, deadline: tokio::time::Instant) -> Result<(AgentClient, Hello), AgentError> {
        let started = tokio::time::Instant::now();
        let mut last = None;
        loop {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(last.unwrap_or(AgentError::Timeout(now - started)));
            }
            match Self::connect(socket, deadline - now).await {
                Ok(ok) => return Ok(ok),
                Err(e @ AgentError::Timeout(_)) => return Err(e),
                Err(e @ (AgentError::Version { .. } | AgentError::Protocol(_) | AgentError::Remote(_))) => return Err(e),
                Err(e) => {
                    tracing::debug!("agent connect attempt failed: {e}");
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// True while the HTTP/2 connection is usable.
    pub fn is_connected(&self) -> bool {
        !self.sender.is_closed()
    }

    async fn send(&self, req: Request<ReqBody>) -> Result<http::Response<Incoming>, AgentError> {
        let mut sender = self.sender.clone();
        sender.ready().await.map_err(conn_err)?;
        sender.send_request(req).await.map_err(conn_err)
    }

    async fn json_response<T: serde::de::DeserializeOwned>(resp: http::Response<Incoming>) -> Result<T, AgentError> {
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_JSON_BODY)
            .collect()
            .await
            .map_err(|e| AgentError::Protocol(format!("reading response: {e}")))?
            .to_bytes();
        if !status.is_success() {
            return Err(Self::remote_error(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| AgentError::Protocol(format!("invalid JSON from agent: {e}")))
    }

    /// Passes a successful response through; turns a failed one into its error (reading
    /// at most [`MAX_JSON_BODY`] of the body).
    async fn check_status(resp: http::Response<Incoming>) -> Result<http::Response<Incoming>, AgentError> {
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_JSON_BODY).collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        Err(Self::remote_error(status, &bytes))
    }

    fn remote_error(status: StatusCode, bytes: &[u8]) -> AgentError {
        match serde_json::from_slice::<ErrorBody>(bytes) {
            Ok(b) if b.code == hearth_proto::ErrorCode::VersionMismatch => AgentError::Version { agent: 0 },
            Ok(b) => AgentError::Remote(b),
            Err(_) => AgentError::Protocol(format!("agent answered {status} with an unreadable body")),
        }
    }

    /// The handshake: checks the agent's protocol version.
    pub async fn hello(&self) -> Result<Hello, AgentError> {
        let req = Request::get("/v1/hello").header(PROTOCOL_HEADER, PROTOCOL_VERSION.to_string()).body(empty()).expect("static request");
        let hello: Hello = Self::json_response(self.send(req).await?).await?;
        if hello.protocol != PROTOCOL_VERSION {
            return Err(AgentError::Version { agent: hello.protocol });
        }
        Ok(hello)
    }

    /// Starts an exec; stream its events with [`ExecStream::next_event`].
    pub async fn exec(&self, spec: &ExecRequest) -> Result<ExecStream, AgentError> {
        let (tx, rx) = mpsc::channel::<Bytes>(8);
        let first = Frame::json(FrameKind::Spec, spec).encode();
        let stream = futures_util::stream::once(async move { Ok(hyper::body::Frame::data(first)) });
        let body = StreamBody::new(chain_spec_and_stdin(stream, rx)).boxed();
        let req = Request::builder().method(Method::POST).uri("/v1/exec").body(body).expect("static request");
        let resp = self.send(req).await?;
        let resp = Self::check_status(resp).await?;
        Ok(ExecStream { stdin: Some(tx), body: resp.into_body(), decoder: FrameDecoder::new(), done: false })
    }

    /// Runs an exec to completion with the given stdin, collecting at most `max_output` bytes.
    pub async fn exec_collect(&self, spec: &ExecRequest, stdin: Option<Bytes>, max_output: usize) -> Result<ExecOutput, AgentError> {
        let mut s = if stdin.is_none() && spec.stdin {
            self.exec(&ExecRequest { stdin: false, ..spec.clone() }).await?
        } else {
            self.exec(spec).await?
        };
        if let Some(data) = stdin {
            s.write_stdin(data).await?;
        }
        s.close_stdin();
        s.collect(max_output).await
    }

    /// Streams (a range of) a guest file. The stream owns its HTTP/2 stream (it outlives
    /// `self` and `path`); what it holds unread is bounded by the stream's flow-control
    /// window (4 MiB): the agent sends no more until chunks are taken.
    ///
    /// # Errors
    ///
    /// The agent's refusal (a missing file: [`hearth_proto::ErrorCode::NotFound`]) before
    /// the first chunk; a broken connection as an item of the stream.
    pub async fn read_file(&self, path: &BinPath, offset: u64, length: Option<u64>) -> Result<FileChunks, AgentError> {
        let mut uri = format!("/v1/files?path={}&offset={offset}", path.to_query());
        if let Some(l) = length {
            uri.push_str(&format!("&length={l}"));
        }
        let req = Request::get(uri).body(empty()).map_err(|e| AgentError::Protocol(e.to_string()))?;
        let resp = self.send(req).await?;
        let resp = Self::check_status(resp).await?;
        let body = resp.into_body();
        Ok(Box::pin(futures_util::stream::unfold(body, |mut body| async move {
            loop {
                match body.frame().await {
                    Some(Ok(f)) => match f.into_data() {
                        Ok(d) => return Some((Ok(d), body)),
                        Err(_) => continue,
                    },
                    Some(Err(e)) => return Some((Err(conn_err(e)), body)),
                    None => return None,
                }
            }
        })))
    }

    /// Reads a whole guest file, refusing one larger than `max` bytes.
    pub async fn read_file_bytes(&self, path: &BinPath, max: usize) -> Result<Vec<u8>, AgentError> {
        use futures_util::StreamExt;
        let stream = self.read_file(path, 0, None).await?;
        futures_util::pin_mut!(stream);
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            if out.len() + chunk.len() > max {
                return Err(AgentError::OutputTooLarge(max));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// Writes a guest file from a stream of chunks, atomically; parents are created.
    pub async fn write_file<S>(&self, path: &BinPath, mode: Option<u32>, data: S) -> Result<FileInfo, AgentError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send + Sync + 'static,
    {
        self.write_file_sized(path, mode, None, data).await
    }

    /// `PUT uri` with `data` as the streamed body; the agent's JSON answer.
    pub(crate) async fn put_stream<S, T>(&self, uri: String, data: S) -> Result<T, AgentError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send + Sync + 'static,
        T: serde::de::DeserializeOwned,
    {
        use futures_util::StreamExt;
        let body = BodyExt::boxed(StreamBody::new(data.map(|r| r.map(hyper::body::Frame::data))));
        let req = Request::put(uri).body(body).map_err(|e| AgentError::Protocol(e.to_string()))?;
        Self::json_response(self.send(req).await?).await
    }

    /// Writes a guest file from bytes in memory.
    pub async fn write_file_bytes(&self, path: &BinPath, mode: Option<u32>, data: Bytes) -> Result<FileInfo, AgentError> {
        const CHUNK: usize = 1 << 20;
        let chunks: Vec<Result<Bytes, std::io::Error>> =
            (0..data.len()).step_by(CHUNK).map(|i| Ok(data.slice(i..(i + CHUNK).min(data.len())))).collect();
        self.write_file(path, mode, futures_util::stream::iter(chunks)).await
    }

    /// Runs one filesystem operation.
    pub async fn fs(&self, op: &FsRequest) -> Result<FsResponse, AgentError> {
        let body = serde_json::to_vec(op).map_err(|e| AgentError::Protocol(e.to_string()))?;
        let req = Request::post(format!("/v1/fs/{}", op.op_name())).body(full(body)).expect("static request");
        Self::json_response(self.send(req).await?).await
    }

    /// Stat of a path.
    pub async fn stat(&self, path: &BinPath) -> Result<FileInfo, AgentError> {
        match self.fs(&FsRequest::Stat { path: path.clone() }).await? {
            FsResponse::Info(i) => Ok(i),
            other => Err(AgentError::Protocol(format!("stat answered {other:?}"))),
        }
    }

    /// Entries of a directory.
    pub async fn list(&self, path: &BinPath) -> Result<Vec<FileInfo>, AgentError> {
        match self.fs(&FsRequest::List { path: path.clone() }).await? {
            FsResponse::Entries(e) => Ok(e),
            other => Err(AgentError::Protocol(format!("list answered {other:?}"))),
        }
    }

    /// Applies the after-restore fix-ups (clock, entropy, identity).
    pub async fn restore(&self, info: &hearth_proto::RestoreInfo) -> Result<(), AgentError> {
        let body = serde_json::to_vec(info).map_err(|e| AgentError::Protocol(e.to_string()))?;
        let req = Request::post("/v1/restore").body(full(body)).expect("static request");
        let _: serde_json::Value = Self::json_response(self.send(req).await?).await?;
        Ok(())
    }

    /// An HTTP GET to `127.0.0.1:port` inside the guest (the app's hooks), bounded by
    /// `timeout` inside the guest.
    pub async fn hook(&self, port: u16, path: &str, timeout: Duration) -> Result<hearth_proto::HookResponse, AgentError> {
        let uri = format!("/v1/hook?port={port}&path={path}&timeout_ms={}", timeout.as_millis());
        let req = Request::get(uri).body(empty()).map_err(|e| AgentError::Protocol(e.to_string()))?;
        Self::json_response(self.send(req).await?).await
    }

    /// Opens a TCP connection to `port` on the guest's loopback through the agent channel
    /// (one HTTP/2 stream each way); the returned stream is the host's end.
    pub async fn connect_port(&self, port: u16) -> Result<tokio::io::DuplexStream, AgentError> {
        self.duplex(&format!("/v1/connect?port={port}"), false).await
    }

    /// Waits for the next connection a guest process makes to the metadata address
    /// (`169.254.169.254:80`, the agent's `POST /v1/metadata/accept`) and returns the host's
    /// end of it: what is read is what the guest sent, what is written reaches it. Cancel
    /// safe: dropped while waiting, it resets its HTTP/2 stream and takes no connection.
    ///
    /// # Errors
    ///
    /// [`AgentError::Remote`] (NotFound) from an agent without a metadata listener; a
    /// broken connection.
    pub async fn accept_metadata(&self) -> Result<tokio::io::DuplexStream, AgentError> {
        self.duplex("/v1/metadata/accept", true).await
    }

    /// One HTTP/2 stream as a byte stream: the request body carries what is written to the
    /// returned end, the response body what is read from it. With `confirm`, the response
    /// opens with [`hearth_proto::METADATA_MARK`], which is answered before anything else
    /// (with no await in between, so a caller that is cancelled never confirms).
    async fn duplex(&self, uri: &str, confirm: bool) -> Result<tokio::io::DuplexStream, AgentError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (tx, rx) = mpsc::channel::<Bytes>(8);
        let body = StreamBody::new(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|b| (Ok(hyper::body::Frame::data(b)), rx))
        }))
        .boxed();
        let req = Request::post(uri).body(body).map_err(|e| AgentError::Protocol(e.to_string()))?;
        let resp = Self::check_status(self.send(req).await?).await?;
        let mut body = resp.into_body();
        let mut rest = Bytes::new();
        if confirm {
            let first = loop {
                match body.frame().await {
                    Some(Ok(f)) => match f.into_data() {
                        Ok(d) if !d.is_empty() => break d,
                        _ => continue,
                    },
                    Some(Err(e)) => return Err(conn_err(e)),
                    None => return Err(AgentError::Protocol("the accept ended before its mark".into())),
                }
            };
            if first[0] != hearth_proto::METADATA_MARK {
                return Err(AgentError::Protocol("the accept did not open with its mark".into()));
            }
            rest = first.slice(1..);
            tx.try_send(Bytes::from_static(&[hearth_proto::METADATA_MARK]))
                .map_err(|_| AgentError::Connection("the accept's stream ended".into()))?;
        }
        let (ours, theirs) = tokio::io::duplex(256 << 10);
        let (mut r, mut w) = tokio::io::split(theirs);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match r.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
        tokio::spawn(async move {
            if !rest.is_empty() && w.write_all(&rest).await.is_err() {
                return;
            }
            while let Some(Ok(f)) = body.frame().await {
                if let Ok(d) = f.into_data() {
                    if w.write_all(&d).await.is_err() {
                        break;
                    }
                }
            }
            let _ = w.shutdown().await;
        });
        Ok(ours)
    }

    /// POSTs `body` to `path` on the guest's loopback `port` (a lifecycle hook).
    pub async fn hook_post(&self, port: u16, path: &str, body: Bytes, timeout: Duration) -> Result<hearth_proto::HookResponse, AgentError> {
        if body.len() > hearth_proto::MAX_HOOK_REQUEST {
            return Err(AgentError::Protocol(format!("hook body over {} bytes", hearth_proto::MAX_HOOK_REQUEST)));
        }
        let uri = format!("/v1/hook?port={port}&path={path}&timeout_ms={}", timeout.as_millis());
        let req = Request::post(uri).body(full(body)).map_err(|e| AgentError::Protocol(e.to_string()))?;
        Self::json_response(self.send(req).await?).await
    }

    /// Flushes the guest's filesystems.
    pub async fn sync(&self) -> Result<(), AgentError> {
        let req = Request::post("/v1/sync").body(empty()).expect("static request");
        let _: serde_json::Value = Self::json_response(self.send(req).await?).await?;
        Ok(())
    }

    /// Asks the guest to power off (the agent answers first).
    pub async fn shutdown(&self) -> Result<(), AgentError> {
        let req = Request::post("/v1/shutdown").body(empty()).expect("static request");
        let _: serde_json::Value = Self::json_response(self.send(req).await?).await?;
        Ok(())
    }
}

/// Most stale bytes skipped while resynchronising before giving up.
const MAX_RESYNC_SKIP: usize = 16 << 20;

/// The resync handshake (`hearth_proto::sync`): probe with a fresh nonce, skip everything
/// until the answer to the latest probe, re-probe at growing intervals. Reads one byte at
/// a time so nothing after the answer is consumed.
async fn resync<IO: AsyncRead + AsyncWrite + Unpin>(io: &mut IO) -> Result<(), AgentError> {
    use hearth_proto::sync;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut interval = Duration::from_millis(100);
    let mut skipped = 0usize;
    let mut window: Vec<u8> = Vec::with_capacity(sync::READY_LEN + 1);
    loop {
        let nonce = random_u64();
        let want = sync::ready(nonce);
        io.write_all(&sync::probe(nonce)).await.map_err(|e| AgentError::Connection(e.to_string()))?;
        let until = tokio::time::Instant::now() + interval;
        let mut byte = [0u8; 1];
        loop {
            match tokio::time::timeout_at(until, io.read(&mut byte)).await {
                Err(_) => break,
                Ok(Ok(0)) => return Err(AgentError::Connection("the agent channel closed".into())),
                Ok(Ok(_)) => {
                    if window.len() == sync::READY_LEN {
                        window.remove(0);
                    }
                    window.push(byte[0]);
                    if window == want {
                        return Ok(());
                    }
                    skipped += 1;
                    if skipped > MAX_RESYNC_SKIP {
                        return Err(AgentError::Protocol(format!("no sync answer within {MAX_RESYNC_SKIP} bytes")));
                    }
                }
                Ok(Err(e)) => return Err(AgentError::Connection(e.to_string())),
            }
        }
        interval = (interval * 2).min(Duration::from_secs(1));
    }
}

fn random_u64() -> u64 {
    u64::from_ne_bytes(crate::identity::os_random())
}

/// The exec request body: the spec frame, then stdin frames until the sender is dropped.
fn chain_spec_and_stdin<S>(
    spec: S,
    rx: mpsc::Receiver<Bytes>,
) -> impl Stream<Item = Result<hyper::body::Frame<Bytes>, std::io::Error>> + Send + Sync + 'static
where
    S: Stream<Item = Result<hyper::body::Frame<Bytes>, std::io::Error>> + Send + Sync + 'static,
{
    use futures_util::StreamExt;
    let stdin = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (Ok(hyper::body::Frame::data(b)), rx)) });
    spec.chain(stdin)
}
