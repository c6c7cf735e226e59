//! Importing an image built elsewhere: a `docker save` archive or an OCI image layout tar.
//!
//! The archive is unpacked (by the `tar` crate, which refuses `..` and absolute paths)
//! into a scratch directory; the image manifest names the layers, which are applied in
//! order onto an empty root, honouring whiteouts (`.wh.<name>` deletes `<name>`,
//! `.wh..wh..opq` empties its directory); the result becomes an ext4 root filesystem.

use crate::{ext4, io, RootfsError};
use serde::Deserialize;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// Largest archive accepted.
pub const MAX_ARCHIVE_BYTES: u64 = 16 << 30;
/// Most layers accepted.
pub const MAX_LAYERS: usize = 256;

#[derive(Deserialize)]
struct DockerManifest {
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

#[derive(Deserialize)]
struct OciIndex {
    manifests: Vec<OciDescriptor>,
}

#[derive(Deserialize)]
struct OciDescriptor {
    digest: String,
}

#[derive(Deserialize)]
struct OciManifest {
    layers: Vec<OciDescriptor>,
}

fn invalid(m: impl Into<String>) -> RootfsError {
    RootfsError::Invalid(m.into())
}

fn blob_path(root: &Path, digest: &str) -> Result<PathBuf, RootfsError> {
    let (algo, hex) = digest.split_once(':').ok_or_else(|| invalid(format!("bad digest {digest:?}")))?;
    if !algo.bytes().all(|b| b.is_ascii_alphanumeric()) || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid(format!("bad digest {digest:?}")));
    }
    Ok(root.join("blobs").join(algo).join(hex))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, RootfsError> {
    let f = std::fs::File::open(path).map_err(io(format!("open {}", path.display())))?;
    let mut text = Vec::new();
    f.take(16 << 20).read_to_end(&mut text).map_err(io(format!("read {}", path.display())))?;
    serde_json::from_slice(&text).map_err(|e| invalid(format!("{}: {e}", path.display())))
}

/// The layer files of an unpacked archive, bottom first.
pub fn layers(unpacked: &Path) -> Result<Vec<PathBuf>, RootfsError> {
    let layers: Vec<PathBuf> = if unpacked.join("index.json").is_file() {
        let index: OciIndex = read_json(&unpacked.join("index.json"))?;
        let first = index.manifests.first().ok_or_else(|| invalid("index.json lists no manifest"))?;
        let manifest: OciManifest = read_json(&blob_path(unpacked, &first.digest)?)?;
        manifest.layers.iter().map(|l| blob_path(unpacked, &l.digest)).collect::<Result<_, _>>()?
    } else if unpacked.join("manifest.json").is_file() {
        let m: Vec<DockerManifest> = read_json(&unpacked.join("manifest.json"))?;
        let first = m.first().ok_or_else(|| invalid("manifest.json lists no image"))?;
        let mut out = Vec::new();
        for l in &first.layers {
            out.push(unpacked.join(safe_relative(Path::new(l)).ok_or_else(|| invalid(format!("bad layer path {l:?}")))?));
        }
        out
    } else {
        return Err(invalid("neither an OCI layout (index.json) nor a docker save archive (manifest.json)"));
    };
    if layers.len() > MAX_LAYERS {
        return Err(invalid(format!("{} layers; the limit is {MAX_LAYERS}", layers.len())));
    }
    Ok(layers)
}

fn safe_relative(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            _ => return None,
        }
    }
    Some(out)
}

/// Applies one layer (plain or gzip tar) onto `root`, honouring whiteouts.
pub fn apply_layer(layer: &Path, root: &Path) -> Result<(), RootfsError> {
    let mut f = std::fs::File::open(layer).map_err(io(format!("open layer {}", layer.display())))?;
    let mut magic = [0u8; 2];
    let gz = f.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b];
    let f = std::fs::File::open(layer).map_err(io(format!("open layer {}", layer.display())))?;
    let reader: Box<dyn Read> = if gz { Box::new(flate2::read::GzDecoder::new(f)) } else { Box::new(f) };
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    for entry in archive.entries().map_err(io(format!("read layer {}", layer.display())))? {
        let mut entry = entry.map_err(io(format!("read layer {}", layer.display())))?;
        let path = entry.path().map_err(io("entry path"))?.into_owned();
        let rel = safe_relative(&path).ok_or_else(|| invalid(format!("layer entry {} escapes the root", path.display())))?;
        let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let parent = rel.parent().map(|p| root.join(p)).unwrap_or_else(|| root.to_path_buf());
        if name == ".wh..wh..opq" {
            // Opaque directory: what lower layers put there is hidden.
            for e in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
                let _ = remove_any(&e.path());
            }
            continue;
        }
        if let Some(hidden) = name.strip_prefix(".wh.") {
            let _ = remove_any(&parent.join(hidden));
            continue;
        }
        // A later layer may replace a file by a directory or the reverse.
        let target = root.join(&rel);
        if let Ok(meta) = std::fs::symlink_metadata(&target) {
            if meta.is_dir() != entry.header().entry_type().is_dir() {
                let _ = remove_any(&target);
            }
        }
        entry.unpack_in(root).map_err(io(format!("unpack {}", rel.display())))?;
    }
    Ok(())
}

