//! The build layer cache: the root disk after each step that changes it (RUN, COPY/ADD,
//! WORKDIR), kept as a qcow2 file backed by the layer before it, under
//! `$HEARTH_HOME/layers/`.
//!
//! Each step has a **key**: the SHA-256 of the previous step's key and the step itself —
//! for COPY also the paths, modes and bytes of what it copies. The first key covers the
//! base image (path, size, modification time) and the build's environment. So a key names
//! the whole history up to its step, and a rebuild reuses the layers up to the first step
//! whose key changed: after a code-only change, everything before the COPY.
//!
//! `<key>.json` points at the layer's file; it is written (atomically) only after the step
//! succeeded and the file stopped changing, so a crash or a failed step never leaves an
//! entry that names a half-written layer. Layer files are never rewritten, and images
//! built on them keep using them (their disks are backed by the chain), so layers are
//! only removed by [`prune`], which keeps every layer an image still needs.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

use crate::dockerfile::StepKind;

/// Bumped when the meaning of a key changes, so old entries are never mistaken for new.
const KEY_VERSION: &str = "hearth-layer-v1";

/// One cache entry.
#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    /// The layer file's name in the cache directory.
    file: String,
    /// Milliseconds since the epoch.
    created_unix_ms: u64,
}

/// The cache directory.
#[derive(Debug, Clone)]
pub struct LayerCache {
    dir: PathBuf,
}

impl LayerCache {
    /// The cache under `home`.
    pub fn new(home: &Path) -> Self {
        LayerCache { dir: home.join("layers") }
    }

    /// A cache in `dir` (one tenant's, for API builds).
    pub fn at(dir: PathBuf) -> Self {
        LayerCache { dir }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The layer file recorded for `key`, if it is there.
    pub fn lookup(&self, key: &str) -> Option<PathBuf> {
        let text = std::fs::read_to_string(self.dir.join(format!("{key}.json"))).ok()?;
        let e: Entry = serde_json::from_str(&text).ok()?;
        if e.file.contains('/') {
            return None;
        }
        let p = self.dir.join(e.file);
        p.is_file().then_some(p)
    }

    /// A fresh, unused layer file path (not created).
    pub fn new_file(&self) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(&self.dir)?;
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).map_err(std::io::Error::other)?;
        Ok(self.dir.join(format!("layer-{}.qcow2", hex(&b))))
    }

    /// Records `file` (inside the cache directory) as the layer of `key`.
    pub fn record(&self, key: &str, file: &Path) -> std::io::Result<()> {
        let name = file.file_name().and_then(|n| n.to_str()).ok_or_else(|| std::io::Error::other("bad layer file name"))?;
        let e = Entry {
            file: name.to_owned(),
            created_unix_ms: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64,
        };
        std::fs::File::open(file)?.sync_all()?;
        // A temporary file of our own: concurrent builds of the same steps may record the
        // same key at once (the last one wins; both layers are valid).
        let mut tmp = tempfile::Builder::new().prefix(".entry-").tempfile_in(&self.dir)?;
        std::io::Write::write_all(&mut tmp, &serde_json::to_vec(&e).map_err(std::io::Error::other)?)?;
        tmp.persist(self.dir.join(format!("{key}.json"))).map_err(|e| e.error)?;
        Ok(())
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// True for steps that change the disk (and so get a layer).
pub fn changes_disk(kind: &StepKind) -> bool {
    matches!(kind, StepKind::Run(_) | StepKind::Copy { .. } | StepKind::Workdir(_))
}

/// Hashes what the COPY source `src` (relative to `context`) holds, in sorted order:
/// relative paths, modes, and file contents or link targets. It is read as the build reads
/// it ([`crate::build::walk`]), never through a link: a link's target is hashed, not what
/// it points at.
fn hash_source(h: &mut Sha256, context: &Path, src: &Path) -> std::io::Result<()> {
    /// The mode hashed for links, whose own permission bits mean nothing.
    const LINK_MODE: u32 = 0o120_777;
    let root = crate::beneath::Dir::open(context)?;
    for item in crate::build::walk(&root, src)? {
        h.update(item.rel().as_os_str().as_encoded_bytes());
        h.update([0]);
        match item {
            crate::build::Item::File { rel, mode } => {
                h.update(mode.to_le_bytes());
                let path = if rel.as_os_str().is_empty() { src.to_path_buf() } else { src.join(&rel) };
                let len = std::io::copy(&mut root.open_file(&path)?, h)?;
                h.update(len.to_le_bytes());
            }
            crate::build::Item::Link { target, .. } => {
                let target = target.as_os_str().as_encoded_bytes();
                h.update(LINK_MODE.to_le_bytes());
                h.update(target);
                h.update((target.len() as u64).to_le_bytes());
            }
        }
    }
    Ok(())
}

/// The key of every step (`kinds`, substitutions already made; see the module docs).
/// `base_id` names the base image and `env` is the environment the build starts with.
/// `resolve` gives a COPY source's directory (the context, or for `COPY --from=<stage>` that
/// stage's exported files) and its path relative to it (`None` when it would leave it).
pub fn step_keys(
    base_id: &str,
    env: &std::collections::BTreeMap<String, String>,
    kinds: &[StepKind],
    resolve: impl Fn(Option<usize>, &str) -> Option<(PathBuf, PathBuf)>,
) -> std::io::Result<Vec<String>> {
    let mut h = Sha256::new();
    h.update(KEY_VERSION);
    h.update(base_id);
    for (k, v) in env {
        h.update(format!("\0{k}={v}"));
    }
    let mut prev = hex(&h.finalize());
    let mut out = Vec::with_capacity(kinds.len());
    for kind in kinds {
        let mut h = Sha256::new();
        h.update(&prev);
        h.update(format!("{kind:?}"));
        if let StepKind::Copy { sources, from, .. } = kind {
            for s in sources {
                h.update(format!("\0src:{s}\0"));
                // A source that cannot be read fails the build later with a clear error;
                // its key just never matches.
                match resolve(*from, s) {
                    Some((context, src)) => hash_source(&mut h, &context, &src).unwrap_or_else(|_| h.update(b"\0unreadable")),
                    None => h.update(b"\0outside"),
                }
            }
        }
        prev = hex(&h.finalize());
        out.push(prev.clone());
    }
    Ok(out)
}

/// The base image's identity for keys: path, size and modification time.
pub fn base_id(path: &Path) -> String {
    let m = std::fs::metadata(path).ok();
    let mtime = m.as_ref().and_then(|m| m.modified().ok()).and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_nanos());
    format!("{}|{:?}|{:?}", path.display(), m.map(|m| m.len()), mtime)
}

