//! Hearth's extensions on a microvm: exec, files and egress run on its VM through
//! [`Service::with_vm`] (which resumes and counts activity); usage reads the meter.

use super::Service;
use crate::clock::now;
use crate::error::ApiError;
use crate::lifecycle::MicrovmState;
use crate::store::Usage;
use bytes::Bytes;
use hearth_proto::binpath::BinPath;
use hearth_proto::exec::{ExecExit, ExecRequest};
use hearth_proto::files::{FileInfo, FileKind};
use hearth_vmm::agent::{AgentError, ExecEvent, ExecOutput};
use hearth_vmm::net::{Egress, Rule};
use hearth_vmm::Vm;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

/// Most bytes of output an API exec returns per stream.
const MAX_EXEC_OUTPUT: usize = 8 << 20;

/// Most bytes of a file read or written through the API.
pub const MAX_FILE_BYTES: u64 = 256 << 20;

/// Chunks of a file transfer queued between the agent and the client (each at most the
/// agent's frame, 1 MiB): with the agent's 4 MiB stream window, what one transfer holds
/// in the daemon, whatever the file's size.
pub const TRANSFER_CHUNKS: usize = 4;

/// How long a streamed exec waits for its client to take the next line: a client that
/// went away, or stopped reading, ends it (and lets go of the VM).
const STREAM_STALL: Duration = Duration::from_secs(60);

/// One item of a streamed exec, in order: output chunks, then one `Exit` or `Error`.
#[derive(Debug)]
pub enum ExecLine {
    /// A chunk of stdout.
    Stdout(Bytes),
    /// A chunk of stderr.
    Stderr(Bytes),
    /// How it ended (the last item).
    Exit(ExecExit),
    /// What went wrong once the stream had started (the last item, but for stdin's).
    Error(String),
}

impl Service {
    /// Applies the image's WORKDIR, ENV and USER to an exec where the caller left them out.
    pub async fn apply_image_config(&self, account: &str, ident: &str, req: &mut ExecRequest) {
        if let Some(c) = self.image_config(account, ident).await {
            req.cwd = req.cwd.take().or(Some(c.workdir));
            for (k, x) in c.env {
                req.env.entry(k).or_insert(x);
            }
            req.user = req.user.take().or(c.user);
        }
    }

    /// Records a microvm's egress policy (set through the extension) so resumes keep it.
    pub async fn record_egress(&self, account: &str, ident: &str, egress: Value) -> Result<(), ApiError> {
        let m = self.load(account, ident).await?;
        Ok(self.store.set_spec_field(&m.microvm_id, "hearthEgress", &egress).await?)
    }

    /// Runs `f` on microvm `ident`'s VM (the Hearth exec/file extensions): counts as
    /// activity, resumes a SUSPENDED microvm first when its idle policy allows.
    pub async fn with_vm<T>(
        &self,
        account: &str,
        ident: &str,
        f: impl for<'a> FnOnce(&'a Vm) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, ApiError>> + Send + 'a>>,
    ) -> Result<T, ApiError> {
        let vm = self.vm_handle(account, ident).await?;
        let r = f(&vm).await;
        drop(vm);
        let _ = self.store.touch(&Self::microvm_id(account, ident), now()).await;
        r
    }

    /// A handle on microvm `ident`'s VM for work that runs without its lock (execs,
    /// ingress connections): resumes a SUSPENDED microvm first when its idle policy
    /// allows, and counts as activity. While a handle lives, the VM counts as busy;
    /// Suspend waits for handles to go, Terminate ends them.
    pub async fn vm_handle(&self, account: &str, ident: &str) -> Result<Arc<Vm>, ApiError> {
        let (id, mut guard, mut m) = self.locked(account, ident).await?;
        if m.state == MicrovmState::Suspended {
            let auto = m.spec.pointer("/idlePolicy/autoResumeEnabled").and_then(Value::as_bool).unwrap_or(false);
            if !auto {
                return Err(ApiError::conflict(
                    "Microvm",
                    &id,
                    format!("microvm {id} is SUSPENDED and its idle policy does not resume it automatically; call ResumeMicrovm"),
                ));
            }
            m = self.resume_locked(&mut guard, m).await?;
        }
        if m.state != MicrovmState::Running {
            return Err(ApiError::conflict("Microvm", &id, format!("microvm {id} is {}", m.state)));
        }
        self.store.touch(&id, now()).await?;
        guard.vm.clone().ok_or_else(|| ApiError::internal("RUNNING without a VM"))
    }

    /// The runtime configuration of the image microvm `ident` runs.
    pub async fn image_config(&self, account: &str, ident: &str) -> Option<hearth_image::build::ImageConfig> {
        let m = self.load(account, ident).await.ok()?;
        self.store.versions(account, &m.image_name).await.ok()?.into_iter().find(|v| v.version == m.image_version)?.config
    }
}

