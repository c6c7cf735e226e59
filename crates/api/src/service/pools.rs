//! Warm pools behind RunMicrovm: per image version, clones already restored, warmed and
//! paused (`hearth_vmm::pool::warm`), each under the microvm id it will have. RunMicrovm
//! takes one when it can and wakes it (`hearth_vmm::pool::wake`: vCPUs, clock, entropy),
//! then sets the run's egress and calls its hooks as for a fresh launch; the microvm is
//! recorded, metered and reported exactly as one.
//!
//! - **Size**: the operator's default (`hearth serve --pool-size`, 1), or the image's tag
//!   `hearth:pool-size` (0-16; 0 disables). A pool is made for a version the first time it
//!   is run, and retired (its VMs killed) once that version is no longer the image's
//!   newest runnable one, or the image is gone.
//! - **CPU budget**: one VM is warmed at a time across all pools, and after each the
//!   refill rests so that warming takes at most `--pool-cpu-budget` of one core on
//!   average (0.25 by default): refills never starve running microvms.
//! - **Host capacity**: pooled and warming VMs count against the host (not a tenant's
//!   quota); a pool refills only where the host has room for it and one more run, and a
//!   run that finds no room evicts pooled VMs before it refuses or reclaims.
//! - Pooled VMs are detached like every microvm's QEMU; a daemon that dies leaves them to
//!   the next start, which kills them (no record owns them).

use super::Service;
use crate::capacity::Load;
use hearth_vmm::{pool, Snapshot, Vm};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The tag that sets an image's pool size.
pub const POOL_SIZE_TAG: &str = "hearth:pool-size";

/// The largest pool per image version.
pub const MAX_POOL_SIZE: usize = 16;

/// The operator's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoolSettings {
    /// VMs per image version, unless the image's tag says otherwise (0: no pools).
    pub default_size: usize,
    /// The share of one core refills may take on average (0-1].
    pub cpu_budget: f64,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings { default_size: 1, cpu_budget: 0.25 }
    }
}

/// An image version: (account, image name, version).
pub type Key = (String, String, u32);

/// One pooled VM.
pub(super) struct Warm {
    /// The microvm id it runs under (its QEMU's name and `vm.json`'s).
    pub id: String,
    pub vm: Vm,
}

struct VersionPool {
    size: usize,
    memory_mib: u64,
    vcpus: u64,
    ready: Mutex<VecDeque<Warm>>,
    wake: Arc<tokio::sync::Notify>,
    refill: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for VersionPool {
    fn drop(&mut self) {
        if let Some(t) = self.refill.lock().unwrap_or_else(|p| p.into_inner()).take() {
            t.abort();
        }
        // The pooled VMs are killed as they drop with the queue.
    }
}

/// Every pool of the daemon.
#[derive(Default)]
pub struct Pools {
    pub(super) settings: PoolSettings,
    pools: Mutex<HashMap<Key, Arc<VersionPool>>>,
    /// Held while a VM is warmed: one at a time, all pools together.
    turn: tokio::sync::Mutex<()>,
    /// What the VM being warmed holds of the host.
    warming: Mutex<Load>,
    claims: AtomicU64,
    misses: AtomicU64,
}

impl Pools {
    /// Pools under `settings`.
    pub fn new(settings: PoolSettings) -> Pools {
        Pools { settings, ..Default::default() }
    }

    fn get(&self, key: &Key) -> Option<Arc<VersionPool>> {
        self.pools.lock().unwrap_or_else(|p| p.into_inner()).get(key).cloned()
    }

    /// A pooled VM of `key`, when one is ready.
    pub(super) fn take(&self, key: &Key) -> Option<Warm> {
        let pool = self.get(key);
        let w = pool.as_ref().and_then(|p| p.ready.lock().unwrap_or_else(|p| p.into_inner()).pop_front());
        if let Some(p) = &pool {
            p.wake.notify_one();
        }
        match &w {
            Some(_) => self.claims.fetch_add(1, Ordering::Relaxed),
            None => self.misses.fetch_add(1, Ordering::Relaxed),
        };
        w
    }

