//! Guest architectures in the API: an image version's `cpuConfigurations`
//! (`[{"architecture": "ARM_64" | "X86_64"}]`) chooses what its builder VM, and so every
//! microvm run from it, emulates or runs. The choice is recorded in the version's spec
//! (a request naming none gets the daemon's default written in), the snapshot's manifest
//! carries it, and RunMicrovm, pools and resumes follow the manifest.
//!
//! The default is the host's architecture (`hearth serve --default-architecture` changes
//! it): it is the one KVM runs at native speed, and under TCG an ARM64 guest on an x86-64
//! host costs more than an x86-64 one (docs/BENCHMARKS.md). Clients written for the
//! service, which runs ARM_64 only, name it or set the daemon's default.

use super::Service;
use crate::error::ApiError;
use hearth_image::base::Base;
use hearth_vmm::{Accel, Arch, VmConfig};
use serde_json::{json, Value};

/// The model's `Architecture` for `a`.
pub fn api_name(a: Arch) -> &'static str {
    match a {
        Arch::X86_64 => "X86_64",
        Arch::Aarch64 => "ARM_64",
    }
}

/// The model's `Chipset` and a chipset generation for `a`.
pub(super) fn chipset(a: Arch) -> (&'static str, &'static str) {
    match a {
        Arch::X86_64 => ("INTEL", "x86-64"),
        Arch::Aarch64 => ("GRAVITON", "arm64"),
    }
}

/// The architecture a request's (or a recorded version's) `cpuConfigurations` names;
/// `default` when it names none.
///
/// # Errors
///
/// A ValidationException when it names an unknown architecture or more than one (an image
/// version is one snapshot, of one architecture).
pub(super) fn requested(spec: &Value, default: Arch) -> Result<Arch, ApiError> {
    let list = match spec.get("cpuConfigurations") {
        None | Some(Value::Null) => return Ok(default),
        Some(Value::Array(l)) => l,
        Some(_) => return Err(ApiError::validation("cpuConfigurations must be a list of {\"architecture\": ARM_64 | X86_64}")),
    };
    let mut found: Vec<Arch> = Vec::new();
    for c in list {
        let name = c.get("architecture").and_then(Value::as_str).unwrap_or_default();
        let a = match name {
            "X86_64" => Arch::X86_64,
            "ARM_64" => Arch::Aarch64,
            _ => return Err(ApiError::validation(format!("cpuConfigurations: architecture {name:?} is not ARM_64 or X86_64"))),
        };
        if !found.contains(&a) {
            found.push(a);
        }
    }
    match found.as_slice() {
        [] => Ok(default),
        [a] => Ok(*a),
        _ => Err(ApiError::validation(
            "cpuConfigurations names both ARM_64 and X86_64; a Hearth image version is built for one architecture (create one image per architecture)",
        )),
    }
}

/// The `cpuConfigurations` that records `a`.
pub(super) fn configurations(a: Arch) -> Value {
    json!([{ "architecture": api_name(a) }])
}

impl Service {
    /// Checks that this host has what `arch` guests on `base` need (kernel, agent, base
    /// image), so a version that cannot build is refused with the set-up to run rather
    /// than recorded to fail.
    ///
    /// # Errors
    ///
    /// A ValidationException naming the missing set-up.
    pub(super) fn check_arch(&self, arch: Arch, base: Base) -> Result<(), ApiError> {
        let setup = if arch == Arch::host() { "`hearth setup`".to_owned() } else { format!("`hearth setup --arch {arch}`") };
        let missing = |what: String| {
            ApiError::validation(format!("{} microvms cannot be built on this host: {what}; the operator runs {setup}", api_name(arch)))
        };
        if arch == Arch::host() {
            // The daemon started with this architecture's files, and a base that is
            // missing is built on first use or fails the build, naming it.
            return Ok(());
        }
        hearth_vmm::assets::boot_files_for(&self.home, arch).map_err(|e| missing(e.to_string()))?;
        let path = hearth_image::base_arm64::path_for(base, arch, &self.home).map_err(|e| missing(e.to_string()))?;
        if !path.is_file() {
            return Err(missing(format!("its {base:?} base image is not built")));
        }
        Ok(())
    }

    /// The configuration of a builder VM for `arch` guests: the daemon's template, with
    /// that architecture's kernel, initramfs and QEMU.
    pub(super) fn vm_for(&self, arch: Arch) -> Result<VmConfig, String> {
        let mut vm = self.vm_template.clone();
        if arch == vm.arch {
            return Ok(vm);
        }
        let (kernel, initramfs) = hearth_vmm::assets::boot_files_for(&self.home, arch).map_err(|e| e.to_string())?;
        let accel = if arch == Arch::host() { vm.accel } else { Accel::Auto };
        vm = VmConfig { kernel, initramfs, accel, ..vm };
        vm.arch = arch;
        vm.qemu_binary = arch.qemu_binary().into();
        Ok(vm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_configurations_name_one_architecture() {
        assert_eq!(requested(&json!({}), Arch::X86_64).unwrap(), Arch::X86_64);
        assert_eq!(requested(&json!({"cpuConfigurations": []}), Arch::Aarch64).unwrap(), Arch::Aarch64);
        let arm = json!({"cpuConfigurations": [{"architecture": "ARM_64"}, {"architecture": "ARM_64"}]});
        assert_eq!(requested(&arm, Arch::X86_64).unwrap(), Arch::Aarch64);
        let both = json!({"cpuConfigurations": [{"architecture": "ARM_64"}, {"architecture": "X86_64"}]});
        assert!(requested(&both, Arch::X86_64).unwrap_err().message.contains("one architecture"));
        assert!(requested(&json!({"cpuConfigurations": [{"architecture": "MIPS"}]}), Arch::X86_64).is_err());
        assert_eq!(requested(&json!({"cpuConfigurations": configurations(Arch::Aarch64)}), Arch::X86_64).unwrap(), Arch::Aarch64);
    }

    #[test]
    fn hostile_cpu_configurations_are_refused_not_panicked_on() {
        let many: Vec<Value> = (0..100_000).map(|_| json!({"architecture": "ARM_64"})).collect();
        assert_eq!(requested(&json!({ "cpuConfigurations": many }), Arch::X86_64).unwrap(), Arch::Aarch64);
        for bad in [
            json!({"cpuConfigurations": "ARM_64"}),
            json!({"cpuConfigurations": [7]}),
            json!({"cpuConfigurations": [{"architecture": null}]}),
            json!({"cpuConfigurations": [{"architecture": "arm_64"}]}),
            json!({"cpuConfigurations": [{"architecture": "ARM_64\0"}]}),
        ] {
            assert_eq!(requested(&bad, Arch::X86_64).unwrap_err().kind, crate::error::Kind::Validation, "{bad}");
        }
    }
}
