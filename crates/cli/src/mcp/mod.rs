//! `hearth mcp`: a Model Context Protocol server, so that agents (Claude Desktop and Code,
//! Cursor, any MCP client) get sandboxes as tools: `bash`, file reading and editing, background
//! processes, exposed ports, suspend/resume/fork/terminate. It is a client of `hearth serve`
//! (signed with the account's key, as every other client command), never a second control
//! plane.
//!
//! Built on `rmcp`, the Model Context Protocol's official Rust SDK: it follows the spec
//! as it moves (both the initialize-era revisions and the sessionless 2026-07-28 one, which
//! the official Python SDK speaks by default), derives each tool's JSON schema from its
//! argument type (schemars), turns a bad argument into a tool error rather than a protocol
//! failure, and serves stdio and Streamable HTTP (a tower service mounted on axum 0.8,
//! which the workspace already uses). Hand-writing JSON-RPC framing, version negotiation
//! and SSE would be the code that goes wrong.
//!
//! Sessions: a `hearth mcp` process is one agent session. Its sandbox is created on the
//! first tool that needs one and every tool uses it unless the call names another
//! (`sandbox_id`); when the session ends (stdin closes, or SIGINT/SIGTERM for `--http`)
//! the sandboxes it created are suspended, terminated or kept (`--on-exit`). Over HTTP
//! every client holding the token shares that session (MCP 2026-07-28 has no transport
//! sessions): run one server per agent, or have agents pass `sandbox_id`.
//!
//! `hearth serve` serves the same tools at `/mcp` ([`daemon`]): a session per bearer token
//! (`hearth mcp token`, [`token`]), signing with the key that minted it.

pub mod daemon;
mod files;
pub mod hub;
mod sandbox;
mod text;
mod token;

use crate::client::Conn;
use anyhow::Context;
use hub::{Hub, OnExit, Options};
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::{tool_handler, ServerHandler, ServiceExt};
use std::sync::Arc;

/// `hearth mcp`'s options.
#[derive(clap::Args, Debug)]
#[command(after_long_help = HELP_AFTER, args_conflicts_with_subcommands = true)]
pub struct McpArgs {
    #[command(subcommand)]
    cmd: Option<McpCmd>,
    /// Serve Streamable HTTP at ADDR (e.g. 127.0.0.1:8765, path /mcp) instead of stdio;
    /// clients send `Authorization: Bearer <token>`.
    #[arg(long, value_name = "ADDR")]
    http: Option<std::net::SocketAddr>,
    /// A host name (or host:port) HTTP clients reach the server by, besides loopback and the
    /// listen address (others are refused: DNS rebinding). Repeatable.
    #[arg(long = "allowed-host", value_name = "HOST")]
    allowed_hosts: Vec<String>,
    /// The bearer token HTTP clients must send (default: a random one, printed on stderr).
    #[arg(long, env = "HEARTH_MCP_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The image sandboxes run (one of your account's; `hearth images ls`). Default: an image
    /// `hearth-mcp-<base>` built from --base on first use.
    #[arg(long)]
    image: Option<String>,
    /// The managed base of the default image (python, nodejs, debian-bookworm, minimal).
    #[arg(long, default_value = "python")]
    base: String,
    /// What the session's sandboxes become when it ends.
    #[arg(long, value_enum, default_value_t = OnExit::Suspend)]
    on_exit: OnExit,
    /// Sandboxes suspend after this many idle seconds (and resume on the next tool call).
    #[arg(long, default_value_t = 900)]
    idle_suspend: u64,
    /// Suspended sandboxes are terminated after this many seconds.
    #[arg(long, default_value_t = 86_400)]
    suspended_for: u64,
    /// Let `upload`/`download` read and write this host's files (default: on for stdio, off
    /// for --http, whose clients may be elsewhere).
    #[arg(long)]
    host_files: Option<bool>,
    #[command(flatten)]
    conn: Conn,
}

/// `hearth mcp`'s subcommands.
#[derive(clap::Subcommand, Debug)]
enum McpCmd {
    /// Mint a bearer token for the daemon's own MCP server (`<API URL>/mcp` of `hearth
    /// serve`) and print it with client configurations to paste. Role session
    /// credentials cannot mint one.
    Token {
        /// How long the token lasts (1-1440).
        #[arg(long, default_value_t = 60)]
        minutes: u64,
    },
}

const HELP_AFTER: &str = "\
Tools: create_sandbox, list_sandboxes, bash, read_file, write_file, edit_file, list_files, glob,
upload, download, start_process, read_process_output, expose_port, suspend, resume, fork,
terminate. Errors come back as tool results (isError) the model can read.

