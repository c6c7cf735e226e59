//! Set-up shared by the real-VM test files.

use hearth_image::base::Base;
use hearth_vmm::{Disk, DiskFormat, VmConfig};
use std::time::Duration;

/// A VM configuration on `base` from the installed assets. Panics with the set-up command
/// when they are missing. `HEARTH_KERNEL_ARGS` adds kernel arguments (e.g. `hearth.debug`),
/// `HEARTH_ACCEL` forces the accelerator; `RUST_LOG` enables logs.
pub fn config(base: Base) -> VmConfig {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_test_writer().try_init();
    let home = hearth_vmm::home::hearth_home();
    let (kernel, initramfs) =
        hearth_vmm::assets::boot_files(&home).unwrap_or_else(|e| panic!("{e} (the tests need `scripts/setup.sh --debian` first)"));
    let rootfs = base.path(&home);
    assert!(rootfs.is_file(), "{} missing: run `scripts/setup.sh --debian` first", rootfs.display());
    let mut cfg = VmConfig::new(kernel, initramfs);
    cfg.root = Some(Disk::base(rootfs, DiskFormat::Raw));
    cfg.run_root = home.join("run");
    cfg.boot_timeout = Duration::from_secs(180);
    if let Ok(args) = std::env::var("HEARTH_KERNEL_ARGS") {
        cfg.extra_cmdline = args.split_whitespace().map(str::to_owned).collect();
    }
    if let Ok(a) = std::env::var("HEARTH_ACCEL") {
        cfg.accel = a.parse().expect("HEARTH_ACCEL");
    }
    cfg
}
