//! The instance metadata service's guest end: `169.254.169.254:80` on the loopback
//! interface, relayed to the host over the agent channel (egress `none` works, and nothing
//! crosses the guest's network).
//!
//! At boot the agent puts `169.254.169.254/32` on `lo` (an address alias, `lo:imds`, set
//! with the same ioctls as [`crate::net`]: a local address wins over any route, so a NIC's
//! default route never takes it) and listens there. The host keeps a few
//! `POST /v1/metadata/accept` requests pending; each waits here for one guest connection,
//! then (once the host confirms it, [`accept`]) carries it as [`crate::tunnel`] carries
//! ingress, reversed: the request body is what the host answers, the response body what
//! the guest sent. Connections that arrive while
//! no accept is pending wait in a bounded queue (then in the kernel's backlog); one that
//! waits too long, or goes idle, is closed, so a guest whose host is not relaying (an image
//! build, a pooled VM) sees a quick failure rather than a hang.

use crate::server::{self, Body};
use bytes::Bytes;
use hearth_proto::ErrorCode;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};

/// The link-local address of the metadata service, as on EC2.
pub const ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// Guest connections accepted and waiting for the host.
const QUEUE: usize = 16;
/// The kernel's backlog behind the queue.
const BACKLOG: u32 = 32;
/// How long an accepted connection may wait for the host before it is closed.
const MAX_WAIT: Duration = Duration::from_secs(10);
/// How long a relayed connection may carry nothing either way before it is closed.
const IDLE: Duration = Duration::from_secs(60);

/// What every process the agent starts finds in its environment: the region, and the AWS
/// services Hearth serves (Secrets Manager, KMS, STS, IAM) at the metadata address, where
/// the relay hands them to the daemon's API. The SDKs' metadata client gets a timeout that
/// suits an emulated guest (botocore's default is one second, one attempt).
pub const SDK_ENV: &[(&str, &str)] = &[
    ("AWS_REGION", "hh-local-1"),
    ("AWS_DEFAULT_REGION", "hh-local-1"),
    ("AWS_ENDPOINT_URL_SECRETS_MANAGER", "http://169.254.169.254"),
    ("AWS_ENDPOINT_URL_KMS", "http://169.254.169.254"),
    ("AWS_ENDPOINT_URL_STS", "http://169.254.169.254"),
    ("AWS_ENDPOINT_URL_IAM", "http://169.254.169.254"),
    ("AWS_METADATA_SERVICE_TIMEOUT", "5"),
    ("AWS_METADATA_SERVICE_NUM_ATTEMPTS", "3"),
];

/// Accepted guest connections waiting for the host, oldest first.
struct Queue {
    waiting: std::sync::Mutex<VecDeque<(TcpStream, Instant)>>,
    /// A connection was queued.
    arrived: Notify,
    /// Room was made in the queue.
    room: Notify,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(TcpStream, Instant)>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The oldest connection that has not waited too long (older ones are closed).
    async fn next(&self) -> TcpStream {
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let next = {
                let mut q = self.lock();
                let mut found = None;
                while let Some((s, at)) = q.pop_front() {
                    if at.elapsed() < MAX_WAIT {
                        found = Some(s);
                        break;
                    }
                }
                found
            };
            self.room.notify_one();
            if let Some(s) = next {
                return s;
            }
            arrived.await;
        }
    }

    /// Puts back a connection whose accept never reached the host.
    fn put_back(&self, s: TcpStream) {
        self.lock().push_front((s, Instant::now()));
        self.arrived.notify_one();
    }
}

static QUEUED: OnceLock<Queue> = OnceLock::new();

