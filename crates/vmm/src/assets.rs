//! Guest assets: the kernel, its modules, the agent, and the initramfs built from them.
//!
//! The kernel is Debian's `linux-image-cloud-amd64` from `bookworm-backports`, fetched with
//! `apt-get download` and unpacked with `dpkg -x` into `$HEARTH_HOME/kernel/<release>/`;
//! it is never installed on the host. ARM64 guests get `linux-image-cloud-arm64` the same
//! way (apt needs the `arm64` architecture added: `dpkg --add-architecture arm64`), with
//! their agent and initramfs, under `$HEARTH_HOME/arm64/` ([`crate::arch::Arch::home`]). Only the modules the guest needs are kept, already
//! decompressed so the guest spends no time on xz under emulation.
//!
//! The initramfs is an uncompressed `newc` cpio (unpacking is cheaper than decompressing
//! under TCG) holding `/init` (the agent), `/dev/console`, and the modules with their load
//! order. It is content-addressed: its file name is a hash of everything in it.

use crate::arch::Arch;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Debian package (from bookworm-backports) providing the guest kernel.
pub const KERNEL_PACKAGE: &str = "linux-image-cloud-amd64";
/// Suite the kernel comes from.
pub const KERNEL_SUITE: &str = "bookworm-backports";
/// Modules the guest loads at boot (dependencies are added automatically).
pub const GUEST_MODULES: &[&str] = &["virtio_blk", "virtio_net", "virtio_rng"];
/// Version of the initramfs layout; part of its hash.
pub const INITRAMFS_FORMAT: u32 = 1;

/// A failure preparing assets.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    /// A file or directory operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An external tool failed.
    #[error("`{command}` failed: {stderr}")]
    Tool {
        /// The command line.
        command: String,
        /// Its last output lines.
        stderr: String,
    },
    /// Something expected is not there.
    #[error("{0}; run `{setup}` to set up", setup = crate::home::SETUP_COMMAND)]
    Missing(String),
    /// A kernel module could not be prepared.
    #[error("kernel module {name}: {reason}")]
    Module {
        /// The module.
        name: String,
        /// Why.
        reason: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AssetError {
    let what = what.into();
    move |source| AssetError::Io { what, source }
}

/// Runs a tool, returning its stdout or an error with the tail of its stderr.
pub fn run_tool(cmd: &mut Command) -> Result<Vec<u8>, AssetError> {
    let command = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| AssetError::Tool { command: command.clone(), stderr: e.to_string() })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(8).collect();
        return Err(AssetError::Tool { command, stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n") });
    }
    Ok(out.stdout)
}

/// An unpacked guest kernel.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// `uname -r` of the kernel.
    pub release: String,
    /// The image to boot: the uncompressed ELF `vmlinux` (PVH entry) when it could be
    /// extracted, else the compressed `vmlinuz`.
    pub boot_image: PathBuf,
    /// The compressed bzImage as shipped.
    pub vmlinuz: PathBuf,
    /// Decompressed modules in load order (dependencies first).
    pub modules: Vec<PathBuf>,
}

/// The kernel installed in `home`, if any.
pub fn installed_kernel(home: &Path) -> Result<Kernel, AssetError> {
    let dir = home.join("kernel");
    let release =
        std::fs::read_to_string(dir.join("current")).map_err(|_| AssetError::Missing(format!("no guest kernel in {}", dir.display())))?;
    let release = release.trim().to_owned();
    let kdir = dir.join(&release);
    let order = std::fs::read_to_string(kdir.join("modules/order")).unwrap_or_default();
    let modules = order.lines().filter(|l| !l.is_empty()).map(|l| kdir.join("modules").join(l)).collect();
    let vmlinuz = kdir.join("vmlinuz");
    if !vmlinuz.is_file() {
        return Err(AssetError::Missing(format!("kernel image {} is missing", vmlinuz.display())));
    }
    let vmlinux = kdir.join("vmlinux");
    let boot_image = if vmlinux.is_file() { vmlinux } else { vmlinuz.clone() };
    Ok(Kernel { release, boot_image, vmlinuz, modules })
}

/// Downloads and unpacks the x86-64 guest kernel into `home` (no-op when present).
pub fn fetch_kernel(home: &Path, progress: &dyn Fn(&str)) -> Result<Kernel, AssetError> {
    fetch_kernel_for(home, Arch::X86_64, progress)
}

