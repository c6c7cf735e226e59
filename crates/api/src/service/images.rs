//! Images and their versions: create, update (a new version), get, list, delete, and the
//! managed base images.

use super::{image_arn, managed_arn, page, valid_name, Service};
use crate::clock::now;
use crate::error::ApiError;
use crate::inputs::{
    to_map, CreateMicrovmImageRequest, DeleteMicrovmImageInput, DeleteMicrovmImageVersionInput, GetMicrovmImageInput,
    GetMicrovmImageVersionInput, ListManagedMicrovmImageVersionsInput, ListManagedMicrovmImagesInput, ListMicrovmImageVersionsInput,
    ListMicrovmImagesRequest, UpdateMicrovmImageRequest, UpdateMicrovmImageVersionRequest,
};
use crate::keys::random_hex;
use crate::lifecycle::{
    Lifecycle, MicrovmImageState, MicrovmImageVersionState as VersionState, MicrovmImageVersionStatus as VersionStatus,
};
use crate::store::{ImageRecord, VersionRecord};
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// The managed bases: API name and Hearth base. `python` and `nodejs` are built on their
/// first use when `hearth setup` did not build them.
pub const MANAGED: &[(&str, hearth_image::base::Base)] = &[
    ("debian-bookworm", hearth_image::base::Base::DebianBookworm),
    ("minimal", hearth_image::base::Base::Busybox),
    ("nodejs", hearth_image::base::Base::Node),
    ("python", hearth_image::base::Base::Python),
];

impl VersionRecord {
    /// Built and ACTIVE: new microvms may run it.
    pub(super) fn runnable(&self) -> bool {
        self.state == VersionState::Successful && self.status == VersionStatus::Active
    }
}

impl Service {
    pub(super) async fn version_json(&self, image: &ImageRecord, v: &VersionRecord) -> Value {
        let mut out = v.spec.clone();
        out["imageArn"] = image_arn(&image.account, &image.name).into();
        out["imageVersion"] = v.version.to_string().into();
        out["state"] = v.state.as_str().into();
        out["status"] = v.status.as_str().into();
        out["createdAt"] = v.created_at.into();
        if let Some(u) = v.updated_at {
            out["updatedAt"] = u.into();
        }
        if let Some(r) = &v.state_reason {
            out["stateReason"] = r.clone().into();
        }
        if let Ok(tags) = self.store.tags(&image_arn(&image.account, &image.name)).await {
            if !tags.is_empty() {
                out["tags"] = Value::Object(tags.into_iter().map(|(k, v)| (k, Value::String(v))).collect());
            }
        }
        out
    }

    pub(super) async fn image_json(&self, image: &ImageRecord) -> Result<Value, ApiError> {
        let versions = self.store.versions(&image.account, &image.name).await?;
        let mut out = json!({
            "imageArn": image_arn(&image.account, &image.name),
            "name": image.name,
            "state": image.state,
            "createdAt": image.created_at,
        });
        if let Some(v) = versions.iter().rev().find(|v| v.runnable()) {
            out["latestActiveImageVersion"] = v.version.to_string().into();
        }
        if let Some(v) = versions.iter().rev().find(|v| v.state == VersionState::Failed) {
            out["latestFailedImageVersion"] = v.version.to_string().into();
        }
        if let Some(u) = image.updated_at {
            out["updatedAt"] = u.into();
        }
        Ok(out)
    }

    /// CreateMicrovmImage: a new image, and the build of its first version.
    pub async fn create_image(self: &Arc<Self>, account: &str, input: &CreateMicrovmImageRequest) -> Result<Value, ApiError> {
        let name = input.name.clone();
        if !valid_name(&name) {
            return Err(ApiError::validation(format!("name {name:?} must be 1-64 letters, digits, '-' or '_'")));
        }
        if self.store.image(account, &name).await?.is_some() {
            return Err(ApiError::conflict(
                "MicrovmImage",
                &name,
                format!("an image named {name} exists; UpdateMicrovmImage builds a new version"),
            ));
        }
        let image = ImageRecord { account: account.into(), name, state: MicrovmImageState::Creating, created_at: now(), updated_at: None };
        self.new_version(account, image, false, to_map(input), input.tags.as_ref()).await
    }

