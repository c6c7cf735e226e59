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

pub(super) async fn wait_ready(vm: &Vm, req: &BuildRequest, log: &mut (dyn FnMut(&str) + Send)) -> Result<(), BuildError> {
    let deadline = Instant::now() + req.ready_timeout;
    let mut last;
    loop {
        match vm.agent().hook(req.hooks_port, "/ready", Duration::from_secs(2)).await {
            Ok(r) if r.status == 200 => break,
            Ok(r) => last = format!("/ready answered {}", r.status),
            // The agent refusing the call itself will not change by waiting.
            Err(hearth_vmm::AgentError::Remote(b)) if b.code == hearth_proto::ErrorCode::InvalidInput => {
                return Err(BuildError::Vm(format!("the agent refused the hook call: {b}")));
            }
            Err(e) => last = e.to_string(),
        }
        if Instant::now() > deadline {
            return Err(BuildError::NotReady { reason: format!("{last}, after {:?}", req.ready_timeout), app_log: app_log(vm).await });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    log("the app is ready");
    if req.validate {
        match vm.agent().hook(req.hooks_port, "/validate", req.ready_timeout).await {
            Ok(r) if r.status == 200 => log("the app validated"),
            Ok(r) => return Err(BuildError::NotReady { reason: format!("/validate answered {}", r.status), app_log: app_log(vm).await }),
            Err(e) => return Err(BuildError::NotReady { reason: format!("/validate: {e}"), app_log: app_log(vm).await }),
        }
    }
    Ok(())
}
