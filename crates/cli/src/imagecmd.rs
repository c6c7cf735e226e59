//! `hearth images local …`: the operator's image store on this host ($HEARTH_HOME/images),
//! no daemon: build images from a Dockerfile context, list, show, remove, run. (The old
//! spelling `hearth image …` still works, with a deprecation note.)

use crate::vmargs::{EgressMode, NetArgs, VmArgs};
use crate::vmrun::{self, CmdArgs};
use anyhow::Context;
use clap::{Args, Subcommand};
use hearth_image::base::Base;
use hearth_image::build::{self, BuildRequest};
use hearth_image::store::{self, ImageVersionState};
use hearth_vmm::{RestoreOptions, Snapshot, Vm};
use std::collections::BTreeMap;
use std::time::Duration;

/// Local image store commands.
#[derive(Subcommand, Debug)]
pub enum LocalCmd {
    /// Build a new version of an image from a directory or zip with a Dockerfile at its
    /// root: run its steps in a builder VM, start the app, wait for /ready, snapshot.
    Build(BuildArgs),
    /// List images and their versions.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show an image version's record (NAME or NAME:vN).
    #[command(visible_alias = "get")]
    Show {
        /// The image.
        image: String,
    },
    /// Remove an image (all versions) or one version (NAME:vN).
    Rm {
        /// The image.
        image: String,
    },
    /// Launch a microVM from an image (its app already running), run a command, stop it.
    Run(RunArgs),
}

/// Options of `hearth images local build`.
#[derive(Args, Debug)]
pub struct BuildArgs {
    /// The code artifact: a directory, a .zip, or a file:// URI, with a Dockerfile at its root.
    context: String,
    /// Image name.
    #[arg(long)]
    name: String,
    /// Base image the build starts from: minimal, debian-bookworm, python or nodejs (built
    /// on first use when `hearth setup` did not).
    #[arg(long, default_value = "debian-bookworm")]
    base: Base,
    /// The root disk's size in GiB (8 to 256; default: the base's 8 GiB, or the parent
    /// image's). Sparse: the host pays only for what the guest writes.
    #[arg(long, value_parser = |s: &str| hearth_image::disk::parse_gib(s))]
    disk_size_gib: Option<u64>,
    /// Environment variable for the build and the app (KEY=VALUE); repeatable.
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    /// The app's hooks port inside the VM (/ready, /validate).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Seconds the app may take to answer /ready.
    #[arg(long, default_value_t = 120)]
    ready_timeout: u64,
    /// Also call /validate before the snapshot.
    #[arg(long)]
    validate: bool,
    /// Run every step again instead of reusing cached layers (and record none).
    #[arg(long)]
    no_cache: bool,
    /// Print the build log lines only (no progress bar), even on a terminal.
    #[arg(long)]
    plain: bool,
    /// The builder VM's options. Its egress defaults to `internet` (RUN steps can fetch
    /// packages; the host and private ranges stay closed); `--egress none` builds offline.
    #[command(flatten)]
    vm: VmArgs,
}

/// Options of `hearth images local run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The image (NAME or NAME:vN).
    image: String,
    /// The microVM's network (images built with a network device keep it; egress is
    /// closed unless opened here).
    #[command(flatten)]
    net: NetArgs,
    #[command(flatten)]
    cmd: CmdArgs,
}

use hearth_image::store::parse_ref;

/// Images whose disks are built on something inside `dir` (through their backing chains).
fn dependents(home: &std::path::Path, dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for name in store::names(home) {
        for r in store::versions(home, &name) {
            let vdir = store::version_dir(home, &r.name, r.version);
            if vdir.starts_with(dir) {
                continue;
            }
            let mut cur = hearth_image::layers::backing_file(&vdir.join("snapshot").join("disk.qcow2"));
            for _ in 0..256 {
                let Some(p) = cur else { break };
                if p.starts_with(dir) {
                    out.push(format!("{}:v{}", r.name, r.version));
                    break;
                }
                cur = hearth_image::layers::backing_file(&p);
            }
        }
    }
    out
}

