//! Shells: a WebSocket to a terminal in the microvm, at the service's address
//! `wss://<endpoint>/shell` (any path of the endpoint host opens it for a shell token:
//! [`crate::endpoint`]) and at Hearth's own, `GET <daemon>/shell/<microvm id>`.
//!
//! The request needs a token from CreateMicrovmShellAuthToken in `X-aws-proxy-auth` — or,
//! from browsers, which cannot set WebSocket headers, as a subprotocol: the service's
//! `lambda-microvms.authentication.<token>` beside `lambda-microvms` (a
//! `lambda-microvms.port.<N>` its clients send is ignored: a shell is no app port), or
//! Hearth's `hearth-token.<token>` beside `hearth-shell`; the daemon answers with
//! whichever of `hearth-shell` and `lambda-microvms` was offered (endpoint tokens do not
//! open shells, nor shell tokens the endpoint), and the microvm must
//! have been run with the `SHELL_INGRESS` connector. Query parameters: `rows` and `cols`
//! (the terminal's size, 24×80 by default), `command` (a shell command line to run
//! instead of a login shell) and `tty=false` (no terminal: plain pipes, for scripted input,
//! like `ssh -T`). A SUSPENDED microvm whose idle policy allows it is resumed
//! first; an open shell counts as activity.
//!
//! Messages, both ways:
//!
//! | direction | kind   | content                                                        |
//! |-----------|--------|----------------------------------------------------------------|
//! | client→   | binary | terminal input (keys, pasted text), bytes as typed              |
//! | client→   | text   | `{"resize":{"rows":R,"cols":C}}`, `{"signal":"INT"}` (a name or number), or `{"eof":true}` (end of input: closes stdin without a terminal, types ^D on one) |
//! | →client   | binary | terminal output, bytes as the programs wrote them (UTF-8 is passed through, never re-encoded); without a terminal, stdout and stderr both |
//! | →client   | text   | `{"exit":{"code":C,"signal":S}}` when the shell ends, then a close; `{"error":"…"}` for a refused control message or a failure |
//!
//! Closing the WebSocket hangs up the terminal: every process of the shell's session is
//! killed.

use crate::error::{ApiError, Kind};
use crate::ingress::{authorize, SHELL_SCOPE};
use crate::service::Service;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::FromRequestParts;
use axum::response::{IntoResponse, Response};
use hearth_proto::exec::{ExecRequest, TtySize};
use hearth_vmm::agent::{ExecEvent, ExecInput, ExecStream};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// Largest WebSocket message a client may send.
pub const MAX_MESSAGE: usize = 1 << 20;
/// Longest `command` a shell request may carry.
pub const MAX_COMMAND: usize = 64 << 10;
/// What runs when the request names no command: the guest's bash, else its sh, as a
/// login shell.
const LOGIN_SHELL: &str = "if command -v bash >/dev/null 2>&1; then exec bash -l; fi; exec sh -l";

/// A control message from the client.
#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
enum Control {
    Resize { rows: u16, cols: u16 },
    Signal(SignalName),
    Eof(bool),
}

/// A signal by name (`INT`, `SIGINT`) or number.
#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
enum SignalName {
    Number(i32),
    Name(String),
}

impl SignalName {
    fn number(&self) -> Option<i32> {
        match self {
            SignalName::Number(n) => Some(*n).filter(|n| (1..=64).contains(n)),
            SignalName::Name(name) => {
                let name = name.strip_prefix("SIG").unwrap_or(name);
                Some(match name {
                    "HUP" => libc::SIGHUP,
                    "INT" => libc::SIGINT,
                    "QUIT" => libc::SIGQUIT,
                    "KILL" => libc::SIGKILL,
                    "USR1" => libc::SIGUSR1,
                    "USR2" => libc::SIGUSR2,
                    "TERM" => libc::SIGTERM,
                    "CONT" => libc::SIGCONT,
                    "STOP" => libc::SIGSTOP,
                    "TSTP" => libc::SIGTSTP,
                    "WINCH" => libc::SIGWINCH,
                    _ => return None,
                })
            }
        }
    }
}

