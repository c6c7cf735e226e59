//! The QEMU command line and the process guard.
//!
//! Every QEMU Hearth starts is owned by a [`QemuProcess`]: dropping it kills QEMU; QEMU also
//! gets `PR_SET_PDEATHSIG(SIGKILL)`, so it dies with the process that started it even when
//! that process is killed without unwinding, and runs in its own process group, so a
//! terminal's Ctrl-C reaches Hearth (which shuts the VM down) rather than QEMU directly.

use crate::accel::Accel;
use crate::arch::Arch;
use crate::config::{Memory, Start, VmConfig};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;
use tokio::sync::{oneshot, watch};

mod process;
pub use process::*;

/// Files of one VM's run directory.
#[derive(Debug, Clone)]
pub struct RunPaths {
    /// QMP socket.
    pub qmp: PathBuf,
    /// Agent socket (host end of the virtio-serial port).
    pub agent: PathBuf,
    /// Guest console output (copied from `console_sock`, capped).
    pub console: PathBuf,
    /// QEMU's end of the serial console.
    pub console_sock: PathBuf,
    /// QEMU's own stderr.
    pub qemu_log: PathBuf,
    /// Root disk overlay, when the VM has one.
    pub overlay: PathBuf,
    /// Guest RAM file of a snapshot-ready VM.
    pub memory: PathBuf,
}

impl RunPaths {
    /// The paths inside `dir`.
    pub fn new(dir: &Path) -> Self {
        RunPaths {
            qmp: dir.join("qmp.sock"),
            agent: dir.join("agent.sock"),
            console: dir.join("console.log"),
            console_sock: dir.join("console.sock"),
            qemu_log: dir.join("qemu.log"),
            overlay: dir.join("root.qcow2"),
            memory: dir.join("memory"),
        }
    }

    /// The paths of a VM whose QEMU is jailed ([`crate::jail`]): what QEMU creates or writes
    /// lives in `dir/q/`, the only directory its uid owns and the only part of the run
    /// directory its mount view holds; `vm.json`, the lock and the logs stay the host's.
    pub fn jailed(dir: &Path) -> Self {
        let q = dir.join(crate::jail::QEMU_DIR);
        RunPaths { console: dir.join("console.log"), qemu_log: dir.join("qemu.log"), ..Self::new(&q) }
    }

    /// The paths for a VM made from `cfg` (jailed or not).
    pub fn for_config(dir: &Path, cfg: &VmConfig) -> Self {
        if cfg.jail.is_some() {
            Self::jailed(dir)
        } else {
            Self::new(dir)
        }
    }
}

/// The host's TSC frequency in kHz, measured once (x86-64 only).
///
/// Under TCG the guest's TSC ticks at the host's rate, but the guest kernel's own
/// calibration against the emulated PIT is unreliable (the emulator's timing is too
/// irregular) and, when it fails, the kernel can hang early in boot with no clocksource.
/// Handing it the frequency (`tsc_early_khz=`) removes the calibration altogether.
pub fn host_tsc_khz() -> Option<u64> {
    static KHZ: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *KHZ.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let t0 = std::time::Instant::now();
            // SAFETY: rdtsc has no preconditions on x86-64.
            let c0 = unsafe { core::arch::x86_64::_rdtsc() };
            std::thread::sleep(Duration::from_millis(20));
            // SAFETY: as above.
            let c1 = unsafe { core::arch::x86_64::_rdtsc() };
            let ns = t0.elapsed().as_nanos() as u64;
            let khz = (c1.wrapping_sub(c0)).checked_mul(1_000_000)? / ns.max(1);
            (100_000..20_000_000).contains(&khz).then_some(khz)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            None
        }
    })
}

/// Kernel command-line words that stop an idle guest's periodic wake-ups (each one a wake-up
/// of QEMU's main loop and vCPU thread on the host); see [`kernel_cmdline`].
pub const IDLE_CMDLINE: &[&str] = &["nowatchdog", "sysctl.vm.compaction_proactiveness=0", "sysctl.vm.stat_interval=10"];