/// Downloads and unpacks the guest kernel of `arch` into its directory of `home`
/// ([`Arch::home`]; no-op when present).
pub fn fetch_kernel_for(home: &Path, arch: Arch, progress: &dyn Fn(&str)) -> Result<Kernel, AssetError> {
    let home = &arch.home(home);
    if let Ok(k) = installed_kernel(home) {
        // An ARM64 `vmlinuz` is an uncompressed `Image`: nothing to extract.
        if k.boot_image != k.vmlinuz && arch == Arch::X86_64 {
            return Ok(k);
        }
        // Installed by an older Hearth: add the uncompressed image if there is one.
        let bz = std::fs::read(&k.vmlinuz).map_err(io("read vmlinuz"))?;
        if let Some(elf) = extract_vmlinux(&bz).filter(|e| elf_has_pvh_note(e)) {
            let dest = k.vmlinuz.with_file_name("vmlinux");
            let tmp = dest.with_file_name(".vmlinux.tmp");
            std::fs::write(&tmp, elf).map_err(io("write vmlinux"))?;
            std::fs::rename(&tmp, &dest).map_err(io("install vmlinux"))?;
        }
        return installed_kernel(home);
    }
    let meta = arch.kernel_package();
    // A foreign architecture's packages are named with their architecture.
    let qualify = |p: &str| if arch == Arch::host() { p.to_owned() } else { format!("{p}:{}", arch.debian()) };
    progress(&format!("resolving {meta} in {KERNEL_SUITE}"));
    let show = run_tool(Command::new("apt-cache").args(["show", "--no-all-versions", &format!("{}/{KERNEL_SUITE}", qualify(meta))]))
        .map_err(|e| match arch {
            Arch::X86_64 => e,
            _ => AssetError::Missing(format!(
                "apt does not know {meta} for {} ({e}); add the architecture with `dpkg --add-architecture {}` and `apt-get update`",
                arch.debian(),
                arch.debian()
            )),
        })?;
    let show = String::from_utf8_lossy(&show);
    let package = show
        .lines()
        .find_map(|l| l.strip_prefix("Depends:"))
        .and_then(|d| d.split(',').map(str::trim).find(|p| p.starts_with("linux-image-")))
        .and_then(|p| p.split_whitespace().next())
        .ok_or_else(|| AssetError::Missing(format!("apt does not know {meta} in {KERNEL_SUITE} (is the suite in apt's sources?)")))?
        .to_owned();

    std::fs::create_dir_all(home.join("kernel")).map_err(io("create kernel directory"))?;
    let work = tempfile::Builder::new().prefix(".fetch-").tempdir_in(home.join("kernel")).map_err(io("create temporary directory"))?;
    progress(&format!("downloading {package}"));
    run_tool(Command::new("apt-get").arg("download").arg(qualify(&package)).current_dir(work.path()))?;
    let deb = std::fs::read_dir(work.path())
        .map_err(io("list download"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| AssetError::Missing(format!("apt-get download {package} produced no .deb")))?;
    progress("unpacking kernel");
    let root = work.path().join("x");
    run_tool(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
    install_kernel_tree(home, &root, GUEST_MODULES)
}

/// Installs a kernel from an unpacked package tree (`boot/vmlinuz-*`, `lib/modules/*`).
pub fn install_kernel_tree(home: &Path, root: &Path, wanted: &[&str]) -> Result<Kernel, AssetError> {
    let boot = root.join("boot");
    let vmlinuz_src = std::fs::read_dir(&boot)
        .map_err(io(format!("list {}", boot.display())))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vmlinuz-")))
        .ok_or_else(|| AssetError::Missing(format!("no vmlinuz in {}", boot.display())))?;
    let release = vmlinuz_src.file_name().and_then(|n| n.to_str()).unwrap_or("").trim_start_matches("vmlinuz-").to_owned();
    let mods_root = root.join("lib/modules").join(&release);

    let kdir = home.join("kernel").join(&release);
    let staging = home.join("kernel").join(format!(".{release}.tmp"));
    let _ = std::fs::remove_dir_all(&staging);
    // Removed on every path: renamed into place on success, deleted on failure.
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(staging.clone());
    std::fs::create_dir_all(staging.join("modules")).map_err(io("create kernel staging"))?;
    std::fs::copy(&vmlinuz_src, staging.join("vmlinuz")).map_err(io("copy vmlinuz"))?;
    // The uncompressed kernel boots through its PVH entry, skipping ~0.8 s of in-guest
    // decompression under TCG. Without it (another compression, no PVH note) the bzImage
    // is booted instead. (An ARM64 `vmlinuz` is already an uncompressed `Image`.)
    let bz = std::fs::read(&vmlinuz_src).map_err(io("read vmlinuz"))?;
    if !is_arm64_image(&bz) {
        if let Some(elf) = extract_vmlinux(&bz).filter(|e| elf_has_pvh_note(e)) {
            std::fs::write(staging.join("vmlinux"), elf).map_err(io("write vmlinux"))?;
        }
    }

    let index = index_modules(&mods_root);
    let mut order = Vec::new();
    for m in wanted {
        resolve_module(m, &index, &mut order, 0)?;
    }
    let mut names = Vec::new();
    for (name, bytes) in order {
        let file = format!("{name}.ko");
        std::fs::write(staging.join("modules").join(&file), bytes).map_err(io(format!("write module {file}")))?;
        names.push(file);
    }
    std::fs::write(staging.join("modules/order"), names.join("\n") + "\n").map_err(io("write module order"))?;
    let _ = std::fs::remove_dir_all(&kdir);
    std::fs::rename(&staging, &kdir).map_err(io("install kernel"))?;
    let cur_tmp = home.join("kernel/.current.tmp");
    std::fs::write(&cur_tmp, &release).map_err(io("write kernel/current"))?;
    std::fs::rename(&cur_tmp, home.join("kernel/current")).map_err(io("write kernel/current"))?;
    installed_kernel(home)
}

/// True for an ARM64 Linux `Image` (its header's magic `ARM\x64` at offset 56).
fn is_arm64_image(image: &[u8]) -> bool {
    image.get(56..60) == Some(b"ARM\x64")
}

/// Finds the zstd-compressed ELF kernel inside a bzImage and decompresses it.
pub fn extract_vmlinux(bzimage: &[u8]) -> Option<Vec<u8>> {
    const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
    let mut from = 0;
    while let Some(pos) = bzimage[from..].windows(4).position(|w| w == ZSTD_MAGIC) {
        let start = from + pos;
        let mut out = Vec::new();
        if let Ok(mut dec) = ruzstd::decoding::StreamingDecoder::new(&bzimage[start..]) {
            use std::io::Read;
            // A kernel is well under 256 MiB; stop there whatever the stream says.
            if (&mut dec).take(256 << 20).read_to_end(&mut out).is_ok() && out.starts_with(b"\x7fELF") {
                return Some(out);
            }
        }
        from = start + 1;
    }
    None
}

/// True when an ELF kernel carries the Xen PVH entry note (type 18), which QEMU needs to
/// boot it directly.
fn elf_has_pvh_note(elf: &[u8]) -> bool {
    let needle = b"Xen\0";
    elf.windows(12).any(|w| w[0..4] == [4, 0, 0, 0] && w[8..12] == [18, 0, 0, 0]) && elf.windows(4).any(|w| w == needle)
}

fn norm(name: &str) -> String {
    name.replace('-', "_")
}

/// Module name → file, for every module under `dir`.
fn index_modules(dir: &Path) -> HashMap<String, PathBuf> {
    let mut out = HashMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(n) = p.file_name().and_then(|n| n.to_str()) {
                if let Some(stem) = n.strip_suffix(".ko.xz").or_else(|| n.strip_suffix(".ko")) {
                    out.insert(norm(stem), p.clone());
                }
            }
        }
    }
    out
}