/// The query of a shell request.
#[derive(Debug, PartialEq, Eq)]
struct ShellQuery {
    size: TtySize,
    command: Option<String>,
    tty: bool,
}

fn parse_query(query: Option<&str>) -> Result<ShellQuery, ApiError> {
    let mut q = ShellQuery { size: TtySize { rows: 24, cols: 80 }, command: None, tty: true };
    for pair in query.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_encoding::percent_decode_str(&v.replace('+', " "))
            .decode_utf8()
            .map_err(|_| ApiError::validation(format!("{k} is not UTF-8")))?
            .into_owned();
        let cells =
            |v: &str| v.parse::<u16>().map_err(|_| ApiError::validation(format!("{k} must be a number of character cells, got {v:?}")));
        match k {
            "rows" => q.size.rows = cells(&v)?,
            "cols" => q.size.cols = cells(&v)?,
            "command" if v.len() > MAX_COMMAND => return Err(ApiError::validation(format!("command is over {MAX_COMMAND} bytes"))),
            "command" => q.command = Some(v),
            "tty" => q.tty = v.parse().map_err(|_| ApiError::validation(format!("tty must be true or false, got {v:?}")))?,
            other => return Err(ApiError::validation(format!("unknown shell parameter {other:?} (rows, cols, command, tty)"))),
        }
    }
    q.size.validate().map_err(ApiError::validation)?;
    Ok(q)
}

/// The subprotocol a browser offers (and the daemon selects) for a shell.
pub const SUBPROTOCOL: &str = "hearth-shell";
/// Prefix of the subprotocol entry that carries the token for clients that cannot set
/// headers on a WebSocket (browsers): `new WebSocket(url, ["hearth-shell",
/// "hearth-token." + token])`.
pub const TOKEN_SUBPROTOCOL_PREFIX: &str = "hearth-token.";

/// The request's headers, with a token offered as a subprotocol
/// (`lambda-microvms.authentication.<T>` or `hearth-token.<T>`) moved to
/// `X-aws-proxy-auth` when the header itself is absent.
fn token_headers(headers: &http::HeaderMap) -> std::borrow::Cow<'_, http::HeaderMap> {
    if headers.contains_key(crate::ingress::AUTH_HEADER) {
        return std::borrow::Cow::Borrowed(headers);
    }
    match crate::endpoint::token_of(headers).and_then(|t| http::HeaderValue::from_str(&t).ok()) {
        Some(t) => {
            let mut h = headers.clone();
            h.insert(crate::ingress::AUTH_HEADER, t);
            std::borrow::Cow::Owned(h)
        }
        None => std::borrow::Cow::Borrowed(headers),
    }
}

/// Serves one shell request.
pub async fn serve(svc: Arc<Service>, req: axum::extract::Request, id: String) -> Response {
    let claims = match authorize(&svc, &token_headers(req.headers()), &id, Some(SHELL_SCOPE)) {
        Ok(c) => c,
        Err(refused) => return refused,
    };
    let query = match parse_query(req.uri().query()) {
        Ok(q) => q,
        Err(e) => return e.into_response(),
    };
    let (mut parts, _body) = req.into_parts();
    let ws = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(ws) => ws,
        Err(r) => return r.into_response(),
    };
    // A shell holds one of the microvm's connection permits, like an endpoint connection.
    let Ok(permit) = svc.ingress_permit(&id) else {
        return crate::ingress::too_busy();
    };
    let vm = match svc.vm_handle(&claims.a, &id).await {
        Ok(vm) => vm,
        Err(e) => return e.into_response(),
    };
    let mut exec = ExecRequest::shell(query.command.unwrap_or_else(|| LOGIN_SHELL.to_owned()));
    exec.tty = query.tty.then_some(query.size);
    svc.apply_image_config(&claims.a, &id, &mut exec).await;
    let stream = match vm.exec_stream(&exec).await {
        Ok(s) => s,
        Err(e) => return ApiError::new(Kind::Conflict, format!("cannot start a shell in microvm {id}: {e}")).into_response(),
    };
    tracing::info!(microvm = %id, account = %claims.a, "shell opened");
    ws.protocols([SUBPROTOCOL, crate::endpoint::SUBPROTOCOL]).max_message_size(MAX_MESSAGE).max_frame_size(MAX_MESSAGE).on_upgrade(
        move |socket| async move {
            // The permit and the VM handle live as long as the shell.
            let _held = (permit, vm);
            relay(socket, stream, query.tty).await;
            tracing::info!(microvm = %id, "shell closed");
        },
    )
}

