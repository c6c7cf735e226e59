//! `hearth serve`: the control plane daemon (Lambda MicroVMs API, SigV4, SQLite state).

use clap::Args;
use std::net::SocketAddr;

/// Options of `hearth serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on. The API authenticates every call with SigV4; put it behind
    /// TLS before exposing it beyond this host.
    #[arg(long, default_value = "127.0.0.1:8377", env = "HEARTH_LISTEN")]
    listen: SocketAddr,
    /// Accelerator for microVMs: auto (measure KVM, else TCG), kvm or tcg.
    #[arg(long, default_value = "auto", env = "HEARTH_ACCEL")]
    accel: hearth_vmm::Accel,
    /// The URL clients reach this daemon's API at (behind a proxy or TLS terminator); the
    /// fallback form of microvm endpoints is `<URL>/microvms/<id>`. Default:
    /// http://<listen address>.
    #[arg(long, env = "HEARTH_PUBLIC_URL")]
    public_url: Option<String>,
    /// The domain of microvm endpoints: each microvm is served at `<id>.<DOMAIN>` (GetMicrovm's
    /// `endpoint`), as the service serves `<id>.lambda-microvm.<region>.on.aws`. Point a
    /// wildcard DNS record `*.<DOMAIN>` at this host. Default: localhost (`*.localhost`
    /// names loopback in browsers and curl without any DNS set-up).
    #[arg(long, value_name = "DOMAIN", default_value = hearth_api::endpoint::DEFAULT_DOMAIN, env = "HEARTH_ENDPOINT_DOMAIN")]
    endpoint_domain: String,
    /// Where endpoints are served over TLS; `none` serves them only over the API's plain
    /// listener, by Host, for a TLS-terminating proxy in front.
    #[arg(long, value_name = "ADDR|none", default_value = "127.0.0.1:8443", env = "HEARTH_ENDPOINT_LISTEN")]
    endpoint_listen: String,
    /// The port clients reach endpoints at, when a proxy in front listens on another one
    /// than --endpoint-listen (443 is left out of `endpoint`). Default: --endpoint-listen's
    /// port, or 443 with `--endpoint-listen none`.
    #[arg(long, value_name = "PORT", env = "HEARTH_ENDPOINT_PORT")]
    endpoint_port: Option<u16>,
    /// The endpoints' certificate chain (PEM, leaf first; e.g. a wildcard for
    /// `*.<DOMAIN>`), with --tls-key. Default: a CA Hearth makes under the state directory
    /// (printed at start: clients must trust it).
    #[arg(long, value_name = "PEM", requires = "tls_key", env = "HEARTH_TLS_CERT")]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert", env = "HEARTH_TLS_KEY")]
    tls_key: Option<std::path::PathBuf>,
    /// The API's state directory (database, microvm and image files).
    #[arg(long, env = "HEARTH_API_STATE")]
    state_dir: Option<std::path::PathBuf>,
    /// Seconds between passes of the idle and lifetime policies.
    #[arg(long, default_value_t = 1.0)]
    policy_interval: f64,
    /// Serve Prometheus metrics (`GET /metrics`, unauthenticated) on this address, apart
    /// from the API; keep it reachable by the operator only (e.g. 127.0.0.1:8378). Default:
    /// no metrics listener.
    #[arg(long, env = "HEARTH_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Open a closed range (private, CGNAT, link-local, loopback, multicast, reserved) to
    /// every microVM of this host, as CIDR[:PORT[-PORT]][/tcp|/udp]; repeatable. Tenants'
    /// egress rules may then reach into it (never further); the host itself stays closed.
    /// Default: none.
    #[arg(long, value_name = "CIDR", value_parser = hearth_vmm::net::Rule::parse, env = "HEARTH_EGRESS_ALLOW_PRIVATE", value_delimiter = ',')]
    egress_allow_private: Vec<hearth_vmm::net::Rule>,
    /// Image builds run at once (each boots a builder VM); more wait their turn in the
    /// order they were asked for, their versions PENDING. Default: half the host's CPUs,
    /// at least 2.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024), env = "HEARTH_MAX_CONCURRENT_BUILDS")]
    max_concurrent_builds: Option<u16>,
    /// Run QEMU without its jail (own uid, mount and PID namespaces, cgroups, no
    /// capabilities: docs/SECURITY.md), for hosts that cannot jail (not root, or no
    /// memory/cpu/pids controllers on cgroup v1 or v2). By default every microVM is jailed where the host can (`HEARTH_JAIL=0` also
    /// turns it off).
    #[arg(long)]
    no_jail: bool,
    /// Guest memory this host may promise per MiB it has (after its reserve). 1, the
    /// default, never overcommits: RunMicrovm answers InsufficientCapacityException
    /// instead. Clones of one template share pages, so a host often holds more.
    #[arg(long, default_value_t = 1.0, env = "HEARTH_MEMORY_OVERCOMMIT")]
    memory_overcommit: f64,
    /// vCPUs this host may run per CPU it has (sandboxes idle most of the time).
    #[arg(long, default_value_t = 16.0, env = "HEARTH_CPU_OVERCOMMIT")]
    cpu_overcommit: f64,
    /// Memory (MiB) kept for the host itself, never promised to microVMs. Default: 10% of
    /// it, at least 1 GiB.
    #[arg(long, value_name = "MIB", env = "HEARTH_RESERVE_MEMORY_MIB")]
    reserve_memory_mib: Option<u64>,
    /// Disk (MiB) kept free on the state directory's filesystem: runs, builds and uploads
    /// that would eat into it are refused. Default: 2% of it, between 1 and 4 GiB.
    #[arg(long, value_name = "MIB", env = "HEARTH_RESERVE_DISK_MIB")]
    reserve_disk_mib: Option<u64>,
    /// When the host is full, suspend the longest-idle running microVMs (any tenant's,
    /// idle SECS or more; 30 when the flag has no value) to make room, rather than refuse
    /// the new one. Default: refuse.
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "30", env = "HEARTH_RECLAIM_IDLE")]
    reclaim_idle: Option<u64>,
    /// Each account's request rate, CALLS_PER_SECOND[/BURST] (over it: ThrottlingException
    /// with Retry-After, which the AWS SDKs retry); `hearth accounts set --rate-limit`
    /// overrides it per account. 0: unlimited.
    #[arg(long, value_name = "RATE[/BURST]", default_value = "200/400", value_parser = hearth_api::ratelimit::Rate::parse, env = "HEARTH_RATE_LIMIT")]
    rate_limit: hearth_api::ratelimit::Rate,
    /// Warm VMs kept per image version behind RunMicrovm (made when a version is first run,
    /// refilled in the background); an image's `hearth:pool-size` tag overrides it (0-16).
    /// 0: no pools. Pooled VMs count against the host's capacity, not a tenant's quota.
    #[arg(long, value_name = "N", default_value_t = 1, env = "HEARTH_POOL_SIZE")]
    pool_size: usize,
    /// The share of one CPU core refilling pools may take on average (after warming a
    /// VM the refill rests accordingly), so refills never starve running microVMs.
    #[arg(long, value_name = "SHARE", default_value_t = 0.25, env = "HEARTH_POOL_CPU_BUDGET")]
    pool_cpu_budget: f64,
    /// The egress of a microVM whose RunMicrovm and image name no egressNetworkConnectors:
    /// `internet` (INTERNET_EGRESS, as on the service) or `none`. A run naming `[]` has none.
    #[arg(long, value_name = "internet|none", default_value = "internet", env = "HEARTH_DEFAULT_EGRESS")]
    default_egress: hearth_api::service::DefaultEgress,
    /// Pull a registry's images from a mirror instead, for Dockerfiles' `FROM <image>`:
    /// `REGISTRY=URL`, e.g. `docker.io=http://127.0.0.1:5000` (repeatable; `http://` for a
    /// mirror without TLS). Wins over `<state>/registries.json`, which also holds mirrors
    /// and per-registry credentials (README: Dockerfile support).
    #[arg(long, value_name = "REGISTRY=URL", env = "HEARTH_REGISTRY_MIRROR", value_delimiter = ',')]
    registry_mirror: Vec<String>,
    /// The architecture of image versions whose request names no cpuConfigurations:
    /// `x86_64` or `arm64` (ARM_64, the service's only one; emulated, and so slower, on
    /// an x86-64 host). Default: the host's. Each version records its own, so changing
    /// this changes only new versions.
    #[arg(long, value_name = "ARCH", env = "HEARTH_DEFAULT_ARCHITECTURE")]
    default_architecture: Option<hearth_vmm::Arch>,
    /// Each microVM's root disk throughput, bytes per second, reads and writes together
    /// (QEMU block throttling; a guest over it waits). 0: unlimited, the default: the
    /// right number depends on this host's disks; set it where tenants share them.
    #[arg(long, default_value_t = 0, env = "HEARTH_DISK_BPS")]
    disk_bps: u64,
    /// Each microVM's root disk operations per second, reads and writes together. 0:
    /// unlimited (the default).
    #[arg(long, default_value_t = 0, env = "HEARTH_DISK_IOPS")]
    disk_iops: u64,
    /// Each microVM's network bandwidth in Mbit/s, each way (a tc token bucket in its
    /// namespace; a guest over it sees its TCP slow down). 0: unlimited (the default).
    #[arg(long, value_name = "MBIT", default_value_t = 0, env = "HEARTH_NET_RATE")]
    net_rate: u32,
    /// Serve no MCP server at /mcp (by default tenants reach one there with a token from
    /// `hearth mcp token`).
    #[arg(long, env = "HEARTH_NO_MCP")]
    no_mcp: bool,
    /// What the sandboxes of an MCP session at /mcp become when the session ends (its
    /// token expired, or it sat idle for --mcp-idle-minutes).
    #[arg(long, value_enum, default_value_t = crate::mcp::hub::OnExit::Suspend, env = "HEARTH_MCP_ON_EXIT")]
    mcp_on_exit: crate::mcp::hub::OnExit,
    /// An MCP session at /mcp unused this many minutes ends.
    #[arg(long, value_name = "MINUTES", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=1440), env = "HEARTH_MCP_IDLE_MINUTES")]
    mcp_idle_minutes: u64,
    /// MCP sessions (one per token) live at once, all tenants together (each tenant at most
    /// 8); over it, the least recently used idle one ends, else new ones are refused (503).
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096), env = "HEARTH_MCP_MAX_SESSIONS")]
    mcp_max_sessions: u64,
    /// The managed base of the MCP server's default sandbox image (`hearth-mcp-<BASE>`,
    /// built in each tenant's account on first use).
    #[arg(long, value_name = "BASE", default_value = "python", env = "HEARTH_MCP_BASE")]
    mcp_base: String,
}