Configure a client (Claude Desktop, Claude Code, Cursor: mcpServers), e.g.:
  {\"mcpServers\": {\"hearth\": {\"command\": \"hearth\", \"args\": [\"mcp\"],
    \"env\": {\"HEARTH_ENDPOINT\": \"http://127.0.0.1:8377\",
             \"AWS_ACCESS_KEY_ID\": \"…\", \"AWS_SECRET_ACCESS_KEY\": \"…\"}}}}
Over HTTP: HEARTH_MCP_TOKEN=SECRET hearth mcp --http 127.0.0.1:8765, then point the client
at http://127.0.0.1:8765/mcp with the header Authorization: Bearer SECRET.
Or use the daemon's own MCP server: `hearth mcp token` prints its URL (<API URL>/mcp), a
token and the client configuration.

A session (this process) has one sandbox, created on the first tool that needs it and
suspended (--on-exit) when the session ends; tools take sandbox_id for others.";

/// The MCP server: the tools of `sandbox.rs` and `files.rs` over one [`Hub`].
#[derive(Clone)]
pub struct HearthMcp {
    hub: Arc<Hub>,
    tool_router: ToolRouter<HearthMcp>,
}

impl HearthMcp {
    fn new(hub: Arc<Hub>) -> Self {
        HearthMcp { hub, tool_router: Self::sandbox_tools() + Self::file_tools() }
    }
}

#[tool_handler(
    router = self.tool_router,
    name = "hearth",
    instructions = "Hearth gives you a Linux sandbox (a microVM) to run code in. Tools act on this session's sandbox, created on first use (python3 is installed; work in /workspace); pass sandbox_id to act on another. Use bash for commands, read_file/edit_file/write_file for files, start_process + read_process_output for servers, expose_port to reach a server from outside. Tool errors say what to change."
)]
impl ServerHandler for HearthMcp {}

/// Runs `hearth mcp` until the session ends; returns the exit code.
pub async fn run(a: McpArgs) -> anyhow::Result<i32> {
    if let Some(McpCmd::Token { minutes }) = a.cmd {
        return token::run(&a.conn, minutes).await;
    }
    let api = a.conn.client()?;
    let opts = Options {
        image: a.image,
        base: a.base,
        idle_seconds: a.idle_suspend,
        suspended_seconds: a.suspended_for,
        on_exit: a.on_exit,
        host_files: a.host_files.unwrap_or(a.http.is_none()),
        endpoint: a.conn.endpoint.clone(),
    };
    anyhow::ensure!(a.idle_suspend >= 60, "--idle-suspend must be at least 60 seconds");
    let hub = Arc::new(Hub::new(api, opts));
    let result = match a.http {
        None => stdio(hub.clone()).await,
        Some(addr) => http(hub.clone(), addr, a.token, a.allowed_hosts).await,
    };
    hub.finish().await;
    result.map(|()| 0)
}

/// Resolves on SIGINT or SIGTERM.
async fn signalled() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn stdio(hub: Arc<Hub>) -> anyhow::Result<()> {
    let service = HearthMcp::new(hub).serve(rmcp::transport::stdio()).await.context("start the MCP session on stdio")?;
    tokio::select! {
        r = service.waiting() => { r.context("the MCP session")?; }
        () = signalled() => {}
    }
    Ok(())
}

async fn http(hub: Arc<Hub>, addr: std::net::SocketAddr, token: Option<String>, extra_hosts: Vec<String>) -> anyhow::Result<()> {
    use rmcp::transport::streamable_http_server::{session::local::LocalSessionManager, StreamableHttpServerConfig, StreamableHttpService};
    let token = match token.filter(|t| !t.is_empty()) {
        Some(t) => t,
        None => {
            let t = random_token()?;
            eprintln!("hearth mcp: bearer token {t}");
            t
        }
    };
    let mut hosts = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    hosts.push(addr.ip().to_string());
    hosts.extend(extra_hosts);
    let config = StreamableHttpServerConfig::default().with_allowed_hosts(hosts);
    // Sessionless requests (MCP 2026-07-28) get a server each: a clone shares the hub
    // and the tool router (its schemas are made once, here).
    let server = HearthMcp::new(hub);
    let service: StreamableHttpService<HearthMcp, LocalSessionManager> =
        StreamableHttpService::new(move || Ok(server.clone()), Default::default(), config);
    let expected = Arc::new(format!("Bearer {token}"));
    let router = axum::Router::new().nest_service("/mcp", service).layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let expected = expected.clone();
            async move {
                let given = req.headers().get(http::header::AUTHORIZATION).map(|v| v.as_bytes()).unwrap_or_default();
                if !same(given, expected.as_bytes()) {
                    return (http::StatusCode::UNAUTHORIZED, [("www-authenticate", "Bearer")], "missing or wrong bearer token\n")
                        .into_response();
                }
                next.run(req).await
            }
        },
    ));
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listen on {addr}"))?;
    let bound = listener.local_addr()?;
    if !bound.ip().is_loopback() {
        eprintln!("hearth mcp: listening beyond this host ({bound}) over plain HTTP: put TLS in front of it");
    }
    {
        use std::io::Write;
        let mut out = std::io::stdout();
        let _ = writeln!(out, "listening http://{bound}/mcp");
        let _ = out.flush();
    }
    axum::serve(listener, router).with_graceful_shutdown(signalled()).await.context("serve MCP over HTTP")?;
    Ok(())
}

use axum::response::IntoResponse;

/// Compares in time independent of where the first difference is.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// 32 hex characters from the OS's random number generator.
fn random_token() -> anyhow::Result<String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).context("read /dev/urandom")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}