    /// Gives back a VM [`Pools::take`] gave (its run was refused before it was used).
    pub(super) fn put_back(&self, key: &Key, w: Warm) {
        match self.get(key) {
            Some(p) => p.ready.lock().unwrap_or_else(|p| p.into_inner()).push_front(w),
            None => drop(w),
        }
    }

    /// What pooled and warming VMs hold of the host.
    pub(super) fn load(&self) -> Load {
        let mut load = *self.warming.lock().unwrap_or_else(|p| p.into_inner());
        for p in self.pools.lock().unwrap_or_else(|p| p.into_inner()).values() {
            for _ in 0..p.ready.lock().unwrap_or_else(|p| p.into_inner()).len() {
                load.add(p.memory_mib, p.vcpus);
            }
        }
        load
    }

    /// Kills up to `n` pooled VMs (any pool's) to give their room to a run; how many.
    pub(super) fn evict(&self, n: usize) -> usize {
        let mut killed = 0;
        for p in self.pools.lock().unwrap_or_else(|p| p.into_inner()).values() {
            while killed < n {
                let Some(w) = p.ready.lock().unwrap_or_else(|p| p.into_inner()).pop_back() else { break };
                drop(w);
                killed += 1;
            }
        }
        killed
    }

    /// Retires the pools `keep` refuses (their VMs are killed); how many.
    pub(super) fn retire(&self, keep: impl Fn(&Key) -> bool) -> usize {
        let mut all = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        let before = all.len();
        all.retain(|k, _| keep(k));
        before - all.len()
    }

    /// Every pool's key.
    pub(super) fn keys(&self) -> Vec<Key> {
        self.pools.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect()
    }

    /// Kills every pooled VM (the daemon is stopping).
    pub fn clear(&self) {
        self.pools.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Prometheus text: VMs ready per pool, claims served from a pool and runs that found
    /// none.
    pub fn render(&self) -> String {
        let mut o = String::from("# HELP hearth_pool_ready Pooled VMs ready to claim.\n# TYPE hearth_pool_ready gauge\n");
        let mut pools: Vec<(Key, usize, usize)> = self
            .pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, p)| (k.clone(), p.ready.lock().unwrap_or_else(|p| p.into_inner()).len(), p.size))
            .collect();
        pools.sort();
        for ((account, image, version), ready, _) in &pools {
            o.push_str(&format!("hearth_pool_ready{{account=\"{account}\",image=\"{image}\",version=\"{version}\"}} {ready}\n"));
        }
        o.push_str("# HELP hearth_pool_size Pooled VMs wanted.\n# TYPE hearth_pool_size gauge\n");
        for ((account, image, version), _, size) in &pools {
            o.push_str(&format!("hearth_pool_size{{account=\"{account}\",image=\"{image}\",version=\"{version}\"}} {size}\n"));
        }
        o.push_str(&format!(
            "# HELP hearth_pool_claims_total Runs served from a pool.\n# TYPE hearth_pool_claims_total counter\nhearth_pool_claims_total {}\n\
             # HELP hearth_pool_misses_total Runs that found no pooled VM.\n# TYPE hearth_pool_misses_total counter\nhearth_pool_misses_total {}\n",
            self.claims.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed)
        ));
        o
    }
}

/// Refuses a `hearth:pool-size` tag that is not a whole number from 0 to
/// [`MAX_POOL_SIZE`].
///
/// # Errors
///
/// ValidationException naming the tag.
pub(super) fn check_size_tag<'a>(tags: impl IntoIterator<Item = (&'a String, &'a String)>) -> Result<(), crate::error::ApiError> {
    for (k, v) in tags {
        if k == POOL_SIZE_TAG && v.parse::<usize>().map_or(true, |n| n > MAX_POOL_SIZE) {
            return Err(crate::error::ApiError::validation(format!(
                "tag {POOL_SIZE_TAG} {v:?}: give the number of warm VMs to keep for this image, 0 (none) to {MAX_POOL_SIZE}"
            )));
        }
    }
    Ok(())
}