/// Runs the daemon until SIGINT/SIGTERM.
pub async fn run(a: ServeArgs) -> anyhow::Result<()> {
    for (flag, v) in [("--memory-overcommit", a.memory_overcommit), ("--cpu-overcommit", a.cpu_overcommit)] {
        anyhow::ensure!(v.is_finite() && (0.0..=1000.0).contains(&v), "{flag} {v}: give a ratio between 0 and 1000");
    }
    anyhow::ensure!(
        a.pool_cpu_budget.is_finite() && a.pool_cpu_budget > 0.0 && a.pool_cpu_budget <= 1.0,
        "--pool-cpu-budget {}: give a share of one core, above 0 and at most 1",
        a.pool_cpu_budget
    );
    anyhow::ensure!(
        a.pool_size <= hearth_api::service::MAX_POOL_SIZE,
        "--pool-size {}: at most {}",
        a.pool_size,
        hearth_api::service::MAX_POOL_SIZE
    );
    hearth_image::registry::set_flag_mirrors(&a.registry_mirror).map_err(|e| anyhow::anyhow!(e))?;
    let endpoints = endpoint_config(&a)?;
    let home = hearth_vmm::home::hearth_home();
    restrict_home(&home);
    let (kernel, initramfs) = hearth_vmm::assets::boot_files(&home)?;
    let mut vm = hearth_vmm::VmConfig::new(kernel, initramfs);
    vm.accel = a.accel;
    let jail = if a.no_jail { None } else { hearth_vmm::jail::default_jail() };
    match &jail {
        Some(_) => tracing::info!("every QEMU runs in its jail"),
        None => {
            let why = if a.no_jail {
                "--no-jail".to_owned()
            } else {
                hearth_vmm::jail::available(std::path::Path::new("/sys/fs/cgroup"))
                    .err()
                    .map_or_else(|| "HEARTH_JAIL=0".into(), |e| e.to_string())
            };
            tracing::warn!(%why, "QEMU runs without its jail: a QEMU escape is a host compromise");
        }
    }
    hearth_vmm::jail::set_default(jail.clone());
    vm.jail = jail;
    vm.boot_timeout = std::time::Duration::from_secs(120);
    let limits = hearth_vmm::IoLimits { disk_bps: a.disk_bps, disk_iops: a.disk_iops, net_mbit: a.net_rate };
    limits.validate()?;
    tracing::info!(
        disk_bps = limits.disk_bps,
        disk_iops = limits.disk_iops,
        net_mbit = limits.net_mbit,
        "per-microVM I/O limits (0: unlimited)"
    );
    hearth_vmm::limits::set_default(limits);
    vm.limits = limits;
    let state_dir = a.state_dir.clone().unwrap_or_else(|| home.join("api"));
    tracing::info!(listen = %a.listen, state = %state_dir.display(), "starting the API daemon");
    // The daemon's VMs have their own run root: they outlive it, and nothing else sweeps
    // them by mistake.
    vm.run_root = state_dir.join("run");
    let domain = endpoints.domain.clone();
    let cfg = hearth_api::server::ServeConfig {
        listen: a.listen,
        home: home.clone(),
        state_dir: state_dir.clone(),
        vm,
        policy_interval: std::time::Duration::from_secs_f64(a.policy_interval.max(0.1)),
        public_url: a.public_url.clone(),
        endpoints,
        metrics_listen: a.metrics_listen,
        egress_allow_private: a.egress_allow_private.clone(),
        max_concurrent_builds: a.max_concurrent_builds.map_or_else(hearth_api::service::default_max_concurrent_builds, usize::from),
        capacity: hearth_api::capacity::Settings {
            memory_overcommit: a.memory_overcommit,
            cpu_overcommit: a.cpu_overcommit,
            reserve_memory_mib: a.reserve_memory_mib,
            reserve_disk_mib: a.reserve_disk_mib,
            reclaim_idle: a.reclaim_idle.map(std::time::Duration::from_secs),
        },
        rate_limit: a.rate_limit,
        pools: hearth_api::service::PoolSettings {
            default_size: a.pool_size.min(hearth_api::service::MAX_POOL_SIZE),
            cpu_budget: a.pool_cpu_budget,
        },
        default_egress: a.default_egress,
        default_arch: a.default_architecture.unwrap_or_else(hearth_vmm::Arch::host),
        mcp: (!a.no_mcp).then(|| {
            crate::mcp::daemon::DaemonMcp::hook(crate::mcp::daemon::Limits {
                max_sessions: a.mcp_max_sessions as usize,
                idle: std::time::Duration::from_secs(a.mcp_idle_minutes * 60),
                on_exit: a.mcp_on_exit,
                base: a.mcp_base.clone(),
            })
        }),
    };
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
    };
    hearth_api::server::serve(
        cfg,
        |s| {
            let url = format!("http://{}", s.addr);
            eprintln!("hearth serve: Lambda MicroVMs API on {url} (state in {})", state_dir.display());
            if let Some(k) = s.first_key {
                eprintln!(
                    "\nFirst start: created account {} with an access key (shown only now):\n\
                     \n  aws_access_key_id     = {}\n  aws_secret_access_key = {}\n\
                     \nUse it with the AWS CLI:\n  aws configure set aws_access_key_id {} --profile hearth\n  aws configure set aws_secret_access_key {} --profile hearth\n  aws configure set region us-east-1 --profile hearth\n  aws --profile hearth lambda-microvms list-microvms --endpoint-url {url}\n\
                     \nwith boto3:\n  boto3.client(\"lambda-microvms\", endpoint_url=\"{url}\", region_name=\"us-east-1\",\n               aws_access_key_id=\"{}\", aws_secret_access_key=\"...\")\n\
                     \nor export AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for `hearth` client commands.\n",
                    k.account, k.access_key, k.secret, k.access_key, k.secret, k.access_key
                );
            }
            println!("listening {url}");
            if !a.no_mcp {
                eprintln!("hearth serve: MCP server at {url}/mcp (tokens: `hearth mcp token`)");
            }
            if let Some(e) = s.endpoint_addr {
                println!("endpoints https://<microvm id>.{}:{} (TLS on {e})", domain, e.port());
            }
            if let Some(ca) = &s.ca_file {
                eprintln!(
                    "Endpoint certificates come from Hearth's CA {ca} (limited to *.{domain}, localhost and loopback).\n\
                     Trust it: REQUESTS_CA_BUNDLE / SSL_CERT_FILE / AWS_CA_BUNDLE / NODE_EXTRA_CA_CERTS={ca}, curl --cacert, or\n  \
                     sudo cp {ca} /usr/local/share/ca-certificates/hearth.crt && sudo update-ca-certificates",
                    ca = ca.display()
                );
            }
            if let Some(m) = s.metrics_addr {
                println!("metrics http://{m}/metrics");
            }
        },
        shutdown,
    )
    .await
    .map_err(|e| anyhow::anyhow!(e))
}

