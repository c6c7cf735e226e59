//! Growing the root filesystem to fill its disk.
//!
//! The host makes a disk larger than the filesystem on it when an image asks for a bigger
//! root disk (the image tag `hearth:disk-size-gib`): it grows the qcow2 overlay's virtual
//! size, which cannot touch the filesystem inside. At boot the agent compares the ext4
//! superblock's block count with the disk's size and, when the disk is larger, grows the
//! mounted filesystem online (`EXT4_IOC_RESIZE_FS`, what `resize2fs` does on a mounted
//! filesystem), so no tool is needed in the guest. A disk the filesystem already fills
//! costs one 1 KiB read.

use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;

/// ext4's superblock magic.
const EXT4_MAGIC: u16 = 0xEF53;
/// `INCOMPAT_64BIT`: the block count's high 32 bits are valid.
const INCOMPAT_64BIT: u32 = 0x80;
/// Growth below this is not worth a resize (a disk's tail that is not a whole group).
const MIN_GROWTH: u64 = 32 << 20;

// EXT4_IOC_RESIZE_FS = _IOW('f', 16, __u64): the new block count.
nix::ioctl_write_ptr!(ext4_resize_fs, b'f', 16, u64);

/// An ext4 superblock's geometry: block size and block count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes per block.
    pub block_size: u64,
    /// Blocks in the filesystem.
    pub blocks: u64,
}

/// Reads the geometry from the 1 KiB superblock at offset 1024 of an ext4 disk, or `None`
/// when it is not ext4 (or is nonsense: the disk is the tenant's, not trusted).
pub fn geometry(sb: &[u8; 1024]) -> Option<Geometry> {
    let u16_at = |o: usize| u16::from_le_bytes([sb[o], sb[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]);
    if u16_at(0x38) != EXT4_MAGIC {
        return None;
    }
    let log = u32_at(0x18);
    if log > 6 {
        return None;
    }
    let mut blocks = u64::from(u32_at(0x04));
    if u32_at(0x60) & INCOMPAT_64BIT != 0 {
        blocks |= u64::from(u32_at(0x150)) << 32;
    }
    Some(Geometry { block_size: 1024 << log, blocks })
}

/// The block count the filesystem should have on a disk of `disk_bytes`, when that is a
/// worthwhile growth.
pub fn grown_blocks(g: Geometry, disk_bytes: u64) -> Option<u64> {
    let fits = disk_bytes / g.block_size;
    (fits.saturating_sub(g.blocks) * g.block_size >= MIN_GROWTH).then_some(fits)
}

/// Reads `device`'s superblock and size before it is mounted: the block count to grow the
/// filesystem to once mounted, if the disk is larger than it.
pub fn plan(device: &str) -> Option<u64> {
    let mut f = std::fs::File::open(device).ok()?;
    let size = f.seek(SeekFrom::End(0)).ok()?;
    f.seek(SeekFrom::Start(1024)).ok()?;
    let mut sb = [0u8; 1024];
    f.read_exact(&mut sb).ok()?;
    grown_blocks(geometry(&sb)?, size)
}

/// Grows the ext4 filesystem mounted at `mountpoint` to `blocks` blocks.
pub fn grow(mountpoint: &str, blocks: u64) -> std::io::Result<()> {
    let dir = std::fs::File::open(mountpoint)?;
    // SAFETY: the fd is open for the call's duration and `blocks` outlives it; the kernel
    // only reads the u64 the pointer names.
    unsafe { ext4_resize_fs(dir.as_raw_fd(), &blocks) }.map_err(std::io::Error::from)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb(log: u32, lo: u32, hi: u32, incompat: u32) -> [u8; 1024] {
        let mut b = [0u8; 1024];
        b[0x38..0x3a].copy_from_slice(&EXT4_MAGIC.to_le_bytes());
        b[0x18..0x1c].copy_from_slice(&log.to_le_bytes());
        b[0x04..0x08].copy_from_slice(&lo.to_le_bytes());
        b[0x150..0x154].copy_from_slice(&hi.to_le_bytes());
        b[0x60..0x64].copy_from_slice(&incompat.to_le_bytes());
        b
    }

    #[test]
    fn reads_the_geometry_and_plans_growth() {
        // 8 GiB of 4 KiB blocks on a 16 GiB disk: grow to 16 GiB.
        let g = geometry(&sb(2, 2 << 20, 0, INCOMPAT_64BIT)).unwrap();
        assert_eq!(g, Geometry { block_size: 4096, blocks: 2 << 20 });
        assert_eq!(grown_blocks(g, 16 << 30), Some(4 << 20));
        // Filled already, or less than a worthwhile tail: nothing to do; never shrink.
        assert_eq!(grown_blocks(g, 8 << 30), None);
        assert_eq!(grown_blocks(g, (8 << 30) + (1 << 20)), None);
        assert_eq!(grown_blocks(g, 4 << 30), None);
        // The high word counts only with the 64bit feature.
        assert_eq!(geometry(&sb(2, 1, 1, INCOMPAT_64BIT)).unwrap().blocks, (1 << 32) + 1);
        assert_eq!(geometry(&sb(2, 1, 1, 0)).unwrap().blocks, 1);
    }

    #[test]
    fn refuses_what_is_not_ext4() {
        assert_eq!(geometry(&[0u8; 1024]), None);
        assert_eq!(geometry(&sb(40, 1, 0, 0)), None, "a block size shift past 64 KiB");
    }
}