    /// UpdateMicrovmImage: the build of a new version of an image.
    pub async fn update_image(self: &Arc<Self>, account: &str, input: &UpdateMicrovmImageRequest) -> Result<Value, ApiError> {
        let image = self.image(account, &input.image_identifier).await?;
        self.new_version(account, image, true, to_map(input), None).await
    }

    /// Records version `spec` (the request, which names the base image and the code
    /// artifact) of `image` and starts its build.
    async fn new_version(
        self: &Arc<Self>,
        account: &str,
        mut image: ImageRecord,
        update: bool,
        mut spec: Map<String, Value>,
        tags: Option<&std::collections::BTreeMap<String, String>>,
    ) -> Result<Value, ApiError> {
        let name = image.name.clone();
        if let Some(role) = spec.get("buildRoleArn").and_then(Value::as_str) {
            self.check_build_role(account, role).await?;
        }
        // A kmsKeyIdentifier must name a key of the account (its microvms are encrypted under it).
        self.microvm_key(account, spec.get("kmsKeyIdentifier"), None).await?;
        let base = spec.get("baseImageArn").and_then(Value::as_str).unwrap_or_default();
        let base_name = base.rsplit(':').next().unwrap_or(base);
        let Some((_, base_kind)) = MANAGED.iter().find(|(n, _)| *n == base_name) else {
            return Err(ApiError::validation(format!(
                "baseImageArn {base:?} is not a managed base image ({}); see ListManagedMicrovmImages",
                MANAGED.iter().map(|(n, _)| managed_arn(n)).collect::<Vec<_>>().join(", ")
            )));
        };
        // One architecture per version, recorded in its spec (the default written in when
        // the request names none), so what it was built for never depends on the daemon's
        // settings of the day.
        let arch = super::arch::requested(&Value::Object(spec.clone()), self.default_arch)?;
        self.check_arch(arch, *base_kind)?;
        spec.insert("cpuConfigurations".into(), super::arch::configurations(arch));
        self.check_connectors(account, spec.get("egressNetworkConnectors")).await?;
        let uri = spec.get("codeArtifact").and_then(|c| c.get("uri")).and_then(Value::as_str).unwrap_or_default();
        // Opened now so a bad one is refused here; the build opens it again.
        drop(self.code_artifact(account, uri).await?);
        // The build's timeouts come from the image's tags: the request's (a new image) or
        // those it has (a new version); a bad one is refused before anything is written.
        let timeouts = match tags {
            Some(t) => {
                super::pools::check_size_tag(t)?;
                super::builds::timeouts(t)?
            }
            None => {
                let have = self.store.tags(&image_arn(account, &name)).await?;
                super::builds::timeouts(have.iter().map(|(k, v)| (k, v)))?
            }
        };
        for k in ["name", "imageIdentifier", "clientToken", "tags"] {
            spec.remove(k);
        }
        // Quotas (images, versions, builds queued or running, snapshot disk) and the host's
        // disk, held until the version is recorded.
        let _admitted = self.admit_version(account, !update, &Value::Object(spec.clone())).await?;
        let versions = self.store.versions(account, &name).await?;
        let version = versions.last().map_or(1, |v| v.version + 1);
        let t = now();
        let rec = VersionRecord {
            account: account.into(),
            name: name.clone(),
            version,
            state: VersionState::Pending,
            status: VersionStatus::Active,
            build_id: format!("build-{}", random_hex(8)),
            spec: Value::Object(spec),
            state_reason: None,
            created_at: t,
            updated_at: None,
            snapshot_bytes: None,
            code_bytes: None,
            config: None,
        };
        if update {
            image.updated_at = Some(t);
            self.image_transition(&mut image, MicrovmImageState::Updating).await?;
        } else {
            self.store.put_image(&image).await?;
        }
        self.store.put_version(&rec).await?;
        if let Some(tags) = tags {
            let pairs: Vec<(String, String)> = tags.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            self.store.tag(&image_arn(account, &name), &pairs).await?;
        }
        self.start_build(image.clone(), rec.clone(), *base_kind, update, timeouts);
        let mut out = self.version_json(&image, &rec).await;
        for (k, v) in self.image_json(&image).await?.as_object().into_iter().flatten() {
            out[k] = v.clone();
        }
        // The Create/UpdateMicrovmImageResponse shapes: no version status or reason, and
        // only a new image's answer has its tags.
        if let Some(o) = out.as_object_mut() {
            o.remove("status");
            o.remove("stateReason");
            if update {
                o.remove("tags");
            }
        }
        Ok(out)
    }

