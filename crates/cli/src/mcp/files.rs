//! The file tools: read (numbered line ranges), write, edit (exact replace, insert at a
//! line), list, glob, and upload/download between this host and the sandbox.

use super::hub::{sh_quote, ToolError};
use super::text::{absolute, insert, numbered, replace, DEFAULT_LINES};
use super::HearthMcp;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::{tool, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};

/// Largest file `read_file` and `edit_file` take whole (larger ones: `bash` with sed, grep).
const MAX_TEXT_FILE: usize = 16 << 20;
/// Most paths `glob` returns.
const MAX_GLOB_RESULTS: usize = 1000;

/// `read_file`'s arguments.
#[derive(Deserialize, JsonSchema)]
pub struct ReadArgs {
    /// The file: absolute, or relative to /workspace.
    pub path: String,
    /// First line to show (1-based; default 1).
    #[schemars(range(min = 1))]
    pub offset: Option<usize>,
    /// How many lines to show (default 2000).
    #[schemars(range(min = 1))]
    pub limit: Option<usize>,
    /// The sandbox (mvm-…); omit it for the session's current sandbox.
    pub sandbox_id: Option<String>,
}

/// `write_file`'s arguments.
#[derive(Deserialize, JsonSchema)]
pub struct WriteArgs {
    /// The file: absolute, or relative to /workspace. Its directory is made when missing.
    pub path: String,
    /// The whole new content (UTF-8 text).
    pub content: String,
    /// The sandbox (mvm-…); omit it for the session's current sandbox.
    pub sandbox_id: Option<String>,
}

/// `edit_file`'s arguments.
#[derive(Deserialize, JsonSchema)]
pub struct EditArgs {
    /// The file: absolute, or relative to /workspace.
    pub path: String,
    /// The exact text to replace, whitespace and indentation included. It must appear
    /// exactly once unless replace_all. Omit it when inserting with insert_line.
    pub old_string: Option<String>,
    /// The replacement text (or, with insert_line, the text to insert).
    pub new_string: String,
    /// Replace every occurrence of old_string instead of requiring exactly one.
    pub replace_all: Option<bool>,
    /// Insert new_string after this line (0: at the top) instead of replacing.
    pub insert_line: Option<usize>,
    /// The sandbox (mvm-…); omit it for the session's current sandbox.
    pub sandbox_id: Option<String>,
}

/// `list_files`'s arguments.
#[derive(Deserialize, JsonSchema)]
pub struct ListArgs {
    /// The directory (default /workspace).
    pub path: Option<String>,
    /// The sandbox (mvm-…); omit it for the session's current sandbox.
    pub sandbox_id: Option<String>,
}

/// `glob`'s arguments.
#[derive(Deserialize, JsonSchema)]
pub struct GlobArgs {
    /// A glob relative to path: `**/*.py`, `src/*.rs`, `**/test_*`.
    pub pattern: String,
    /// The directory to search (default /workspace).
    pub path: Option<String>,
    /// The sandbox (mvm-…); omit it for the session's current sandbox.
    pub sandbox_id: Option<String>,
}

/// `upload`/`download`'s arguments.
#[derive(Deserialize, JsonSchema)]
pub struct CopyArgs {
    /// A file on the machine running `hearth mcp` (absolute path).
    pub host_path: String,
    /// The file in the sandbox: absolute, or relative to /workspace.
    pub sandbox_path: String,
    /// The sandbox (mvm-…); omit it for the session's current sandbox.
    pub sandbox_id: Option<String>,
}

impl HearthMcp {
    /// The text of `path`, refused when binary or too large.
    async fn text(&self, id: &str, path: &str) -> Result<String, ToolError> {
        let bytes = self.hub.read(id, path).await?;
        if bytes.len() > MAX_TEXT_FILE {
            return Err(format!("{path} is {} bytes: too large to read whole; use bash (head, sed -n, grep) on it", bytes.len()));
        }
        if bytes.contains(&0) {
            return Err(format!("{path} is binary ({} bytes); inspect it with bash (file, xxd) or download it", bytes.len()));
        }
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{path} is not UTF-8 text; inspect it with bash (file, iconv)"))
    }

