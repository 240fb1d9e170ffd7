//! Parses a Dockerfile into the steps of a single-stage build (`arrakis image build`).
//!
//! The parser follows Docker's (BuildKit's) reading of the file for the instructions it knows:
//! parser directives, comments, line continuations, the JSON and shell forms, variable
//! substitution in the instructions Docker substitutes in, and ARG scoping. It does no I/O: the
//! build context is [`crate::context`]'s, and running the steps is the executor's. Each
//! [`Step`] carries the image config as it stands after the step, so the executor knows the
//! environment, working directory and user of every RUN without tracking them itself.
//!
//! Variables are substituted (`$V`, `${V}`, `${V:-x}`, `${V-x}`, `${V:+x}`, `${V+x}`,
//! `${V:?msg}`, quotes and escapes) in FROM (global ARGs only), COPY/ADD and their flags, ENV,
//! ARG defaults, LABEL, WORKDIR, USER, EXPOSE, VOLUME and STOPSIGNAL; never in RUN, CMD or
//! ENTRYPOINT, whose shell sees ARG and ENV values in its environment instead.
//!
//! Choices where Docker leaves room or where this builder is narrower:
//! - One stage only: a second FROM or `COPY --from` is an error, and so is any instruction
//!   but ARG before FROM.
//! - `EXPOSE 8000-8002` expands the range into one port per entry, as Docker does.
//! - VOLUME and STOPSIGNAL are kept as metadata in [`ConfigState`]; HEALTHCHECK, ONBUILD,
//!   SHELL, MAINTAINER and anything unknown are errors that list what is supported.
//! - Heredocs, RUN flags (`--mount`, `--network`), and COPY/ADD flags other than `--chown` and
//!   `--chmod` (octal only) are errors.
//! - Build args never declared by an ARG are reported in [`Dockerfile::unused_args`] (Docker
//!   warns about them), except Docker's predefined proxy args, which are passed to RUN steps
//!   without a declaration.
//! - `TARGETPLATFORM`, `TARGETOS`, `TARGETARCH`, `TARGETVARIANT` and their `BUILD*` twins are
//!   predefined in the global scope as `linux/amd64` (and in the stage once declared by ARG).

mod builder;
mod expand;
mod lines;
mod state;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;

use crate::oci::RunConfig;

use builder::{Builder, Keyword};

pub use expand::ExpandError;
pub use state::ConfigState;

/// The instructions this builder runs, for error messages.
const SUPPORTED: &str =
    "FROM, RUN, COPY, ADD, ENV, ARG, WORKDIR, USER, ENTRYPOINT, CMD, EXPOSE, LABEL, VOLUME, STOPSIGNAL";
/// The only platform images are built for (the sandbox VMs' platform).
const PLATFORM: &str = "linux/amd64";
/// ARGs Docker predefines in the global scope.
const PLATFORM_ARGS: &[(&str, &str)] = &[
    ("TARGETPLATFORM", PLATFORM),
    ("TARGETOS", "linux"),
    ("TARGETARCH", "amd64"),
    ("TARGETVARIANT", ""),
    ("BUILDPLATFORM", PLATFORM),
    ("BUILDOS", "linux"),
    ("BUILDARCH", "amd64"),
    ("BUILDVARIANT", ""),
];
/// Build args Docker passes to RUN steps without an ARG declaring them.
const PROXY_ARGS: &[&str] = &[
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "FTP_PROXY",
    "ftp_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// A parsed single-stage Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    pub from: BaseImage,
    /// The instructions after FROM, in order.
    pub steps: Vec<Step>,
    /// The image config after the last step (the base image's, if there are no steps).
    pub config: ConfigState,
    /// Build args that no ARG declares, sorted, for the caller to warn about.
    pub unused_args: Vec<String>,
}

/// The FROM instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseImage {
    /// The image reference after substitution (`scratch` is passed through as is).
    pub reference: String,
    /// The `AS name` alias, which nothing can refer to in a single-stage build.
    pub alias: Option<String>,
    pub line: usize,
    pub text: String,
}