    /// GetMicrovmImage.
    pub async fn get_image(&self, account: &str, input: &GetMicrovmImageInput) -> Result<Value, ApiError> {
        let image = self.image(account, &input.image_identifier).await?;
        let mut out = self.image_json(&image).await?;
        let tags = self.store.tags(&image_arn(account, &image.name)).await?;
        if !tags.is_empty() {
            out["tags"] = Value::Object(tags.into_iter().map(|(k, v)| (k, Value::String(v))).collect());
        }
        Ok(out)
    }

    /// ListMicrovmImages.
    pub async fn list_images(&self, account: &str, input: &ListMicrovmImagesRequest) -> Result<Value, ApiError> {
        let filter = input.name_filter.as_deref().unwrap_or("");
        let mut all = Vec::new();
        for i in self.store.images(account).await?.iter().filter(|i| i.name.contains(filter)) {
            let mut summary = self.image_json(i).await?;
            // A MicrovmImageSummary has no updatedAt (GetMicrovmImage's output has).
            if let Some(o) = summary.as_object_mut() {
                o.remove("updatedAt");
            }
            all.push(summary);
        }
        page(all, input.max_results, input.next_token.as_deref())
    }

    /// DeleteMicrovmImage. Builds of the image that are queued or running are cancelled
    /// first (each ends FAILED, its builder stopped and its files removed).
    pub async fn delete_image(&self, account: &str, input: &DeleteMicrovmImageInput) -> Result<Value, ApiError> {
        let ident = input.image_identifier.as_str();
        let image = self.image(account, ident).await?;
        self.refuse_if_in_use(account, &image.name, None).await?;
        for v in self.store.versions(account, &image.name).await?.iter().filter(|v| v.state.is_building()) {
            self.cancel_build(account, &image.name, v.version).await;
        }
        // Still building: a build this daemon does not run (one a restart cut off, not yet
        // settled by the reconcile).
        if self.store.versions(account, &image.name).await?.iter().any(|v| v.state.is_building()) {
            return Err(ApiError::conflict("MicrovmImage", ident, "a build of this image is in progress"));
        }
        self.store.delete_image(account, &image.name).await?;
        let arn = image_arn(account, &image.name);
        let keys: Vec<String> = self.store.tags(&arn).await?.into_iter().map(|(k, _)| k).collect();
        self.store.untag(&arn, &keys).await?;
        let dir = self.state.join("images").join(account).join(&image.name);
        super::builds::blocking(move || std::fs::remove_dir_all(dir)).await.ok();
        self.drop_template_views(account, &image.name, None).await;
        Ok(json!({ "imageIdentifier": ident, "state": "DELETED" }))
    }

    pub(super) async fn refuse_if_in_use(&self, account: &str, name: &str, version: Option<u32>) -> Result<(), ApiError> {
        let users: Vec<String> = self
            .store
            .live_microvms()
            .await?
            .into_iter()
            .filter(|m| m.account == account && m.image_name == name && version.is_none_or(|v| v == m.image_version))
            .map(|m| m.microvm_id)
            .collect();
        if users.is_empty() {
            Ok(())
        } else {
            Err(ApiError::conflict("MicrovmImage", name, format!("microvms still use it: {}; terminate them first", users.join(", "))))
        }
    }

    /// GetMicrovmImageVersion.
    pub async fn get_version(&self, account: &str, input: &GetMicrovmImageVersionInput) -> Result<Value, ApiError> {
        let image = self.image(account, &input.image_identifier).await?;
        let v = self.version(account, &image.name, &input.image_version).await?;
        Ok(self.version_json(&image, &v).await)
    }

