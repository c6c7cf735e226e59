//! Types that cross a Hearth boundary. No I/O lives here, but for [`archive`]: the tar
//! format of directory transfers, packed and unpacked alike by both ends.
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
//! | `PUT /v1/files?path=P&mode=M&size=N` | the file's bytes, streamed (`size`: what the host expects, checked against the free space first) | [`files::FileInfo`] |
//! | `GET /v1/archive?path=D` | — | directory D's contents as an [`archive`] (tar), streamed |
//! | `PUT /v1/archive?path=D&size=N` | an [`archive`], streamed | [`archive::Stats`] as JSON, once unpacked into D (new) |
//! | `POST /v1/fs/{stat,list,mkdir,remove,rename}` | [`files::FsRequest`] | [`files::FsResponse`] |
//! | `GET /v1/hook?port=P&path=/p&timeout_ms=T` | — | [`HookResponse`] |
//! | `POST /v1/hook?port=P&path=/p&timeout_ms=T` | the body to POST (≤ [`MAX_HOOK_REQUEST`]) | [`HookResponse`] |
//! | `POST /v1/connect?port=P` | bytes to the app (streamed) | bytes from the app (streamed): a TCP connection to 127.0.0.1:P in the guest |
//! | `POST /v1/metadata/accept` | [`METADATA_MARK`], then bytes to the guest's client (streamed) | once a guest process connects to 169.254.169.254:80: [`METADATA_MARK`], then the bytes it sends (streamed); the host's mark confirms it takes the connection |
//! | `POST /v1/restore` | [`RestoreInfo`] | `{}` once clock, RNG and identity are fixed |
//! | `POST /v1/sync` | — | `{}` once the guest's filesystems are flushed |
//! | `POST /v1/detach` | — | `{}`; the agent then closes this connection and waits for a new one |
//! | `POST /v1/shutdown` | — | `{}`; the guest then syncs and powers off |
//!
//! Paths in query strings are percent-encoded raw bytes ([`binpath::BinPath::to_query`]),
//! so names that are not UTF-8 survive. Errors are JSON [`ErrorBody`] with a 4xx/5xx status.
//!
//! Every message is bounded: see the `MAX_*` constants. The host treats the guest as
//! hostile and enforces those limits on everything it reads.

#![deny(missing_docs)]

pub mod archive;
pub mod binpath;
pub mod exec;
pub mod files;
pub mod image;

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
    /// Milliseconds since the guest booted, from `CLOCK_BOOTTIME`.
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
    /// The guest's filesystem is full (or would be: a declared size over its free space).
    StorageFull,
    /// The protocol versions of host and agent differ.
    VersionMismatch,
}

impl std::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

/// Most entropy bytes the host may hand the guest in one [`RestoreInfo`].
pub const MAX_RESTORE_ENTROPY: usize = 512;

/// `POST /v1/restore`: what the guest needs after being restored from a snapshot, before
/// any user command runs. Clones of one snapshot share the snapshot's clock, RNG state and
/// identity; this makes each one its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreInfo {
    /// The host's wall clock, nanoseconds since the Unix epoch.
    pub unix_time_ns: i64,
    /// Fresh random bytes from the host, credited to the guest kernel's RNG, which is
    /// then forced to reseed.
    pub entropy: binpath::BinPath,
    /// New hostname, if the VM should have its own.
    #[serde(default)]
    pub hostname: Option<String>,
    /// New `/etc/machine-id` (32 lowercase hex digits), if the VM should have its own.
    #[serde(default)]
    pub machine_id: Option<String>,
}

impl RestoreInfo {
    /// Checks sizes and formats before anything is applied.
    pub fn validate(&self) -> Result<(), String> {
        if self.entropy.0.len() > MAX_RESTORE_ENTROPY {
            return Err(format!("{} entropy bytes; the limit is {MAX_RESTORE_ENTROPY}", self.entropy.0.len()));
        }
        if let Some(h) = &self.hostname {
            if h.is_empty() || h.len() > 63 || !h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return Err(format!("invalid hostname {h:?}"));
            }
        }
        if let Some(m) = &self.machine_id {
            if m.len() != 32 || !m.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                return Err(format!("machine id must be 32 lowercase hex digits, got {m:?}"));
            }
        }
        Ok(())
    }
}

/// The resynchronisation handshake that precedes every HTTP/2 connection.
///
/// The agent channel is one byte pipe that outlives connections (and snapshots), so bytes
/// of an old connection may still be in flight when a new one starts. Before speaking
/// HTTP/2 the host sends [`sync::probe`] lines (repeating them until answered); the agent,
/// between connections, answers each with [`sync::ready`] for the same nonce and otherwise
/// discards everything until the HTTP/2 client preface. The host discards everything until
/// the `ready` line with its nonce, so stale bytes on either side are skipped.
pub mod sync {
    /// Prefix of a probe line: `HEARTH-SYNC <16 hex digits>\n`.
    pub const PROBE_PREFIX: &[u8] = b"HEARTH-SYNC ";
    /// Prefix of an answer line: `HEARTH-READY <16 hex digits>\n`.
    pub const READY_PREFIX: &[u8] = b"HEARTH-READY ";
    /// Length of a probe line.
    pub const PROBE_LEN: usize = 12 + 16 + 1;
    /// Length of an answer line.
    pub const READY_LEN: usize = 13 + 16 + 1;

    /// The probe line for `nonce`.
    pub fn probe(nonce: u64) -> Vec<u8> {
        format!("HEARTH-SYNC {nonce:016x}\n").into_bytes()
    }

    /// The answer line for `nonce`.
    pub fn ready(nonce: u64) -> Vec<u8> {
        format!("HEARTH-READY {nonce:016x}\n").into_bytes()
    }

    /// The nonce of a complete probe line, if `line` is one.
    pub fn parse_probe(line: &[u8]) -> Option<u64> {
        let hex = line.strip_prefix(PROBE_PREFIX)?.strip_suffix(b"\n")?;
        if hex.len() != 16 {
            return None;
        }
        u64::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn probe_round_trip() {
            let p = super::probe(0xdead_beef);
            assert_eq!(p.len(), super::PROBE_LEN);
            assert_eq!(super::parse_probe(&p), Some(0xdead_beef));
            assert_eq!(super::ready(1).len(), super::READY_LEN);
            assert_eq!(super::parse_probe(b"HEARTH-SYNC zz\n"), None);
        }
    }
}

/// The answer to `GET /v1/hook?port=P&path=/ready&timeout_ms=T`: the agent makes a plain
/// HTTP/1.0 GET to `127.0.0.1:P` inside the guest (the app's hooks port) and reports what
/// came back, so the host can drive `/ready`, `/validate` and the runtime hooks without
/// any tool in the guest's root filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookResponse {
    /// HTTP status code.
    pub status: u16,
    /// The start of the body (at most [`MAX_HOOK_BODY`] bytes, lossy UTF-8).
    pub body: String,
}

/// Most body bytes a [`HookResponse`] carries.
pub const MAX_HOOK_BODY: usize = 64 << 10;
/// Most body bytes a POSTed hook call carries (the API's `runHookPayload` is ≤ 16 KiB).
pub const MAX_HOOK_REQUEST: usize = 64 << 10;

/// The byte that opens the answer to `POST /v1/metadata/accept` once a guest connection is
/// taken, and that the host sends back to confirm it carries it (an accept the host
/// withdrew just then never confirms, and the connection goes to the next accept).
pub const METADATA_MARK: u8 = 1;