/// The kernel command line for a VM.
pub fn kernel_cmdline(cfg: &VmConfig, accel: Accel) -> String {
    let mut c = match cfg.arch {
        Arch::X86_64 => vec![
            "console=ttyS0".to_owned(),
            "quiet".into(),
            "loglevel=3".into(),
            // A panic reboots at once; with -no-reboot QEMU then exits, so the host notices.
            "panic=-1".into(),
            "reboot=t".into(),
            "i8042.noaux".into(),
            "8250.nr_uarts=1".into(),
        ],
        // `virt`'s console is its PL011 UART; a panic's reboot is a PSCI call, after which
        // QEMU (-no-reboot) exits.
        Arch::Aarch64 => vec!["console=ttyAMA0".to_owned(), "quiet".into(), "loglevel=3".into(), "panic=-1".into()],
    };
    c.extend([
        "cryptomgr.notests".into(),
        // Debian enables zero-on-allocation hardening; in a single-tenant guest it only
        // costs boot time under emulation (~0.2 s here).
        "init_on_alloc=0".into(),
        "random.trust_cpu=on".into(),
    ]);
    // What an idle guest wakes for, and so wakes QEMU for (traced with ftrace in a guest
    // and strace on its QEMU, docs/ARCHITECTURE.md "Idle cost"): the soft-lockup watchdog
    // (every 4 s), kcompactd's proactive compaction check (every 0.5 s) and the per-CPU
    // vmstat fold (every second). Without them an idle microvm cost a fifth of the CPU
    // (0.24 % → 0.05 % of a core, 4 VMs side by side). A restored VM keeps its template's
    // settings: these take effect in templates booted from now on.
    c.extend(IDLE_CMDLINE.iter().map(|w| (*w).to_owned()));
    c.push(format!("hearth.hostname={}", cfg.hostname));
    if cfg.root.is_some() {
        c.push("hearth.root=/dev/vda".into());
    }
    if cfg.network.is_some() {
        c.push(crate::net::guest_cmdline());
    }
    // Only a booting kernel calibrates; a restored one already knows (and measuring costs
    // 20 ms).
    if accel != Accel::Kvm && cfg.start == Start::Boot && cfg.arch == Arch::X86_64 {
        if let Some(khz) = host_tsc_khz() {
            c.push(format!("tsc_early_khz={khz}"));
            c.push("tsc=reliable".into());
        }
    }
    c.extend(cfg.extra_cmdline.iter().cloned());
    c.join(" ")
}

/// A path as a value inside a QEMU option list (`,` doubled).
pub fn opt_path(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// The `-object` of the guest RAM backend (always id `mem`).
fn memory_backend(cfg: &VmConfig, paths: &RunPaths) -> String {
    let size = format!("size={}M", cfg.memory_mib);
    match &cfg.memory {
        Memory::Anonymous => format!("memory-backend-ram,id=mem,{size}"),
        Memory::SnapshotReady => {
            format!("memory-backend-file,id=mem,{size},mem-path={},share=on", opt_path(&paths.memory))
        }
        Memory::Template(p) => {
            format!("memory-backend-file,id=mem,{size},mem-path={},share=off,readonly=on,rom=off", opt_path(p))
        }
    }
}

/// QEMU's `-name` for VM `id`: the guest is named by the VM id, the process after it and
/// after the caller's `label` when there is one (`vm-…,process=hearth-vm-…-mvm-…`), so
/// `ps -f` and `pgrep -f` map a QEMU to the API's microvm. The kernel cuts the process
/// name that `ps` shows by default to 15 characters (`hearth-vm-0a1b2`); the whole
/// command line keeps both ids.
pub fn name_arg(id: &str, label: Option<&str>) -> String {
    match label {
        Some(label) => format!("{id},process=hearth-{id}-{label}"),
        // The only form of releases before labels.
        None => format!("{id},process=hearth-{id}"),
    }
}

/// True when `cmdline` (`/proc/<pid>/cmdline`: NUL-separated arguments) is that of the
/// QEMU of VM `id`: its `-name` is [`name_arg`] of `id`, with or without a label, so a
/// VM started by a release before labels is recognised too.
pub fn cmdline_names_vm(cmdline: &[u8], id: &str) -> bool {
    let unlabelled = name_arg(id, None);
    let labelled = format!("{unlabelled}-");
    let mut args = cmdline.split(|b| *b == 0);
    while let Some(arg) = args.next() {
        if arg == b"-name" {
            return args.next().is_some_and(|v| v == unlabelled.as_bytes() || v.starts_with(labelled.as_bytes()));
        }
    }
    false
}

/// True when process `pid` is the QEMU of VM `id` ([`cmdline_names_vm`]).
pub(crate) fn is_vm_process(pid: u32, id: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| cmdline_names_vm(&c, id))
}