impl Service {
    /// The pool size of image `name` of `account`: its `hearth:pool-size` tag, else the
    /// operator's default.
    async fn pool_size(&self, account: &str, name: &str) -> usize {
        let tags = self.store.tags(&super::image_arn(account, name)).await.unwrap_or_default();
        tags.iter()
            .find(|(k, _)| k == POOL_SIZE_TAG)
            .and_then(|(_, v)| v.parse::<usize>().ok())
            .map_or(self.pools.settings.default_size, |n| n.min(MAX_POOL_SIZE))
    }

    /// Makes sure version `key` has its pool (after a run of it): created and filling in
    /// the background, unless its size is 0. Older versions' pools of the image retire at
    /// the next policy pass.
    pub(super) async fn ensure_pool(&self, key: &Key, snap: &Snapshot) {
        if self.pools.get(key).is_some() {
            return;
        }
        let size = self.pool_size(&key.0, &key.1).await;
        if size == 0 {
            return;
        }
        let Some(me) = self.me.upgrade() else { return };
        let pool = Arc::new(VersionPool {
            size,
            memory_mib: snap.manifest.memory_mib.into(),
            vcpus: snap.manifest.vcpus.into(),
            ready: Mutex::new(VecDeque::new()),
            wake: Arc::new(tokio::sync::Notify::new()),
            refill: Mutex::new(None),
        });
        {
            let mut all = self.pools.pools.lock().unwrap_or_else(|p| p.into_inner());
            if all.contains_key(key) {
                return;
            }
            all.insert(key.clone(), pool.clone());
        }
        let task = tokio::spawn(refill(Arc::downgrade(&me), Arc::downgrade(&pool), snap.clone()));
        *pool.refill.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        tracing::info!(account = %key.0, image = %key.1, version = key.2, size, "warm pool created");
    }

    /// Retires pools whose version is no longer its image's newest runnable one (or whose
    /// image is gone, or whose size is now 0): run by the policy pass.
    pub(super) async fn retire_pools(&self) {
        for key in self.pools.keys() {
            let versions = self.store.versions(&key.0, &key.1).await.unwrap_or_default();
            let newest = versions.iter().rev().find(|v| v.runnable()).map(|v| v.version);
            if newest != Some(key.2) || self.pool_size(&key.0, &key.1).await == 0 {
                self.pools.retire(|k| *k != key);
                tracing::info!(account = %key.0, image = %key.1, version = key.2, "warm pool retired");
            }
        }
    }

    /// How a pooled VM starts: under the microvm id it will have, detached as every
    /// microvm, with its NIC closed until a run claims it and sets the run's egress.
    pub(super) fn pool_options(&self, id: &str, has_nic: bool) -> hearth_vmm::RestoreOptions {
        hearth_vmm::RestoreOptions {
            run_root: self.vm_template.run_root.clone(),
            timeout: Duration::from_secs(120),
            hostname: None,
            egress: has_nic.then(hearth_vmm::net::Egress::none),
            detached: true,
            name: Some(id.to_owned()),
            jail: self.vm_template.jail.clone(),
            limits: self.vm_template.limits,
        }
    }

