//! A corpus of hostile archives, and a property test over random ones. Every case checks
//! the outcome and that nothing outside the destination was written: the destination
//! sits in a parent directory beside an empty `sentinel` directory, the target of the
//! absolute links and `..` chains.

use super::*;
use proptest::prelude::*;
use std::io::Write;
use zip::write::SimpleFileOptions;

/// One entry of a test archive. `SENTINEL` in a name or target stands for the sentinel
/// directory's absolute path.
#[derive(Debug, Clone)]
enum E {
    File(String, Vec<u8>),
    Dir(String),
    Link(String, String),
}

fn file(name: &str) -> E {
    E::File(name.into(), b"x".to_vec())
}
fn dir(name: &str) -> E {
    E::Dir(name.into())
}
fn link(name: &str, target: &str) -> E {
    E::Link(name.into(), target.into())
}
fn dockerfile() -> E {
    E::File("Dockerfile".into(), b"FROM busybox\n".to_vec())
}

/// A parent directory holding the empty `sentinel` and (after extraction) `ctx`.
struct Scratch {
    parent: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        let parent = tempfile::tempdir().unwrap();
        std::fs::create_dir(parent.path().join("sentinel")).unwrap();
        Scratch { parent }
    }
    fn dest(&self) -> PathBuf {
        self.parent.path().join("ctx")
    }
    fn sentinel(&self) -> String {
        self.parent.path().join("sentinel").to_str().unwrap().to_owned()
    }
    /// Builds the archive (names and targets with `SENTINEL` substituted; names the zip
    /// writer refuses, such as exact duplicates, are left out).
    fn zip(&self, entries: &[E]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut w = zip::ZipWriter::new(f.reopen().unwrap());
        let o = SimpleFileOptions::default();
        let s = |t: &str| t.replace("SENTINEL", &self.sentinel());
        for e in entries {
            let _ = match e {
                E::File(n, data) => w.start_file(s(n), o).and_then(|_| Ok(w.write_all(data)?)),
                E::Dir(n) => w.add_directory(s(n), o),
                E::Link(n, t) => w.add_symlink(s(n), s(t), o),
            };
        }
        w.finish().unwrap();
        f
    }
    fn extract(&self, entries: &[E], limits: Limits) -> Result<u64, ArtifactError> {
        let z = self.zip(entries);
        self.extract_file(z.path(), limits)
    }
    fn extract_file(&self, zip: &Path, limits: Limits) -> Result<u64, ArtifactError> {
        let r = extract_zip(zip, &self.dest(), limits);
        self.assert_contained(&r);
        r
    }
    /// Nothing but `sentinel` (empty) and, after a success, `ctx` in the parent; no host
    /// path in an error.
    fn assert_contained(&self, r: &Result<u64, ArtifactError>) {
        let mut names: Vec<_> = std::fs::read_dir(self.parent.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        let expected: &[&str] = if r.is_ok() { &["ctx", "sentinel"] } else { &["sentinel"] };
        assert_eq!(names, expected, "outcome {r:?}");
        assert!(std::fs::read_dir(self.parent.path().join("sentinel")).unwrap().next().is_none(), "the sentinel was written");
        if let Err(e) = r {
            let text = e.to_string();
            // Names in the archive may spell the sentinel's path; nothing names `ctx`.
            assert!(!text.contains(self.dest().to_str().unwrap()), "a host path in {text:?}");
        }
    }
    fn refused(&self, entries: &[E], culprit: &str) -> ArtifactError {
        let e = self.extract(entries, Limits::default()).expect_err(culprit);
        let culprit = culprit.replace("SENTINEL", &self.sentinel());
        assert!(matches!(&e, ArtifactError::BadEntry { entry, .. } | ArtifactError::Escape(entry) if *entry == culprit), "{e}");
        e
    }
}

/// Sets the unix mode of the entries named `name` in the zip `f` (central directory).
fn set_mode(f: &Path, name: &str, mode: u32) {
    let mut b = std::fs::read(f).unwrap();
    let mut found = false;
    for i in 0..b.len().saturating_sub(46) {
        if b[i..i + 4] != [0x50, 0x4b, 0x01, 0x02] {
            continue;
        }
        let len = u16::from_le_bytes([b[i + 28], b[i + 29]]) as usize;
        if b.get(i + 46..i + 46 + len) == Some(name.as_bytes()) {
            b[i + 5] = 3; // made by: Unix
            b[i + 38..i + 42].copy_from_slice(&(mode << 16).to_le_bytes());
            found = true;
        }
    }
    assert!(found, "{name} not in the central directory");
    std::fs::write(f, b).unwrap();
}

#[test]
fn a_good_archive_extracts_with_its_links() {
    let s = Scratch::new();
    let entries =
        [dockerfile(), E::File("src/app.py".into(), b"print(1)\n".to_vec()), link("lib", "src"), link("src/abs", "SENTINEL"), dir("src/")];
    assert_eq!(s.extract(&entries, Limits::default()).unwrap(), 22);
    let out = s.dest();
    assert_eq!(std::fs::read(out.join("src/app.py")).unwrap(), b"print(1)\n");
    // Links are extracted as links, whatever they point at.
    assert_eq!(std::fs::read_link(out.join("lib")).unwrap(), Path::new("src"));
    assert_eq!(std::fs::read_link(out.join("src/abs")).unwrap(), Path::new(&s.sentinel()));
}

