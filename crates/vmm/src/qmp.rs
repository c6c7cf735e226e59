//! A small QMP client.
//!
//! QMP is newline-delimited JSON over a unix socket: a greeting, `qmp_capabilities`, then
//! commands answered in order, with asynchronous events interleaved. We read lines with a
//! size limit (a compromised QEMU is as untrusted as its guest) and keep events we skip
//! in a bounded log for callers that wait on them.
//!
//! Hand-written rather than the `qapi` crate: its generated command types trail QEMU 10's
//! schema (migration channels, `mapped-ram`), and the few commands Hearth sends are
//! simplest as `serde_json::Value`s.

use serde_json::{json, Value};
use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// Longest line accepted from QEMU.
pub const MAX_LINE: usize = 1 << 20;
/// Events kept for [`Qmp::take_events`].
const MAX_EVENTS: usize = 256;

/// A QMP failure.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Socket trouble.
    #[error("QMP I/O failed")]
    Io(#[from] std::io::Error),
    /// QEMU sent something that is not QMP.
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    /// QEMU answered with an error.
    #[error("QEMU refused {command}: {class}: {desc}")]
    Command {
        /// The command sent.
        command: String,
        /// QMP error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// No answer in time.
    #[error("QMP command {0} timed out")]
    Timeout(String),
}

/// A connected QMP session.
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    events: VecDeque<Value>,
    next_id: u64,
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path).await?;
        let (r, w) = stream.into_split();
        let mut qmp = Qmp { reader: BufReader::new(r), writer: w, events: VecDeque::new(), next_id: 1 };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!("expected a QMP greeting, got {greeting}")));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Connects as soon as QEMU listens: the socket file appears at bind(), a moment
    /// before QEMU accepts, so connecting is retried for up to `give_up`.
    pub async fn connect_retrying(path: &Path, give_up: Duration) -> Result<Qmp, QmpError> {
        let give_up = tokio::time::Instant::now() + give_up;
        loop {
            match Qmp::connect(path).await {
                Ok(q) => return Ok(q),
                Err(e) if tokio::time::Instant::now() > give_up => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }

    async fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = Vec::new();
        let n = AsyncReadExt::take(&mut self.reader, MAX_LINE as u64 + 1).read_until(b'\n', &mut line).await?;
        if n == 0 {
            return Err(QmpError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        if line.len() > MAX_LINE {
            return Err(QmpError::Protocol(format!("line longer than {MAX_LINE} bytes")));
        }
        serde_json::from_slice(&line).map_err(|e| QmpError::Protocol(format!("invalid JSON: {e}")))
    }

    /// Runs a command and returns its `return` value.
    pub async fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut bytes = serde_json::to_vec(&msg).map_err(|e| QmpError::Protocol(e.to_string()))?;
        bytes.push(b'\n');
        self.writer.write_all(&bytes).await?;
        loop {
            let m = self.read_message().await?;
            if m.get("event").is_some() {
                if self.events.len() == MAX_EVENTS {
                    self.events.pop_front();
                }
                self.events.push_back(m);
                continue;
            }
            if m.get("id").and_then(Value::as_u64) != Some(id) {
                continue;
            }
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: e.get("class").and_then(Value::as_str).unwrap_or("?").to_owned(),
                    desc: e.get("desc").and_then(Value::as_str).unwrap_or("?").to_owned(),
                });
            }
            return Err(QmpError::Protocol(format!("unexpected answer {m}")));
        }
    }

    /// Runs a command with a time limit.
    pub async fn execute_timeout(&mut self, command: &str, arguments: Option<Value>, timeout: Duration) -> Result<Value, QmpError> {
        tokio::time::timeout(timeout, self.execute(command, arguments)).await.map_err(|_| QmpError::Timeout(command.to_owned()))?
    }

    /// Events received while waiting for answers, oldest first.
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }

    /// Waits for the next event (kept events first).
    pub async fn next_event(&mut self) -> Result<Value, QmpError> {
        if let Some(e) = self.events.pop_front() {
            return Ok(e);
        }
        loop {
            let m = self.read_message().await?;
            if m.get("event").is_some() {
                return Ok(m);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A QMP server that greets, then answers each line it reads with the next of `script`.
    pub(crate) async fn fake_qemu(script: &'static [&'static str]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let l = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let (r, mut w) = s.split();
            let mut r = BufReader::new(r);
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n").await.unwrap();
            for answer in script {
                let mut line = String::new();
                r.read_line(&mut line).await.unwrap();
                w.write_all(answer.as_bytes()).await.unwrap();
            }
            // keep the socket open until the client goes
            let mut line = String::new();
            let _ = r.read_line(&mut line).await;
        });
        (dir, path)
    }

    #[tokio::test]
    async fn commands_skip_events_and_report_errors() {
        let (_d, p) = fake_qemu(&[
            "{\"return\": {}, \"id\": 1}\n",
            "{\"event\": \"STOP\"}\n{\"return\": {\"status\": \"paused\"}, \"id\": 2}\n",
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}, \"id\": 3}\n",
        ])
        .await;
        let mut q = Qmp::connect(&p).await.unwrap();
        let r = q.execute("query-status", None).await.unwrap();
        assert_eq!(r["status"], "paused");
        assert_eq!(q.take_events().len(), 1);
        let e = q.execute("stop", None).await.unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }

    #[tokio::test]
    async fn oversized_line_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let l = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let junk = vec![b'x'; MAX_LINE + 10];
            let _ = s.write_all(&junk).await;
        });
        let e = Qmp::connect(&path).await.err().unwrap();
        assert!(matches!(e, QmpError::Protocol(_)), "{e}");
    }
}
