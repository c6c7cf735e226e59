//! Encryption at rest under a KMS key's 32-byte material (XChaCha20-Poly1305): short
//! values (secrets' versions, KMS ciphertexts) with [`seal`]/[`open`], and the files of a
//! suspended microvm with [`encrypt_file`]/[`decrypt_file`].
//!
//! Files are encrypted in chunks of at most [`CHUNK`] bytes of their *data regions*
//! (`SEEK_DATA`/`SEEK_HOLE`): a suspended VM's `state` is RAM-sized and mostly holes, and
//! the encrypted file keeps it that way (a hole is recorded by its absence; decryption
//! writes the chunks back at their offsets into a file of the recorded size). Hand-written
//! rather than the `aead::stream` construction because STREAM numbers a contiguous stream
//! and has no place for the offsets that keep holes; the scheme is the same idea: a
//! random 16-byte prefix per file, the chunk's index in the rest of the 24-byte nonce, and
//! every chunk authenticated with the file's name, its size, the chunk's offset and
//! length and whether it is the last, so chunks cannot be dropped, reordered, moved
//! within or between files, or the file truncated, without the decryption failing.
//!
//! Layout: `MAGIC`, prefix (16), plain size (u64 LE), then records: offset (u64 LE),
//! plain length (u32 LE), last (u8), ciphertext (length + 16). An empty or all-hole file
//! is one empty last record.
//!
//! A crate of its own so that its debug build is optimized (`[profile.dev.package]` in the
//! workspace's Cargo.toml): unoptimized, the cipher runs some 200 times slower, and the
//! test suite encrypts templates and suspended microvms of tens of MiB.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

/// `n` bytes from the OS's random number generator.
///
/// # Panics
///
/// When the OS gives none: nonces made from anything else could repeat.
fn random(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    if let Err(e) = getrandom::fill(&mut b) {
        panic!("the OS random number generator failed ({e}); refusing to make nonces from predictable bytes");
    }
    b
}

/// Magic at the start of an encrypted file.
const MAGIC: &[u8; 8] = b"HHENC01\n";
/// Largest chunk of plain text per record.
pub const CHUNK: usize = 1 << 20;
/// XChaCha20-Poly1305's tag.
const TAG: usize = 16;
/// The suffix of an encrypted file.
pub const SUFFIX: &str = ".enc";

/// Why an encrypted value or file does not open.
#[derive(Debug, thiserror::Error)]
pub enum AtRestError {
    /// Not in the encrypted form, truncated, or altered, or another key or place.
    #[error("{0}")]
    Inauthentic(String),
    /// Reading or writing failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AtRestError {
    let what = what.into();
    move |source| AtRestError::Io { what, source }
}

/// Seals `plain` under `key` with `aad` bound: nonce (24) then ciphertext.
pub fn seal(key: &[u8; 32], aad: &[u8], plain: &[u8]) -> Vec<u8> {
    let nonce = random(24);
    let ct = XChaCha20Poly1305::new(&(*key).into())
        .encrypt(&XNonce::try_from(&nonce[..]).expect("24 bytes"), Payload { msg: plain, aad })
        .expect("values are far below XChaCha20's message limit");
    [nonce, ct].concat()
}

