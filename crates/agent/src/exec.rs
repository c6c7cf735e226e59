//! `POST /v1/exec`: run a process, stream its stdin/stdout/stderr, report how it ended.
//!
//! Each exec runs in its own process group (a session of its own on a pseudo-terminal,
//! for `tty` execs); a timeout or the host abandoning the stream kills the whole group.
//! Signal and resize frames in the request body are handled as they arrive, ahead of
//! up to [`STDIN_QUEUE_BYTES`] of stdin still waiting for the process to read it.
//! Output is read in chunks and sent as frames through a small bounded channel, so a
//! slow host applies back-pressure through HTTP/2 flow control down to the process's pipe
//! instead of growing a buffer here.

use crate::pty;
use crate::reaper::Exit;
use crate::server::{self, Body, State};
use bytes::Bytes;
use hearth_proto::exec::{chunked, Command, ExecExit, ExecRequest, Frame, FrameDecoder, FrameKind, SignalRequest, TtySize};
use hearth_proto::{ErrorBody, ErrorCode};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// After the process exits, how long a pipe may stay silent (a background child holding it
/// open) before the exec ends anyway. Output still flowing, or waiting for a slow host,
/// is never cut.
const OUTPUT_GRACE: Duration = Duration::from_millis(200);

/// What a pump is doing, for the end-of-exec decision.
#[derive(Default)]
struct PumpState {
    /// True while it waits for the pipe (not while it waits for the host).
    reading: std::sync::atomic::AtomicBool,
    /// When it last got bytes or started waiting, in ms since `EPOCH`.
    since_ms: std::sync::atomic::AtomicU64,
}

static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

fn now_ms() -> u64 {
    EPOCH.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64
}
const READ_CHUNK: usize = 64 << 10;
/// Stdin the agent holds for a process that has not read it yet; signal and resize frames
/// behind at most this much are still handled at once. Past it, HTTP/2 flow control holds
/// the rest of the request body (signals included) on the host.
const STDIN_QUEUE_BYTES: usize = 1 << 20;
/// After a terminal's session leader exits, how long its output may go on (background
/// jobs, now sent SIGHUP as on a hang-up) before the exec ends anyway.
const TTY_DRAIN_LIMIT: Duration = Duration::from_secs(5);
/// The spec frame must arrive within this many bytes of the body.
const MAX_SPEC_BYTES: usize = hearth_proto::exec::MAX_FRAME_PAYLOAD + 5;

type Tx = mpsc::Sender<Result<Bytes, std::io::Error>>;

/// Handles one exec request.
pub async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let mut body = req.into_body();
    let mut decoder = FrameDecoder::new();
    // Read until the spec frame is complete.
    let spec = loop {
        match decoder.next_frame() {
            Ok(Some(f)) if f.kind == FrameKind::Spec => break f.payload,
            Ok(Some(_)) => return bad("the first frame of an exec must be its spec"),
            Ok(None) => {}
            Err(e) => return bad(&e.to_string()),
        }
        if decoder.buffered() > MAX_SPEC_BYTES {
            return bad("exec spec too large");
        }
        match body.frame().await {
            Some(Ok(f)) => {
                if let Ok(data) = f.into_data() {
                    decoder.push(&data);
                }
            }
            Some(Err(e)) => return bad(&format!("reading exec body: {e}")),
            None => return bad("exec body ended before its spec"),
        }
    };
    let request: ExecRequest = match serde_json::from_slice(&spec) {
        Ok(r) => r,
        Err(e) => return bad(&format!("invalid exec spec: {e}")),
    };
    if let Err(e) = request.validate() {
        return bad(&e);
    }

    let (tx, rx) = mpsc::channel(8);
    let response = Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/vnd.hearth.exec-frames")
        .body(server::channel_body(rx))
        .expect("static response parts");

    match spawn(&state, &request) {
        Ok(running) => {
            tokio::spawn(supervise(running, request.timeout_ms, body, decoder, tx));
        }
        Err(e) => {
            let err = ErrorBody { code: io_code(&e), message: format!("cannot start {}: {e}", describe(&request)) };
            let _ = tx.try_send(Ok(Frame::json(FrameKind::Error, &err).encode()));
        }
    }
    response
}