fn remove_any(p: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) => Err(e),
    }
}

/// Imports the image archive `tarball` as the ext4 root filesystem `out`.
pub fn import(tarball: &Path, out: &Path, free_mib: u64) -> Result<(), RootfsError> {
    let size = std::fs::metadata(tarball).map_err(io(format!("open {}", tarball.display())))?.len();
    if size > MAX_ARCHIVE_BYTES {
        return Err(invalid(format!("{} is {size} bytes; the limit is {MAX_ARCHIVE_BYTES}", tarball.display())));
    }
    let parent = out.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(format!("create {}", parent.display())))?;
    let work = tempfile::Builder::new().prefix(".import-").tempdir_in(parent).map_err(io("create scratch dir"))?;
    let unpacked = work.path().join("archive");
    let file = std::fs::File::open(tarball).map_err(io(format!("open {}", tarball.display())))?;
    tar::Archive::new(file).unpack(&unpacked).map_err(io(format!("unpack {}", tarball.display())))?;
    let root = work.path().join("root");
    std::fs::create_dir(&root).map_err(io("create root"))?;
    for layer in layers(&unpacked)? {
        apply_layer(&layer, &root)?;
    }
    std::fs::create_dir_all(root.join("workspace")).map_err(io("create /workspace"))?;
    ext4::from_dir(&root, out, free_mib)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer_tar(entries: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            match data {
                Some(d) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(d.len() as u64);
                    h.set_mode(0o644);
                    b.append_data(&mut h, path, *d).unwrap();
                }
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    h.set_mode(0o755);
                    b.append_data(&mut h, path, &[][..]).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn oci_layout_layers_apply_in_order_with_whiteouts() {
        let d = tempfile::tempdir().unwrap();
        let l1 = layer_tar(&[("a/", None), ("a/keep", Some(b"1")), ("a/gone", Some(b"2")), ("b/", None), ("b/old", Some(b"3"))]);
        let l2 = layer_tar(&[("a/.wh.gone", Some(b"")), ("b/.wh..wh..opq", Some(b"")), ("b/new", Some(b"4")), ("a/keep", Some(b"5"))]);
        let blobs = d.path().join("layout/blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        // gzip the second layer, as registries do
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &l2).unwrap();
        std::fs::write(blobs.join("aa01"), &l1).unwrap();
        std::fs::write(blobs.join("aa02"), gz.finish().unwrap()).unwrap();
        std::fs::write(blobs.join("ff00"), br#"{"layers":[{"digest":"sha256:aa01"},{"digest":"sha256:aa02"}]}"#).unwrap();
        std::fs::write(d.path().join("layout/index.json"), br#"{"manifests":[{"digest":"sha256:ff00"}]}"#).unwrap();
        let root = d.path().join("root");
        std::fs::create_dir(&root).unwrap();
        for l in layers(&d.path().join("layout")).unwrap() {
            apply_layer(&l, &root).unwrap();
        }
        assert_eq!(std::fs::read(root.join("a/keep")).unwrap(), b"5");
        assert!(!root.join("a/gone").exists());
        assert!(!root.join("b/old").exists());
        assert_eq!(std::fs::read(root.join("b/new")).unwrap(), b"4");
        assert!(!root.join("a/.wh.gone").exists());
    }

    #[test]
    fn docker_save_manifests_and_bad_digests() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("manifest.json"), br#"[{"Config":"c.json","Layers":["x/layer.tar","y/layer.tar"]}]"#).unwrap();
        assert_eq!(layers(d.path()).unwrap(), vec![d.path().join("x/layer.tar"), d.path().join("y/layer.tar")]);
        std::fs::write(d.path().join("manifest.json"), br#"[{"Layers":["../../etc/passwd"]}]"#).unwrap();
        assert!(layers(d.path()).is_err());
        assert!(blob_path(d.path(), "sha256:../../x").is_err());
        let empty = tempfile::tempdir().unwrap();
        assert!(layers(empty.path()).unwrap_err().to_string().contains("neither"));
    }
}
