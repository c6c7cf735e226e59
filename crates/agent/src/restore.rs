//! `POST /v1/restore` and `POST /v1/sync`: the guest's side of snapshots.
//!
//! After a restore every clone of a snapshot wakes with the snapshot's wall clock, the
//! snapshot's kernel RNG state and the snapshot's identity. The host sends the time, fresh
//! entropy and a new identity; the agent sets the clock, credits the entropy and forces the
//! kernel's CRNG to reseed (so two clones never produce the same random bytes), and sets
//! the hostname and `/etc/machine-id`.

use crate::server::{self, Body};
use hearth_proto::{ErrorCode, RestoreInfo};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use std::os::fd::AsRawFd;

// From <linux/random.h>.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// `POST /v1/restore`.
pub async fn restore(req: Request<Incoming>) -> Response<Body> {
    let info: RestoreInfo = match server::read_json(req).await {
        Ok(i) => i,
        Err(r) => return r,
    };
    if let Err(e) = info.validate() {
        return server::error(StatusCode::BAD_REQUEST, ErrorCode::InvalidInput, e);
    }
    // Inline rather than on a blocking thread: these are a handful of quick syscalls, and
    // right after a restore (cold translation cache under TCG) starting a thread costs
    // more than the work.
    match apply(&info) {
        Ok(()) => server::json(StatusCode::OK, &serde_json::json!({})),
        Err(e) => server::io_error("restore fix-ups", &e),
    }
}

fn apply(info: &RestoreInfo) -> std::io::Result<()> {
    let ts = libc::timespec { tv_sec: info.unix_time_ns.div_euclid(1_000_000_000), tv_nsec: info.unix_time_ns.rem_euclid(1_000_000_000) };
    // SAFETY: `ts` is a valid timespec that outlives the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    add_entropy(&info.entropy.0)?;
    if let Some(h) = &info.hostname {
        nix::unistd::sethostname(h)?;
    }
    if let Some(id) = &info.machine_id {
        if std::path::Path::new("/etc").is_dir() {
            // Overwritten in place, not replaced by rename: ext4 flushes a file renamed
            // (or truncated) over an existing one to disk at once, which costs tens of
            // milliseconds under emulation right when the VM should be getting ready.
            use std::io::{Seek, Write};
            let line = format!("{id}\n");
            let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(false).open("/etc/machine-id")?;
            f.seek(std::io::SeekFrom::Start(0))?;
            f.write_all(line.as_bytes())?;
            f.set_len(line.len() as u64)?;
        }
    }
    Ok(())
}

/// Credits `bytes` to the kernel's input pool and forces the CRNG to reseed from it.
fn add_entropy(bytes: &[u8]) -> std::io::Result<()> {
    let urandom = std::fs::OpenOptions::new().write(true).open("/dev/urandom")?;
    if !bytes.is_empty() {
        // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
        let mut req = Vec::with_capacity(8 + bytes.len());
        req.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
        req.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
        req.extend_from_slice(bytes);
        // SAFETY: `req` holds a rand_pool_info header followed by exactly `buf_size`
        // bytes, alive for the call; the fd is open for writing.
        if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY as _, req.as_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    // SAFETY: RNDRESEEDCRNG takes no argument; the fd is open.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG as _) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `POST /v1/sync`: flushes every filesystem, so a disk snapshot taken next is complete
/// without the guest's page cache.
pub async fn sync() -> Response<Body> {
    let _ = tokio::task::spawn_blocking(nix::unistd::sync).await;
    server::json(StatusCode::OK, &serde_json::json!({}))
}
