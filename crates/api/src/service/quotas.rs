//! What the service admits: each account's quotas ([`crate::quota`]), the host's capacity
//! ([`crate::capacity`]) and each account's request rate ([`crate::ratelimit`]).
//!
//! A new microvm, a resume and a new image version are admitted under one lock
//! (`admission`), held until their record is written: what they take is counted from the
//! store, so two calls never both take the last unit and a refusal leaves nothing
//! behind.

use super::Service;
use crate::capacity::{Load, Shortfall};
use crate::error::ApiError;
use crate::lifecycle::{MicrovmImageVersionState, MicrovmState};
use crate::quota::{admit, Held, Quota};
use crate::store::MicrovmRecord;
use tokio::sync::MutexGuard;

/// The largest microvm the service runs (as Lambda MicroVMs: 32 GB, 16 vCPUs).
pub const MAX_MEMORY_MIB: u64 = 32 * 1024;

/// Why a reclaimed microvm was suspended (its `stateReason`).
const RECLAIMED: &str = "suspended by the host to make room for another microvm (the operator's --reclaim-idle); resume it when needed";

/// A resume admitted: the microvm counts as holding its VM while this lives.
pub(super) struct Resuming<'a> {
    svc: &'a Service,
    id: String,
}

impl Drop for Resuming<'_> {
    fn drop(&mut self) {
        self.svc.resuming.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

impl Service {
    /// Takes one call from `account`'s request bucket (its rate read again every few
    /// seconds, so the operator's changes apply to a running daemon).
    ///
    /// # Errors
    ///
    /// ThrottlingException with `Retry-After`.
    pub async fn throttle(&self, account: &str) -> Result<(), ApiError> {
        if self.limiter.stale(account) {
            let rate = self.store.account_settings(account).await?.rate_limit.unwrap_or(self.default_rate);
            self.limiter.set(account, rate);
        }
        self.limiter.check(account)
    }

    /// The most bytes one code artifact of `account` may have.
    ///
    /// # Errors
    ///
    /// The store's.
    pub async fn artifact_limit(&self, account: &str) -> Result<u64, ApiError> {
        Ok(crate::quota::limit(&self.store.account_settings(account).await?.quotas, Quota::ArtifactBytes))
    }

    /// The refusal of an artifact of (at least) `bytes` over `account`'s quota.
    pub async fn artifact_refusal(&self, account: &str, bytes: u64) -> ApiError {
        match self.store.account_settings(account).await {
            Ok(s) => admit(account, &s.quotas, &Held::new(), Quota::ArtifactBytes, bytes)
                .err()
                .unwrap_or_else(|| ApiError::internal("no refusal")),
            Err(e) => e.into(),
        }
    }

    /// What `account` holds, and what every account's VMs hold of the host. (The
    /// snapshot entry is in bytes here, of suspended microvms only: callers add the image
    /// versions' and round it to GiB.)
    async fn holdings(&self, account: &str) -> Result<(Held, Load), ApiError> {
        let mut held = Held::new();
        let mut load = Load::default();
        let resuming = self.resuming.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for m in self.store.live_microvms().await? {
            // A suspended microvm being resumed holds its VM already.
            let holds_vm = m.state != MicrovmState::Suspended || resuming.contains(&m.microvm_id);
            if holds_vm {
                load.add(m.memory_mib.into(), m.vcpus.into());
            }
            if m.account == account {
                *held.entry(Quota::Microvms).or_default() += 1;
                if holds_vm {
                    *held.entry(Quota::Vcpus).or_default() += u64::from(m.vcpus);
                    *held.entry(Quota::MemoryMib).or_default() += u64::from(m.memory_mib);
                } else {
                    *held.entry(Quota::SnapshotGib).or_default() +=
                        super::suspended_size(&self.microvm_dir(&m.microvm_id).join("suspended"));
                }
            }
        }
        // Pooled VMs hold theirs (the host's, no tenant's).
        let pooled = self.pools.load();
        load.memory_mib += pooled.memory_mib;
        load.vcpus += pooled.vcpus;
        // Builders hold a VM while they run; queued builds hold a place in the account's
        // builds.
        for v in self.store.unfinished_versions().await? {
            if v.state == MicrovmImageVersionState::InProgress {
                load.add(self.builder_memory(&v.spec), self.vm_template.vcpus.into());
            }
            if v.account == account {
                *held.entry(Quota::Builds).or_default() += 1;
            }
        }
        Ok((held, load))
    }

    /// What every VM holds of the host (microvms, builders, pools); `None` when the store
    /// cannot say.
    pub(super) async fn host_load(&self) -> Option<Load> {
        self.holdings("").await.ok().map(|(_, l)| l)
    }

    /// The host's capacity and what VMs hold of it, in Prometheus' text form.
    pub async fn capacity_metrics(&self) -> String {
        let load = self.holdings("").await.map(|(_, l)| l).unwrap_or_default();
        let c = &self.capacity;
        format!(
            "# HELP hearth_host_memory_mib Memory (MiB) microvms and builders may hold, and hold.\n# TYPE hearth_host_memory_mib gauge\n\
             hearth_host_memory_mib{{of=\"capacity\"}} {}\nhearth_host_memory_mib{{of=\"held\"}} {}\n\
             # HELP hearth_host_vcpus vCPUs microvms and builders may hold, and hold.\n# TYPE hearth_host_vcpus gauge\n\
             hearth_host_vcpus{{of=\"capacity\"}} {}\nhearth_host_vcpus{{of=\"held\"}} {}\n",
            c.memory_mib, load.memory_mib, c.vcpus, load.vcpus
        )
    }

    /// The builder VM's memory for a version `spec` (its `minimumMemoryInMiB`, or the
    /// default).
    pub(super) fn builder_memory(&self, spec: &serde_json::Value) -> u64 {
        spec.pointer("/resources/0/minimumMemoryInMiB")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(self.vm_template.memory_mib.into())
            .max(hearth_vmm::config::MIN_MEMORY_MIB.into())
    }

    /// Admits a new microvm of `memory_mib` and `vcpus` for `account`: its quotas, then the
    /// host's room (suspending idle microvms first when the operator allows). The guard is
    /// held until the new microvm's record is written.
    ///
    /// # Errors
    ///
    /// ServiceQuotaExceededException, InsufficientCapacityException.
    pub(super) async fn admit_microvm(
        &self,
        account: &str,
        memory_mib: u32,
        vcpus: u32,
        pooled: bool,
    ) -> Result<MutexGuard<'_, ()>, ApiError> {
        let guard = self.admission.lock().await;
        let settings = self.store.account_settings(account).await?;
        let (held, load) = self.holdings(account).await?;
        admit(account, &settings.quotas, &held, Quota::Microvms, 1)?;
        admit(account, &settings.quotas, &held, Quota::Vcpus, vcpus.into())?;
        admit(account, &settings.quotas, &held, Quota::MemoryMib, memory_mib.into())?;
        self.capacity.check_disk(&self.state, 0).map_err(|e| ApiError::capacity(e.message))?;
        if pooled {
            // Its VM is counted on the host already (as a pool's).
            return Ok(guard);
        }
        self.room(guard, account, load, memory_mib, vcpus)
            .await
            .map_err(|load| self.capacity.refusal(load, memory_mib.into(), vcpus.into()))
    }

    /// Admits the resume of `m` (suspended): its account's vCPU and memory quotas, and the
    /// host's room. ResumeMicrovm's model has neither a quota nor a capacity error: over a
    /// quota is a ConflictException (the account's other microvms are in the way), no room
    /// an InternalServerException with `Retry-After`.
    pub(super) async fn admit_resume(&self, m: &MicrovmRecord) -> Result<Resuming<'_>, ApiError> {
        let guard = self.admission.lock().await;
        let settings = self.store.account_settings(&m.account).await?;
        let (mut held, load) = self.holdings(&m.account).await?;
        // It is counted among the account's microvms already.
        held.entry(Quota::Microvms).and_modify(|n| *n = n.saturating_sub(1));
        for (q, n) in [(Quota::Vcpus, m.vcpus), (Quota::MemoryMib, m.memory_mib)] {
            admit(&m.account, &settings.quotas, &held, q, n.into())
                .map_err(|e| ApiError::conflict("Microvm", &m.microvm_id, format!("cannot resume: {}", e.message)))?;
        }
        let guard = self.room(guard, &m.account, load, m.memory_mib, m.vcpus).await.map_err(|load| {
            let e = self.capacity.refusal(load, m.memory_mib.into(), m.vcpus.into());
            ApiError::unavailable(e.message, 30)
        })?;
        // Counted as holding its VM from here until it does (or its resume fails), without
        // holding every other admission back for the length of a resume.
        self.resuming.lock().unwrap_or_else(|p| p.into_inner()).insert(m.microvm_id.clone());
        drop(guard);
        Ok(Resuming { svc: self, id: m.microvm_id.clone() })
    }

    /// Admits a new image version (and, with `new_image`, a new image) of `account` whose
    /// builder needs `spec`'s memory: its quotas on images, versions, builds and snapshot
    /// disk, and the host's disk reserve.
    pub(super) async fn admit_version(
        &self,
        account: &str,
        new_image: bool,
        spec: &serde_json::Value,
    ) -> Result<MutexGuard<'_, ()>, ApiError> {
        let memory = self.builder_memory(spec);
        if memory > MAX_MEMORY_MIB {
            return Err(ApiError::validation(format!(
                "resources[0].minimumMemoryInMiB {memory} is over the largest microvm, {MAX_MEMORY_MIB} MiB"
            )));
        }
        let guard = self.admission.lock().await;
        let settings = self.store.account_settings(account).await?;
        let (mut held, _) = self.holdings(account).await?;
        let images = self.store.images(account).await?;
        let mut versions = 0u64;
        let mut snapshots = held.get(&Quota::SnapshotGib).copied().unwrap_or(0);
        for i in &images {
            for v in self.store.versions(account, &i.name).await? {
                versions += 1;
                snapshots += v.snapshot_bytes.map_or(0, |(m, d)| m + d);
            }
        }
        held.insert(Quota::Images, images.len() as u64);
        held.insert(Quota::ImageVersions, versions);
        held.insert(Quota::SnapshotGib, snapshots >> 30);
        if new_image {
            admit(account, &settings.quotas, &held, Quota::Images, 1)?;
        }
        admit(account, &settings.quotas, &held, Quota::ImageVersions, 1)?;
        admit(account, &settings.quotas, &held, Quota::Builds, 1)?;
        // Its snapshot's size is known only once built: refused when the snapshots held
        // already fill the quota (held + 1 GiB over it).
        admit(account, &settings.quotas, &held, Quota::SnapshotGib, 1)?;
        self.capacity.check_disk(&self.state, memory << 20)?;
        Ok(guard)
    }

    /// Admits a suspend the tenant asked for: its snapshot disk quota.
    pub(super) async fn admit_suspend(&self, m: &MicrovmRecord) -> Result<(), ApiError> {
        let settings = self.store.account_settings(&m.account).await?;
        let (held, _) = self.holdings(&m.account).await?;
        let gib = held.get(&Quota::SnapshotGib).copied().unwrap_or(0) >> 30;
        let held = Held::from([(Quota::SnapshotGib, gib)]);
        admit(&m.account, &settings.quotas, &held, Quota::SnapshotGib, u64::from(m.memory_mib).div_ceil(1024))
            .map_err(|e| ApiError::conflict("Microvm", &m.microvm_id, format!("cannot suspend: {}", e.message)))
    }

    /// Room on the host for one more VM, holding `guard`: at once, or after suspending the
    /// longest-idle running microvms (any account's, idle at least the operator's
    /// `--reclaim-idle`) when the operator allows. The load it lacked room in
    /// otherwise.
    async fn room<'a>(
        &'a self,
        guard: MutexGuard<'a, ()>,
        account: &str,
        load: Load,
        memory_mib: u32,
        vcpus: u32,
    ) -> Result<MutexGuard<'a, ()>, Load> {
        let (memory, cpus) = (u64::from(memory_mib), u64::from(vcpus));
        let mut load = load;
        // Pooled VMs give way first, one at a time: they are spares.
        while self.capacity.shortfall(load, memory, cpus).is_some() && self.pools.evict(1) == 1 {
            load = self.host_load().await.unwrap_or(load);
        }
        let Some(short) = self.capacity.shortfall(load, memory, cpus) else { return Ok(guard) };
        let Some(min_idle) = self.capacity.reclaim_idle else { return Err(load) };
        let freed = self.reclaim(short, min_idle.as_secs_f64()).await;
        let (_, load) = self.holdings(account).await.map_err(|_| load)?;
        if freed == 0 || self.capacity.shortfall(load, memory, cpus).is_some() {
            return Err(load);
        }
        Ok(guard)
    }

    /// Suspends the longest-idle running microvms until `short` is covered; how many.
    async fn reclaim(&self, short: Shortfall, min_idle: f64) -> usize {
        let now = crate::clock::now();
        let Ok(live) = self.store.live_microvms().await else { return 0 };
        let mut idle: Vec<MicrovmRecord> =
            live.into_iter().filter(|m| m.state == MicrovmState::Running && now - m.last_activity >= min_idle).collect();
        idle.sort_by(|a, b| a.last_activity.total_cmp(&b.last_activity));
        let (mut memory, mut vcpus, mut n) = (0u64, 0u64, 0);
        for m in idle {
            if memory >= short.memory_mib && vcpus >= short.vcpus {
                break;
            }
            match self.suspend_microvm(&m.account, &m.microvm_id, Some(RECLAIMED)).await {
                Ok(_) => {
                    memory += u64::from(m.memory_mib) + crate::capacity::VM_OVERHEAD_MIB;
                    vcpus += u64::from(m.vcpus);
                    n += 1;
                    self.metrics.error("reclaimed");
                    tracing::info!(microvm = %m.microvm_id, account = %m.account, "suspended to make room");
                }
                Err(e) => tracing::warn!(microvm = %m.microvm_id, error = %e.message, "could not suspend to make room"),
            }
        }
        n
    }
}
