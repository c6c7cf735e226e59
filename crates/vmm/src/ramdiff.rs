//! Suspend images that hold only what changed since the template: the `mapped-ram` state
//! file cut down to the guest's pages that differ from the RAM file the VM maps.
//!
//! A VM launched from a template maps the template's `memory` file private copy-on-write
//! ([`crate::config::Memory::Template`]): a page the guest never wrote is still the file's
//! page, a page it wrote is an anonymous copy. `/proc/<pid>/pagemap` tells the two apart
//! (bit 61, "file page"). QEMU 10 cannot leave a private RAM block out of a migration
//! (`x-ignore-shared` skips only shared file-backed RAM), so a suspend still lets QEMU
//! write every non-zero page into the state file (into the page cache), and then [`trim`]
//! rewrites it without the pages the guest did not change, clearing their bits in the
//! `mapped-ram` bitmap: the image keeps O(changed) blocks, and the dropped pages never
//! reach the disk. A resume maps the same base
//! file private again and loads the state: QEMU reads only the pages left in the bitmap,
//! and the rest come from the base file's page cache when the guest touches them.
//!
//! `mapped-ram` writes no zero page (its bit stays clear: "the destination's RAM is
//! zero"), which is false over a base file; [`trim`] sets the bit of every changed page,
//! and one QEMU did not write is a hole in the new file, which reads as zeros.
//!
//! The `mapped-ram` header (QEMU `migration/ram.c`, version 1) is found by its own
//! consistency: it follows the block's `be64 used_length` in the RAM section's block list
//! and reads `be32 version, be64 page_size, be64 bitmap_offset, be64 pages_offset`, where
//! the bitmap follows the header and the pages start at the next 1 MiB boundary after a
//! bitmap of one bit per page in 64-bit words ([`find_header`]).

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

/// Guest page size of the layouts Hearth writes (x86-64).
pub const PAGE: u64 = 4096;
/// How far into a state file the RAM block's header is looked for: QEMU orders RAM blocks
/// largest first, so guest RAM comes right after the stream's preamble (~100 bytes).
const HEADER_SEARCH: u64 = 1 << 20;
const HEADER_LEN: u64 = 28;
const PAGES_ALIGN: u64 = 1 << 20;

/// Where a RAM block's bitmap and pages are in a `mapped-ram` state file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappedRam {
    /// File offset of the bitmap (one bit per page, 64-bit little-endian words).
    pub bitmap_offset: u64,
    /// File offset of page 0.
    pub pages_offset: u64,
    /// Pages in the block.
    pub pages: u64,
}

impl MappedRam {
    fn bitmap_len(pages: u64) -> u64 {
        pages.div_ceil(64) * 8
    }
}

/// What [`trim`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrimStats {
    /// Pages left in the image (changed since the base).
    pub kept: u64,
    /// Pages QEMU wrote that the base already holds, taken out.
    pub dropped: u64,
}

/// Why a state file could not be trimmed (the caller then keeps the whole image).
#[derive(Debug, thiserror::Error)]
pub enum TrimError {
    /// The RAM block's `mapped-ram` header is not where it was looked for.
    #[error("no mapped-ram header for {pages} pages in the first MiB of the state file")]
    NoHeader {
        /// Pages of the block looked for.
        pages: u64,
    },
    /// No mapping of the base file in QEMU's address space.
    #[error("QEMU (pid {pid}) does not map the RAM file")]
    NoMapping {
        /// QEMU's pid.
        pid: u32,
    },
    /// Reading or writing failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> TrimError + '_ {
    move |source| TrimError::Io { what: what.to_owned(), source }
}

/// Finds the `mapped-ram` header of the block of `ram_size` bytes in `state`.
pub fn find_header(state: &File, ram_size: u64) -> Result<MappedRam, TrimError> {
    let pages = ram_size / PAGE;
    let mut head = vec![0u8; HEADER_SEARCH.min(state.metadata().map_err(io("stat the state file"))?.len()) as usize];
    state.read_exact_at(&mut head, 0).map_err(io("read the state file's header"))?;
    let be64 = |b: &[u8]| u64::from_be_bytes(b.try_into().expect("8 bytes"));
    for p in 8..head.len().saturating_sub(HEADER_LEN as usize) {
        let h = &head[p..p + HEADER_LEN as usize];
        if h[..4] != 1u32.to_be_bytes() || be64(&h[4..12]) != PAGE || be64(&head[p - 8..p]) != ram_size {
            continue;
        }
        let (bitmap_offset, pages_offset) = (be64(&h[12..20]), be64(&h[20..28]));
        if bitmap_offset == p as u64 + HEADER_LEN
            && pages_offset == (bitmap_offset + MappedRam::bitmap_len(pages)).next_multiple_of(PAGES_ALIGN)
        {
            return Ok(MappedRam { bitmap_offset, pages_offset, pages });
        }
    }
    Err(TrimError::NoHeader { pages })
}

/// pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;

/// True when a pagemap entry of a private file mapping is a page the process changed:
/// an anonymous copy, in memory or swapped out. A page not present, or present as the
/// file's own page, still holds the file's bytes.
pub fn entry_changed(entry: u64) -> bool {
    entry & PM_SWAPPED != 0 || (entry & PM_PRESENT != 0 && entry & PM_FILE == 0)
}

/// One bit per page of the base file: set where process `pid`'s private mapping of
/// `base` holds a page that differs from the file (see [`entry_changed`]).
pub fn changed_pages(pid: u32, base: &Path, ram_size: u64) -> Result<Vec<u64>, TrimError> {
    let inode = std::fs::metadata(base).map_err(io("stat the RAM file"))?.ino();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(io("read QEMU's memory map"))?;
    let pages = ram_size / PAGE;
    let mut bits = vec![0u64; pages.div_ceil(64) as usize];
    let pagemap = File::open(format!("/proc/{pid}/pagemap")).map_err(io("open QEMU's pagemap"))?;
    let mut found = false;
    let mut buf = vec![0u8; 8 << 16];
    for (start, end, offset) in maps.lines().filter_map(|l| mapping_of(l, inode)) {
        found = true;
        let first = offset / PAGE;
        let count = ((end - start) / PAGE).min(pages.saturating_sub(first));
        let mut done = 0u64;
        while done < count {
            let n = (count - done).min(buf.len() as u64 / 8);
            let bytes = &mut buf[..(n * 8) as usize];
            pagemap.read_exact_at(bytes, (start / PAGE + done) * 8).map_err(io("read QEMU's pagemap"))?;
            for (i, e) in bytes.chunks_exact(8).enumerate() {
                if entry_changed(u64::from_le_bytes(e.try_into().expect("8 bytes"))) {
                    let page = first + done + i as u64;
                    bits[(page / 64) as usize] |= 1 << (page % 64);
                }
            }
            done += n;
        }
    }
    if !found {
        return Err(TrimError::NoMapping { pid });
    }
    Ok(bits)
}

/// `(start, end, file offset)` of a `/proc/<pid>/maps` line that maps inode `inode`.
fn mapping_of(line: &str, inode: u64) -> Option<(u64, u64, u64)> {
    let mut w = line.split_whitespace();
    let (start, end) = w.next()?.split_once('-')?;
    let _perms = w.next()?;
    let offset = u64::from_str_radix(w.next()?, 16).ok()?;
    let _dev = w.next()?;
    if w.next()?.parse::<u64>().ok()? != inode {
        return None;
    }
    Some((u64::from_str_radix(start, 16).ok()?, u64::from_str_radix(end, 16).ok()?, offset))
}

/// The new bitmap of an image whose pages `changed` differ from the base, and the runs of
/// pages (`first`, `count`) to copy from QEMU's image: changed pages QEMU wrote. A changed
/// page QEMU did not write is a zero page: its bit is set and its place left a hole.
pub fn plan(written: &[u64], changed: &[u64], pages: u64) -> (Vec<u64>, Vec<(u64, u64)>, TrimStats) {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut stats = TrimStats::default();
    let bit = |v: &[u64], p: u64| v.get((p / 64) as usize).is_some_and(|w| w >> (p % 64) & 1 == 1);
    for p in 0..pages {
        let (w, c) = (bit(written, p), bit(changed, p));
        if c {
            stats.kept += 1;
        } else if w {
            stats.dropped += 1;
        }
        if w && c {
            match runs.last_mut() {
                Some((first, count)) if *first + *count == p => *count += 1,
                _ => runs.push((p, 1)),
            }
        }
    }
    let mut bitmap = changed.to_vec();
    bitmap.resize(pages.div_ceil(64) as usize, 0);
    (bitmap, runs, stats)
}

/// The name of the trimmed image while it is written (beside the state file); a crash
/// leaves it to [`crate::recover`], which removes it with the other partial files.
pub const TRIM_SUFFIX: &str = ".trim";