fn read_module(path: &Path) -> Result<Vec<u8>, AssetError> {
    let raw = std::fs::read(path).map_err(io(format!("read {}", path.display())))?;
    if path.extension().is_some_and(|e| e == "xz") {
        let mut out = Vec::new();
        lzma_rs::xz_decompress(&mut raw.as_slice(), &mut out)
            .map_err(|e| AssetError::Module { name: path.display().to_string(), reason: format!("xz: {e}") })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// The `depends=` list of a module's `.modinfo`.
fn module_depends(bytes: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    bytes
        .windows(key.len())
        .position(|w| w == key)
        .map(|i| {
            let rest = &bytes[i + key.len()..];
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[..end]).split(',').filter(|s| !s.is_empty()).map(norm).collect()
        })
        .unwrap_or_default()
}

fn resolve_module(
    name: &str,
    index: &HashMap<String, PathBuf>,
    order: &mut Vec<(String, Vec<u8>)>,
    depth: usize,
) -> Result<(), AssetError> {
    let name = norm(name);
    if order.iter().any(|(n, _)| *n == name) {
        return Ok(());
    }
    if depth > 16 {
        return Err(AssetError::Module { name, reason: "dependency chain too deep".into() });
    }
    // Built-in modules (absent from the tree) need nothing.
    let Some(path) = index.get(&name) else { return Ok(()) };
    let bytes = read_module(path)?;
    for dep in module_depends(&bytes) {
        resolve_module(&dep, index, order, depth + 1)?;
    }
    order.push((name, bytes));
    Ok(())
}

/// Where the installed agent lives.
pub fn agent_path(home: &Path) -> PathBuf {
    home.join("agent/hearth-agent")
}

/// Builds (or reuses) the initramfs for `agent` and `kernel`; returns its path.
pub fn ensure_initramfs(home: &Path, agent: &Path, kernel: &Kernel) -> Result<PathBuf, AssetError> {
    let agent_bytes = std::fs::read(agent).map_err(|_| AssetError::Missing(format!("guest agent not found at {}", agent.display())))?;
    let mut files: BTreeMap<String, (u32, Vec<u8>)> = BTreeMap::new();
    files.insert("init".into(), (0o100755, agent_bytes));
    let mut order = String::new();
    for m in &kernel.modules {
        let name = m.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        let bytes = std::fs::read(m).map_err(io(format!("read module {}", m.display())))?;
        order.push_str(&name);
        order.push('\n');
        files.insert(format!("lib/modules/hearth/{name}"), (0o100644, bytes));
    }
    files.insert("lib/modules/hearth/order".into(), (0o100644, order.into_bytes()));

    let mut h = Sha256::new();
    h.update(INITRAMFS_FORMAT.to_le_bytes());
    for (name, (mode, data)) in &files {
        h.update(name.as_bytes());
        h.update(mode.to_le_bytes());
        h.update((data.len() as u64).to_le_bytes());
        h.update(data);
    }
    let digest = h.finalize();
    let hex: String = digest.iter().take(12).map(|b| format!("{b:02x}")).collect();
    let dir = home.join("initramfs");
    let out = dir.join(format!("{hex}.cpio"));
    if out.is_file() {
        return Ok(out);
    }
    std::fs::create_dir_all(&dir).map_err(io("create initramfs directory"))?;
    let mut tmp = tempfile::NamedTempFile::new_in(&dir).map_err(io("create initramfs"))?;
    write_cpio(tmp.as_file_mut(), &files).map_err(io("write initramfs"))?;
    tmp.persist(&out).map_err(|e| AssetError::Io { what: "install initramfs".into(), source: e.error })?;
    Ok(out)
}

fn write_cpio(w: &mut std::fs::File, files: &BTreeMap<String, (u32, Vec<u8>)>) -> std::io::Result<()> {
    use cpio::newc::Builder;
    let mut w = std::io::BufWriter::new(w);
    let mut ino = 1;
    let mut entry = |name: &str, mode: u32, w: &mut std::io::BufWriter<&mut std::fs::File>, data: &[u8], rdev: Option<(u32, u32)>| {
        ino += 1;
        let mut b = Builder::new(name).ino(ino).mode(mode).nlink(1);
        if let Some((maj, min)) = rdev {
            b = b.rdev_major(maj).rdev_minor(min);
        }
        let mut writer = b.write(w, data.len() as u32);
        writer.write_all(data)?;
        writer.finish().map(|_| ())
    };
    for d in ["dev", "proc", "sys", "tmp", "run", "newroot", "lib", "lib/modules", "lib/modules/hearth"] {
        entry(d, 0o040755, &mut w, &[], None)?;
    }
    entry("dev/console", 0o020600, &mut w, &[], Some((5, 1)))?;
    for (name, (mode, data)) in files {
        entry(name, *mode, &mut w, data, None)?;
    }
    cpio::newc::trailer(&mut w)?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_are_read_from_modinfo() {
        let fake = b"junk\0license=GPL\0depends=net_failover,virtio-ring\0vermagic=x\0";
        assert_eq!(module_depends(fake), vec!["net_failover", "virtio_ring"]);
        assert!(module_depends(b"nothing here").is_empty());
    }

    #[test]
    fn initramfs_is_content_addressed() {
        let home = tempfile::tempdir().unwrap();
        let agent = home.path().join("agent");
        std::fs::write(&agent, b"\x7fELF fake agent").unwrap();
        let k = Kernel { release: "x".into(), boot_image: agent.clone(), vmlinuz: agent.clone(), modules: vec![] };
        let a = ensure_initramfs(home.path(), &agent, &k).unwrap();
        let b = ensure_initramfs(home.path(), &agent, &k).unwrap();
        assert_eq!(a, b);
        std::fs::write(&agent, b"\x7fELF another agent").unwrap();
        let c = ensure_initramfs(home.path(), &agent, &k).unwrap();
        assert_ne!(a, c);
        let data = std::fs::read(&c).unwrap();
        assert!(data.windows(10).any(|w| w == b"TRAILER!!!"));
    }
}

/// The kernel and initramfs installed in `home` (the initramfs is rebuilt if its inputs
/// changed). Fails with a message naming the set-up command when anything is missing.
pub fn boot_files(home: &Path) -> Result<(PathBuf, PathBuf), AssetError> {
    boot_files_for(home, Arch::X86_64)
}

/// [`boot_files`] of the guests of `arch` (from its directory of `home`, [`Arch::home`]).
pub fn boot_files_for(home: &Path, arch: Arch) -> Result<(PathBuf, PathBuf), AssetError> {
    let home = &arch.home(home);
    let kernel = installed_kernel(home).map_err(|e| match (arch, e) {
        (Arch::Aarch64, AssetError::Missing(m)) => AssetError::Missing(format!("{m} (ARM64 guests: `hearth setup --arch arm64`)")),
        (_, e) => e,
    })?;
    let initramfs = ensure_initramfs(home, &agent_path(home), &kernel)?;
    Ok((kernel.boot_image, initramfs))
}

/// True when a 64-bit little-endian ELF has a `PT_INTERP` program header (needs a dynamic
/// loader, which a guest root filesystem may not have).
fn elf_has_interpreter(elf: &[u8]) -> bool {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u64_at = |o: usize| elf.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize);
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return false;
    };
    (0..phnum).any(|i| {
        let o = phoff.saturating_add(i.saturating_mul(phentsize));
        elf.get(o..o.saturating_add(4)).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])) == Some(3)
    })
}

