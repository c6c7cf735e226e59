//! Importing an image built elsewhere: a `docker save` archive or an OCI image layout tar.
//!
//! The archive is unpacked (by the `tar` crate, which refuses `..` and absolute paths)
//! into a scratch directory; the image manifest names the layers, which are applied in
//! order onto an empty root, honouring whiteouts (`.wh.<name>` deletes `<name>`,
//! `.wh..wh..opq` empties its directory); the result becomes an ext4 root filesystem.
//! Registry pulls ([`crate::registry`]) apply their layers through the same
//! [`apply_layer`], under the same [`Budget`].

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

/// What one image may unpack to, all its layers together: a registry or an archive
/// chooses what its layers hold, and a small gzip stream can inflate to a huge tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Bytes of file content left.
    pub bytes: u64,
    /// Entries (files, directories, links, whiteouts) left.
    pub entries: u64,
}

/// Most bytes of file content one image unpacks to.
pub const MAX_UNPACKED_BYTES: u64 = 32 << 30;
/// Most entries one image's layers hold, all together.
pub const MAX_ENTRIES: u64 = 2_000_000;

impl Default for Budget {
    fn default() -> Self {
        Budget { bytes: MAX_UNPACKED_BYTES, entries: MAX_ENTRIES }
    }
}

/// The layer's bytes, decompressed by what its first bytes say: gzip, zstd, or a plain tar.
fn layer_reader(layer: &Path) -> Result<Box<dyn Read>, RootfsError> {
    let open = || std::fs::File::open(layer).map_err(io(format!("open layer {}", layer.display())));
    let mut magic = [0u8; 4];
    let n = open()?.read(&mut magic).map_err(io(format!("read layer {}", layer.display())))?;
    let f = std::io::BufReader::new(open()?);
    Ok(match &magic[..n] {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::MultiGzDecoder::new(f)),
        [0x28, 0xb5, 0x2f, 0xfd] => Box::new(
            ruzstd::decoding::StreamingDecoder::new(f)
                .map_err(|e| invalid(format!("layer {}: not a zstd stream: {e}", layer.display())))?,
        ),
        _ => Box::new(f),
    })
}

/// Whether the directory `parent` (relative to the root) exists without a link on the way:
/// `Ok(false)` when it does not exist, an error when a link or a file is in the way. Layers
/// may create links anywhere in their root (`etc -> /etc`); nothing this module deletes or
/// replaces is ever reached through one. Checked right before each removal: only this
/// thread writes the tree while a layer is applied, so nothing changes in between.
fn parent_beneath(root: &crate::beneath::Dir, parent: &Path, entry: &Path) -> Result<bool, RootfsError> {
    if parent.as_os_str().is_empty() {
        return Ok(true);
    }
    match root.open_dir(parent) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(_) => Err(invalid(format!("layer entry {} passes through a link or a file; refused", entry.display()))),
    }
}

/// Applies one layer (plain, gzip or zstd tar) onto `root`, honouring whiteouts, within
/// `budget` (what is left of it is written back).
///
/// Paths are relative and never leave `root`: `..` and absolute paths are refused, a
/// removal (whiteout, a file replaced by a directory) never goes through a link, and
/// extraction is the `tar` crate's `unpack_in`, which refuses an entry or a hard link
/// whose resolved parent lies outside `root`. Devices, FIFOs and sockets are skipped (the
/// guest's `/dev` is its own devtmpfs); extended attributes are not applied.
///
/// # Errors
/// [`RootfsError::Invalid`] for an unreadable or hostile layer, or one over the budget.
pub fn apply_layer(layer: &Path, root: &Path, budget: &mut Budget) -> Result<(), RootfsError> {
    apply(layer, root, budget, true)
}

/// Unpacks the tar `archive` into `root` as [`apply_layer`] does, but as plain files:
/// names starting `.wh.` are files like any other (a multi-stage build's exported files).
/// These are host-side staging only, so they keep no owner (they belong to the daemon's
/// user) and no setuid, setgid or sticky bit: a guest's setuid-root file never lands on
/// the host as one. (`COPY --from` gives the image the permission bits only, `mode &
/// 0o777`, and owners by `--chown`, as a COPY from the build context does.)
///
/// # Errors
/// As [`apply_layer`].
pub fn unpack_tree(archive: &Path, root: &Path, budget: &mut Budget) -> Result<(), RootfsError> {
    apply(archive, root, budget, false)
}

