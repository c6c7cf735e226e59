//! Exec sessions of the agent client: collected output, events and a streamed exec.

use super::*;

/// Output of a finished exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Everything written to stdout.
    pub stdout: Vec<u8>,
    /// Everything written to stderr.
    pub stderr: Vec<u8>,
    /// How it ended.
    pub exit: ExecExit,
}

impl ExecOutput {
    /// Stdout as lossy UTF-8.
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    /// Stderr as lossy UTF-8.
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// One event of a running exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// A chunk of stdout.
    Stdout(Bytes),
    /// A chunk of stderr.
    Stderr(Bytes),
    /// The end.
    Exit(ExecExit),
}

/// The input side of a running exec, split off with [`ExecStream::take_input`].
pub struct ExecInput {
    tx: mpsc::Sender<Bytes>,
}

impl ExecInput {
    /// Sends bytes to the process's stdin.
    pub async fn write_stdin(&self, data: Bytes) -> Result<(), AgentError> {
        for f in hearth_proto::exec::chunked(FrameKind::Stdin, data) {
            self.tx.send(f.encode()).await.map_err(|_| AgentError::Connection("exec stream closed".into()))?;
        }
        Ok(())
    }

    /// Resizes the exec's terminal.
    pub async fn resize(&self, rows: u16, cols: u16) -> Result<(), AgentError> {
        Self::send_resize(Some(&self.tx), rows, cols).await
    }

    /// Sends a signal (see [`ExecStream::signal`]).
    pub async fn signal(&self, signal: i32) -> Result<(), AgentError> {
        Self::send_signal(Some(&self.tx), signal).await
    }

    async fn send_resize(tx: Option<&mpsc::Sender<Bytes>>, rows: u16, cols: u16) -> Result<(), AgentError> {
        let size = hearth_proto::exec::TtySize { rows, cols };
        size.validate().map_err(AgentError::Protocol)?;
        Self::control(tx, Frame::json(FrameKind::Resize, &size)).await
    }

    async fn send_signal(tx: Option<&mpsc::Sender<Bytes>>, signal: i32) -> Result<(), AgentError> {
        let sig = hearth_proto::exec::SignalRequest { signal };
        sig.validate().map_err(AgentError::Protocol)?;
        Self::control(tx, Frame::json(FrameKind::Signal, &sig)).await
    }

    async fn control(tx: Option<&mpsc::Sender<Bytes>>, frame: Frame) -> Result<(), AgentError> {
        let tx = tx.ok_or_else(|| AgentError::Protocol("the exec's input is already closed".into()))?;
        tx.send(frame.encode()).await.map_err(|_| AgentError::Connection("exec stream closed".into()))
    }
}

/// A running exec: send stdin, receive events.
pub struct ExecStream {
    pub(super) stdin: Option<mpsc::Sender<Bytes>>,
    pub(super) body: Incoming,
    pub(super) decoder: FrameDecoder,
    pub(super) done: bool,
}

impl ExecStream {
    /// Sends bytes to the process's stdin.
    pub async fn write_stdin(&mut self, data: Bytes) -> Result<(), AgentError> {
        let tx = self.stdin.clone().ok_or_else(|| AgentError::Protocol("stdin already closed".into()))?;
        ExecInput { tx }.write_stdin(data).await
    }

    /// Resizes the exec's terminal (execs started with a `tty`; ignored otherwise).
    pub async fn resize(&mut self, rows: u16, cols: u16) -> Result<(), AgentError> {
        ExecInput::send_resize(self.stdin.as_ref(), rows, cols).await
    }

    /// Sends a signal to the exec's processes: the terminal's foreground group for a `tty`
    /// exec, the exec's process group otherwise.
    pub async fn signal(&mut self, signal: i32) -> Result<(), AgentError> {
        ExecInput::send_signal(self.stdin.as_ref(), signal).await
    }

    /// Takes the input side (stdin, resizes, signals) to drive it from another task while
    /// this one reads events; dropping it closes stdin.
    pub fn take_input(&mut self) -> Option<ExecInput> {
        self.stdin.take().map(|tx| ExecInput { tx })
    }

    /// Closes the process's stdin (and with it the way to send signals and resizes).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// The next event; `None` after [`ExecEvent::Exit`].
    pub async fn next_event(&mut self) -> Result<Option<ExecEvent>, AgentError> {
        if self.done {
            return Ok(None);
        }
        loop {
            match self.decoder.next_frame() {
                Ok(Some(f)) => return self.event(f).map(Some),
                Ok(None) => {}
                Err(e) => return Err(AgentError::Protocol(e.to_string())),
            }
            match self.body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        self.decoder.push(&d);
                    }
                }
                Some(Err(e)) => return Err(conn_err(e)),
                None => return Err(AgentError::Connection("exec stream ended before the process's exit status".into())),
            }
        }
    }

    fn event(&mut self, f: Frame) -> Result<ExecEvent, AgentError> {
        match f.kind {
            FrameKind::Stdout => Ok(ExecEvent::Stdout(f.payload)),
            FrameKind::Stderr => Ok(ExecEvent::Stderr(f.payload)),
            FrameKind::Exit => {
                self.done = true;
                self.stdin = None;
                serde_json::from_slice(&f.payload).map(ExecEvent::Exit).map_err(|e| AgentError::Protocol(format!("bad exit frame: {e}")))
            }
            FrameKind::Error => {
                self.done = true;
                let body: ErrorBody =
                    serde_json::from_slice(&f.payload).map_err(|e| AgentError::Protocol(format!("bad error frame: {e}")))?;
                Err(AgentError::Remote(body))
            }
            k => Err(AgentError::Protocol(format!("unexpected {k:?} frame from the agent"))),
        }
    }

    /// Collects all output until exit, failing past `max_output` bytes.
    pub async fn collect(mut self, max_output: usize) -> Result<ExecOutput, AgentError> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        loop {
            match self.next_event().await? {
                Some(ExecEvent::Stdout(b)) => stdout.extend_from_slice(&b),
                Some(ExecEvent::Stderr(b)) => stderr.extend_from_slice(&b),
                Some(ExecEvent::Exit(exit)) => return Ok(ExecOutput { stdout, stderr, exit }),
                None => return Err(AgentError::Protocol("exec ended twice".into())),
            }
            if stdout.len() + stderr.len() > max_output {
                return Err(AgentError::OutputTooLarge(max_output));
            }
        }
    }
}