/// The ELF `e_machine` of a binary.
fn elf_machine(elf: &[u8]) -> Option<u16> {
    elf.get(18..20).map(|b| u16::from_le_bytes([b[0], b[1]]))
}

/// Installs the x86-64 agent binary into `home` (atomically).
pub fn install_agent(home: &Path, agent: &Path) -> Result<PathBuf, AssetError> {
    install_agent_for(home, Arch::X86_64, agent)
}

/// Installs the agent binary of `arch` guests into its directory of `home` (atomically),
/// after checking that it is a static binary for that architecture.
pub fn install_agent_for(home: &Path, arch: Arch, agent: &Path) -> Result<PathBuf, AssetError> {
    let dest = agent_path(&arch.home(home));
    let dir = dest.parent().expect("agent path has a parent");
    std::fs::create_dir_all(dir).map_err(io("create agent directory"))?;
    let bytes = std::fs::read(agent).map_err(io(format!("read agent {}", agent.display())))?;
    if bytes.get(..4) != Some(b"\x7fELF") {
        return Err(AssetError::Missing(format!("{} is not an ELF binary", agent.display())));
    }
    if elf_machine(&bytes) != Some(arch.elf_machine()) {
        return Err(AssetError::Missing(format!(
            "{} is not a {arch} binary; build the {arch} agent with scripts/build-agent.sh{}",
            agent.display(),
            if arch == Arch::Aarch64 { " --arm64" } else { "" }
        )));
    }
    if elf_has_interpreter(&bytes) {
        return Err(AssetError::Missing(format!(
            "{} is dynamically linked; the guest agent must be static (build it with scripts/build-agent.sh)",
            agent.display()
        )));
    }
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io("create agent file"))?;
    tmp.write_all(&bytes).map_err(io("write agent"))?;
    tmp.persist(&dest).map_err(|e| AssetError::Io { what: "install agent".into(), source: e.error })?;
    Ok(dest)
}

#[cfg(test)]
mod elf_tests {
    #[test]
    fn dynamic_binaries_are_recognised() {
        // The test binary itself is dynamically linked.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(super::elf_has_interpreter(&me));
        assert!(!super::elf_has_interpreter(b"\x7fELF"));
        assert_eq!(super::elf_machine(&me), Some(super::Arch::host().elf_machine()));
    }

    #[test]
    fn an_agent_of_another_architecture_is_refused() {
        let home = tempfile::tempdir().unwrap();
        let me = std::env::current_exe().unwrap();
        let other = super::Arch::ALL.into_iter().find(|a| *a != super::Arch::host()).unwrap();
        let err = super::install_agent_for(home.path(), other, &me).unwrap_err().to_string();
        assert!(err.contains("is not a"), "{err}");
    }
}