/// How often the daemon pings the client.
const PING_EVERY: Duration = Duration::from_secs(20);
/// A client silent this long (no message, no pong) is gone: a half-open connection must
/// not keep the microvm busy and a connection permit taken forever.
const CLIENT_SILENCE: Duration = Duration::from_secs(75);

/// Moves bytes and control messages between the WebSocket and the exec until either
/// ends. The two directions run concurrently, so a program whose output backs up while
/// its input is still being written (`gunzip` of piped input) cannot deadlock them.
async fn relay(socket: WebSocket, mut stream: ExecStream, tty: bool) {
    use futures_util::{SinkExt, StreamExt};
    let Some(input) = stream.take_input() else { return };
    let (mut sink, mut source) = socket.split();
    // Replies to control messages, from the reading side to the writing side.
    let (notes_tx, mut notes_rx) = tokio::sync::mpsc::channel::<String>(8);
    let client_to_exec = async move {
        let mut input = Some(input);
        loop {
            let msg = match tokio::time::timeout(CLIENT_SILENCE, source.next()).await {
                Ok(Some(Ok(m))) => m,
                // The client is gone (closed, broken, or silent past the limit).
                _ => return,
            };
            match msg {
                Message::Binary(data) => {
                    // Input that can no longer go in (the program closed it, or ended) is
                    // dropped; the exit status still comes on the other side.
                    if let Some(i) = &input {
                        if i.write_stdin(data).await.is_err() {
                            input = None;
                        }
                    }
                }
                Message::Text(text) => {
                    if let Err(why) = apply(&mut input, tty, text.as_str()).await {
                        let _ = notes_tx.send(why).await;
                    }
                }
                Message::Close(_) => return,
                _ => {}
            }
        }
    };
    let exec_to_client = async move {
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        loop {
            let msg = tokio::select! {
                event = stream.next_event() => match event {
                    Ok(Some(ExecEvent::Stdout(b) | ExecEvent::Stderr(b))) => Message::Binary(b),
                    Ok(Some(ExecEvent::Exit(x))) => {
                        let _ = sink.send(Message::Text(json!({ "exit": { "code": x.code, "signal": x.signal } }).to_string().into())).await;
                        let _ = sink.send(Message::Close(Some(CloseFrame { code: 1000, reason: "shell exited".into() }))).await;
                        return;
                    }
                    Ok(None) => return,
                    Err(e) => {
                        let _ = sink.send(Message::Text(json!({ "error": format!("the shell broke off: {e}") }).to_string().into())).await;
                        let _ = sink.send(Message::Close(Some(CloseFrame { code: 1011, reason: "shell broke off".into() }))).await;
                        return;
                    }
                },
                Some(note) = notes_rx.recv() => Message::Text(json!({ "error": note }).to_string().into()),
                _ = ping.tick() => Message::Ping(Default::default()),
            };
            if sink.send(msg).await.is_err() {
                return;
            }
        }
    };
    // Either side ending ends the shell; dropping the exec stream hangs up its terminal.
    tokio::select! {
        _ = client_to_exec => {}
        _ = exec_to_client => {}
    }
}

