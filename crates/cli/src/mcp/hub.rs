//! The state one `hearth mcp` process keeps for its MCP session: the API client, the
//! operator's options, the session's current sandbox (created lazily on the first tool that
//! needs one), the sandboxes it created (suspended or terminated when the session ends) and
//! the read offsets of background processes. Every failure is a `String` written for the
//! model: what failed and what to do next; the tools hand it back as an `isError` result.

use hearth_api::client::{Client, ClientError};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use tokio::sync::Mutex;

use crate::client::enc;

/// Where the session keeps what a model may read back later (full outputs, processes).
pub const STATE_DIR: &str = "/tmp/hearth-mcp";
/// The working directory of `bash` and the root of relative paths.
pub const WORKSPACE: &str = "/workspace";

/// A tool's failure, as the model reads it.
pub type ToolError = String;

/// What happens to the session's sandboxes when it ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnExit {
    /// Suspend them (resumable later: `hearth resume ID`, or the next session's `resume`).
    Suspend,
    /// Terminate them.
    Terminate,
    /// Leave them running (their idle policy still applies).
    Keep,
}

/// The operator's choices for the sandboxes a session creates.
#[derive(Clone, Debug)]
pub struct Options {
    /// The account's image to run; `None`: [`Options::base`]'s own image, built on first use.
    pub image: Option<String>,
    /// The managed base the default image is built on.
    pub base: String,
    /// Suspend after this many idle seconds.
    pub idle_seconds: u64,
    /// Terminate after this many seconds suspended.
    pub suspended_seconds: u64,
    /// What the session's sandboxes become when it ends.
    pub on_exit: OnExit,
    /// Whether `upload`/`download` may touch this host's files.
    pub host_files: bool,
    /// The API's URL (endpoints' path form is beneath it).
    pub endpoint: String,
}

/// A command's result.
pub struct ExecOut {
    /// Exit code (none when killed by a signal).
    pub code: Option<i64>,
    /// The signal that killed it.
    pub signal: Option<i64>,
    /// Standard output (UTF-8, lossy).
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// One MCP session's state (shared by every request of the process: see the module doc).
pub struct Hub {
    /// The API client.
    pub api: Client,
    /// The operator's options.
    pub opts: Options,
    /// The sandbox tools use when they name none. Held across creation, so two concurrent
    /// first calls create one sandbox, not two.
    current: Mutex<Option<String>>,
    /// Sandboxes this session created (the on-exit policy applies to them).
    created: std::sync::Mutex<BTreeSet<String>>,
    /// Background processes: (sandbox, process id) → bytes of stdout and stderr already read.
    pub offsets: std::sync::Mutex<BTreeMap<(String, String), (u64, u64)>>,
}

/// Percent-encoded microvm path of the API.
fn mvm(id: &str) -> String {
    format!("/2025-09-09/microvms/{}", enc(id))
}

/// `s` quoted for `/bin/sh`.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// An API failure, in words a model can act on.
pub fn explain(e: ClientError, id: Option<&str>) -> ToolError {
    match e {
        ClientError::Api { code, message, .. } => {
            let hint = match code.as_str() {
                "ResourceNotFoundException" if id.is_some() => {
                    " (no such sandbox, or no such file: list_sandboxes lists the sandboxes; create_sandbox makes one)"
                }
                "ConflictException" => {
                    " (the sandbox is not in a state that allows this: list_sandboxes shows its state; a SUSPENDED one comes back with resume)"
                }
                "ValidationException" => " (fix the argument named in the message and call again)",
                "ThrottlingException" | "TooManyRequestsException" => " (slow down and retry in a few seconds)",
                _ => "",
            };
            format!("{code}: {message}{hint}")
        }
        other => format!("{other} (the Hearth daemon is unreachable or refused the request: retry, or ask the operator)"),
    }
}

impl Hub {
    /// A hub calling the API with `api`.
    pub fn new(api: Client, opts: Options) -> Self {
        Hub {
            api,
            opts,
            current: Mutex::new(None),
            created: std::sync::Mutex::new(BTreeSet::new()),
            offsets: std::sync::Mutex::new(BTreeMap::new()),
        }
    }

