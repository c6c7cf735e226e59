//! Building an image: a Dockerfile's plan run in a builder microVM, the app started and
//! waited for (listening on its port, or answering `/ready` when the image enables that
//! hook; then `/validate` when it enables that one), and the VM saved as a template
//! snapshot that clones launch from with the app already running. An image without an
//! app (no ENTRYPOINT or CMD) is saved as soon as its steps have run.
//!
//! Steps run in order in one builder VM. After each step that changes the disk, the disk
//! is checkpointed into the layer cache ([`crate::layers`]); a rebuild boots the builder
//! on the last layer whose key still matches and runs only the steps after it. RUN steps
//! reach the network through the builder's own namespace with internet egress (package
//! managers work; the host and private ranges stay closed).

use crate::base::Base;
use crate::dockerfile::{self, Command, StepKind};
use crate::layers::{self, LayerCache};
use hearth_proto::exec::ExecRequest;
use hearth_vmm::{Disk, DiskFormat, Memory, Snapshot, Vm, VmConfig};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

// Running a step's command and the app's readiness check in the builder.
mod exec;
use exec::{run, wait_ready};

// Timeouts, cancellation and the bounded output tail.
pub mod limits;
pub use limits::Control;

// What the daemon attaches to each builder VM (its metadata relay).
pub mod attach;
pub use attach::{Attached, BuilderHook};

// The bounded build log.
pub mod log;
pub use log::BuildLog;

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    /// The build context: a directory with the Dockerfile at its root.
    pub context: PathBuf,
    /// The base image the build starts from.
    pub base: Base,
    /// Environment variables for the steps and the app.
    pub env: BTreeMap<String, String>,
    /// The app's hooks port inside the VM (also the port it listens on).
    pub hooks_port: u16,
    /// Wait for the app to answer `/ready` with 200 (the image's ready hook ENABLED);
    /// otherwise the app is ready once it listens on [`Self::hooks_port`].
    pub ready_hook: bool,
    /// How long the app may take to be ready (either way).
    pub ready_timeout: Duration,
    /// Call `/validate` once the app is ready (so pages the app uses are warm in the
    /// snapshot): the image's validate hook ENABLED.
    pub validate: bool,
    /// How long `/validate` may take to answer.
    pub validate_timeout: Duration,
    /// The builder VM's egress (`None`: no network device, needs no root).
    pub network: Option<hearth_vmm::net::Egress>,
    /// The layer cache to reuse and record layers in (`None`: no cache). Each tenant has
    /// its own: a layer is the disk a build produced, and a tenant's disk is its own.
    pub cache: Option<LayerCache>,
    /// Where `FROM hearth/NAME[:vN]` looks: the host's image store for the operator's
    /// `hearth images local build`, only the tenant's own images for API builds.
    pub images: std::sync::Arc<dyn ImageResolver>,
    /// The root disk's size in GiB ([`crate::disk`]; `None`: what the base or the parent
    /// image has, [`crate::disk::DEFAULT_DISK_GIB`] at least). Never shrinks a disk.
    pub disk_gib: Option<u64>,
    /// What else a step's output depends on, part of every layer's key: the daemon puts
    /// the build role there (a RUN step reads what its role may read, so a layer made
    /// under one role is never reused by a build under another). `None`: nothing.
    pub cache_scope: Option<String>,
}

// What `FROM hearth/…` resolves to and where `FROM <OCI reference>` pulls from.
mod images;
pub use images::{FromImage, HostImages, ImageResolver, NoImages};

/// The runtime configuration an image records (from ENV, WORKDIR, USER, …).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// Working directory.
    pub workdir: String,
    /// User.
    pub user: Option<String>,
    /// The app's command line as run (`/bin/sh -c` string).
    pub app: Option<String>,
    /// LABELs.
    pub labels: BTreeMap<String, String>,
    /// EXPOSEd ports.
    pub expose: Vec<String>,
}

