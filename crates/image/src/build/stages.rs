//! The stages before the last of a multi-stage Dockerfile (`FROM … AS build`, then `COPY
//! --from=build`).
//!
//! Only the stages the image copies from (directly or through another stage) are built,
//! in order, each in a builder VM of its own on its own FROM (a managed base, a Hearth
//! image or a registry image: [`super::from`]). Its steps run as the last stage's do,
//! without the layer cache. Then the paths later stages copy from it are packed by the
//! stage's own `tar` (`tar -cf /tmp/… -C / <paths>`: the image needs a `tar`, as busybox,
//! Debian and most images have), read back through the agent's file API into the host
//! (at most [`MAX_EXPORT_BYTES`]), and unpacked into a scratch directory with the same
//! checks as registry layers ([`crate::oci::unpack_tree`]: no path escapes, no links
//! followed, one byte and entry budget for all the stages of a build together; no owner
//! and no setuid/setgid bit on the host). The VM is gone by then. Before each stage and
//! before its export is read, the host's free disk is checked
//! ([`crate::registry::check_free`]). A `COPY --from` step then
//! copies from that directory exactly as a COPY from the build context does (files through
//! the agent, links recreated by the guest), and its cache key hashes what it copies.

use super::{attach, blocking, copy, expand_step, from, run, vm_err, BuildError, BuildRequest, Control, ImageConfig};
use crate::dockerfile::{Plan, StepKind};
use hearth_proto::binpath::BinPath;
use hearth_proto::exec::ExecRequest;
use hearth_vmm::{Disk, DiskFormat, Vm, VmConfig};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Most bytes a stage's exported files may pack to.
pub const MAX_EXPORT_BYTES: u64 = 8 << 30;
/// Where the stage's `tar` writes in its guest.
const EXPORT_TAR: &str = "/tmp/.hearth-stage-export.tar";

/// What the earlier stages left for later ones: a directory per stage built.
#[derive(Default)]
pub(super) struct Exports {
    dirs: BTreeMap<usize, (tempfile::TempDir, std::path::PathBuf)>,
}

impl Exports {
    /// The directory holding what stage `i` exported.
    pub(super) fn dir(&self, i: usize) -> Option<&Path> {
        self.dirs.get(&i).map(|(_, files)| files.as_path())
    }
}

/// The stages `from` indexes the COPY steps of `kinds` name.
fn copied_from(kinds: &[StepKind]) -> impl Iterator<Item = (usize, &Vec<String>)> {
    kinds.iter().filter_map(|k| match k {
        StepKind::Copy { from: Some(i), sources, .. } => Some((*i, sources)),
        _ => None,
    })
}

/// Builds the stages the last stage (whose steps, substituted, are `last`) needs, and
/// exports what is copied from them.
pub(super) async fn run_earlier(
    req: &BuildRequest,
    plan: &Plan,
    last: &[StepKind],
    vm: &VmConfig,
    home: &Path,
    log: &mut (dyn FnMut(&str) + Send),
    ctl: &Control,
) -> Result<Exports, BuildError> {
    let mut exports = Exports::default();
    if plan.stages.is_empty() {
        return Ok(exports);
    }
    // Each stage's substituted steps, and what is copied from each, last stage first.
    let mut kinds: Vec<Option<Vec<StepKind>>> = vec![None; plan.stages.len()];
    let mut wanted: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
    for (i, sources) in copied_from(last) {
        wanted.entry(i).or_default().extend(sources.iter().cloned());
    }
    for i in (0..plan.stages.len()).rev() {
        if !wanted.contains_key(&i) {
            continue;
        }
        let k = substituted(&plan.stages[i].steps, &req.env)?;
        for (j, sources) in copied_from(&k) {
            wanted.entry(j).or_default().extend(sources.iter().cloned());
        }
        kinds[i] = Some(k);
    }
    // What all the stages' exports may unpack to, together.
    let mut budget = crate::oci::Budget::default();
    for (i, paths) in &wanted {
        let stage = &plan.stages[*i];
        let label = stage.label(*i);
        let steps = kinds[*i].take().expect("substituted above");
        log(&format!("stage {label} (line {}): FROM {}", stage.line, stage.from));
        let s = Stage { index: *i, stage, kinds: &steps, paths };
        let dir = build_stage(req, s, &exports, &mut budget, vm, home, log, ctl).await?;
        let files = dir.path().join("files");
        exports.dirs.insert(*i, (dir, files));
    }
    Ok(exports)
}

