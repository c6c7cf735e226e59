//! A VM's logs, bounded on disk: a guest writing to its serial port forever, or making QEMU
//! warn in a loop, must not fill the host's disk.
//!
//! QEMU writes the console to a socket; the host copies it into `console.log`. QEMU's own
//! stderr goes straight to `qemu.log` (a detached QEMU outlives the process that started it,
//! so it cannot be a pipe), opened for appending, and the same task trims that file while
//! the VM is held. A log over its cap keeps its most recent part (what errors quote: the
//! last lines, a kernel panic line among them), after a line saying how much was dropped.
//! Both files are created owner-only (0600).

use crate::qemu::RunPaths;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Most bytes of console output kept on disk.
pub const MAX_CONSOLE_BYTES: u64 = 4 << 20;
/// Most bytes of QEMU's log kept on disk (it normally holds a few lines).
pub const MAX_QEMU_LOG_BYTES: u64 = 1 << 20;
/// How often the size of QEMU's log is checked.
const QEMU_LOG_CHECK: Duration = Duration::from_secs(1);

/// Trims the log at `path` when it is over `max` bytes to its last quarter (from the first
/// line that starts in it), led by a note of what was dropped; returns its size. Writers
/// that append (`O_APPEND`) go on at the new end; bytes appended while the trim runs may be
/// lost: this is a bound on disk use, not an archive.
pub(crate) fn trim_log(path: &Path, max: u64) -> std::io::Result<u64> {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
    let len = f.metadata()?.len();
    if len <= max {
        return Ok(len);
    }
    let keep = max / 4;
    let mut tail = vec![0u8; keep as usize];
    f.read_exact_at(&mut tail, len - keep)?;
    let from = tail.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1);
    let dropped = len - keep + from as u64;
    let mut out = format!("[hearth: {dropped} earlier bytes of this log were dropped; it keeps at most {max}]\n").into_bytes();
    out.extend_from_slice(&tail[from..]);
    // Not opened for appending: the write lands at offset 0.
    f.write_all_at(&out, 0)?;
    f.set_len(out.len() as u64)?;
    Ok(out.len() as u64)
}

/// Trims off the event loop (a trim copies up to a quarter of the cap).
async fn trim(path: PathBuf, max: u64) -> std::io::Result<u64> {
    tokio::task::spawn_blocking(move || trim_log(&path, max)).await.unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

/// Copies the guest's serial console into `console.log`, capped at [`MAX_CONSOLE_BYTES`],
/// and keeps `qemu.log` under [`MAX_QEMU_LOG_BYTES`]. Stops when QEMU closes the socket or
/// the owning `Vm` drops.
pub(crate) struct ConsoleTap(tokio::task::JoinHandle<()>);

impl ConsoleTap {
    pub(crate) fn start(paths: &RunPaths) -> ConsoleTap {
        let (sock, log, qemu_log) = (paths.console_sock.clone(), paths.console.clone(), paths.qemu_log.clone());
        ConsoleTap(tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = loop {
                match tokio::net::UnixStream::connect(&sock).await {
                    Ok(s) => break s,
                    Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                }
            };
            let Ok(mut file) = tokio::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&log).await else {
                return;
            };
            // A reattached VM's console already holds output.
            let mut size = file.metadata().await.map_or(0, |m| m.len());
            let mut buf = vec![0u8; 16 << 10];
            let mut check = tokio::time::interval(QEMU_LOG_CHECK);
            check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    r = stream.read(&mut buf) => {
                        let n = match r {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if size + n as u64 > MAX_CONSOLE_BYTES {
                            size = match trim(log.clone(), MAX_CONSOLE_BYTES - n as u64).await {
                                Ok(s) => s,
                                // Still bounded, if less helpfully.
                                Err(_) => file.set_len(0).await.map_or(size, |()| 0),
                            };
                        }
                        if file.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        size += n as u64;
                    }
                    _ = check.tick() => {
                        let _ = trim(qemu_log.clone(), MAX_QEMU_LOG_BYTES).await;
                    }
                }
            }
            // QEMU closed the console: it is ending; its last words are kept, within the cap.
            let _ = trim(qemu_log, MAX_QEMU_LOG_BYTES).await;
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

/// The last `lines` lines of a file, reading at most its last 64 KiB.
pub fn file_tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = std::fs::File::open(path) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 << 10)));
    let mut buf = Vec::new();
    let _ = f.take(64 << 10).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_over_its_cap_keeps_its_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut text = String::from("early boot line\n");
        for i in 0..2000 {
            text.push_str(&format!("spam line {i:05}\n"));
        }
        text.push_str("Kernel panic - not syncing: the cause\nlast line\n");
        std::fs::write(&path, &text).unwrap();
        // Under the cap: untouched.
        assert_eq!(trim_log(&path, 1 << 20).unwrap(), text.len() as u64);
        let max = 4096;
        let size = trim_log(&path, max).unwrap();
        let kept = std::fs::read_to_string(&path).unwrap();
        assert_eq!(size, kept.len() as u64);
        assert!(size <= max / 4 + 100, "{size}");
        assert!(kept.starts_with("[hearth: ") && kept.contains("dropped"), "{kept}");
        assert!(!kept.contains("early boot line"));
        // Whole lines after the note, the last ones kept.
        assert!(kept.lines().skip(1).all(|l| l.starts_with("spam line") || l.starts_with("Kernel panic") || l == "last line"), "{kept}");
        assert!(kept.ends_with("Kernel panic - not syncing: the cause\nlast line\n"));
        assert_eq!(file_tail(&path, 1), "last line");
    }

    #[test]
    fn appenders_go_on_at_the_new_end() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qemu.log");
        let mut w = std::fs::OpenOptions::new().create(true).append(true).open(&path).unwrap();
        for _ in 0..1000 {
            w.write_all(b"qemu: warning: again\n").unwrap();
        }
        let size = trim_log(&path, 4096).unwrap();
        w.write_all(b"qemu: the end\n").unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        assert_eq!(len, size + 14, "no hole where the trimmed bytes were");
        assert!(std::fs::read_to_string(&path).unwrap().ends_with("again\nqemu: the end\n"));
    }

    #[tokio::test]
    async fn the_console_copy_stays_under_its_cap() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let paths = RunPaths::new(dir.path());
        let listener = tokio::net::UnixListener::bind(&paths.console_sock).unwrap();
        std::fs::write(&paths.qemu_log, vec![b'x'; (MAX_QEMU_LOG_BYTES + 10) as usize]).unwrap();
        let tap = ConsoleTap::start(&paths);
        let (mut guest, _) = listener.accept().await.unwrap();
        let line = [b'y'; 1023].iter().chain(b"\n").copied().collect::<Vec<u8>>();
        for _ in 0..(MAX_CONSOLE_BYTES / 1024 * 2 + 7) {
            guest.write_all(&line).await.unwrap();
        }
        guest.write_all(b"the last words\n").await.unwrap();
        drop(guest);
        for _ in 0..500 {
            if tap.0.is_finished() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(tap.0.is_finished());
        let console = std::fs::read(&paths.console).unwrap();
        assert!(console.len() as u64 <= MAX_CONSOLE_BYTES, "{}", console.len());
        assert!(console.ends_with(b"the last words\n"));
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&paths.console).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
        assert!(std::fs::metadata(&paths.qemu_log).unwrap().len() <= MAX_QEMU_LOG_BYTES);
    }
}
