//! End-to-end tests of the engine against real QEMU VMs (TCG on hosts without usable KVM).
//!
//! They need the set-up done by `scripts/setup.sh --debian` (kernel, agent, initramfs,
//! base images in $HEARTH_HOME); `scripts/test.sh` does it. Each test boots its own VMs and
//! every VM is dropped (killing QEMU) on every path, panics included.

mod common;

use bytes::Bytes;
use common::config;
use hearth_image::base::Base;
use hearth_proto::binpath::BinPath;
use hearth_proto::exec::ExecRequest;
use hearth_proto::files::{FileKind, FsRequest};
use hearth_proto::ErrorCode;
use hearth_vmm::agent::{AgentError, ExecEvent};
use hearth_vmm::{BootError, Vm, VmError};
use std::time::Duration;

async fn boot(base: Base) -> Vm {
    Vm::boot(config(base)).await.unwrap_or_else(|e| panic!("boot failed: {e}"))
}

async fn sh(vm: &Vm, script: &str) -> hearth_vmm::agent::ExecOutput {
    vm.exec(&ExecRequest::shell(script), None, 64 << 20).await.unwrap_or_else(|e| panic!("{script}: {e}"))
}

fn remote_code(e: &VmError) -> Option<ErrorCode> {
    match e {
        VmError::Agent(AgentError::Remote(b)) => Some(b.code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_output_codes_streams_env_cwd_user() {
    let vm = boot(Base::Busybox).await;

    let out = vm.exec(&ExecRequest::argv(["echo", "hello", "world"]), None, 1 << 20).await.unwrap();
    assert_eq!(out.stdout, b"hello world\n");
    assert!(out.stderr.is_empty());
    assert_eq!(out.exit.code, Some(0));

    let out = sh(&vm, "echo out; echo err >&2; exit 42").await;
    assert_eq!((out.stdout_str().as_str(), out.stderr_str().as_str(), out.exit.code), ("out\n", "err\n", Some(42)));

    let out = sh(&vm, "kill -TERM $$").await;
    assert_eq!((out.exit.code, out.exit.signal), (None, Some(15)));

    // stdin, binary-safe
    let input = Bytes::from_static(b"abc\0\xff\xfe\n");
    let out = vm.exec(&ExecRequest::argv(["cat"]), Some(input.clone()), 1 << 20).await.unwrap();
    assert_eq!(out.stdout, input);

    // env and cwd
    let mut req = ExecRequest::shell("echo \"$FOO|$(pwd)|$HOME\"");
    req.env.insert("FOO".into(), "bar baz".into());
    let out = vm.exec(&req, None, 1 << 20).await.unwrap();
    assert_eq!(out.stdout_str(), "bar baz|/workspace|/root\n");
    req.cwd = Some("/tmp".into());
    assert_eq!(vm.exec(&req, None, 1 << 20).await.unwrap().stdout_str(), "bar baz|/tmp|/root\n");
    req.cwd = Some("/does/not/exist".into());
    let e = vm.exec(&req, None, 1 << 20).await.unwrap_err();
    assert_eq!(remote_code(&e), Some(ErrorCode::NotFound), "{e}");

    // user
    let mut req = ExecRequest::shell("id -u; id -g");
    req.user = Some("nobody".into());
    assert_eq!(vm.exec(&req, None, 1 << 20).await.unwrap().stdout_str(), "65534\n65534\n");
    req.user = Some("1234:567".into());
    assert_eq!(vm.exec(&req, None, 1 << 20).await.unwrap().stdout_str(), "1234\n567\n");
    req.user = Some("no-such-user".into());
    let e = vm.exec(&req, None, 1 << 20).await.unwrap_err();
    assert_eq!(remote_code(&e), Some(ErrorCode::InvalidInput), "{e}");

    // a command that does not exist
    let e = vm.exec(&ExecRequest::argv(["/no/such/binary"]), None, 1 << 20).await.unwrap_err();
    assert_eq!(remote_code(&e), Some(ErrorCode::NotFound), "{e}");

    // streaming: stdin goes in and stdout comes out while the process runs
    let mut s = vm.exec_stream(&ExecRequest::argv(["cat"])).await.unwrap();
    for word in ["ping\n", "pong\n"] {
        s.write_stdin(Bytes::from(word)).await.unwrap();
        match s.next_event().await.unwrap() {
            Some(ExecEvent::Stdout(b)) => assert_eq!(b, word.as_bytes()),
            other => panic!("expected echoed stdout, got {other:?}"),
        }
    }
    s.close_stdin();
    assert!(matches!(s.next_event().await.unwrap(), Some(ExecEvent::Exit(x)) if x.success()));

    // stdout and stderr arrive separately, in order, before the exit
    let mut s = vm.exec_stream(&ExecRequest::shell("echo a; sleep 0.3; echo b >&2; sleep 0.3; echo c")).await.unwrap();
    s.close_stdin();
    let mut events = Vec::new();
    while let Some(e) = s.next_event().await.unwrap() {
        events.push(e);
    }
    assert_eq!(
        events,
        vec![
            ExecEvent::Stdout(Bytes::from("a\n")),
            ExecEvent::Stderr(Bytes::from("b\n")),
            ExecEvent::Stdout(Bytes::from("c\n")),
            ExecEvent::Exit(hearth_proto::exec::ExecExit { code: Some(0), signal: None, timed_out: false }),
        ]
    );

    // A slow reader loses nothing: the process exits long before the host has read its
    // output, which waits in the pipe and the HTTP/2 window, not cut by the exit grace.
    let mut s = vm.exec_stream(&ExecRequest::shell("head -c 12000000 /dev/zero | tr '\\0' x")).await.unwrap();
    s.close_stdin();
    let mut total = 0usize;
    let exit = loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        match s.next_event().await.unwrap() {
            Some(ExecEvent::Stdout(b)) => {
                assert!(b.iter().all(|&c| c == b'x'));
                total += b.len();
            }
            Some(ExecEvent::Exit(x)) => break x,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(exit.success());
    assert_eq!(total, 12_000_000, "output was cut");
    vm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_timeout_kills_the_process_tree_and_execs_run_concurrently() {
    let vm = boot(Base::Busybox).await;

    let mut req = ExecRequest::shell("sleep 300 & sleep 301; echo never");
    req.timeout_ms = Some(500);
    let out = vm.exec(&req, None, 1 << 20).await.unwrap();
    assert!(out.exit.timed_out);
    assert_eq!(out.exit.signal, Some(9));
    assert!(out.stdout.is_empty());
    // Neither sleep survives: the whole process group was killed.
    let ps = sh(&vm, "ps -o args | grep -c '^sleep 30[01]' || true").await;
    assert_eq!(ps.stdout_str().trim(), "0", "leftover sleeps");

    // 8 at once, each a second long: they overlap instead of queueing.
    let started = std::time::Instant::now();
    let runs = (0..8).map(|i| {
        let vm = &vm;
        async move { vm.exec(&ExecRequest::shell(format!("sleep 1; echo {i}")), None, 1 << 20).await }
    });
    let results = futures_util::future::join_all(runs).await;
    for (i, r) in results.into_iter().enumerate() {
        let out = r.unwrap();
        assert_eq!(out.stdout_str(), format!("{i}\n"));
        assert!(out.exit.success());
    }
    // Sequential would be >= 8 s; generous bound because TCG on a loaded host is slow.
    assert!(started.elapsed() < Duration::from_secs(8), "execs did not overlap: {:?}", started.elapsed());
    vm.shutdown().await;
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_round_trip_and_operations() {
    let vm = boot(Base::Busybox).await;
    let agent = vm.agent();
    let p = |s: &str| BinPath::from(s);

    // 0 bytes, 1 byte, 10 MiB of binary
    for (name, data) in
        [("/workspace/empty", Vec::new()), ("/workspace/one", vec![0xffu8]), ("/workspace/deep/er/big.bin", pseudo_random(10 << 20, 7))]
    {
        let info = agent.write_file_bytes(&p(name), None, Bytes::from(data.clone())).await.unwrap();
        assert_eq!(info.size, data.len() as u64, "{name}");
        let back = agent.read_file_bytes(&p(name), 64 << 20).await.unwrap();
        assert!(back == data, "{name}: {} bytes back, {} sent", back.len(), data.len());
    }
    // The guest sees the same bytes.
    let sum = sh(&vm, "md5sum /workspace/deep/er/big.bin | cut -d' ' -f1").await.stdout_str();
    let local = {
        let data = pseudo_random(10 << 20, 7);
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), &data).unwrap();
        let o = std::process::Command::new("md5sum").arg(tmp.path()).output().unwrap();
        String::from_utf8_lossy(&o.stdout).split_whitespace().next().unwrap().to_owned()
    };
    assert_eq!(sum.trim(), local);

    // ranges
    let data = pseudo_random(10 << 20, 7);
    use futures_util::StreamExt;
    let stream = agent.read_file(&p("/workspace/deep/er/big.bin"), 1_000_000, Some(12345)).await.unwrap();
    let chunks: Vec<Bytes> = stream.map(|c| c.unwrap()).collect().await;
    assert_eq!(chunks.concat(), &data[1_000_000..1_012_345]);

    // modes, atomic replace, no temporary files left behind
    agent.write_file_bytes(&p("/workspace/m"), Some(0o600), Bytes::from("one")).await.unwrap();
    let info = agent.write_file_bytes(&p("/workspace/m"), Some(0o640), Bytes::from("two!")).await.unwrap();
    assert_eq!((info.mode, info.size), (0o640, 4));
    assert_eq!(agent.read_file_bytes(&p("/workspace/m"), 100).await.unwrap(), b"two!");

    // non-UTF-8 names
    let weird = BinPath(b"/workspace/caf\xe9-\xff.bin".to_vec());
    agent.write_file_bytes(&weird, None, Bytes::from("latin-1")).await.unwrap();
    let names: Vec<Vec<u8>> = agent.list(&p("/workspace")).await.unwrap().into_iter().map(|e| e.path.0).collect();
    assert!(names.contains(&b"caf\xe9-\xff.bin".to_vec()), "{names:?}");
    assert!(names.iter().all(|n| !n.starts_with(b".")), "temporary files left: {names:?}");
    assert_eq!(agent.read_file_bytes(&weird, 100).await.unwrap(), b"latin-1");

    // stat, mkdir, rename, remove
    let st = agent.stat(&p("/workspace/deep")).await.unwrap();
    assert_eq!(st.kind, FileKind::Dir);
    agent.fs(&FsRequest::Mkdir { path: p("/workspace/a/b/c"), parents: true, mode: Some(0o700) }).await.unwrap();
    let e = agent.fs(&FsRequest::Mkdir { path: p("/workspace/a"), parents: false, mode: None }).await.unwrap_err();
    assert!(matches!(&e, AgentError::Remote(b) if b.code == ErrorCode::AlreadyExists), "{e}");
    agent.fs(&FsRequest::Rename { from: p("/workspace/one"), to: p("/workspace/a/one") }).await.unwrap();
    assert_eq!(agent.read_file_bytes(&p("/workspace/a/one"), 10).await.unwrap(), vec![0xff]);
    let e = agent.fs(&FsRequest::Remove { path: p("/workspace/a"), recursive: false }).await.unwrap_err();
    assert!(matches!(&e, AgentError::Remote(b) if b.code == ErrorCode::WrongKind), "{e}");
    agent.fs(&FsRequest::Remove { path: p("/workspace/a"), recursive: true }).await.unwrap();

    // missing paths
    for e in [
        agent.read_file_bytes(&p("/workspace/a/one"), 10).await.unwrap_err(),
        agent.stat(&p("/nonexistent")).await.unwrap_err(),
        agent.list(&p("/nonexistent")).await.unwrap_err(),
        agent.fs(&FsRequest::Remove { path: p("/nonexistent"), recursive: true }).await.unwrap_err(),
    ] {
        assert!(matches!(&e, AgentError::Remote(b) if b.code == ErrorCode::NotFound), "{e}");
    }
    // relative paths are refused
    let e = agent.stat(&p("relative")).await.unwrap_err();
    assert!(matches!(&e, AgentError::Remote(b) if b.code == ErrorCode::InvalidInput), "{e}");
    vm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_accepts_fresh_connections() {
    let mut vm = boot(Base::Busybox).await;
    sh(&vm, "echo 1 > /workspace/state").await;
    for i in 0..3 {
        vm.reconnect(Duration::from_secs(30)).await.unwrap();
        let out = vm.exec(&ExecRequest::shell("cat /workspace/state"), None, 1 << 20).await;
        let out = out.unwrap_or_else(|e| panic!("after reconnect {i}: {e}\nconsole:\n{}", vm.console_tail(20)));
        assert_eq!(out.stdout_str(), "1\n");
    }
    // An abrupt close, without the detach handshake, is recovered from too.
    vm.agent().close();
    vm.reconnect(Duration::from_secs(30)).await.unwrap();
    assert_eq!(sh(&vm, "echo ok").await.stdout_str(), "ok\n");
    vm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_rootfs_boots_and_runs_python() {
    let vm = boot(Base::DebianBookworm).await;
    let out = vm.exec(&ExecRequest::argv(["python3", "-c", "import sys; print(6*7, sys.version_info[0])"]), None, 1 << 20).await.unwrap();
    assert_eq!(out.stdout_str(), "42 3\n", "stderr: {}", out.stderr_str());
    let os = sh(&vm, ". /etc/os-release; echo $VERSION_CODENAME").await;
    assert_eq!(os.stdout_str(), "bookworm\n");
    vm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_kernel_panic_is_reported() {
    let vm = boot(Base::Busybox).await;
    let e = vm.exec(&ExecRequest::shell("echo c > /proc/sysrq-trigger"), None, 1 << 20).await.unwrap_err();
    match e {
        VmError::GuestPanicked { console } => assert!(console.contains("Kernel panic"), "{console}"),
        other => panic!("expected a guest panic, got {other}"),
    }
    assert!(!vm.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_timeout_reports_console_and_leaves_nothing() {
    let run_root = tempfile::tempdir().unwrap();
    let mut cfg = config(Base::Busybox);
    cfg.run_root = run_root.path().to_path_buf();
    cfg.boot_timeout = Duration::from_millis(300);
    let err = Vm::boot(cfg).await.err().expect("a 300 ms boot cannot succeed under TCG");
    assert!(matches!(err, BootError::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("did not become ready"), "{err}");
    // The run directory (sockets, console, overlay) is gone with the QEMU process.
    let left: Vec<_> = std::fs::read_dir(run_root.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[tokio::test]
async fn invalid_configurations_fail_before_anything_starts() {
    let run_root = tempfile::tempdir().unwrap();
    let mut cfg = config(Base::Busybox);
    cfg.run_root = run_root.path().to_path_buf();
    for (mem, vcpus) in [(16, 1), (1 << 30, 1), (512, 0), (512, 1000)] {
        let mut c = cfg.clone();
        c.memory_mib = mem;
        c.vcpus = vcpus;
        let e = Vm::boot(c).await.err().expect("invalid size accepted");
        assert!(matches!(e, BootError::Config(_)), "{e}");
    }
    let mut c = cfg.clone();
    c.kernel = "/nonexistent/vmlinuz".into();
    let e = Vm::boot(c).await.err().expect("missing kernel accepted");
    assert!(e.to_string().contains("setup"), "error should name the set-up command: {e}");
    let mut c = cfg.clone();
    c.qemu_binary = "/nonexistent/qemu-system-x86_64".into();
    let e = Vm::boot(c).await.err().expect("missing QEMU accepted");
    assert!(e.to_string().contains("setup"), "{e}");
    assert_eq!(std::fs::read_dir(run_root.path()).unwrap().count(), 0);
}

/// Reads a tty exec's output until `needle` appears (within 60 s); returns all of it.
async fn read_until(s: &mut hearth_vmm::agent::ExecStream, seen: &mut Vec<u8>, needle: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let text = String::from_utf8_lossy(seen).into_owned();
        if let Some(at) = text.find(needle) {
            // What precedes the needle is whole UTF-8, so text and bytes agree up to it.
            seen.drain(..at + needle.len());
            return text[..at + needle.len()].to_owned();
        }
        match tokio::time::timeout_at(deadline, s.next_event()).await {
            Ok(Ok(Some(ExecEvent::Stdout(b)))) => seen.extend_from_slice(&b),
            other => panic!("waiting for {needle:?} after {text:?}: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tty_exec_is_a_terminal_that_resizes_and_takes_signals() {
    let vm = boot(Base::DebianBookworm).await;
    // A one-shot command sees a terminal of the requested size as its controlling tty,
    // with stdout and stderr both on it.
    let mut r = ExecRequest::shell("tty; stty size; [ -t 0 ] && [ -t 1 ] && echo interactive; echo to-stderr >&2; [ \"$(cut -d' ' -f6 /proc/$$/stat)\" -eq $$ ] && echo leader");
    r.tty = Some(hearth_proto::exec::TtySize { rows: 33, cols: 101 });
    let out = vm.exec(&r, None, 1 << 20).await.unwrap();
    let text = out.stdout_str();
    assert!(out.exit.success(), "{out:?}");
    assert!(text.starts_with("/dev/pts/"), "{text:?}");
    for want in ["33 101\r\n", "interactive\r\n", "to-stderr\r\n", "leader\r\n"] {
        assert!(text.contains(want), "{want:?} missing from {text:?}");
    }
    assert!(out.stderr.is_empty());

    // An interactive bash: resize, a signal to the foreground job, ^C, UTF-8, exit code.
    let mut r = ExecRequest::argv(["bash", "--norc", "-i"]);
    r.env.insert("PS1".into(), "$ ".into());
    r.tty = Some(hearth_proto::exec::TtySize { rows: 24, cols: 80 });
    let mut s = vm.exec_stream(&r).await.unwrap();
    let mut seen = Vec::new();
    s.write_stdin(Bytes::from("stty size; echo a$((1+1))\n")).await.unwrap();
    assert!(read_until(&mut s, &mut seen, "a2\r\n").await.contains("24 80\r\n"));
    s.resize(50, 132).await.unwrap();
    s.write_stdin(Bytes::from("stty size; echo b$((1+2))\n")).await.unwrap();
    assert!(read_until(&mut s, &mut seen, "b3\r\n").await.contains("50 132\r\n"));
    // A signal goes to the foreground job, not to the shell.
    s.write_stdin(Bytes::from("sleep 1000; echo never$((0))\n")).await.unwrap();
    read_until(&mut s, &mut seen, "sleep 1000; echo never$((0))\r\n").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.signal(libc::SIGINT).await.unwrap();
    s.write_stdin(Bytes::from("echo c$((1+3))\n")).await.unwrap();
    let after = read_until(&mut s, &mut seen, "c4\r\n").await;
    assert!(!after.contains("never0"), "{after:?}");
    // ^C typed on the terminal does the same through the line discipline.
    s.write_stdin(Bytes::from("sleep 1000\n")).await.unwrap();
    read_until(&mut s, &mut seen, "sleep 1000\r\n").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.write_stdin(Bytes::from_static(b"\x03")).await.unwrap();
    s.write_stdin(Bytes::from("echo d$((1+4))\n")).await.unwrap();
    read_until(&mut s, &mut seen, "d5\r\n").await;
    s.write_stdin(Bytes::from("echo 'h\u{e9}llo \u{2713}' | wc -m\n")).await.unwrap();
    assert!(read_until(&mut s, &mut seen, "8\r\n").await.contains("h\u{e9}llo \u{2713}"));
    // A background job still writing when the shell exits does not hold the exec open:
    // the terminal hangs up (SIGHUP to what is left of the session) and the exit comes.
    s.write_stdin(Bytes::from("(exec -a hearthloop bash -c 'while :; do echo x; sleep 0.1; done') &\n")).await.unwrap();
    read_until(&mut s, &mut seen, "x\r\n").await;
    s.write_stdin(Bytes::from("exit 7\n")).await.unwrap();
    let exit = loop {
        match s.next_event().await.unwrap() {
            Some(ExecEvent::Exit(x)) => break x,
            Some(_) => {}
            None => panic!("no exit"),
        }
    };
    assert_eq!(exit.code, Some(7));
    let left = sh(&vm, "sleep 0.5; grep -l 'hearth[l]oop' /proc/[0-9]*/cmdline 2>/dev/null || true").await.stdout_str();
    assert!(left.is_empty(), "the background job outlived its terminal: {left}");

    // Without a terminal a signal goes to the exec's process group; resizing is refused
    // on the host before it is sent.
    let mut s = vm.exec_stream(&ExecRequest::argv(["sleep", "1000"])).await.unwrap();
    assert!(s.resize(0, 10).await.is_err());
    // Stdin the process never reads does not hold the signal up.
    s.write_stdin(Bytes::from(vec![b'x'; 512 << 10])).await.unwrap();
    s.signal(libc::SIGTERM).await.unwrap();
    match s.next_event().await.unwrap() {
        Some(ExecEvent::Exit(x)) => assert_eq!(x.signal, Some(libc::SIGTERM)),
        other => panic!("{other:?}"),
    }
    vm.shutdown().await;
}
