//! `hearth vm run`: boot, run one command, shut down.

use crate::vmargs::VmArgs;
use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use hearth_proto::exec::ExecRequest;
use hearth_vmm::agent::ExecEvent;
use hearth_vmm::Vm;
use std::io::{IsTerminal, Write};
use tokio::io::AsyncReadExt;

/// Options of `hearth vm run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    vm: VmArgs,
    /// Instead of shutting the VM down afterwards, suspend it into this directory (resume
    /// it with `hearth vm resume DIR`).
    #[arg(long, value_name = "DIR")]
    suspend_to: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub cmd: CmdArgs,
}

/// The command to run and how.
#[derive(Args, Debug)]
pub struct CmdArgs {
    /// Environment variable for the command (KEY=VALUE); repeatable.
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    /// Working directory inside the guest (default /workspace).
    #[arg(long)]
    cwd: Option<String>,
    /// User to run as: a name from the guest's /etc/passwd or uid[:gid].
    #[arg(long)]
    user: Option<String>,
    /// Kill the command's process group after this many seconds.
    #[arg(long)]
    timeout: Option<f64>,
    /// Run the command through /bin/sh -c (a single string).
    #[arg(long)]
    shell: bool,
    /// Print one JSON object (boot time, exit, stdout, stderr) instead of streaming.
    #[arg(long)]
    pub json: bool,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, required = true)]
    command: Vec<String>,
}

fn request(args: &CmdArgs) -> anyhow::Result<ExecRequest> {
    let mut req = if args.shell { ExecRequest::shell(args.command.join(" ")) } else { ExecRequest::argv(args.command.clone()) };
    for kv in &args.env {
        let (k, v) = kv.split_once('=').with_context(|| format!("--env {kv:?} must be KEY=VALUE"))?;
        req.env.insert(k.to_owned(), v.to_owned());
    }
    req.cwd = args.cwd.clone();
    req.user = args.user.clone();
    if let Some(t) = args.timeout {
        anyhow::ensure!(t > 0.0 && t.is_finite(), "--timeout must be a positive number of seconds");
        req.timeout_ms = Some((t * 1000.0) as u64);
    }
    req.validate().map_err(anyhow::Error::msg)?;
    Ok(req)
}

/// Runs the command; returns the exit code to use.
pub async fn run(args: RunArgs) -> anyhow::Result<i32> {
    let req = request(&args.cmd)?;
    let cfg = args.vm.config()?;
    let vm = Vm::boot(cfg).await?;
    tracing::info!(vm = vm.id(), boot_ms = vm.boot_time().as_millis() as u64, "booted");
    finish(vm, &req, args.cmd.json, args.suspend_to.as_deref()).await
}

/// Runs `req` on `vm`, then suspends it into `suspend_to` or shuts it down. Ctrl-C stops
/// the command and shuts the VM down.
pub async fn finish(vm: Vm, req: &ExecRequest, json: bool, suspend_to: Option<&std::path::Path>) -> anyhow::Result<i32> {
    let result = tokio::select! {
        r = run_in(&vm, req, json) => r,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("interrupted; stopping the VM");
            vm.shutdown().await;
            return Ok(130);
        }
    };
    match suspend_to {
        Some(dir) if result.is_ok() => match vm.suspend(dir).await {
            Ok(s) => {
                if !json {
                    eprintln!("suspended into {} ({} MiB of state)", s.dir.display(), s.manifest.state.size >> 20);
                }
            }
            Err((vm, e)) => {
                vm.shutdown().await;
                return Err(anyhow::Error::new(e).context("suspend failed; the VM was shut down"));
            }
        },
        _ => {
            vm.shutdown().await;
        }
    }
    result
}

/// Builds the exec request of `args`.
pub fn exec_request(args: &CmdArgs) -> anyhow::Result<ExecRequest> {
    request(args)
}

async fn run_in(vm: &Vm, req: &ExecRequest, json: bool) -> anyhow::Result<i32> {
    let mut stream = vm.exec_stream(req).await?;
    let stdin = std::io::stdin();
    let mut stdin_task = None;
    if !stdin.is_terminal() {
        // Forward our stdin as it arrives, through a channel the exec loop drains.
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(8);
        stdin_task = Some(tokio::spawn(async move {
            let mut input = tokio::io::stdin();
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match input.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }));
        return pump(vm, stream, Some(rx), json, stdin_task).await;
    }
    stream.close_stdin();
    pump(vm, stream, None, json, stdin_task.take()).await
}

async fn pump(
    vm: &Vm,
    mut stream: hearth_vmm::agent::ExecStream,
    mut stdin: Option<tokio::sync::mpsc::Receiver<Bytes>>,
    json: bool,
    stdin_task: Option<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<i32> {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let exit = loop {
        let event = tokio::select! {
            chunk = async { stdin.as_mut().expect("guarded").recv().await }, if stdin.is_some() => {
                match chunk {
                    Some(b) => { stream.write_stdin(b).await?; }
                    None => { stdin = None; stream.close_stdin(); }
                }
                continue;
            }
            e = stream.next_event() => e,
        };
        match event {
            Ok(Some(ExecEvent::Stdout(b))) if json => out.extend_from_slice(&b),
            Ok(Some(ExecEvent::Stderr(b))) if json => err.extend_from_slice(&b),
            Ok(Some(ExecEvent::Stdout(b))) => {
                let mut o = std::io::stdout().lock();
                o.write_all(&b)?;
                o.flush()?;
            }
            Ok(Some(ExecEvent::Stderr(b))) => {
                let mut e = std::io::stderr().lock();
                e.write_all(&b)?;
                e.flush()?;
            }
            Ok(Some(ExecEvent::Exit(x))) => break x,
            Ok(None) => anyhow::bail!("exec ended without an exit status"),
            Err(e) => return Err(vm.diagnose(e).await.into()),
        }
    };
    if let Some(t) = stdin_task {
        t.abort();
    }
    let code = match (exit.code, exit.signal) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => 1,
    };
    if json {
        println!(
            "{}",
            serde_json::json!({
                "vm": vm.id(),
                "accel": vm.accel().to_string(),
                "boot_ms": vm.boot_time().as_secs_f64() * 1000.0,
                "exit_code": exit.code,
                "signal": exit.signal,
                "timed_out": exit.timed_out,
                "stdout": String::from_utf8_lossy(&out),
                "stderr": String::from_utf8_lossy(&err),
            })
        );
    } else if exit.timed_out {
        eprintln!("hearth: the command timed out and was killed");
    }
    Ok(code)
}
