//! `hearth images create NAME ./dir`: the build context reaches the daemon as an upload
//! (`POST /hearth/v1/artifacts`), never as a host path, so it works the same for a daemon
//! on this host and one elsewhere, and a tenant never names the daemon's files.
//!
//! A directory is zipped first into a temporary file (removed afterwards): regular files
//! with their permission bits, directories, and symbolic links stored as links (the build
//! recreates them in the image and never follows them on the host). Devices, FIFOs and
//! sockets cannot be part of a context and are refused. The zip is then streamed up.

use anyhow::Context;
use hearth_api::client::Client;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use zip::write::SimpleFileOptions;

/// The `codeArtifact.uri` for `artifact`: URIs as they are; a local directory or zip
/// uploaded, and the upload's URI.
pub async fn artifact_uri(c: &Client, artifact: &str, quiet: bool) -> anyhow::Result<String> {
    if artifact.contains("://") {
        return Ok(artifact.to_owned());
    }
    let path = Path::new(artifact);
    let meta = std::fs::metadata(path).with_context(|| format!("code artifact {artifact}"))?;
    let tmp;
    let zip = if meta.is_dir() {
        anyhow::ensure!(path.join("Dockerfile").is_file(), "{artifact} has no Dockerfile at its root");
        let dir = path.to_path_buf();
        tmp = tokio::task::spawn_blocking(move || zip_dir(&dir)).await??;
        tmp.path().to_path_buf()
    } else {
        path.to_path_buf()
    };
    let size = std::fs::metadata(&zip)?.len();
    if !quiet {
        eprintln!("uploading {artifact} ({:.1} MB)", size as f64 / 1e6);
    }
    let v = c.upload_file("/hearth/v1/artifacts", &zip).await?;
    v["uri"].as_str().map(str::to_owned).context("the daemon's upload answer has no uri")
}

/// `dir` as a zip in a temporary file.
fn zip_dir(dir: &Path) -> anyhow::Result<tempfile::NamedTempFile> {
    let tmp = tempfile::Builder::new().prefix("hearth-context-").suffix(".zip").tempfile()?;
    let mut w = zip::ZipWriter::new(std::io::BufWriter::new(tmp.reopen()?));
    let mut stack = vec![std::path::PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut entries: Vec<_> =
            std::fs::read_dir(dir.join(&rel)).with_context(|| format!("read {}", dir.join(&rel).display()))?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let r = rel.join(e.file_name());
            let name = r.to_str().with_context(|| format!("{} is not UTF-8: rename it", r.display()))?.to_owned();
            let meta = std::fs::symlink_metadata(e.path())?;
            let mode = meta.permissions().mode() & 0o777;
            let opts = SimpleFileOptions::default().unix_permissions(mode).large_file(meta.len() >= u32::MAX as u64);
            let ft = meta.file_type();
            if ft.is_symlink() {
                let target = std::fs::read_link(e.path())?;
                w.add_symlink(name, target.to_str().with_context(|| format!("link {} has a non-UTF-8 target", r.display()))?, opts)?;
            } else if ft.is_dir() {
                w.add_directory(format!("{name}/"), opts)?;
                stack.push(r);
            } else if ft.is_file() {
                w.start_file(name, opts)?;
                std::io::copy(&mut std::fs::File::open(e.path())?, &mut w)?;
            } else {
                anyhow::bail!("{} is a device, FIFO or socket: a build context holds files, directories and links only", r.display());
            }
        }
    }
    w.finish()?.flush()?;
    Ok(tmp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_zip_with_links_kept_as_links() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("Dockerfile"), "FROM debian:bookworm\n").unwrap();
        std::fs::create_dir(d.path().join("src")).unwrap();
        std::fs::write(d.path().join("src/app.py"), "print(1)\n").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("src/link")).unwrap();
        let z = zip_dir(d.path()).unwrap();
        let mut a = zip::ZipArchive::new(std::fs::File::open(z.path()).unwrap()).unwrap();
        let mut names: Vec<String> = a.file_names().map(str::to_owned).collect();
        names.sort();
        assert_eq!(names, ["Dockerfile", "src/", "src/app.py", "src/link"]);
        let link = a.by_name("src/link").unwrap();
        assert!(link.is_symlink());
    }
}
