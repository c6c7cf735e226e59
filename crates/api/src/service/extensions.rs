//! Hearth's extensions on a microvm: exec and egress run on its VM through
//! [`Service::with_vm`] (which resumes and counts activity); usage reads the meter. Files
//! are `transfer.rs`'s.

use super::Service;
use crate::clock::now;
use crate::error::ApiError;
use crate::lifecycle::MicrovmState;
use crate::store::Usage;
use bytes::Bytes;
use hearth_proto::exec::{ExecExit, ExecRequest};
use hearth_vmm::agent::{ExecEvent, ExecOutput};
use hearth_vmm::net::{Egress, Rule};
use hearth_vmm::Vm;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

/// Most bytes of output an API exec returns per stream.
const MAX_EXEC_OUTPUT: usize = 8 << 20;

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