/// Why a build failed. Nothing is left behind: the builder VM is gone, no snapshot.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The Dockerfile is missing, unreadable or unsupported.
    #[error(transparent)]
    Dockerfile(#[from] dockerfile::DockerfileError),
    /// The context is unusable.
    #[error("{0}")]
    Context(String),
    /// A RUN step failed.
    #[error("Dockerfile line {line}: RUN failed ({status}); last output:\n{tail}")]
    RunFailed {
        /// Line of the step.
        line: usize,
        /// Exit code or signal.
        status: String,
        /// Last lines of its output.
        tail: String,
    },
    /// The app never became ready (never listened on its port, or never answered `/ready`
    /// with 200), or `/validate` did not answer 200.
    #[error("the app did not become ready ({reason}); its output:\n{app_log}")]
    NotReady {
        /// What was seen.
        reason: String,
        /// The app's output.
        app_log: String,
    },
    /// A step filled the root disk.
    #[error("Dockerfile line {line}: {hint}. The step failed: {detail}")]
    DiskFull {
        /// Line of the step.
        line: usize,
        /// What to do (grow the disk with the image's tag).
        hint: String,
        /// The step's failure as it was.
        detail: String,
    },
    /// The builder VM failed.
    #[error("builder VM: {0}")]
    Vm(String),
    /// A step ran past the step timeout; the builder VM was stopped.
    #[error("Dockerfile line {line}: the step did not finish within its timeout of {} s; the builder VM was stopped", timeout.as_secs())]
    StepTimeout {
        /// Line of the step.
        line: usize,
        /// The step timeout.
        timeout: Duration,
    },
    /// The build ran past the build timeout; the builder VM was stopped.
    #[error("the build did not finish within its timeout of {} s; the builder VM was stopped", timeout.as_secs())]
    BuildTimeout {
        /// The build timeout.
        timeout: Duration,
    },
    /// The build was cancelled by its owner ([`Control::cancel`]); the builder VM was stopped.
    #[error("the build was cancelled; the builder VM was stopped")]
    Cancelled,
    /// A variable substitution is malformed.
    #[error("Dockerfile line {line}: {source}")]
    Expand {
        /// Line of the step.
        line: usize,
        /// What is wrong.
        #[source]
        source: crate::expand::ExpandError,
    },
}

/// The step with `$VAR` / `${VAR…}` substituted where Docker substitutes (COPY, ENV, ARG,
/// WORKDIR, USER, LABEL, EXPOSE; not RUN, whose shell expands its own variables from the
/// environment it gets, nor ENTRYPOINT/CMD). ENV values win over ARG values.
fn expand_step(
    kind: &StepKind,
    line: usize,
    args: &BTreeMap<String, String>,
    env: &BTreeMap<String, String>,
) -> Result<StepKind, BuildError> {
    let vars = |k: &str| env.get(k).or_else(|| args.get(k)).cloned();
    let x = |w: &str| crate::expand::expand(w, &vars).map_err(|source| BuildError::Expand { line, source });
    let pairs = |v: &[(String, String)]| v.iter().map(|(k, v)| Ok((k.clone(), x(v)?))).collect::<Result<Vec<_>, BuildError>>();
    Ok(match kind {
        StepKind::Copy { sources, dest, chown, from } => StepKind::Copy {
            sources: sources.iter().map(|s| x(s)).collect::<Result<_, _>>()?,
            dest: x(dest)?,
            chown: chown.as_deref().map(x).transpose()?,
            from: *from,
        },
        StepKind::Env(v) => StepKind::Env(pairs(v)?),
        StepKind::Label(v) => StepKind::Label(pairs(v)?),
        StepKind::Arg(k, v) => StepKind::Arg(k.clone(), v.as_deref().map(x).transpose()?),
        StepKind::Workdir(p) => StepKind::Workdir(x(p)?),
        StepKind::User(u) => StepKind::User(x(u)?),
        StepKind::Expose(p) => StepKind::Expose(p.iter().map(|s| x(s)).collect::<Result<_, _>>()?),
        other => other.clone(),
    })
}

/// A step's failure that shows the disk filled up, as [`BuildError::DiskFull`].
fn disk_full(e: BuildError, line: usize, gib: u64) -> BuildError {
    let detail = e.to_string();
    match crate::disk::full_hint(&detail, gib) {
        Some(hint) => BuildError::DiskFull { line, hint, detail },
        None => e,
    }
}

