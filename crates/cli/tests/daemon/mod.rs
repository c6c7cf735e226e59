//! A `hearth serve` daemon for the API test files: started on a loopback port with its
//! own state directory, killed when dropped, its detached microvms killed after.

#![allow(dead_code)]

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub fn hearth() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hearth"))
}

/// A running daemon, stopped (SIGKILL) when dropped.
pub struct Daemon(pub Child, pub String);

/// Kills whatever microvm QEMU of this test is left (they outlive the daemon by design)
/// and their network namespaces.
pub struct Microvms(pub PathBuf);

impl Drop for Microvms {
    fn drop(&mut self) {
        let run = self.0.join("run");
        let _ = Command::new("pkill").arg("-9").arg("-f").arg(format!("{}/", run.display())).status();
        for e in std::fs::read_dir(&run).into_iter().flatten().flatten() {
            let _ = Command::new("ip")
                .args(["netns", "del"])
                .arg(format!("hearth-{}", e.file_name().to_string_lossy()))
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Daemon {
    pub fn start(state: &Path) -> Daemon {
        Self::spawn(hearth().args(["serve", "--listen", "127.0.0.1:0", "--policy-interval", "0.5", "--state-dir"]).arg(state))
    }

    /// Like [`Daemon::start`], with `args` added to `hearth serve`'s.
    pub fn start_args(state: &Path, args: &[&str]) -> Daemon {
        Self::spawn(hearth().args(["serve", "--listen", "127.0.0.1:0", "--policy-interval", "0.5", "--state-dir"]).arg(state).args(args))
    }

    /// Like [`Daemon::start`], with `env` added and its log (stderr) written to `log`.
    pub fn start_with(state: &Path, env: &[(&str, &str)], log: &Path) -> Daemon {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("daemon log");
        Self::spawn(
            hearth()
                .args(["serve", "--listen", "127.0.0.1:0", "--policy-interval", "0.5", "--state-dir"])
                .arg(state)
                .envs(env.iter().copied())
                .stderr(log),
        )
    }

    /// Starts `cmd` and waits for the line that names its address.
    fn spawn(cmd: &mut Command) -> Daemon {
        // Endpoints over TLS on a port of their own (a flag given by the test wins).
        cmd.env("HEARTH_ENDPOINT_LISTEN", "127.0.0.1:0");
        // A test host shares its disk with the build: the default reserve (2% of the disk,
        // up to 4 GiB) would refuse builds on a CI machine with a few GiB free, so test
        // daemons keep 1 GiB (one given by the test wins).
        if !cmd.get_envs().any(|(k, _)| k == "HEARTH_RESERVE_DISK_MIB") {
            cmd.env("HEARTH_RESERVE_DISK_MIB", "1024");
        }
        let mut child = cmd.stdout(Stdio::piped()).spawn().expect("start hearth serve");
        let mut line = String::new();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        out.read_line(&mut line).unwrap();
        let url = line.trim().strip_prefix("listening ").unwrap_or_else(|| panic!("unexpected first line {line:?}")).to_owned();
        // The rest is read and dropped, so the daemon's later lines never meet a closed pipe.
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        Daemon(child, url)
    }

    pub fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `hearth` as a client of `daemon`, signing with `key` (the JSON of `hearth keys create`).
pub fn client(daemon: &Daemon, key: &str) -> Command {
    let key: serde_json::Value = serde_json::from_str(key).unwrap();
    let mut c = hearth();
    c.env("HEARTH_ENDPOINT", &daemon.1)
        .env("AWS_ACCESS_KEY_ID", key["accessKeyId"].as_str().unwrap())
        .env("AWS_SECRET_ACCESS_KEY", key["secretAccessKey"].as_str().unwrap());
    c
}

pub fn key(state: &Path) -> String {
    let out = hearth().args(["keys", "create", "--json", "--state-dir"]).arg(state).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Lets the account of `key` name `file://` code artifacts beneath `root` (as an
/// operator does with `hearth accounts set`).
pub fn allow_artifacts(state: &Path, key: &str, root: &Path) {
    let key: serde_json::Value = serde_json::from_str(key).unwrap();
    let out = hearth()
        .args(["accounts", "set", key["account"].as_str().unwrap(), "--artifact-root"])
        .arg(root)
        .arg("--state-dir")
        .arg(state)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

pub fn python() -> PathBuf {
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/pyenv/bin/python");
    assert!(py.is_file(), "{} missing: scripts/test.sh installs boto3 and the AWS CLI there", py.display());
    py
}

pub fn run_py(url: &str, keys: (&str, &str), ctx: &Path, state: &Path, args: &[&str]) -> String {
    run_script("test_api.py", url, keys, ctx, state, args, &[])
}

pub fn run_script(name: &str, url: &str, keys: (&str, &str), ctx: &Path, state: &Path, args: &[&str], env: &[(&str, String)]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/api").join(name);
    let out = Command::new(python())
        .arg(script)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("HEARTH_URL", url)
        .env("HEARTH_KEY_A", keys.0)
        .env("HEARTH_KEY_B", keys.1)
        .env("HEARTH_CTX", ctx.join("web"))
        .env("HEARTH_CTX_HOOKS", ctx.join("hooked"))
        .env("HEARTH_STATE", state)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{name} {args:?} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// An app that records its lifecycle hook calls (and refuses a /run whose payload says so).
pub const HOOKED_APP: &str = r#"
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def do_POST(self):
        data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with open("/tmp/hooks.log", "a") as f:
            f.write("%s %s\n" % (self.path, data.decode()))
        self.send_response(500 if data == b"refuse" else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", 8080), H).serve_forever()
"#;
