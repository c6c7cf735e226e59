//! Files and directories in and out of a microvm, at any size (the files extension):
//! streamed between the client's HTTP body and the agent's HTTP/2 stream, never whole in
//! the daemon. What a transfer holds here is its queue ([`TRANSFER_CHUNKS`] chunks of at
//! most the agent's 1 MiB frame) plus the agent stream's 4 MiB flow-control window; the
//! slower side sets the pace (HTTP/2 flow control toward the guest, TCP toward the
//! client). The only size limit is the guest's free disk, which the agent checks against
//! the declared size before a byte is written.

use super::Service;
use crate::clock::now;
use crate::error::ApiError;
use bytes::Bytes;
use hearth_proto::archive::Stats;
use hearth_proto::binpath::BinPath;
use hearth_proto::files::{FileInfo, FileKind};
use hearth_vmm::agent::{AgentError, FileChunks};
use std::sync::Arc;
use std::time::Duration;

/// Chunks of a transfer queued between the agent and the client (each at most the agent's
/// frame, 1 MiB): with the agent's 4 MiB stream window, what one transfer holds in the
/// daemon, whatever its size.
pub const TRANSFER_CHUNKS: usize = 4;

/// How long a download waits for its client to take the next chunk: a client that went
/// away, or stopped reading, ends it (and lets go of the VM).
const STREAM_STALL: Duration = Duration::from_secs(60);

/// A download as it starts: its size when known (a file's; an archive's is not), then its
/// chunks. A chunk that is an error ends it: the transfer broke off.
pub struct Download {
    /// Bytes that will come, for a file.
    pub size: Option<u64>,
    /// The chunks.
    pub chunks: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
}

type Data = std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + Sync + 'static>>;

impl Service {
    /// Streams file `path` of microvm `ident`: `Ok` once the agent has opened it, then its
    /// chunks as they come (as many as its size when it was opened: a file that grows
    /// meanwhile is cut there, one that shrinks ends the download short, an error). The VM
    /// counts as busy until the stream ends; a client that stops reading for
    /// [`STREAM_STALL`] ends it.
    ///
    /// # Errors
    ///
    /// As [`Service::with_vm`]; a missing file is a ResourceNotFoundException, a directory
    /// or anything else that is not a regular file a ValidationException.
    pub async fn read_file(self: &Arc<Self>, account: &str, ident: &str, path: String) -> Result<Download, ApiError> {
        let vm = self.vm_handle(account, ident).await?;
        let path = BinPath::from(path.as_str());
        let info = vm.agent().stat(&path).await?;
        match info.kind {
            FileKind::File => {}
            FileKind::Dir => {
                return Err(ApiError::validation(format!(
                    "{} is a directory: copy it as an archive (hearth cp -r, or GET files/archive?path=)",
                    path.display()
                )))
            }
            _ => return Err(ApiError::validation(format!("{} is not a regular file", path.display()))),
        }
        let chunks = vm.agent().read_file(&path, 0, Some(info.size)).await?;
        Ok(Download { size: Some(info.size), chunks: self.forward(account, ident, vm, chunks) })
    }

    /// Streams directory `path` of microvm `ident` as a tar archive
    /// ([`hearth_proto::archive`]), as [`Service::read_file`] streams a file.
    ///
    /// # Errors
    ///
    /// As [`Service::read_file`]; `path` not a directory is a ValidationException.
    pub async fn read_archive(self: &Arc<Self>, account: &str, ident: &str, path: String) -> Result<Download, ApiError> {
        let vm = self.vm_handle(account, ident).await?;
        let chunks = vm.agent().read_archive(&BinPath::from(path.as_str())).await?;
        Ok(Download { size: None, chunks: self.forward(account, ident, vm, chunks) })
    }

    /// Hands the agent's chunks on through a bounded queue, holding the VM until the end.
    fn forward(
        self: &Arc<Self>,
        account: &str,
        ident: &str,
        vm: Arc<hearth_vmm::Vm>,
        mut chunks: FileChunks,
    ) -> tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>> {
        let (tx, rx) = tokio::sync::mpsc::channel(TRANSFER_CHUNKS);
        let (svc, id) = (self.clone(), Self::microvm_id(account, ident));
        tokio::spawn(async move {
            use futures_util::StreamExt;
            while let Some(chunk) = chunks.next().await {
                let item = chunk.map_err(std::io::Error::other);
                let last = item.is_err();
                match tokio::time::timeout(STREAM_STALL, tx.send(item)).await {
                    Ok(Ok(())) if !last => {}
                    _ => break,
                }
            }
            // The handle goes with the stream: the VM is idle again.
            drop(vm);
            let _ = svc.store.touch(&id, now()).await;
        });
        rx
    }

    /// Writes file `path` in microvm `ident` from `data`, atomically: the agent renames
    /// the file into place only when `data` ends cleanly, so a stream that ends in an
    /// error (the caller's refusal: a bad hash, a body broken off) leaves nothing behind.
    /// `size`, when known, is checked against the guest's free space first. `data` is
    /// pulled as the agent takes it. The agent's answer comes back as it is: a caller
    /// that ended `data` in an error knows why the agent failed, and one that did not
    /// converts it (`ApiError::from`).
    ///
    /// # Errors
    ///
    /// As [`Service::with_vm`].
    pub async fn write_file<S>(
        &self,
        account: &str,
        ident: &str,
        path: String,
        size: Option<u64>,
        data: S,
    ) -> Result<Result<FileInfo, AgentError>, ApiError>
    where
        S: futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + Sync + 'static,
    {
        let data: Data = Box::pin(data);
        self.with_vm(account, ident, move |vm| {
            Box::pin(async move { Ok(vm.agent().write_file_sized(&BinPath::from(path.as_str()), None, size, data).await) })
        })
        .await
    }

    /// Unpacks a tar archive from `data` into the new directory `path` of microvm `ident`,
    /// atomically, as [`Service::write_file`] writes a file.
    ///
    /// # Errors
    ///
    /// As [`Service::with_vm`].
    pub async fn write_archive<S>(
        &self,
        account: &str,
        ident: &str,
        path: String,
        size: Option<u64>,
        data: S,
    ) -> Result<Result<Stats, AgentError>, ApiError>
    where
        S: futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + Sync + 'static,
    {
        let data: Data = Box::pin(data);
        self.with_vm(account, ident, move |vm| {
            Box::pin(async move { Ok(vm.agent().write_archive(&BinPath::from(path.as_str()), size, data).await) })
        })
        .await
    }

    /// The entries of directory `path` in microvm `ident`.
    ///
    /// # Errors
    ///
    /// As [`Service::read_file`].
    pub async fn list_dir(&self, account: &str, ident: &str, path: String) -> Result<Vec<FileInfo>, ApiError> {
        self.with_vm(account, ident, move |vm| Box::pin(async move { Ok(vm.agent().list(&BinPath::from(path.as_str())).await?) })).await
    }
}
