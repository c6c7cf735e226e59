//! Dockerfiles, parsed with the `dockerfile-parser` crate and turned into a build plan.
//!
//! Supported: FROM (any number of stages, `AS name`), RUN (shell and exec forms), COPY and
//! ADD from the build context (with `--chown`), `COPY --from=<earlier stage>`, ENV, ARG,
//! WORKDIR, USER, LABEL, EXPOSE, ENTRYPOINT, CMD. Anything else — HEALTHCHECK, VOLUME,
//! SHELL, ONBUILD, STOPSIGNAL, `FROM --platform`, a stage built FROM an earlier stage,
//! `COPY --from=<image>`, ADD of a URL — is an error naming its line, never ignored.
//!
//! The FROM rule ([`from_source`]), for each stage, in this order:
//! 1. no FROM: the base image the build request names (`baseImageArn`, `--base`);
//! 2. `FROM hearth/NAME[:vN]`: a Hearth image (the tenant's own, for API builds);
//! 3. the requested base's name or one of its aliases ([`crate::base::Base::is_named`]:
//!    `debian:bookworm` on `debian-bookworm`, `busybox` on `minimal`, …): that managed base,
//!    nothing downloaded;
//! 4. anything else is an OCI image reference (`python:3.12-slim`, `ghcr.io/o/i@sha256:…`),
//!    pulled from its registry ([`crate::registry`]). A fully qualified reference
//!    (`docker.io/library/debian:bookworm`) is never taken for a managed base, and a Docker
//!    Hub repository under `hearth/` is written `docker.io/hearth/…`.

use dockerfile_parser::{Dockerfile, Instruction, ShellOrExecExpr};

/// How a RUN, ENTRYPOINT or CMD gives its command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// A string for `/bin/sh -c`.
    Shell(String),
    /// An argument vector.
    Exec(Vec<String>),
}

/// One build step, with its 1-based line in the Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Line of the instruction.
    pub line: usize,
    /// What to do.
    pub kind: StepKind,
}

/// What a step does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepKind {
    /// Run a command in the builder VM.
    Run(Command),
    /// Copy files of the build context into the image.
    Copy {
        /// Paths relative to the context root.
        sources: Vec<String>,
        /// Destination inside the image (relative to WORKDIR when not absolute).
        dest: String,
        /// `--chown=user[:group]`.
        chown: Option<String>,
        /// `--from=<stage>`: the index of the earlier stage whose files are copied (its
        /// root, not the context, is what `sources` are relative to).
        from: Option<usize>,
    },
    /// Set environment variables for later steps and the app.
    Env(Vec<(String, String)>),
    /// Declare a build argument with its default.
    Arg(String, Option<String>),
    /// Working directory for later steps and the app.
    Workdir(String),
    /// User for later steps and the app.
    User(String),
    /// Image labels.
    Label(Vec<(String, String)>),
    /// Ports the app listens on (documentation, as in Docker).
    Expose(Vec<String>),
    /// The app's entrypoint.
    Entrypoint(Command),
    /// The app's command (or the entrypoint's arguments).
    Cmd(Command),
}

/// A parsed, validated Dockerfile: its last stage (the image) and the stages before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The last FROM line's image, if there is one.
    pub from: Option<String>,
    /// The last stage's steps, in order.
    pub steps: Vec<Step>,
    /// The stages before the last, in order (index `i` is `COPY --from=i`).
    pub stages: Vec<Stage>,
}

/// A stage before the last: built only for what later stages copy from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// `AS name`, lower case.
    pub name: Option<String>,
    /// Its FROM image.
    pub from: String,
    /// Line of its FROM.
    pub line: usize,
    /// Its steps, in order.
    pub steps: Vec<Step>,
}

impl Stage {
    /// How logs name it (`build`, or `stage 0`).
    pub fn label(&self, index: usize) -> String {
        self.name.clone().unwrap_or_else(|| format!("stage {index}"))
    }
}

/// Most stages in one Dockerfile.
pub const MAX_STAGES: usize = 16;

/// Where a stage starts ([`from_source`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FromSource<'a> {
    /// The requested managed base.
    Base,
    /// A Hearth image: the `NAME[:vN]` after `hearth/`.
    Hearth(&'a str),
    /// An OCI image reference, pulled from its registry.
    Registry(&'a str),
}

/// The FROM rule (see the module docs) for a stage whose FROM is `from`, in a build
/// requested on `base`.
pub fn from_source(from: Option<&str>, base: crate::base::Base) -> FromSource<'_> {
    match from {
        None => FromSource::Base,
        Some(f) => match f.strip_prefix("hearth/") {
            Some(r) => FromSource::Hearth(r),
            None if base.is_named(f) => FromSource::Base,
            None => FromSource::Registry(f),
        },
    }
}

