//! Builds: a version's build runs in the background (booting a builder VM and
//! snapshotting it); GetMicrovmImageBuild and ListMicrovmImageBuilds show it.
//!
//! Every build is bounded: it waits its turn for one of `--max-concurrent-builds` slots
//! ([`super::build_queue`], the version PENDING meanwhile), then runs under a step timeout
//! and a build timeout (defaults in [`hearth_image::build::limits`], an image's tags
//! [`TAG_STEP_TIMEOUT`] and [`TAG_BUILD_TIMEOUT`] set its own), with its log capped
//! ([`hearth_image::build::BuildLog`]). Deleting the image or the version cancels it.
//! File work (creating directories, extracting the code zip, sizing the snapshot, removing
//! what a failed build left) runs on the blocking pool.

use super::build_queue::{BuildKey, Builds, Ticket};
use super::{artifacts, dir_size, image_arn, page, Reason, Service};
use crate::clock::now;
use crate::error::ApiError;
use crate::inputs::{GetMicrovmImageBuildInput, ListMicrovmImageBuildsInput};
use crate::lifecycle::{MicrovmImageState, MicrovmImageVersionState as VersionState};
use crate::store::{ImageRecord, VersionRecord};
use hearth_image::build::limits::{self, MAX_TIMEOUT_SECS, MIN_TIMEOUT_SECS};
use hearth_image::build::{BuildError, BuildLog, Control};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// The image tag that sets how many seconds a whole build of it may take.
pub const TAG_BUILD_TIMEOUT: &str = "hearth:build-timeout-seconds";

/// The image tag that sets how many seconds each Dockerfile step of its builds may take.
pub const TAG_STEP_TIMEOUT: &str = "hearth:run-step-timeout-seconds";

/// What an image's tags set for its builds: the step and build timeouts, and the root
/// disk's size ([`hearth_image::disk::TAG_DISK_SIZE`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Timeouts {
    step: Duration,
    build: Duration,
    disk_gib: Option<u64>,
}

/// The timeouts and disk size `tags` set (the defaults where they set none).
///
/// # Errors
///
/// A ValidationException naming the tag whose value is not a whole number of seconds
/// from [`MIN_TIMEOUT_SECS`] to [`MAX_TIMEOUT_SECS`], or of GiB in the disk's range.
pub(super) fn timeouts<'a>(tags: impl IntoIterator<Item = (&'a String, &'a String)>) -> Result<Timeouts, ApiError> {
    let mut t = Timeouts { step: limits::DEFAULT_STEP_TIMEOUT, build: limits::DEFAULT_BUILD_TIMEOUT, disk_gib: None };
    for (k, v) in tags {
        if k == hearth_image::disk::TAG_DISK_SIZE {
            t.disk_gib = Some(hearth_image::disk::parse_gib(v).map_err(|e| ApiError::validation(format!("tag {k}: {e}")))?);
            continue;
        }
        let slot = match k.as_str() {
            TAG_STEP_TIMEOUT => &mut t.step,
            TAG_BUILD_TIMEOUT => &mut t.build,
            _ => continue,
        };
        let secs = v.trim().parse::<u64>().ok().filter(|s| (MIN_TIMEOUT_SECS..=MAX_TIMEOUT_SECS).contains(s)).ok_or_else(|| {
            ApiError::validation(format!(
                "tag {k} must be a whole number of seconds from {MIN_TIMEOUT_SECS} to {MAX_TIMEOUT_SECS}, not {v:?}"
            ))
        })?;
        *slot = Duration::from_secs(secs);
    }
    Ok(t)
}

/// The image hooks' port when the image names none: the port the endpoint routes to by
/// default, as on the service.
pub(super) const DEFAULT_HOOKS_PORT: u16 = 8080;

/// `readyTimeoutInSeconds` and `validateTimeoutInSeconds` when the image gives none. The
/// model allows 1-3600 and the service documents no default; Hearth waits 120 s (a
/// Debian app's first start under TCG emulation takes up to ~60 s).
pub(super) const DEFAULT_IMAGE_HOOK_TIMEOUT_SECS: u64 = 120;

/// Most entries [`tree_bytes`] visits: a code artifact is bounded far below it.
const MAX_TREE_ENTRIES: usize = 1 << 20;

/// Bytes of the regular files under `root` (links not followed): the code a build installed.
fn tree_bytes(root: &std::path::Path) -> u64 {
    let (mut total, mut seen, mut dirs) = (0u64, 0usize, vec![root.to_path_buf()]);
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            seen += 1;
            if seen > MAX_TREE_ENTRIES {
                return total;
            }
            match e.file_type() {
                Ok(t) if t.is_dir() => dirs.push(e.path()),
                Ok(t) if t.is_file() => total += e.metadata().map_or(0, |m| m.len()),
                _ => {}
            }
        }
    }
    total
}

