//! `hearth setup`: everything a VM needs besides QEMU itself.

use anyhow::Context;
use clap::Args;
use hearth_image::base::Base;
use hearth_vmm::Arch;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::time::Duration;

/// Options of `hearth setup`.
#[derive(Args, Debug)]
pub struct SetupArgs {
    /// The static agent binary to install (default: $HEARTH_AGENT, or the one cargo built
    /// beside this binary).
    #[arg(long, env = "HEARTH_AGENT")]
    agent: Option<PathBuf>,
    /// Also build the debian-bookworm base root filesystem (takes a minute or two).
    #[arg(long)]
    debian: bool,
    /// Also build this managed base now (repeatable): python, nodejs, debian-bookworm.
    /// Bases not built here are built on their first use (`hearth base build NAME`, or the
    /// first image build on them).
    #[arg(long = "base", value_name = "NAME")]
    base: Vec<Base>,
    /// The guest architecture to set up: `x86_64` (the default) or `arm64` (its kernel,
    /// agent, initramfs and busybox base, in $HEARTH_HOME/arm64; the agent is
    /// `scripts/build-agent.sh --arm64`'s). Run once per architecture.
    #[arg(long, default_value = "x86_64")]
    arch: Arch,
    /// Print what was set up as JSON.
    #[arg(long)]
    json: bool,
}

fn spinner(msg: &str) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("static template"));
    pb.enable_steady_tick(Duration::from_millis(120));
    pb.set_message(msg.to_owned());
    pb
}

fn default_agent(arch: Arch) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    // target/{debug,release}/hearth → target/<agent target>/agent/hearth-agent
    // Only the static build (scripts/build-agent.sh) is wanted; a plain `cargo build`
    // leaves a dynamically linked hearth-agent beside this binary.
    let rel = format!("{}/agent/hearth-agent", arch.agent_target());
    [dir.join("..").join(&rel), dir.join("../..").join(&rel)].into_iter().find(|p| p.is_file())
}

fn check_qemu(arch: Arch) -> anyhow::Result<String> {
    let binary = arch.qemu_binary();
    let out = std::process::Command::new(binary)
        .arg("--version")
        .output()
        .with_context(|| format!("{binary} not found; run `{}`", hearth_vmm::home::SETUP_COMMAND))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or_default().to_owned();
    let major: u32 = first.split("version ").nth(1).and_then(|v| v.split('.').next()).and_then(|v| v.parse().ok()).unwrap_or(0);
    anyhow::ensure!(major >= 10, "{first}: Hearth needs QEMU 10; run `{}`", hearth_vmm::home::SETUP_COMMAND);
    Ok(first)
}

/// Runs the set-up.
pub async fn run(args: SetupArgs) -> anyhow::Result<()> {
    let home = hearth_vmm::home::hearth_home();
    std::fs::create_dir_all(&home).with_context(|| format!("create {}", home.display()))?;
    let arch = args.arch;
    anyhow::ensure!(!(args.debian && arch != Arch::X86_64), "the debian-bookworm base is x86_64 only; drop --debian for --arch {arch}");
    let qemu = check_qemu(arch)?;

    let h = home.clone();
    let pb = spinner(&format!("{arch} guest kernel"));
    let kernel = tokio::task::spawn_blocking(move || hearth_vmm::assets::fetch_kernel_for(&h, arch, &|m| tracing::info!("{m}"))).await??;
    pb.finish_with_message(format!("{arch} guest kernel {}", kernel.release));

    let arch_home = arch.home(&home);
    let installed = hearth_vmm::assets::agent_path(&arch_home);
    let agent = match args.agent.or_else(|| default_agent(arch)) {
        Some(a) => hearth_vmm::assets::install_agent_for(&home, arch, &a)?,
        None if installed.is_file() => installed,
        None => anyhow::bail!(
            "no {arch} agent binary found; build it with `scripts/build-agent.sh{}` or pass --agent (run `{}` to do everything)",
            if arch == Arch::Aarch64 { " --arm64" } else { "" },
            hearth_vmm::home::SETUP_COMMAND
        ),
    };
    let initramfs = hearth_vmm::assets::ensure_initramfs(&arch_home, &agent, &kernel)?;

    let mut bases = vec![Base::Busybox];
    if args.debian {
        bases.push(Base::DebianBookworm);
    }
    anyhow::ensure!(args.base.is_empty() || arch == Arch::X86_64, "--base is for x86_64 guests; arm64 has the busybox base only");
    for b in args.base {
        if !bases.contains(&b) {
            bases.push(b);
        }
    }
    let mut rootfs = Vec::new();
    for base in bases {
        let h = home.clone();
        let pb = spinner(&format!("{arch} {base:?} root filesystem"));
        let pbc = pb.clone();
        let path = tokio::task::spawn_blocking(move || match arch {
            Arch::X86_64 => base.ensure(&h, &|m| pbc.set_message(m.to_owned())),
            Arch::Aarch64 => hearth_image::base_arm64::ensure_busybox(&h, &|m| pbc.set_message(m.to_owned())),
        })
        .await??;
        pb.finish_with_message(format!("{} ready", path.display()));
        rootfs.push(path);
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "home": home, "arch": arch.as_str(), "qemu": qemu, "kernel": kernel.boot_image, "kernel_release": kernel.release,
                "agent": agent, "initramfs": initramfs, "rootfs": rootfs,
            })
        );
    } else {
        println!("Hearth is set up in {}", home.display());
        println!("  {qemu}");
        println!("  kernel     {}", kernel.boot_image.display());
        println!("  initramfs  {}", initramfs.display());
        for r in rootfs {
            println!("  rootfs     {}", r.display());
        }
        println!("Try: hearth vm run{} -- uname -a", if arch == Arch::X86_64 { "" } else { " --arch arm64" });
    }
    Ok(())
}