/// Opens what [`seal`] made with the same key and `aad`.
///
/// # Errors
///
/// [`AtRestError::Inauthentic`] for another key or `aad`, or altered bytes.
pub fn open(key: &[u8; 32], aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, AtRestError> {
    if sealed.len() < 24 + TAG {
        return Err(AtRestError::Inauthentic("the ciphertext is too short".into()));
    }
    XChaCha20Poly1305::new(&(*key).into())
        .decrypt(&XNonce::try_from(&sealed[..24]).expect("24 bytes"), Payload { msg: &sealed[24..], aad })
        .map_err(|_| AtRestError::Inauthentic("the ciphertext does not open with this key in this place".into()))
}

fn chunk_aad(name: &str, size: u64, offset: u64, len: u32, last: bool) -> Vec<u8> {
    let mut a = Vec::with_capacity(name.len() + 32);
    a.extend_from_slice(MAGIC);
    a.extend_from_slice(name.as_bytes());
    a.push(0);
    a.extend_from_slice(&size.to_le_bytes());
    a.extend_from_slice(&offset.to_le_bytes());
    a.extend_from_slice(&len.to_le_bytes());
    a.push(u8::from(last));
    a
}

fn chunk_nonce(prefix: &[u8], index: u64) -> XNonce {
    let mut n = [0u8; 24];
    n[..16].copy_from_slice(prefix);
    n[16..].copy_from_slice(&index.to_le_bytes());
    n.into()
}

/// The data regions of `f` (offset, length), in order.
fn data_regions(f: &std::fs::File, size: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        // SAFETY: lseek on an open descriptor; no memory is involved.
        let data = unsafe { libc::lseek(f.as_raw_fd(), pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: only a hole remains
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
        let end = (hole.max(data) as u64).min(size);
        if end > data as u64 {
            out.push((data as u64, end - data as u64));
        }
        pos = end.max(pos + 1);
    }
    out
}

/// Encrypts `src` (plain) into `dst` under `key`, bound to `name` (the plain file's
/// name), and fsyncs `dst`. Holes of `src` stay holes.
///
/// # Errors
///
/// Reading or writing.
pub fn encrypt_file(key: &[u8; 32], name: &str, src: &Path, dst: &Path) -> Result<u64, AtRestError> {
    let mut f = std::fs::File::open(src).map_err(io(format!("open {}", src.display())))?;
    let size = f.metadata().map_err(io("stat"))?.len();
    let mut out =
        std::io::BufWriter::with_capacity(CHUNK + 64, std::fs::File::create(dst).map_err(io(format!("create {}", dst.display())))?);
    let prefix = random(16);
    out.write_all(MAGIC).and_then(|_| out.write_all(&prefix)).and_then(|_| out.write_all(&size.to_le_bytes())).map_err(io("write"))?;
    let aead = XChaCha20Poly1305::new(&(*key).into());
    let mut chunks: Vec<(u64, usize)> = Vec::new();
    for (off, len) in data_regions(&f, size) {
        let mut o = off;
        while o < off + len {
            let n = ((off + len - o) as usize).min(CHUNK);
            chunks.push((o, n));
            o += n as u64;
        }
    }
    if chunks.is_empty() {
        chunks.push((0, 0));
    }
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    let count = chunks.len();
    for (i, (off, n)) in chunks.into_iter().enumerate() {
        let last = i + 1 == count;
        f.seek(SeekFrom::Start(off)).map_err(io("seek"))?;
        f.read_exact(&mut buf[..n]).map_err(io(format!("read {}", src.display())))?;
        let aad = chunk_aad(name, size, off, n as u32, last);
        let ct = aead
            .encrypt(&chunk_nonce(&prefix, i as u64), Payload { msg: &buf[..n], aad: &aad })
            .expect("a chunk is far below XChaCha20's message limit");
        out.write_all(&off.to_le_bytes())
            .and_then(|_| out.write_all(&(n as u32).to_le_bytes()))
            .and_then(|_| out.write_all(&[u8::from(last)]))
            .and_then(|_| out.write_all(&ct))
            .map_err(io("write"))?;
        written += ct.len() as u64 + 13;
    }
    buf.fill(0);
    let file = out.into_inner().map_err(|e| AtRestError::Io { what: "write".into(), source: e.into_error() })?;
    file.sync_all().map_err(io("fsync"))?;
    Ok(written)
}

/// Decrypts `src` (made by [`encrypt_file`] for `name`) into `dst`, at the chunks'
/// offsets (holes stay holes), and fsyncs `dst`; the bytes of data written.
///
/// # Errors
///
/// [`AtRestError::Inauthentic`] for another key or name, a truncated or altered file;
/// reading or writing.
pub fn decrypt_file(key: &[u8; 32], name: &str, src: &Path, dst: &Path) -> Result<u64, AtRestError> {
    let bad = |why: &str| AtRestError::Inauthentic(format!("{} does not decrypt: {why}", src.display()));
    let mut f = std::io::BufReader::with_capacity(CHUNK + 64, std::fs::File::open(src).map_err(io(format!("open {}", src.display())))?);
    let mut head = [0u8; 32];
    f.read_exact(&mut head).map_err(|_| bad("no header"))?;
    if &head[..8] != MAGIC {
        return Err(bad("not an encrypted file"));
    }
    let prefix = head[8..24].to_vec();
    let size = u64::from_le_bytes(head[24..32].try_into().expect("8 bytes"));
    let mut out = std::fs::File::create(dst).map_err(io(format!("create {}", dst.display())))?;
    out.set_len(size).map_err(io("size"))?;
    let aead = XChaCha20Poly1305::new(&(*key).into());
    let mut ct = vec![0u8; CHUNK + TAG];
    let mut index = 0u64;
    let mut next = 0u64;
    let mut written = 0u64;
    loop {
        let mut rec = [0u8; 13];
        f.read_exact(&mut rec).map_err(|_| bad("truncated"))?;
        let off = u64::from_le_bytes(rec[..8].try_into().expect("8 bytes"));
        let n = u32::from_le_bytes(rec[8..12].try_into().expect("4 bytes"));
        let last = rec[12] == 1;
        if n as usize > CHUNK || off < next || off.saturating_add(u64::from(n)) > size {
            return Err(bad("a chunk is out of place"));
        }
        let len = n as usize + TAG;
        f.read_exact(&mut ct[..len]).map_err(|_| bad("truncated"))?;
        let aad = chunk_aad(name, size, off, n, last);
        let mut plain = aead
            .decrypt(&chunk_nonce(&prefix, index), Payload { msg: &ct[..len], aad: &aad })
            .map_err(|_| bad("a chunk is not authentic"))?;
        out.seek(SeekFrom::Start(off)).map_err(io("seek"))?;
        out.write_all(&plain).map_err(io(format!("write {}", dst.display())))?;
        plain.fill(0);
        written += u64::from(n);
        next = off + u64::from(n);
        index += 1;
        if last {
            break;
        }
    }
    if f.read(&mut [0u8; 1]).map_err(io("read"))? != 0 {
        return Err(bad("bytes after the last chunk"));
    }
    out.sync_all().map_err(io("fsync"))?;
    Ok(written)
}

/// fsync of a directory (renames and removals in it durable).
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_open_only_with_their_key_and_place() {
        let k = [1u8; 32];
        let s = seal(&k, b"acct/arn/v1", b"hunter2");
        assert!(!s.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(open(&k, b"acct/arn/v1", &s).unwrap(), b"hunter2");
        assert!(open(&k, b"acct/arn/v2", &s).is_err(), "moved to another version");
        assert!(open(&[2u8; 32], b"acct/arn/v1", &s).is_err(), "another key");
        assert!(open(&k, b"acct/arn/v1", &s[..10]).is_err());
    }

    #[test]
    fn sparse_files_round_trip_keep_holes_and_refuse_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let (p, e, d) = (dir.path().join("state"), dir.path().join("state.enc"), dir.path().join("state.out"));
        let size = 64u64 << 20;
        {
            let mut f = std::fs::File::create(&p).unwrap();
            f.set_len(size).unwrap();
            f.seek(SeekFrom::Start(4096)).unwrap();
            f.write_all(b"MARKER-secret-value").unwrap();
            f.seek(SeekFrom::Start(40 << 20)).unwrap();
            f.write_all(&vec![7u8; 3 << 20]).unwrap();
        }
        let k = [9u8; 32];
        let written = encrypt_file(&k, "state", &p, &e).unwrap();
        assert!(written < 8 << 20, "holes are not written: {written}");
        let enc = std::fs::read(&e).unwrap();
        assert!(!enc.windows(6).any(|w| w == b"MARKER"));
        decrypt_file(&k, "state", &e, &d).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), std::fs::read(&d).unwrap());
        let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&d).unwrap()) * 512;
        assert!(blocks < 16 << 20, "the decrypted file stays sparse: {blocks}");
        // Another name, another key, a flipped byte, a truncation: refused.
        assert!(decrypt_file(&k, "disk.qcow2", &e, &d).is_err());
        assert!(decrypt_file(&[8u8; 32], "state", &e, &d).is_err());
        let mut bad = enc.clone();
        let n = bad.len() - 5;
        bad[n] ^= 1;
        std::fs::write(&e, &bad).unwrap();
        assert!(decrypt_file(&k, "state", &e, &d).is_err());
        std::fs::write(&e, &enc[..enc.len() - 100]).unwrap();
        assert!(decrypt_file(&k, "state", &e, &d).is_err());
        // An empty file too.
        std::fs::write(&p, b"").unwrap();
        encrypt_file(&k, "state", &p, &e).unwrap();
        decrypt_file(&k, "state", &e, &d).unwrap();
        assert_eq!(std::fs::metadata(&d).unwrap().len(), 0);
    }
}