fn bad(msg: &str) -> Response<Body> {
    server::error(StatusCode::BAD_REQUEST, ErrorCode::InvalidInput, msg)
}

fn io_code(e: &std::io::Error) -> ErrorCode {
    match e.kind() {
        std::io::ErrorKind::NotFound => ErrorCode::NotFound,
        std::io::ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
        std::io::ErrorKind::InvalidInput => ErrorCode::InvalidInput,
        _ => ErrorCode::Io,
    }
}

fn describe(r: &ExecRequest) -> String {
    match &r.command {
        Command::Argv(a) => format!("{:?}", a[0]),
        Command::Shell(_) => "/bin/sh".into(),
    }
}

/// Where the process's input goes.
enum Input {
    /// Its stdin pipe.
    Pipe(OwnedFd),
    /// Its terminal.
    Pty(Arc<pty::Master>),
}

/// Where the process's output comes from.
enum Output {
    /// Its stdout and stderr pipes.
    Pipes(OwnedFd, OwnedFd),
    /// Its terminal (stdout and stderr are both the terminal).
    Pty(Arc<pty::Master>),
}

struct Running {
    pid: i32,
    exit: tokio::sync::oneshot::Receiver<Exit>,
    stdin: Option<Input>,
    output: Output,
}

/// A user to run as.
struct User {
    uid: u32,
    gid: u32,
    name: String,
    home: String,
}

fn resolve_user(spec: Option<&str>) -> std::io::Result<User> {
    let spec = spec.unwrap_or("root");
    let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let entries: Vec<Vec<&str>> = passwd.lines().map(|l| l.split(':').collect::<Vec<_>>()).filter(|f| f.len() >= 7).collect();
    let by_uid = |uid: u32| entries.iter().find(|f| f[2].parse::<u32>().ok() == Some(uid));
    if let Some((u, g)) = spec.split_once(':').or(Some((spec, ""))).filter(|(u, _)| u.parse::<u32>().is_ok()) {
        let uid: u32 = u.parse().map_err(|_| invalid(format!("bad uid in {spec:?}")))?;
        let entry = by_uid(uid);
        let gid = if g.is_empty() {
            entry.and_then(|f| f[3].parse().ok()).unwrap_or(uid)
        } else {
            g.parse().map_err(|_| invalid(format!("bad gid in {spec:?}")))?
        };
        return Ok(User {
            uid,
            gid,
            name: entry.map(|f| f[0].to_owned()).unwrap_or_else(|| uid.to_string()),
            home: entry.map(|f| f[5].to_owned()).unwrap_or_else(|| "/".into()),
        });
    }
    if spec == "root" && entries.iter().all(|f| f[0] != "root") {
        return Ok(User { uid: 0, gid: 0, name: "root".into(), home: "/root".into() });
    }
    let f = entries.iter().find(|f| f[0] == spec).ok_or_else(|| invalid(format!("no user {spec:?} in the guest's /etc/passwd")))?;
    Ok(User {
        uid: f[2].parse().map_err(|_| invalid(format!("bad uid for {spec}")))?,
        gid: f[3].parse().map_err(|_| invalid(format!("bad gid for {spec}")))?,
        name: f[0].to_owned(),
        home: f[5].to_owned(),
    })
}