fn vm_err(e: impl std::fmt::Display) -> BuildError {
    BuildError::Vm(e.to_string())
}

/// Single-quotes `s` for `/bin/sh`.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn shell_line(c: &Command) -> String {
    match c {
        Command::Shell(s) => s.clone(),
        Command::Exec(v) => v.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" "),
    }
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// Where a stage starts: a managed base, a Hearth image, or a registry's image.
mod from;
// The stages before the last (multi-stage builds).
mod stages;

// COPY sources: resolved beneath the context root, never through a link.
mod context;
pub(crate) use context::{context_path, walk, Item};

// The COPY step.
mod copy;

/// Most bytes of a Dockerfile.
const MAX_DOCKERFILE: u64 = 1 << 20;

/// The context's Dockerfile, opened beneath the context without following a link (a
/// tenant's `Dockerfile -> /etc/shadow` must not make the build quote the host's file).
/// Messages name the Dockerfile only, never where the context lies on the host.
fn read_dockerfile(context: &Path) -> Result<String, BuildError> {
    let refused = |why: &str| BuildError::Context(format!("the build context's Dockerfile {why}"));
    let dir = crate::beneath::Dir::open(context).map_err(|_| refused("cannot be read: the context is not a directory"))?;
    let meta = dir.metadata(Path::new("Dockerfile")).map_err(|_| refused("is missing: put one at the context's root"))?;
    if meta.kind != crate::beneath::Kind::File {
        return Err(refused(&format!("is {}, not a regular file", meta.kind.describe())));
    }
    if meta.len > MAX_DOCKERFILE {
        return Err(refused(&format!("is over {MAX_DOCKERFILE} bytes")));
    }
    let f = dir.open_file(Path::new("Dockerfile")).map_err(|_| refused("cannot be opened"))?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(f, MAX_DOCKERFILE), &mut text).map_err(|_| refused("is not UTF-8 text"))?;
    Ok(text)
}

/// Runs synchronous file work (hashing the context, reading files, `qemu-img`, fsync) on
/// the blocking pool, off the async runtime's workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(t) => t,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Runs the build in a VM made from `vm` (kernel, initramfs, run directory, accelerator;
/// root disk and memory are set here) and saves the template into `dest`, under the
/// default limits ([`Control::default`]) and never cancelled.
///
/// # Errors
///
/// [`BuildError`]: what failed, with the step's line and output where a step did.
pub async fn build(
    req: &BuildRequest,
    vm: VmConfig,
    home: &Path,
    dest: &Path,
    log: &mut (dyn FnMut(&str) + Send),
) -> Result<(Snapshot, ImageConfig), BuildError> {
    build_with(req, vm, home, dest, log, &Control::default()).await
}

/// [`build`] under `ctl`'s step and build timeouts, cancelled when `ctl` says so. Whatever
/// stops it, nothing is left: the builder VM is killed (its QEMU guard), its run directory,
/// the unrecorded layer file and the staging snapshot are removed as the build's future
/// is dropped.
///
/// # Errors
///
/// [`BuildError::StepTimeout`], [`BuildError::BuildTimeout`], [`BuildError::Cancelled`], or
/// what [`build`] fails with.
pub async fn build_with(
    req: &BuildRequest,
    vm: VmConfig,
    home: &Path,
    dest: &Path,
    log: &mut (dyn FnMut(&str) + Send),
    ctl: &Control,
) -> Result<(Snapshot, ImageConfig), BuildError> {
    tokio::select! {
        r = run_build(req, vm, home, dest, log, ctl) => r,
        () = tokio::time::sleep(ctl.build_timeout) => Err(BuildError::BuildTimeout { timeout: ctl.build_timeout }),
        () = ctl.cancelled() => Err(BuildError::Cancelled),
    }
}

/// The architecture of the image whose snapshot holds `disk` (its manifest beside it),
/// when there is one to read.
fn from_arch(disk: &Path) -> Option<hearth_vmm::Arch> {
    let manifest = disk.parent()?.join("manifest.json");
    if std::fs::metadata(&manifest).ok()?.len() > hearth_vmm::snapshot::MAX_MANIFEST_BYTES {
        return None;
    }
    let m: hearth_vmm::snapshot::Manifest = serde_json::from_slice(&std::fs::read(&manifest).ok()?).ok()?;
    Some(m.arch)
}

