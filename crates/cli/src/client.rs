//! `hearth run|ls|get|exec|shell|cp|suspend|resume|rm|usage`: the CLI as a client of a
//! running `hearth serve`, signing with SigV4 like the AWS SDKs. Tables for people,
//! `--json` for scripts. `hearth images` (API and local store) is in `images.rs`.

use anyhow::Context;
use clap::{Args, Subcommand};
use hearth_api::client::Client;
use serde_json::{json, Value};

/// Where the API is and who calls it.
#[derive(Args, Debug, Clone)]
pub struct Conn {
    /// The API's URL.
    #[arg(long, global = true, env = "HEARTH_ENDPOINT", default_value = "http://127.0.0.1:8377")]
    pub(crate) endpoint: String,
    /// Access key id (from `hearth keys create`, or the first start's output).
    #[arg(long, global = true, env = "AWS_ACCESS_KEY_ID", hide_env_values = true)]
    access_key: Option<String>,
    /// Secret access key.
    #[arg(long, global = true, env = "AWS_SECRET_ACCESS_KEY", hide_env_values = true)]
    secret_key: Option<String>,
    /// Print JSON.
    #[arg(long, global = true)]
    pub(crate) json: bool,
}

impl Conn {
    pub(crate) fn client(&self) -> anyhow::Result<Client> {
        let ak = self.access_key.as_deref().context("no access key: set AWS_ACCESS_KEY_ID (and AWS_SECRET_ACCESS_KEY) or pass --access-key/--secret-key; `hearth keys create` makes one")?;
        let sk = self.secret_key.as_deref().context("no secret key: set AWS_SECRET_ACCESS_KEY or pass --secret-key")?;
        Ok(Client::new(&self.endpoint, ak, sk))
    }
}