/// Why a Dockerfile cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DockerfileError {
    /// Not valid Dockerfile syntax.
    #[error("Dockerfile does not parse: {0}")]
    Syntax(String),
    /// Valid, but not something Hearth builds.
    #[error("Dockerfile line {line}: {reason}")]
    Unsupported {
        /// 1-based line.
        line: usize,
        /// Why.
        reason: String,
    },
}

/// Largest Dockerfile accepted.
pub const MAX_DOCKERFILE_BYTES: usize = 1 << 20;

fn line_of(content: &str, offset: usize) -> usize {
    content.as_bytes()[..offset.min(content.len())].iter().filter(|&&b| b == b'\n').count() + 1
}

fn command(e: &ShellOrExecExpr) -> Command {
    match e {
        ShellOrExecExpr::Shell(s) => Command::Shell(s.to_string().trim().to_owned()),
        ShellOrExecExpr::Exec(a) => Command::Exec(a.as_str_vec().into_iter().map(str::to_owned).collect()),
    }
}

/// Parses and validates `content`.
pub fn parse(content: &str) -> Result<Plan, DockerfileError> {
    if content.len() > MAX_DOCKERFILE_BYTES {
        return Err(DockerfileError::Syntax(format!("{} bytes; the limit is {MAX_DOCKERFILE_BYTES}", content.len())));
    }
    let df = Dockerfile::parse(content).map_err(|e| DockerfileError::Syntax(e.to_string()))?;
    let mut plan = Plan { from: None, steps: Vec::new(), stages: Vec::new() };
    // The stage being read: its name and FROM line (none before the first FROM).
    let mut current: Option<(Option<String>, usize)> = None;
    let unsupported = |line: usize, reason: String| DockerfileError::Unsupported { line, reason };
    for ins in &df.instructions {
        let (line, kind) = match ins {
            Instruction::From(f) => {
                let line = line_of(content, f.span.start);
                if current.is_none() && !plan.steps.is_empty() {
                    return Err(unsupported(line, "FROM must come before every other instruction".into()));
                }
                if !f.flags.is_empty() {
                    return Err(unsupported(line, "FROM flags (--platform) are not supported".into()));
                }
                let image = f.image.content.clone();
                if image == "scratch" {
                    return Err(unsupported(
                        line,
                        "FROM scratch is not supported: the builder runs steps with a shell; start from an image that has one".into(),
                    ));
                }
                let lower = image.to_ascii_lowercase();
                let names_stage = current.as_ref().and_then(|c| c.0.as_deref()) == Some(lower.as_str())
                    || plan.stages.iter().any(|s| s.name.as_deref() == Some(lower.as_str()));
                if names_stage {
                    return Err(unsupported(
                        line,
                        format!(
                            "FROM {image} builds on an earlier stage, which is not supported; COPY --from={image} what you need instead"
                        ),
                    ));
                }
                let name = f.alias.as_ref().map(|a| a.content.to_ascii_lowercase());
                if let Some(n) = &name {
                    if !valid_stage_name(n) {
                        return Err(unsupported(
                            line,
                            format!("stage name {n:?}: use letters, digits, '-', '_' and '.', starting with a letter"),
                        ));
                    }
                    if plan.stages.iter().any(|s| s.name.as_deref() == Some(n))
                        || current.as_ref().is_some_and(|c| c.0.as_deref() == Some(n))
                    {
                        return Err(unsupported(line, format!("a second stage named {n}")));
                    }
                }
                if let Some((prev_name, prev_line)) = current.take() {
                    if plan.stages.len() + 2 > MAX_STAGES {
                        return Err(unsupported(line, format!("over {MAX_STAGES} stages")));
                    }
                    let from = plan.from.take().expect("a stage has its FROM");
                    plan.stages.push(Stage { name: prev_name, from, line: prev_line, steps: std::mem::take(&mut plan.steps) });
                }
                current = Some((name, line));
                plan.from = Some(image);
                continue;
            }
            Instruction::Run(r) => (r.span.start, StepKind::Run(command(&r.expr))),
            Instruction::Entrypoint(e) => (e.span.start, StepKind::Entrypoint(command(&e.expr))),
            Instruction::Cmd(c) => (c.span.start, StepKind::Cmd(command(&c.expr))),
            Instruction::Env(e) => {
                (e.span.start, StepKind::Env(e.vars.iter().map(|v| (v.key.content.clone(), v.value.to_string())).collect()))
            }
            Instruction::Arg(a) => (a.span.start, StepKind::Arg(a.name.content.clone(), a.value.as_ref().map(|v| v.content.clone()))),
            Instruction::Label(l) => {
                (l.span.start, StepKind::Label(l.labels.iter().map(|x| (x.name.content.clone(), x.value.content.clone())).collect()))
            }
            Instruction::Copy(c) => {
                let line = line_of(content, c.span.start);
                let (mut chown, mut from) = (None, None);
                for flag in &c.flags {
                    match flag.name.content.as_str() {
                        "chown" => chown = Some(flag.value.content.clone()),
                        "from" => {
                            let v = flag.value.content.as_str();
                            let here = current.as_ref().and_then(|c| c.0.as_deref());
                            from = Some(stage_index(&plan.stages, here, v).ok_or_else(|| {
                                unsupported(
                                    line,
                                    format!("COPY --from={v}: no earlier stage is named {v} (copying from an image is not supported: add `FROM {v} AS name` and copy from that stage)"),
                                )
                            })?);
                        }
                        other => return Err(unsupported(line, format!("COPY --{other} is not supported"))),
                    }
                }
                let sources = c.sources.iter().map(|s| s.content.clone()).collect();
                (c.span.start, StepKind::Copy { sources, dest: c.destination.content.clone(), chown, from })
            }
            Instruction::Misc(m) => {
                let line = line_of(content, m.span.start);
                let args = m.arguments.to_string().trim().to_owned();
                let kind = match m.instruction.content.to_ascii_uppercase().as_str() {
                    "WORKDIR" => StepKind::Workdir(args),
                    "USER" => StepKind::User(args),
                    "EXPOSE" => StepKind::Expose(args.split_whitespace().map(str::to_owned).collect()),
                    "ADD" => add_step(line, &args)?,
                    other => return Err(unsupported(line, format!("{other} is not supported by Hearth builds"))),
                };
                (m.span.start, kind)
            }
        };
        plan.steps.push(Step { line: line_of(content, line), kind });
    }
    Ok(plan)
}