async fn run_build(
    req: &BuildRequest,
    mut vm: VmConfig,
    home: &Path,
    dest: &Path,
    log: &mut (dyn FnMut(&str) + Send),
    ctl: &Control,
) -> Result<(Snapshot, ImageConfig), BuildError> {
    let step_timeout = ctl.step_timeout;
    let context = req.context.clone();
    let text = blocking(move || read_dockerfile(&context)).await?;
    let plan = dockerfile::parse(&text)?;
    // The FROM rule ([`dockerfile::from_source`]): a managed base, a Hearth image, or an
    // image pulled from its registry (see `build/from.rs`).
    let start = from::start(req, plan.from.as_deref(), vm.arch, home, log).await?;
    let (rootfs, rootfs_format, base_name, inherited) = (start.rootfs, start.format, start.label, start.config);
    // An image built on another starts from its configuration, as Docker's FROM does.
    let inherited_app = inherited.as_ref().and_then(|c| c.app.clone());
    let mut cfg = inherited.unwrap_or_else(|| ImageConfig { workdir: "/".into(), ..Default::default() });
    cfg.app = None;
    cfg.env.extend(req.env.clone());
    // Substitutions depend only on earlier ARG/ENV steps, so they are all made up front:
    // the cache keys must see what a step really copies.
    let kinds = {
        let (mut args, mut env) = (BTreeMap::new(), cfg.env.clone());
        let mut out = Vec::with_capacity(plan.steps.len());
        for step in &plan.steps {
            let k = expand_step(&step.kind, step.line, &args, &env)?;
            match &k {
                StepKind::Arg(name, v) => {
                    args.insert(name.clone(), v.clone().unwrap_or_default());
                }
                StepKind::Env(vars) => env.extend(vars.iter().cloned()),
                _ => {}
            }
            out.push(k);
        }
        out
    };
    // The stages before the last that it copies from are built first (`build/stages.rs`).
    let exports = stages::run_earlier(req, &plan, &kinds, &vm, home, log, ctl).await?;
    // The builder's network shows in its disk (the agent writes /etc/resolv.conf), so it
    // is part of the first key.
    let mut base_key = format!("{}|network={}", layers::base_id(&rootfs), req.network.is_some());
    // A bigger disk is another first layer (the agent grows the filesystem in it).
    if let Some(g) = req.disk_gib {
        base_key.push_str(&format!("|disk={g}GiB"));
    }
    if let Some(scope) = &req.cache_scope {
        base_key.push_str(&format!("|scope={scope}"));
    }
    // Hashing reads every file COPY names: on the blocking pool.
    let keys = {
        let (context, env, kinds) = (req.context.clone(), cfg.env.clone(), kinds.clone());
        let stage_dirs: BTreeMap<usize, PathBuf> =
            (0..plan.stages.len()).filter_map(|i| exports.dir(i).map(|d| (i, d.to_path_buf()))).collect();
        let resolve = move |stage: Option<usize>, s: &str| {
            let root = match stage {
                Some(i) => stage_dirs.get(&i)?.clone(),
                None => context.clone(),
            };
            context_path(s).ok().map(|rel| (root, rel))
        };
        blocking(move || layers::step_keys(&base_key, &env, &kinds, resolve)).await
    }
    .map_err(|e| BuildError::Context(format!("hash the build context: {e}")))?;
    // The last step whose layer is cached; everything up to it is reused.
    let hit = req.cache.as_ref().and_then(|cache| {
        plan.steps
            .iter()
            .enumerate()
            .rev()
            .filter(|(_, s)| layers::changes_disk(&s.kind))
            .find_map(|(i, _)| cache.lookup(&keys[i]).map(|p| (i, p)))
    });
    // Without a cache the builder's disk is still created in the host's layer directory
    // (it moves into the snapshot), just never recorded.
    let cache = req.cache.clone().unwrap_or_else(|| LayerCache::new(home));
    let (parent, parent_format) = match &hit {
        Some((i, layer)) => {
            log(&format!("using cached layers up to step {}/{} (line {})", i + 1, plan.steps.len(), plan.steps[*i].line));
            (layer.clone(), DiskFormat::Qcow2)
        }
        None => (rootfs, rootfs_format),
    };
    // The builder writes straight into a new layer file in the cache; until a step's
    // layer is recorded, the file is removed if the build fails (after the VM is gone:
    // `active` is declared before the VM, so it drops after it).
    let active = ActiveLayer(Some(cache.new_file().map_err(|e| BuildError::Vm(format!("layer cache {}: {e}", cache.dir().display())))?));
    let work = active.path().to_path_buf();
    // `qemu-img` (or a copy of the cached overlay) on the blocking pool. The guard travels
    // with the work: a build dropped meanwhile leaves the file to the closure, whose end
    // removes it.
    let (mut active, made) = blocking(move || {
        let made = hearth_vmm::qemu::create_overlay(&parent, parent_format.as_str(), active.path());
        (active, made)
    })
    .await;
    made.map_err(BuildError::Vm)?;
    // The root disk's size: the overlay grown before the builder boots (the agent grows
    // the filesystem to fill it); what a full disk's error names.
    let disk_gib = {
        let (disk, want) = (work.clone(), req.disk_gib);
        blocking(move || {
            if let Some(g) = want {
                crate::disk::grow_qcow2(&disk, g)?;
            }
            crate::disk::virtual_size(&disk).map(|b| b >> 30)
        })
        .await
        .map_err(BuildError::Vm)?
    };
    vm.root = Some(Disk::owned(&work, DiskFormat::Qcow2));
    vm.memory = Memory::SnapshotReady;
    vm.network = req.network.clone();
    log(&format!(
        "booting a builder VM on {base_name}{}",
        if req.network.is_some() { " (network: internet egress)" } else { " (no network)" }
    ));
    let mut builder = Vm::boot(vm).await.map_err(vm_err)?;
    // The daemon's metadata relay, before any step runs: RUN steps and the image's hooks
    // get the build role's credentials. Dropped with the builder if the build fails.
    let attached = attach::Attachment::to(ctl.builder_hook.as_ref(), &builder);

    let mut args: BTreeMap<String, String> = BTreeMap::new();
    let (mut entrypoint, mut cmd) = (None, None);
    let total = plan.steps.len();
    for (i, step) in plan.steps.iter().enumerate() {
        let cached = hit.as_ref().is_some_and(|(h, _)| i <= *h);
        log(&format!("step {}/{total} (line {}){}: {:?}", i + 1, step.line, if cached { " [cached]" } else { "" }, step.kind));
        let kind = &kinds[i];
        if cached {
            // Reused from the cache: only the step's effect on the configuration remains.
            match kind {
                StepKind::Arg(k, v) => {
                    args.insert(k.clone(), v.clone().unwrap_or_default());
                }
                StepKind::Env(vars) => cfg.env.extend(vars.iter().cloned()),
                StepKind::Workdir(p) => {
                    cfg.workdir = if p.starts_with('/') { p.clone() } else { format!("{}/{p}", cfg.workdir.trim_end_matches('/')) }
                }
                StepKind::User(u) => cfg.user = Some(u.clone()),
                StepKind::Label(l) => cfg.labels.extend(l.iter().cloned()),
                StepKind::Expose(p) => cfg.expose.extend(p.iter().cloned()),
                StepKind::Entrypoint(c) => entrypoint = Some(c.clone()),
                StepKind::Cmd(c) => cmd = Some(c.clone()),
                StepKind::Run(_) | StepKind::Copy { .. } => {}
            }
            continue;
        }
        // Each step under the step timeout: a step that runs past it is dropped where it
        // stands (its exec with it) and the build fails; the builder is killed as it drops.
        let line = step.line;
        let stepped = tokio::time::timeout(step_timeout, async {
            match kind {
                StepKind::Arg(k, v) => {
                    args.insert(k.clone(), v.clone().unwrap_or_default());
                }
                StepKind::Env(vars) => cfg.env.extend(vars.iter().cloned()),
                StepKind::Workdir(p) => {
                    let abs = if p.starts_with('/') { p.clone() } else { format!("{}/{p}", cfg.workdir.trim_end_matches('/')) };
                    run(&builder, &ExecRequest::argv(["mkdir", "-p", abs.as_str()]), line, log).await?;
                    cfg.workdir = abs;
                }
                StepKind::User(u) => cfg.user = Some(u.clone()),
                StepKind::Label(l) => cfg.labels.extend(l.iter().cloned()),
                StepKind::Expose(p) => cfg.expose.extend(p.iter().cloned()),
                StepKind::Entrypoint(c) => entrypoint = Some(c.clone()),
                StepKind::Cmd(c) => cmd = Some(c.clone()),
                StepKind::Copy { sources, dest: to, chown, from } => {
                    // `--from=<stage>`: that stage's exported files instead of the context.
                    let context = match from {
                        Some(i) => exports
                            .dir(*i)
                            .ok_or_else(|| BuildError::Context(format!("Dockerfile line {line}: stage {i} was not built")))?,
                        None => req.context.as_path(),
                    };
                    let c = copy::Copy { sources, to, chown: chown.as_deref(), workdir: &cfg.workdir, line };
                    copy::copy(&builder, context, c, log).await?;
                }
                StepKind::Run(c) => {
                    let mut r = match c {
                        Command::Shell(s) => ExecRequest::shell(s.clone()),
                        Command::Exec(v) => ExecRequest::argv(v.clone()),
                    };
                    r.env = args.clone();
                    r.env.extend(cfg.env.clone());
                    r.cwd = Some(cfg.workdir.clone());
                    r.user = cfg.user.clone();
                    run(&builder, &r, line, log).await?;
                }
            }
            if req.cache.is_some() && layers::changes_disk(&step.kind) {
                // Freeze the disk as this step's layer: flush the guest's page cache, switch
                // QEMU to a new file, then record the finished one (fsync: blocking pool).
                run(&builder, &ExecRequest::argv(["sync"]), line, log).await?;
                let next = cache.new_file().map_err(|e| BuildError::Vm(format!("layer cache: {e}")))?;
                let done = builder.checkpoint_disk(&next).await.map_err(vm_err)?;
                active.0 = Some(next);
                let (cache, key) = (cache.clone(), keys[i].clone());
                blocking(move || cache.record(&key, &done)).await.map_err(|e| BuildError::Vm(format!("record layer: {e}")))?;
            }
            Ok::<(), BuildError>(())
        })
        .await;
        match stepped {
            Ok(r) => r.map_err(|e| disk_full(e, line, disk_gib))?,
            Err(_) => return Err(BuildError::StepTimeout { line, timeout: step_timeout }),
        }
    }

    // The app: ENTRYPOINT and CMD combined as Docker does, started in the background.
    cfg.app = match (&entrypoint, &cmd) {
        (Some(e @ Command::Exec(_)), Some(c @ Command::Exec(_))) => Some(format!("{} {}", shell_line(e), shell_line(c))),
        (Some(e), _) => Some(shell_line(e)),
        (None, Some(c)) => Some(shell_line(c)),
        (None, None) => inherited_app,
    };
    if let Some(app) = &cfg.app {
        log(&format!("starting the app: {app}"));
        let mut r = ExecRequest::shell(format!("({app}) >/tmp/hearth-app.log 2>&1 </dev/null &"));
        r.env = cfg.env.clone();
        r.cwd = Some(cfg.workdir.clone());
        r.user = cfg.user.clone();
        run(&builder, &r, 0, log).await?;
        wait_ready(&builder, req, log).await?;
    }
    // Stopped (and what it issued revoked) before the template is saved: no relay stream
    // is pending on the agent channel at the snapshot, and credentials the guest's RAM
    // still holds are dead.
    attached.stop().await;
    log("saving the template snapshot");
    let snap = builder.snapshot_template(dest).await.map_err(vm_err)?;
    // The active layer moved into the snapshot as its disk.
    active.0 = None;
    Ok((snap, cfg))
}

/// The layer file the builder writes, removed if the build fails.
struct ActiveLayer(Option<PathBuf>);

impl ActiveLayer {
    fn path(&self) -> &Path {
        self.0.as_deref().expect("set while building")
    }
}

impl Drop for ActiveLayer {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}
