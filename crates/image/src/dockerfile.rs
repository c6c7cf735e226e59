//! Dockerfiles, parsed with the `dockerfile-parser` crate and turned into a build plan.
//!
//! Supported: FROM (one stage), RUN (shell and exec forms), COPY and ADD from the build
//! context (with `--chown`), ENV, ARG, WORKDIR, USER, LABEL, EXPOSE, ENTRYPOINT, CMD.
//! Anything else — HEALTHCHECK, VOLUME, SHELL, ONBUILD, STOPSIGNAL, a second FROM (multi-
//! stage), `COPY --from`, ADD of a URL — is an error naming its line, never ignored.
//!
//! The FROM rule: the build request names the base image the build starts from. A FROM
//! line, when present, must name that same base (`debian-bookworm`, `debian:bookworm`,
//! `minimal`, `busybox` are the managed ones) or another Hearth image (`hearth/<name>`);
//! a Dockerfile without FROM builds on the requested base.

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

/// A parsed, validated Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The FROM line's image, if there is one.
    pub from: Option<String>,
    /// The steps after FROM, in order.
    pub steps: Vec<Step>,
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
    /// FROM names another base than the build request.
    #[error("Dockerfile line {line}: FROM {from} does not match the requested base image {base:?}; use the same base, or FROM hearth/<image> to build on a Hearth image")]
    FromMismatch {
        /// 1-based line.
        line: usize,
        /// What FROM says.
        from: String,
        /// What the request says.
        base: String,
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
    let mut plan = Plan { from: None, steps: Vec::new() };
    let unsupported = |line: usize, reason: String| DockerfileError::Unsupported { line, reason };
    for ins in &df.instructions {
        let (line, kind) = match ins {
            Instruction::From(f) => {
                let line = line_of(content, f.span.start);
                if plan.from.is_some() {
                    return Err(unsupported(line, "a second FROM: multi-stage builds are not supported".into()));
                }
                if !plan.steps.is_empty() {
                    return Err(unsupported(line, "FROM must come before every other instruction".into()));
                }
                if !f.flags.is_empty() {
                    return Err(unsupported(line, "FROM flags (--platform) are not supported".into()));
                }
                plan.from = Some(f.image.content.clone());
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
                let mut chown = None;
                for flag in &c.flags {
                    match flag.name.content.as_str() {
                        "chown" => chown = Some(flag.value.content.clone()),
                        "from" => return Err(unsupported(line, "COPY --from (multi-stage) is not supported".into())),
                        other => return Err(unsupported(line, format!("COPY --{other} is not supported"))),
                    }
                }
                let sources = c.sources.iter().map(|s| s.content.clone()).collect();
                (c.span.start, StepKind::Copy { sources, dest: c.destination.content.clone(), chown })
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
    Ok(StepKind::Copy { sources: words, dest, chown })
}

/// Applies the FROM rule (see the module docs) for a build requested on `base`.
pub fn check_from(plan: &Plan, base: &str, content: &str) -> Result<(), DockerfileError> {
    let Some(from) = &plan.from else { return Ok(()) };
    let aliases: &[&str] = match base {
        "debian-bookworm" => &["debian-bookworm", "debian:bookworm", "debian:12", "debian:bookworm-slim"],
        "minimal" | "busybox" => &["minimal", "busybox"],
        other => return if from == other { Ok(()) } else { Err(mismatch(from, base, content)) },
    };
    if aliases.contains(&from.as_str()) || from.starts_with("hearth/") {
        Ok(())
    } else {
        Err(mismatch(from, base, content))
    }
}

fn mismatch(from: &str, base: &str, content: &str) -> DockerfileError {
    let line = content.lines().position(|l| l.trim_start().to_ascii_uppercase().starts_with("FROM")).map_or(1, |i| i + 1);
    DockerfileError::FromMismatch { line, from: from.to_owned(), base: base.to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    const APP: &str = "FROM debian:bookworm\nARG V=1\nENV PORT=8080 MODE=prod\nRUN apt-get update && apt-get install -y python3\nWORKDIR /app\nCOPY --chown=1000:1000 app.py /app/\nADD static /app/static\nUSER 1000\nEXPOSE 8080\nLABEL a=b\nENTRYPOINT [\"python3\", \"app.py\"]\nCMD --serve\n";

    #[test]
    fn a_typical_app_plans() {
        let p = parse(APP).unwrap();
        assert_eq!(p.from.as_deref(), Some("debian:bookworm"));
        let kinds: Vec<_> = p.steps.iter().map(|s| (s.line, &s.kind)).collect();
        assert_eq!(kinds[0], (2, &StepKind::Arg("V".into(), Some("1".into()))));
        assert!(matches!(kinds[2], (4, StepKind::Run(Command::Shell(s))) if s.contains("apt-get install")));
        assert_eq!(kinds[4].1, &StepKind::Copy { sources: vec!["app.py".into()], dest: "/app/".into(), chown: Some("1000:1000".into()) });
        assert_eq!(kinds[5].1, &StepKind::Copy { sources: vec!["static".into()], dest: "/app/static".into(), chown: None });
        assert_eq!(kinds[9].1, &StepKind::Entrypoint(Command::Exec(vec!["python3".into(), "app.py".into()])));
        check_from(&p, "debian-bookworm", APP).unwrap();
    }

    #[test]
    fn unsupported_instructions_name_their_line() {
        let e = parse("FROM busybox\nRUN true\nHEALTHCHECK CMD true\n").unwrap_err();
        assert_eq!(e, DockerfileError::Unsupported { line: 3, reason: "HEALTHCHECK is not supported by Hearth builds".into() });
        let e = parse("FROM busybox\nFROM debian\n").unwrap_err();
        assert!(matches!(e, DockerfileError::Unsupported { line: 2, .. }), "{e}");
        let e = parse("FROM busybox\nCOPY --from=build /a /b\n").unwrap_err();
        assert!(matches!(e, DockerfileError::Unsupported { line: 2, .. }), "{e}");
        let e = parse("FROM busybox\nADD https://example.invalid/x /x\n").unwrap_err();
        assert!(e.to_string().contains("URL"), "{e}");
    }

    #[test]
    fn from_must_match_the_requested_base() {
        let p = parse("FROM alpine:3\nRUN true\n").unwrap();
        let e = check_from(&p, "debian-bookworm", "FROM alpine:3\nRUN true\n").unwrap_err();
        assert!(e.to_string().contains("does not match"), "{e}");
        let p = parse("FROM hearth/my-base\n").unwrap();
        check_from(&p, "debian-bookworm", "").unwrap();
        let p = parse("RUN true\n").unwrap();
        assert_eq!(p.from, None);
        check_from(&p, "minimal", "RUN true\n").unwrap();
    }

    #[test]
    fn garbage_is_a_syntax_error() {
        assert!(matches!(parse("FROM\n\"unterminated ["), Err(DockerfileError::Syntax(_)) | Err(DockerfileError::Unsupported { .. })));
        assert!(parse(&"RUN x\n".repeat(MAX_DOCKERFILE_BYTES / 6 + 1)).is_err());
    }
}