    /// A pooled VM woken as the run `m` needs it: running, with the run's egress. The VM
    /// is killed when it cannot be.
    pub(super) async fn claim_pooled(&self, w: Warm, m: &crate::store::MicrovmRecord, has_nic: bool) -> Result<Vm, String> {
        let vm = w.vm;
        let woken = async {
            pool::wake(&vm).await.map_err(|e| e.to_string())?;
            if let Some(egress) = self.restore_options(m, has_nic).egress {
                vm.set_egress(&egress).map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        };
        match woken.await {
            Ok(()) => Ok(vm),
            Err(e) => {
                vm.kill().await;
                Err(e)
            }
        }
    }
}

/// Keeps one pool full while it and the service live: one VM at a time, within the CPU
/// budget and the host's room.
async fn refill(svc: std::sync::Weak<Service>, pool: std::sync::Weak<VersionPool>, snap: Snapshot) {
    loop {
        let (Some(s), Some(p)) = (svc.upgrade(), pool.upgrade()) else { return };
        if p.ready.lock().unwrap_or_else(|p| p.into_inner()).len() >= p.size {
            let wake = p.wake.clone();
            drop((s, p));
            // Checked again now and then: a claim may have been missed between the two.
            let _ = tokio::time::timeout(Duration::from_secs(5), wake.notified()).await;
            continue;
        }
        let turn = s.pools.turn.lock().await;
        // Room on the host, counted with everything else under the admission lock, with
        // room for one more run besides: a spare never takes a host's last place.
        let room = {
            let _admission = s.admission.lock().await;
            let with_spare = s.host_load().await.map(|mut load| {
                load.add(p.memory_mib, p.vcpus);
                load
            });
            match with_spare {
                Some(load) if s.capacity.shortfall(load, p.memory_mib, p.vcpus).is_none() => {
                    s.pools.warming.lock().unwrap_or_else(|p| p.into_inner()).add(p.memory_mib, p.vcpus);
                    true
                }
                _ => false,
            }
        };
        if !room {
            drop(turn);
            drop((s, p));
            tokio::time::sleep(Duration::from_secs(2)).await;
            continue;
        }
        let id = format!("mvm-{}", crate::keys::random_hex(8));
        let opts = s.pool_options(&id, snap.manifest.network.is_some());
        let started = std::time::Instant::now();
        let warmed = pool::warm(&snap, &opts).await;
        let spent = started.elapsed();
        *s.pools.warming.lock().unwrap_or_else(|p| p.into_inner()) = Load::default();
        match warmed {
            Ok(vm) => p.ready.lock().unwrap_or_else(|p| p.into_inner()).push_back(Warm { id, vm }),
            Err(e) => {
                tracing::warn!(error = %e, "warming a pooled VM failed");
                s.metrics.error("pool-warm");
            }
        }
        let budget = s.pools.settings.cpu_budget.clamp(0.01, 1.0);
        drop(turn);
        drop((s, p));
        tokio::time::sleep(spent.mul_f64(1.0 / budget - 1.0).max(Duration::from_millis(50))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_size_tags_are_whole_numbers_up_to_the_cap() {
        let tag = |v: &str| std::collections::BTreeMap::from([(POOL_SIZE_TAG.to_owned(), v.to_owned())]);
        for ok in ["0", "1", "16"] {
            assert!(check_size_tag(&tag(ok)).is_ok(), "{ok}");
        }
        for bad in ["17", "-1", "one", "", "1.5"] {
            let e = check_size_tag(&tag(bad)).unwrap_err();
            assert_eq!(e.status(), 400);
            assert!(e.message.contains("hearth:pool-size"), "{}", e.message);
        }
        let other = std::collections::BTreeMap::from([("team".to_owned(), "x".to_owned())]);
        assert!(check_size_tag(&other).is_ok());
    }

    #[test]
    fn empty_pools_hold_nothing_and_say_so() {
        let p = Pools::new(PoolSettings::default());
        assert_eq!(p.load(), Load::default());
        assert!(p.take(&("123456789012".into(), "web".into(), 1)).is_none());
        assert_eq!(p.evict(3), 0);
        let text = p.render();
        assert!(text.contains("hearth_pool_claims_total 0") && text.contains("hearth_pool_misses_total 1"), "{text}");
    }
}
