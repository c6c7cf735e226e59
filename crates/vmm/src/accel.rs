//! Choosing the accelerator.
//!
//! `/dev/kvm` existing does not mean KVM is usable: on some hosts it is there but every
//! guest instruction is emulated (~1 µs each), so a kernel never finishes booting. `auto`
//! therefore *measures*: it runs a tiny real-mode guest (a 100,000-iteration loop, then
//! `hlt`) through the KVM API and takes KVM only when that finishes in well under the time
//! an emulating host needs. The answer is cached for the life of the process.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Accelerator for guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Accel {
    /// Measure KVM; fall back to TCG.
    Auto,
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulation.
    Tcg,
}

impl std::str::FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            _ => Err(format!("unknown accelerator {s:?}; use auto, kvm or tcg")),
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// Result of measuring KVM.
#[derive(Debug, Clone)]
pub struct KvmProbe {
    /// Time the probe guest took, when it ran.
    pub elapsed: Option<Duration>,
    /// Why KVM is not used, when it is not.
    pub reason: Option<String>,
}

impl KvmProbe {
    /// True when KVM ran the probe fast enough to be real hardware virtualization.
    pub fn usable(&self) -> bool {
        self.reason.is_none()
    }
}

/// Iterations of the probe loop: ~200k instructions. Hardware runs them in well under a
/// millisecond; an emulating `/dev/kvm` needs ~0.2 s.
const PROBE_ITERATIONS: u32 = 100_000;
/// Slower than this is not hardware virtualization.
const PROBE_LIMIT: Duration = Duration::from_millis(50);

static PROBE: OnceLock<KvmProbe> = OnceLock::new();

/// Resolves `Auto` to `Kvm` or `Tcg` (measuring once per process); others pass through.
pub fn resolve(accel: Accel) -> Accel {
    match accel {
        Accel::Auto if probe_kvm().usable() => Accel::Kvm,
        Accel::Auto => Accel::Tcg,
        other => other,
    }
}

/// Measures KVM (cached).
pub fn probe_kvm() -> &'static KvmProbe {
    PROBE.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        // The probe runs in its own thread: on an emulating host it may take a while, and
        // we stop waiting long before it finishes.
        std::thread::spawn(move || {
            let _ = tx.send(run_probe());
        });
        match rx.recv_timeout(Duration::from_secs(2)) {
            Ok(Ok(elapsed)) if elapsed <= PROBE_LIMIT => KvmProbe { elapsed: Some(elapsed), reason: None },
            Ok(Ok(elapsed)) => KvmProbe {
                elapsed: Some(elapsed),
                reason: Some(format!(
                    "/dev/kvm ran a {PROBE_ITERATIONS}-iteration probe in {elapsed:?} (limit {PROBE_LIMIT:?}): it emulates instead of virtualizing"
                )),
            },
            Ok(Err(e)) => KvmProbe { elapsed: None, reason: Some(e) },
            Err(_) => KvmProbe { elapsed: None, reason: Some("KVM probe did not finish within 2 s".into()) },
        }
    })
}

fn run_probe() -> Result<Duration, String> {
    use kvm_ioctls::{Kvm, VcpuExit};
    const MEM_SIZE: usize = 0x1000;
    const GUEST_ADDR: u64 = 0x1000;
    // mov ecx, N ; l: dec ecx ; jnz l ; hlt   (16-bit real mode, operand-size prefixes)
    let n = PROBE_ITERATIONS.to_le_bytes();
    let code = [0x66, 0xb9, n[0], n[1], n[2], n[3], 0x66, 0x49, 0x75, 0xfc, 0xf4];

    // SAFETY: an anonymous private mapping with no address hint; the result is checked
    // against MAP_FAILED before use.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            MEM_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        return Err("mmap for the probe guest failed".into());
    }
    struct Unmap(*mut libc::c_void);
    impl Drop for Unmap {
        fn drop(&mut self) {
            // SAFETY: the pointer came from the successful mmap of MEM_SIZE bytes above
            // and is unmapped exactly once, after the VM using it is gone.
            unsafe { libc::munmap(self.0, MEM_SIZE) };
        }
    }
    // Declared before the VM so that it is dropped after it: the memory slot must never
    // point at unmapped memory.
    let _unmap = Unmap(mem);
    let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM failed: {e}"))?;
    // SAFETY: `mem` points to MEM_SIZE writable bytes and `code` is far shorter.
    unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), mem as *mut u8, code.len()) };

    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: GUEST_ADDR,
        memory_size: MEM_SIZE as u64,
        userspace_addr: mem as u64,
        flags: 0,
    };
    // SAFETY: the region describes the mapping above, which outlives `vm` (`_unmap` is
    // declared before `vm` and therefore dropped after it).
    unsafe { vm.set_user_memory_region(region) }.map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
    let mut vcpu = vm.create_vcpu(0).map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
    let mut sregs = vcpu.get_sregs().map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
    let regs = kvm_bindings::kvm_regs { rip: GUEST_ADDR, rflags: 2, ..Default::default() };
    vcpu.set_regs(&regs).map_err(|e| format!("KVM_SET_REGS: {e}"))?;

    let start = Instant::now();
    loop {
        match vcpu.run().map_err(|e| format!("KVM_RUN: {e}"))? {
            VcpuExit::Hlt => return Ok(start.elapsed()),
            VcpuExit::Intr => continue,
            other => return Err(format!("probe guest stopped unexpectedly: {other:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names() {
        assert_eq!("tcg".parse::<Accel>(), Ok(Accel::Tcg));
        assert!("xen".parse::<Accel>().is_err());
        assert_eq!(resolve(Accel::Tcg), Accel::Tcg);
    }
}