#[test]
fn traversal_is_refused_and_nothing_is_left() {
    for bad in ["../evil", "/etc/passwd", "a/../../evil", "SENTINEL/evil"] {
        let s = Scratch::new();
        s.refused(&[dockerfile(), file(bad)], bad);
    }
}

#[test]
fn link_chains_through_earlier_entries_are_refused() {
    let corpus: &[(&[E], &str)] = &[
        // `a/b/a/b/x` looks inside; through `a -> .` and `a/b -> ..` it is outside.
        (&[link("a", "."), link("a/b", ".."), file("a/b/a/b/x")], "a/b"),
        (&[link("a", "."), link("c", "a/b/a/b/.."), file("c/evil")], "c/evil"),
        (&[dir("a/"), link("a/b", ".."), link("c", "a/b/a/b/.."), file("c/sentinel/evil")], "c/sentinel/evil"),
        (&[link("x", "SENTINEL"), file("x/evil")], "x/evil"),
        (&[link("d1/x", "SENTINEL"), file("d1/x/evil")], "d1/x/evil"),
        (&[link("d1/d2/x", "SENTINEL/"), dir("d1/d2/x/sub/")], "d1/d2/x/sub/"),
        (&[link("up", ".."), file("up/sentinel/evil")], "up/sentinel/evil"),
        (&[link("d/up", "../.."), file("d/up/sentinel/evil")], "d/up/sentinel/evil"),
        (&[link("d/e/up", "../../../sentinel"), file("d/e/up/evil")], "d/e/up/evil"),
        (&[link("l", "SENTINEL"), link("l/m", "x")], "l/m"),
        (&[link("l", "SENTINEL"), dir("l/")], "l/"),
        (&[link("l", "."), file("l/Dockerfile")], "l/Dockerfile"),
    ];
    for (entries, culprit) in corpus {
        let s = Scratch::new();
        let mut all = vec![dockerfile()];
        all.extend(entries.iter().cloned());
        let e = s.refused(&all, culprit);
        assert!(e.to_string().contains("symbolic link") || matches!(e, ArtifactError::Escape(_)), "{culprit}: {e}");
    }
}

#[test]
fn replacing_or_duplicating_an_entry_is_refused() {
    let corpus: &[(&[E], &str)] = &[
        (&[dir("d/"), file("d/f"), link("d", "SENTINEL")], "d"),
        (&[dir("d/"), link("./d", "SENTINEL")], "./d"),
        (&[file("a"), file("./a")], "./a"),
        (&[file("a"), link("a/", "x")], "a/"),
        (&[link("l", "x"), file("./l")], "./l"),
        (&[link("l", "x"), link("./l", "y")], "./l"),
        (&[file("f"), dir("f/")], "f/"),
        (&[file("f"), file("f/g")], "f/g"),
        (&[dir("d/"), file("d")], "d"),
        (&[file("Dockerfile2"), link("Dockerfile", "Dockerfile2")], "Dockerfile"),
    ];
    for (entries, culprit) in corpus {
        let s = Scratch::new();
        let mut all = vec![dockerfile()];
        if *culprit == "Dockerfile" {
            all.clear();
        }
        all.extend(entries.iter().cloned());
        s.refused(&all, culprit);
    }
    // An explicit entry for a directory that already exists is fine.
    let s = Scratch::new();
    s.extract(&[dockerfile(), file("a/b/f"), dir("a/"), dir("a/b/"), dir("./a/")], Limits::default()).unwrap();
}

#[test]
fn exact_duplicate_names_leave_one_entry() {
    // The zip reader keeps one entry per exact name (the last one's), so an exact
    // duplicate is never seen twice: here the link wins and is extracted as a link.
    let s = Scratch::new();
    let z = s.zip(&[dockerfile(), file("aaaa"), link("bbbb", "SENTINEL")]);
    let mut b = std::fs::read(z.path()).unwrap();
    for i in 0..b.len() - 4 {
        if &b[i..i + 4] == b"bbbb" {
            b[i..i + 4].copy_from_slice(b"aaaa");
        }
    }
    std::fs::write(z.path(), b).unwrap();
    s.extract_file(z.path(), Limits::default()).unwrap();
    assert!(std::fs::symlink_metadata(s.dest().join("aaaa")).unwrap().file_type().is_symlink());
}

#[test]
fn ten_thousand_entries_extract_under_the_default_limit_only() {
    let mut entries = vec![dockerfile()];
    entries.extend((1..10_000).map(|i| E::File(format!("d{}/f{i}", i % 100), vec![b'x'])));
    let s = Scratch::new();
    assert_eq!(s.extract(&entries, Limits::default()).unwrap(), 13 + 9_999);
    assert_eq!(std::fs::read_dir(s.dest().join("d7")).unwrap().count(), 100);
    let s = Scratch::new();
    let e = s.extract(&entries, Limits { max_entries: 9_999, ..Limits::default() }).unwrap_err();
    assert!(matches!(e, ArtifactError::TooLarge(_)), "{e}");
}

