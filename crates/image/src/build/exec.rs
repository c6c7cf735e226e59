//! Running commands in the builder: a step's exec streamed into the build log (its output
//! kept in memory only as a bounded tail), and the app's readiness check.

use super::limits::OutputTail;
use super::{tail, vm_err, BuildError, BuildRequest};
use hearth_proto::binpath::BinPath;
use hearth_proto::exec::ExecRequest;
use hearth_vmm::agent::ExecEvent;
use hearth_vmm::Vm;
use std::time::{Duration, Instant};

pub(super) async fn run(vm: &Vm, r: &ExecRequest, line: usize, log: &mut (dyn FnMut(&str) + Send)) -> Result<(), BuildError> {
    let mut s = vm.exec_stream(r).await.map_err(vm_err)?;
    s.close_stdin();
    let mut output = OutputTail::default();
    loop {
        match s.next_event().await.map_err(vm_err)? {
            Some(ExecEvent::Stdout(b)) | Some(ExecEvent::Stderr(b)) => {
                let text = String::from_utf8_lossy(&b);
                for l in text.lines() {
                    log(&format!("  | {l}"));
                }
                output.push(&b);
            }
            Some(ExecEvent::Exit(x)) if x.success() => return Ok(()),
            Some(ExecEvent::Exit(x)) => {
                let status = match (x.code, x.signal) {
                    (Some(c), _) => format!("exit code {c}"),
                    (None, Some(s)) => format!("signal {s}"),
                    _ => "unknown status".into(),
                };
                return Err(BuildError::RunFailed { line, status, tail: output.lines(20) });
            }
            None => return Err(BuildError::Vm("exec ended without a status".into())),
        }
    }
}

async fn app_log(vm: &Vm) -> String {
    vm.agent()
        .read_file_bytes(&BinPath::from("/tmp/hearth-app.log"), 1 << 20)
        .await
        .map(|b| tail(&String::from_utf8_lossy(&b), 30))
        .unwrap_or_default()
}

/// Waits until the app is ready: answering `/ready` with 200 when the image enables the
/// ready hook, else listening on its port (a TCP connection to it succeeds); then calls
/// `/validate` when the image enables that hook.
pub(super) async fn wait_ready(vm: &Vm, req: &BuildRequest, log: &mut (dyn FnMut(&str) + Send)) -> Result<(), BuildError> {
    let deadline = Instant::now() + req.ready_timeout;
    let port = req.hooks_port;
    let mut last;
    loop {
        let probe = if req.ready_hook {
            match vm.agent().hook(port, "/ready", Duration::from_secs(2)).await {
                Ok(r) if r.status == 200 => Ok(()),
                Ok(r) => Err(Ok(format!("/ready answered {}", r.status))),
                Err(e) => Err(Err(e)),
            }
        } else {
            // Connected and dropped at once: the app sees a connection close unused.
            vm.agent().connect_port(port).await.map(drop).map_err(Err)
        };
        match probe {
            Ok(()) => break,
            Err(Ok(seen)) => last = seen,
            // The agent refusing the call itself will not change by waiting.
            Err(Err(hearth_vmm::AgentError::Remote(b))) if b.code == hearth_proto::ErrorCode::InvalidInput => {
                return Err(BuildError::Vm(format!("the agent refused the readiness check: {b}")));
            }
            Err(Err(e)) if req.ready_hook => last = e.to_string(),
            Err(Err(e)) => last = format!("nothing listens on port {port} ({e})"),
        }
        if Instant::now() > deadline {
            return Err(BuildError::NotReady { reason: format!("{last}, after {:?}", req.ready_timeout), app_log: app_log(vm).await });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    log(if req.ready_hook { "the app is ready (/ready answered 200)" } else { "the app is ready (it listens on its port)" });
    if req.validate {
        match vm.agent().hook(port, "/validate", req.validate_timeout).await {
            Ok(r) if r.status == 200 => log("the app validated"),
            Ok(r) => return Err(BuildError::NotReady { reason: format!("/validate answered {}", r.status), app_log: app_log(vm).await }),
            Err(e) => return Err(BuildError::NotReady { reason: format!("/validate: {e}"), app_log: app_log(vm).await }),
        }
    }
    Ok(())
}
