//! `hearth`: boot microVMs on QEMU and run commands in them.

mod accounts;
mod basecmd;
mod client;
mod connectors;
mod cp;
mod imagecmd;
mod images;
mod mcp;
mod serve;
mod setup;
mod shell;
mod snapcmd;
mod upload;
mod vmrun;

use clap::{Parser, Subcommand};
use hearth_cli::vmargs;

/// Hearth: microVM sandboxes for code you did not write.
///
/// Every sandbox is a QEMU virtual machine with its own Linux kernel and Hearth's agent as
/// PID 1. State lives in $HEARTH_HOME (default /var/lib/hearth for root).
#[derive(Parser)]
#[command(name = "hearth", version, propagate_version = true)]
struct Cli {
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides.
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    /// Log lines as JSON objects (for log collectors), one per line on stderr.
    #[arg(long, global = true, env = "HEARTH_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fetch the guest kernel, install the agent, build the initramfs and base root filesystems.
    Setup(setup::SetupArgs),
    /// Work with individual VMs.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Base images: list, build the managed ones, import docker/OCI archives.
    #[command(subcommand)]
    Base(basecmd::BaseCmd),
    /// Images from a Dockerfile context: through the API (create, ls, get, rm) or, for the
    /// operator, in this host's store (`images local build|ls|show|rm|run`).
    #[command(subcommand)]
    Images(images::ImagesCmd),
    /// Deprecated spelling of `hearth images local …`.
    #[command(subcommand, hide = true)]
    Image(imagecmd::LocalCmd),
    /// Templates: save a prepared VM, launch clones of it in milliseconds.
    #[command(subcommand)]
    Snapshot(snapcmd::SnapshotCmd),
    /// Say which accelerator `auto` picks here, and why.
    Accel {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Measure again (timing and boot canary) instead of using the verdict cached in
        /// `$HEARTH_HOME/accel.json`.
        #[arg(long)]
        recheck: bool,
    },
    /// Moved to `hearth-bench engine`.
    #[command(hide = true)]
    Bench(Moved),
    /// Moved to `hearth-bench snapshots`.
    #[command(hide = true)]
    BenchSnapshots(Moved),
    /// Moved to `hearth-bench build`.
    #[command(hide = true)]
    BenchBuild(Moved),
    /// Moved to `hearth-bench api`.
    #[command(hide = true)]
    BenchApi(Moved),
    /// API client commands (talk to a running `hearth serve`; keys from AWS_ACCESS_KEY_ID /
    /// AWS_SECRET_ACCESS_KEY, endpoint from HEARTH_ENDPOINT).
    #[command(flatten)]
    Client(client::ClientCmd),
    /// Run the control plane: the Lambda MicroVMs API (SigV4, SQLite state, lifecycle,
    /// idle policy). Prints a first access key on first start.
    Serve(serve::ServeArgs),
    /// Manage the API's access keys (one tenant per account).
    #[command(subcommand)]
    Keys(serve::KeysCmd),
    /// What the operator allows each tenant account: file:// artifact roots, quotas, request rates.
    #[command(subcommand)]
    Accounts(accounts::AccountsCmd),
    /// The operator's named egress connectors (CIDR and domain allow lists every account may name).
    #[command(subcommand)]
    Connectors(connectors::ConnectorsCmd),
    /// A Model Context Protocol server for agents: sandboxes as tools (bash, files,
    /// processes, ports, suspend/resume/fork), on stdio or Streamable HTTP.
    Mcp(mcp::McpArgs),
}

/// The arguments of a command that moved to another binary: taken whole, so the user
/// hears where it went rather than that a flag is unknown.
#[derive(clap::Args)]
struct Moved {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    args: Vec<String>,
}

#[derive(Subcommand)]
enum VmCmd {
    /// Boot a VM, run one command in it, stream its output, and shut the VM down.
    ///
    /// The command's exit code becomes hearth's (128+N for a signal). Stdin is streamed to
    /// the command when it is not a terminal.
    Run(vmrun::RunArgs),
    /// Resume a VM suspended with `vm run --suspend-to DIR` (from any hearth process, after
    /// restarts and reboots), run a command in it, and suspend it back into DIR.
    Resume(snapcmd::ResumeArgs),
}

