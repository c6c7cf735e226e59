//! `hearth cp [-r] FROM TO`: files and directories into and out of a microvm, at any size,
//! streamed both ways, with a progress bar on a terminal (never with `--json`).
//!
//! A file goes as itself (`PUT`/`GET …/files?path=`); a directory with `-r` as a tar
//! archive ([`hearth_proto::archive`], `…/files/archive?path=`) whose contents become the
//! new directory TO, as `cp -r DIR NEW` does. An upload is signed over its body's
//! SHA-256, so a directory is packed twice: once to hash it, once to send it (packing is
//! deterministic; a tree that changes in between is refused by the API, and nothing is
//! kept). Downloads land in a temporary file or directory beside TO, renamed into place
//! once whole, and an archive from the microvm is unpacked under the same rules the
//! microvm's agent applies (relative paths, links kept and never followed, no devices).

use anyhow::Context;
use hearth_api::client::{Client, Outgoing, Progress};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// `mvm-ID:/absolute/path` as (id, path).
fn remote(s: &str) -> Option<(String, String)> {
    s.split_once(':').filter(|(id, p)| id.starts_with("mvm-") && p.starts_with('/')).map(|(a, b)| (a.to_owned(), b.to_owned()))
}

/// A bar on stderr when it is a terminal and the output is not JSON; hidden otherwise.
fn bar(json: bool, what: &str) -> ProgressBar {
    if json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::no_length();
    b.set_style(
        ProgressStyle::with_template("{msg} {bytes}/{total_bytes} {wide_bar} {binary_bytes_per_sec} {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    b.set_message(what.to_owned());
    b
}

fn position(b: &ProgressBar) -> Progress {
    let b = b.clone();
    Arc::new(move |n| b.set_position(n))
}

/// Runs `hearth cp`; returns what to print (`size`, and for directories `entries`).
pub async fn run(c: &Client, json: bool, recursive: bool, from: &str, to: &str) -> anyhow::Result<Value> {
    match (remote(from), remote(to)) {
        (None, Some((id, path))) => {
            let local = Path::new(from);
            let meta = std::fs::metadata(local).with_context(|| format!("cannot read {from}"))?;
            if meta.is_dir() {
                anyhow::ensure!(recursive, "{from} is a directory: copy it with -r");
                return upload_dir(c, json, local, &id, &path).await;
            }
            let b = bar(json, "upload");
            b.set_length(meta.len());
            let url = format!("/hearth/v1/microvms/{}/files?path={}", enc(&id), enc(&path));
            let v = c.put_file_progress(&url, local, position(&b)).await;
            b.finish_and_clear();
            Ok(v?)
        }
        (Some((id, path)), None) => {
            if recursive {
                return download_dir(c, json, &id, &path, Path::new(to)).await;
            }
            // Into a directory that exists, as cp does: under the file's own name.
            let mut dest = PathBuf::from(to);
            if dest.is_dir() {
                dest.push(Path::new(&path).file_name().context("the remote path names no file")?);
            }
            let b = bar(json, "download");
            let len = b.clone();
            let url = format!("/hearth/v1/microvms/{}/files?path={}", enc(&id), enc(&path));
            let n = c.get_to_file_progress(&url, &dest, Some(Arc::new(move |n| len.set_length(n))), Some(position(&b))).await;
            b.finish_and_clear();
            let n = n.map_err(|e| match &e {
                hearth_api::client::ClientError::Api { message, .. } if message.contains("is a directory") => {
                    anyhow::anyhow!("{e}\n(copy a directory with -r)")
                }
                _ => e.into(),
            })?;
            Ok(json!({ "size": n, "path": dest }))
        }
        _ => anyhow::bail!("give one local path and one mvm-ID:/absolute/path"),
    }
}

/// Counts and hashes what is written (the first pass of a directory upload).
struct Hashing(sha2::Sha256, u64);

impl std::io::Write for Hashing {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        sha2::Digest::update(&mut self.0, b);
        self.1 += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn upload_dir(c: &Client, json: bool, local: &Path, id: &str, path: &str) -> anyhow::Result<Value> {
    let dir = local.to_path_buf();
    let (hash, len) = tokio::task::spawn_blocking(move || -> std::io::Result<(String, u64)> {
        let mut h = Hashing(sha2::Digest::new(), 0);
        hearth_proto::archive::pack(&dir, &mut h)?;
        Ok((format!("{:x}", sha2::Digest::finalize(h.0)), h.1))
    })
    .await?
    .with_context(|| format!("cannot pack {}", local.display()))?;
    // Second pass, streamed: the packer writes into a bounded pipe the request reads.
    let (r, w) = tokio::io::duplex(256 << 10);
    let dir = local.to_path_buf();
    let packer = tokio::task::spawn_blocking(move || {
        let mut w = tokio_util::io::SyncIoBridge::new(w);
        hearth_proto::archive::pack(&dir, &mut w).and_then(|_| std::io::Write::flush(&mut w))
    });
    let b = bar(json, "upload");
    b.set_length(len);
    let url = format!("/hearth/v1/microvms/{}/files/archive?path={}", enc(id), enc(path));
    let body = tokio_util::io::ReaderStream::with_capacity(r, 256 << 10);
    let body = Outgoing { stream: body, len, sha256: hash, content_type: "application/x-tar" };
    let v = c.put_stream(http::Method::PUT, &url, body, Some(position(&b))).await;
    b.finish_and_clear();
    let packed = packer.await?;
    match v {
        Err(hearth_api::client::ClientError::Api { status: 403, message, .. }) if message.contains("does not match") => {
            anyhow::bail!("{} changed while it was being sent (nothing was kept in the microvm): try again", local.display())
        }
        Err(e) => Err(e.into()),
        Ok(v) => {
            packed.with_context(|| format!("cannot pack {}", local.display()))?;
            Ok(json!({ "entries": v["entries"], "size": v["bytes"], "archiveSize": v["size"], "path": path }))
        }
    }
}

/// Removes a temporary directory unless the download completed.
struct TempDir(Option<PathBuf>);

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

async fn download_dir(c: &Client, json: bool, id: &str, path: &str, dest: &Path) -> anyhow::Result<Value> {
    anyhow::ensure!(
        std::fs::symlink_metadata(dest).is_err(),
        "{} exists: a directory is copied into a new path (the microvm's {path} becomes it)",
        dest.display()
    );
    let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new().prefix(".hearth-part-").tempdir_in(parent)?.keep();
    let mut guard = TempDir(Some(tmp.clone()));
    let url = format!("/hearth/v1/microvms/{}/files/archive?path={}", enc(id), enc(path));
    let incoming = c.get_stream(&url).await?;
    let b = bar(json, "download");
    let counted = b.clone();
    let mut got = 0u64;
    let stream = futures_util::StreamExt::inspect(incoming.into_stream(), move |c| {
        if let Ok(c) = c {
            got += c.len() as u64;
            counted.set_position(got);
        }
    });
    let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(stream));
    let into = tmp.clone();
    let stats = tokio::task::spawn_blocking(move || hearth_proto::archive::unpack(reader, &into)).await?;
    b.finish_and_clear();
    let stats = stats.with_context(|| format!("cannot unpack the microvm's {path}"))?;
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    std::fs::rename(&tmp, dest).with_context(|| format!("cannot move the copy to {}", dest.display()))?;
    guard.0 = None;
    Ok(json!({ "entries": stats.entries, "size": stats.bytes, "path": dest }))
}
