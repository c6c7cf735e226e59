//! A small SigV4-signing client of the API (for the `hearth` CLI and benchmarks).

use serde_json::Value;

mod aws;
mod transfer;
pub use aws::xml_text;
pub use transfer::{Incoming, Outgoing, Progress};

/// An API endpoint and the key to sign with.
#[derive(Clone)]
pub struct Client {
    base: String,
    access_key: String,
    secret: String,
    http: reqwest::Client,
}

/// A failed call: the API's error (type and message) or a transport failure.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The API answered with an error.
    #[error("{code} ({status}): {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// Error type (`ResourceNotFoundException`, …).
        code: String,
        /// Message.
        message: String,
    },
    /// A local file to upload could not be read.
    #[error("cannot read {path}: {source}")]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The request cannot be signed with these credentials.
    #[error(transparent)]
    Sign(#[from] crate::sigv4::SignError),
    /// No answer.
    #[error("cannot reach the Hearth API at {url}: {source}")]
    Transport {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
}

impl Client {
    /// A client of `base` (`http://127.0.0.1:8377`).
    pub fn new(base: &str, access_key: &str, secret: &str) -> Self {
        Client {
            base: base.trim_end_matches('/').to_owned(),
            access_key: access_key.into(),
            secret: secret.into(),
            http: reqwest::Client::new(),
        }
    }

    /// A SigV4-signed request for `path_and_query` and its URL.
    fn signed(
        &self,
        method: http::Method,
        path_and_query: &str,
        body: Vec<u8>,
        content_type: Option<&str>,
    ) -> Result<(String, reqwest::RequestBuilder), ClientError> {
        let url = format!("{}{path_and_query}", self.base);
        let bad_url = || ClientError::Api { status: 0, code: "InvalidUrl".into(), message: url.clone() };
        let uri: http::Uri = url.parse().map_err(|_| bad_url())?;
        let mut headers = http::HeaderMap::new();
        headers.insert("host", http::HeaderValue::from_str(uri.authority().map_or("", |a| a.as_str())).map_err(|_| bad_url())?);
        crate::sigv4::sign(&method, &uri, &mut headers, &body, &self.access_key, &self.secret, "us-east-1", crate::clock::system())?;
        let mut req = self.http.request(method, &url).body(body);
        for (k, v) in &headers {
            if k != "host" {
                req = req.header(k, v);
            }
        }
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        Ok((url, req))
    }

    /// POSTs a JSON body and hands each NDJSON line of the (streamed) answer to `line`.
    pub async fn stream_lines(&self, path_and_query: &str, body: &Value, mut line: impl FnMut(Value)) -> Result<(), ClientError> {
        let (url, req) = self.signed(http::Method::POST, path_and_query, body.to_string().into_bytes(), Some("application/json"))?;
        let mut resp = req.send().await.map_err(|source| ClientError::Transport { url: url.clone(), source })?;
        if resp.status().as_u16() >= 400 {
            let status = resp.status().as_u16();
            let code = resp.headers().get("x-amzn-errortype").and_then(|v| v.to_str().ok()).map(str::to_owned);
            let text = resp.bytes().await.map_err(|source| ClientError::Transport { url, source })?;
            return Err(Self::error(status, code, &text));
        }
        let mut buf: Vec<u8> = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|source| ClientError::Transport { url: url.clone(), source })? {
            buf.extend_from_slice(&chunk);
            while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                let l: Vec<u8> = buf.drain(..=i).collect();
                if let Ok(v) = serde_json::from_slice(&l) {
                    line(v);
                }
            }
        }
        Ok(())
    }

    /// Sends a signed request; returns the status, the error type header and the body.
    async fn send(
        &self,
        method: http::Method,
        path_and_query: &str,
        body: Vec<u8>,
        content_type: Option<&str>,
    ) -> Result<(u16, Option<String>, bytes::Bytes), ClientError> {
        let (url, req) = self.signed(method, path_and_query, body, content_type)?;
        let resp = req.send().await.map_err(|source| ClientError::Transport { url: url.clone(), source })?;
        let status = resp.status().as_u16();
        let code = resp.headers().get("x-amzn-errortype").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let bytes = resp.bytes().await.map_err(|source| ClientError::Transport { url, source })?;
        Ok((status, code, bytes))
    }

    fn error(status: u16, code: Option<String>, body: &[u8]) -> ClientError {
        let v: Value = serde_json::from_slice(body).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()));
        ClientError::Api {
            status,
            code: code.unwrap_or_else(|| "Error".into()),
            message: v.get("message").and_then(Value::as_str).map_or_else(|| v.to_string(), str::to_owned),
        }
    }

    /// Calls `method path?query` with a JSON body; returns the decoded answer (`Null` for
    /// an empty one).
    pub async fn call(&self, method: http::Method, path_and_query: &str, body: Option<&Value>) -> Result<Value, ClientError> {
        let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let (status, code, text) = self.send(method, path_and_query, bytes, body.map(|_| "application/json")).await?;
        if status >= 400 {
            return Err(Self::error(status, code, &text));
        }
        Ok(if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&text).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&text).into_owned()))
        })
    }

    /// PUTs raw bytes; returns the JSON answer.
    pub async fn put_bytes(&self, path_and_query: &str, data: Vec<u8>) -> Result<Value, ClientError> {
        let (status, code, text) = self.send(http::Method::PUT, path_and_query, data, Some("application/octet-stream")).await?;
        if status >= 400 {
            return Err(Self::error(status, code, &text));
        }
        Ok(serde_json::from_slice(&text).unwrap_or(Value::Null))
    }

    /// POSTs the file at `path` as the body, streamed (any size), signed over its SHA-256
    /// (read once before sending); returns the JSON answer.
    pub async fn upload_file(&self, path_and_query: &str, path: &std::path::Path) -> Result<Value, ClientError> {
        self.stream_file(http::Method::POST, path_and_query, path, "application/zip", None).await
    }

    /// PUTs the file at `path` as the body, streamed as [`Client::upload_file`] does (a
    /// file write into a microvm); returns the JSON answer.
    pub async fn put_file(&self, path_and_query: &str, path: &std::path::Path) -> Result<Value, ClientError> {
        self.stream_file(http::Method::PUT, path_and_query, path, "application/octet-stream", None).await
    }

    /// [`Client::put_file`], `progress` seeing the bytes sent.
    pub async fn put_file_progress(&self, path_and_query: &str, path: &std::path::Path, progress: Progress) -> Result<Value, ClientError> {
        self.stream_file(http::Method::PUT, path_and_query, path, "application/octet-stream", Some(progress)).await
    }

    async fn stream_file(
        &self,
        method: http::Method,
        path_and_query: &str,
        path: &std::path::Path,
        content_type: &'static str,
        progress: Option<Progress>,
    ) -> Result<Value, ClientError> {
        let file_err = |source| ClientError::File { path: path.to_path_buf(), source };
        let hash = {
            let p = path.to_path_buf();
            tokio::task::spawn_blocking(move || -> std::io::Result<String> {
                use sha2::Digest;
                let mut h = sha2::Sha256::new();
                std::io::copy(&mut std::fs::File::open(p)?, &mut h)?;
                Ok(format!("{:x}", h.finalize()))
            })
            .await
            .map_err(|e| file_err(std::io::Error::other(e)))?
            .map_err(file_err)?
        };
        let file = tokio::fs::File::open(path).await.map_err(file_err)?;
        let len = file.metadata().await.map_err(file_err)?.len();
        let body = tokio_util::io::ReaderStream::with_capacity(file, 256 << 10);
        self.put_stream(method, path_and_query, Outgoing { stream: body, len, sha256: hash, content_type }, progress).await
    }

    /// GETs raw bytes into the file at `dest` as they come (any size); returns how many.
    /// They go to a temporary file beside `dest`, renamed into place once the transfer
    /// is whole: a transfer that breaks off is an error, and leaves `dest` as it was.
    pub async fn get_to_file(&self, path_and_query: &str, dest: &std::path::Path) -> Result<u64, ClientError> {
        self.get_to_file_progress(path_and_query, dest, None, None).await
    }

    /// [`Client::get_to_file`], `size` seeing the transfer's size once known and
    /// `progress` the bytes received.
    pub async fn get_to_file_progress(
        &self,
        path_and_query: &str,
        dest: &std::path::Path,
        size: Option<Progress>,
        progress: Option<Progress>,
    ) -> Result<u64, ClientError> {
        use tokio::io::AsyncWriteExt;
        let file_err = |source| ClientError::File { path: dest.to_path_buf(), source };
        let mut incoming = self.get_stream(path_and_query).await?;
        if let (Some(f), Some(n)) = (&size, incoming.size) {
            f(n);
        }
        let dir = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        // Created as a new file is (0666 less the umask), not tempfile's 0600.
        let tmp = tempfile::Builder::new()
            .prefix(".hearth-part-")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .tempfile_in(dir)
            .map_err(file_err)?;
        let (std_file, tmp_path) = tmp.into_parts();
        let mut file = tokio::fs::File::from_std(std_file);
        let mut n = 0u64;
        while let Some(chunk) = incoming.chunk().await? {
            file.write_all(&chunk).await.map_err(file_err)?;
            n += chunk.len() as u64;
            if let Some(p) = &progress {
                p(n);
            }
        }
        if incoming.size.is_some_and(|want| want != n) {
            return Err(file_err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the transfer ended early")));
        }
        file.flush().await.map_err(file_err)?;
        file.sync_all().await.map_err(file_err)?;
        drop(file);
        tmp_path.persist(dest).map_err(|e| file_err(e.error))?;
        Ok(n)
    }

    /// GETs raw bytes.
    pub async fn get_bytes(&self, path_and_query: &str) -> Result<bytes::Bytes, ClientError> {
        let (status, code, text) = self.send(http::Method::GET, path_and_query, Vec::new(), None).await?;
        if status >= 400 {
            return Err(Self::error(status, code, &text));
        }
        Ok(text)
    }
}
