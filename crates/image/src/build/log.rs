//! A build's log file, bounded: the first [`MAX_LOG_HEAD`] bytes as they come, then only
//! the last [`MAX_LOG_TAIL`] bytes of lines, written after a line that says how much was
//! dropped. A `RUN yes` fills neither the disk nor the daemon's memory, and the log still
//! shows how the build began and how it ended.
//!
//! Lines are taken from the build (a synchronous callback, [`BuildLog::line`]) and written
//! by a task on the blocking pool, so no file write runs on the async runtime's workers.

use std::collections::VecDeque;
use std::io::Write;
use std::path::Path;
use std::sync::mpsc;

/// Most bytes of a build log kept from its start: 8 MiB.
pub const MAX_LOG_HEAD: usize = 8 << 20;

/// Most bytes of lines kept from its end once the head is full: 64 KiB.
pub const MAX_LOG_TAIL: usize = 64 << 10;

/// A build log being written (see the module's documentation).
#[derive(Debug)]
pub struct BuildLog {
    tx: mpsc::Sender<Vec<u8>>,
    writer: tokio::task::JoinHandle<std::io::Result<()>>,
    head: usize,
    tail: VecDeque<String>,
    tail_bytes: usize,
    dropped_bytes: u64,
    dropped_lines: u64,
}

impl BuildLog {
    /// Creates (truncates) the log at `path`.
    ///
    /// # Errors
    ///
    /// The file cannot be created.
    pub async fn create(path: &Path) -> std::io::Result<BuildLog> {
        let p = path.to_path_buf();
        let file = tokio::task::spawn_blocking(move || std::fs::File::create(p)).await.map_err(std::io::Error::other)??;
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let writer = tokio::task::spawn_blocking(move || {
            // Written in batches, flushed whenever the build pauses: the file shows the
            // build as it goes without a write per line.
            let mut f = std::io::BufWriter::new(file);
            while let Ok(chunk) = rx.recv() {
                f.write_all(&chunk)?;
                while let Ok(more) = rx.try_recv() {
                    f.write_all(&more)?;
                }
                f.flush()?;
            }
            f.flush()
        });
        Ok(BuildLog { tx, writer, head: 0, tail: VecDeque::new(), tail_bytes: 0, dropped_bytes: 0, dropped_lines: 0 })
    }

    /// Adds `line` (a newline is added): written while the head has room, else kept in
    /// the bounded tail.
    pub fn line(&mut self, line: &str) {
        let len = line.len() + 1;
        if self.tail.is_empty() && self.head + len <= MAX_LOG_HEAD {
            self.head += len;
            let _ = self.tx.send(format!("{line}\n").into_bytes());
            return;
        }
        // One line longer than the whole tail keeps its end only.
        let line = match line.len().checked_sub(MAX_LOG_TAIL - 1) {
            Some(cut) if cut > 0 => {
                let at = (cut..line.len()).find(|i| line.is_char_boundary(*i)).unwrap_or(line.len());
                self.dropped_bytes += at as u64;
                &line[at..]
            }
            _ => line,
        };
        self.tail_bytes += line.len() + 1;
        self.tail.push_back(line.to_owned());
        while self.tail_bytes > MAX_LOG_TAIL {
            let Some(old) = self.tail.pop_front() else { break };
            self.tail_bytes -= old.len() + 1;
            self.dropped_bytes += old.len() as u64 + 1;
            self.dropped_lines += 1;
        }
    }

    /// Writes the tail (after a line saying what was dropped, if anything was) and waits
    /// for the file to be written.
    ///
    /// # Errors
    ///
    /// A write failed.
    pub async fn finish(mut self) -> std::io::Result<()> {
        if self.dropped_bytes > 0 {
            let _ = self.tx.send(
                format!(
                    "[hearth: build log truncated: {} bytes ({} lines) dropped; the log keeps its first {} MiB and its last {} KiB]\n",
                    self.dropped_bytes,
                    self.dropped_lines,
                    MAX_LOG_HEAD >> 20,
                    MAX_LOG_TAIL >> 10
                )
                .into_bytes(),
            );
        }
        for l in std::mem::take(&mut self.tail) {
            let _ = self.tx.send(format!("{l}\n").into_bytes());
        }
        drop(self.tx);
        self.writer.await.map_err(std::io::Error::other)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_flood_keeps_the_head_a_marker_and_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("build.log");
        let mut log = BuildLog::create(&path).await.unwrap();
        log.line("step 1/1 (line 2): Run");
        let flood = 3 * MAX_LOG_HEAD / 6;
        for _ in 0..flood {
            log.line("  | y");
        }
        log.line("the end");
        log.finish().await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.len() <= MAX_LOG_HEAD + MAX_LOG_TAIL + 200, "{}", text.len());
        assert!(text.starts_with("step 1/1 (line 2): Run\n  | y\n"));
        assert!(text.contains("[hearth: build log truncated: "), "no marker");
        assert!(text.ends_with("  | y\nthe end\n"));

        // A line longer than the whole tail keeps its end.
        let mut log = BuildLog::create(&path).await.unwrap();
        for _ in 0..flood {
            log.line("  | y");
        }
        log.line(&format!("{}END", "z".repeat(3 * MAX_LOG_TAIL)));
        log.finish().await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.len() <= MAX_LOG_HEAD + MAX_LOG_TAIL + 200, "{}", text.len());
        assert!(text.ends_with("zzzEND\n"));
    }

    #[tokio::test]
    async fn a_short_log_is_whole_and_unmarked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("build.log");
        let mut log = BuildLog::create(&path).await.unwrap();
        log.line("a");
        log.line("b");
        log.finish().await.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a\nb\n");
    }
}