#[test]
fn bombs_and_missing_dockerfiles_are_refused() {
    // 64 MiB of zeros compresses to a few KiB; the limit is on what is written.
    let s = Scratch::new();
    let f = tempfile::NamedTempFile::new().unwrap();
    let mut w = zip::ZipWriter::new(f.reopen().unwrap());
    w.start_file("Dockerfile", SimpleFileOptions::default()).unwrap();
    w.write_all(b"FROM busybox\n").unwrap();
    w.start_file("bomb", SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated)).unwrap();
    w.write_all(&vec![0u8; 64 << 20]).unwrap();
    w.finish().unwrap();
    assert!(std::fs::metadata(f.path()).unwrap().len() < 1 << 20);
    let e = s.extract_file(f.path(), Limits { max_bytes: 16 << 20, max_entries: 10 }).unwrap_err();
    assert!(matches!(e, ArtifactError::TooLarge(_)), "{e}");

    let e = s.extract(&[file("app.py")], Limits::default()).unwrap_err();
    assert!(matches!(e, ArtifactError::NoDockerfile), "{e}");
    let e = s.extract(&[dir("Dockerfile/")], Limits::default()).unwrap_err();
    assert!(matches!(e, ArtifactError::NoDockerfile), "{e}");
    let e = s.extract(&[file("app.py")], Limits { max_bytes: 1 << 20, max_entries: 0 }).unwrap_err();
    assert!(matches!(e, ArtifactError::TooLarge(_)), "{e}");
}

#[test]
fn names_with_nul_or_backslash_are_refused_and_unicode_is_fine() {
    let s = Scratch::new();
    let e = s.refused(&[dockerfile(), file("a\0b")], "a\0b");
    assert!(e.to_string().contains("NUL"), "{e}");
    let e = s.refused(&[dockerfile(), file("..\\..\\evil")], "..\\..\\evil");
    assert!(e.to_string().contains("backslash"), "{e}");
    s.refused(&[dockerfile(), link("l", "a\0b")], "l");
    s.refused(&[dockerfile(), link("l", "")], "l");
    s.refused(&[dockerfile(), link("l", &"a/".repeat(2048))], "l");
    s.extract(&[dockerfile(), file("données/été.py"), file("日本/語"), link("λ", "données")], Limits::default()).unwrap();
    assert!(s.dest().join("données/été.py").is_file());
    assert!(s.dest().join("日本/語").is_file());
}

#[test]
fn special_modes_are_refused_and_privilege_bits_dropped() {
    for (mode, what) in [(0o010_644, "FIFO"), (0o020_644, "character device"), (0o060_644, "block device"), (0o140_644, "socket")] {
        let s = Scratch::new();
        let z = s.zip(&[dockerfile(), file("dev")]);
        set_mode(z.path(), "dev", mode);
        let e = s.extract_file(z.path(), Limits::default()).unwrap_err();
        assert!(matches!(&e, ArtifactError::BadEntry { entry, .. } if entry == "dev"), "{e}");
        assert!(e.to_string().contains(what), "{e}");
    }
    let s = Scratch::new();
    let z = s.zip(&[dockerfile(), file("suid"), file("sticky")]);
    set_mode(z.path(), "suid", 0o106_777);
    set_mode(z.path(), "sticky", 0o101_644);
    s.extract_file(z.path(), Limits::default()).unwrap();
    let mode = |n: &str| std::fs::metadata(s.dest().join(n)).unwrap().permissions().mode() & 0o7777;
    assert_eq!((mode("suid"), mode("sticky")), (0o755, 0o644));
}

/// Names and targets from a small alphabet that reaches everywhere: `..`, `.`, empty
/// components, backslashes and absolute paths into the sentinel.
fn arb_path() -> impl Strategy<Value = String> {
    let part = prop_oneof![Just("a"), Just("b"), Just(".."), Just("."), Just(""), Just("\\"), Just("a\\..")];
    (prop::collection::vec(part, 1..5), prop::bool::weighted(0.15), prop::bool::weighted(0.1)).prop_map(|(parts, abs, slash)| {
        let mut p = parts.join("/");
        if abs {
            p = format!("SENTINEL/{p}");
        }
        if slash {
            p.push('/');
        }
        p
    })
}

fn arb_entry() -> impl Strategy<Value = E> {
    prop_oneof![
        arb_path().prop_map(|n| E::File(n, b"x".to_vec())),
        arb_path().prop_map(E::Dir),
        (arb_path(), arb_path()).prop_map(|(n, t)| E::Link(n, t)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_archives_never_write_outside(entries in prop::collection::vec(arb_entry(), 0..12), df in prop::bool::ANY) {
        let s = Scratch::new();
        let mut all = if df { vec![dockerfile()] } else { vec![] };
        all.extend(entries);
        // `assert_contained` runs on every outcome; an error is fine, a panic is not.
        let _ = s.extract(&all, Limits::default());
    }
}
