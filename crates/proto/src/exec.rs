//! Exec: the request, its result, and the frames both bodies of `POST /v1/exec` carry.
//!
//! HTTP/2 multiplexes the streams of concurrent execs; inside one exec's request and
//! response bodies, frames tell stdin, stdout, stderr and the result apart:
//!
//! ```text
//! +--------+----------------+-------------------+
//! | kind u8| length u32 (BE)| payload (length)  |
//! +--------+----------------+-------------------+
//! ```
//!
//! The request body is one [`FrameKind::Spec`] frame (JSON [`ExecRequest`]) followed by
//! [`FrameKind::Stdin`] frames; the end of the body closes the process's stdin. The response
//! body is [`FrameKind::Stdout`] and [`FrameKind::Stderr`] frames as the process writes, then
//! exactly one [`FrameKind::Exit`] (JSON [`ExecExit`]) or [`FrameKind::Error`] (JSON
//! [`crate::ErrorBody`]). A payload longer than [`MAX_FRAME_PAYLOAD`] is a protocol error.
//!
//! An exec with [`ExecRequest::tty`] runs on a pseudo-terminal: the process is a session
//! leader with the terminal as its controlling tty and as stdin, stdout and stderr, so all
//! of its output arrives as [`FrameKind::Stdout`]. The request body may then also carry
//! [`FrameKind::Resize`] frames (JSON [`TtySize`]); any exec's body may carry
//! [`FrameKind::Signal`] frames (JSON [`SignalRequest`]), delivered to the terminal's
//! foreground process group, or to the exec's process group without a terminal.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Largest payload of one frame. Output is chunked below this by the sender.
pub const MAX_FRAME_PAYLOAD: usize = 1 << 20;
/// Size of the frame header.
pub const FRAME_HEADER_LEN: usize = 5;
/// Most environment variables one exec may set.
pub const MAX_ENV: usize = 1024;
/// Most arguments one exec may pass.
pub const MAX_ARGS: usize = 4096;

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// An argument vector run directly; the first element is looked up in `PATH`.
    Argv(Vec<String>),
    /// A string run by `/bin/sh -c`.
    Shell(String),
}

/// One exec request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// The command.
    pub command: Command,
    /// Extra environment variables, over a default `PATH`, `HOME`, `USER` and `TERM`.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory; `/workspace` when absent.
    #[serde(default)]
    pub cwd: Option<String>,
    /// User name or `uid[:gid]`; `root` when absent.
    #[serde(default)]
    pub user: Option<String>,
    /// Kill the whole process group after this many milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Whether stdin frames will follow; when false the process gets `/dev/null` (one
    /// pipe fewer to set up per exec).
    #[serde(default = "yes")]
    pub stdin: bool,
    /// Run on a pseudo-terminal of this size (an interactive shell); absent for pipes.
    /// Left out of the JSON when absent, so agents that predate it accept the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<TtySize>,
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TtySize {
    /// Rows, 1 to [`MAX_TTY_CELLS`].
    pub rows: u16,
    /// Columns, 1 to [`MAX_TTY_CELLS`].
    pub cols: u16,
}

/// Largest number of rows or columns a terminal may have.
pub const MAX_TTY_CELLS: u16 = 4096;

impl TtySize {
    /// Checks the size is within bounds.
    pub fn validate(&self) -> Result<(), String> {
        if self.rows == 0 || self.cols == 0 || self.rows > MAX_TTY_CELLS || self.cols > MAX_TTY_CELLS {
            return Err(format!("terminal size {}x{} is out of range (1 to {MAX_TTY_CELLS})", self.cols, self.rows));
        }
        Ok(())
    }
}

/// A signal for the exec's processes (the payload of a [`FrameKind::Signal`] frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    /// The signal number, 1 to 64.
    pub signal: i32,
}

impl SignalRequest {
    /// Checks the number names a signal.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=64).contains(&self.signal) {
            return Err(format!("signal {} is not a signal number (1 to 64)", self.signal));
        }
        Ok(())
    }
}

fn yes() -> bool {
    true
}

impl ExecRequest {
    /// An argv exec with defaults.
    pub fn argv<I, S>(args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecRequest {
            command: Command::Argv(args.into_iter().map(Into::into).collect()),
            env: BTreeMap::new(),
            cwd: None,
            user: None,
            timeout_ms: None,
            stdin: true,
            tty: None,
        }
    }

