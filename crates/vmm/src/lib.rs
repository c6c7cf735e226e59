//! Hearth's VM driver: everything between "boot a VM" and a running QEMU with a ready agent.
//!
//! - [`config`]: what a VM is made of, validated before anything starts; [`arch`]: what
//!   differs between x86-64 and ARM64 guests.
//! - [`accel`]: KVM or TCG; `auto` *measures* KVM with a tiny guest instead of trusting
//!   that `/dev/kvm` exists.
//! - [`assets`]: the guest kernel (Debian's cloud kernel, fetched with `apt-get download`)
//!   and the initramfs Hearth builds around its agent.
//! - [`qemu`]: the QEMU command line and the process guard that kills it on every path.
//! - [`qmp`]: a small QMP client.
//! - [`agent`]: the HTTP/2 client of the in-guest agent, bounding all it reads.
//! - [`net`]: a network namespace per VM (tap, uplink, NAT, nftables egress policy).
//! - [`vm`]: [`vm::Vm`], which ties these together: boot, exec, files, shutdown. A `Vm`
//!   holds its record (`record`, the versioned `vm.json`) and its run directory
//!   (`rundir`); `migration` saves and loads its state through QMP.
//! - [`snapshot`]: the on-disk snapshot format; `capture` (template snapshots, suspends,
//!   forks), [`restore`] (launch, resume, fork copies) and `detach` (release, reattach)
//!   are `Vm` methods. [`exit`] tells how a VM's QEMU ended (a watch on its exit, the
//!   signal or code and the console's last lines).
//!
//! Modules depend on each other one way, from the operations down to the parts:
//!
//! ```text
//! pool → restore, capture, detach → vm → migration, record, rundir, agent, console, net …
//!                                          rundir → record → qemu → config → net → identity
//!                                          migration → qmp
//! ```
//!
//! `vm` never uses the operations built on it: what they share with it (the migration
//! steps, the record, ids and fresh identity) lives in modules below both.

#![deny(missing_docs)]

pub mod accel;
pub mod agent;
pub mod arch;
pub mod assets;
mod capture;
pub mod config;
mod console;
pub mod crash;
mod detach;
pub mod exit;
pub mod home;
mod identity;
pub mod jail;
pub mod limits;
mod migration;
pub mod net;
pub mod pool;
pub mod qemu;
pub mod qmp;
pub mod ramdiff;
mod record;
pub mod recover;
pub mod restore;
mod rundir;
pub mod snapshot;
mod space;
pub mod vm;

pub use accel::Accel;
pub use agent::{AgentClient, AgentError};
pub use arch::Arch;
pub use config::{ConfigError, Disk, DiskFormat, Memory, Start, VmConfig};
pub use exit::{ExitReport, ExitWatch, QemuExit};
pub use limits::IoLimits;
pub use restore::RestoreOptions;
pub use snapshot::{Snapshot, SnapshotError, SnapshotKind};
pub use vm::{BootError, Vm, VmError};