    /// The sandbox to act on: `given`, else the session's current one, created now if the
    /// session has none.
    pub async fn sandbox(&self, given: Option<&str>) -> Result<String, ToolError> {
        if let Some(id) = given.map(str::trim).filter(|s| !s.is_empty()) {
            if !id.starts_with("mvm-") || id.len() > 64 {
                return Err(format!("{id:?} is not a sandbox id (they look like mvm-0123abcd); list_sandboxes lists them"));
            }
            return Ok(id.to_owned());
        }
        let mut current = self.current.lock().await;
        if let Some(id) = current.as_ref() {
            return Ok(id.clone());
        }
        let v = self.run_microvm(None, None, None).await?;
        let id = v["microvmId"].as_str().ok_or("the daemon's answer names no microvmId")?.to_owned();
        *current = Some(id.clone());
        Ok(id)
    }

    /// The session's current sandbox, if any (without creating one).
    pub async fn current(&self) -> Option<String> {
        self.current.lock().await.clone()
    }

    /// Makes `id` the session's current sandbox (`None`: none; the next tool creates one).
    pub async fn set_current(&self, id: Option<String>) {
        *self.current.lock().await = id;
    }

    /// Counts `id` as this session's (a fork): the on-exit policy applies to it.
    pub fn adopt(&self, id: &str) {
        if let Ok(mut c) = self.created.lock() {
            c.insert(id.to_owned());
        }
    }

    /// RunMicrovm of `image` (default: the session's), waiting until it runs.
    pub async fn run_microvm(
        &self,
        image: Option<&str>,
        idle: Option<(u64, u64)>,
        egress: Option<Vec<String>>,
    ) -> Result<Value, ToolError> {
        let image = match image {
            Some(i) => i.to_owned(),
            None => self.default_image().await?,
        };
        let (idle, suspended) = idle.unwrap_or((self.opts.idle_seconds, self.opts.suspended_seconds));
        let mut body = json!({
            "imageIdentifier": image,
            "idlePolicy": { "maxIdleDurationSeconds": idle, "suspendedDurationSeconds": suspended, "autoResumeEnabled": true },
        });
        if let Some(e) = egress {
            body["egressNetworkConnectors"] = json!(e);
        }
        let v = self.api.call(http::Method::POST, "/2025-09-09/microvms", Some(&body)).await.map_err(|e| explain(e, None))?;
        let id = v["microvmId"].as_str().ok_or("the daemon's answer names no microvmId")?.to_owned();
        self.adopt(&id);
        if v["state"] != "RUNNING" {
            return Err(format!(
                "sandbox {id} did not start: {} ({}). Try again, or create_sandbox with another image",
                v["state"].as_str().unwrap_or("?"),
                v["stateReason"].as_str().unwrap_or("no reason given")
            ));
        }
        Ok(v)
    }