/// The endpoint options, checked.
fn endpoint_config(a: &ServeArgs) -> anyhow::Result<hearth_api::endpoint::EndpointConfig> {
    let domain = a.endpoint_domain.trim_end_matches('.').to_ascii_lowercase();
    anyhow::ensure!(
        !domain.is_empty()
            && domain.len() <= 190
            && domain.split('.').all(|l| hearth_api::endpoint::valid_label(l) && !l.bytes().all(|b| b.is_ascii_digit())),
        "--endpoint-domain {}: give a DNS name (letters, digits, hyphens; e.g. apps.example.com)",
        a.endpoint_domain
    );
    let tls_listen = match a.endpoint_listen.as_str() {
        "none" => None,
        s => Some(s.parse().map_err(|e| anyhow::anyhow!("--endpoint-listen {s}: {e} (give ADDRESS:PORT or none)"))?),
    };
    let certs = match (&a.tls_cert, &a.tls_key) {
        (Some(cert), Some(key)) => hearth_api::tls::CertSource::Files { cert: cert.clone(), key: key.clone() },
        _ => hearth_api::tls::CertSource::Generated,
    };
    Ok(hearth_api::endpoint::EndpointConfig { domain, tls_listen, certs, public_port: a.endpoint_port })
}

/// Makes `$HEARTH_HOME` owner-only (0700): the tenants' images, snapshots, VM run
/// directories (consoles, RAM files) and build logs are all beneath it, so its mode guards
/// them whatever modes the files inside were created with. (The daemon keeps the usual
/// umask: root filesystems are assembled from host files, and their modes become the
/// guest's.) A shared directory (world-writable or sticky, like /tmp), or one whose mode
/// cannot be changed, is left as it is, with a warning.
fn restrict_home(home: &std::path::Path) {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let _ = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(home);
    let Ok(meta) = std::fs::metadata(home) else { return };
    if meta.mode() & 0o077 == 0 {
        return;
    }
    let warn = |why: &str| tracing::warn!(home = %home.display(), "HEARTH_HOME left readable by others ({why}); tenants' files beneath it may be exposed: point it at a directory of this user's");
    if meta.mode() & 0o1002 != 0 {
        warn("a shared directory");
    } else if let Err(e) = std::fs::set_permissions(home, std::fs::Permissions::from_mode(0o700)) {
        warn(&e.to_string());
    }
}