/// One instruction after FROM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// 1-based line the instruction starts on.
    pub line: usize,
    /// The instruction as written, continuation lines joined (for progress display).
    pub text: String,
    pub instruction: Instruction,
    /// The image config after this step. For RUN, COPY and ADD it is also the config the step
    /// runs with (they do not change it): [`ConfigState::run_env`], `workdir`, `user`.
    pub config: ConfigState,
}

/// A typed instruction, its arguments substituted where Docker substitutes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instruction {
    /// Not substituted: the shell does that, with [`ConfigState::run_env`] as environment.
    Run(Command),
    Copy(CopyInstruction),
    Env(Vec<(String, String)>),
    /// Declared names and the values they took (`None`: unset).
    Arg(Vec<(String, Option<String>)>),
    /// The new working directory, absolute; the executor creates it if missing.
    Workdir(String),
    User(String),
    Entrypoint(Command),
    Cmd(Command),
    /// `port/proto` entries, ranges expanded.
    Expose(Vec<String>),
    Label(Vec<(String, String)>),
    Volume(Vec<String>),
    StopSignal(String),
}

/// The two forms of RUN, CMD and ENTRYPOINT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Shell form: run with `/bin/sh -c`.
    Shell(String),
    /// Exec form (a JSON array): run as is.
    Exec(Vec<String>),
}

impl Command {
    /// The argv to execute: the shell form becomes `["/bin/sh", "-c", text]`.
    pub fn argv(&self) -> Vec<String> {
        match self {
            Command::Shell(text) => vec!["/bin/sh".to_owned(), "-c".to_owned(), text.clone()],
            Command::Exec(argv) => argv.clone(),
        }
    }
}

/// Whether a copy came from COPY or ADD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyKind {
    Copy,
    /// Like COPY, except that a local tar archive source (plain, gzip or zstd) is extracted
    /// into the destination directory instead of copied.
    Add,
}

/// COPY or ADD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyInstruction {
    pub kind: CopyKind,
    /// Paths or glob patterns relative to the build context, as written after substitution.
    pub sources: Vec<String>,
    /// The destination in the image: absolute (resolved against WORKDIR), normalized, no
    /// trailing slash except for `/` itself.
    pub dest: String,
    /// The destination was written as a directory (`/dir/`, `.`, `dir/.`), or there are several
    /// sources. The executor should also treat a destination that already is a directory in
    /// the image as one, as Docker does.
    pub dest_is_dir: bool,
    /// `--chown=user[:group]`, substituted.
    pub chown: Option<String>,
    /// `--chmod=` permission bits.
    pub chmod: Option<u32>,
}

/// A Dockerfile that cannot be built, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line of the instruction at fault; 0 when the error is about the whole file.
    pub line: usize,
    pub kind: ParseErrorKind,
}

impl ParseError {
    fn at(line: usize, kind: ParseErrorKind) -> ParseError {
        ParseError { line, kind }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            0 => write!(f, "Dockerfile: {}", self.kind),
            line => write!(f, "Dockerfile line {line}: {}", self.kind),
        }
    }
}

impl std::error::Error for ParseError {}

