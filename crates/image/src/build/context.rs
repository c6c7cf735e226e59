//! What COPY/ADD read from the build context, and how.
//!
//! The context is the tenant's (an extracted code zip), so it is read through a
//! [`beneath::Dir`] rooted at it: no path is resolved through a symbolic link on the host.
//! A COPY source that passes through a link is refused (`src -> /etc` then `COPY src/passwd`
//! would read the host's file); a source that *is* a link, and links met while walking a
//! source directory, are recreated as links in the guest ([`link_scripts`]) and never
//! read through. FIFOs, sockets and devices are refused: a build copies files, directories
//! and links. The layer cache hashes the same [`walk`], so a key covers a link's target,
//! not what it points at. Errors name paths inside the context, never host paths.

use super::{quote, BuildError};
use crate::beneath::{self, Kind};
use std::path::{Component, Path, PathBuf};

/// Longest shell script [`link_scripts`] makes (well under the exec frame limit).
const MAX_SCRIPT: usize = 64 << 10;

/// A COPY source as a path relative to the context root (empty: the root), refused when
/// it would leave the context. A leading `/` means the context root, as in Docker.
pub(crate) fn context_path(src: &str) -> Result<PathBuf, BuildError> {
    let mut out = PathBuf::new();
    for c in Path::new(src).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            _ => return Err(BuildError::Context(format!("COPY source {src:?} leaves the build context"))),
        }
    }
    Ok(out)
}

/// One thing a COPY source holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Item {
    /// A regular file and its whole `st_mode`.
    File {
        /// Path relative to the source (empty: the source itself).
        rel: PathBuf,
        /// Type and permission bits.
        mode: u32,
    },
    /// A symbolic link, copied as a link.
    Link {
        /// Path relative to the source (empty: the source itself).
        rel: PathBuf,
        /// The target as stored, never resolved on the host.
        target: PathBuf,
    },
}

impl Item {
    /// The path relative to the source (empty: the source itself).
    pub(crate) fn rel(&self) -> &Path {
        match self {
            Item::File { rel, .. } | Item::Link { rel, .. } => rel,
        }
    }
}

/// `rel` below the source `src` (the source itself when `rel` is empty: no trailing `/`,
/// which a file would refuse).
pub(crate) fn at(src: &Path, rel: &Path) -> PathBuf {
    if rel.as_os_str().is_empty() {
        src.to_path_buf()
    } else {
        src.join(rel)
    }
}

fn special(path: &Path, kind: Kind) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("{} is {}; COPY copies only files, directories and symbolic links", path.display(), kind.describe()),
    )
}

/// The files and links under the source `src` (relative to `root`), or `src` itself when
/// it is not a directory, sorted by path. Directories are entered, links never followed.
///
/// # Errors
/// `ELOOP` ([`beneath::is_link_refusal`]) when `src` passes through a link, `NotFound`
/// when it is missing, `InvalidInput` for a FIFO, socket or device, and I/O errors.
pub(crate) fn walk(root: &beneath::Dir, src: &Path) -> std::io::Result<Vec<Item>> {
    let item = |rel: PathBuf, kind: Kind, mode: u32| -> std::io::Result<Option<Item>> {
        let path = at(src, &rel);
        match kind {
            Kind::File => Ok(Some(Item::File { rel, mode })),
            Kind::Symlink => Ok(Some(Item::Link { target: root.read_link(&path)?.into(), rel })),
            Kind::Dir => Ok(None),
            k => Err(special(&path, k)),
        }
    };
    let meta = root.metadata(src)?;
    if let Some(one) = item(PathBuf::new(), meta.kind, meta.mode)? {
        return Ok(vec![one]);
    }
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(dir) = stack.pop() {
        for name in root.read_dir(&at(src, &dir))? {
            let rel = dir.join(name);
            let m = root.metadata(&at(src, &rel))?;
            match item(rel.clone(), m.kind, m.mode)? {
                Some(i) => out.push(i),
                None => stack.push(rel),
            }
        }
    }
    out.sort_by(|a, b| a.rel().cmp(b.rel()));
    Ok(out)
}

/// `e`, met copying the COPY source `src`, as the build's error.
pub(crate) fn copy_error(src: &str, e: std::io::Error) -> BuildError {
    if beneath::is_link_refusal(&e) {
        return BuildError::Context(format!(
            "COPY source {src:?} passes through a symbolic link; the context is read without following links, \
             so name the real path (a link itself may be copied: it is recreated in the image)"
        ));
    }
    if e.kind() == std::io::ErrorKind::NotFound {
        return BuildError::Context(format!("COPY source {src:?} is not in the build context"));
    }
    BuildError::Context(format!("COPY {src}: {e}"))
}

