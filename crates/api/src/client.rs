//! A small SigV4-signing client of the API (for the `hearth` CLI and benchmarks).

use serde_json::Value;
use std::time::SystemTime;

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
        Client { base: base.trim_end_matches('/').to_owned(), access_key: access_key.into(), secret: secret.into(), http: reqwest::Client::new() }
    }

    /// Calls `method path?query` with a JSON body; returns the decoded answer (`Null` for
    /// an empty one).
    pub async fn call(&self, method: http::Method, path_and_query: &str, body: Option<&Value>) -> Result<Value, ClientError> {
        let url = format!("{}{path_and_query}", self.base);
        let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let uri: http::Uri = url.parse().map_err(|_| ClientError::Api { status: 0, code: "InvalidUrl".into(), message: url.clone() })?;
        let mut headers = http::HeaderMap::new();
        let host = uri.authority().map(|a| a.as_str().to_owned()).unwrap_or_default();
        headers.insert("host", http::HeaderValue::from_str(&host).map_err(|_| ClientError::Api { status: 0, code: "InvalidUrl".into(), message: url.clone() })?);
        crate::sigv4::sign(&method, &uri, &mut headers, &bytes, &self.access_key, &self.secret, "us-east-1", SystemTime::now());
        let mut req = self.http.request(method, &url).body(bytes);
        for (k, v) in &headers {
            if k != "host" {
                req = req.header(k, v);
            }
        }
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let resp = req.send().await.map_err(|source| ClientError::Transport { url: url.clone(), source })?;
        let status = resp.status().as_u16();
        let code = resp.headers().get("x-amzn-errortype").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let text = resp.bytes().await.map_err(|source| ClientError::Transport { url, source })?;
        let v: Value = if text.is_empty() { Value::Null } else { serde_json::from_slice(&text).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&text).into_owned())) };
        if status >= 400 {
            return Err(ClientError::Api {
                status,
                code: code.unwrap_or_else(|| "Error".into()),
                message: v.get("message").and_then(Value::as_str).map_or_else(|| v.to_string(), str::to_owned),
            });
        }
        Ok(v)
    }
}