impl Service {
    /// Runs `req` in microvm `ident` to completion (its output capped at 8 MiB a stream).
    ///
    /// # Errors
    ///
    /// As [`Service::with_vm`]; the agent's refusals ([`From<hearth_vmm::VmError>`]).
    pub async fn exec(&self, account: &str, ident: &str, req: ExecRequest, stdin: Option<Bytes>) -> Result<ExecOutput, ApiError> {
        self.with_vm(account, ident, move |vm| Box::pin(async move { Ok(vm.exec(&req, stdin, MAX_EXEC_OUTPUT).await?) })).await
    }

    /// Runs `req` in microvm `ident`, its output as it comes. `Ok` once the command has
    /// started; the receiver then yields its lines (a receiver dropped, or not read for a
    /// minute, ends the stream and lets go of the VM).
    ///
    /// # Errors
    ///
    /// As [`Service::exec`], for what fails before the command starts.
    pub async fn exec_stream(
        self: Arc<Self>,
        account: String,
        ident: String,
        req: ExecRequest,
        stdin: Option<Bytes>,
    ) -> Result<tokio::sync::mpsc::Receiver<ExecLine>, ApiError> {
        let (started_tx, started_rx) = tokio::sync::oneshot::channel::<Result<(), ApiError>>();
        let (tx, rx) = tokio::sync::mpsc::channel::<ExecLine>(32);
        // Taken by whichever side learns first whether the command started.
        let started = Arc::new(std::sync::Mutex::new(Some(started_tx)));
        let first = started.clone();
        tokio::spawn(async move {
            let r = self
                .with_vm(&account, &ident, move |vm| {
                    Box::pin(async move {
                        let mut s = vm.exec_stream(&req).await?;
                        // The stream has started: from here on, errors are lines of it.
                        if let Some(t) = first.lock().unwrap_or_else(|p| p.into_inner()).take() {
                            let _ = t.send(Ok(()));
                        }
                        if let Some(data) = stdin {
                            if let Err(e) = s.write_stdin(data).await {
                                let _ = tx.send(ExecLine::Error(format!("stdin: {e}"))).await;
                            }
                        }
                        s.close_stdin();
                        loop {
                            let line = match s.next_event().await {
                                Ok(Some(ExecEvent::Stdout(b))) => ExecLine::Stdout(b),
                                Ok(Some(ExecEvent::Stderr(b))) => ExecLine::Stderr(b),
                                Ok(Some(ExecEvent::Exit(x))) => ExecLine::Exit(x),
                                Ok(None) => ExecLine::Error("the exec ended without a status".into()),
                                Err(e) => ExecLine::Error(e.to_string()),
                            };
                            let last = matches!(line, ExecLine::Exit(_) | ExecLine::Error(_));
                            match tokio::time::timeout(STREAM_STALL, tx.send(line)).await {
                                Ok(Ok(())) if !last => {}
                                _ => return Ok(()),
                            }
                        }
                    })
                })
                .await;
            if let Err(e) = r {
                if let Some(t) = started.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    let _ = t.send(Err(e));
                }
            }
        });
        match started_rx.await {
            Ok(Ok(())) => Ok(rx),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ApiError::internal("the exec stream ended before it started")),
        }
    }

    /// Streams file `path` of microvm `ident` (at most [`MAX_FILE_BYTES`]): `Ok` once
    /// the agent has opened it, then its chunks as they come. The daemon holds at most the
    /// agent's stream window and [`TRANSFER_CHUNKS`] chunks of it at a time, whatever the
    /// file's size. The VM counts as busy until the stream ends; a client that stops
    /// reading for [`STREAM_STALL`] ends it.
    ///
    /// # Errors
    ///
    /// As [`Service::with_vm`]; a missing file is a ResourceNotFoundException, one over the
    /// limit or not a regular file a ValidationException.
    pub async fn read_file(
        self: &Arc<Self>,
        account: &str,
        ident: &str,
        path: String,
    ) -> Result<tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>, ApiError> {
        let vm = self.vm_handle(account, ident).await?;
        let path = BinPath::from(path.as_str());
        let info = vm.agent().stat(&path).await?;
        if info.kind != FileKind::File {
            return Err(ApiError::validation(format!("{} is not a regular file", path.display())));
        }
        if info.size > MAX_FILE_BYTES {
            return Err(ApiError::validation(format!(
                "{} is {} bytes, over the {MAX_FILE_BYTES}-byte limit on file transfers: split it in the microvm (exec split) and copy the parts",
                path.display(),
                info.size
            )));
        }
        // A file that grew since the stat is cut at the limit.
        let mut chunks = vm.agent().read_file(&path, 0, Some(MAX_FILE_BYTES)).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(TRANSFER_CHUNKS);
        let (svc, id) = (self.clone(), Self::microvm_id(account, ident));
        tokio::spawn(async move {
            use futures_util::StreamExt;
            while let Some(chunk) = chunks.next().await {
                let item = chunk.map_err(std::io::Error::other);
                let last = item.is_err();
                match tokio::time::timeout(STREAM_STALL, tx.send(item)).await {
                    Ok(Ok(())) if !last => {}
                    _ => break,
                }
            }
            // The handle goes with the stream: the VM is idle again.
            drop(vm);
            let _ = svc.store.touch(&id, now()).await;
        });
        Ok(rx)
    }

    /// Writes file `path` in microvm `ident` from `data`, atomically: the agent renames
    /// the file into place only when `data` ends cleanly, so a stream that ends in an
    /// error (the caller's refusal: too large, a bad hash) leaves nothing behind. `data`
    /// is pulled as the agent takes it: the daemon holds a bounded part of it at a time.
    /// The agent's answer comes back as it is: a caller that ended `data` in an error
    /// knows why the agent failed, and one that did not converts it (`ApiError::from`).
    ///
    /// # Errors
    ///
    /// As [`Service::with_vm`].
    pub async fn write_file<S>(&self, account: &str, ident: &str, path: String, data: S) -> Result<Result<FileInfo, AgentError>, ApiError>
    where
        S: futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + Sync + 'static,
    {
        self.with_vm(account, ident, move |vm| {
            Box::pin(async move { Ok(vm.agent().write_file(&BinPath::from(path.as_str()), None, data).await) })
        })
        .await
    }

    /// The entries of directory `path` in microvm `ident`.
    ///
    /// # Errors
    ///
    /// As [`Service::read_file`].
    pub async fn list_dir(&self, account: &str, ident: &str, path: String) -> Result<Vec<FileInfo>, ApiError> {
        self.with_vm(account, ident, move |vm| Box::pin(async move { Ok(vm.agent().list(&BinPath::from(path.as_str())).await?) })).await
    }

    /// Replaces microvm `ident`'s egress policy while it runs, and records it so resumes
    /// keep it.
    ///
    /// # Errors
    ///
    /// As [`Service::with_vm`]; a microvm without a network is a ValidationException.
    pub async fn set_egress(&self, account: &str, ident: &str, egress: Egress) -> Result<Egress, ApiError> {
        let e2 = egress.clone();
        self.with_vm(account, ident, move |vm| Box::pin(async move { Ok(vm.set_egress(&e2)?) })).await?;
        let recorded = serde_json::to_value(&egress).map_err(ApiError::internal)?;
        self.record_egress(account, ident, recorded).await?;
        Ok(egress)
    }

    /// Microvm `ident`'s egress policy (none without a network).
    ///
    /// # Errors
    ///
    /// As [`Service::with_vm`].
    pub async fn egress(&self, account: &str, ident: &str) -> Result<Option<Egress>, ApiError> {
        self.with_vm(account, ident, |vm| Box::pin(async move { Ok(vm.egress()) })).await
    }

    /// Metered usage of `account` between `from` and `to` (seconds since the epoch; `to`
    /// defaults to now).
    ///
    /// # Errors
    ///
    /// The store's.
    pub async fn usage(&self, account: &str, from: f64, to: Option<f64>) -> Result<(f64, f64, Usage), ApiError> {
        let now = now();
        let to = to.unwrap_or(now);
        Ok((from, to, self.store.usage(account, from, to, now).await?))
    }
}

