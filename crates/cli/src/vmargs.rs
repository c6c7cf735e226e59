//! VM options shared by the commands that boot VMs.

use anyhow::Context;
use clap::Args;
use hearth_image::base::Base;
use hearth_vmm::{Accel, Arch, Disk, DiskFormat, VmConfig};
use std::path::PathBuf;

/// How to build a VM.
#[derive(Args, Debug, Clone)]
pub struct VmArgs {
    /// Root filesystem: a managed base (`busybox`, `debian-bookworm`, `python`, `nodejs`),
    /// or a path to a raw/ext4 or qcow2 image
    /// (used as a read-only base; the VM writes to its own overlay).
    #[arg(long, default_value = "busybox")]
    pub rootfs: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    pub memory: u32,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Guest architecture: x86_64 or arm64 (emulated on an x86-64 host; set up with
    /// `hearth setup --arch arm64`).
    #[arg(long, default_value = "x86_64", env = "HEARTH_ARCH")]
    pub arch: Arch,
    /// Accelerator: auto (measure KVM, else TCG), kvm or tcg.
    #[arg(long, default_value = "auto", env = "HEARTH_ACCEL")]
    pub accel: Accel,
    /// Guest kernel to boot instead of the installed one.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initramfs to use instead of the one built from the installed agent.
    #[arg(long)]
    pub initramfs: Option<PathBuf>,
    /// Extra kernel command-line word; repeatable (`hearth.debug` narrates the agent's boot).
    #[arg(long = "kernel-arg")]
    pub kernel_args: Vec<String>,
    /// Seconds to wait for the guest to become ready.
    #[arg(long, default_value_t = 60)]
    pub boot_timeout: u64,
    /// The VM's network.
    #[command(flatten)]
    pub net: NetArgs,
}

/// Network options: a NIC in the VM's own namespace (needs root) and its egress policy.
#[derive(Args, Debug, Clone, Default)]
pub struct NetArgs {
    /// Egress: `none` (no network device), `closed` (a device, nothing reachable but
    /// what --allow opens) or `internet` (public addresses over TCP, DNS; private ranges
    /// and other UDP stay closed).
    #[arg(long, value_name = "MODE")]
    pub egress: Option<EgressMode>,
    /// Also allow CIDR[:PORT[-PORT]][/tcp|/udp] (even private or UDP); repeatable.
    #[arg(long = "allow", value_name = "RULE")]
    pub allow: Vec<String>,
    /// Refuse CIDR[:PORT[-PORT]][/tcp|/udp] whatever else allows it; repeatable.
    #[arg(long = "deny", value_name = "RULE")]
    pub deny: Vec<String>,
}

/// `--egress` values.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum EgressMode {
    /// No network device.
    None,
    /// A network device with only the allowed destinations reachable.
    Closed,
    /// Public internet over TCP plus DNS.
    Internet,
}

impl NetArgs {
    /// The egress policy, or `None` for no network device. `default` applies when
    /// `--egress` is not given (rules given alone imply `closed`).
    pub fn egress(&self, default: EgressMode) -> anyhow::Result<Option<hearth_vmm::net::Egress>> {
        let parse = |v: &[String]| -> anyhow::Result<Vec<hearth_vmm::net::Rule>> {
            v.iter().map(|r| hearth_vmm::net::Rule::parse(r).map_err(anyhow::Error::from)).collect()
        };
        let rules_given = !self.allow.is_empty() || !self.deny.is_empty();
        let mode = self.egress.unwrap_or(if rules_given && default == EgressMode::None { EgressMode::Closed } else { default });
        if mode == EgressMode::None {
            anyhow::ensure!(!rules_given, "--allow/--deny need a network device; drop --egress none");
            return Ok(None);
        }
        Ok(Some(hearth_vmm::net::Egress {
            internet: mode == EgressMode::Internet,
            allow: parse(&self.allow)?,
            deny: parse(&self.deny)?,
            ..Default::default()
        }))
    }
}

impl VmArgs {
    /// The VM configuration these options describe.
    pub fn config(&self) -> anyhow::Result<VmConfig> {
        let home = hearth_vmm::home::hearth_home();
        let (kernel, initramfs) = match (&self.kernel, &self.initramfs) {
            (Some(k), Some(i)) => (k.clone(), i.clone()),
            (k, i) => {
                let (dk, di) = hearth_vmm::assets::boot_files_for(&home, self.arch)?;
                (k.clone().unwrap_or(dk), i.clone().unwrap_or(di))
            }
        };
        let mut cfg = VmConfig::for_arch(kernel, initramfs, self.arch);
        cfg.memory_mib = self.memory;
        cfg.vcpus = self.vcpus;
        cfg.accel = self.accel;
        cfg.boot_timeout = std::time::Duration::from_secs(self.boot_timeout);
        cfg.run_root = home.join("run");
        cfg.extra_cmdline = self.kernel_args.clone();
        cfg.root = Some(self.root_disk(&home)?);
        cfg.network = self.net.egress(EgressMode::None)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn root_disk(&self, home: &std::path::Path) -> anyhow::Result<Disk> {
        if let Ok(base) = self.rootfs.parse::<Base>() {
            let path = hearth_image::base_arm64::path_for(base, self.arch, home)?;
            anyhow::ensure!(
                path.is_file(),
                "base image {} is not built yet; run `hearth {}{}`",
                self.rootfs,
                if base == Base::Busybox { "setup".to_owned() } else { format!("base build {base}") },
                if self.arch == Arch::X86_64 { "" } else { " --arch arm64" }
            );
            return Ok(Disk::base(path, DiskFormat::Raw));
        }
        let path = PathBuf::from(&self.rootfs);
        anyhow::ensure!(
            path.is_file(),
            "root filesystem {:?} is neither a managed base (busybox, debian-bookworm, python, nodejs) nor an image file",
            self.rootfs
        );
        let format = if path.extension().is_some_and(|e| e == "qcow2") { DiskFormat::Qcow2 } else { DiskFormat::Raw };
        let path = std::fs::canonicalize(&path).with_context(|| format!("resolve {}", path.display()))?;
        Ok(Disk::base(path, format))
    }
}