fn apply(layer: &Path, root: &Path, budget: &mut Budget, whiteouts: bool) -> Result<(), RootfsError> {
    let root_dir = crate::beneath::Dir::open(root).map_err(io(format!("open {}", root.display())))?;
    let mut archive = tar::Archive::new(layer_reader(layer)?);
    archive.set_preserve_permissions(true);
    // A layer's tree becomes the image (owners and special bits are its own); a stage's
    // export stays host-side staging (see [`unpack_tree`]).
    archive.set_preserve_ownerships(whiteouts);
    if !whiteouts {
        archive.set_mask(0o7000);
    }
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    let bad = |e: std::io::Error| invalid(format!("layer {} is not a readable tar: {e}", layer.display()));
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        budget.entries = budget.entries.checked_sub(1).ok_or_else(|| invalid(format!("the image has over {MAX_ENTRIES} entries")))?;
        let size = entry.header().entry_size().unwrap_or(0);
        budget.bytes =
            budget.bytes.checked_sub(size).ok_or_else(|| invalid(format!("the image unpacks to over {MAX_UNPACKED_BYTES} bytes")))?;
        let path = entry.path().map_err(bad)?.into_owned();
        let rel = safe_relative(&path).ok_or_else(|| invalid(format!("layer entry {} escapes the root", path.display())))?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        let kind = entry.header().entry_type();
        if kind.is_block_special() || kind.is_character_special() || kind.is_fifo() {
            continue;
        }
        let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let parent_rel = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        let parent = root.join(&parent_rel);
        if whiteouts && name == ".wh..wh..opq" {
            // Opaque directory: what lower layers put there is hidden.
            if parent_beneath(&root_dir, &parent_rel, &rel)? {
                for e in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
                    let _ = remove_any(&e.path());
                }
            }
            continue;
        }
        if let Some(hidden) = name.strip_prefix(".wh.").filter(|_| whiteouts) {
            if hidden.is_empty() || hidden == "." || hidden == ".." || hidden.contains('/') {
                return Err(invalid(format!("layer entry {} is a malformed whiteout", rel.display())));
            }
            if parent_beneath(&root_dir, &parent_rel, &rel)? {
                let _ = remove_any(&parent.join(hidden));
            }
            continue;
        }
        // A later layer may replace a file by a directory or the reverse.
        let target = root.join(&rel);
        if parent_beneath(&root_dir, &parent_rel, &rel)? {
            if let Ok(meta) = std::fs::symlink_metadata(&target) {
                if meta.is_dir() != kind.is_dir() || (meta.is_symlink() && kind.is_dir()) {
                    let _ = remove_any(&target);
                }
            }
        }
        entry.unpack_in(root).map_err(|e| {
            let cause = std::error::Error::source(&e).map(|c| format!(": {c}")).unwrap_or_default();
            invalid(format!("layer entry {}: {e}{cause}", rel.display()))
        })?;
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
    let mut budget = Budget::default();
    for layer in layers(&unpacked)? {
        apply_layer(&layer, &root, &mut budget)?;
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
        let mut budget = Budget::default();
        for l in layers(&d.path().join("layout")).unwrap() {
            apply_layer(&l, &root, &mut budget).unwrap();
        }
        assert_eq!(std::fs::read(root.join("a/keep")).unwrap(), b"5");
        assert!(!root.join("a/gone").exists());
        assert!(!root.join("b/old").exists());
        assert_eq!(std::fs::read(root.join("b/new")).unwrap(), b"4");
        assert!(!root.join("a/.wh.gone").exists());
    }

    fn symlink_tar(link: &str, target: &str) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(0);
        h.set_mode(0o777);
        b.append_link(&mut h, link, target).unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn hostile_layers_never_reach_outside_the_root() {
        let d = tempfile::tempdir().unwrap();
        let outside = d.path().join("outside");
        std::fs::create_dir_all(outside.join("dir")).unwrap();
        std::fs::write(outside.join("victim"), b"keep").unwrap();
        std::fs::write(outside.join("dir/inner"), b"keep").unwrap();
        let root = d.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let mut budget = Budget::default();
        let write = |name: &str, bytes: &[u8]| {
            let p = d.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        apply_layer(&write("l1", &symlink_tar("evil", outside.to_str().unwrap())), &root, &mut budget).unwrap();
        // A whiteout, an opaque directory and a file-to-directory swap, each through the link.
        for (i, layer) in [
            layer_tar(&[("evil/.wh.victim", Some(b""))]),
            layer_tar(&[("evil/dir/.wh..wh..opq", Some(b""))]),
            layer_tar(&[("evil/victim/", None)]),
            layer_tar(&[("evil/new", Some(b"x"))]),
        ]
        .iter()
        .enumerate()
        {
            let r = apply_layer(&write(&format!("bad{i}"), layer), &root, &mut budget);
            assert!(r.is_err(), "layer {i} was applied");
        }
        assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"keep");
        assert_eq!(std::fs::read(outside.join("dir/inner")).unwrap(), b"keep");
        assert!(!outside.join("new").exists());
        // `..` and absolute names are refused by name (written raw: the tar crate's own
        // builder refuses to write them).
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..12].copy_from_slice(b"../../escape");
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(1);
        h.set_mode(0o644);
        h.set_cksum();
        let mut raw = h.as_bytes().to_vec();
        raw.extend_from_slice(&[b'x'; 512]);
        raw.extend_from_slice(&[0; 1024]);
        assert!(apply_layer(&write("dotdot", &raw), &root, &mut budget).is_err());
        assert!(!d.path().join("escape").exists());
    }

    #[test]
    fn the_budget_bounds_bytes_and_entries() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let l = d.path().join("l");
        std::fs::write(&l, layer_tar(&[("a", Some(&[0u8; 4096][..])), ("b", Some(b"x"))])).unwrap();
        let e = apply_layer(&l, &root, &mut Budget { bytes: 4096, entries: 10 }).unwrap_err();
        assert!(e.to_string().contains("over"), "{e}");
        let e = apply_layer(&l, &root, &mut Budget { bytes: 1 << 20, entries: 1 }).unwrap_err();
        assert!(e.to_string().contains("entries"), "{e}");
        let mut b = Budget { bytes: 1 << 20, entries: 10 };
        apply_layer(&l, &root, &mut b).unwrap();
        assert_eq!(b, Budget { bytes: (1 << 20) - 4097, entries: 8 });
    }

    #[test]
    fn stage_exports_keep_no_special_bits_or_owners() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let d = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(1);
        h.set_mode(0o6755);
        h.set_uid(4242);
        h.set_gid(4242);
        b.append_data(&mut h, "suid", &b"x"[..]).unwrap();
        let tarball = d.path().join("export.tar");
        std::fs::write(&tarball, b.into_inner().unwrap()).unwrap();
        let root = d.path().join("files");
        std::fs::create_dir(&root).unwrap();
        unpack_tree(&tarball, &root, &mut Budget::default()).unwrap();
        let meta = std::fs::metadata(root.join("suid")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o755);
        assert_ne!(meta.uid(), 4242);
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