/// `{"internet": bool, "allow": [RULE…], "deny": [RULE…], "domains": [NAME…]}` with `CIDR[:PORT[-PORT]][/tcp|/udp]` rules,
/// refused when an allow rule reaches further than the host's ceiling (the operator's
/// `--egress-allow-private`; nothing before `serve` sets it).
///
/// # Errors
///
/// A ValidationException naming the field or rule.
pub fn egress_from(v: &Value) -> Result<Egress, ApiError> {
    let rules = |k: &str| -> Result<Vec<Rule>, ApiError> {
        v.get(k)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|r| {
                let s = r.as_str().ok_or_else(|| ApiError::validation(format!("{k} rules must be strings")))?;
                Rule::parse(s).map_err(|e| ApiError::validation(e.to_string()))
            })
            .collect()
    };
    if let Some(k) = v.as_object().and_then(|o| o.keys().find(|k| !["internet", "allow", "deny", "domains"].contains(&k.as_str()))) {
        return Err(ApiError::validation(format!("unknown egress field {k:?} (internet, allow, deny, domains)")));
    }
    let domains = v
        .get("domains")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|d| {
            let s = d.as_str().ok_or_else(|| ApiError::validation("domains must be strings"))?;
            hearth_vmm::net::normalize_domain(s).map_err(|e| ApiError::validation(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let egress = Egress {
        internet: v.get("internet").and_then(Value::as_bool).unwrap_or(false),
        allow: rules("allow")?,
        deny: rules("deny")?,
        domains,
    };
    egress.within(&hearth_vmm::net::host_ceiling().unwrap_or_default()).map_err(|e| ApiError::validation(e.to_string()))?;
    Ok(egress)
}

/// Sets the host's egress ceiling: the destinations in closed ranges the operator opens to
/// every microvm (`--egress-allow-private`). Before any VM is restored or started.
pub fn set_egress_ceiling(allow: Vec<Rule>) {
    hearth_vmm::net::set_host_ceiling(Some(hearth_vmm::net::Ceiling { allow }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_vmm::net::{set_host_ceiling, Ceiling};
    use serde_json::json;

    /// One test, since the host ceiling is process-wide.
    #[test]
    fn tenant_egress_rules_only_narrow_the_host_ceiling() {
        set_host_ceiling(Some(Ceiling::default()));
        let e = egress_from(&json!({ "internet": true, "allow": ["10.0.0.0/8:5432/tcp"] })).unwrap_err();
        assert_eq!((e.kind.name(), e.kind.status()), ("ValidationException", 400));
        assert!(e.message.contains("10.0.0.0/8:5432/tcp") && e.message.contains("--egress-allow-private"), "{}", e.message);
        for wide in ["0.0.0.0/0", "169.254.169.254", "100.64.0.0/10:80", "127.0.0.1:22/tcp"] {
            assert!(egress_from(&json!({ "allow": [wide] })).is_err(), "{wide}");
        }
        // Public destinations, deny rules and internet egress are the tenant's to set.
        egress_from(&json!({ "internet": true, "allow": ["93.184.0.0/16:53/udp"], "deny": ["10.0.0.0/8", "0.0.0.0/0"] })).unwrap();
        set_host_ceiling(Some(Ceiling { allow: vec![Rule::parse("10.1.0.0/16").unwrap()] }));
        egress_from(&json!({ "allow": ["10.1.2.0/24:5432/tcp"] })).unwrap();
        assert!(egress_from(&json!({ "allow": ["10.2.0.0/16"] })).is_err());
        set_host_ceiling(None);
    }
}