/// Options of `hearth keys`.
#[derive(clap::Subcommand, Debug)]
pub enum KeysCmd {
    /// Create an access key: for a new tenant (a new account), or for `--account`.
    Create {
        /// Existing account (12 digits) to add the key to.
        #[arg(long)]
        account: Option<String>,
        /// The API's state directory.
        #[arg(long, env = "HEARTH_API_STATE")]
        state_dir: Option<std::path::PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List access key ids and their accounts.
    Ls {
        /// The API's state directory.
        #[arg(long, env = "HEARTH_API_STATE")]
        state_dir: Option<std::path::PathBuf>,
    },
}

/// Runs a `hearth keys` command (on the local database; the daemon may be running).
pub fn keys(cmd: KeysCmd) -> anyhow::Result<()> {
    let dir = |d: Option<std::path::PathBuf>| d.unwrap_or_else(|| hearth_vmm::home::hearth_home().join("api"));
    match cmd {
        KeysCmd::Create { account, state_dir, json } => {
            let dir = dir(state_dir);
            hearth_api::store::create_state_dir(&dir)?;
            let store = hearth_api::store::Store::open(&dir.join("hearth.db"))?;
            if let Some(a) = &account {
                anyhow::ensure!(a.len() == 12 && a.bytes().all(|b| b.is_ascii_digit()), "--account must be 12 digits");
                anyhow::ensure!(store.keys()?.iter().any(|k| &k.account == a), "no account {a} (hearth keys ls)");
            }
            let k = hearth_api::keys::new_key(&account.unwrap_or_else(hearth_api::keys::new_account));
            store.add_key(&k)?;
            if json {
                println!("{}", serde_json::json!({ "account": k.account, "accessKeyId": k.access_key, "secretAccessKey": k.secret }));
            } else {
                println!("account               {}\naws_access_key_id     {}\naws_secret_access_key {}", k.account, k.access_key, k.secret);
            }
        }
        KeysCmd::Ls { state_dir } => {
            let store = hearth_api::store::Store::open(&dir(state_dir).join("hearth.db"))?;
            println!("{:<24} ACCOUNT", "ACCESS KEY");
            for k in store.keys()? {
                println!("{:<24} {}", k.access_key, k.account);
            }
        }
    }
    Ok(())
}
