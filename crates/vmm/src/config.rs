//! What a VM is made of, validated before anything starts.

use crate::accel::Accel;
use std::path::PathBuf;
use std::time::Duration;

/// Smallest guest memory Hearth accepts, in MiB (the kernel and agent need about 100).
pub const MIN_MEMORY_MIB: u32 = 128;
/// Largest guest memory, in MiB.
pub const MAX_MEMORY_MIB: u32 = 256 * 1024;
/// Most vCPUs.
pub const MAX_VCPUS: u32 = 64;

/// Format of a disk image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DiskFormat {
    /// A raw image.
    Raw,
    /// A qcow2 image.
    Qcow2,
}

impl DiskFormat {
    /// QEMU's name for the format.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// The VM's root disk.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Disk {
    /// Image file.
    pub path: PathBuf,
    /// Its format.
    pub format: DiskFormat,
    /// When true (the default) the image is a read-only base: the VM writes to its own
    /// qcow2 overlay in its run directory, discarded with the VM.
    pub overlay: bool,
    /// Without an overlay: the image is Hearth's own (not a user's file), so snapshots
    /// of the VM may move it.
    pub hearth_made: bool,
}

impl Disk {
    /// A base image the VM must not modify (an overlay takes its writes).
    pub fn base(path: impl Into<PathBuf>, format: DiskFormat) -> Self {
        Disk { path: path.into(), format, overlay: true, hearth_made: false }
    }

    /// An image Hearth made for this VM, written in place (no overlay) and movable into
    /// the VM's snapshots.
    pub fn owned(path: impl Into<PathBuf>, format: DiskFormat) -> Self {
        Disk { path: path.into(), format, overlay: false, hearth_made: true }
    }
}

/// Where guest RAM lives. QEMU always gets one memory backend with id `mem`, so the RAM
/// block is named the same whichever backing a snapshot was taken from or restored into.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Memory {
    /// Private anonymous memory.
    Anonymous,
    /// A file in the VM's run directory, mapped shared: guest RAM *is* the file's pages, so
    /// a template snapshot of the VM moves the file instead of copying RAM.
    SnapshotReady,
    /// A snapshot's memory file mapped private copy-on-write (read-only file, writable
    /// RAM): the file is never modified, unmodified pages are shared by every VM mapping it
    /// through the page cache, and mapping costs nothing up front whatever the size.
    Template(PathBuf),
}

/// Where a VM starts from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Start {
    /// Boot the kernel.
    Boot,
    /// Load device state (and, for a suspend image, RAM) from a migration file.
    Incoming {
        /// The migration file.
        state: PathBuf,
        /// The file is in `mapped-ram` format (suspend images) rather than a plain
        /// device-state stream (snapshots taken with `x-ignore-shared`).
        mapped_ram: bool,
    },
}

/// Longest caller's name of a VM ([`VmConfig::name`]).
pub const MAX_NAME_LEN: usize = 63;