/// What was wrong with a Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseErrorKind {
    #[error("invalid `# escape=` directive `{value}`; accepted: `\\` or `` ` ``")]
    InvalidEscape { value: String },
    #[error("the parser directive `{name}` is given twice")]
    DuplicateDirective { name: String },
    #[error("unknown or unsupported instruction `{name}`; supported: {SUPPORTED}")]
    UnknownInstruction { name: String },
    #[error("there is no FROM instruction")]
    NoFrom,
    #[error("{instruction} comes before FROM; only ARG may")]
    BeforeFrom { instruction: String },
    #[error("multi-stage builds are not supported ({what}); use a single FROM")]
    MultiStage { what: String },
    #[error("{instruction} requires {expected}")]
    Arguments {
        instruction: &'static str,
        expected: &'static str,
    },
    #[error("{instruction} in JSON form must be an array of strings")]
    NotStringArray { instruction: &'static str },
    #[error("{instruction} does not support the flag `--{flag}`; accepted: {accepted}")]
    UnsupportedFlag {
        instruction: &'static str,
        flag: String,
        accepted: &'static str,
    },
    #[error("invalid {instruction} flag `--{flag}`: `{value}`; expected {expected}")]
    FlagValue {
        instruction: &'static str,
        flag: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("{instruction} source `{path}` is a URL; only paths in the build context are supported (download it with RUN instead)")]
    Url {
        instruction: &'static str,
        path: String,
    },
    #[error("heredocs (`{word}`) are not supported in {instruction}")]
    Heredoc {
        instruction: &'static str,
        word: String,
    },
    #[error("`{word}` in {instruction} is not of the form `name=value`")]
    NameValue {
        instruction: &'static str,
        word: String,
    },
    #[error("{instruction} has an empty {what}")]
    Empty {
        instruction: &'static str,
        what: &'static str,
    },
    #[error("substituting variables in `{word}`: {error}")]
    Substitution { word: String, error: ExpandError },
    #[error("invalid EXPOSE port `{value}`: {reason}; expected `port`, `port/proto` or `start-end/proto` with proto tcp, udp or sctp")]
    Port { value: String, reason: &'static str },
    #[error("FROM --platform={value} is not supported; images are built for {PLATFORM} only")]
    Platform { value: String },
}

/// Parses a Dockerfile as if its base image had an empty config. Enough to learn the base
/// image and to validate the file; for the build itself use [`parse_with_base`] once the base
/// image's config is known, since `$PATH` and friends may come from it.
pub fn parse(text: &str, build_args: &BTreeMap<String, String>) -> Result<Dockerfile, ParseError> {
    parse_with_base(text, build_args, &RunConfig::default())
}

/// Parses a Dockerfile whose steps start from the base image config `base`: its ENV is
/// visible to substitution, its WORKDIR is where relative paths start, and its other fields
/// are inherited until an instruction replaces them.
pub fn parse_with_base(
    text: &str,
    build_args: &BTreeMap<String, String>,
    base: &RunConfig,
) -> Result<Dockerfile, ParseError> {
    let (directives, lines) = lines::split(text)?;
    let mut builder = Builder::new(directives.escape, build_args);
    let mut lines = lines.into_iter();
    let from = loop {
        let Some(line) = lines.next() else {
            return Err(ParseError::at(0, ParseErrorKind::NoFrom));
        };
        let at = |kind| ParseError::at(line.line, kind);
        let (word, rest) = lines::split_keyword(&line.text);
        match Keyword::parse(word).map_err(at)? {
            Keyword::Arg => builder.global_arg(rest).map_err(at)?,
            Keyword::From => break builder.from(&line, rest).map_err(at)?,
            other => {
                return Err(at(ParseErrorKind::BeforeFrom {
                    instruction: other.name().to_owned(),
                }))
            }
        }
    };
    let mut state = ConfigState::from_base(base);
    for name in PROXY_ARGS {
        if let Some(value) = build_args.get(*name) {
            state.set_arg((*name).to_owned(), Some(value.clone()));
        }
    }
    let mut steps = Vec::new();
    for line in lines {
        let at = |kind| ParseError::at(line.line, kind);
        let (word, rest) = lines::split_keyword(&line.text);
        let keyword = Keyword::parse(word).map_err(at)?;
        let instruction = builder.step(&mut state, keyword, rest).map_err(at)?;
        steps.push(Step {
            line: line.line,
            text: line.text,
            instruction,
            config: state.clone(),
        });
    }
    let unused_args = build_args
        .keys()
        .filter(|name| !builder.declared(name) && !PROXY_ARGS.contains(&name.as_str()))
        .cloned()
        .collect();
    Ok(Dockerfile {
        from,
        steps,
        config: state,
        unused_args,
    })
}