/// Shell scripts that recreate `links` (guest path, target) in the guest, parents
/// included, each at most [`MAX_SCRIPT`] bytes (one link may exceed it alone).
pub(crate) fn link_scripts(links: &[(String, String)]) -> Vec<String> {
    let mut out = Vec::new();
    let mut script = String::new();
    for (path, target) in links {
        let parent = match path.rsplit_once('/') {
            Some(("", _)) | None => "/",
            Some((p, _)) => p,
        };
        let line = format!("mkdir -p -- {}\nln -sfn -- {} {}\n", quote(parent), quote(target), quote(path));
        if !script.is_empty() && script.len() + line.len() > MAX_SCRIPT {
            out.push(std::mem::take(&mut script));
        }
        if script.is_empty() {
            script.push_str("set -e\n");
        }
        script.push_str(&line);
    }
    if !script.is_empty() {
        out.push(script);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dockerfile::StepKind;

    /// A context with a file, a directory, links of every kind and a sentinel outside.
    fn context() -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let (ctx, outside) = (t.path().join("ctx"), t.path().join("outside"));
        std::fs::create_dir_all(ctx.join("app/lib")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), "host").unwrap();
        std::fs::write(ctx.join("app/main.py"), "print(1)").unwrap();
        std::os::unix::fs::symlink(&outside, ctx.join("app/lib/host")).unwrap();
        std::os::unix::fs::symlink("../main.py", ctx.join("app/lib/main")).unwrap();
        std::os::unix::fs::symlink(&outside, ctx.join("etc")).unwrap();
        std::os::unix::fs::symlink("app", ctx.join("app2")).unwrap();
        (t, ctx)
    }

    #[test]
    fn sources_resolve_inside_the_context() {
        assert_eq!(context_path("/app/./x").unwrap(), Path::new("app/x"));
        assert_eq!(context_path(".").unwrap(), Path::new(""));
        for bad in ["../x", "a/../../x", "a/.."] {
            assert!(context_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn walks_copy_links_as_links_and_never_read_through_them() {
        let (_t, ctx) = context();
        let root = beneath::Dir::open(&ctx).unwrap();
        let items = walk(&root, Path::new("app")).unwrap();
        let host = ctx.parent().unwrap().join("outside");
        assert_eq!(
            items,
            vec![
                Item::Link { rel: "lib/host".into(), target: host.clone() },
                Item::Link { rel: "lib/main".into(), target: "../main.py".into() },
                Item::File { rel: "main.py".into(), mode: 0o100_000 | (0o666 & !umask()) },
            ]
        );
        // A source that is a link is one link; the whole context holds no host file.
        assert_eq!(walk(&root, Path::new("etc")).unwrap(), vec![Item::Link { rel: PathBuf::new(), target: host }]);
        let all = walk(&root, Path::new("")).unwrap();
        let linked = |i: &Item| ["etc", "app2"].iter().any(|l| i.rel().starts_with(l));
        assert!(all.iter().filter(|i| linked(i)).all(|i| matches!(i, Item::Link { rel, .. } if rel.components().count() == 1)), "{all:?}");
        assert_eq!(all.len(), 5);
        // A source through a link is refused, clearly.
        for through in ["etc/secret", "app2/main.py", "app/lib/host/secret"] {
            let e = walk(&root, Path::new(through)).unwrap_err();
            let msg = copy_error(through, e).to_string();
            assert!(msg.contains("passes through a symbolic link"), "{through}: {msg}");
        }
        assert!(copy_error("nope", walk(&root, Path::new("nope")).unwrap_err()).to_string().contains("not in the build context"));
    }

    fn umask() -> u32 {
        let probe = tempfile::tempdir().unwrap();
        std::fs::write(probe.path().join("f"), "").unwrap();
        0o666 & !std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(probe.path().join("f")).unwrap().permissions())
    }

    #[test]
    fn fifos_in_the_context_are_refused() {
        let (_t, ctx) = context();
        rustix::fs::mknodat(rustix::fs::CWD, ctx.join("app/pipe"), rustix::fs::FileType::Fifo, rustix::fs::Mode::from_raw_mode(0o644), 0)
            .unwrap();
        let root = beneath::Dir::open(&ctx).unwrap();
        let msg = copy_error("app", walk(&root, Path::new("app")).unwrap_err()).to_string();
        assert!(msg.contains("app/pipe is a FIFO"), "{msg}");
        assert!(!msg.contains(ctx.to_str().unwrap()), "a host path in {msg}");
    }

    #[test]
    fn layer_keys_hash_link_targets_not_what_they_point_at() {
        let (t, ctx) = context();
        let kinds = crate::dockerfile::parse("FROM debian:bookworm\nCOPY app /app\n")
            .unwrap()
            .steps
            .into_iter()
            .map(|s| s.kind)
            .collect::<Vec<StepKind>>();
        let resolve = |_: Option<usize>, s: &str| context_path(s).ok().map(|rel| (ctx.clone(), rel));
        let keys = || crate::layers::step_keys("base", &Default::default(), &kinds, resolve).unwrap();
        let before = keys();
        std::fs::write(t.path().join("outside/secret"), "changed").unwrap();
        assert_eq!(keys(), before, "a file behind a link is not part of the key");
        std::fs::remove_file(ctx.join("app/lib/main")).unwrap();
        std::os::unix::fs::symlink("../other.py", ctx.join("app/lib/main")).unwrap();
        assert_ne!(keys(), before, "a link's target is");
    }

    #[test]
    fn link_scripts_quote_and_split() {
        let links = vec![("/app/it's".to_owned(), "-x y".to_owned()), ("/top".to_owned(), "/etc".to_owned())];
        assert_eq!(
            link_scripts(&links),
            vec!["set -e\nmkdir -p -- '/app'\nln -sfn -- '-x y' '/app/it'\\''s'\nmkdir -p -- '/'\nln -sfn -- '/etc' '/top'\n".to_owned()]
        );
        let many: Vec<_> = (0..5000).map(|i| (format!("/l/{i}"), "t".to_owned())).collect();
        let scripts = link_scripts(&many);
        assert!(scripts.len() > 1 && scripts.iter().all(|s| s.len() <= MAX_SCRIPT && s.starts_with("set -e\n")));
        assert_eq!(scripts.iter().map(|s| s.matches("ln -sfn").count()).sum::<usize>(), 5000);
    }
}