    fn host_files(&self) -> Result<(), ToolError> {
        if self.hub.opts.host_files {
            Ok(())
        } else {
            Err("this server does not touch its host's files (the operator started it without --host-files); move data with write_file/read_file".into())
        }
    }
}

#[tool_router(router = file_tools, vis = "pub(super)")]
impl HearthMcp {
    /// Reads a text file with numbered lines.
    #[tool(
        description = "Read a text file in the sandbox, lines numbered like `cat -n` (number, tab, line). Reads up to 2000 lines from offset; for longer files read on with the offset given in the result. Use the numbers for edit_file's insert_line, never as part of old_string."
    )]
    async fn read_file(&self, Parameters(a): Parameters<ReadArgs>) -> Result<String, ToolError> {
        let path = absolute(&a.path)?;
        let id = self.hub.sandbox(a.sandbox_id.as_deref()).await?;
        let text = self.text(&id, &path).await?;
        numbered(&text, a.offset.unwrap_or(1), a.limit.unwrap_or(DEFAULT_LINES))
    }

    /// Writes a whole file.
    #[tool(
        description = "Create or overwrite a file in the sandbox with the given content (its directory is made when missing). To change part of an existing file prefer edit_file."
    )]
    async fn write_file(&self, Parameters(a): Parameters<WriteArgs>) -> Result<String, ToolError> {
        let path = absolute(&a.path)?;
        let id = self.hub.sandbox(a.sandbox_id.as_deref()).await?;
        let n = self.hub.write(&id, &path, a.content.into_bytes()).await?;
        Ok(format!("wrote {n} bytes to {path}"))
    }

    /// Edits a file: exact replace, or insert at a line.
    #[tool(
        description = "Edit a text file in the sandbox. Replace: old_string must match the file exactly (whitespace and indentation included) and appear exactly once (add surrounding lines to make it unique), or set replace_all. Insert: give insert_line (0 for the top) and new_string, no old_string. Fails without changing the file when the text is missing or ambiguous."
    )]
    async fn edit_file(&self, Parameters(a): Parameters<EditArgs>) -> Result<String, ToolError> {
        let path = absolute(&a.path)?;
        let id = self.hub.sandbox(a.sandbox_id.as_deref()).await?;
        let text = self.text(&id, &path).await?;
        let (new, what) = match (a.old_string.as_deref(), a.insert_line) {
            (Some(_), Some(_)) => return Err("give either old_string (to replace) or insert_line (to insert), not both".into()),
            (None, None) => return Err("give old_string (the exact text to replace) or insert_line (where to insert new_string)".into()),
            (None, Some(line)) => (insert(&text, line, &a.new_string)?, format!("inserted after line {line}")),
            (Some(old), None) => {
                let (new, n) = replace(&text, old, &a.new_string, a.replace_all == Some(true))?;
                (new, format!("replaced {n} occurrence{}", if n == 1 { "" } else { "s" }))
            }
        };
        self.hub.write(&id, &path, new.into_bytes()).await?;
        Ok(format!("{path}: {what}"))
    }

    /// Lists a directory.
    #[tool(description = "List a directory in the sandbox: each entry's name, kind (file, dir, symlink, …) and size in bytes.")]
    async fn list_files(&self, Parameters(a): Parameters<ListArgs>) -> Result<String, ToolError> {
        let path = absolute(a.path.as_deref().unwrap_or(super::hub::WORKSPACE))?;
        let id = self.hub.sandbox(a.sandbox_id.as_deref()).await?;
        let entries = self.hub.list(&id, &path).await?;
        let list: Vec<Value> = entries.iter().map(|e| json!({ "name": e["path"], "kind": e["kind"], "size": e["size"] })).collect();
        Ok(serde_json::to_string_pretty(&json!({ "path": path, "entries": list })).unwrap_or_default())
    }

    /// Finds files by glob.
    #[tool(
        description = "Find files in the sandbox whose paths (relative to path, default /workspace) match a glob: `**/*.py`, `src/**/test_*.rs`. Skips .git, node_modules and __pycache__. Returns the matching paths, sorted."
    )]
    async fn glob(&self, Parameters(a): Parameters<GlobArgs>) -> Result<String, ToolError> {
        let matcher = globset::GlobBuilder::new(a.pattern.trim())
            .literal_separator(true)
            .build()
            .map_err(|e| format!("the pattern is not a glob: {e}"))?
            .compile_matcher();
        let root = absolute(a.path.as_deref().unwrap_or(super::hub::WORKSPACE))?;
        let id = self.hub.sandbox(a.sandbox_id.as_deref()).await?;
        let script = format!(
            "cd -- {q} || exit 3\nfind . -xdev \\( -name .git -o -name node_modules -o -name __pycache__ \\) -prune -o \\( -type f -o -type l \\) -print 2>/dev/null | head -n 100000",
            q = sh_quote(&root)
        );
        let out = self.hub.exec(&id, &script, Some(120.0)).await?;
        if out.code == Some(3) {
            return Err(format!("{root} is not a directory in the sandbox"));
        }
        let mut hits: Vec<&str> = out.stdout.lines().filter_map(|l| l.strip_prefix("./")).filter(|l| matcher.is_match(l)).collect();
        hits.sort_unstable();
        let total = hits.len();
        hits.truncate(MAX_GLOB_RESULTS);
        let mut text = hits.iter().map(|h| format!("{root}/{h}")).collect::<Vec<_>>().join("\n");
        if total == 0 {
            text = format!("no files under {root} match {}", a.pattern);
        } else if total > MAX_GLOB_RESULTS {
            text.push_str(&format!("\n[{total} matches; the first {MAX_GLOB_RESULTS} shown: narrow the pattern]"));
        }
        Ok(text)
    }

    /// Copies a host file into the sandbox.
    #[tool(
        description = "Copy a file from the machine running this MCP server (host_path, absolute) into the sandbox (sandbox_path). Any size; streamed."
    )]
    async fn upload(&self, Parameters(a): Parameters<CopyArgs>) -> Result<String, ToolError> {
        self.host_files()?;
        let host = std::path::Path::new(&a.host_path);
        if !host.is_absolute() || !host.is_file() {
            return Err(format!("{} is not a file on this host (give an absolute path)", a.host_path));
        }
        let path = absolute(&a.sandbox_path)?;
        let id = self.hub.sandbox(a.sandbox_id.as_deref()).await?;
        let url = format!("/hearth/v1/microvms/{}/files?path={}", crate::client::enc(&id), crate::client::enc(&path));
        let v = self.hub.api.put_file(&url, host).await.map_err(|e| super::hub::explain(e, Some(&id)))?;
        Ok(format!("{} → {path}: {} bytes", a.host_path, v["size"]))
    }

    /// Copies a sandbox file to the host.
    #[tool(
        description = "Copy a file from the sandbox (sandbox_path) to the machine running this MCP server (host_path, absolute; overwritten). Any size; streamed."
    )]
    async fn download(&self, Parameters(a): Parameters<CopyArgs>) -> Result<String, ToolError> {
        self.host_files()?;
        let host = std::path::Path::new(&a.host_path);
        if !host.is_absolute() || host.parent().is_none_or(|p| !p.is_dir()) {
            return Err(format!("{} must be an absolute path in an existing directory of this host", a.host_path));
        }
        let path = absolute(&a.sandbox_path)?;
        let id = self.hub.sandbox(a.sandbox_id.as_deref()).await?;
        let url = format!("/hearth/v1/microvms/{}/files?path={}", crate::client::enc(&id), crate::client::enc(&path));
        let n = self.hub.api.get_to_file(&url, host).await.map_err(|e| super::hub::explain(e, Some(&id)))?;
        Ok(format!("{path} → {}: {n} bytes", a.host_path))
    }
}
