//! The sandbox tools: lifecycle (create, list, suspend, resume, fork, terminate), `bash`,
//! background processes and exposed ports. Every tool names its sandbox optionally; without
//! one it acts on the session's current sandbox, created on first use.

use super::hub::{sh_quote, ToolError, STATE_DIR, WORKSPACE};
use super::text::truncate;
use super::HearthMcp;
use crate::client::enc;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::{tool, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};

/// Characters of stdout (and of stderr) a tool result shows before cutting the middle.
pub const OUTPUT_LIMIT: usize = 30_000;
/// Longest `bash` timeout.
const MAX_TIMEOUT_S: f64 = 3600.0;

/// Arguments naming only a sandbox.
#[derive(Deserialize, JsonSchema)]
pub struct Target {
    /// The sandbox (mvm-…); omit it for the session's current sandbox.
    pub sandbox_id: Option<String>,
}

/// `create_sandbox`'s arguments.
#[derive(Deserialize, JsonSchema)]
pub struct CreateArgs {
    /// An image of your account (name or ARN). Omit it for the session's default image.
    pub image: Option<String>,
    /// Suspend the sandbox after this many idle seconds (at least 60). It resumes by
    /// itself on the next command.
    #[schemars(range(min = 60))]
    pub idle_suspend_seconds: Option<u64>,
    /// Terminate it after this many seconds suspended.
    pub suspended_seconds: Option<u64>,
    /// Allow connections to the internet (default: the daemon's default egress).
    pub internet: Option<bool>,
    /// Egress connector ARNs to attach instead (`internet` adds INTERNET_EGRESS).
    pub egress_connectors: Option<Vec<String>>,
    /// Make it the session's current sandbox (default true).
    pub make_current: Option<bool>,
}

/// `bash`'s arguments.
#[derive(Deserialize, JsonSchema)]
pub struct BashArgs {
    /// The command line, run by /bin/sh -c (pipes, redirections and && work).
    pub command: String,
    /// Seconds before the command is killed (default 120, at most 3600). For servers and
    /// other long runs use start_process.
    pub timeout_seconds: Option<f64>,
    /// Working directory (default /workspace, made when missing).
    pub cwd: Option<String>,
    /// The sandbox (mvm-…); omit it for the session's current sandbox.
    pub sandbox_id: Option<String>,
}

/// `start_process`'s arguments.
#[derive(Deserialize, JsonSchema)]
pub struct StartArgs {
    /// The command line, run by /bin/sh -c in the background.
    pub command: String,
    /// Working directory (default /workspace).
    pub cwd: Option<String>,
    /// The sandbox (mvm-…); omit it for the session's current sandbox.
    pub sandbox_id: Option<String>,
}

/// `read_process_output`'s arguments.
#[derive(Deserialize, JsonSchema)]
pub struct ReadOutputArgs {
    /// The process id start_process returned.
    pub process_id: String,
    /// Wait up to this many seconds (at most 60) for new output or the exit.
    pub wait_seconds: Option<f64>,
    /// Read from the beginning instead of after what was already read.
    pub from_start: Option<bool>,
    /// Stop the process (SIGTERM to its process group) after reading.
    pub stop: Option<bool>,
    /// The sandbox (mvm-…); omit it for the session's current sandbox.
    pub sandbox_id: Option<String>,
}

/// `expose_port`'s arguments.
#[derive(Deserialize, JsonSchema)]
pub struct ExposeArgs {
    /// The port a server in the sandbox listens on.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// How long the token lasts, in minutes (default 60).
    #[schemars(range(min = 1, max = 1440))]
    pub expires_in_minutes: Option<u32>,
    /// The sandbox (mvm-…); omit it for the session's current sandbox.
    pub sandbox_id: Option<String>,
}

/// `fork`'s arguments.
#[derive(Deserialize, JsonSchema)]
pub struct ForkArgs {
    /// The sandbox to fork (mvm-…); omit it for the session's current sandbox.
    pub sandbox_id: Option<String>,
    /// Make the fork the session's current sandbox (default false: the source stays current).
    pub make_current: Option<bool>,
}