/// Everything needed to boot one VM.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VmConfig {
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Kernel image (`bzImage`).
    pub kernel: PathBuf,
    /// Initramfs holding the agent.
    pub initramfs: PathBuf,
    /// Root disk; without one the guest runs in its initramfs.
    pub root: Option<Disk>,
    /// Accelerator.
    pub accel: Accel,
    /// How long to wait for the agent to answer after QEMU starts.
    pub boot_timeout: Duration,
    /// Guest hostname.
    pub hostname: String,
    /// Where the VM's run directory is created (normally `$HEARTH_HOME/run`).
    pub run_root: PathBuf,
    /// The QEMU binary.
    pub qemu_binary: PathBuf,
    /// Extra kernel command-line words (`hearth.debug` makes the agent narrate its boot).
    pub extra_cmdline: Vec<String>,
    /// Guest RAM backing.
    pub memory: Memory,
    /// Boot or restore.
    pub start: Start,
    /// A network interface in the VM's own namespace with this egress policy (needs
    /// root); `None` means no network device at all.
    pub network: Option<crate::net::Egress>,
    /// QEMU outlives the process that starts it (its own session, no parent-death
    /// signal): [`crate::Vm::release`] lets it run on, [`crate::Vm::reattach`] takes it
    /// back from its run directory. Dropping the `Vm` still kills it.
    #[serde(default)]
    pub detached: bool,
    /// The caller's name for the VM (the API passes its microvm id): QEMU's process
    /// name carries it ([`crate::qemu::name_arg`]) and every log line about the VM has
    /// it as `name`. Letters, digits, `-`, `_` and `.`, at most
    /// [`MAX_NAME_LEN`] characters.
    #[serde(default)]
    pub name: Option<String>,
    /// Run QEMU in a jail ([`crate::jail`]): its own uid, mount and PID namespaces,
    /// cgroups, no capabilities. Defaults to the process's ([`crate::jail::default_jail`]).
    #[serde(default)]
    pub jail: Option<crate::jail::JailConfig>,
    /// Disk and network limits ([`crate::limits`]); defaults to the process's
    /// ([`crate::limits::default_limits`]).
    #[serde(default)]
    pub limits: crate::limits::IoLimits,
    /// The guest's architecture: the machine QEMU emulates and what kernel, initramfs and
    /// disk must be built for. [`VmConfig::for_arch`] also sets the matching
    /// [`VmConfig::qemu_binary`].
    #[serde(default)]
    pub arch: crate::arch::Arch,
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Memory out of range.
    #[error("memory must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} MiB, got {0} MiB")]
    Memory(u32),
    /// vCPUs out of range.
    #[error("vcpus must be between 1 and {MAX_VCPUS}, got {0}")]
    Vcpus(u32),
    /// A file the VM needs is missing.
    #[error("{what} not found at {path}; run `{}` first", crate::home::SETUP_COMMAND)]
    Missing {
        /// What the file is.
        what: &'static str,
        /// Where it was expected.
        path: PathBuf,
    },
    /// Hostname is not a valid DNS label.
    #[error("hostname {0:?} must be 1-63 characters of letters, digits and '-'")]
    Hostname(String),
    /// Boot timeout of zero.
    #[error("boot timeout must be positive")]
    BootTimeout,
    /// An I/O limit out of range.
    #[error(transparent)]
    Limits(#[from] crate::limits::LimitError),
    /// The VM's name is unusable in a process name.
    #[error("VM name {0:?} must be 1-63 characters of letters, digits, '-', '_' and '.'")]
    Name(String),
    /// KVM asked for a guest of another architecture than the host's.
    #[error("KVM runs {host} guests only on this host; a {arch} guest needs accel tcg (or auto)")]
    ForeignKvm {
        /// The guest's architecture.
        arch: crate::arch::Arch,
        /// The host's.
        host: crate::arch::Arch,
    },
}

impl VmConfig {
    /// A configuration with defaults: 512 MiB, 1 vCPU, auto accelerator, 60 s boot timeout.
    pub fn new(kernel: impl Into<PathBuf>, initramfs: impl Into<PathBuf>) -> Self {
        VmConfig {
            memory_mib: 512,
            vcpus: 1,
            kernel: kernel.into(),
            initramfs: initramfs.into(),
            root: None,
            accel: Accel::Auto,
            boot_timeout: Duration::from_secs(60),
            hostname: "hearth".into(),
            run_root: crate::home::hearth_home().join("run"),
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            extra_cmdline: Vec::new(),
            memory: Memory::Anonymous,
            start: Start::Boot,
            network: None,
            detached: false,
            name: None,
            jail: crate::jail::default_jail(),
            limits: crate::limits::default_limits(),
            arch: crate::arch::Arch::X86_64,
        }
    }

