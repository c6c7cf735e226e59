//! The guest's network interface, configured from `hearth.net=ADDR/PREFIX,GATEWAY,DNS` on
//! the kernel command line: address, netmask, link up, default route, `/etc/resolv.conf`.
//! Every VM gets the same values (the host gives each its own namespace), so a snapshot's
//! clones need no change here.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// The parsed `hearth.net` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Guest address.
    pub addr: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
    /// Default gateway.
    pub gateway: Ipv4Addr,
    /// DNS server.
    pub dns: Ipv4Addr,
}

impl NetConfig {
    /// Parses `10.0.2.15/24,10.0.2.2,10.0.2.3`.
    pub fn parse(s: &str) -> Option<NetConfig> {
        let mut it = s.split(',');
        let (addr, prefix) = it.next()?.split_once('/')?;
        let cfg = NetConfig {
            addr: addr.parse().ok()?,
            prefix: prefix.parse().ok().filter(|p| *p <= 32)?,
            gateway: it.next()?.parse().ok()?,
            dns: it.next()?.parse().ok()?,
        };
        it.next().is_none().then_some(cfg)
    }

    fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(if self.prefix == 0 { 0 } else { u32::MAX << (32 - self.prefix) })
    }
}

pub(crate) fn sockaddr(a: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from(a).to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16-byte plain-old-data socket address
    // layouts; reinterpreting one as the other is how the socket API is used.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

pub(crate) fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: `ifreq` is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes().take(libc::IFNAMSIZ - 1)) {
        *d = s as libc::c_char;
    }
    req
}

// `libc::Ioctl` is `c_ulong` on glibc and `c_int` on musl (the ARM64 agent), while the
// request constants are `c_ulong` on both: callers cast.
pub(crate) fn ioctl<T>(fd: i32, req: libc::Ioctl, arg: &mut T, what: &str) -> std::io::Result<()> {
    // SAFETY: every call passes the argument type its request expects (`ifreq` for the
    // SIOC*IF* requests, `rtentry` for SIOCADDRT), valid for the call's duration.
    if unsafe { libc::ioctl(fd, req, arg as *mut T) } < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

/// The first interface other than `lo`, waiting up to `timeout` for the driver to probe.
fn find_interface(timeout: Duration) -> Option<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "lo")
            .collect();
        names.sort();
        if let Some(n) = names.into_iter().next() {
            return Some(n);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Brings up the interface with `cfg`. Returns the interface's name.
pub fn configure(cfg: &NetConfig) -> std::io::Result<String> {
    let name = find_interface(Duration::from_secs(5))
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no network interface appeared"))?;
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
    let fd = sock.as_raw_fd();
    let mut req = ifreq(&name);
    req.ifr_ifru.ifru_addr = sockaddr(cfg.addr);
    ioctl(fd, libc::SIOCSIFADDR as libc::Ioctl, &mut req, "set address")?;
    let mut req = ifreq(&name);
    req.ifr_ifru.ifru_netmask = sockaddr(cfg.netmask());
    ioctl(fd, libc::SIOCSIFNETMASK as libc::Ioctl, &mut req, "set netmask")?;
    let mut req = ifreq(&name);
    ioctl(fd, libc::SIOCGIFFLAGS as libc::Ioctl, &mut req, "get flags")?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    ioctl(fd, libc::SIOCSIFFLAGS as libc::Ioctl, &mut req, "bring the link up")?;
    // SAFETY: `rtentry` is plain old data; all-zero is a valid value.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr(cfg.gateway);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    match ioctl(fd, libc::SIOCADDRT as libc::Ioctl, &mut rt, "add the default route") {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
        other => other?,
    }
    Ok(name)
}

/// Points the resolver at `dns` (replacing a symlink such as systemd's stub file).
pub fn write_resolv_conf(dns: Ipv4Addr) -> std::io::Result<()> {
    let path = std::path::Path::new("/etc/resolv.conf");
    std::fs::create_dir_all("/etc")?;
    if path.symlink_metadata().map(|m| m.file_type().is_symlink()).unwrap_or(false) {
        std::fs::remove_file(path)?;
    }
    std::fs::write(path, format!("# written by hearth-agent at boot\nnameserver {dns}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernel_argument() {
        let c = NetConfig::parse("10.0.2.15/24,10.0.2.2,10.0.2.3").unwrap();
        assert_eq!(c.addr, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(c.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(c.gateway, Ipv4Addr::new(10, 0, 2, 2));
        for bad in ["", "10.0.2.15", "10.0.2.15/33,1.1.1.1,1.1.1.1", "10.0.2.15/24,x,1.1.1.1", "1.1.1.1/8,1.1.1.1,1.1.1.1,extra"] {
            assert!(NetConfig::parse(bad).is_none(), "{bad}");
        }
    }
}