/// The ARM64 machine: `virt` (there is no ARM64 `microvm`) with a GICv3, which unlike
/// the default GICv2 serves more than 8 vCPUs. Its virtio devices are PCIe ones, as on
/// x86-64, so the agent and the device names are the same on both.
pub const AARCH64_MACHINE: &str = "virt,gic-version=3";
/// The ARM64 machine under KVM (an ARM64 host): the host's own GIC, which KVM can
/// virtualize only as the version the hardware has (GICv2-only hosts exist). Untested: the
/// project has no ARM64 host.
pub const AARCH64_KVM_MACHINE: &str = "virt,gic-version=host";
/// The emulated ARM64 CPU under TCG (docs/ARCHITECTURE.md "ARM64 guests" for the choice).
pub const AARCH64_TCG_CPU: &str = "max,pauth-impdef=on";

/// `-accel` of a jailed TCG VM.
const TCG_JAILED: &str = "tcg,tb-size=256";
const _: () = assert!(crate::jail::cgroup::TCG_TB_MIB == 256);

/// The QEMU arguments for a VM with a resolved accelerator (`Kvm` or `Tcg`).
pub fn qemu_args(cfg: &VmConfig, accel: Accel, id: &str, paths: &RunPaths) -> Vec<String> {
    // Paths go into comma-separated option lists, where a literal comma is written twice.
    let p = |p: &Path| opt_path(p);
    let (accel_name, cpu) = match accel {
        Accel::Kvm => ("kvm", "host"),
        // Jailed, the translation cache is capped so QEMU fits its cgroup
        // (jail::cgroup::TCG_TB_MIB; the default is up to 1 GiB, mapped lazily).
        _ if cfg.jail.is_some() => (TCG_JAILED, "max"),
        _ => ("tcg", "max"),
    };
    let (machine, cpu) = match cfg.arch {
        Arch::X86_64 => ("microvm,pcie=on,rtc=on", cpu),
        Arch::Aarch64 if accel == Accel::Kvm => (AARCH64_KVM_MACHINE, cpu),
        Arch::Aarch64 => (AARCH64_MACHINE, AARCH64_TCG_CPU),
    };
    let mut a: Vec<String> = vec![
        "-name".into(),
        name_arg(id, cfg.name.as_deref()),
        "-machine".into(),
        machine.into(),
        "-accel".into(),
        accel_name.into(),
        "-cpu".into(),
        cpu.into(),
        "-m".into(),
        format!("{}M", cfg.memory_mib),
        "-object".into(),
        memory_backend(cfg, paths),
        "-machine".into(),
        "memory-backend=mem".into(),
        "-smp".into(),
        cfg.vcpus.to_string(),
    ];
    if cfg.arch == Arch::X86_64 {
        // qboot: a minimal firmware that jumps straight to the kernel (SeaBIOS costs
        // time under TCG and cannot start a PVH kernel). `virt` loads an ARM64 kernel
        // itself, with no firmware.
        a.extend(["-bios".into(), "qboot.rom".into()]);
    }
    a.extend([
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-nographic".into(),
        "-no-reboot".into(),
        "-kernel".into(),
        p(&cfg.kernel),
        "-initrd".into(),
        p(&cfg.initramfs),
        "-append".into(),
        kernel_cmdline(cfg, accel),
        "-chardev".into(),
        // The console goes through a socket the host copies into console.log with a size
        // cap (a guest writing to its serial port forever must not fill the host's disk).
        format!("socket,id=console,path={},server=on,wait=off", p(&paths.console_sock)),
        "-serial".into(),
        "chardev:console".into(),
        "-device".into(),
        "virtio-serial-pci,id=vser0".into(),
        "-chardev".into(),
        format!("socket,id=agent,path={},server=on,wait=off", p(&paths.agent)),
        "-device".into(),
        format!("virtserialport,bus=vser0.0,chardev=agent,name={}", hearth_proto::AGENT_PORT_NAME),
    ]);
    if cfg.arch == Arch::X86_64 {
        // qemu-system-aarch64 has no vmgenid device (an ACPI device; a `virt` guest booted
        // without firmware reads a device tree): an ARM64 guest's RNG is reseeded by the
        // agent on every restore only (docs/ARCHITECTURE.md "ARM64 guests").
        a.extend(["-device".into(), "vmgenid".into()]);
    }
    a.extend([
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", p(&paths.qmp)),
        // QEMU's seccomp filter: no spawning, no privilege changes, no obsolete syscalls.
        "-sandbox".into(),
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
    ]);
    if let Start::Incoming { .. } = cfg.start {
        a.push("-incoming".into());
        a.push("defer".into());
    }
    if let Some(disk) = &cfg.root {
        let (file, format) = if disk.overlay { (p(&paths.overlay), "qcow2") } else { (p(&disk.path), disk.format.as_str()) };
        a.push("-drive".into());
        a.push(format!("file={file},if=none,id=root,format={format},cache=writeback,discard=unmap{}", cfg.limits.drive_options()));
        a.push("-device".into());
        a.push("virtio-blk-pci,drive=root".into());
    }
    // After the disk, so VMs without a NIC keep the device layout their snapshots have.
    if cfg.network.is_some() {
        // QEMU runs inside the VM's namespace, where `tap0` is the only tap.
        a.push("-netdev".into());
        if cfg.jail.is_some() {
            // Opened by the jail in the namespace and handed over; QEMU has no /dev/net/tun.
            a.push(format!("tap,id=net0,fd={},vhost=off", crate::jail::TAP_FD));
        } else {
            a.push("tap,id=net0,ifname=tap0,script=no,downscript=no".into());
        }
        a.push("-device".into());
        a.push(format!("virtio-net-pci,netdev=net0,mac={}", crate::net::GUEST_MAC));
    }
    a
}