/// The script that runs `command` in `cwd` (the default made when missing).
pub fn in_cwd(cwd: Option<&str>, command: &str) -> String {
    match cwd.map(str::trim).filter(|c| !c.is_empty()) {
        None => format!("mkdir -p {WORKSPACE} && cd {WORKSPACE} || exit 125\n{command}"),
        Some(c) => format!(
            "cd -- {q} 2>/dev/null || {{ echo \"hearth: no directory {c} (make it with mkdir -p, or omit cwd)\" >&2; exit 125; }}\n{command}",
            q = sh_quote(c)
        ),
    }
}

/// A process id as start_process makes them (mktemp's letters and digits).
fn valid_process_id(p: &str) -> bool {
    p.starts_with('p') && (2..=32).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

#[tool_router(router = sandbox_tools, vis = "pub(super)")]
impl HearthMcp {
    /// Starts a new sandbox and makes it the session's current one.
    #[tool(
        description = "Start a new sandbox (a microVM with its own Linux kernel, filesystem and network) and make it the session's current sandbox. Most sessions never need this: every other tool creates the session's sandbox on first use. Use it for a second, independent sandbox or a different image. Returns its id."
    )]
    async fn create_sandbox(&self, Parameters(a): Parameters<CreateArgs>) -> Result<String, ToolError> {
        let idle = a.idle_suspend_seconds.map(|i| (i, a.suspended_seconds.unwrap_or(self.hub.opts.suspended_seconds)));
        let mut egress = a.egress_connectors.clone();
        if a.internet == Some(true) {
            egress.get_or_insert_with(Vec::new).push("INTERNET_EGRESS".into());
        } else if a.internet == Some(false) && egress.is_none() {
            egress = Some(Vec::new());
        }
        let v = self.hub.run_microvm(a.image.as_deref(), idle, egress).await?;
        let id = v["microvmId"].as_str().unwrap_or("").to_owned();
        if a.make_current != Some(false) {
            self.hub.set_current(Some(id.clone())).await;
        }
        Ok(pretty(&json!({ "sandbox_id": id, "state": v["state"], "image": v["imageArn"], "current": a.make_current != Some(false) })))
    }

    /// Lists the account's sandboxes.
    #[tool(description = "List your sandboxes: id, state (RUNNING, SUSPENDED, …), image and which one is this session's current sandbox.")]
    async fn list_sandboxes(&self) -> Result<String, ToolError> {
        let items = crate::client::all_pages(&self.hub.api, "/2025-09-09/microvms").await.map_err(|e| format!("{e:#}"))?;
        let current = self.hub.current().await;
        let list: Vec<Value> = items
            .iter()
            .filter(|m| m["state"] != "TERMINATED")
            .map(|m| {
                let id = m["microvmId"].as_str().unwrap_or("");
                json!({ "sandbox_id": id, "state": m["state"], "image": m["imageArn"], "current": current.as_deref() == Some(id) })
            })
            .collect();
        Ok(pretty(&json!({ "sandboxes": list })))
    }

    /// Runs a shell command to completion.
    #[tool(
        description = "Run a shell command in the sandbox and wait for it: returns the exit code, stdout and stderr. Runs /bin/sh -c in /workspace unless cwd says otherwise; state (files, installed packages) persists between calls, shell variables and `cd` do not. Long output keeps its beginning and end, and the full output is saved to a file in the sandbox named in the result (read it with read_file or grep). Commands that never end (servers, watchers) belong in start_process."
    )]
    async fn bash(&self, Parameters(a): Parameters<BashArgs>) -> Result<String, ToolError> {
        if a.command.trim().is_empty() {
            return Err("command is empty: give a shell command line".into());
        }
        let timeout = a.timeout_seconds.unwrap_or(120.0);
        if !(timeout > 0.0 && timeout <= MAX_TIMEOUT_S) {
            return Err(format!("timeout_seconds must be between 0 and {MAX_TIMEOUT_S}; use start_process for longer runs"));
        }
        let id = self.hub.sandbox(a.sandbox_id.as_deref()).await?;
        let out = self.hub.exec(&id, &in_cwd(a.cwd.as_deref(), &a.command), Some(timeout)).await?;
        let mut text = match (out.code, out.signal) {
            (Some(c), _) => format!("exit code: {c}\n"),
            (None, Some(9)) => format!("killed (signal 9): it ran past its timeout of {timeout} s, or ran out of memory\n"),
            (None, s) => format!("killed by signal {}\n", s.unwrap_or(0)),
        };
        let cut = |name: &str, s: &str| truncate(s, OUTPUT_LIMIT).map(|t| (name.to_owned(), t));
        let mut saved = Vec::new();
        for (name, s) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
            let shown = match cut(name, s) {
                Some((_, t)) => {
                    let n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
                    let file = format!("{STATE_DIR}/bash-{n}.{name}");
                    match self.hub.write(&id, &file, s.as_bytes().to_vec()).await {
                        Ok(_) => saved.push(format!("the full {name} ({} characters) is in {file}", s.chars().count())),
                        Err(e) => saved.push(format!("the full {name} could not be saved ({e})")),
                    }
                    t
                }
                None => s.to_string(),
            };
            if !shown.is_empty() {
                text.push_str(&format!("--- {name} ---\n{shown}"));
                if !shown.ends_with('\n') {
                    text.push('\n');
                }
            }
        }
        if !saved.is_empty() {
            text.push_str(&format!("[output truncated: {}]\n", saved.join("; ")));
        }
        Ok(text)
    }

    /// Starts a background process.
    #[tool(
        description = "Start a command in the background (a server, a watcher, a long build) and return at once with its process_id. Its stdout and stderr go to files in the sandbox; read them with read_process_output, stop it with read_process_output(stop=true)."
    )]
    async fn start_process(&self, Parameters(a): Parameters<StartArgs>) -> Result<String, ToolError> {
        if a.command.trim().is_empty() {
            return Err("command is empty: give a shell command line".into());
        }
        let id = self.hub.sandbox(a.sandbox_id.as_deref()).await?;
        // setsid: its own session and process group, so it outlives this exec and can be
        // stopped as a group; the exit status lands in a file when it ends.
        let script = format!(
            "base={STATE_DIR}/proc; mkdir -p $base || exit 125\n\
             d=$(mktemp -d $base/pXXXXXXXX) || exit 125\n\
             S=; command -v setsid >/dev/null 2>&1 && S=setsid\n\
             $S sh -c '(eval \"$1\"); echo $? > \"$2/exit\"' hearth-process {cmd} \"$d\" </dev/null >\"$d/stdout\" 2>\"$d/stderr\" &\n\
             echo $! > \"$d/pid\"; basename \"$d\"",
            cmd = sh_quote(&a.command)
        );
        let out = self.hub.exec(&id, &in_cwd(a.cwd.as_deref(), &script), Some(60.0)).await?;
        let pid = out.stdout.trim();
        if out.code != Some(0) || !valid_process_id(pid) {
            return Err(format!("the process did not start: {}", out.stderr.trim()));
        }
        if let Ok(mut o) = self.hub.offsets.lock() {
            o.insert((id.clone(), pid.to_owned()), (0, 0));
        }
        Ok(pretty(
            &json!({ "process_id": pid, "sandbox_id": id, "stdout": format!("{STATE_DIR}/proc/{pid}/stdout"), "stderr": format!("{STATE_DIR}/proc/{pid}/stderr") }),
        ))
    }

    /// Reads a background process's new output.
    #[tool(
        description = "Read what a background process (from start_process) wrote since the last read, and whether it still runs or its exit code. wait_seconds waits for new output or the exit; stop=true stops it after reading."
    )]
    async fn read_process_output(&self, Parameters(a): Parameters<ReadOutputArgs>) -> Result<String, ToolError> {
        let pid = a.process_id.trim().to_owned();
        if !valid_process_id(&pid) {
            return Err(format!("{pid:?} is not a process_id: start_process returns them (like p3kX9aQ2b)"));
        }
        let id = self.hub.sandbox(a.sandbox_id.as_deref()).await?;
        let key = (id.clone(), pid.clone());
        let (mut o1, mut o2) = if a.from_start == Some(true) {
            (0, 0)
        } else {
            self.hub.offsets.lock().ok().and_then(|o| o.get(&key).copied()).unwrap_or((0, 0))
        };
        let dir = format!("{STATE_DIR}/proc/{pid}");
        // The exit file is read again once the process is gone: it may have written it
        // and ended between the first read and the check.
        let status = format!(
            "d={dir}; [ -d $d ] || {{ echo \"hearth: no process {pid} in this sandbox (start_process returns process ids)\" >&2; exit 3; }}\n\
             if [ -s $d/exit ]; then s=\"exited $(cat $d/exit)\"; elif kill -0 $(cat $d/pid) 2>/dev/null; then s=running; \
             elif [ -s $d/exit ]; then s=\"exited $(cat $d/exit)\"; else s=gone-without-exit-status; fi\n\
             echo $s $(wc -c < $d/stdout) $(wc -c < $d/stderr)"
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs_f64(a.wait_seconds.unwrap_or(0.0).clamp(0.0, 60.0));
        let (state, n1, n2) = loop {
            let out = self.hub.exec(&id, &status, Some(30.0)).await?;
            if out.code != Some(0) {
                return Err(out.stderr.trim().to_owned());
            }
            let f: Vec<&str> = out.stdout.split_whitespace().collect();
            let n = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
            let (state, n1, n2) = match f.first() {
                Some(&"exited") => (format!("exited with code {}", f.get(1).unwrap_or(&"?")), n(2), n(3)),
                Some(s) => ((*s).to_owned(), n(1), n(2)),
                None => ("unknown".to_owned(), 0, 0),
            };
            let news = n1 > o1 || n2 > o2;
            if news || state != "running" || std::time::Instant::now() >= deadline {
                break (state, n1, n2);
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        };
        let mut text = format!("process {pid}: {state}\n");
        for (name, off, size) in [("stdout", &mut o1, n1), ("stderr", &mut o2, n2)] {
            if size <= *off {
                continue;
            }
            let file = format!("{dir}/{name}");
            let bytes = self.hub.read(&id, &file).await?;
            let from = (*off as usize).min(bytes.len());
            let new = String::from_utf8_lossy(&bytes[from..]).into_owned();
            *off = bytes.len() as u64;
            let shown = truncate(&new, OUTPUT_LIMIT).map_or(new, |t| format!("{t}\n[output truncated: all of it is in {file}]"));
            text.push_str(&format!("--- {name} ---\n{shown}"));
            if !text.ends_with('\n') {
                text.push('\n');
            }
        }
        if let Ok(mut o) = self.hub.offsets.lock() {
            o.insert(key, (o1, o2));
        }
        if a.stop == Some(true) && state == "running" {
            let out = self
                .hub
                .exec(&id, &format!("p=$(cat {dir}/pid) && {{ kill -TERM -$p 2>/dev/null || kill -TERM $p; }}"), Some(30.0))
                .await?;
            text.push_str(if out.code == Some(0) { "stopped (SIGTERM sent)\n" } else { "could not stop it (already gone?)\n" });
        }
        Ok(text)
    }

    /// Exposes a port of the sandbox as a URL with a token.
    #[tool(
        description = "Make a server listening on a port in the sandbox reachable from outside: returns a URL and the headers (an access token) a client must send, and a curl command line. The server must listen on 0.0.0.0 or 127.0.0.1 inside the sandbox (start it with start_process)."
    )]
    async fn expose_port(&self, Parameters(a): Parameters<ExposeArgs>) -> Result<String, ToolError> {
        if a.port == 0 {
            return Err("port must be between 1 and 65535".into());
        }
        let minutes = a.expires_in_minutes.unwrap_or(60).clamp(1, 1440);
        let id = self.hub.sandbox(a.sandbox_id.as_deref()).await?;
        let body = json!({ "expirationInMinutes": minutes, "allowedPorts": [{ "port": a.port }] });
        let v = self
            .hub
            .api
            .call(http::Method::POST, &format!("/2025-09-09/microvms/{}/auth-token", enc(&id)), Some(&body))
            .await
            .map_err(|e| super::hub::explain(e, Some(&id)))?;
        let token = v["authToken"]["X-aws-proxy-auth"].as_str().ok_or("the daemon's answer has no token")?;
        let host = self.hub.lifecycle(&id, "get").await.ok().and_then(|m| m["endpoint"].as_str().map(str::to_owned));
        let url = format!("{}/microvms/{id}/", self.hub.opts.endpoint.trim_end_matches('/'));
        let port = a.port.to_string();
        Ok(pretty(&json!({
            "url": url,
            "headers": { "X-aws-proxy-auth": token, "X-aws-proxy-port": port },
            "endpoint_host_url": host.map(|h| format!("https://{h}/")),
            "expires_in_minutes": minutes,
            "curl": format!("curl -H 'X-aws-proxy-auth: {token}' -H 'X-aws-proxy-port: {port}' {url}"),
        })))
    }

    /// Suspends a sandbox.
    #[tool(
        description = "Suspend the sandbox: its memory and disk are saved and it stops using CPU. Files, processes and state come back on resume (or on the next command: sandboxes resume by themselves)."
    )]
    async fn suspend(&self, Parameters(a): Parameters<Target>) -> Result<String, ToolError> {
        let id = self.hub.sandbox(a.sandbox_id.as_deref()).await?;
        let v = self.hub.lifecycle(&id, "suspend").await?;
        Ok(pretty(&json!({ "sandbox_id": id, "state": v.get("state").cloned().unwrap_or_else(|| "SUSPENDED".into()) })))
    }

    /// Resumes a sandbox.
    #[tool(description = "Resume a suspended sandbox, with its memory, processes and files as they were.")]
    async fn resume(&self, Parameters(a): Parameters<Target>) -> Result<String, ToolError> {
        let id = self.hub.sandbox(a.sandbox_id.as_deref()).await?;
        let v = self.hub.lifecycle(&id, "resume").await?;
        Ok(pretty(&json!({ "sandbox_id": id, "state": v.get("state").cloned().unwrap_or_else(|| "RUNNING".into()) })))
    }

    /// Forks a sandbox.
    #[tool(
        description = "Fork the sandbox: a new sandbox with a copy of its memory, processes and files (its own id and network), to try a second approach from the same state. The source keeps running. Returns the fork's sandbox_id; pass it to other tools as sandbox_id."
    )]
    async fn fork(&self, Parameters(a): Parameters<ForkArgs>) -> Result<String, ToolError> {
        let id = self.hub.sandbox(a.sandbox_id.as_deref()).await?;
        let v = self
            .hub
            .api
            .call(http::Method::POST, &format!("/hearth/v1/microvms/{}/fork", enc(&id)), Some(&json!({})))
            .await
            .map_err(|e| super::hub::explain(e, Some(&id)))?;
        let fork = v["microvmId"].as_str().ok_or("the daemon's fork answer names no microvmId")?.to_owned();
        self.hub.adopt(&fork);
        if a.make_current == Some(true) {
            self.hub.set_current(Some(fork.clone())).await;
        }
        Ok(pretty(&json!({ "sandbox_id": fork, "source": id, "state": v["state"], "current": a.make_current == Some(true) })))
    }

    /// Terminates a sandbox.
    #[tool(
        description = "Terminate the sandbox for good: its files and processes are gone. Terminating the session's current sandbox makes the next tool call start a fresh one."
    )]
    async fn terminate(&self, Parameters(a): Parameters<Target>) -> Result<String, ToolError> {
        let id = self.hub.sandbox(a.sandbox_id.as_deref()).await?;
        self.hub.lifecycle(&id, "terminate").await?;
        if self.hub.current().await.as_deref() == Some(id.as_str()) {
            self.hub.set_current(None).await;
        }
        Ok(pretty(&json!({ "sandbox_id": id, "state": "TERMINATED" })))
    }
}
