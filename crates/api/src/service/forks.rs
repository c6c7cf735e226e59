//! Forks (`POST /hearth/v1/microvms/{id}/fork`): a running microvm copied into a new one,
//! so that an agent can try two approaches from the same state.
//!
//! The fork is a new microvm of the same account, image, version and settings (idle
//! policy, egress, execution role, lifetime), admitted by the account's quotas and the
//! host's room as a RunMicrovm is. What is copied: RAM, device state and the root disk at
//! one instant (`hearth_vmm::Vm::fork_snapshot`: the source's vCPUs stop for the copy and
//! run on). What is fresh: its id, endpoint and tokens, network namespace and egress
//! rules applied anew, QEMU process and jail, and the guest's clock, kernel RNG (entropy
//! credited and the CRNG reseeded), hostname and `/etc/machine-id`
//! (`hearth_vmm::restore`: every copy of a snapshot gets them before any command runs).
//! Processes in the guest, files in `/tmp` and the kernel's boot id are the source's, as
//! after any snapshot restore.
//!
//! Order (docs/RELIABILITY.md): the fork's record is written PENDING (after admission)
//! before anything is done; the source is locked only while it is copied (its state stays
//! RUNNING: execs in flight finish first, new ones wait); the copy starts from the fork
//! snapshot kept in the fork's own directory (`<state>/microvms/<fork>/fork/disk.qcow2`
//! backs its disk, and goes with it at terminate); RUNNING is written last. A failure
//! leaves the fork TERMINATED with the reason and its directory removed; a daemon that
//! dies half-way leaves a PENDING record, which the next start settles as TERMINATED
//! ([`super::reconcile`]).