/// A stage's steps with ARG/ENV substituted (as the last stage's are, up front).
fn substituted(steps: &[crate::dockerfile::Step], env: &BTreeMap<String, String>) -> Result<Vec<StepKind>, BuildError> {
    let (mut args, mut env) = (BTreeMap::new(), env.clone());
    let mut out = Vec::with_capacity(steps.len());
    for step in steps {
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
    Ok(out)
}

/// One stage to build: its index, its Dockerfile part, its substituted steps, and the
/// paths later stages copy from it.
struct Stage<'a> {
    index: usize,
    stage: &'a crate::dockerfile::Stage,
    kinds: &'a [StepKind],
    paths: &'a BTreeSet<String>,
}

#[allow(clippy::too_many_arguments)]
async fn build_stage(
    req: &BuildRequest,
    Stage { index, stage, kinds, paths }: Stage<'_>,
    exports: &Exports,
    budget: &mut crate::oci::Budget,
    vm: &VmConfig,
    home: &Path,
    log: &mut (dyn FnMut(&str) + Send),
    ctl: &Control,
) -> Result<tempfile::TempDir, BuildError> {
    let step_timeout = ctl.step_timeout;
    let cache = req.cache.clone().unwrap_or_else(|| crate::layers::LayerCache::new(home));
    let short = |e: String| BuildError::Context(format!("stage {}: {e}", stage.label(index)));
    crate::registry::check_free(cache.dir(), 0).map_err(short)?;
    let start = from::start(req, Some(&stage.from), vm.arch, home, log).await?;
    let mut cfg = start.config.unwrap_or_else(|| ImageConfig { workdir: "/".into(), ..Default::default() });
    cfg.env.extend(req.env.clone());
    // The stage's disk: an overlay in a scratch directory (0700, the tempfile crate's
    // default), gone with it.
    let scratch = {
        let dir = cache.dir().to_path_buf();
        blocking(move || {
            std::fs::create_dir_all(&dir)?;
            tempfile::Builder::new().prefix(".stage-").tempdir_in(&dir)
        })
        .await
        .map_err(|e| BuildError::Vm(format!("stage scratch directory: {e}")))?
    };
    let disk = scratch.path().join("disk.qcow2");
    {
        let (parent, format, disk) = (start.rootfs.clone(), start.format, disk.clone());
        blocking(move || hearth_vmm::qemu::create_overlay(&parent, format.as_str(), &disk)).await.map_err(BuildError::Vm)?;
    }
    let mut cfg_vm = vm.clone();
    cfg_vm.root = Some(Disk::owned(&disk, DiskFormat::Qcow2));
    cfg_vm.network = req.network.clone();
    log(&format!("stage {}: booting a builder VM on {}", stage.label(index), start.label));
    let builder = Vm::boot(cfg_vm).await.map_err(vm_err)?;
    // The daemon's metadata relay, as for the last stage's builder.
    let attached = attach::Attachment::to(ctl.builder_hook.as_ref(), &builder);
    let mut args: BTreeMap<String, String> = BTreeMap::new();
    for (step, kind) in stage.steps.iter().zip(kinds) {
        let line = step.line;
        log(&format!("stage {} (line {line}): {kind:?}", stage.label(index)));
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
                StepKind::Copy { sources, dest: to, chown, from } => {
                    let context = match from {
                        Some(j) => exports
                            .dir(*j)
                            .ok_or_else(|| BuildError::Context(format!("Dockerfile line {line}: stage {j} was not built")))?,
                        None => req.context.as_path(),
                    };
                    let c = copy::Copy { sources, to, chown: chown.as_deref(), workdir: &cfg.workdir, line };
                    copy::copy(&builder, context, c, log).await?;
                }
                StepKind::Run(c) => {
                    let mut r = match c {
                        crate::dockerfile::Command::Shell(s) => ExecRequest::shell(s.clone()),
                        crate::dockerfile::Command::Exec(v) => ExecRequest::argv(v.clone()),
                    };
                    r.env = args.clone();
                    r.env.extend(cfg.env.clone());
                    r.cwd = Some(cfg.workdir.clone());
                    r.user = cfg.user.clone();
                    run(&builder, &r, line, log).await?;
                }
                // What only the image keeps (its app, labels, ports) means nothing here.
                StepKind::Label(_) | StepKind::Expose(_) | StepKind::Entrypoint(_) | StepKind::Cmd(_) => {}
            }
            Ok::<(), BuildError>(())
        })
        .await;
        match stepped {
            Ok(r) => r?,
            Err(_) => return Err(BuildError::StepTimeout { line, timeout: step_timeout }),
        }
    }
    // Pack what later stages copy, by the stage's own tar.
    let mut argv = vec!["tar".to_owned(), "-cf".into(), EXPORT_TAR.into(), "-C".into(), "/".into()];
    for p in paths {
        let rel = super::context_path(p)?;
        argv.push(if rel.as_os_str().is_empty() { ".".into() } else { rel.display().to_string() });
    }
    log(&format!("stage {}: exporting {}", stage.label(index), paths.iter().cloned().collect::<Vec<_>>().join(" ")));
    run(&builder, &ExecRequest::argv(argv), stage.line, log).await?;
    let tar = scratch.path().join("export.tar");
    crate::registry::check_free(scratch.path(), 0).map_err(short)?;
    read_guest_file(&builder, EXPORT_TAR, &tar).await?;
    attached.stop().await;
    drop(builder);
    let out = scratch.path().join("files");
    let unpacked = {
        let (tar, out, mut left) = (tar.clone(), out.clone(), *budget);
        blocking(move || {
            std::fs::create_dir(&out).map_err(crate::io("create the export directory"))?;
            crate::oci::unpack_tree(&tar, &out, &mut left)?;
            let _ = std::fs::remove_file(&tar);
            Ok::<crate::oci::Budget, crate::RootfsError>(left)
        })
        .await
    };
    *budget = unpacked.map_err(|e| BuildError::Context(format!("stage {}: its exported files: {e}", stage.label(index))))?;
    let _ = std::fs::remove_file(&disk);
    // The scratch directory now holds only `files/`: the export, removed when dropped.
    Ok(scratch)
}

/// Streams the guest's `path` into the host file `to`, at most [`MAX_EXPORT_BYTES`].
async fn read_guest_file(vm: &Vm, path: &str, to: &Path) -> Result<(), BuildError> {
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;
    let mut chunks = vm.agent().read_file(&BinPath::from(path), 0, None).await.map_err(vm_err)?;
    let mut f = tokio::fs::File::create(to).await.map_err(|e| BuildError::Vm(format!("create {}: {e}", to.display())))?;
    let mut total = 0u64;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(vm_err)?;
        total += chunk.len() as u64;
        if total > MAX_EXPORT_BYTES {
            return Err(BuildError::Context(format!("a stage's exported files pack to over {MAX_EXPORT_BYTES} bytes")));
        }
        f.write_all(&chunk).await.map_err(|e| BuildError::Vm(format!("write {}: {e}", to.display())))?;
    }
    f.flush().await.map_err(|e| BuildError::Vm(format!("write {}: {e}", to.display())))
}