fn spawn(state: &State, r: &ExecRequest) -> std::io::Result<Running> {
    let user = resolve_user(r.user.as_deref())?;
    let mut cmd = match &r.command {
        Command::Argv(a) => {
            let mut c = std::process::Command::new(&a[0]);
            c.args(&a[1..]);
            c
        }
        Command::Shell(s) => {
            let mut c = std::process::Command::new("/bin/sh");
            c.arg("-c").arg(s);
            c
        }
    };
    let cwd = r.cwd.clone().unwrap_or_else(|| "/workspace".into());
    cmd.env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", &user.home)
        .env("USER", &user.name)
        .env("LOGNAME", &user.name)
        .env("TERM", if r.tty.is_some() { "xterm-256color" } else { "xterm" });
    // The AWS SDKs find credentials at the metadata service and Hearth's AWS services
    // behind the same address ([`crate::metadata`]); the caller's env (an image's ENV, a
    // run's) still wins, as it is applied after.
    cmd.envs(crate::metadata::SDK_ENV.iter().copied());
    if r.tty.is_some() && !r.env.contains_key("LANG") {
        cmd.env("LANG", "C.UTF-8");
    }
    cmd.envs(&r.env).current_dir(&cwd);
    if user.uid != 0 || user.gid != 0 {
        cmd.uid(user.uid).gid(user.gid);
    }
    let mut master = None;
    if let Some(TtySize { rows, cols }) = r.tty {
        let (m, slave) = pty::open(rows, cols)?;
        // The user's own terminal, as a login would leave it.
        nix::unistd::fchown(std::os::fd::AsRawFd::as_raw_fd(&slave), Some(nix::unistd::Uid::from_raw(user.uid)), None)?;
        cmd.stdin(slave.try_clone()?).stdout(slave.try_clone()?).stderr(slave);
        // A session of its own with the terminal as controlling tty: job control, ^C, and
        // SIGHUP when the terminal goes all work as in a login shell. Its session id is
        // its pid, which is also its process group.
        // SAFETY: the hook only makes async-signal-safe calls.
        unsafe { cmd.pre_exec(pty::make_controlling) };
        master = Some(m);
    } else {
        cmd.stdin(if r.stdin { std::process::Stdio::piped() } else { std::process::Stdio::null() })
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        // Its own process group, so a timeout can kill the whole tree. (No pre_exec hook:
        // without one std can use posix_spawn (vfork), far cheaper than fork under emulation.)
        cmd.process_group(0);
    }
    let (mut child, exit) = state.reaper.spawn(&mut cmd).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound && !std::path::Path::new(&cwd).is_dir() {
            std::io::Error::new(std::io::ErrorKind::NotFound, format!("working directory {cwd} does not exist"))
        } else {
            e
        }
    })?;
    // The slave copies held by `cmd` close with it, so the master sees EIO once the
    // processes are gone.
    drop(cmd);
    let pid = child.id() as i32;
    if let Some(m) = master {
        let m = match pty::Master::new(m) {
            Ok(m) => Arc::new(m),
            Err(e) => {
                // Nobody would supervise it: it goes now (the reaper collects it).
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                return Err(e);
            }
        };
        return Ok(Running { pid, exit, stdin: Some(Input::Pty(m.clone())), output: Output::Pty(m) });
    }
    let take = |o: Option<OwnedFd>| o.ok_or_else(|| std::io::Error::other("missing pipe"));
    Ok(Running {
        pid,
        exit,
        stdin: child.stdin.take().map(OwnedFd::from).map(Input::Pipe),
        output: Output::Pipes(take(child.stdout.take().map(OwnedFd::from))?, take(child.stderr.take().map(OwnedFd::from))?),
    })
}

/// Something output is read from.
enum Source {
    Pipe(tokio::net::unix::pipe::Receiver),
    Pty(Arc<pty::Master>),
}

impl Source {
    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Source::Pipe(p) => p.read(buf).await,
            Source::Pty(m) => m.read(buf).await,
        }
    }
}