use super::microvms::{sole, EXEC_DRAIN};
use super::{Reason, Service};
use crate::clock::now;
use crate::error::ApiError;
use crate::keys::random_hex;
use crate::lifecycle::MicrovmState;
use crate::store::MicrovmRecord;
use hearth_vmm::{Snapshot, Vm};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The spec key that records which microvm a fork was copied from (Hearth's own, kept out
/// of the model's shape like `hearthEgress`).
pub const FORK_OF: &str = "hearthForkOf";

impl Service {
    /// Forks running microvm `ident` of `account` into a new microvm; its GetMicrovm shape.
    ///
    /// # Errors
    ///
    /// NotFound for an unknown microvm, Conflict when it is not RUNNING (or still busy
    /// after [`EXEC_DRAIN`]), ServiceQuotaExceeded / InsufficientCapacity as RunMicrovm,
    /// and the engine's failure (the fork then is TERMINATED with that reason).
    pub async fn fork_microvm(&self, account: &str, ident: &str) -> Result<Value, ApiError> {
        let source = self.load(account, ident).await?;
        let source_id = source.microvm_id.clone();
        self.check_not_recovering(&source_id)?;
        if source.state != MicrovmState::Running {
            return Err(not_running(&source_id, source.state));
        }
        let id = format!("mvm-{}", random_hex(8));
        let t = now();
        let mut spec = source.spec.clone();
        if let Some(o) = spec.as_object_mut() {
            o.insert(FORK_OF.into(), source_id.clone().into());
        }
        let mut m = MicrovmRecord {
            microvm_id: id.clone(),
            account: account.into(),
            image_name: source.image_name.clone(),
            image_version: source.image_version,
            state: MicrovmState::Pending,
            state_reason: None,
            spec,
            started_at: t,
            terminated_at: None,
            last_activity: t,
            suspended_at: None,
            maximum_duration_in_seconds: source.maximum_duration_in_seconds,
            memory_mib: source.memory_mib,
            vcpus: source.vcpus,
            vm_dir: None,
        };
        // Admitted before the source is locked: making room may suspend idle microvms, and
        // the source may be one of them (the copy below then refuses).
        let admitted = self.admit_microvm(account, m.memory_mib, m.vcpus, false).await?;
        let slot = self.slot(&id);
        let mut guard = slot.lock().await;
        self.put(&m).await?;
        drop(admitted);
        hearth_vmm::crash::point("fork.recorded");
        let started = std::time::Instant::now();
        match self.copy_and_launch(account, &source_id, &m).await {
            Ok(vm) => {
                m.vm_dir = Some(vm.run_dir().display().to_string());
                self.put(&m).await?;
                // The app wakes in a new microvm from saved state: as after a resume, its
                // hook with the execution role's credentials (the relay up first).
                self.imds_start(&mut guard, &vm, &m);
                let hook_error = self.call_hook(&vm, &m, "resume", "").await.err();
                self.hold(&mut guard, vm, &m);
                self.transition(&mut m, MicrovmState::Running, Reason::Set(hook_error)).await?;
                self.metrics.observe("fork", started.elapsed());
                tracing::info!(microvm = %id, source = %source_id, elapsed = ?started.elapsed(), "forked");
                Ok(self.microvm_json(&m))
            }
            Err(e) => {
                self.metrics.error("fork");
                let _ = std::fs::remove_dir_all(self.microvm_dir(&id));
                let reason = format!("fork of {source_id} failed: {}", e.message);
                self.transition(&mut m, MicrovmState::Terminated, Reason::Set(Some(reason))).await?;
                drop(guard);
                self.slots.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                Err(e)
            }
        }
    }

    /// Copies the source (under its lock) into the fork's directory and starts the fork.
    async fn copy_and_launch(&self, account: &str, source_id: &str, m: &MicrovmRecord) -> Result<Vm, ApiError> {
        let dir = self.microvm_dir(&m.microvm_id);
        std::fs::create_dir_all(&dir).map_err(ApiError::internal)?;
        let dest = dir.join("fork");
        let snap = {
            let (_, mut guard, source) = self.locked(account, source_id).await?;
            if source.state != MicrovmState::Running {
                return Err(not_running(source_id, source.state));
            }
            // The engine needs the VM to itself: execs and connections in flight end first.
            let Some(mut vm) = sole(&mut guard, EXEC_DRAIN, false).await else {
                return Err(ApiError::conflict(
                    "Microvm",
                    source_id,
                    format!("microvm {source_id} still has execs or connections after {EXEC_DRAIN:?}; fork it when they end"),
                ));
            };
            let copied = vm.fork_snapshot(&dest).await;
            // Back in its slot as it was (its QEMU watcher is still the one `hold` started).
            guard.vm = Some(std::sync::Arc::new(vm));
            drop(guard);
            let _ = self.store.touch(source_id, now()).await;
            copied.map_err(|e| ApiError::internal(format!("copy the running microvm: {e}")))?
        };
        hearth_vmm::crash::point("fork.copied");
        // The copy's disk must outlive the source: a source that is itself a fork backs its
        // disk with its own directory, which goes when it terminates.
        if let Some(disk) = snap.manifest.disk.as_ref().map(|d| snap.path(d)) {
            let microvms = self.state.join("microvms");
            tokio::task::spawn_blocking(move || detach_from_microvms(&disk, &microvms))
                .await
                .map_err(ApiError::internal)?
                .map_err(|e| ApiError::internal(format!("rebase the fork's disk: {e}")))?;
        }
        let has_nic = snap.manifest.network.is_some();
        let vm = Vm::launch_fork(&snap, &self.restore_options(m, has_nic))
            .await
            .map_err(|e| ApiError::internal(format!("start the fork: {e}")))?;
        // RAM was read in at the start; only the disk stays (its overlay's backing file).
        drop_fork_state(&snap);
        Ok(vm)
    }
}

fn not_running(id: &str, state: MicrovmState) -> ApiError {
    ApiError::conflict("Microvm", id, format!("microvm {id} is {state}; only a RUNNING microvm can be forked (resume it first)"))
}

/// Removes what a started fork no longer needs from its snapshot: the RAM and device
/// state and the manifest (the directory is no snapshot any more, only a disk).
fn drop_fork_state(snap: &Snapshot) {
    let _ = std::fs::remove_file(snap.dir.join("manifest.json"));
    let _ = std::fs::remove_file(snap.path(&snap.manifest.state.name));
    hearth_vmm::snapshot::sync_dir(&snap.dir);
}

/// Rebases qcow2 `disk` (with `qemu-img rebase`, which copies what differs) while its
/// backing file lies beneath `microvms` (another microvm's directory, gone when that one
/// terminates), onto that file's own backing file: an image version's disk, which lives
/// as long as microvms of it do.
fn detach_from_microvms(disk: &Path, microvms: &Path) -> Result<(), String> {
    for _ in 0..hearth_vmm::jail::chain::MAX_DEPTH {
        let Some(backing) = hearth_vmm::jail::chain::backing_file(disk).map_err(|e| e.to_string())? else { return Ok(()) };
        if !backing.starts_with(microvms) {
            return Ok(());
        }
        let below: Option<PathBuf> = hearth_vmm::jail::chain::backing_file(&backing).map_err(|e| e.to_string())?;
        let mut cmd = std::process::Command::new("qemu-img");
        cmd.args(["rebase", "-q", "-f", "qcow2"]);
        match &below {
            Some(b) => cmd.args(["-F", if is_qcow2(b) { "qcow2" } else { "raw" }, "-b"]).arg(b),
            // No backing below: the disk becomes whole.
            None => cmd.args(["-b", ""]),
        };
        let out = cmd.arg(disk).output().map_err(|e| format!("cannot run qemu-img: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
    }
    Err(format!("{}: backing chain too deep", disk.display()))
}

fn is_qcow2(p: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(p).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == b"QFI\xfb"
}

impl Service {
    /// The extension's call: body `{}` (or empty) or `{"clientToken": "…"}`; a retry with
    /// the same token answers the first call's fork instead of making another.
    ///
    /// # Errors
    ///
    /// Validation for a body that is not that, Conflict for a token in use or reused with
    /// another source, and [`Service::fork_microvm`]'s.
    pub async fn fork_request(&self, account: &str, ident: &str, body: &[u8]) -> Result<Value, ApiError> {
        let v: Value = if body.iter().all(u8::is_ascii_whitespace) {
            Value::Object(Default::default())
        } else {
            serde_json::from_slice(body).map_err(|e| ApiError::validation(format!("fork body is not JSON: {e}")))?
        };
        let o = v.as_object().ok_or_else(|| ApiError::validation("fork body must be a JSON object: {} or {\"clientToken\": \"…\"}"))?;
        if let Some(k) = o.keys().find(|k| *k != "clientToken") {
            return Err(ApiError::validation(format!("fork takes no {k:?}; only clientToken")));
        }
        let token = match o.get("clientToken") {
            None | Some(Value::Null) => None,
            Some(Value::String(t)) if (1..=64).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_graphic()) => Some(t.clone()),
            Some(_) => return Err(ApiError::validation("clientToken must be 1-64 printable ASCII characters")),
        };
        let Some(t) = token else { return self.fork_microvm(account, ident).await };
        const OP: &str = "ForkMicrovm";
        let hash = format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(Self::microvm_id(account, ident)));
        if let Some((h, resp)) = self.claim(account, OP, &t, &hash).await? {
            if h != hash {
                return Err(ApiError::conflict(OP, &t, "clientToken was already used to fork another microvm"));
            }
            if resp.is_empty() {
                return Err(ApiError::conflict(OP, &t, "a fork with this clientToken is still in progress; retry shortly"));
            }
            return serde_json::from_str(&resp).map_err(ApiError::internal);
        }
        match self.fork_microvm(account, ident).await {
            Ok(v) => {
                self.remember(account, OP, &t, &hash, &v.to_string()).await?;
                Ok(v)
            }
            Err(e) => {
                self.unclaim(account, OP, &t).await?;
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn qemu(tool: &str, args: &[&str]) {
        let out = Command::new(tool).args(args).output().unwrap();
        assert!(out.status.success(), "{tool} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// A fork of a fork: its disk leans on the middle fork's directory until it is rebased
    /// onto the image's disk, with the middle one's data copied in (and the chain's data
    /// kept whole).
    #[test]
    fn a_disk_backed_by_another_microvm_is_rebased_onto_the_image_below() {
        let dir = tempfile::tempdir().unwrap();
        let p = |s: &str| dir.path().join(s).display().to_string();
        let microvms = dir.path().join("microvms");
        std::fs::create_dir_all(microvms.join("mvm-a/fork")).unwrap();
        std::fs::create_dir_all(dir.path().join("images")).unwrap();
        let (base, mid, top) = (p("images/disk.qcow2"), p("microvms/mvm-a/fork/disk.qcow2"), p("top.qcow2"));
        qemu("qemu-img", &["create", "-q", "-f", "qcow2", &base, "1M"]);
        qemu("qemu-io", &["-c", "write -P 0x11 0 64k", &base]);
        qemu("qemu-img", &["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &base, &mid]);
        qemu("qemu-io", &["-c", "write -P 0x22 64k 64k", &mid]);
        qemu("qemu-img", &["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &mid, &top]);
        qemu("qemu-io", &["-c", "write -P 0x33 128k 64k", &top]);

        detach_from_microvms(Path::new(&top), &microvms).unwrap();
        assert_eq!(hearth_vmm::jail::chain::backing_file(Path::new(&top)).unwrap().as_deref(), Some(Path::new(&base)));
        std::fs::remove_file(&mid).unwrap();
        for (offset, pattern) in [("0", "0x11"), ("64k", "0x22"), ("128k", "0x33")] {
            qemu("qemu-io", &["-c", &format!("read -P {pattern} {offset} 64k"), &top]);
        }
        // A disk on an image's disk already is left alone.
        detach_from_microvms(Path::new(&top), &microvms).unwrap();
        assert_eq!(hearth_vmm::jail::chain::backing_file(Path::new(&top)).unwrap().as_deref(), Some(Path::new(&base)));
    }

    #[tokio::test]
    async fn fork_bodies_other_than_an_object_with_a_client_token_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(&dir.path().join("hearth.db")).unwrap();
        let token_key = crate::ingress::TokenKey::load_or_create(dir.path()).unwrap();
        let vm = hearth_vmm::VmConfig::new("/nonexistent/vmlinuz", "/nonexistent/initramfs");
        let svc = Service::new(store, dir.path().into(), dir.path().into(), vm, token_key);
        for bad in [&b"[]"[..], b"nope", b"{\"clientToken\": 5}", b"{\"clientToken\": \"\"}", b"{\"image\": \"x\"}"] {
            let e = svc.fork_request("111111111111", "mvm-1", bad).await.unwrap_err();
            assert_eq!(e.status(), 400, "{}: {}", String::from_utf8_lossy(bad), e.message);
        }
        let long = format!("{{\"clientToken\": \"{}\"}}", "x".repeat(65));
        assert_eq!(svc.fork_request("111111111111", "mvm-1", long.as_bytes()).await.unwrap_err().status(), 400);
        // Well-formed, for a microvm that is not there: 404, and nothing was made.
        for ok in [&b""[..], b"{}", b"{\"clientToken\": \"t-1\"}"] {
            let e = svc.fork_request("111111111111", "mvm-1", ok).await.unwrap_err();
            assert_eq!(e.status(), 404, "{}", e.message);
        }
        assert!(svc.store.live_microvms().await.unwrap().is_empty());
    }
}
