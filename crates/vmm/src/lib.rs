//! Hearth's VM driver: everything between "boot a VM" and a running QEMU with a ready agent.
//!
//! - [`config`]: what a VM is made of, validated before anything starts.
//! - [`accel`]: KVM or TCG; `auto` *measures* KVM with a tiny guest instead of trusting
//!   that `/dev/kvm` exists.
//! - [`assets`]: the guest kernel (Debian's cloud kernel, fetched with `apt-get download`)
//!   and the initramfs Hearth builds around its agent.
//! - [`qemu`]: the QEMU command line and the process guard that kills it on every path.
//! - [`qmp`]: a small QMP client.
//! - [`agent`]: the HTTP/2 client of the in-guest agent, bounding all it reads.
//! - [`vm`]: [`vm::Vm`], which ties these together: boot, exec, files, shutdown.

#![deny(missing_docs)]

pub mod accel;
pub mod agent;
pub mod assets;
pub mod config;
pub mod home;
pub mod qemu;
pub mod qmp;
pub mod vm;

pub use accel::Accel;
pub use agent::{AgentClient, AgentError};
pub use config::{ConfigError, Disk, DiskFormat, VmConfig};
pub use vm::{BootError, Vm, VmError};