/// ADD from the build context behaves like COPY; URLs and archives are refused.
fn add_step(line: usize, args: &str) -> Result<StepKind, DockerfileError> {
    let mut words: Vec<String> = args.split_whitespace().map(str::to_owned).collect();
    let mut chown = None;
    while words.first().is_some_and(|w| w.starts_with("--")) {
        let flag = words.remove(0);
        match flag.strip_prefix("--chown=") {
            Some(v) => chown = Some(v.to_owned()),
            None => return Err(DockerfileError::Unsupported { line, reason: format!("ADD {flag} is not supported") }),
        }
    }
    if words.len() < 2 {
        return Err(DockerfileError::Unsupported { line, reason: "ADD needs a source and a destination".into() });
    }
    let dest = words.pop().expect("checked length");
    if words.iter().any(|w| w.contains("://")) {
        return Err(DockerfileError::Unsupported { line, reason: "ADD of a URL is not supported; download in a RUN step".into() });
    }
    Ok(StepKind::Copy { sources: words, dest, chown, from: None })
}

/// The index of the earlier stage `name` names (a name, or a number below the current
/// stage's), when it is one. The stage being read (`current`) is not earlier.
fn stage_index(stages: &[Stage], current: Option<&str>, name: &str) -> Option<usize> {
    let lower = name.to_ascii_lowercase();
    if current == Some(lower.as_str()) {
        return None;
    }
    if let Some(i) = stages.iter().position(|s| s.name.as_deref() == Some(lower.as_str())) {
        return Some(i);
    }
    name.parse::<usize>().ok().filter(|&i| i < stages.len())
}

