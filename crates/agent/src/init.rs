//! Boot as PID 1: mounts, kernel modules, root switch, and power-off.
//!
//! The kernel command line tells the agent what to do:
//! - `hearth.root=/dev/vda` — block device holding the root filesystem (ext4 unless
//!   `hearth.rootfstype=` says otherwise). Without it the agent stays in the initramfs.
//! - `hearth.hostname=NAME` — the guest's hostname.
//!
//! Modules listed in `/lib/modules/hearth/order` (one file name a line, already
//! decompressed by the host) are loaded first, in order.

use hearth_proto::AGENT_PORT_NAME;
use nix::mount::{mount, MsFlags};
use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What booting found.
pub struct Booted {
    /// Device node of the agent's virtio-serial port.
    pub port_path: PathBuf,
}

/// A boot step that failed.
#[derive(Debug)]
pub struct BootError(String);

impl std::fmt::Display for BootError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn err(step: &str, e: impl std::fmt::Display) -> BootError {
    BootError(format!("{step}: {e}"))
}

fn mount_fs(src: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) -> Result<(), BootError> {
    std::fs::create_dir_all(target).map_err(|e| err(&format!("create {target}"), e))?;
    match mount(Some(src), target, Some(fstype), flags, data) {
        Ok(()) | Err(nix::errno::Errno::EBUSY) => Ok(()),
        Err(e) => Err(err(&format!("mount {fstype} on {target}"), e)),
    }
}

/// Does everything between the kernel starting `/init` and the agent serving.
pub fn boot() -> Result<Booted, BootError> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    mount_fs("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, Some("mode=0755"))?;
    mount_fs("proc", "/proc", "proc", nosuid, None)?;
    mount_fs("sysfs", "/sys", "sysfs", nosuid, None)?;

    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let arg = |key: &str| cmdline.split_whitespace().find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('='))).map(str::to_owned);

    let debug = cmdline.contains("hearth.debug=boot");
    let step = |m: &str| {
        if debug {
            eprintln!("hearth-agent: {m}")
        }
    };
    step("loading modules");
    load_modules()?;
    step("modules loaded");

    if let Some(root) = arg("hearth.root") {
        let fstype = arg("hearth.rootfstype").unwrap_or_else(|| "ext4".into());
        switch_root(&root, &fstype)?;
        step("switched root");
    }

    mount_fs("tmpfs", "/tmp", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=1777"))?;
    mount_fs("tmpfs", "/run", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755"))?;
    mount_fs("devpts", "/dev/pts", "devpts", MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some("mode=0620,ptmxmode=0666"))?;
    mount_fs("tmpfs", "/dev/shm", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=1777"))?;
    std::fs::create_dir_all("/workspace").map_err(|e| err("create /workspace", e))?;

    let hostname = arg("hearth.hostname").unwrap_or_else(|| "hearth".into());
    let _ = nix::unistd::sethostname(&hostname);
    let _ = loopback_up();
    if let Some(v) = arg("hearth.net") {
        // Not fatal: the VM still serves exec and files; its network errors show there.
        match crate::net::NetConfig::parse(&v) {
            Some(net) => match crate::net::configure(&net) {
                Ok(dev) => {
                    step(&format!("network up on {dev}"));
                    if let Err(e) = crate::net::write_resolv_conf(net.dns) {
                        eprintln!("hearth-agent: cannot write /etc/resolv.conf: {e}");
                    }
                }
                Err(e) => eprintln!("hearth-agent: network set-up failed: {e}"),
            },
            None => eprintln!("hearth-agent: ignoring malformed hearth.net={v}"),
        }
    }

    step("finding port");
    let port_path = find_port(Duration::from_secs(10))?;
    step("found port");
    Ok(Booted { port_path })
}

fn load_modules() -> Result<(), BootError> {
    let dir = Path::new("/lib/modules/hearth");
    let Ok(order) = std::fs::read_to_string(dir.join("order")) else {
        return Ok(());
    };
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = dir.join(name);
        let Ok(file) = std::fs::File::open(&path) else {
            eprintln!("hearth-agent: module {name} is missing from the initramfs (continuing)");
            continue;
        };
        let params = CString::default();
        match nix::kmod::finit_module(&file, &params, nix::kmod::ModuleInitFlags::empty()) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            // Not fatal: a user's own kernel may have the driver built in (or reject modules
            // built for another kernel); a missing root disk is reported on its own.
            Err(e) => eprintln!("hearth-agent: cannot load module {name}: {e} (continuing)"),
        }
    }
    Ok(())
}

