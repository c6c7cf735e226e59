//! A VM's I/O limits: disk throughput and operations, and network bandwidth.
//!
//! The disk limits are QEMU's block throttling on the root drive (`throttling.bps-total`,
//! `throttling.iops-total` on `-drive`): reads and writes together, a token bucket QEMU
//! keeps per drive (bursts of a tenth of a second's worth, QEMU's default). They are part
//! of the command line, so every start of the VM (boot, template clone, fork, resume) gets
//! them from its [`crate::VmConfig`] or [`crate::RestoreOptions`]: a migration stream does
//! not carry them.
//!
//! The network limit is a token bucket filter (`tc qdisc … tbf`) on both devices of the
//! VM's namespace that carry its traffic out: `tap0`'s egress shapes what reaches the guest,
//! `uplink`'s egress what the guest sends out (forwarded from `tap0`); shaping beats
//! policing ingress, since TCP backs off from queueing delay instead of losing packets.
//! Qdiscs live with the devices, so a VM the daemon reattaches keeps them.
//!
//! Defaults come from the operator ([`set_default`], `hearth serve --disk-bps --disk-iops
//! --net-rate`); zero means unlimited.

use serde::{Deserialize, Serialize};
use std::sync::RwLock;

/// Largest disk limit QEMU accepts (`THROTTLE_VALUE_MAX`).
pub const MAX_DISK_LIMIT: u64 = 1_000_000_000_000_000;
/// Largest network rate, in Mbit/s (1 Tbit/s).
pub const MAX_NET_MBIT: u32 = 1_000_000;

/// A VM's I/O limits; 0 means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoLimits {
    /// Root disk bytes per second, reads and writes together.
    #[serde(default)]
    pub disk_bps: u64,
    /// Root disk operations per second, reads and writes together.
    #[serde(default)]
    pub disk_iops: u64,
    /// Network rate in Mbit/s, each way.
    #[serde(default)]
    pub net_mbit: u32,
}

/// A limit out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// A disk limit QEMU would refuse.
    #[error("disk limits must be at most {MAX_DISK_LIMIT} (0: unlimited), got {0}")]
    Disk(u64),
    /// A network rate over the ceiling.
    #[error("the network rate must be at most {MAX_NET_MBIT} Mbit/s (0: unlimited), got {0}")]
    Net(u32),
}

static DEFAULT: RwLock<IoLimits> = RwLock::new(IoLimits { disk_bps: 0, disk_iops: 0, net_mbit: 0 });

/// Sets the process's default limits: what [`crate::VmConfig::new`] and
/// [`crate::RestoreOptions::new`] start from. Before VMs are started.
pub fn set_default(limits: IoLimits) {
    *DEFAULT.write().unwrap_or_else(|p| p.into_inner()) = limits;
}

/// The process's default limits ([`set_default`]; unlimited unless set).
pub fn default_limits() -> IoLimits {
    *DEFAULT.read().unwrap_or_else(|p| p.into_inner())
}

impl IoLimits {
    /// No limits.
    pub const UNLIMITED: IoLimits = IoLimits { disk_bps: 0, disk_iops: 0, net_mbit: 0 };

    /// Checks every value is one QEMU and tc accept.
    ///
    /// # Errors
    ///
    /// [`LimitError`] naming the value.
    pub fn validate(&self) -> Result<(), LimitError> {
        for v in [self.disk_bps, self.disk_iops] {
            if v > MAX_DISK_LIMIT {
                return Err(LimitError::Disk(v));
            }
        }
        if self.net_mbit > MAX_NET_MBIT {
            return Err(LimitError::Net(self.net_mbit));
        }
        Ok(())
    }

    /// The throttling options to append to a `-drive` option list (empty when unlimited).
    pub fn drive_options(&self) -> String {
        let mut o = String::new();
        if self.disk_bps > 0 {
            o.push_str(&format!(",throttling.bps-total={}", self.disk_bps));
        }
        if self.disk_iops > 0 {
            o.push_str(&format!(",throttling.iops-total={}", self.disk_iops));
        }
        o
    }

    /// The `tc -batch` lines that shape both directions of a VM's namespace to
    /// [`IoLimits::net_mbit`] (`None` when unlimited). The bucket holds 20 ms at the rate,
    /// at least 64 KiB (a GSO packet; the kernel splits larger ones); packets wait at most
    /// 50 ms in the queue, then drop, so TCP sees the rate instead of a growing delay.
    pub fn tc_batch(&self) -> Option<String> {
        if self.net_mbit == 0 {
            return None;
        }
        let rate = self.net_mbit;
        let burst = (u64::from(rate) * 1_000_000 / 8 / 50).max(64 << 10);
        Some(
            ["tap0", "uplink"]
                .iter()
                .map(|dev| format!("qdisc replace dev {dev} root tbf rate {rate}mbit burst {burst} latency 50ms\n"))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_become_drive_options_and_tc_lines() {
        assert_eq!(IoLimits::UNLIMITED.drive_options(), "");
        assert_eq!(IoLimits::UNLIMITED.tc_batch(), None);
        let l = IoLimits { disk_bps: 1 << 20, disk_iops: 100, net_mbit: 80 };
        assert_eq!(l.drive_options(), ",throttling.bps-total=1048576,throttling.iops-total=100");
        let tc = l.tc_batch().unwrap();
        assert!(tc.contains("dev tap0 root tbf rate 80mbit burst 200000 "), "{tc}");
        assert!(tc.contains("dev uplink root tbf rate 80mbit"), "{tc}");
        // A low rate still holds a whole GSO packet.
        assert!(IoLimits { net_mbit: 1, ..IoLimits::UNLIMITED }.tc_batch().unwrap().contains("burst 65536 "));
        l.validate().unwrap();
        assert_eq!(IoLimits { disk_iops: MAX_DISK_LIMIT + 1, ..l }.validate(), Err(LimitError::Disk(MAX_DISK_LIMIT + 1)));
        assert_eq!(IoLimits { net_mbit: MAX_NET_MBIT + 1, ..l }.validate(), Err(LimitError::Net(MAX_NET_MBIT + 1)));
    }
}
