//! The boot canary: the guest kernel and initramfs booted under `-accel kvm`, watched on
//! the serial console until the kernel starts `/init`.
//!
//! Timing a loop only says KVM is fast at *that* loop; a real boot also needs the CPU
//! model, MSRs and interrupts a kernel uses (on this project's hosts `-cpu host` under an
//! emulating `/dev/kvm` even fails at once: "failed to set MSR 0x10a"). Hardware reaches
//! `/init` in well under a second; TCG needs ~4 s here with full console output; an
//! emulating `/dev/kvm` prints nothing for minutes.

use crate::arch::Arch;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long the canary may take to reach `/init`.
pub const TIMEOUT: Duration = Duration::from_secs(15);

/// What the canary boots.
#[derive(Debug, Clone)]
pub struct CanarySpec {
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The initramfs (the agent).
    pub initramfs: PathBuf,
}

/// How far a boot got, judged from its console.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Progress {
    /// Nothing from the kernel yet.
    Nothing,
    /// The kernel printed its banner.
    KernelStarted,
    /// The kernel ran `/init` (or the agent spoke): the boot works.
    Userspace,
}

/// The progress one console line shows.
pub fn line_progress(line: &str) -> Progress {
    if line.contains("Run /init as init process") || line.contains("hearth-agent") {
        Progress::Userspace
    } else if line.contains("Linux version") {
        Progress::KernelStarted
    } else {
        Progress::Nothing
    }
}

/// The QEMU arguments of the canary: the VM's machine and CPU, no devices but the serial
/// console, full kernel logging (no `quiet`) so progress is visible. KVM runs only the
/// host's own architecture, so the canary is the host's: on an ARM64 host a `virt` machine
/// with the host's GIC (untested: the project has no ARM64 host).
pub fn args(spec: &CanarySpec) -> Vec<String> {
    let machine: &[&str] = match Arch::host() {
        Arch::X86_64 => &["-machine", "microvm,pcie=on,rtc=on", "-bios", "qboot.rom"],
        Arch::Aarch64 => &["-machine", crate::qemu::AARCH64_KVM_MACHINE],
    };
    let console = match Arch::host() {
        Arch::X86_64 => "console=ttyS0 panic=-1 reboot=t 8250.nr_uarts=1 i8042.noaux",
        Arch::Aarch64 => "console=ttyAMA0 panic=-1",
    };
    let rest = [
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        "256M",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
        "-append",
        console,
        "-kernel",
    ];
    machine
        .iter()
        .chain(rest.iter())
        .map(|s| (*s).to_owned())
        .chain([spec.kernel.display().to_string(), "-initrd".into(), spec.initramfs.display().to_string()])
        .collect()
}

/// Kills and reaps the canary on every path.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Boots the canary; `Ok` with the time to `/init`, else why the boot made no progress.
pub fn run(spec: &CanarySpec, timeout: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    let mut child = Command::new(&spec.qemu)
        .args(args(spec))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", spec.qemu.display()))?;
    let stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let child = Reaped(child);
    let (tx, rx) = mpsc::channel();
    // Threads end when QEMU does (their pipes close); `Reaped` sees to that.
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.by_ref().take(64 << 10).read_to_string(&mut s);
        s
    });
    let mut best = Progress::Nothing;
    let mut last = String::new();
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(line) => {
                best = best.max(line_progress(&line));
                if best == Progress::Userspace {
                    return Ok(start.elapsed());
                }
                if !line.trim().is_empty() {
                    last = line;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(match best {
                    Progress::Nothing => format!("a KVM boot of the guest kernel printed nothing in {timeout:?}"),
                    _ => format!("a KVM boot of the guest kernel did not reach /init in {timeout:?} (last console line: {last:?})"),
                });
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                drop(child);
                let stderr = err.join().unwrap_or_default();
                let stderr = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").to_owned();
                return Err(format!("a KVM boot of the guest kernel ended before /init (QEMU: {stderr:?}; last console line: {last:?})"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_lines_are_judged_by_how_far_the_boot_got() {
        assert_eq!(line_progress("Probing EDD (edd=off to disable)... ok"), Progress::Nothing);
        assert_eq!(line_progress("[    0.000000] Linux version 6.12.95+deb12-cloud-amd64 (debian-kernel@…)"), Progress::KernelStarted);
        assert_eq!(line_progress("[    2.408445] Run /init as init process"), Progress::Userspace);
        assert_eq!(line_progress("hearth-agent: boot failed: no virtio-serial port"), Progress::Userspace);
    }

    #[test]
    fn the_canary_boots_the_real_kernel_under_kvm_without_quiet() {
        let spec = CanarySpec { qemu: "q".into(), kernel: "/k/vmlinuz".into(), initramfs: "/i.cpio".into() };
        let a = args(&spec).join(" ");
        assert!(a.contains("-accel kvm -cpu host"), "{a}");
        assert!(a.contains("-kernel /k/vmlinuz -initrd /i.cpio"), "{a}");
        let console = if Arch::host() == Arch::X86_64 { "console=ttyS0" } else { "console=ttyAMA0" };
        assert!(!a.contains("quiet") && a.contains(console), "{a}");
    }

    #[test]
    fn a_canary_that_ends_without_progress_says_why() {
        // `false` stands in for a QEMU that exits at once (as with "failed to set MSR").
        let spec = CanarySpec { qemu: "false".into(), kernel: "/k".into(), initramfs: "/i".into() };
        let e = run(&spec, Duration::from_secs(5)).unwrap_err();
        assert!(e.contains("ended before /init"), "{e}");
    }
}
