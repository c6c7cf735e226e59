//! File operations: `GET`/`PUT /v1/files` stream contents; `POST /v1/fs/{op}` does the rest.

use crate::binpath::BinPath;
use serde::{Deserialize, Serialize};

/// Most entries one `list` returns; a larger directory is an error, not a huge answer.
/// (At ~100 bytes of JSON per entry this stays well inside `MAX_JSON_BODY`.)
pub const MAX_LIST_ENTRIES: usize = 20_000;

/// What kind of file a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (not followed).
    Symlink,
    /// Anything else: device, socket, FIFO.
    Other,
}

/// Metadata of one path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// The path as asked for (for `list`: the entry's name only).
    pub path: BinPath,
    /// Kind of file.
    pub kind: FileKind,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Owner uid.
    pub uid: u32,
    /// Owner gid.
    pub gid: u32,
}

/// One filesystem operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum FsRequest {
    /// Metadata of a path (symlinks not followed).
    Stat {
        /// The path.
        path: BinPath,
    },
    /// Entries of a directory, sorted by name.
    List {
        /// The directory.
        path: BinPath,
    },
    /// Creates a directory.
    Mkdir {
        /// The directory.
        path: BinPath,
        /// Create missing parents and accept an existing directory.
        #[serde(default)]
        parents: bool,
        /// Permission bits; 0o755 when absent.
        #[serde(default)]
        mode: Option<u32>,
    },
    /// Removes a file, or a directory.
    Remove {
        /// The path.
        path: BinPath,
        /// Remove a directory and everything in it.
        #[serde(default)]
        recursive: bool,
    },
    /// Renames a path, replacing the target if it is a file.
    Rename {
        /// Current path.
        from: BinPath,
        /// New path.
        to: BinPath,
    },
}

impl FsRequest {
    /// The path segment of the URL this request is sent to.
    pub fn op_name(&self) -> &'static str {
        match self {
            FsRequest::Stat { .. } => "stat",
            FsRequest::List { .. } => "list",
            FsRequest::Mkdir { .. } => "mkdir",
            FsRequest::Remove { .. } => "remove",
            FsRequest::Rename { .. } => "rename",
        }
    }
}

/// The answer to an [`FsRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsResponse {
    /// For `stat`, `mkdir`, `rename`.
    Info(FileInfo),
    /// For `list`.
    Entries(Vec<FileInfo>),
    /// For `remove`.
    Done,
}