    /// The image sandboxes run when none is named: `--image`, else `hearth-mcp-<base>`,
    /// built from the managed base (once per account; later sessions find it built).
    async fn default_image(&self) -> Result<String, ToolError> {
        if let Some(i) = &self.opts.image {
            return Ok(i.clone());
        }
        let name = format!("hearth-mcp-{}", self.opts.base);
        let path = format!("/2025-09-09/microvm-images/{}", enc(&name));
        let version = match self.api.call(http::Method::GET, &path, None).await {
            Ok(_) => None,
            Err(ClientError::Api { status: 404, .. }) => {
                let uri = self.upload_context().await?;
                let body = json!({
                    "name": name,
                    "baseImageArn": hearth_api::service::managed_arn(&self.opts.base),
                    "buildRoleArn": "arn:aws:iam::000000000000:role/hearth-mcp",
                    "codeArtifact": { "uri": uri },
                    "description": "hearth mcp's default sandbox image",
                });
                let v = self.api.call(http::Method::POST, "/2025-09-09/microvm-images", Some(&body)).await.map_err(|e| explain(e, None))?;
                Some(v["imageVersion"].as_str().unwrap_or("1").to_owned())
            }
            Err(e) => return Err(explain(e, None)),
        };
        // Wait for the newest version (ours, or one another session started) to build.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1800);
        loop {
            let v = match &version {
                Some(ver) => self.api.call(http::Method::GET, &format!("{path}/versions/{}", enc(ver)), None).await,
                None => self.api.call(http::Method::GET, &format!("{path}/versions"), None).await.map(|l| {
                    l["items"]
                        .as_array()
                        .and_then(|a| a.iter().max_by_key(|v| v["imageVersion"].as_str().and_then(|s| s.parse::<u64>().ok())).cloned())
                        .unwrap_or(Value::Null)
                }),
            }
            .map_err(|e| explain(e, None))?;
            match v["state"].as_str() {
                Some("SUCCESSFUL") | None => return Ok(name),
                Some("FAILED") => {
                    return Err(format!(
                    "the default image {name} failed to build: {}; the operator can rebuild it (`hearth images rm {name}`) or pass --image",
                    v["stateReason"].as_str().unwrap_or("no reason given")
                ))
                }
                _ if std::time::Instant::now() > deadline => {
                    return Err(format!("the default image {name} is still building: call again later"))
                }
                _ => tokio::time::sleep(std::time::Duration::from_millis(500)).await,
            }
        }
    }

    /// Uploads the default image's build context: the base with /workspace made.
    async fn upload_context(&self) -> Result<String, ToolError> {
        let err = |e: std::io::Error| format!("cannot write the default image's build context here: {e}");
        let zip = tempfile::Builder::new().prefix("hearth-mcp-").suffix(".zip").tempfile().map_err(err)?;
        {
            use std::io::Write;
            let mut w = zip::ZipWriter::new(zip.reopen().map_err(err)?);
            w.start_file("Dockerfile", zip::write::SimpleFileOptions::default()).map_err(|e| err(std::io::Error::other(e)))?;
            w.write_all(format!("FROM {}\nRUN mkdir -p {WORKSPACE}\nWORKDIR {WORKSPACE}\n", self.opts.base).as_bytes()).map_err(err)?;
            w.finish().map_err(|e| err(std::io::Error::other(e)))?;
        }
        let v = self.api.upload_file("/hearth/v1/artifacts", zip.path()).await.map_err(|e| explain(e, None))?;
        v["uri"].as_str().map(str::to_owned).ok_or_else(|| "the daemon's upload answer has no uri".to_owned())
    }

    /// `e` in words; when the session's current sandbox is gone (terminated, by its
    /// lifetime or idle policy or by hand), the session forgets it, so the next tool call
    /// starts a new one, and says so.
    async fn failed(&self, id: &str, e: ClientError) -> ToolError {
        let api = matches!(e, ClientError::Api { status: 404 | 409, .. });
        let msg = explain(e, Some(id));
        if !api || self.current().await.as_deref() != Some(id) {
            return msg;
        }
        let gone = match self.lifecycle(id, "get").await {
            Ok(v) => v["state"] == "TERMINATED",
            Err(m) => m.starts_with("ResourceNotFoundException"),
        };
        if gone {
            self.set_current(None).await;
            return format!(
                "{msg}. This session's sandbox {id} no longer exists; the next tool call starts a new one (files written before are gone)"
            );
        }
        msg
    }

    /// Runs `script` with `/bin/sh -c` in `id` (as `bash` does, with its timeout).
    pub async fn exec(&self, id: &str, script: &str, timeout_s: Option<f64>) -> Result<ExecOut, ToolError> {
        let mut body = json!({ "shell": script });
        if let Some(t) = timeout_s {
            body["timeoutSeconds"] = t.into();
        }
        let v = match self.api.call(http::Method::POST, &format!("/hearth/v1/microvms/{}/exec", enc(id)), Some(&body)).await {
            Ok(v) => v,
            Err(e) => return Err(self.failed(id, e).await),
        };
        let s = |k: &str| v[k].as_str().unwrap_or("").to_owned();
        Ok(ExecOut { code: v["exitCode"].as_i64(), signal: v["signal"].as_i64(), stdout: s("stdout"), stderr: s("stderr") })
    }

