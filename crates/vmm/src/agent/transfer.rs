//! File and directory transfers of any size: a file write that tells the agent its size
//! (checked against the guest's free space before a byte is written), and directories as
//! tar streams ([`hearth_proto::archive`]) both ways. Like [`AgentClient::read_file`] and
//! [`AgentClient::write_file`], what is in flight is bounded by the HTTP/2 stream's
//! flow-control window (4 MiB) and the caller's own queue, whatever the size.

use super::{conn_err, AgentClient, AgentError, FileChunks};
use bytes::Bytes;
use futures_util::Stream;
use hearth_proto::archive::Stats;
use hearth_proto::binpath::BinPath;
use hearth_proto::files::FileInfo;
use http::Request;
use http_body_util::BodyExt;

fn chunks(body: hyper::body::Incoming) -> FileChunks {
    Box::pin(futures_util::stream::unfold(body, |mut body| async move {
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
    }))
}

impl AgentClient {
    /// As [`AgentClient::write_file`], with the size the host expects: a size over the
    /// guest's free space is refused ([`hearth_proto::ErrorCode::StorageFull`]) before the
    /// body is read. A stream that ends in an error leaves nothing behind.
    pub async fn write_file_sized<S>(&self, path: &BinPath, mode: Option<u32>, size: Option<u64>, data: S) -> Result<FileInfo, AgentError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send + Sync + 'static,
    {
        let mut uri = format!("/v1/files?path={}", path.to_query());
        if let Some(m) = mode {
            uri.push_str(&format!("&mode={m:o}"));
        }
        if let Some(n) = size {
            uri.push_str(&format!("&size={n}"));
        }
        self.put_stream(uri, data).await
    }

    /// Streams directory `path`'s contents as a tar archive. The agent's refusal (missing:
    /// NotFound; not a directory: WrongKind) comes before the first chunk; a failure
    /// while packing ends the stream in an error, never in a clean end.
    pub async fn read_archive(&self, path: &BinPath) -> Result<FileChunks, AgentError> {
        let req = Request::get(format!("/v1/archive?path={}", path.to_query()))
            .body(super::empty())
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        let resp = Self::check_status(self.send(req).await?).await?;
        Ok(chunks(resp.into_body()))
    }

    /// Unpacks a tar archive from `data` into the new directory `path` (parents created),
    /// atomically: the agent unpacks beside it and renames once `data` ended cleanly.
    pub async fn write_archive<S>(&self, path: &BinPath, size: Option<u64>, data: S) -> Result<Stats, AgentError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send + Sync + 'static,
    {
        let mut uri = format!("/v1/archive?path={}", path.to_query());
        if let Some(n) = size {
            uri.push_str(&format!("&size={n}"));
        }
        self.put_stream(uri, data).await
    }
}
