//! `hearth setup`: everything a VM needs besides QEMU itself.

use anyhow::Context;
use clap::Args;
use hearth_image::base::Base;
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

fn default_agent() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    // target/{debug,release}/hearth → target/x86_64-unknown-linux-gnu/agent/hearth-agent
    // Only the static build (scripts/build-agent.sh) is wanted; a plain `cargo build`
    // leaves a dynamically linked hearth-agent beside this binary.
    [dir.join("../x86_64-unknown-linux-gnu/agent/hearth-agent"), dir.join("../../x86_64-unknown-linux-gnu/agent/hearth-agent")]
        .into_iter()
        .find(|p| p.is_file())
}

fn check_qemu() -> anyhow::Result<String> {
    let out = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .with_context(|| format!("qemu-system-x86_64 not found; run `{}`", hearth_vmm::home::SETUP_COMMAND))?;
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
    let qemu = check_qemu()?;

    let h = home.clone();
    let pb = spinner("guest kernel");
    let kernel = tokio::task::spawn_blocking(move || hearth_vmm::assets::fetch_kernel(&h, &|m| tracing::info!("{m}"))).await??;
    pb.finish_with_message(format!("guest kernel {}", kernel.release));

    let installed = hearth_vmm::assets::agent_path(&home);
    let agent = match args.agent.or_else(default_agent) {
        Some(a) => hearth_vmm::assets::install_agent(&home, &a)?,
        None if installed.is_file() => installed,
        None => anyhow::bail!(
            "no agent binary found; build it with `scripts/build-agent.sh` or pass --agent (run `{}` to do everything)",
            hearth_vmm::home::SETUP_COMMAND
        ),
    };
    let initramfs = hearth_vmm::assets::ensure_initramfs(&home, &agent, &kernel)?;

    let mut bases = vec![Base::Busybox];
    if args.debian {
        bases.push(Base::DebianBookworm);
    }
    let mut rootfs = Vec::new();
    for base in bases {
        let h = home.clone();
        let pb = spinner(&format!("{base:?} root filesystem"));
        let pbc = pb.clone();
        let path = tokio::task::spawn_blocking(move || base.ensure(&h, &|m| pbc.set_message(m.to_owned()))).await??;
        pb.finish_with_message(format!("{} ready", path.display()));
        rootfs.push(path);
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "home": home, "qemu": qemu, "kernel": kernel.boot_image, "kernel_release": kernel.release,
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
        println!("Try: hearth vm run -- uname -a");
    }
    Ok(())
}
