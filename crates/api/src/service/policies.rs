//! The lifetime and idle policies: one pass over every live microvm, run periodically by
//! the daemon.

use super::Service;
use crate::clock::now;
use crate::lifecycle::MicrovmState;
use std::sync::Arc;

impl Service {
    /// One pass of the lifetime and idle policies over every live microvm.
    pub async fn enforce_policies(&self) {
        self.retire_pools().await;
        let Ok(live) = self.store.live_microvms().await else { return };
        let t = now();
        for m in live {
            let (acct, id) = (m.account.clone(), m.microvm_id.clone());
            if t - m.started_at >= m.maximum_duration_in_seconds as f64 {
                let _ = self.terminate_microvm(&acct, &id, Some("maximumDurationInSeconds reached")).await;
                continue;
            }
            let policy = m.spec.get("idlePolicy");
            let idle_max = policy.and_then(|p| p["maxIdleDurationSeconds"].as_u64());
            let suspended_max = policy.and_then(|p| p["suspendedDurationSeconds"].as_u64());
            match m.state {
                MicrovmState::Running => {
                    let Some(idle_max) = idle_max else { continue };
                    if self.guest_active(&acct, &id).await {
                        continue;
                    }
                    let last = self.store.microvm(&acct, &id).await.ok().flatten().map_or(m.last_activity, |r| r.last_activity);
                    if t - last >= idle_max as f64 {
                        if suspended_max == Some(0) {
                            let _ = self
                                .terminate_microvm(&acct, &id, Some("idle for maxIdleDurationSeconds (suspendedDurationSeconds is 0)"))
                                .await;
                        } else if let Err(e) =
                            self.suspend_microvm(&acct, &id, Some("suspended after maxIdleDurationSeconds without activity")).await
                        {
                            tracing::warn!(microvm = %id, error = %e, "idle suspend failed");
                        }
                    }
                }
                MicrovmState::Suspended => {
                    if let (Some(max), Some(since)) = (suspended_max, m.suspended_at) {
                        if t - since >= max as f64 {
                            let _ = self.terminate_microvm(&acct, &id, Some("suspended for suspendedDurationSeconds")).await;
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Guest work since the last look: running API execs, or QEMU using more than 5 % of a
    /// core (an idle guest costs ~1 %). Counts as activity (and records it).
    pub(super) async fn guest_active(&self, account: &str, id: &str) -> bool {
        let slot = self.slot(id);
        let Ok(mut guard) = slot.try_lock() else { return true };
        if guard.vm.as_ref().is_some_and(|v| Arc::strong_count(v) > 1) {
            // Execs in flight.
            return true;
        }
        let Some(pid) = guard.vm.as_ref().map(|v| v.pid()) else { return false };
        let Some(ticks) = cpu_ticks(pid) else { return false };
        let t = now();
        let active = match guard.cpu {
            Some((prev, at)) if t > at => (ticks.saturating_sub(prev) as f64 / clock_ticks()) / (t - at) > 0.05,
            // No earlier sample (just started or resumed): not known to be idle.
            _ => true,
        };
        guard.cpu = Some((ticks, t));
        drop(guard);
        if active {
            let _ = self.store.touch(id, t).await;
        }
        let _ = account;
        active
    }
}

pub(super) fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

pub(super) fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}
