//! Hearth's guest agent.
//!
//! Started by the kernel as PID 1 from Hearth's initramfs, it:
//! 1. mounts `/dev`, `/proc`, `/sys`, loads the kernel modules shipped beside it, mounts the
//!    VM's root disk and switches into it ([`init`]), so nothing of Hearth's stays in the
//!    user's filesystem;
//! 2. reaps every process that ends ([`reaper`]), as init must;
//! 3. serves the host with HTTP/2 on the virtio-serial port `hearth.agent` ([`port`],
//!    [`server`]), reconnecting whenever the host drops the connection;
//! 4. powers the VM off cleanly when asked.
//!
//! For tests it also runs as an ordinary process serving on a unix socket:
//! `hearth-agent --listen <path>`.

#![deny(missing_docs)]

mod archive;
mod exec;
mod files;
mod growfs;
mod hook;
mod init;
mod metadata;
mod net;
mod port;
mod pty;
mod reaper;
mod restore;
mod server;
mod tunnel;

use std::sync::Arc;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let is_init = std::process::id() == 1;
    if !is_init && args.get(1).map(String::as_str) != Some("--listen") {
        eprintln!("usage: hearth-agent --listen <unix-socket-path>");
        eprintln!("(as PID 1 inside a Hearth microVM it needs no arguments)");
        std::process::exit(2);
    }

    let boot = if is_init {
        match init::boot() {
            Ok(b) => Some(b),
            Err(e) => {
                // Without a root filesystem there is nothing to serve; say why on the console
                // and power off so the host sees a quick failure instead of a hang.
                eprintln!("hearth-agent: boot failed: {e}");
                init::power_off();
            }
        }
    } else {
        None
    };

    // One thread runs every task: guests usually have one vCPU, and under emulation each
    // hop between worker threads costs far more than the work it hands over.
    let rt = tokio::runtime::Builder::new_current_thread().max_blocking_threads(64).enable_all().build().expect("tokio runtime");
    rt.block_on(async move {
        // The metadata service (169.254.169.254:80 on lo); as a test process, where
        // HEARTH_AGENT_METADATA_LISTEN names a loopback address instead.
        let metadata = if is_init {
            Some((std::net::SocketAddr::from((metadata::ADDRESS, 80)), true))
        } else {
            std::env::var("HEARTH_AGENT_METADATA_LISTEN").ok().and_then(|a| a.parse().ok()).map(|a| (a, false))
        };
        if let Some((addr, add)) = metadata {
            if let Err(e) = metadata::start(addr, add) {
                eprintln!("hearth-agent: no metadata service: {e}");
            }
        }
        let reaper = reaper::Reaper::start();
        let state = Arc::new(server::State::new(reaper, is_init));
        let result = match boot {
            Some(b) => port::serve_port(&b.port_path, state).await,
            None => port::serve_unix(&args[2], state).await,
        };
        if let Err(e) = result {
            eprintln!("hearth-agent: serving failed: {e}");
        }
    });
    if is_init {
        init::power_off();
    }
}