/// The client commands.
#[derive(Subcommand, Debug)]
pub enum ClientCmd {
    /// Run a microvm from an image (RunMicrovm).
    Run {
        /// Image name or ARN.
        image: String,
        /// Image version (default: the newest successful one).
        #[arg(long = "image-version", id = "image_version", value_name = "VERSION")]
        version: Option<String>,
        /// Suspend after this many idle seconds (≥ 60).
        #[arg(long)]
        idle_suspend: Option<u64>,
        /// Terminate after this many seconds suspended (0: terminate instead of suspending).
        #[arg(long, default_value_t = 3600)]
        suspended_for: u64,
        /// Resume automatically on the next exec/file call.
        #[arg(long)]
        auto_resume: bool,
        /// Lifetime limit in seconds (≤ 28800).
        #[arg(long)]
        max_duration: Option<u64>,
        /// Allow internet egress (INTERNET_EGRESS).
        #[arg(long)]
        internet: bool,
        /// Payload for the app's /run hook.
        #[arg(long)]
        payload: Option<String>,
        /// Run without the SHELL_INGRESS connector: no `hearth shell` into it.
        #[arg(long)]
        no_shell: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// List microvms (ListMicrovms, all pages).
    Ls {
        #[command(flatten)]
        conn: Conn,
    },
    /// Show a microvm (GetMicrovm).
    Get {
        /// Microvm id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Run a command in a microvm and print its output; the exit code passes through.
    Exec {
        /// Microvm id.
        id: String,
        /// Working directory.
        #[arg(long)]
        cwd: Option<String>,
        /// Run through /bin/sh -c.
        #[arg(long)]
        shell: bool,
        #[command(flatten)]
        conn: Conn,
        /// The command.
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
    /// An interactive terminal in a microvm (needs SHELL_INGRESS, which `hearth run`
    /// attaches). ^C, ^Z and window resizes reach the microvm; the exit code passes
    /// through. With piped input there is no terminal (like `ssh -T`) unless --tty.
    Shell {
        /// Microvm id.
        id: String,
        /// A terminal even when stdin is not one.
        #[arg(long, short = 't')]
        tty: bool,
        #[command(flatten)]
        conn: Conn,
        /// A command line to run instead of a login shell.
        #[arg(trailing_var_arg = true)]
        command: Vec<String>,
    },
    /// Copy a file into (`LOCAL ID:PATH`) or out of (`ID:PATH LOCAL`) a microvm, at any
    /// size (streamed, with progress on a terminal). With -r, a directory: its contents
    /// become the new directory the destination names.
    Cp {
        /// Source: a local path or mvm-ID:/absolute/path.
        from: String,
        /// Destination: a local path or mvm-ID:/absolute/path.
        to: String,
        /// Copy a directory (as a tar stream; symbolic links are kept as links).
        #[arg(short = 'r', long)]
        recursive: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// A link to a microvm's app that a browser can open: the endpoint's URL with a link
    /// token valid for 5 minutes, which the endpoint exchanges for an HttpOnly cookie of
    /// the microvm's own host (lasting --minutes). A link makes one cookie; until it is
    /// opened, whoever holds it can open it: share it like a password.
    Url {
        /// Microvm id.
        id: String,
        /// The app's port the link opens.
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// How long the browser's cookie lasts, in minutes (1-1440).
        #[arg(long, default_value_t = 60)]
        minutes: u64,
        #[command(flatten)]
        conn: Conn,
    },
    /// Suspend a microvm (SuspendMicrovm).
    Suspend {
        /// Microvm id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Resume a microvm (ResumeMicrovm).
    Resume {
        /// Microvm id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Terminate a microvm (TerminateMicrovm).
    Rm {
        /// Microvm id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Metered usage of your account (vCPU-seconds, GiB-seconds, snapshot GiB-hours).
    Usage {
        /// From (seconds since the epoch; default: the beginning).
        #[arg(long)]
        from: Option<f64>,
        /// To (default: now).
        #[arg(long)]
        to: Option<f64>,
        #[command(flatten)]
        conn: Conn,
    },
}

/// Percent-encodes a path segment or query value (unreserved characters stay).
/// Percent-encodes a path segment or query value.
pub(crate) fn enc(s: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');
    percent_encoding::utf8_percent_encode(s, SET).to_string()
}

pub(crate) fn print(conn: &Conn, v: &Value, table: impl FnOnce(&Value)) {
    if conn.json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        table(v);
    }
}

fn ts(v: &Value) -> String {
    v.as_f64().map_or_else(|| "-".into(), |t| format!("{:.0}s ago", (hearth_api::clock::now() - t).max(0.0)))
}

pub(crate) async fn all_pages(c: &Client, path: &str) -> anyhow::Result<Vec<Value>> {
    let mut items = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let q = token.as_ref().map_or_else(|| "?maxResults=50".to_owned(), |t| format!("?maxResults=50&nextToken={}", enc(t)));
        let v = c.call(http::Method::GET, &format!("{path}{q}"), None).await?;
        items.extend(v["items"].as_array().cloned().unwrap_or_default());
        match v["nextToken"].as_str() {
            Some(t) => token = Some(t.to_owned()),
            None => return Ok(items),
        }
    }
}

/// Runs a client command; returns the exit code.
pub async fn run(cmd: ClientCmd) -> anyhow::Result<i32> {
    match cmd {
        ClientCmd::Run { image, version, idle_suspend, suspended_for, auto_resume, max_duration, internet, payload, no_shell, conn } => {
            let mut body = json!({ "imageIdentifier": image });
            if let Some(v) = version {
                body["imageVersion"] = v.into();
            }
            if let Some(idle) = idle_suspend {
                body["idlePolicy"] =
                    json!({ "maxIdleDurationSeconds": idle, "suspendedDurationSeconds": suspended_for, "autoResumeEnabled": auto_resume });
            }
            if let Some(d) = max_duration {
                body["maximumDurationInSeconds"] = d.into();
            }
            if internet {
                body["egressNetworkConnectors"] = json!(["INTERNET_EGRESS"]);
            }
            if let Some(p) = payload {
                body["runHookPayload"] = p.into();
            }
            if !no_shell {
                body["ingressNetworkConnectors"] = json!([hearth_api::service::SHELL_INGRESS]);
            }
            let v = conn.client()?.call(http::Method::POST, "/2025-09-09/microvms", Some(&body)).await?;
            print(&conn, &v, |v| {
                println!("{}  {}", v["microvmId"].as_str().unwrap_or("?"), v["state"].as_str().unwrap_or("?"));
                if let Some(r) = v["stateReason"].as_str() {
                    println!("reason: {r}");
                }
            });
            Ok(if v["state"] == "RUNNING" { 0 } else { 1 })
        }
        ClientCmd::Url { id, port, minutes, conn } => {
            let body = json!({ "port": port, "expirationInMinutes": minutes });
            let v = conn.client()?.call(http::Method::POST, &format!("/hearth/v1/microvms/{}/link", enc(&id)), Some(&body)).await?;
            print(&conn, &v, |v| println!("{}", v["url"].as_str().unwrap_or("?")));
            Ok(0)
        }
        ClientCmd::Ls { conn } => {
            let items = all_pages(&conn.client()?, "/2025-09-09/microvms").await?;
            print(&conn, &Value::Array(items.clone()), |_| {
                println!("{:<22} {:<12} {:<8} {:<14} IMAGE", "MICROVM", "STATE", "VERSION", "STARTED");
                for m in &items {
                    let image = m["imageArn"].as_str().unwrap_or("").rsplit(':').next().unwrap_or("");
                    println!(
                        "{:<22} {:<12} {:<8} {:<14} {image}",
                        m["microvmId"].as_str().unwrap_or(""),
                        m["state"].as_str().unwrap_or(""),
                        m["imageVersion"].as_str().unwrap_or(""),
                        ts(&m["startedAt"])
                    );
                }
            });
            Ok(0)
        }
        ClientCmd::Get { id, conn } => {
            let v = conn.client()?.call(http::Method::GET, &format!("/2025-09-09/microvms/{}", enc(&id)), None).await?;
            print(&conn, &v, |v| {
                for k in [
                    "microvmId",
                    "state",
                    "stateReason",
                    "imageArn",
                    "imageVersion",
                    "maximumDurationInSeconds",
                    "idlePolicy",
                    "ingressNetworkConnectors",
                    "egressNetworkConnectors",
                ] {
                    if !v[k].is_null() {
                        println!("{k:<26} {}", v[k].as_str().map_or_else(|| v[k].to_string(), str::to_owned));
                    }
                }
                println!("{:<26} {}", "startedAt", ts(&v["startedAt"]));
            });
            Ok(0)
        }
        ClientCmd::Exec { id, cwd, shell, conn, command } => {
            let mut body = if shell { json!({ "shell": command.join(" ") }) } else { json!({ "command": command }) };
            if let Some(c) = cwd {
                body["cwd"] = c.into();
            }
            let c = conn.client()?;
            if conn.json {
                let v = c.call(http::Method::POST, &format!("/hearth/v1/microvms/{}/exec", enc(&id)), Some(&body)).await?;
                println!("{v}");
                return Ok(v["exitCode"].as_i64().map_or_else(|| 128 + v["signal"].as_i64().unwrap_or(0) as i32, |c| c as i32));
            }
            // Output is printed as the command writes it.
            let mut code = 1;
            let mut failure = None;
            c.stream_lines(&format!("/hearth/v1/microvms/{}/exec?stream=true", enc(&id)), &body, |line| {
                use std::io::Write;
                if let Some(s) = line["stdout"].as_str() {
                    let _ = std::io::stdout().write_all(s.as_bytes());
                    let _ = std::io::stdout().flush();
                } else if let Some(s) = line["stderr"].as_str() {
                    let _ = std::io::stderr().write_all(s.as_bytes());
                } else if let Some(x) = line.get("exit") {
                    code = x["code"].as_i64().map_or_else(|| 128 + x["signal"].as_i64().unwrap_or(0) as i32, |c| c as i32);
                } else if let Some(e) = line["error"].as_str() {
                    failure = Some(e.to_owned());
                }
            })
            .await?;
            if let Some(e) = failure {
                anyhow::bail!("exec failed: {e}");
            }
            Ok(code)
        }
        ClientCmd::Shell { id, tty, conn, command } => {
            let command = (!command.is_empty()).then(|| command.join(" "));
            crate::shell::run(&conn.client()?, &conn.endpoint, &id, command, tty).await
        }
        ClientCmd::Cp { from, to, recursive, conn } => {
            let v = crate::cp::run(&conn.client()?, conn.json, recursive, &from, &to).await?;
            print(&conn, &v, |v| match v.get("entries") {
                Some(n) => println!("{n} entries, {} bytes: {from} → {to}", v["size"]),
                None => println!("{} bytes: {from} → {to}", v["size"]),
            });
            Ok(0)
        }
        ClientCmd::Suspend { id, conn } => {
            simple(&conn, http::Method::POST, &format!("/2025-09-09/microvms/{}/suspend", enc(&id)), "suspended").await
        }
        ClientCmd::Resume { id, conn } => {
            simple(&conn, http::Method::POST, &format!("/2025-09-09/microvms/{}/resume", enc(&id)), "resumed").await
        }
        ClientCmd::Rm { id, conn } => {
            simple(&conn, http::Method::DELETE, &format!("/2025-09-09/microvms/{}", enc(&id)), "terminated").await
        }
        ClientCmd::Usage { from, to, conn } => {
            let mut q = Vec::new();
            if let Some(f) = from {
                q.push(format!("from={f}"));
            }
            if let Some(t) = to {
                q.push(format!("to={t}"));
            }
            let v = conn.client()?.call(http::Method::GET, &format!("/hearth/v1/usage?{}", q.join("&")), None).await?;
            print(&conn, &v, |v| {
                let u = &v["usage"];
                println!("account {}", v["account"].as_str().unwrap_or(""));
                println!("vCPU-seconds        {:.1}", u["vcpuSeconds"].as_f64().unwrap_or(0.0));
                println!("GiB-seconds         {:.1}", u["gibSeconds"].as_f64().unwrap_or(0.0));
                println!("snapshot GiB-hours  {:.4}", u["snapshotGibHours"].as_f64().unwrap_or(0.0));
            });
            Ok(0)
        }
    }
}

pub(crate) async fn simple(conn: &Conn, method: http::Method, path: &str, done: &str) -> anyhow::Result<i32> {
    let v = conn.client()?.call(method, path, None).await?;
    print(conn, &v, |_| println!("{done}"));
    Ok(0)
}