/// Runs synchronous file work on the blocking pool.
pub(super) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(t) => t,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// What a version's `stateReason` says of a failed build.
fn reason(e: &BuildError) -> String {
    match e {
        BuildError::StepTimeout { .. } => format!("{e} (the image's tag {TAG_STEP_TIMEOUT} sets the step timeout)"),
        BuildError::BuildTimeout { .. } => format!("{e} (the image's tag {TAG_BUILD_TIMEOUT} sets the build timeout)"),
        BuildError::Cancelled => "the build was cancelled: its image or version was deleted; the builder VM was stopped".into(),
        e => e.to_string(),
    }
}

impl Service {
    /// At most `n` builds at once (at least 1); the others wait in FIFO order. Set before
    /// the service is shared (`hearth serve --max-concurrent-builds`).
    pub fn set_max_concurrent_builds(&mut self, n: usize) {
        self.builds = Builds::new(n);
    }

    /// Registers the build of `rec` (so a delete finds it at once) and starts its task.
    pub(super) fn start_build(
        self: &Arc<Self>,
        image: ImageRecord,
        rec: VersionRecord,
        base: hearth_image::base::Base,
        update: bool,
        timeouts: Timeouts,
    ) {
        let ticket = self.builds.register((rec.account.clone(), rec.name.clone(), rec.version));
        let svc = self.clone();
        tokio::spawn(async move { svc.build(image, rec, base, update, timeouts, ticket).await });
    }

    /// Cancels the build of version `version` of `name`, if one is queued or running, and
    /// waits until it has ended: its builder stopped, its files removed, the version FAILED.
    pub(super) async fn cancel_build(&self, account: &str, name: &str, version: u32) -> bool {
        let key: BuildKey = (account.to_owned(), name.to_owned(), version);
        self.builds.cancel(&key).await
    }

    async fn build(
        self: Arc<Self>,
        mut image: ImageRecord,
        mut rec: VersionRecord,
        base: hearth_image::base::Base,
        update: bool,
        timeouts: Timeouts,
        ticket: Ticket,
    ) {
        let failed = if update { MicrovmImageState::UpdateFailed } else { MicrovmImageState::CreateFailed };
        // Queued (PENDING) until a slot frees; a build cancelled meanwhile leaves the queue.
        let Some(_slot) = self.builds.admit(&ticket).await else {
            let why = "the build was cancelled while queued: its image or version was deleted".to_owned();
            self.end_build(&mut image, &mut rec, VersionState::Failed, Reason::Set(Some(why)), failed).await;
            return;
        };
        if let Err(e) = self.version_transition(&mut rec, VersionState::InProgress, Reason::Keep).await {
            tracing::warn!(image = %image.name, version = rec.version, error = %e.message, "image build not started");
            return;
        }
        hearth_vmm::crash::point("build.started");
        let dir = self.version_dir(&image.account, &image.name, rec.version);
        // Each builder VM relays metadata: RUN steps and image hooks run with the build role.
        let ctl = Control {
            step_timeout: timeouts.step,
            build_timeout: timeouts.build,
            cancel: Some(ticket.cancel.clone()),
            builder_hook: Some(self.build_relays(&rec)),
        };
        // Should this task end early (a panic), the build's credentials are revoked still.
        let revoke = super::imds::RevokeOnDrop::new(&self, super::imds::build_subject(&rec));
        let result = self.clone().build_version(&rec, base, &dir, ctl, timeouts.disk_gib).await;
        // A keyed image's template is encrypted at rest before the version is SUCCESSFUL.
        let result = match result {
            Ok(r) => self.seal_template(&rec, &dir.join("snapshot")).await.map(|()| r),
            e => e,
        };
        // Whatever the outcome, no credential issued to the build outlives it.
        self.end_build_sessions(super::imds::build_subject(&rec)).await;
        revoke.disarm();
        let (version_state, reason, image_state) = match result {
            Ok(((mem, disk, code), config)) => {
                rec.snapshot_bytes = Some((mem, disk));
                rec.code_bytes = Some(code);
                rec.config = Some(config);
                (VersionState::Successful, Reason::Keep, if update { MicrovmImageState::Updated } else { MicrovmImageState::Created })
            }
            Err(e) => {
                tracing::warn!(image = %image.name, version = rec.version, error = %e, "image build failed");
                let snapshot = dir.join("snapshot");
                blocking(move || std::fs::remove_dir_all(snapshot)).await.ok();
                (VersionState::Failed, Reason::Set(Some(e)), failed)
            }
        };
        self.end_build(&mut image, &mut rec, version_state, reason, image_state).await;
        // `ticket` drops here, after the end is recorded: a delete waiting on it goes on.
    }