/// Cuts the `mapped-ram` image `state` (RAM of `ram_size` bytes) down to the pages of
/// QEMU `pid`'s RAM that differ from `base`, the file that VM maps private. Call it with
/// the VM stopped and its state saved, before the file is synced.
///
/// The cut image is a new file (the stream's head, the new bitmap, the kept pages, the
/// device state after the pages) renamed over `state`: the pages QEMU wrote that are not
/// kept are dropped with the old file's page cache, never written back. (Punching them
/// out in place measured ~0.9 s for 63 MiB here: ext4 writes a dirty range back before
/// it punches it.)
pub fn trim(state: &Path, pid: u32, base: &Path, ram_size: u64) -> Result<TrimStats, TrimError> {
    let changed = changed_pages(pid, base, ram_size)?;
    let src = File::open(state).map_err(io("open the state file"))?;
    let layout = find_header(&src, ram_size)?;
    let len = src.metadata().map_err(io("stat the state file"))?.len();
    let pages_end = layout.pages_offset + layout.pages * PAGE;
    if len < pages_end {
        return Err(TrimError::NoHeader { pages: layout.pages });
    }
    let mut raw = vec![0u8; MappedRam::bitmap_len(layout.pages) as usize];
    src.read_exact_at(&mut raw, layout.bitmap_offset).map_err(io("read the RAM bitmap"))?;
    let written: Vec<u64> = raw.chunks_exact(8).map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes"))).collect();
    let (bitmap, runs, stats) = plan(&written, &changed, layout.pages);

    let mut name = state.file_name().unwrap_or_default().to_os_string();
    name.push(TRIM_SUFFIX);
    let out_path = state.with_file_name(name);
    let out = File::create(&out_path).map_err(io("create the trimmed state file"))?;
    let written = (|| {
        let mut buf = vec![0u8; 1 << 20];
        copy_range(&src, &out, 0, layout.pages_offset, &mut buf)?;
        let raw: Vec<u8> = bitmap.iter().flat_map(|w| w.to_le_bytes()).collect();
        out.write_all_at(&raw, layout.bitmap_offset)?;
        for (first, count) in runs {
            copy_range(&src, &out, layout.pages_offset + first * PAGE, count * PAGE, &mut buf)?;
        }
        copy_range(&src, &out, pages_end, len - pages_end, &mut buf)?;
        out.set_len(len)?;
        std::fs::rename(&out_path, state)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&out_path);
        return Err(TrimError::Io { what: "write the trimmed state file".into(), source: e });
    }
    // QEMU's file is unlinked now; closing its last descriptor drops its page cache, which
    // for gigabytes is slow (with it on the path, trimming a 2.2 GB image took 0.6-1.8 s
    // here): off the path.
    std::thread::spawn(move || drop(src));
    Ok(stats)
}