/// The backing file a qcow2 image names, from its header (none for raw files).
pub fn backing_file(path: &Path) -> Option<PathBuf> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    let mut hdr = [0u8; 20];
    f.read_exact(&mut hdr).ok()?;
    if &hdr[0..4] != b"QFI\xfb" {
        return None;
    }
    let off = u64::from_be_bytes(hdr[8..16].try_into().ok()?);
    let len = u32::from_be_bytes(hdr[16..20].try_into().ok()?) as usize;
    if off == 0 || len == 0 || len > 4096 {
        return None;
    }
    f.seek(SeekFrom::Start(off)).ok()?;
    let mut name = vec![0u8; len];
    f.read_exact(&mut name).ok()?;
    Some(PathBuf::from(String::from_utf8(name).ok()?))
}

/// Removes cache entries and layer files no image needs: a layer survives when an image
/// disk in `keep_roots` reaches it through its backing chain. Returns the bytes freed.
pub fn prune(cache: &LayerCache, keep_roots: &[PathBuf]) -> std::io::Result<u64> {
    let mut needed = std::collections::HashSet::new();
    for root in keep_roots {
        let mut cur = backing_file(root);
        let mut depth = 0;
        while let Some(p) = cur {
            if depth > 256 || !needed.insert(p.clone()) {
                break;
            }
            cur = backing_file(&p);
            depth += 1;
        }
    }
    let mut freed = 0;
    let Ok(rd) = std::fs::read_dir(&cache.dir) else { return Ok(0) };
    let entries: Vec<_> = rd.flatten().map(|e| e.path()).collect();
    for p in &entries {
        if p.extension().is_some_and(|e| e == "qcow2") && !needed.contains(p) {
            freed += std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
            std::fs::remove_file(p)?;
        }
    }
    // Entries whose file went away are useless now.
    for p in &entries {
        if p.extension().is_some_and(|e| e == "json") {
            let key = p.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
            if cache.lookup(key).is_none() {
                let _ = std::fs::remove_file(p);
            }
        }
    }
    Ok(freed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(text: &str) -> Vec<StepKind> {
        crate::dockerfile::parse(text).unwrap().steps.into_iter().map(|s| s.kind).collect()
    }

    #[test]
    fn keys_change_from_the_first_changed_step_on() {
        let ctx = tempfile::tempdir().unwrap();
        std::fs::write(ctx.path().join("app.py"), "v1").unwrap();
        let text = "FROM debian:bookworm\nRUN echo one\nCOPY app.py /app/\nRUN echo two\n";
        let resolve = |_: Option<usize>, s: &str| Some((ctx.path().to_path_buf(), PathBuf::from(s)));
        let env = Default::default();
        let a = step_keys("base", &env, &plan(text), resolve).unwrap();
        let again = step_keys("base", &env, &plan(text), resolve).unwrap();
        assert_eq!(a, again, "keys are deterministic");
        std::fs::write(ctx.path().join("app.py"), "v2").unwrap();
        let b = step_keys("base", &env, &plan(text), resolve).unwrap();
        assert_eq!(a[0], b[0], "the RUN before the COPY keeps its key");
        assert_ne!(a[1], b[1], "the COPY of a changed file gets a new key");
        assert_ne!(a[2], b[2], "and so does everything after it");
        let c = step_keys("other-base", &env, &plan(text), resolve).unwrap();
        assert_ne!(a[0], c[0], "another base changes every key");
    }

    #[test]
    fn entries_point_at_existing_files_only() {
        let home = tempfile::tempdir().unwrap();
        let cache = LayerCache::new(home.path());
        assert!(cache.lookup("k").is_none());
        let f = cache.new_file().unwrap();
        std::fs::write(&f, b"layer").unwrap();
        cache.record("k", &f).unwrap();
        assert_eq!(cache.lookup("k"), Some(f.clone()));
        // Pruning with no image needing it removes the file and the entry.
        assert_eq!(prune(&cache, &[]).unwrap(), 5);
        assert!(cache.lookup("k").is_none());
        assert!(!cache.dir().join("k.json").exists());
    }
}
