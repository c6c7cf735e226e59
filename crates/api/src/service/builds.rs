//! Builds: a version's build runs in the background (booting a builder VM and
//! snapshotting it); GetMicrovmImageBuild and ListMicrovmImageBuilds show it.

use super::{artifacts, dir_size, image_arn, page, Reason, Service};
use crate::clock::now;
use crate::error::ApiError;
use crate::inputs::{GetMicrovmImageBuildInput, ListMicrovmImageBuildsInput};
use crate::lifecycle::{MicrovmImageState, MicrovmImageVersionState as VersionState};
use crate::store::{ImageRecord, VersionRecord};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

impl Service {
    pub(super) async fn build(
        self: Arc<Self>,
        mut image: ImageRecord,
        mut rec: VersionRecord,
        base: hearth_image::base::Base,
        update: bool,
    ) {
        if let Err(e) = self.version_transition(&mut rec, VersionState::InProgress, Reason::Keep).await {
            tracing::warn!(image = %image.name, version = rec.version, error = %e.message, "image build not started");
            return;
        }
        hearth_vmm::crash::point("build.started");
        let dir = self.version_dir(&image.account, &image.name, rec.version);
        let result = self.clone().build_version(&rec, base, &dir).await;
        let (version_state, reason, image_state) = match result {
            Ok((sizes, config)) => {
                rec.snapshot_bytes = Some(sizes);
                rec.config = Some(config);
                (VersionState::Successful, Reason::Keep, if update { MicrovmImageState::Updated } else { MicrovmImageState::Created })
            }
            Err(e) => {
                tracing::warn!(image = %image.name, version = rec.version, error = %e, "image build failed");
                let _ = std::fs::remove_dir_all(dir.join("snapshot"));
                (
                    VersionState::Failed,
                    Reason::Set(Some(e)),
                    if update { MicrovmImageState::UpdateFailed } else { MicrovmImageState::CreateFailed },
                )
            }
        };
        image.updated_at = Some(now());
        let written = match self.version_transition(&mut rec, version_state, reason).await {
            Ok(()) => self.image_transition(&mut image, image_state).await,
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
    ) -> Result<((u64, u64), hearth_image::build::ImageConfig), String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let scratch = tempfile::Builder::new().prefix(".ctx-").tempdir_in(dir).map_err(|e| e.to_string())?;
        let uri = rec.spec.pointer("/codeArtifact/uri").and_then(Value::as_str).unwrap_or_default();
        // Held open until the build ends: a directory context is read through it.
        let source = self.code_artifact(&rec.account, uri).await.map_err(|e| e.message)?;
        let context = match &source {
            artifacts::Source::Local(l) if l.dir => l.path(),
            other => {
                let zip = match other {
                    artifacts::Source::Local(l) => l.path(),
                    artifacts::Source::Remote(u) => {
                        hearth_image::artifact::fetch(u, scratch.path(), Default::default()).await.map_err(|e| e.to_string())?
                    }
                };
                let ctx = scratch.path().join("ctx");
                hearth_image::artifact::extract_zip(&zip, &ctx, Default::default()).map_err(|e| e.to_string())?;
                ctx
            }
        };
        let hooks = rec.spec.get("hooks").cloned().unwrap_or(Value::Null);
        let enabled = |p: &str| hooks.pointer(p).and_then(Value::as_str) != Some("DISABLED");
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
            hooks_port: hooks.get("port").and_then(Value::as_u64).unwrap_or(8080) as u16,
            ready_timeout: Duration::from_secs(
                hooks.pointer("/microvmImageHooks/readyTimeoutInSeconds").and_then(Value::as_u64).unwrap_or(120),
            ),
            validate: hooks.pointer("/microvmImageHooks/validate").and_then(Value::as_str) == Some("ENABLED")
                && enabled("/microvmImageHooks/validate"),
            network: hearth_vmm::net::can_network().then(hearth_vmm::net::Egress::internet),
            cache: Some(self.layer_cache(&rec.account)),
            images: Arc::new(artifacts::TenantImages::load(self.clone(), &rec.account).await.map_err(|e| e.message)?),
        };
        let mut vm = self.vm_template.clone();
        if let Some(m) = rec.spec.pointer("/resources/0/minimumMemoryInMiB").and_then(Value::as_u64) {
            vm.memory_mib = (m as u32).max(hearth_vmm::config::MIN_MEMORY_MIB);
        }
        let log_path = dir.join("build.log");
        let mut log_file = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
        let mut log = |line: &str| {
            let _ = std::io::Write::write_all(&mut log_file, format!("{line}\n").as_bytes());
        };
        let (snap, config) =
            hearth_image::build::build(&req, vm, &self.home, &dir.join("snapshot"), &mut log).await.map_err(|e| e.to_string())?;
        let mem = snap.manifest.memory.as_ref().map_or(0, |m| m.size);
        Ok(((mem, dir_size(&dir.join("snapshot")).saturating_sub(mem)), config))
    }

    pub(super) fn build_json(&self, image: &ImageRecord, v: &VersionRecord) -> Value {
        let mut out = json!({
            "imageArn": image_arn(&image.account, &image.name),
            "imageVersion": v.version.to_string(),
            "buildId": v.build_id,
            "buildState": crate::lifecycle::build_state(v.state),
            "architecture": "X86_64",
            "chipset": "INTEL",
            "chipsetGeneration": "x86-64",
            "createdAt": v.created_at,
        });
        if let Some(r) = &v.state_reason {
            out["stateReason"] = r.clone().into();
        }
        if let Some((mem, disk)) = v.snapshot_bytes {
            out["snapshotBuild"] = json!({ "memorySnapshotSizeInBytes": mem, "diskSnapshotSizeInBytes": disk });
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
        Ok(self.build_json(&image, &v))
    }

    /// ListMicrovmImageBuilds.
    pub async fn list_builds(&self, account: &str, input: &ListMicrovmImageBuildsInput) -> Result<Value, ApiError> {
        let image = self.image(account, &input.image_identifier).await?;
        let v = self.version(account, &image.name, &input.image_version).await?;
        page(vec![self.build_json(&image, &v)], input.max_results, input.next_token.as_deref())
    }
}