    /// [`VmConfig::new`] for a guest of `arch`, with that architecture's QEMU.
    pub fn for_arch(kernel: impl Into<PathBuf>, initramfs: impl Into<PathBuf>, arch: crate::arch::Arch) -> Self {
        let mut c = Self::new(kernel, initramfs);
        c.arch = arch;
        c.qemu_binary = PathBuf::from(arch.qemu_binary());
        c
    }

    /// Checks every value; nothing is started when this fails.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ConfigError::Memory(self.memory_mib));
        }
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        let h = &self.hostname;
        if h.is_empty() || h.len() > 63 || !h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') || h.starts_with('-') {
            return Err(ConfigError::Hostname(h.clone()));
        }
        if let Some(n) = &self.name {
            let ok = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
            if n.is_empty() || n.len() > MAX_NAME_LEN || !n.bytes().all(ok) {
                return Err(ConfigError::Name(n.clone()));
            }
        }
        self.limits.validate()?;
        if self.accel == Accel::Kvm && self.arch != crate::arch::Arch::host() {
            return Err(ConfigError::ForeignKvm { arch: self.arch, host: crate::arch::Arch::host() });
        }
        if self.boot_timeout.is_zero() {
            return Err(ConfigError::BootTimeout);
        }
        if !self.kernel.is_file() {
            return Err(ConfigError::Missing { what: "guest kernel", path: self.kernel.clone() });
        }
        if !self.initramfs.is_file() {
            return Err(ConfigError::Missing { what: "initramfs", path: self.initramfs.clone() });
        }
        if let Some(d) = &self.root {
            if !d.path.is_file() {
                return Err(ConfigError::Missing { what: "root disk image", path: d.path.clone() });
            }
        }
        if let Memory::Template(p) = &self.memory {
            if !p.is_file() {
                return Err(ConfigError::Missing { what: "snapshot memory file", path: p.clone() });
            }
        }
        if let Start::Incoming { state, .. } = &self.start {
            if !state.is_file() {
                return Err(ConfigError::Missing { what: "snapshot state file", path: state.clone() });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> VmConfig {
        // Any existing files do for validation.
        VmConfig::new("/proc/self/exe", "/proc/self/exe")
    }

    #[test]
    fn sizes_are_checked() {
        let mut c = cfg();
        c.memory_mib = 64;
        assert_eq!(c.validate(), Err(ConfigError::Memory(64)));
        let mut c = cfg();
        c.vcpus = 0;
        assert_eq!(c.validate(), Err(ConfigError::Vcpus(0)));
        let mut c = cfg();
        c.hostname = "bad host".into();
        assert!(matches!(c.validate(), Err(ConfigError::Hostname(_))));
        let mut c = cfg();
        c.name = Some("mvm-1,debug-threads=on".into());
        assert!(matches!(c.validate(), Err(ConfigError::Name(_))));
        c.name = Some("mvm-0123456789abcdef".into());
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(cfg().validate(), Ok(()));
        let c = VmConfig::for_arch("/proc/self/exe", "/proc/self/exe", crate::arch::Arch::Aarch64);
        assert_eq!(c.qemu_binary, PathBuf::from("qemu-system-aarch64"));
        // The architecture that is foreign to this host (ARM64 here, x86-64 on an ARM64 host).
        let foreign = crate::arch::Arch::ALL.into_iter().find(|a| *a != crate::arch::Arch::host()).unwrap();
        let mut c = VmConfig::for_arch(&c.kernel, &c.initramfs, foreign);
        c.accel = Accel::Kvm;
        assert!(matches!(c.validate(), Err(ConfigError::ForeignKvm { .. })), "KVM cannot run a foreign guest");
    }

    #[test]
    fn missing_kernel_names_the_setup_command() {
        let mut c = cfg();
        c.kernel = "/nonexistent/vmlinuz".into();
        let msg = c.validate().unwrap_err().to_string();
        assert!(msg.contains("setup"), "{msg}");
    }
}
