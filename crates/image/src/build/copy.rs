//! The COPY step: files read from the build context on the blocking pool (through
//! [`beneath::Dir`], never through a link: see [`super::context`]) and written into the
//! builder by its agent; links recreated by the guest after the files.

use super::context::{self, context_path, walk, Item};
use super::{blocking, run, vm_err, BuildError};
use crate::beneath;
use bytes::Bytes;
use hearth_proto::binpath::BinPath;
use hearth_proto::exec::ExecRequest;
use hearth_vmm::Vm;
use std::path::Path;
use std::sync::Arc;

/// What one COPY step copies, and where.
pub(super) struct Copy<'a> {
    /// The sources, relative to the context.
    pub sources: &'a [String],
    /// The destination as written (relative to `workdir` unless absolute).
    pub to: &'a str,
    /// The owner to give what was copied.
    pub chown: Option<&'a str>,
    /// The working directory at this step.
    pub workdir: &'a str,
    /// The step's Dockerfile line.
    pub line: usize,
}

/// Copies `c` from the build context `context` into the builder.
pub(super) async fn copy(builder: &Vm, context: &Path, c: Copy<'_>, log: &mut (dyn FnMut(&str) + Send)) -> Result<(), BuildError> {
    let Copy { sources, to, chown, workdir, line } = c;
    let to_abs = if to.starts_with('/') { to.to_owned() } else { format!("{}/{to}", workdir.trim_end_matches('/')) };
    let into_dir = to.ends_with('/') || sources.len() > 1;
    let root = {
        let context = context.to_path_buf();
        blocking(move || beneath::Dir::open(&context)).await
    }
    .map(Arc::new)
    .map_err(|e| BuildError::Context(format!("open the build context: {e}")))?;
    // Files are written from the host; links are recreated by the guest, after the files
    // (a link may name one of them), and never read through here.
    let (mut targets, mut links) = (Vec::new(), Vec::new());
    for src in sources {
        let from = context_path(src)?;
        let items = {
            let (root, from) = (root.clone(), from.clone());
            blocking(move || walk(&root, &from)).await
        }
        .map_err(|e| context::copy_error(src, e))?;
        for item in items {
            let target = if item.rel().as_os_str().is_empty() {
                if into_dir {
                    format!("{}/{}", to_abs.trim_end_matches('/'), from.file_name().and_then(|n| n.to_str()).unwrap_or("file"))
                } else {
                    to_abs.clone()
                }
            } else {
                format!("{}/{}", to_abs.trim_end_matches('/'), item.rel().display())
            };
            match item {
                Item::File { rel, mode } => {
                    let (root, path) = (root.clone(), context::at(&from, &rel));
                    let data = blocking(move || {
                        let mut data = Vec::new();
                        root.open_file(&path).and_then(|mut f| std::io::Read::read_to_end(&mut f, &mut data)).map(|_| data)
                    })
                    .await
                    .map_err(|e| context::copy_error(src, e))?;
                    builder
                        .agent()
                        .write_file_bytes(&BinPath::from(target.as_str()), Some(mode & 0o777), Bytes::from(data))
                        .await
                        .map_err(vm_err)?;
                }
                Item::Link { rel, target: link_to } => {
                    let link_to = link_to.to_str().ok_or_else(|| {
                        BuildError::Context(format!(
                            "COPY {src}: the target of the link {} is not UTF-8",
                            context::at(&from, &rel).display()
                        ))
                    })?;
                    links.push((target.clone(), link_to.to_owned()));
                }
            }
            targets.push(target);
        }
    }
    for script in context::link_scripts(&links) {
        run(builder, &ExecRequest::shell(script), line, log).await?;
    }
    if let Some(owner) = chown {
        // `-h`: a link's own owner, not its target's.
        let mut argv = vec!["chown".to_owned(), "-h".to_owned(), owner.to_owned()];
        argv.extend(targets);
        run(builder, &ExecRequest::argv(argv), line, log).await?;
    }
    Ok(())
}