/// Creates a qcow2 overlay whose backing file is `base`. An empty overlay only depends on
/// its backing file, so the first one made for a base is kept beside it
/// (`.<name>.overlay.qcow2`, when that directory is writable) and later ones are copies of
/// it: a copy of a few hundred KiB instead of a `qemu-img` process (~25 ms).
pub fn create_overlay(base: &Path, base_format: &str, overlay: &Path) -> Result<(), String> {
    let name = base.file_name().and_then(|n| n.to_str()).unwrap_or("base");
    // Keyed on what the overlay depends on: a base rebuilt in place gets a new cache entry.
    let meta = std::fs::metadata(base).map_err(|e| format!("{}: {e}", base.display()))?;
    let mtime =
        std::os::unix::fs::MetadataExt::mtime_nsec(&meta) as i128 + std::os::unix::fs::MetadataExt::mtime(&meta) as i128 * 1_000_000_000;
    let cached = base.with_file_name(format!(".{name}.{base_format}.{}.{mtime}.overlay.qcow2", meta.len()));
    if cached.is_file() && std::fs::copy(&cached, overlay).is_ok() {
        return Ok(());
    }
    make_overlay(base, base_format, overlay)?;
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = base.with_file_name(format!(".{name}.overlay.tmp.{}.{seq}", std::process::id()));
    if std::fs::copy(overlay, &tmp).is_err() || std::fs::rename(&tmp, &cached).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    Ok(())
}

/// Creates a qcow2 overlay on `base` with `qemu-img` (no cached copy).
pub(crate) fn create_overlay_uncached(base: &Path, base_format: &str, overlay: &Path) -> Result<(), String> {
    make_overlay(base, base_format, overlay)
}