fn main() {
    let cli = Cli::parse();
    hearth_cli::logging(&cli.log, cli.log_json);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let code = rt.block_on(async {
        // Run directories left by a hearth that died without cleaning up (with their
        // overlays and RAM files) go first; live VMs of other processes hold their lock.
        let local_images = matches!(cli.command, Cmd::Image(_) | Cmd::Images(images::ImagesCmd::Local(_)));
        if local_images || matches!(cli.command, Cmd::Vm(_) | Cmd::Snapshot(_) | Cmd::Setup(_)) {
            hearth_vmm::vm::sweep_stale_run_dirs(&hearth_vmm::home::hearth_home().join("run"));
        }
        let result = match cli.command {
            Cmd::Setup(a) => setup::run(a).await.map(|()| 0),
            Cmd::Vm(VmCmd::Run(a)) => vmrun::run(a).await,
            Cmd::Vm(VmCmd::Resume(a)) => snapcmd::resume(a).await,
            Cmd::Snapshot(c) => snapcmd::run(c).await,
            Cmd::Base(c) => basecmd::run(c).await,
            Cmd::Images(c) => images::run(c).await,
            Cmd::Image(c) => {
                eprintln!("note: `hearth image …` is deprecated; use `hearth images local …`");
                imagecmd::run(c).await
            }
            Cmd::Accel { json, recheck } => accel(json, recheck).map(|()| 0),
            Cmd::Bench(_) => moved("bench", "engine"),
            Cmd::BenchSnapshots(_) => moved("bench-snapshots", "snapshots"),
            Cmd::BenchBuild(_) => moved("bench-build", "build"),
            Cmd::BenchApi(_) => moved("bench-api", "api"),
            Cmd::Serve(a) => serve::run(a).await.map(|()| 0),
            Cmd::Client(c) => client::run(c).await,
            Cmd::Keys(c) => serve::keys(c).map(|()| 0),
            Cmd::Accounts(c) => accounts::run(c).map(|()| 0),
            Cmd::Connectors(c) => connectors::run(c).map(|()| 0),
            Cmd::Mcp(a) => mcp::run(a).await,
        };
        match result {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e:#}");
                1
            }
        }
    });
    // Dropping the runtime lets VM guards kill anything still running before we exit.
    drop(rt);
    std::process::exit(code);
}

/// A benchmark asked of `hearth`: they live in `hearth-bench` now.
fn moved(old: &str, new: &str) -> anyhow::Result<i32> {
    anyhow::bail!("`hearth {old}` moved out of the product binary: run `hearth-bench {new} …` (same flags; built beside `hearth`)")
}

fn accel(json: bool, recheck: bool) -> anyhow::Result<()> {
    let spec = hearth_vmm::accel::default_canary();
    let v = hearth_vmm::accel::verdict(&spec, recheck);
    if json {
        let mut out = serde_json::to_value(&v)?;
        // The same spelling as `--accel` takes (and as before).
        out["accel"] = v.accel.to_string().into();
        out["cached"] = v.cached.into();
        out["cache"] = hearth_vmm::accel::cache_path(&hearth_vmm::home::hearth_home()).display().to_string().into();
        println!("{out}");
    } else {
        println!("auto picks: {}{}", v.accel, if v.cached { " (cached; --recheck measures again)" } else { "" });
        if let (Some(k), Some(h)) = (v.kvm_probe_ms, v.host_loop_ms) {
            println!("probe loop: {k:.3} ms under KVM, {h:.3} ms on the host");
        }
        if let Some(c) = v.canary_ms {
            println!("KVM boot canary reached /init in {c:.0} ms");
        }
        println!("why: {}", v.reason);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{images::ImagesCmd, Cli, Cmd};
    use clap::{CommandFactory, Parser};

    #[test]
    fn the_command_line_definition_is_consistent() {
        // clap checks names, flags and groups only when a command is built; this builds all.
        Cli::command().debug_assert();
    }

    #[test]
    fn images_is_the_one_family_and_old_spellings_still_parse() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["hearth"], args].concat()).map(|c| c.command);
        assert!(matches!(parse(&["images", "local", "build", "./app", "--name", "web"]), Ok(Cmd::Images(ImagesCmd::Local(_)))));
        assert!(matches!(parse(&["images", "local", "get", "web:v1"]), Ok(Cmd::Images(ImagesCmd::Local(_)))));
        assert!(matches!(parse(&["images", "create", "web", "./app"]), Ok(Cmd::Images(ImagesCmd::Create { .. }))));
        assert!(matches!(parse(&["image", "build", "./app", "--name", "web"]), Ok(Cmd::Image(_))));
        // Benchmarks moved out; their old names answer with where they went.
        assert!(matches!(parse(&["bench-api", "--runs", "3"]), Ok(Cmd::BenchApi(_))));
        assert!(matches!(parse(&["bench", "--debian"]), Ok(Cmd::Bench(_))));
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("  images ") && !help.contains("  image ") && !help.contains("bench"), "{help}");
    }
}
