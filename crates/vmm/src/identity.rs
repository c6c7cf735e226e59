//! What no two VMs may share: VM ids, and the fresh clock, entropy and identity a restored
//! guest takes (a snapshot's copies would otherwise all be the same machine). Randomness
//! comes from the OS only, failing closed.

use hearth_proto::binpath::BinPath;
use hearth_proto::RestoreInfo;

/// `N` bytes from the OS's random number generator (getrandom(2)).
///
/// # Panics
///
/// When the OS gives none: VM ids, hostnames, machine ids and a restored guest's fresh
/// entropy made from anything else would repeat, and no caller can go on without them.
pub(crate) fn os_random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    if let Err(e) = getrandom::fill(&mut b) {
        panic!("the OS random number generator failed ({e}); refusing to use predictable bytes");
    }
    b
}

/// `N` random bytes as lowercase hex.
pub(crate) fn random_hex<const N: usize>() -> String {
    os_random::<N>().iter().map(|x| format!("{x:02x}")).collect()
}

/// A new VM id, `vm-` and 12 hex digits: the run directory's name, QEMU's `-name`, the
/// network namespace's suffix.
pub(crate) fn random_vm_id() -> String {
    format!("vm-{}", random_hex::<6>())
}

/// The host's wall clock in nanoseconds since the epoch.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos() as i64
}

/// Fresh clock, entropy and identity for a restored VM.
pub fn fresh_identity(hostname: String) -> RestoreInfo {
    RestoreInfo {
        unix_time_ns: now_ns(),
        entropy: BinPath(os_random::<64>().to_vec()),
        hostname: Some(hostname),
        machine_id: Some(random_hex::<16>()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_ids_are_fresh_and_shaped_for_run_directories() {
        let (a, b) = (random_vm_id(), random_vm_id());
        assert_ne!(a, b);
        assert!(a.starts_with("vm-") && a.len() == 15 && a[3..].bytes().all(|c| c.is_ascii_hexdigit()), "{a}");
    }
}