/// Runs a local image store command.
pub async fn run(cmd: LocalCmd) -> anyhow::Result<i32> {
    let home = hearth_vmm::home::hearth_home();
    match cmd {
        LocalCmd::Build(a) => {
            let mut env = BTreeMap::new();
            for kv in &a.env {
                let (k, v) = kv.split_once('=').with_context(|| format!("--env {kv:?} must be KEY=VALUE"))?;
                env.insert(k.to_owned(), v.to_owned());
            }
            // Everything that fails on bad input happens before a version is recorded, so a
            // bad artifact or option never leaves a PENDING version behind.
            store::check_name(&a.name)?;
            let vm_cfg = a.vm.config()?;
            let network = a.vm.net.egress(EgressMode::Internet)?;
            anyhow::ensure!(
                network.is_none() || hearth_vmm::net::can_network(),
                "the builder VM's network (internet egress by default, for RUN steps that fetch packages) needs root; run as root or build offline with --egress none"
            );
            std::fs::create_dir_all(home.join("images"))?;
            let scratch = tempfile::Builder::new().prefix(".ctx-").tempdir_in(home.join("images"))?;
            // The operator may fetch from anywhere, proxies included; tenants cannot.
            let src = hearth_image::artifact::fetch_with(
                &a.context,
                scratch.path(),
                Default::default(),
                hearth_image::artifact::FetchPolicy::operator(),
            )
            .await?;
            let context = if src.is_dir() {
                src.clone()
            } else {
                let ctx = scratch.path().join("ctx");
                hearth_image::artifact::extract_zip(&src, &ctx, Default::default())?;
                ctx
            };
            anyhow::ensure!(context.join("Dockerfile").is_file(), "{} has no Dockerfile at its root", src.display());
            // A managed base `hearth setup` did not build (python, nodejs) is built now.
            if !a.base.path(&home).is_file() {
                eprintln!("building the managed base {} on its first use (a few minutes, once for this host)", a.base);
                let (base, h) = (a.base, home.clone());
                tokio::task::spawn_blocking(move || base.ensure(&h, &|m| eprintln!("{m}"))).await??;
            }
            let mut rec = store::begin(&home, &a.name, a.base)?;
            let vdir = store::version_dir(&home, &rec.name, rec.version);
            let req = BuildRequest {
                context,
                base: a.base,
                env,
                hooks_port: a.port,
                ready_hook: true,
                ready_timeout: Duration::from_secs(a.ready_timeout),
                validate: a.validate,
                validate_timeout: Duration::from_secs(a.ready_timeout),
                network,
                cache: (!a.no_cache).then(|| hearth_image::layers::LayerCache::new(&home)),
                images: std::sync::Arc::new(build::HostImages(home.clone())),
                disk_gib: a.disk_size_gib,
                cache_scope: None,
            };
            rec.state = ImageVersionState::InProgress;
            store::save(&home, &rec)?;
            let mut log_file = std::fs::File::create(vdir.join("build.log"))?;
            // On a terminal: a spinner with the current step and the elapsed time, the
            // log streaming above it. Otherwise (CI, pipes): the log lines alone.
            let bar = (!a.plain && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
                let pb = indicatif::ProgressBar::new_spinner();
                pb.set_style(indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_msg}").expect("valid template"));
                pb.enable_steady_tick(Duration::from_millis(120));
                pb
            });
            let mut log = |line: &str| {
                use std::io::Write;
                match &bar {
                    Some(pb) => {
                        if !line.starts_with("  |") {
                            pb.set_message(line.chars().take(120).collect::<String>());
                        }
                        pb.println(line);
                    }
                    None => eprintln!("{line}"),
                }
                let _ = writeln!(log_file, "{line}");
            };
            let result = build::build(&req, vm_cfg, &home, &vdir.join("snapshot"), &mut log).await;
            if let Some(pb) = &bar {
                pb.finish_and_clear();
            }
            drop(scratch);
            match result {
                Ok((_, cfg)) => {
                    rec.state = ImageVersionState::Successful;
                    rec.config = Some(cfg);
                    store::save(&home, &rec)?;
                    println!("{}:v{} built", rec.name, rec.version);
                    Ok(0)
                }
                Err(e) => {
                    rec.state = ImageVersionState::Failed;
                    rec.reason = Some(e.to_string());
                    store::save(&home, &rec)?;
                    Err(anyhow::Error::new(e).context(format!(
                        "building {}:v{} failed (log: {})",
                        rec.name,
                        rec.version,
                        vdir.join("build.log").display()
                    )))
                }
            }
        }
        LocalCmd::Ls { json } => {
            let all: Vec<_> = store::names(&home).into_iter().flat_map(|n| store::versions(&home, &n)).collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                println!("{:<24} {:<8} {:<12} BASE", "NAME", "VERSION", "STATE");
                for r in all {
                    println!("{:<24} v{:<7} {:<12} {}", r.name, r.version, r.state, r.base);
                }
            }
            Ok(0)
        }
        LocalCmd::Show { image } => {
            let (name, version) = parse_ref(&image)?;
            let recs = store::versions(&home, &name);
            let rec = match version {
                Some(v) => recs.into_iter().find(|r| r.version == v),
                None => recs.into_iter().last(),
            }
            .with_context(|| format!("no image {image}"))?;
            println!("{}", serde_json::to_string_pretty(&rec)?);
            Ok(0)
        }
        LocalCmd::Rm { image } => {
            let (name, version) = parse_ref(&image)?;
            let dir = match version {
                Some(v) => store::version_dir(&home, &name, v),
                None => store::image_dir(&home, &name),
            };
            anyhow::ensure!(dir.exists(), "no image {image}");
            let users = dependents(&home, &dir);
            anyhow::ensure!(
                users.is_empty(),
                "cannot remove {image}: {} built on it (FROM hearth/{name}); remove those first",
                users.join(", ")
            );
            std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
            Ok(0)
        }
        LocalCmd::Run(a) => {
            let rec = store::resolve(&home, &a.image)?;
            let snap = Snapshot::open(&store::version_dir(&home, &rec.name, rec.version).join("snapshot"))?;
            let mut req = vmrun::exec_request(&a.cmd)?;
            // The image's WORKDIR, ENV and USER apply unless the command says otherwise.
            if let Some(c) = &rec.config {
                if req.cwd.is_none() {
                    req.cwd = Some(c.workdir.clone());
                }
                for (k, v) in &c.env {
                    req.env.entry(k.clone()).or_insert_with(|| v.clone());
                }
                if req.user.is_none() {
                    req.user = c.user.clone();
                }
            }
            let egress = a.net.egress(EgressMode::Closed)?;
            let flags_given = a.net.egress.is_some() || !a.net.allow.is_empty() || !a.net.deny.is_empty();
            match (&snap.manifest.network, &egress) {
                (None, Some(_)) if flags_given => anyhow::bail!(
                    "image {}:v{} was built without a network device (--egress none); its clones cannot have egress",
                    rec.name,
                    rec.version
                ),
                (Some(_), None) => {
                    anyhow::bail!("image {}:v{} has a network device; use --egress closed to keep everything out", rec.name, rec.version)
                }
                _ => {}
            }
            let opts = RestoreOptions { run_root: home.join("run"), timeout: Duration::from_secs(60), egress, ..RestoreOptions::new() };
            let vm = Vm::launch(&snap, &opts).await?;
            vmrun::finish(vm, &req, a.cmd.json, None).await
        }
    }
}
