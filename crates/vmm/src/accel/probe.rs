//! The timing stage: the same loop run by a tiny guest through the KVM API and by the
//! host itself (a real-mode guest on x86-64; on ARM64 an EL1 guest with the MMU off, only
//! type-checked so far, see `guest`).
//!
//! Hardware virtualization runs guest instructions at the host's speed, so the two take
//! about as long (plus tens of µs to create the VM and enter it). A `/dev/kvm` that
//! emulates (nested without VMX, PVM) needs 38–84 ms for the loop on the hosts we have
//! seen; the host runs it in ~30 µs.

use std::time::{Duration, Instant};

/// Iterations of the probe loop (`dec ecx; jnz`): ~200k instructions.
pub const ITERATIONS: u32 = 100_000;

/// How long the guest and the host took for the same loop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    /// The guest under KVM (fastest of the runs).
    pub kvm: Duration,
    /// The host (fastest of the runs).
    pub host: Duration,
}

/// Runs the loop on the host: the same two instructions as the guest's.
pub fn host_loop() -> Duration {
    (0..5).map(|_| host_loop_once()).min().unwrap_or_default()
}

fn host_loop_once() -> Duration {
    let start = Instant::now();
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the assembly only decrements a register it owns until zero; it touches no
    // memory and no stack.
    unsafe {
        std::arch::asm!("2:", "dec {n:e}", "jnz 2b", n = inout(reg) ITERATIONS => _, options(nomem, nostack));
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: as above (the ARM64 guest's `subs; b.ne` loop).
    unsafe {
        std::arch::asm!("2:", "subs {n:w}, {n:w}, #1", "b.ne 2b", n = inout(reg) ITERATIONS => _, options(nomem, nostack));
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let mut n = std::hint::black_box(ITERATIONS);
        while n != 0 {
            n = std::hint::black_box(n - 1);
        }
    }
    start.elapsed()
}

/// Runs the probe guest up to `runs` times, stopping at the first run within `good`;
/// returns the fastest time.
pub fn kvm_loop(runs: u32, good: Duration) -> Result<Duration, String> {
    let mut best: Option<Duration> = None;
    for _ in 0..runs.max(1) {
        let t = run_guest()?;
        best = Some(best.map_or(t, |b| b.min(t)));
        if t <= good {
            break;
        }
    }
    Ok(best.expect("at least one run"))
}

/// The probe guest of this architecture: where its code goes, the code, and how its
/// vCPU is started and known to have finished.
#[cfg(target_arch = "x86_64")]
mod guest {
    use super::ITERATIONS;
    use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};

    pub const MEM_SIZE: usize = 0x1000;
    pub const GUEST_ADDR: u64 = 0x1000;

    /// `mov ecx, N ; l: dec ecx ; jnz l ; hlt` (16-bit real mode, operand-size prefixes).
    pub fn code() -> Vec<u8> {
        let n = ITERATIONS.to_le_bytes();
        vec![0x66, 0xb9, n[0], n[1], n[2], n[3], 0x66, 0x49, 0x75, 0xfc, 0xf4]
    }

    /// Points the vCPU at the code in real mode.
    pub fn start(_vm: &VmFd, vcpu: &VcpuFd) -> Result<(), String> {
        let mut sregs = vcpu.get_sregs().map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
        let regs = kvm_bindings::kvm_regs { rip: GUEST_ADDR, rflags: 2, ..Default::default() };
        vcpu.set_regs(&regs).map_err(|e| format!("KVM_SET_REGS: {e}"))
    }

    /// True for the exit that ends the loop (`hlt`).
    pub fn finished(exit: &VcpuExit) -> bool {
        matches!(exit, VcpuExit::Hlt)
    }
}

/// The ARM64 probe guest: the same loop (`subs w0, w0, #1 ; b.ne`), ended by a store to
/// an address no memory slot covers, which KVM hands back as an MMIO exit (the pattern of
/// kvm-ioctls' own `test_run_code` for aarch64). Only type-checked here: the project has
/// no ARM64 host with KVM (docs/ARCHITECTURE.md "ARM64 guests").
#[cfg(target_arch = "aarch64")]
mod guest {
    use super::ITERATIONS;
    use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};

    /// 64 KiB, so the slot is page-aligned on hosts with 64 KiB pages too.
    pub const MEM_SIZE: usize = 0x10000;
    pub const GUEST_ADDR: u64 = 0x10000;
    /// Just past the slot: a store there exits to the host.
    const MMIO_ADDR: u64 = GUEST_ADDR + MEM_SIZE as u64;
    /// `KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE`: core register `i` (as 32-bit
    /// words of `struct kvm_regs`) is this plus `i`; x0..x30 then sp then pc, 2 words each.
    const CORE_REG_BASE: u64 = 0x6030_0000_0010_0000;
    const REG_X9: u64 = CORE_REG_BASE + 2 * 9;
    const REG_PC: u64 = CORE_REG_BASE + 2 * 32;

    /// `movz w0, #lo ; movk w0, #hi, lsl 16 ; l: subs w0, w0, #1 ; b.ne l ; str w0, [x9] ; b .`
    pub fn code() -> Vec<u8> {
        let lo = ITERATIONS & 0xffff;
        let hi = ITERATIONS >> 16;
        [
            0x5280_0000 | (lo << 5), // movz w0, #lo
            0x72a0_0000 | (hi << 5), // movk w0, #hi, lsl #16
            0x7100_0400,             // subs w0, w0, #1
            0x54ff_ffe1,             // b.ne (back one instruction)
            0xb900_0120,             // str w0, [x9]
            0x1400_0000,             // b . (never reached: the store exits)
        ]
        .iter()
        .flat_map(|i: &u32| i.to_le_bytes())
        .collect()
    }

    /// Initializes the vCPU as the host's preferred target (reset state: EL1, MMU off,
    /// interrupts masked) and points it at the code.
    pub fn start(vm: &VmFd, vcpu: &VcpuFd) -> Result<(), String> {
        let mut kvi = kvm_bindings::kvm_vcpu_init::default();
        vm.get_preferred_target(&mut kvi).map_err(|e| format!("KVM_ARM_PREFERRED_TARGET: {e}"))?;
        vcpu.vcpu_init(&kvi).map_err(|e| format!("KVM_ARM_VCPU_INIT: {e}"))?;
        vcpu.set_one_reg(REG_PC, &GUEST_ADDR.to_le_bytes()).map_err(|e| format!("KVM_SET_ONE_REG (pc): {e}"))?;
        vcpu.set_one_reg(REG_X9, &MMIO_ADDR.to_le_bytes()).map_err(|e| format!("KVM_SET_ONE_REG (x9): {e}"))?;
        Ok(())
    }

    /// True for the exit that ends the loop (the store past the slot).
    pub fn finished(exit: &VcpuExit) -> bool {
        matches!(exit, VcpuExit::MmioWrite(addr, _) if *addr == MMIO_ADDR)
    }
}

/// Other architectures have no probe guest: `auto` keeps to TCG there.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn run_guest() -> Result<Duration, String> {
    Err(format!("KVM is unverified on {}: Hearth has no KVM probe for it, so `auto` uses TCG", std::env::consts::ARCH))
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn run_guest() -> Result<Duration, String> {
    use guest::{GUEST_ADDR, MEM_SIZE};
    use kvm_ioctls::{Kvm, VcpuExit};
    let code = guest::code();
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
    guest::start(&vm, &vcpu)?;

    let start = Instant::now();
    loop {
        match vcpu.run().map_err(|e| format!("KVM_RUN: {e}"))? {
            exit if guest::finished(&exit) => return Ok(start.elapsed()),
            VcpuExit::Intr => continue,
            other => return Err(format!("probe guest stopped unexpectedly: {other:?}")),
        }
    }
}