    /// A shell-string exec with defaults.
    pub fn shell(script: impl Into<String>) -> Self {
        ExecRequest { command: Command::Shell(script.into()), ..ExecRequest::argv::<_, String>([]) }
    }

    /// Checks limits and shape; the agent runs this before spawning anything.
    pub fn validate(&self) -> Result<(), String> {
        match &self.command {
            Command::Argv(a) if a.is_empty() => return Err("argv is empty".into()),
            Command::Argv(a) if a.len() > MAX_ARGS => return Err(format!("{} arguments; the limit is {MAX_ARGS}", a.len())),
            Command::Argv(a) if a.iter().any(|s| s.contains('\0')) => return Err("an argument contains a NUL byte".into()),
            Command::Shell(s) if s.contains('\0') => return Err("the shell command contains a NUL byte".into()),
            _ => {}
        }
        if self.env.len() > MAX_ENV {
            return Err(format!("{} environment variables; the limit is {MAX_ENV}", self.env.len()));
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return Err(format!("invalid environment variable name or value: {k:?}"));
            }
        }
        if let Some(t) = &self.tty {
            t.validate()?;
        }
        if let Some(cwd) = &self.cwd {
            if !cwd.starts_with('/') || cwd.contains('\0') {
                return Err(format!("cwd must be an absolute path, got {cwd:?}"));
            }
        }
        Ok(())
    }
}

/// How an exec ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecExit {
    /// Exit code when the process exited normally.
    pub code: Option<i32>,
    /// Signal number when a signal ended it.
    pub signal: Option<i32>,
    /// True when the exec's timeout killed it.
    pub timed_out: bool,
}

impl ExecExit {
    /// True when the process exited with code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// The kinds of frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// JSON [`ExecRequest`]; first frame of a request body.
    Spec = 1,
    /// Bytes for the process's stdin.
    Stdin = 2,
    /// Bytes the process wrote to stdout.
    Stdout = 3,
    /// Bytes the process wrote to stderr.
    Stderr = 4,
    /// JSON [`ExecExit`]; last frame of a response body.
    Exit = 5,
    /// JSON [`crate::ErrorBody`]; last frame of a response body when the exec failed.
    Error = 6,
    /// JSON [`TtySize`]: the terminal was resized (request body, tty execs only).
    Resize = 7,
    /// JSON [`SignalRequest`]: send a signal (request body).
    Signal = 8,
}

impl FrameKind {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => FrameKind::Spec,
            2 => FrameKind::Stdin,
            3 => FrameKind::Stdout,
            4 => FrameKind::Stderr,
            5 => FrameKind::Exit,
            6 => FrameKind::Error,
            7 => FrameKind::Resize,
            8 => FrameKind::Signal,
            _ => return None,
        })
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the payload is.
    pub kind: FrameKind,
    /// The payload.
    pub payload: Bytes,
}

/// Why a byte stream is not a valid frame sequence.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// Unknown kind byte.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// Declared payload larger than [`MAX_FRAME_PAYLOAD`].
    #[error("frame declares {0} bytes; the limit is {MAX_FRAME_PAYLOAD}")]
    TooLarge(u32),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame")]
    Truncated,
}

impl Frame {
    /// A frame of the given kind.
    pub fn new(kind: FrameKind, payload: impl Into<Bytes>) -> Self {
        Frame { kind, payload: payload.into() }
    }

    /// A JSON frame.
    pub fn json<T: Serialize>(kind: FrameKind, value: &T) -> Self {
        // Serializing our own plain structs cannot fail.
        Frame::new(kind, serde_json::to_vec(value).unwrap_or_default())
    }

    /// Encodes the frame. Payloads over the limit must be split by the caller.
    pub fn encode(&self) -> Bytes {
        debug_assert!(self.payload.len() <= MAX_FRAME_PAYLOAD);
        let mut b = BytesMut::with_capacity(FRAME_HEADER_LEN + self.payload.len());
        b.put_u8(self.kind as u8);
        b.put_u32(self.payload.len() as u32);
        b.put_slice(&self.payload);
        b.freeze()
    }
}