    /// ListMicrovmImageVersions.
    pub async fn list_versions(&self, account: &str, input: &ListMicrovmImageVersionsInput) -> Result<Value, ApiError> {
        let image = self.image(account, &input.image_identifier).await?;
        let mut all = Vec::new();
        for v in self.store.versions(account, &image.name).await? {
            all.push(self.version_json(&image, &v).await);
        }
        page(all, input.max_results, input.next_token.as_deref())
    }

    /// UpdateMicrovmImageVersion (ACTIVE / INACTIVE).
    pub async fn update_version(&self, account: &str, input: &UpdateMicrovmImageVersionRequest) -> Result<Value, ApiError> {
        let image = self.image(account, &input.image_identifier).await?;
        let mut v = self.version(account, &image.name, &input.image_version).await?;
        let status = input.status.as_str();
        v.status = status.parse().map_err(|_| ApiError::validation(format!("status {status:?} is not ACTIVE or INACTIVE")))?;
        v.updated_at = Some(now());
        self.store.put_version(&v).await?;
        Ok(self.version_json(&image, &v).await)
    }

    /// DeleteMicrovmImageVersion. A build of the version that is queued or running is
    /// cancelled first (it ends FAILED, its builder stopped and its files removed).
    pub async fn delete_version(&self, account: &str, input: &DeleteMicrovmImageVersionInput) -> Result<Value, ApiError> {
        let ident = input.image_identifier.as_str();
        let image = self.image(account, ident).await?;
        let mut v = self.version(account, &image.name, &input.image_version).await?;
        if v.state.is_building() && self.cancel_build(account, &image.name, v.version).await {
            v = self.version(account, &image.name, &input.image_version).await?;
        }
        v.state.check(&v.version.to_string(), VersionState::Deleted)?;
        self.refuse_if_in_use(account, &image.name, Some(v.version)).await?;
        self.store.delete_version(account, &image.name, v.version).await?;
        let dir = self.version_dir(account, &image.name, v.version);
        super::builds::blocking(move || std::fs::remove_dir_all(dir)).await.ok();
        self.drop_template_views(account, &image.name, Some(v.version)).await;
        Ok(json!({ "imageIdentifier": ident, "imageVersion": v.version.to_string(), "state": "DELETED" }))
    }

    /// ListManagedMicrovmImages.
    pub fn list_managed(&self, input: &ListManagedMicrovmImagesInput) -> Result<Value, ApiError> {
        let items = MANAGED.iter().map(|(n, b)| json!({ "imageArn": managed_arn(n), "createdAt": mtime(&b.path(&self.home)) })).collect();
        page(items, input.max_results, input.next_token.as_deref())
    }

    /// ListManagedMicrovmImageVersions.
    pub fn list_managed_versions(&self, input: &ListManagedMicrovmImageVersionsInput) -> Result<Value, ApiError> {
        let ident = input.image_identifier.as_str();
        let name = ident.rsplit(':').next().unwrap_or(ident);
        let (n, b) = MANAGED.iter().find(|(n, _)| *n == name).ok_or_else(|| ApiError::not_found("ManagedMicrovmImage", ident))?;
        // The architectures this host has the base for (set up).
        let supported: Vec<Value> = hearth_vmm::Arch::ALL
            .into_iter()
            .filter(|a| self.check_arch(*a, *b).is_ok())
            .map(|a| json!({ "architecture": super::arch::api_name(a) }))
            .collect();
        let items = vec![json!({
            "imageArn": managed_arn(n),
            "imageVersion": "1",
            // The model's ManagedMicrovmImageVersionStatus (AVAILABLE, DEPRECATED, RECALLED).
            "status": "AVAILABLE",
            "supportedCpuConfigurations": supported,
            "createdAt": mtime(&b.path(&self.home)),
        })];
        page(items, input.max_results, input.next_token.as_deref())
    }
}

pub(super) fn mtime(p: &std::path::Path) -> f64 {
    std::fs::metadata(p).and_then(|m| m.modified()).map_or(0.0, crate::clock::secs)
}
