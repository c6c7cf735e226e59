//! Stops the legacy PIT's channel 0, which nothing in the guest uses.
//!
//! QEMU resets the i8254 as a PC BIOS leaves it: channel 0 in mode 3 (square wave) with
//! the full count, 65,536 ticks of 1.193 MHz. Each edge of that square wave is a QEMU timer
//! on the host, 36 a second, every one a wake-up of QEMU's main loop (a `ppoll` over all of
//! its descriptors) for an interrupt the guest has masked: Linux here runs its clock on the
//! TSC and its tick on the local APIC timer, and this kernel (6.12) leaves the PIT running
//! when it does not use it. Traced on an idle VM under TCG (strace of its QEMU): the main
//! loop woke 84 times a second with the PIT running and 20 once the agent stopped it, and
//! QEMU's CPU fell from 0.6 % to 0.25 % of a core.
//!
//! Mode 0 (interrupt on terminal count) with a count written fires once and then holds its
//! output: QEMU has no next edge and deletes the timer. This is what later kernels do
//! (`clockevent_i8253_disable`). Templates are booted, so every clone of one made after
//! this change inherits the stopped PIT with the rest of the machine's state.

/// The PIT's mode/command register and channel 0's data port.
const PIT_MODE: u16 = 0x43;
const PIT_CH0: u16 = 0x40;
/// Channel 0, lobyte/hibyte access, mode 0, binary.
const CH0_MODE0: u8 = 0x30;

/// Stops channel 0 (x86-64 only; best effort: without the PIT or the privilege, nothing
/// changes and the guest works as before).
pub fn stop() {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: ioperm only changes this process's I/O permission bitmap.
        if unsafe { libc::ioperm(u64::from(PIT_CH0), 4, 1) } != 0 {
            return;
        }
        for (port, value) in [(PIT_MODE, CH0_MODE0), (PIT_CH0, 0), (PIT_CH0, 0)] {
            // SAFETY: ports 0x40-0x43 were granted above; they are the PIT's, which no
            // driver of this guest uses (its clock event device is the local APIC), so
            // reprogramming channel 0 affects nothing but that idle timer.
            unsafe { core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) };
        }
        // SAFETY: as above; dropping the permission again.
        unsafe { libc::ioperm(u64::from(PIT_CH0), 4, 0) };
    }
}
