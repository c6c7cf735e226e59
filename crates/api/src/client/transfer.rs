//! Streamed transfers of any size for the client: a signed PUT whose body is a stream
//! (hashed beforehand by the caller, as SigV4 over `X-Amz-Content-Sha256` needs), and a
//! GET whose body is read as it comes; both report progress as bytes move.

use super::{Client, ClientError};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde_json::Value;

/// Called with the bytes moved so far.
pub type Progress = std::sync::Arc<dyn Fn(u64) + Send + Sync>;

/// A download as it starts: its size when the server said it, then its chunks.
pub struct Incoming {
    /// `Content-Length`, when given.
    pub size: Option<u64>,
    resp: reqwest::Response,
    url: String,
}

impl Incoming {
    /// The next chunk; `None` at the end. An error means the transfer broke off.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, ClientError> {
        self.resp.chunk().await.map_err(|source| ClientError::Transport { url: self.url.clone(), source })
    }

    /// The chunks as a stream of I/O results (for readers: `tokio_util::io::StreamReader`).
    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
        self.resp.bytes_stream().map(|r| r.map_err(std::io::Error::other))
    }
}

/// A body to stream: exactly `len` bytes whose SHA-256 (lowercase hex) is `sha256`.
pub struct Outgoing<S> {
    /// The bytes.
    pub stream: S,
    /// How many.
    pub len: u64,
    /// Their SHA-256, lowercase hex.
    pub sha256: String,
    /// Its `Content-Type`.
    pub content_type: &'static str,
}

impl Client {
    /// Sends `body` with `method`, signed over its hash (the streamed form: the server
    /// checks the hash as the body arrives and keeps nothing that does not match);
    /// `progress` sees the bytes sent. Returns the JSON answer.
    pub async fn put_stream<S>(
        &self,
        method: http::Method,
        path_and_query: &str,
        body: Outgoing<S>,
        progress: Option<Progress>,
    ) -> Result<Value, ClientError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send + Sync + 'static,
    {
        let Outgoing { stream, len, sha256: hash, content_type } = body;
        let url = format!("{}{path_and_query}", self.base);
        let bad_url = || ClientError::Api { status: 0, code: "InvalidUrl".into(), message: url.clone() };
        let uri: http::Uri = url.parse().map_err(|_| bad_url())?;
        let mut headers = http::HeaderMap::new();
        headers.insert("host", http::HeaderValue::from_str(uri.authority().map_or("", |a| a.as_str())).map_err(|_| bad_url())?);
        crate::sigv4::sign_streamed(
            &method,
            &uri,
            &mut headers,
            &hash,
            &self.access_key,
            &self.secret,
            "us-east-1",
            crate::clock::system(),
        )?;
        let mut sent = 0u64;
        let body = stream.inspect(move |c| {
            if let (Ok(c), Some(p)) = (c, &progress) {
                sent += c.len() as u64;
                p(sent);
            }
        });
        let mut req = self
            .http
            .request(method, &url)
            .header("content-type", content_type)
            .header("content-length", len)
            .body(reqwest::Body::wrap_stream(body));
        for (k, v) in &headers {
            if k != "host" {
                req = req.header(k, v);
            }
        }
        let resp = req.send().await.map_err(|source| ClientError::Transport { url: url.clone(), source })?;
        let status = resp.status().as_u16();
        let code = resp.headers().get("x-amzn-errortype").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let text = resp.bytes().await.map_err(|source| ClientError::Transport { url, source })?;
        if status >= 400 {
            return Err(Self::error(status, code, &text));
        }
        Ok(serde_json::from_slice(&text).unwrap_or(Value::Null))
    }

    /// Starts a signed GET whose (large) body is then read with [`Incoming::chunk`].
    pub async fn get_stream(&self, path_and_query: &str) -> Result<Incoming, ClientError> {
        let (url, req) = self.signed(http::Method::GET, path_and_query, Vec::new(), None)?;
        let resp = req.send().await.map_err(|source| ClientError::Transport { url: url.clone(), source })?;
        if resp.status().as_u16() >= 400 {
            let status = resp.status().as_u16();
            let code = resp.headers().get("x-amzn-errortype").and_then(|v| v.to_str().ok()).map(str::to_owned);
            let text = resp.bytes().await.map_err(|source| ClientError::Transport { url, source })?;
            return Err(Self::error(status, code, &text));
        }
        let size = resp.content_length();
        Ok(Incoming { size, resp, url })
    }
}
