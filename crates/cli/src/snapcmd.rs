//! `hearth snapshot …` and `hearth vm resume`: templates, clones, suspended VMs.

use crate::vmargs::VmArgs;
use crate::vmrun::{self, CmdArgs};
use clap::{Args, Subcommand};
use hearth_proto::exec::ExecRequest;
use hearth_vmm::{Memory, RestoreOptions, Snapshot, Vm};
use std::path::PathBuf;
use std::time::Duration;

/// Snapshot commands.
#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Boot a VM, optionally run an initialization command in it, and save it as a
    /// template that `snapshot launch` starts clones of in milliseconds.
    Create(CreateArgs),
    /// Start a clone of a template, run a command in it, and stop it.
    Launch(LaunchArgs),
    /// Check a snapshot (magic, version, sizes, checksums of state and memory) and print its
    /// manifest.
    Show {
        /// The snapshot directory.
        dir: PathBuf,
    },
}

/// Options of `hearth snapshot create`.
#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Where to write the snapshot (must not exist).
    dir: PathBuf,
    #[command(flatten)]
    vm: VmArgs,
    /// Initialization command run through /bin/sh -c before the snapshot (e.g. start a
    /// server in the background).
    #[arg(long)]
    init: Option<String>,
}

/// Options of `hearth snapshot launch`.
#[derive(Args, Debug)]
pub struct LaunchArgs {
    /// The template snapshot directory.
    dir: PathBuf,
    #[command(flatten)]
    cmd: CmdArgs,
}

/// Options of `hearth vm resume`.
#[derive(Args, Debug)]
pub struct ResumeArgs {
    /// The directory a VM was suspended into.
    dir: PathBuf,
    /// Shut the VM down afterwards instead of suspending it back into DIR.
    #[arg(long)]
    terminate: bool,
    #[command(flatten)]
    cmd: CmdArgs,
}

fn opts() -> RestoreOptions {
    RestoreOptions {
        run_root: hearth_vmm::home::hearth_home().join("run"),
        timeout: Duration::from_secs(60),
        hostname: None,
        egress: None,
        detached: false,
        name: None,
        jail: hearth_vmm::jail::default_jail(),
        limits: hearth_vmm::limits::default_limits(),
    }
}

/// Runs a snapshot command.
pub async fn run(cmd: SnapshotCmd) -> anyhow::Result<i32> {
    match cmd {
        SnapshotCmd::Create(a) => {
            let mut cfg = a.vm.config()?;
            cfg.memory = Memory::SnapshotReady;
            let vm = Vm::boot(cfg).await?;
            if let Some(init) = &a.init {
                let out = vm.exec(&ExecRequest::shell(init), None, 16 << 20).await?;
                if !out.exit.success() {
                    vm.shutdown().await;
                    anyhow::bail!("the init command failed ({:?}): {}", out.exit, out.stderr_str().trim());
                }
            }
            // One exec warms the path every clone's first exec takes.
            vm.exec(&ExecRequest::argv(["true"]), None, 1 << 16).await?;
            let snap = vm.snapshot_template(&a.dir).await?;
            println!("{}", serde_json::to_string_pretty(&snap.manifest)?);
            Ok(0)
        }
        SnapshotCmd::Launch(a) => {
            let snap = Snapshot::open(&a.dir)?;
            let req = vmrun::exec_request(&a.cmd)?;
            let vm = Vm::launch(&snap, &opts()).await?;
            tracing::info!(vm = vm.id(), launch_ms = vm.boot_time().as_millis() as u64, "launched");
            vmrun::finish(vm, &req, a.cmd.json, None).await
        }
        SnapshotCmd::Show { dir } => {
            let snap = Snapshot::open(&dir)?;
            snap.verify_memory()?;
            println!("{}", serde_json::to_string_pretty(&snap.manifest)?);
            Ok(0)
        }
    }
}

/// `hearth vm resume`.
pub async fn resume(a: ResumeArgs) -> anyhow::Result<i32> {
    let snap = Snapshot::open(&a.dir)?;
    let req = vmrun::exec_request(&a.cmd)?;
    let vm = Vm::resume(&snap, &opts()).await?;
    tracing::info!(vm = vm.id(), resume_ms = vm.boot_time().as_millis() as u64, "resumed");
    let back = (!a.terminate).then_some(a.dir.as_path());
    vmrun::finish(vm, &req, a.cmd.json, back).await
}