/// Copies `len` bytes at `offset` of `from` to the same offset of `to` (a new file, all
/// holes), through `buf`; chunks of zeros are left as holes. (`copy_file_range` measured
/// slower here: ~0.9 s instead of ~45 ms for an image with nothing changed, the source's
/// page cache being dirty.) The holes matter on ARM64's `virt`, whose two 64 MiB flash
/// devices are RAM blocks after guest RAM in every image, all zero: written densely they
/// made every suspended ARM64 VM 128 MiB bigger.
fn copy_range(from: &File, to: &File, offset: u64, len: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        from.read_exact_at(&mut buf[..n], offset + done)?;
        if buf[..n].iter().any(|b| *b != 0) {
            to.write_all_at(&buf[..n], offset + done)?;
        }
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// Writes a block's length and a consistent header for its `pages` pages at offset
    /// `p` of `buf`.
    fn put_header(buf: &mut Vec<u8>, p: u64, pages: u64) {
        let bitmap_offset = p + HEADER_LEN;
        let pages_offset = (bitmap_offset + MappedRam::bitmap_len(pages)).next_multiple_of(PAGES_ALIGN);
        let h: Vec<u8> = [
            &(pages * PAGE).to_be_bytes()[..],
            &1u32.to_be_bytes(),
            &PAGE.to_be_bytes(),
            &bitmap_offset.to_be_bytes(),
            &pages_offset.to_be_bytes(),
        ]
        .concat();
        buf.resize(buf.len().max((p + HEADER_LEN) as usize), 0);
        buf[p as usize - 8..(p + HEADER_LEN) as usize].copy_from_slice(&h);
    }

    #[test]
    fn the_header_is_found_by_its_consistency_only() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("state");
        // A decoy with the right magic but another size first, then the real block.
        let mut bytes = Vec::new();
        put_header(&mut bytes, 40, 16);
        put_header(&mut bytes, 40 + HEADER_LEN + 16, 1 << 17);
        bytes.resize(4096, 0);
        std::fs::write(&path, &bytes).unwrap();
        let f = File::open(&path).unwrap();
        let m = find_header(&f, 512 << 20).unwrap();
        assert_eq!(m.bitmap_offset, 40 + HEADER_LEN + 16 + HEADER_LEN);
        assert_eq!(m.pages, 1 << 17);
        assert_eq!(m.pages_offset, 1 << 20);
        assert!(matches!(find_header(&f, 1 << 30), Err(TrimError::NoHeader { .. })));
    }

    #[test]
    fn the_plan_keeps_changed_pages_and_zeroes_unwritten_ones() {
        // Written by QEMU: pages 0-3 and 10. Changed since the base: 2, 3 and 7 (7 is a
        // zero page QEMU did not write).
        let written = vec![0b100_0000_1111u64];
        let changed = vec![0b000_1000_1100u64];
        let (bitmap, runs, stats) = plan(&written, &changed, 12);
        assert_eq!(bitmap, changed);
        assert_eq!(runs, vec![(2, 2)]);
        assert_eq!(stats, TrimStats { kept: 3, dropped: 3 });
    }

    #[test]
    fn pagemap_tells_written_pages_of_a_private_file_mapping() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("base");
        std::fs::write(&path, vec![7u8; 64 * 4096]).unwrap();
        let f = File::open(&path).unwrap();
        let len = 64 * 4096;
        // SAFETY: a fresh private mapping of an open file, unmapped below; nothing else
        // refers to it.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE, f.as_raw_fd(), 0) };
        assert_ne!(p, libc::MAP_FAILED);
        let bytes = p as *mut u8;
        // SAFETY: offsets within the mapping.
        unsafe {
            let _ = std::ptr::read_volatile(bytes.add(4096)); // read: still the file's page
            std::ptr::write_volatile(bytes.add(5 * 4096), 1); // written: a copy
            std::ptr::write_volatile(bytes.add(63 * 4096 + 10), 0);
        }
        let bits = changed_pages(std::process::id(), &path, len as u64).unwrap();
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(p, len) };
        assert_eq!(bits, vec![(1 << 5) | (1 << 63)]);
        assert!(matches!(changed_pages(std::process::id(), &path, len as u64), Err(TrimError::NoMapping { .. })));
    }

    #[test]
    fn trim_keeps_changed_pages_and_the_device_state() {
        let d = tempfile::tempdir().unwrap();
        let (pages, ram) = (64u64, 64 * PAGE as usize);
        let base = d.path().join("base");
        std::fs::write(&base, vec![7u8; ram]).unwrap();
        let f = File::open(&base).unwrap();
        // SAFETY: a fresh private mapping of an open file, unmapped below.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), ram, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE, f.as_raw_fd(), 0) };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: offsets within the mapping. Page 3 changed to 9s, page 9 zeroed.
        unsafe {
            std::ptr::write_bytes((p as *mut u8).add(3 * 4096), 9, 4096);
            std::ptr::write_bytes((p as *mut u8).add(9 * 4096), 0, 4096);
        }
        // What QEMU would write: every non-zero page (all but 9), then device state.
        let mut image = Vec::new();
        put_header(&mut image, 100, pages);
        let m = find_header_in(&image, pages);
        image.resize(m.pages_offset as usize + ram, 0);
        let mut written = 0u64;
        for page in (0..pages).filter(|&pg| pg != 9) {
            written |= 1 << page;
            let at = (m.pages_offset + page * PAGE) as usize;
            image[at..at + 4096].fill(if page == 3 { 9 } else { 7 });
        }
        image[m.bitmap_offset as usize..m.bitmap_offset as usize + 8].copy_from_slice(&written.to_le_bytes());
        image.extend(b"device state");
        let state = d.path().join("state");
        std::fs::write(&state, &image).unwrap();

        let stats = trim(&state, std::process::id(), &base, ram as u64).unwrap();
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(p, ram) };
        assert_eq!(stats, TrimStats { kept: 2, dropped: 62 });
        let out = std::fs::read(&state).unwrap();
        assert_eq!(out.len(), image.len());
        assert!(out.ends_with(b"device state"));
        let bitmap = u64::from_le_bytes(out[m.bitmap_offset as usize..m.bitmap_offset as usize + 8].try_into().unwrap());
        assert_eq!(bitmap, (1 << 3) | (1 << 9));
        let page = |n: u64| &out[(m.pages_offset + n * PAGE) as usize..(m.pages_offset + (n + 1) * PAGE) as usize];
        assert!(page(3).iter().all(|&b| b == 9) && page(9).iter().all(|&b| b == 0) && page(4).iter().all(|&b| b == 0));
        assert!(std::fs::metadata(&state).unwrap().blocks() * 512 < (m.pages_offset + 8 * PAGE), "dropped pages take no blocks");
    }

    fn find_header_in(image: &[u8], pages: u64) -> MappedRam {
        let d = tempfile::tempdir().unwrap();
        let mut bytes = image.to_vec();
        bytes.resize(bytes.len().max(4096), 0);
        std::fs::write(d.path().join("s"), &bytes).unwrap();
        find_header(&File::open(d.path().join("s")).unwrap(), pages * PAGE).unwrap()
    }

    #[test]
    fn entries() {
        assert!(!entry_changed(0), "not present: the file's bytes");
        assert!(!entry_changed(PM_PRESENT | PM_FILE));
        assert!(entry_changed(PM_PRESENT));
        assert!(entry_changed(PM_SWAPPED));
    }
}