/// Applies one control message.
async fn apply(input: &mut Option<ExecInput>, tty: bool, text: &str) -> Result<(), String> {
    let control: Control = serde_json::from_str(text).map_err(|e| {
        format!("bad control message: {e} (send {{\"resize\":{{\"rows\":R,\"cols\":C}}}}, {{\"signal\":\"INT\"}} or {{\"eof\":true}})")
    })?;
    let result = match (control, input.as_ref()) {
        (Control::Eof(false), _) => Ok(()),
        // A terminal has no end of input, only the key that asks for one.
        (Control::Eof(true), Some(i)) if tty => i.write_stdin(bytes::Bytes::from_static(b"\x04")).await,
        (Control::Eof(true), _) => {
            *input = None;
            Ok(())
        }
        (Control::Resize { rows, cols }, Some(i)) => i.resize(rows, cols).await,
        (Control::Signal(s), Some(i)) => {
            let n = s.number().ok_or_else(|| format!("unknown signal {s:?}"))?;
            i.signal(n).await
        }
        (_, None) => return Err("the shell's input is closed".into()),
    };
    result.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages() {
        assert_eq!(serde_json::from_str::<Control>(r#"{"resize":{"rows":5,"cols":9}}"#).unwrap(), Control::Resize { rows: 5, cols: 9 });
        let sig = |t: &str| {
            serde_json::from_str::<Control>(t).ok().and_then(|c| match c {
                Control::Signal(s) => s.number(),
                _ => None,
            })
        };
        assert_eq!(sig(r#"{"signal":"INT"}"#), Some(libc::SIGINT));
        assert_eq!(sig(r#"{"signal":"SIGTERM"}"#), Some(libc::SIGTERM));
        assert_eq!(sig(r#"{"signal":9}"#), Some(9));
        assert_eq!(sig(r#"{"signal":0}"#), None);
        assert_eq!(sig(r#"{"signal":"BOGUS"}"#), None);
        assert!(serde_json::from_str::<Control>(r#"{"resize":{"rows":5}}"#).is_err());
        assert!(serde_json::from_str::<Control>(r#"{"resize":{"rows":5,"cols":9},"x":1}"#).is_err());
        assert!(serde_json::from_str::<Control>(r#"{"resize":{"rows":-1,"cols":9}}"#).is_err());
        assert_eq!(serde_json::from_str::<Control>(r#"{"eof":true}"#).unwrap(), Control::Eof(true));
    }

    #[test]
    fn tokens_from_subprotocols() {
        let mut h = http::HeaderMap::new();
        h.insert(http::header::SEC_WEBSOCKET_PROTOCOL, "hearth-shell, hearth-token.abc.def".parse().unwrap());
        assert_eq!(token_headers(&h).get(crate::ingress::AUTH_HEADER).unwrap(), "abc.def");
        h.insert(crate::ingress::AUTH_HEADER, "from-header".parse().unwrap());
        assert_eq!(token_headers(&h).get(crate::ingress::AUTH_HEADER).unwrap(), "from-header");
        assert!(token_headers(&http::HeaderMap::new()).get(crate::ingress::AUTH_HEADER).is_none());
    }

    #[test]
    fn queries() {
        assert_eq!(parse_query(None).unwrap(), ShellQuery { size: TtySize { rows: 24, cols: 80 }, command: None, tty: true });
        let q = parse_query(Some("rows=50&cols=132&command=ls%20-l+%2Ftmp&tty=false")).unwrap();
        assert_eq!(q, ShellQuery { size: TtySize { rows: 50, cols: 132 }, command: Some("ls -l /tmp".into()), tty: false });
        assert!(parse_query(Some("tty=maybe")).is_err());
        assert!(parse_query(Some("rows=0")).is_err());
        assert!(parse_query(Some("cols=99999")).is_err());
        assert!(parse_query(Some("rows=abc")).is_err());
        assert!(parse_query(Some("user=root")).is_err());
        assert!(parse_query(Some(&format!("command={}", "x".repeat(MAX_COMMAND + 1)))).is_err());
    }
}
