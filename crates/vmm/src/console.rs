//! The guest's serial console: QEMU writes it to a socket; the host copies it into
//! `console.log` with a size cap, so a guest writing forever cannot fill the host's disk.

use std::path::PathBuf;
use std::time::Duration;

/// Most bytes of console output kept on disk; beyond this the log starts over (the most
/// recent output is what errors quote).
pub const MAX_CONSOLE_BYTES: u64 = 4 << 20;

/// Copies the guest's serial console into `console.log`, capped at [`MAX_CONSOLE_BYTES`].
/// Stops when QEMU closes the socket or the owning `Vm` drops.
pub(crate) struct ConsoleTap(tokio::task::JoinHandle<()>);

impl ConsoleTap {
    pub(crate) fn start(sock: PathBuf, log: PathBuf) -> ConsoleTap {
        ConsoleTap(tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = loop {
                match tokio::net::UnixStream::connect(&sock).await {
                    Ok(s) => break s,
                    Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                }
            };
            let Ok(mut file) = tokio::fs::OpenOptions::new().create(true).append(true).open(&log).await else { return };
            let mut written = 0u64;
            let mut buf = vec![0u8; 16 << 10];
            loop {
                let n = match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if written + n as u64 > MAX_CONSOLE_BYTES {
                    let _ = file.set_len(0).await;
                    written = 0;
                }
                if file.write_all(&buf[..n]).await.is_err() {
                    return;
                }
                written += n as u64;
            }
        }))
    }
}

impl ConsoleTap {
    /// Waits (up to 500 ms) for the last output to be copied after QEMU exited.
    pub(crate) async fn settle(&self) {
        for _ in 0..50 {
            if self.0.is_finished() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for ConsoleTap {
    fn drop(&mut self) {
        self.0.abort();
    }
}