/// Adds the address to `lo` and starts listening on `listen` (the guest's PID 1 passes
/// `169.254.169.254:80`; tests of the agent as a process pass a loopback port).
/// Not fatal: without it the guest simply has no metadata service.
pub fn start(listen: SocketAddr, add_address: bool) -> std::io::Result<SocketAddr> {
    if add_address {
        add_loopback_address(ADDRESS)?;
    }
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.set_reuseaddr(true)?;
    sock.bind(listen)?;
    let listener = sock.listen(BACKLOG)?;
    let local = listener.local_addr()?;
    let queue = Queue { waiting: Default::default(), arrived: Notify::new(), room: Notify::new() };
    if QUEUED.set(queue).is_err() {
        return Err(std::io::Error::other("the metadata listener is already started"));
    }
    tokio::spawn(async move {
        let Some(queue) = QUEUED.get() else { return };
        loop {
            // A full queue stops accepting: the kernel's backlog holds the rest.
            loop {
                let room = queue.room.notified();
                tokio::pin!(room);
                room.as_mut().enable();
                if queue.lock().len() < QUEUE {
                    break;
                }
                // Connections that waited too long are closed as room is looked for.
                tokio::select! {
                    _ = room => {}
                    _ = tokio::time::sleep(MAX_WAIT) => queue.lock().retain(|(_, at)| at.elapsed() < MAX_WAIT),
                }
            }
            // Connections nobody took in time are closed (no host relays for a build's VM
            // or a pooled one), so their clients fail fast instead of hanging.
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = tokio::time::sleep(MAX_WAIT) => {
                    queue.lock().retain(|(_, at)| at.elapsed() < MAX_WAIT);
                    continue;
                }
            };
            match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    queue.lock().push_back((stream, Instant::now()));
                    queue.arrived.notify_one();
                }
                Err(e) => {
                    eprintln!("hearth-agent: metadata listener: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(local)
}

/// `ip addr add 169.254.169.254/32 dev lo label lo:imds`, through the ioctls `ifconfig`
/// uses for an alias (no netlink client needed for one address).
fn add_loopback_address(addr: Ipv4Addr) -> std::io::Result<()> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
    let fd = sock.as_raw_fd();
    let mut req = crate::net::ifreq("lo:imds");
    req.ifr_ifru.ifru_addr = crate::net::sockaddr(addr);
    crate::net::ioctl(fd, libc::SIOCSIFADDR as libc::Ioctl, &mut req, "add the metadata address to lo")?;
    let mut req = crate::net::ifreq("lo:imds");
    req.ifr_ifru.ifru_netmask = crate::net::sockaddr(Ipv4Addr::BROADCAST);
    crate::net::ioctl(fd, libc::SIOCSIFNETMASK as libc::Ioctl, &mut req, "set the metadata address's netmask")?;
    Ok(())
}

/// How long the host has to confirm an accept.
const CONFIRM: Duration = Duration::from_secs(10);
use hearth_proto::METADATA_MARK as MARK;

/// `POST /v1/metadata/accept`: waits for the next guest connection to the metadata address
/// and carries it. Nothing is lost when the host withdraws the accept: dropped while
/// waiting, it has taken nothing; once it has a connection it answers [`MARK`] and carries
/// the connection only when the host confirms with the same byte, so a connection taken
/// just as the host reset the stream goes back to the queue.
pub async fn accept(req: Request<Incoming>) -> Response<Body> {
    let Some(queue) = QUEUED.get() else {
        return server::error(StatusCode::NOT_FOUND, ErrorCode::NotFound, "this guest has no metadata listener");
    };
    let stream = queue.next().await;
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    let _ = tx.try_send(Ok(Bytes::from_static(&[MARK])));
    let mut body = req.into_body();
    tokio::spawn(async move {
        let first = tokio::time::timeout(CONFIRM, async {
            loop {
                match body.frame().await {
                    Some(Ok(f)) => match f.into_data() {
                        Ok(d) if !d.is_empty() => return Some(d),
                        _ => continue,
                    },
                    _ => return None,
                }
            }
        })
        .await;
        match first {
            Ok(Some(d)) if d[0] == MARK => relay(stream, d.slice(1..), body, tx),
            _ => queue.put_back(stream),
        }
    });
    Response::builder().status(StatusCode::OK).body(server::channel_body(rx)).expect("static response")
}

/// Starts carrying `stream`: `body` (the host's bytes) into it, its bytes into the
/// returned channel, until either side ends or nothing moves for [`IDLE`].
fn relay(stream: TcpStream, first: Bytes, mut body: Incoming, tx: mpsc::Sender<Result<Bytes, std::io::Error>>) {
    let (mut rd, mut wr) = stream.into_split();
    let activity = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = activity.clone();
    // Host → guest client.
    let writer = tokio::spawn(async move {
        if !first.is_empty() && wr.write_all(&first).await.is_err() {
            return;
        }
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if wr.write_all(&data).await.is_err() {
                    break;
                }
            }
        }
        let _ = wr.shutdown().await;
    });
    // Guest client → host, until it closes, the host goes, or nothing moves for IDLE.
    tokio::spawn(async move {
        let mut buf = vec![0u8; 16 << 10];
        let mut last = activity.load(std::sync::atomic::Ordering::Relaxed);
        loop {
            let n = tokio::select! {
                r = rd.read(&mut buf) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                },
                _ = tx.closed() => break,
                _ = tokio::time::sleep(IDLE) => {
                    let now = activity.load(std::sync::atomic::Ordering::Relaxed);
                    if now == last {
                        break;
                    }
                    last = now;
                    continue;
                }
            };
            if tx.send(Ok(Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
                break;
            }
        }
        writer.abort();
    });
}