/// Mounts `device` and makes it `/`, as `switch_root` does: the initramfs stays behind,
/// unreachable, so Hearth's files never appear in the user's filesystem.
fn switch_root(device: &str, fstype: &str) -> Result<(), BootError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !Path::new(device).exists() {
        if Instant::now() > deadline {
            return Err(BootError(format!("root device {device} did not appear within 10 s")));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let new_root = "/newroot";
    std::fs::create_dir_all(new_root).map_err(|e| err("create /newroot", e))?;
    let ext4 = fstype == "ext4";
    // A disk the host made larger than its filesystem (an image's bigger root disk): read
    // before mounting, grown once mounted.
    let grow_to = if ext4 { crate::growfs::plan(device) } else { None };
    // `noinit_itable`: Hearth's disks are sparse files, whose unwritten inode tables read
    // as zeros already; the kernel's background zeroing would only write them into every
    // VM's overlay.
    let data = ext4.then_some("noinit_itable");
    mount(Some(device), new_root, Some(fstype), MsFlags::empty(), data).map_err(|e| err(&format!("mount {device} ({fstype})"), e))?;
    if let Some(blocks) = grow_to {
        // Not fatal: the VM works on the smaller filesystem; the console says why.
        if let Err(e) = crate::growfs::grow(new_root, blocks) {
            eprintln!("hearth-agent: cannot grow the root filesystem to fill {device}: {e}");
        }
    }
    for m in ["/dev", "/proc", "/sys"] {
        let target = format!("{new_root}{m}");
        std::fs::create_dir_all(&target).map_err(|e| err(&format!("create {target}"), e))?;
        mount(Some(m), target.as_str(), None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(|e| err(&format!("move {m}"), e))?;
    }
    // Free the initramfs's memory: the agent already runs from its own pages.
    for gone in ["/init", "/lib/modules/hearth"] {
        let _ = std::fs::remove_dir_all(gone).or_else(|_| std::fs::remove_file(gone));
    }
    nix::unistd::chdir(new_root).map_err(|e| err("chdir /newroot", e))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(|e| err("move root", e))?;
    nix::unistd::chroot(".").map_err(|e| err("chroot", e))?;
    nix::unistd::chdir("/").map_err(|e| err("chdir /", e))?;
    Ok(())
}

fn find_port(timeout: Duration) -> Result<PathBuf, BootError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(entries) = std::fs::read_dir("/sys/class/virtio-ports") {
            for e in entries.flatten() {
                let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
                if name.trim() == AGENT_PORT_NAME {
                    let dev = Path::new("/dev").join(e.file_name());
                    if dev.exists() {
                        return Ok(dev);
                    }
                }
            }
        }
        if Instant::now() > deadline {
            return Err(BootError(format!("no virtio-serial port named {AGENT_PORT_NAME} appeared within {timeout:?}")));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Brings `lo` up so apps can serve on localhost.
fn loopback_up() -> std::io::Result<()> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
    // SAFETY: `ifreq` is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: `req` is a valid, initialised ifreq that outlives both calls, and the socket
    // fd is open for their duration; SIOC[GS]IFFLAGS read and write only `ifr_flags`.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as libc::Ioctl, &mut req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as libc::Ioctl, &req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Stops every process, flushes and unmounts the disk, and powers off. Never returns.
pub fn power_off() -> ! {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(-1), nix::sys::signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(100));
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(-1), nix::sys::signal::SIGKILL);
    nix::unistd::sync();
    let _ = mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY, None::<&str>);
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    // reboot(2) only returns on failure; halting is the best that is left.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