async fn pump(source: std::io::Result<Source>, kind: FrameKind, tx: Tx, state: Arc<PumpState>) {
    use std::sync::atomic::Ordering::Relaxed;
    let Ok(mut source) = source else { return };
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        state.since_ms.store(now_ms(), Relaxed);
        state.reading.store(true, Relaxed);
        let got = source.read(&mut buf).await;
        state.reading.store(false, Relaxed);
        match got {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                for f in chunked(kind, Bytes::copy_from_slice(&buf[..n])) {
                    if tx.send(Ok(f.encode())).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// Reads the request body: stdin frames go to the process through a writer task with a
/// queue of [`STDIN_QUEUE_BYTES`], so a process that does not read its input does not hold
/// up a signal behind it; signal and resize frames are applied at once. The end of the
/// body closes a piped stdin.
async fn control(input: Option<Input>, group: Pid, mut body: Incoming, mut decoder: FrameDecoder) {
    let master = match &input {
        Some(Input::Pty(m)) => Some(m.clone()),
        _ => None,
    };
    let budget = Arc::new(tokio::sync::Semaphore::new(STDIN_QUEUE_BYTES));
    // Bounded by bytes (the permits travel with the data), not by the channel.
    let (stdin_tx, mut stdin_rx) = mpsc::unbounded_channel::<(Bytes, tokio::sync::OwnedSemaphorePermit)>();
    let writer = tokio::spawn(async move {
        match input {
            Some(Input::Pipe(fd)) => {
                let Ok(mut pipe) = tokio::net::unix::pipe::Sender::from_owned_fd(fd) else { return };
                while let Some((data, _permit)) = stdin_rx.recv().await {
                    if pipe.write_all(&data).await.is_err() {
                        return;
                    }
                }
            }
            Some(Input::Pty(m)) => {
                while let Some((data, _permit)) = stdin_rx.recv().await {
                    if m.write_all(&data).await.is_err() {
                        return;
                    }
                }
            }
            None => {}
        }
    });
    let mut writer = AbortOnDrop(writer);
    loop {
        loop {
            match decoder.next_frame() {
                Ok(Some(f)) => match f.kind {
                    FrameKind::Stdin => {
                        let n = f.payload.len().min(STDIN_QUEUE_BYTES) as u32;
                        let Ok(permit) = budget.clone().acquire_many_owned(n).await else { return };
                        // The writer may be gone (input closed by the process): drop the data.
                        let _ = stdin_tx.send((f.payload, permit));
                    }
                    FrameKind::Signal => {
                        let Ok(sig) = serde_json::from_slice::<SignalRequest>(&f.payload) else { continue };
                        if sig.validate().is_err() {
                            continue;
                        }
                        // On a terminal the signal goes where ^C would: its foreground group.
                        if !master.as_ref().is_some_and(|m| pty::signal_foreground(m.raw(), sig.signal)) {
                            // SAFETY: kill with a negative pid signals a process group; no memory involved.
                            unsafe { libc::kill(-group.as_raw(), sig.signal) };
                        }
                    }
                    FrameKind::Resize => {
                        if let (Some(m), Ok(size)) = (&master, serde_json::from_slice::<TtySize>(&f.payload)) {
                            if size.validate().is_ok() {
                                let _ = pty::resize(m.raw(), size.rows, size.cols);
                            }
                        }
                    }
                    _ => return,
                },
                Err(_) => return,
                Ok(None) => break,
            }
        }
        match body.frame().await {
            Some(Ok(f)) => {
                if let Ok(data) = f.into_data() {
                    decoder.push(&data);
                }
            }
            _ => {
                // End of input: let the writer finish what it has, then close the pipe.
                drop(stdin_tx);
                let _ = (&mut writer.0).await;
                return;
            }
        }
    }
}

/// Signals every process of session `sid` (found through /proc: a session has no
/// handle). For SIGKILL the scan repeats until it finds none, so a process forked during
/// a scan is caught by the next.
fn signal_session(sid: i32, signal: Signal) {
    for _ in 0..8 {
        let Ok(dir) = std::fs::read_dir("/proc") else { return };
        let mut found = false;
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            // Fields after the command name, which may hold spaces: state ppid pgrp session.
            let mut f = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace()).into_iter().flatten();
            let state = f.next();
            let session = f.nth(2).and_then(|s| s.parse::<i32>().ok());
            // Zombies are dead already; they only wait for the reaper.
            if session == Some(sid) && state != Some("Z") {
                found = true;
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), signal);
            }
        }
        if !found || signal != Signal::SIGKILL {
            return;
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn supervise(r: Running, timeout_ms: Option<u64>, body: Incoming, decoder: FrameDecoder, tx: Tx) {
    let group = Pid::from_raw(r.pid);
    let tty = matches!(r.output, Output::Pty(_));
    // A terminal's session may hold jobs in process groups of their own (job control):
    // ending the exec ends them all.
    let kill_all = move || {
        let _ = killpg(group, Signal::SIGKILL);
        if tty {
            signal_session(r.pid, Signal::SIGKILL);
        }
    };
    let stdin_task = tokio::spawn(control(r.stdin, group, body, decoder));
    let (out_state, err_state) = (Arc::new(PumpState::default()), Arc::new(PumpState::default()));
    let pipe = |fd: OwnedFd| tokio::net::unix::pipe::Receiver::from_owned_fd(fd).map(Source::Pipe);
    let (out_src, err_src) = match r.output {
        Output::Pipes(o, e) => (pipe(o), Some(pipe(e))),
        Output::Pty(m) => (Ok(Source::Pty(m)), None),
    };
    let mut out = tokio::spawn(pump(out_src, FrameKind::Stdout, tx.clone(), out_state.clone()));
    let mut err = match err_src {
        Some(src) => tokio::spawn(pump(src, FrameKind::Stderr, tx.clone(), err_state.clone())),
        None => tokio::spawn(async {}),
    };

    let timeout = async {
        match timeout_ms {
            Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            None => std::future::pending().await,
        }
    };
    let mut exit_rx = r.exit;
    let mut timed_out = false;
    let exit = tokio::select! {
        e = &mut exit_rx => e.ok(),
        _ = timeout => {
            timed_out = true;
            kill_all();
            exit_rx.await.ok()
        }
        _ = tx.closed() => {
            // The host abandoned the exec: nobody can read its output any more.
            kill_all();
            stdin_task.abort();
            out.abort();
            err.abort();
            return;
        }
    };
    if timed_out {
        kill_all();
    }
    if tty {
        // The terminal hangs up with its session leader, as when a terminal window or an
        // SSH session closes: what is left of the session gets SIGHUP (nohup'd programs
        // stay), and the drain below ends within TTY_DRAIN_LIMIT whatever is left.
        signal_session(r.pid, Signal::SIGHUP);
    }
    stdin_task.abort();
    // Drain: wait for both pipes to close, but not for one that has been silent (while
    // waiting on the pipe, not on the host) for the grace period since the exit.
    let exited_at = now_ms();
    loop {
        if tty && now_ms().saturating_sub(exited_at) >= TTY_DRAIN_LIMIT.as_millis() as u64 {
            break;
        }
        use std::sync::atomic::Ordering::Relaxed;
        let silent = |h: &tokio::task::JoinHandle<()>, st: &PumpState| {
            let quiet_since = st.since_ms.load(Relaxed).max(exited_at);
            h.is_finished() || (st.reading.load(Relaxed) && now_ms().saturating_sub(quiet_since) >= OUTPUT_GRACE.as_millis() as u64)
        };
        if out.is_finished() && err.is_finished() {
            break;
        }
        if silent(&out, &out_state) && silent(&err, &err_state) {
            break;
        }
        tokio::select! {
            _ = &mut out, if !out.is_finished() => {}
            _ = &mut err, if !err.is_finished() => {}
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = tx.closed() => {
                // The host went away while output was still coming: end it all.
                kill_all();
                out.abort();
                err.abort();
                return;
            }
        }
    }
    out.abort();
    err.abort();
    let result = match exit {
        Some(Exit::Code(c)) => ExecExit { code: Some(c), signal: None, timed_out },
        Some(Exit::Signal(s)) => ExecExit { code: None, signal: Some(s), timed_out },
        None => ExecExit { code: None, signal: None, timed_out },
    };
    let _ = tx.send(Ok(Frame::json(FrameKind::Exit, &result).encode())).await;
}