    /// Reads a guest file whole.
    pub async fn read(&self, id: &str, path: &str) -> Result<bytes::Bytes, ToolError> {
        match self.api.get_bytes(&format!("/hearth/v1/microvms/{}/files?path={}", enc(id), enc(path))).await {
            Ok(b) => Ok(b),
            Err(e) => Err(self.failed(id, e).await),
        }
    }

    /// Writes a guest file whole (atomically), making its directory when missing.
    pub async fn write(&self, id: &str, path: &str, data: Vec<u8>) -> Result<u64, ToolError> {
        let url = format!("/hearth/v1/microvms/{}/files?path={}", enc(id), enc(path));
        let v = match self.put(&url, &data).await {
            Ok(v) => v,
            Err(e) => {
                let dir = std::path::Path::new(path).parent().and_then(|p| p.to_str()).unwrap_or("/");
                let out = self.exec(id, &format!("mkdir -p -- {}", sh_quote(dir)), Some(60.0)).await?;
                if out.code != Some(0) {
                    return Err(format!("{} (and making its directory failed: {})", explain(e, Some(id)), out.stderr.trim()));
                }
                self.put(&url, &data).await.map_err(|e| explain(e, Some(id)))?
            }
        };
        Ok(v["size"].as_u64().unwrap_or(0))
    }

    /// PUTs `data`: in the request when small, else streamed from a temporary file (the
    /// API takes at most 1 MiB in one unstreamed body).
    async fn put(&self, url: &str, data: &[u8]) -> Result<Value, ClientError> {
        if data.len() < 512 << 10 {
            return self.api.put_bytes(url, data.to_vec()).await;
        }
        let file_err = |source| ClientError::File { path: std::env::temp_dir(), source };
        let tmp = tempfile::Builder::new().prefix("hearth-mcp-").tempfile().map_err(file_err)?;
        tokio::fs::write(tmp.path(), data).await.map_err(file_err)?;
        self.api.put_file(url, tmp.path()).await
    }

    /// Lists a guest directory: the API's entries.
    pub async fn list(&self, id: &str, path: &str) -> Result<Vec<Value>, ToolError> {
        let v = self
            .api
            .call(http::Method::GET, &format!("/hearth/v1/microvms/{}/files/list?path={}", enc(id), enc(path)), None)
            .await
            .map_err(|e| explain(e, Some(id)))?;
        Ok(v["entries"].as_array().cloned().unwrap_or_default())
    }

    /// A lifecycle call on `id` (`suspend`, `resume`, `terminate`, `get`).
    pub async fn lifecycle(&self, id: &str, op: &str) -> Result<Value, ToolError> {
        let (method, path) = match op {
            "suspend" => (http::Method::POST, format!("{}/suspend", mvm(id))),
            "resume" => (http::Method::POST, format!("{}/resume", mvm(id))),
            "terminate" => (http::Method::DELETE, mvm(id)),
            _ => (http::Method::GET, mvm(id)),
        };
        self.api.call(method, &path, None).await.map_err(|e| explain(e, Some(id)))
    }

    /// The session ends: its sandboxes are suspended or terminated (the operator's
    /// `--on-exit`). Failures are logged: nobody is left to read them.
    pub async fn finish(&self) {
        let ids: Vec<String> = self.created.lock().map(|c| c.iter().cloned().collect()).unwrap_or_default();
        for id in ids {
            let r = match self.opts.on_exit {
                OnExit::Keep => continue,
                OnExit::Terminate => self.lifecycle(&id, "terminate").await,
                OnExit::Suspend => match self.lifecycle(&id, "get").await {
                    Ok(v) if v["state"] == "RUNNING" => self.lifecycle(&id, "suspend").await,
                    other => other,
                },
            };
            match r {
                Ok(_) => tracing::info!(%id, on_exit = ?self.opts.on_exit, "session ended"),
                Err(e) => tracing::warn!(%id, "session end: {e}"),
            }
        }
    }
}
