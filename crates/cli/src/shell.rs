//! `hearth shell ID [-- COMMAND…]`: an interactive terminal in a microvm, through the
//! daemon's shell WebSocket (CreateMicrovmShellAuthToken, then `GET /shell/<id>`).
//!
//! On a terminal, the local one is switched to raw mode for the session (restored on
//! every exit path, panics included) so keys such as ^C and ^Z reach the remote terminal,
//! and window size changes (SIGWINCH) are forwarded. With input from a pipe or file there
//! is no terminal (like `ssh -T`): the input goes to the shell's stdin and its end closes
//! it, so `echo 'make test' | hearth shell ID` works in scripts (`--tty` forces one).
//! The remote command's exit code becomes ours (128 + signal when killed).

use crate::client::enc;
use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use hearth_api::client::Client;
use serde_json::{json, Value};
use std::io::Write;
use std::os::fd::AsFd;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

/// The local terminal in raw mode; the previous settings come back when dropped.
struct RawMode(nix::sys::termios::Termios);

impl RawMode {
    fn enter() -> anyhow::Result<RawMode> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let saved = tcgetattr(stdin.as_fd()).context("reading the terminal's settings")?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(stdin.as_fd(), SetArg::TCSADRAIN, &raw).context("switching the terminal to raw mode")?;
        Ok(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(std::io::stdin().as_fd(), nix::sys::termios::SetArg::TCSADRAIN, &self.0);
    }
}

/// The local terminal's size (rows, columns), if stdout is a terminal.
fn term_size() -> Option<(u16, u16)> {
    let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one winsize into the pointer, which outlives the call.
    let ok = unsafe { libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) } == 0;
    (ok && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}

/// Opens a shell in microvm `id` and relays the terminal until it ends; returns the exit code.
pub async fn run(client: &Client, endpoint: &str, id: &str, command: Option<String>, force_tty: bool) -> anyhow::Result<i32> {
    let v = client
        .call(http::Method::POST, &format!("/2025-09-09/microvms/{}/shell-auth-token", enc(id)), Some(&json!({ "expirationInMinutes": 5 })))
        .await?;
    let token = v["authToken"]["X-aws-proxy-auth"].as_str().context("the daemon's shell token has no X-aws-proxy-auth part")?.to_owned();
    // SAFETY: isatty only inspects the descriptor.
    let interactive = unsafe { libc::isatty(0) } == 1;
    let (rows, cols) = term_size().unwrap_or((24, 80));
    let base = endpoint.trim_end_matches('/');
    let ws_base = if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else {
        format!("ws://{}", base.strip_prefix("http://").unwrap_or(base))
    };
    let tty = interactive || force_tty;
    let mut url = format!("{ws_base}/shell/{}?rows={rows}&cols={cols}&tty={tty}", enc(id));
    if let Some(c) = command {
        url.push_str(&format!("&command={}", enc(&c)));
    }
    let mut req = url.as_str().into_client_request().with_context(|| format!("bad shell URL {url}"))?;
    req.headers_mut().insert("x-aws-proxy-auth", token.parse().context("token is not a header value")?);
    let (ws, _) = tokio_tungstenite::connect_async(req).await.map_err(|e| match e {
        tungstenite::Error::Http(resp) => {
            let body = resp.body().as_ref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
            let msg = serde_json::from_str::<Value>(&body).ok().and_then(|v| v["message"].as_str().map(str::to_owned)).unwrap_or(body);
            anyhow::anyhow!("the daemon refused the shell ({}): {}", resp.status(), msg.trim())
        }
        other => anyhow::anyhow!("cannot open the shell at {url}: {other}"),
    })?;
    let (mut tx, mut rx) = ws.split();

    // Input is read on a thread of its own: a blocked read of a terminal must not hold up
    // the exit (tokio's stdin would, on its blocking pool).
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match std::io::Read::read(&mut stdin, &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if in_tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let raw = if interactive { Some(RawMode::enter()?) } else { None };
    // Input (keys, resizes, the end of input) goes out on a task of its own, so output
    // is always read while input is being sent: neither can back up into the other.
    let mut sender = tokio::spawn(async move {
        let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
        loop {
            tokio::select! {
                data = in_rx.recv() => match data {
                    Some(d) => tx.send(Message::Binary(d.into())).await?,
                    None => {
                        tx.send(Message::Text(json!({ "eof": true }).to_string().into())).await?;
                        // Resizes still go out until the shell ends.
                        while winch.recv().await.is_some() {
                            if let Some((rows, cols)) = term_size() {
                                tx.send(Message::Text(json!({ "resize": { "rows": rows, "cols": cols } }).to_string().into())).await?;
                            }
                        }
                        return Ok::<(), anyhow::Error>(());
                    }
                },
                _ = winch.recv() => {
                    if let Some((rows, cols)) = term_size() {
                        tx.send(Message::Text(json!({ "resize": { "rows": rows, "cols": cols } }).to_string().into())).await?;
                    }
                }
            }
        }
    });
    // SIGTERM and SIGHUP end the session cleanly, so the terminal's settings come back.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("SIGTERM handler")?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).context("SIGHUP handler")?;
    let mut exit: Option<i32> = None;
    let mut failure: Option<String> = None;
    let mut out = std::io::stdout();
    loop {
        tokio::select! {
            msg = rx.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    out.write_all(&b)?;
                    out.flush()?;
                }
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                    if let Some(x) = v.get("exit") {
                        exit = Some(x["code"].as_i64().map_or_else(|| 128 + x["signal"].as_i64().unwrap_or(0) as i32, |c| c as i32));
                    } else if let Some(e) = v["error"].as_str() {
                        failure = Some(e.to_owned());
                    }
                }
                Some(Ok(Message::Close(_))) | None => break,
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    failure = Some(format!("the shell connection broke: {e}"));
                    break;
                }
            },
            r = &mut sender, if !sender.is_finished() => {
                if let Ok(Err(e)) = r {
                    failure = Some(format!("sending to the shell failed: {e}"));
                    break;
                }
            }
            _ = term.recv() => { failure = Some("terminated".into()); break; }
            _ = hup.recv() => { failure = Some("hung up".into()); break; }
        }
    }
    sender.abort();
    drop(raw);
    match (exit, failure) {
        (Some(code), _) => Ok(code),
        (None, Some(e)) => anyhow::bail!("{e}"),
        (None, None) => anyhow::bail!("the shell ended without an exit status"),
    }
}