    /// Records the end of a build: the version's state, then the image's.
    async fn end_build(
        &self,
        image: &mut ImageRecord,
        rec: &mut VersionRecord,
        version_state: VersionState,
        reason: Reason,
        image_state: MicrovmImageState,
    ) {
        image.updated_at = Some(now());
        let written = match self.version_transition(rec, version_state, reason).await {
            Ok(()) => self.image_transition(image, image_state).await,
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            tracing::warn!(image = %image.name, version = rec.version, error = %e.message, "the end of an image build was not recorded");
        }
    }

    pub(super) async fn build_version(
        self: Arc<Self>,
        rec: &VersionRecord,
        base: hearth_image::base::Base,
        dir: &std::path::Path,
        ctl: Control,
        disk_gib: Option<u64>,
    ) -> Result<((u64, u64, u64), hearth_image::build::ImageConfig), String> {
        let scratch = {
            let dir = dir.to_path_buf();
            blocking(move || {
                std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
                tempfile::Builder::new().prefix(".ctx-").tempdir_in(&dir).map_err(|e| e.to_string())
            })
            .await?
        };
        let uri = rec.spec.pointer("/codeArtifact/uri").and_then(Value::as_str).unwrap_or_default();
        // Held open until the build ends: a directory context is read through it.
        let source = self.code_artifact(&rec.account, uri).await.map_err(|e| e.message)?;
        // The account's quota on one artifact bounds the download and what it unpacks to.
        let limits = hearth_image::artifact::Limits {
            max_bytes: self.artifact_limit(&rec.account).await.map_err(|e| e.message)?,
            ..Default::default()
        };
        let (context, _scratch) = match &source {
            artifacts::Source::Local(l) if l.dir => (l.path(), scratch),
            other => {
                let zip = match other {
                    artifacts::Source::Local(l) => l.path(),
                    artifacts::Source::Remote(u) => tokio::select! {
                        z = hearth_image::artifact::fetch(u, scratch.path(), limits) => z.map_err(|e| e.to_string())?,
                        () = ctl.cancelled() => return Err(reason(&BuildError::Cancelled)),
                    },
                };
                // Extraction (bounded by the artifact limits) is not cut short: the scratch
                // directory travels with it and is removed by whoever holds it last.
                let ctx = scratch.path().join("ctx");
                let (scratch, extracted) = {
                    let ctx = ctx.clone();
                    blocking(move || {
                        let r = hearth_image::artifact::extract_zip(&zip, &ctx, limits);
                        (scratch, r)
                    })
                    .await
                };
                extracted.map_err(|e| e.to_string())?;
                (ctx, scratch)
            }
        };
        let hooks = rec.spec.get("hooks").cloned().unwrap_or(Value::Null);
        // A hook is called only when the image says ENABLED (the model's HookState; absent
        // is not enabled); without the ready hook the app is ready once it listens.
        let enabled = |name: &str| hooks.pointer(&format!("/microvmImageHooks/{name}")).and_then(Value::as_str) == Some("ENABLED");
        let timeout = |name: &str| {
            let secs = hooks.pointer(&format!("/microvmImageHooks/{name}TimeoutInSeconds")).and_then(Value::as_u64);
            Duration::from_secs(secs.unwrap_or(DEFAULT_IMAGE_HOOK_TIMEOUT_SECS))
        };
        let env = rec
            .spec
            .get("environmentVariables")
            .and_then(Value::as_object)
            .map(|o| o.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned())).collect())
            .unwrap_or_default();
        let req = hearth_image::build::BuildRequest {
            context,
            base,
            env,
            hooks_port: hooks.get("port").and_then(Value::as_u64).and_then(|p| u16::try_from(p).ok()).unwrap_or(DEFAULT_HOOKS_PORT),
            ready_hook: enabled("ready"),
            ready_timeout: timeout("ready"),
            validate: enabled("validate"),
            validate_timeout: timeout("validate"),
            network: hearth_vmm::net::can_network().then(hearth_vmm::net::Egress::internet),
            cache: Some(self.layer_cache(&rec.account)),
            images: Arc::new(artifacts::TenantImages::load(self.clone(), &rec.account).await.map_err(|e| e.message)?),
            disk_gib,
            // RUN steps run with the build role: its layers are its own (its id and
            // policies as they are now included).
            cache_scope: Some(
                self.role_scope(&rec.account, rec.spec.get("buildRoleArn").and_then(Value::as_str)).await.map_err(|e| e.message)?,
            ),
        };
        let arch = super::arch::requested(&rec.spec, self.default_arch).map_err(|e| e.message)?;
        let mut vm = self.vm_for(arch)?;
        if let Some(m) = rec.spec.pointer("/resources/0/minimumMemoryInMiB").and_then(Value::as_u64) {
            vm.memory_mib = (m as u32).max(hearth_vmm::config::MIN_MEMORY_MIB);
        }
        let mut log = BuildLog::create(&dir.join("build.log")).await.map_err(|e| format!("create the build log: {e}"))?;
        // A managed base not built yet (python, nodejs: not built by `hearth setup`) is
        // built on first use, once for the host; a build that waits for it says so.
        if !base.path(&self.home).is_file() {
            log.line(&format!("building the managed base {base} on its first use (a few minutes, once for this host)"));
            let home = self.home.clone();
            let ensured = tokio::select! {
                r = blocking(move || base.ensure(&home, &|_| {})) => r.map_err(|e| format!("build the managed base {base}: {e}")),
                () = ctl.cancelled() => Err(reason(&BuildError::Cancelled)),
            };
            if let Err(e) = ensured {
                log.line(&format!("build failed: {e}"));
                let _ = log.finish().await;
                return Err(e);
            }
        }
        let built = hearth_image::build::build_with(&req, vm, &self.home, &dir.join("snapshot"), &mut |l| log.line(l), &ctl).await;
        match &built {
            Ok(_) => log.line("built"),
            Err(e) => log.line(&format!("build failed: {}", reason(e))),
        }
        if let Err(e) = log.finish().await {
            tracing::warn!(image = %rec.name, version = rec.version, error = %e, "the build log was not written whole");
        }
        let (snap, config) = built.map_err(|e| reason(&e))?;
        let mem = snap.manifest.memory.as_ref().map_or(0, |m| m.size);
        let mem_file = snap.manifest.memory.as_ref().map(|m| m.name.clone());
        let snapshot = dir.join("snapshot");
        // The disk: what the snapshot's other files take on disk (the memory file is sparse:
        // its blocks are not its size, so it is left out by name, not by subtraction).
        let disk = blocking(move || {
            let mem_blocks = mem_file
                .and_then(|n| std::fs::metadata(snapshot.join(n)).ok())
                .map_or(0, |m| std::os::unix::fs::MetadataExt::blocks(&m) * 512);
            dir_size(&snapshot).saturating_sub(mem_blocks)
        })
        .await;
        let context = req.context.clone();
        let code = blocking(move || tree_bytes(&context)).await;
        Ok(((mem, disk, code), config))
    }

    pub(super) fn build_json(&self, image: &ImageRecord, v: &VersionRecord) -> Value {
        // Versions recorded before architectures were are x86-64.
        let arch = super::arch::requested(&v.spec, hearth_vmm::Arch::X86_64).unwrap_or_default();
        let (chipset, generation) = super::arch::chipset(arch);
        let mut out = json!({
            "imageArn": image_arn(&image.account, &image.name),
            "imageVersion": v.version.to_string(),
            "buildId": v.build_id,
            "buildState": crate::lifecycle::build_state(v.state),
            "architecture": super::arch::api_name(arch),
            "chipset": chipset,
            "chipsetGeneration": generation,
            "createdAt": v.created_at,
        });
        if let Some(r) = &v.state_reason {
            out["stateReason"] = r.clone().into();
        } else if self.builds.is_queued(&(v.account.clone(), v.name.clone(), v.version)) {
            out["stateReason"] = format!(
                "queued: at most {} builds run at once on this host (hearth serve --max-concurrent-builds); this one starts when one ends",
                self.builds.max()
            )
            .into();
        }
        out
    }

    /// GetMicrovmImageBuild.
    pub async fn get_build(&self, account: &str, input: &GetMicrovmImageBuildInput) -> Result<Value, ApiError> {
        let image = self.image(account, &input.image_identifier).await?;
        let v = self.version(account, &image.name, &input.image_version).await?;
        let id = input.build_id.as_str();
        if v.build_id != id {
            return Err(ApiError::not_found("MicrovmImageBuild", id));
        }
        let mut out = self.build_json(&image, &v);
        // Only GetMicrovmImageBuild's output has the snapshot's sizes (the list's summary does not).
        if let Some((mem, disk)) = v.snapshot_bytes {
            out["snapshotBuild"] = json!({ "memorySnapshotSizeInBytes": mem, "diskSnapshotSizeInBytes": disk });
            if let Some(code) = v.code_bytes {
                out["snapshotBuild"]["codeInstallSizeInBytes"] = code.into();
            }
        }
        Ok(out)
    }

    /// ListMicrovmImageBuilds.
    pub async fn list_builds(&self, account: &str, input: &ListMicrovmImageBuildsInput) -> Result<Value, ApiError> {
        let image = self.image(account, &input.image_identifier).await?;
        let v = self.version(account, &image.name, &input.image_version).await?;
        page(vec![self.build_json(&image, &v)], input.max_results, input.next_token.as_deref())
    }
}