fn make_overlay(base: &Path, base_format: &str, overlay: &Path) -> Result<(), String> {
    let base = std::fs::canonicalize(base).map_err(|e| format!("{}: {e}", base.display()))?;
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", base_format, "-b"])
        .arg(&base)
        .arg(overlay)
        .output()
        .map_err(|e| format!("cannot run qemu-img ({e}); run `{}`", crate::home::SETUP_COMMAND))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Disk, DiskFormat};

    #[test]
    fn args_use_overlay_and_accel() {
        let mut cfg = VmConfig::new("/k", "/i");
        cfg.root = Some(Disk::base("/base.ext4", DiskFormat::Raw));
        let paths = RunPaths::new(Path::new("/run/x"));
        let args = qemu_args(&cfg, Accel::Tcg, "vm-1", &paths).join(" ");
        assert!(args.contains("-accel tcg"), "{args}");
        assert!(args.contains("file=/run/x/root.qcow2"), "{args}");
        assert!(args.contains("hearth.root=/dev/vda"), "{args}");
        assert!(IDLE_CMDLINE.iter().all(|w| args.contains(w)), "the idle settings: {args}");
        let args = qemu_args(&cfg, Accel::Kvm, "vm-1", &paths).join(" ");
        assert!(args.contains("-accel kvm") && args.contains("-cpu host"), "{args}");
        assert!(!args.contains("throttling"), "unlimited by default: {args}");
        cfg.limits = crate::limits::IoLimits { disk_bps: 1000, disk_iops: 0, net_mbit: 0 };
        let args = qemu_args(&cfg, Accel::Kvm, "vm-1", &paths).join(" ");
        assert!(args.contains("discard=unmap,throttling.bps-total=1000 "), "{args}");
    }

    #[test]
    fn arm64_guests_get_virt_without_x86_parts() {
        let mut cfg = VmConfig::for_arch("/k", "/i", Arch::Aarch64);
        cfg.root = Some(Disk::base("/base.ext4", DiskFormat::Raw));
        let paths = RunPaths::new(Path::new("/run/x"));
        let args = qemu_args(&cfg, Accel::Tcg, "vm-1", &paths).join(" ");
        assert!(args.contains(&format!("-machine {AARCH64_MACHINE} ")), "{args}");
        assert!(args.contains(&format!("-cpu {AARCH64_TCG_CPU} ")), "{args}");
        assert!(args.contains("console=ttyAMA0") && args.contains("virtio-blk-pci"), "{args}");
        for x86 in ["qboot", "vmgenid", "ttyS0", "tsc", "i8042", "microvm"] {
            assert!(!args.contains(x86), "{x86} in an ARM64 command line: {args}");
        }
        // Under KVM (an ARM64 host): the host's CPU and GIC.
        let args = qemu_args(&cfg, Accel::Kvm, "vm-1", &paths).join(" ");
        assert!(args.contains(&format!("-machine {AARCH64_KVM_MACHINE} ")) && args.contains("-cpu host "), "{args}");
        // The x86-64 line keeps what it had.
        let x86 = qemu_args(&VmConfig::new("/k", "/i"), Accel::Tcg, "vm-1", &paths).join(" ");
        assert!(x86.contains("-machine microvm,pcie=on,rtc=on") && x86.contains("-bios qboot.rom") && x86.contains("vmgenid"), "{x86}");
    }

    #[test]
    fn the_process_name_carries_the_label_and_old_names_still_match() {
        let mut cfg = VmConfig::new("/k", "/i");
        let paths = RunPaths::new(Path::new("/run/x"));
        let cmdline = |cfg: &VmConfig| qemu_args(cfg, Accel::Tcg, "vm-0a1b", &paths).join("\0").into_bytes();
        // No label: exactly the name releases before labels gave.
        let old = cmdline(&cfg);
        assert!(String::from_utf8_lossy(&old).contains("-name\0vm-0a1b,process=hearth-vm-0a1b\0"));
        cfg.name = Some("mvm-0123456789abcdef".into());
        let new = cmdline(&cfg);
        assert!(String::from_utf8_lossy(&new).contains("-name\0vm-0a1b,process=hearth-vm-0a1b-mvm-0123456789abcdef\0"));
        for c in [&old, &new] {
            assert!(cmdline_names_vm(c, "vm-0a1b"));
            // Another VM's QEMU (a reused pid) is not this VM's, even one whose id it starts.
            assert!(!cmdline_names_vm(c, "vm-0a1"));
            assert!(!cmdline_names_vm(c, "vm-0a1bc"));
        }
        assert!(!cmdline_names_vm(b"/bin/sleep\0vm-0a1b,process=hearth-vm-0a1b\0", "vm-0a1b"));
    }
}
