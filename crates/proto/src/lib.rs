//! Types that cross a Hearth boundary. No I/O lives here.
//!
//! # The host–agent protocol (version [`PROTOCOL_VERSION`])
//!
//! The agent (the guest's PID 1) serves **HTTP/2** on a virtio-serial port named
//! [`AGENT_PORT_NAME`]; QEMU binds the host end of that port to a unix socket and the host
//! is the HTTP/2 client. HTTP/2 gives us multiplexed, flow-controlled streams, so several
//! execs and file transfers share the one byte pipe without framing of our own.
//!
//! The host may drop the connection at any moment (it always does around snapshots); the
//! agent then waits for the host to reconnect and serves a fresh HTTP/2 connection.
//!
//! | method and path | request | response |
//! |---|---|---|
//! | `GET /v1/hello` | header [`PROTOCOL_HEADER`] | [`Hello`] (JSON) |
//! | `POST /v1/exec` | [`exec`] frames: one `Spec`, then `Stdin`… | [`exec`] frames: `Stdout`, `Stderr`, then `Exit` or `Error` |
//! | `GET /v1/files?path=P&offset=O&length=L` | — | the file's bytes, streamed |
//! | `PUT /v1/files?path=P&mode=M` | the file's bytes, streamed | [`files::FileInfo`] |
//! | `POST /v1/fs/{stat,list,mkdir,remove,rename}` | [`files::FsRequest`] | [`files::FsResponse`] |
//! | `POST /v1/shutdown` | — | `{}`; the guest then syncs and powers off |
//!
//! Paths in query strings are percent-encoded raw bytes ([`binpath::BinPath::to_query`]),
//! so names that are not UTF-8 survive. Errors are JSON [`ErrorBody`] with a 4xx/5xx status.
//!
//! Every message is bounded: see the `MAX_*` constants. The host treats the guest as
//! hostile and enforces those limits on everything it reads.

#![deny(missing_docs)]

pub mod binpath;
pub mod exec;
pub mod files;

use serde::{Deserialize, Serialize};

/// Version of the host–agent protocol. Bumped on any incompatible change; the host refuses
/// an agent that answers the handshake with another version.
pub const PROTOCOL_VERSION: u32 = 1;

/// Name of the virtio-serial port the agent serves on (`/sys/class/virtio-ports/*/name`).
pub const AGENT_PORT_NAME: &str = "hearth.agent";

/// Request header carrying the host's protocol version in the handshake.
pub const PROTOCOL_HEADER: &str = "hearth-protocol";

/// Largest JSON body either side accepts (hello, fs requests and responses, errors).
pub const MAX_JSON_BODY: usize = 4 << 20;

/// The agent's answer to `GET /v1/hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The agent's protocol version; must equal [`PROTOCOL_VERSION`].
    pub protocol: u32,
    /// The agent's build version (its crate version).
    pub agent_version: String,
    /// Kernel release as `uname -r` prints it.
    pub kernel: String,
    /// Seconds since the guest booted, from `CLOCK_BOOTTIME`.
    pub uptime_ms: u64,
}

/// A protocol-level error the agent reports instead of a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Machine-readable kind of error.
    pub code: ErrorCode,
    /// What failed, in a sentence.
    pub message: String,
}

/// Kinds of error the agent reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The path does not exist.
    NotFound,
    /// The path exists and the operation needs it not to.
    AlreadyExists,
    /// The guest refused the operation for lack of permission.
    PermissionDenied,
    /// The request was malformed or named something invalid.
    InvalidInput,
    /// The operation needs a directory and got something else, or the reverse.
    WrongKind,
    /// Any other I/O failure inside the guest.
    Io,
    /// The protocol versions of host and agent differ.
    VersionMismatch,
}

impl std::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}