/// Incremental decoder: feed it chunks as they arrive, take frames out.
///
/// It never buffers more than one header plus [`MAX_FRAME_PAYLOAD`] bytes beyond what was
/// fed in a single chunk, and it checks the declared length before buffering a payload.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: BytesMut,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// Takes the next complete frame, if any.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.buf.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let kind = FrameKind::from_u8(self.buf[0]).ok_or(FrameError::UnknownKind(self.buf[0]))?;
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        if len as usize > MAX_FRAME_PAYLOAD {
            return Err(FrameError::TooLarge(len));
        }
        if self.buf.len() < FRAME_HEADER_LEN + len as usize {
            return Ok(None);
        }
        self.buf.advance(FRAME_HEADER_LEN);
        let payload = self.buf.split_to(len as usize).freeze();
        Ok(Some(Frame { kind, payload }))
    }

    /// Call at end of stream: an error when bytes of a partial frame remain.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated)
        }
    }

    /// Bytes buffered and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

/// Splits a chunk of output into frames no larger than the limit.
pub fn chunked(kind: FrameKind, data: Bytes) -> impl Iterator<Item = Frame> {
    let mut rest = data;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let n = rest.len().min(MAX_FRAME_PAYLOAD);
        Some(Frame::new(kind, rest.split_to(n)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn huge_length_is_refused_before_buffering() {
        let mut d = FrameDecoder::new();
        d.push(&[3, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(d.next_frame(), Err(FrameError::TooLarge(u32::MAX)));
    }

    #[test]
    fn unknown_kind_is_refused() {
        let mut d = FrameDecoder::new();
        d.push(&[99, 0, 0, 0, 0]);
        assert_eq!(d.next_frame(), Err(FrameError::UnknownKind(99)));
    }

    #[test]
    fn partial_frame_is_truncated_at_end() {
        let mut d = FrameDecoder::new();
        d.push(&[3, 0, 0, 0, 4, b'a']);
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(d.finish(), Err(FrameError::Truncated));
    }

    #[test]
    fn request_validation() {
        assert!(ExecRequest::argv::<_, String>([]).validate().is_err());
        assert!(ExecRequest::argv(["true"]).validate().is_ok());
        let mut r = ExecRequest::shell("echo");
        r.cwd = Some("relative".into());
        assert!(r.validate().is_err());
        let mut r = ExecRequest::shell("echo");
        r.env.insert("A=B".into(), "x".into());
        assert!(r.validate().is_err());
        let mut r = ExecRequest::shell("echo");
        r.tty = Some(TtySize { rows: 0, cols: 80 });
        assert!(r.validate().is_err());
        r.tty = Some(TtySize { rows: 24, cols: 80 });
        assert!(r.validate().is_ok());
        assert!(SignalRequest { signal: 0 }.validate().is_err());
        assert!(SignalRequest { signal: 65 }.validate().is_err());
        assert!(SignalRequest { signal: 2 }.validate().is_ok());
    }

    #[test]
    fn requests_without_a_tty_serialize_as_before() {
        let json = serde_json::to_string(&ExecRequest::shell("true")).unwrap();
        assert!(!json.contains("tty"), "{json}");
    }

    #[test]
    fn spec_json_refuses_unknown_fields() {
        let bad = r#"{"command":{"shell":"true"},"bogus":1}"#;
        assert!(serde_json::from_str::<ExecRequest>(bad).is_err());
    }

    proptest! {
        #[test]
        fn frames_round_trip_across_any_split(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..2000), 0..8),
            split in 1usize..64,
        ) {
            let frames: Vec<Frame> = payloads.into_iter()
                .map(|p| Frame::new(FrameKind::Stdout, p)).collect();
            let wire: Vec<u8> = frames.iter().flat_map(|f| f.encode().to_vec()).collect();
            let mut d = FrameDecoder::new();
            let mut out = Vec::new();
            for chunk in wire.chunks(split) {
                d.push(chunk);
                while let Some(f) = d.next_frame().unwrap() { out.push(f); }
            }
            d.finish().unwrap();
            prop_assert_eq!(out, frames);
        }

        #[test]
        fn spec_parsing_and_validation_never_panic(json in ".{0,300}") {
            if let Ok(r) = serde_json::from_str::<ExecRequest>(&json) {
                let _ = r.validate();
            }
            if let Ok(r) = serde_json::from_str::<crate::RestoreInfo>(&json) {
                let _ = r.validate();
            }
            let _ = serde_json::from_str::<crate::files::FsRequest>(&json);
        }

        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut d = FrameDecoder::new();
            d.push(&bytes);
            while let Ok(Some(_)) = d.next_frame() {}
        }
    }
}