fn valid_stage_name(n: &str) -> bool {
    n.len() <= 64
        && n.starts_with(|c: char| c.is_ascii_lowercase())
        && n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::Base;

    const APP: &str = "FROM debian:bookworm\nARG V=1\nENV PORT=8080 MODE=prod\nRUN apt-get update && apt-get install -y python3\nWORKDIR /app\nCOPY --chown=1000:1000 app.py /app/\nADD static /app/static\nUSER 1000\nEXPOSE 8080\nLABEL a=b\nENTRYPOINT [\"python3\", \"app.py\"]\nCMD --serve\n";

    #[test]
    fn a_typical_app_plans() {
        let p = parse(APP).unwrap();
        assert_eq!(p.from.as_deref(), Some("debian:bookworm"));
        let kinds: Vec<_> = p.steps.iter().map(|s| (s.line, &s.kind)).collect();
        assert_eq!(kinds[0], (2, &StepKind::Arg("V".into(), Some("1".into()))));
        assert!(matches!(kinds[2], (4, StepKind::Run(Command::Shell(s))) if s.contains("apt-get install")));
        assert_eq!(
            kinds[4].1,
            &StepKind::Copy { sources: vec!["app.py".into()], dest: "/app/".into(), chown: Some("1000:1000".into()), from: None }
        );
        assert_eq!(kinds[5].1, &StepKind::Copy { sources: vec!["static".into()], dest: "/app/static".into(), chown: None, from: None });
        assert_eq!(kinds[9].1, &StepKind::Entrypoint(Command::Exec(vec!["python3".into(), "app.py".into()])));
        assert_eq!(from_source(p.from.as_deref(), Base::DebianBookworm), FromSource::Base);
    }

    #[test]
    fn unsupported_instructions_name_their_line() {
        let e = parse("FROM busybox\nRUN true\nHEALTHCHECK CMD true\n").unwrap_err();
        assert_eq!(e, DockerfileError::Unsupported { line: 3, reason: "HEALTHCHECK is not supported by Hearth builds".into() });
        let e = parse("FROM busybox\nCOPY --from=build /a /b\n").unwrap_err();
        assert!(matches!(e, DockerfileError::Unsupported { line: 2, .. }), "{e}");
        let e = parse("FROM scratch\n").unwrap_err();
        assert!(e.to_string().contains("scratch"), "{e}");
        let e = parse("FROM --platform=linux/arm64 busybox\n").unwrap_err();
        assert!(e.to_string().contains("--platform"), "{e}");
        let e = parse("FROM busybox\nADD https://example.invalid/x /x\n").unwrap_err();
        assert!(e.to_string().contains("URL"), "{e}");
    }

    #[test]
    fn the_from_rule() {
        use FromSource::{Hearth, Registry};
        let base_ = FromSource::Base;
        let cases = [
            (None, Base::Busybox, base_),
            (Some("minimal"), Base::Busybox, base_),
            (Some("busybox"), Base::Busybox, base_),
            (Some("debian:bookworm"), Base::DebianBookworm, base_),
            (Some("hearth/my-base:v2"), Base::DebianBookworm, Hearth("my-base:v2")),
            (Some("python:3.12-slim"), Base::Busybox, Registry("python:3.12-slim")),
            (Some("debian:bookworm"), Base::Busybox, Registry("debian:bookworm")),
            (Some("docker.io/library/debian:bookworm"), Base::DebianBookworm, Registry("docker.io/library/debian:bookworm")),
            (Some("alpine:3"), Base::DebianBookworm, Registry("alpine:3")),
        ];
        for (from, base, want) in cases {
            assert_eq!(from_source(from, base), want, "{from:?} on {base:?}");
        }
    }

    #[test]
    fn stages_and_copy_from() {
        let text = "FROM python:3.12-slim AS Build\nRUN make\nFROM busybox\nCOPY --from=0 /x /y\nFROM minimal AS final\nCOPY --from=build /out /app/\nCOPY --from=1 /y /z\nCMD [\"/app/out\"]\n";
        let p = parse(text).unwrap();
        assert_eq!(p.stages.len(), 2);
        assert_eq!((p.stages[0].name.as_deref(), p.stages[0].from.as_str(), p.stages[0].line), (Some("build"), "python:3.12-slim", 1));
        assert_eq!(p.stages[1].label(1), "stage 1");
        assert!(matches!(&p.stages[1].steps[0].kind, StepKind::Copy { from: Some(0), .. }));
        assert_eq!(p.from.as_deref(), Some("minimal"));
        assert!(matches!(&p.steps[0].kind, StepKind::Copy { from: Some(0), .. }));
        assert!(matches!(&p.steps[1].kind, StepKind::Copy { from: Some(1), .. }));
        for (bad, why) in [
            ("FROM busybox AS a\nFROM busybox AS a\n", "second stage"),
            ("FROM busybox AS a\nFROM a\n", "earlier stage"),
            ("FROM busybox AS a\nCOPY --from=a /x /y\n", "no earlier stage"),
            ("FROM busybox\nCOPY --from=0 /x /y\n", "no earlier stage"),
            ("FROM busybox\nCOPY --from=nginx:1 /x /y\n", "copying from an image"),
            ("FROM busybox AS 9x\n", "stage name"),
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        let many: String = (0..=MAX_STAGES).map(|i| format!("FROM busybox AS s{i}\n")).collect();
        assert!(parse(&many).unwrap_err().to_string().contains("stages"));
    }

    #[test]
    fn garbage_is_a_syntax_error() {
        assert!(matches!(parse("FROM\n\"unterminated ["), Err(DockerfileError::Syntax(_)) | Err(DockerfileError::Unsupported { .. })));
        assert!(parse(&"RUN x\n".repeat(MAX_DOCKERFILE_BYTES / 6 + 1)).is_err());
    }
}
