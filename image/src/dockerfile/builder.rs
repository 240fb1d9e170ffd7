//! Evaluates instructions one by one: argument syntax, flags, variable substitution, ARG
//! scoping, and each instruction's effect on the image config.

use std::collections::{BTreeMap, BTreeSet};

use super::expand::{self, Quotes};
use super::lines::{self, Flag, Json, LogicalLine};
use super::{
    BaseImage, Command, ConfigState, CopyInstruction, CopyKind, Instruction, ParseErrorKind,
    PLATFORM, PLATFORM_ARGS,
};

/// The instructions known to the parser (the supported ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Keyword {
    From,
    Run,
    Copy,
    Add,
    Env,
    Arg,
    Workdir,
    User,
    Entrypoint,
    Cmd,
    Expose,
    Label,
    Volume,
    StopSignal,
}

impl Keyword {
    const ALL: [Keyword; 14] = [
        Keyword::From,
        Keyword::Run,
        Keyword::Copy,
        Keyword::Add,
        Keyword::Env,
        Keyword::Arg,
        Keyword::Workdir,
        Keyword::User,
        Keyword::Entrypoint,
        Keyword::Cmd,
        Keyword::Expose,
        Keyword::Label,
        Keyword::Volume,
        Keyword::StopSignal,
    ];

    pub(super) fn parse(word: &str) -> Result<Keyword, ParseErrorKind> {
        Keyword::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(word))
            .ok_or_else(|| ParseErrorKind::UnknownInstruction {
                name: word.to_ascii_uppercase(),
            })
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Keyword::From => "FROM",
            Keyword::Run => "RUN",
            Keyword::Copy => "COPY",
            Keyword::Add => "ADD",
            Keyword::Env => "ENV",
            Keyword::Arg => "ARG",
            Keyword::Workdir => "WORKDIR",
            Keyword::User => "USER",
            Keyword::Entrypoint => "ENTRYPOINT",
            Keyword::Cmd => "CMD",
            Keyword::Expose => "EXPOSE",
            Keyword::Label => "LABEL",
            Keyword::Volume => "VOLUME",
            Keyword::StopSignal => "STOPSIGNAL",
        }
    }
}

/// The parser's state besides the image config.
pub(super) struct Builder<'a> {
    escape: char,
    build_args: &'a BTreeMap<String, String>,
    /// ARGs declared before FROM, with their values.
    global: Vec<(String, Option<String>)>,
    /// Every name an ARG declared, before or after FROM.
    declared: BTreeSet<String>,
    /// Whether a CMD instruction ran, so that ENTRYPOINT keeps it.
    cmd_set: bool,
}

type Lookup<'l> = dyn Fn(&str) -> Option<String> + 'l;

impl<'a> Builder<'a> {
    pub(super) fn new(escape: char, build_args: &'a BTreeMap<String, String>) -> Builder<'a> {
        Builder {
            escape,
            build_args,
            global: Vec::new(),
            declared: BTreeSet::new(),
            cmd_set: false,
        }
    }

    /// Whether an ARG, before or after FROM, declared `name`.
    pub(super) fn declared(&self, name: &str) -> bool {
        self.declared.contains(name)
    }

    fn expand(
        &self,
        word: &str,
        quotes: Quotes,
        lookup: &Lookup,
    ) -> Result<String, ParseErrorKind> {
        expand::expand(word, self.escape, quotes, lookup).map_err(|error| {
            ParseErrorKind::Substitution {
                word: word.to_owned(),
                error,
            }
        })
    }

    /// The value a global-scope variable has: a global ARG's, else a predefined one's.
    fn global_value(&self, name: &str) -> Option<String> {
        self.global
            .iter()
            .find(|(key, _)| key == name)
            .and_then(|(_, value)| value.clone())
            .or_else(|| predefined(name))
    }

    pub(super) fn global_arg(&mut self, rest: &str) -> Result<(), ParseErrorKind> {
        let declared = self.arg_declarations(rest, &|name| self.global_value(name))?;
        for (name, default) in declared {
            let value = self
                .build_args
                .get(&name)
                .cloned()
                .or(default)
                .or_else(|| predefined(&name));
            self.declared.insert(name.clone());
            match self.global.iter_mut().find(|(key, _)| *key == name) {
                Some(entry) => entry.1 = value,
                None => self.global.push((name, value)),
            }
        }
        Ok(())
    }

    pub(super) fn from(&self, line: &LogicalLine, rest: &str) -> Result<BaseImage, ParseErrorKind> {
        let lookup = |name: &str| self.global_value(name);
        let (flags, rest) = lines::take_flags(rest);
        for Flag { name, value } in flags {
            if name != "platform" {
                return Err(unsupported_flag("FROM", name, "--platform"));
            }
            let raw = value.unwrap_or_default();
            let platform = self.expand(&raw, Quotes::Remove, &lookup)?;
            if platform != PLATFORM {
                return Err(ParseErrorKind::Platform { value: platform });
            }
        }
        let words = lines::whitespace_words(rest);
        let (image, alias) = match words.as_slice() {
            [image] => (image, None),
            [image, as_, alias] if as_.eq_ignore_ascii_case("as") => (image, Some(alias.clone())),
            _ => {
                return Err(ParseErrorKind::Arguments {
                    instruction: "FROM",
                    expected: "an image reference, optionally followed by `AS name`",
                })
            }
        };
        let reference = self.expand(image, Quotes::Remove, &lookup)?;
        if reference.is_empty() {
            return Err(empty("FROM", "image reference"));
        }
        Ok(BaseImage {
            reference,
            alias,
            line: line.line,
            text: line.text.clone(),
        })
    }

    pub(super) fn step(
        &mut self,
        state: &mut ConfigState,
        keyword: Keyword,
        rest: &str,
    ) -> Result<Instruction, ParseErrorKind> {
        let instruction = keyword.name();
        let lookup = |name: &str| state.lookup(name);
        let instr = match keyword {
            Keyword::From => {
                return Err(ParseErrorKind::MultiStage {
                    what: "a second FROM".to_owned(),
                })
            }
            Keyword::Run => {
                let (flags, rest) = lines::take_flags(rest);
                if let Some(flag) = flags.into_iter().next() {
                    return Err(unsupported_flag("RUN", flag.name, "none"));
                }
                Instruction::Run(command(instruction, rest, true)?)
            }
            Keyword::Copy => Instruction::Copy(self.copy(state, CopyKind::Copy, rest)?),
            Keyword::Add => Instruction::Copy(self.copy(state, CopyKind::Add, rest)?),
            Keyword::Env => Instruction::Env(self.name_values(instruction, rest, &lookup)?),
            Keyword::Label => Instruction::Label(self.name_values(instruction, rest, &lookup)?),
            Keyword::Arg => Instruction::Arg(self.stage_arg(rest, &lookup)?),
            Keyword::Workdir => {
                let dir = self.single(instruction, "path", rest, &lookup)?;
                Instruction::Workdir(resolve_path(&state.workdir, &dir))
            }
            Keyword::User => Instruction::User(self.single(instruction, "user", rest, &lookup)?),
            Keyword::Entrypoint => Instruction::Entrypoint(command(instruction, rest, false)?),
            Keyword::Cmd => Instruction::Cmd(command(instruction, rest, false)?),
            Keyword::Expose => Instruction::Expose(self.ports(rest, &lookup)?),
            Keyword::Volume => Instruction::Volume(self.volumes(rest, &lookup)?),
            Keyword::StopSignal => {
                let signal = self.single(instruction, "signal", rest, &lookup)?;
                if signal.contains(char::is_whitespace) {
                    return Err(arguments(instruction, "one signal name or number"));
                }
                Instruction::StopSignal(signal)
            }
        };
        self.apply(state, &instr);
        Ok(instr)
    }

    /// Records an instruction's effect on the image config.
    fn apply(&mut self, state: &mut ConfigState, instruction: &Instruction) {
        match instruction {
            Instruction::Run(_) | Instruction::Copy(_) => {}
            Instruction::Env(pairs) => {
                for (key, value) in pairs {
                    state.set_env(key.clone(), value.clone());
                }
            }
            Instruction::Label(pairs) => state.labels.extend(pairs.iter().cloned()),
            Instruction::Arg(args) => {
                for (name, value) in args {
                    state.set_arg(name.clone(), value.clone());
                }
            }
            Instruction::Workdir(dir) => state.workdir = dir.clone(),
            Instruction::User(user) => state.user = Some(user.clone()),
            Instruction::Entrypoint(command) => {
                state.entrypoint = Some(command.argv());
                if !self.cmd_set {
                    state.cmd = None;
                }
            }
            Instruction::Cmd(command) => {
                state.cmd = Some(command.argv());
                self.cmd_set = true;
            }
            Instruction::Expose(ports) => state.exposed_ports.extend(ports.iter().cloned()),
            Instruction::Volume(paths) => state.volumes.extend(paths.iter().cloned()),
            Instruction::StopSignal(signal) => state.stop_signal = Some(signal.clone()),
        }
    }

    /// The whole rest of the line as one substituted value (WORKDIR, USER, STOPSIGNAL).
    fn single(
        &self,
        instruction: &'static str,
        what: &'static str,
        rest: &str,
        lookup: &Lookup,
    ) -> Result<String, ParseErrorKind> {
        if rest.is_empty() {
            return Err(ParseErrorKind::Arguments {
                instruction,
                expected: "an argument",
            });
        }
        let value = self.expand(rest, Quotes::Remove, lookup)?;
        if value.is_empty() {
            return Err(empty(instruction, what));
        }
        Ok(value)
    }

    /// `ARG name[=default] ...`: the names and their substituted defaults. All defaults see
    /// the variables as they were before the instruction.
    fn arg_declarations(
        &self,
        rest: &str,
        lookup: &Lookup,
    ) -> Result<Vec<(String, Option<String>)>, ParseErrorKind> {
        let words = lines::quoted_words(rest, self.escape);
        if words.is_empty() {
            return Err(arguments("ARG", "a name, optionally with `=default`"));
        }
        words
            .iter()
            .map(|word| {
                let (name, default) = match word.split_once('=') {
                    Some((name, default)) => {
                        (name, Some(self.expand(default, Quotes::Remove, lookup)?))
                    }
                    None => (word.as_str(), None),
                };
                if name.is_empty() {
                    return Err(empty("ARG", "name"));
                }
                Ok((name.to_owned(), default))
            })
            .collect()
    }

    /// An ARG after FROM: a build arg, else its default, else the global ARG's value, else the
    /// predefined value.
    fn stage_arg(
        &mut self,
        rest: &str,
        lookup: &Lookup,
    ) -> Result<Vec<(String, Option<String>)>, ParseErrorKind> {
        let declared = self.arg_declarations(rest, lookup)?;
        let args = declared
            .into_iter()
            .map(|(name, default)| {
                let value = self
                    .build_args
                    .get(&name)
                    .cloned()
                    .or(default)
                    .or_else(|| self.global_value(&name));
                (name, value)
            })
            .collect::<Vec<_>>();
        self.declared
            .extend(args.iter().map(|(name, _)| name.clone()));
        Ok(args)
    }

    /// ENV and LABEL: `name=value ...`, or the legacy `name value with spaces`. All values
    /// see the variables as they were before the instruction, as in Docker.
    fn name_values(
        &self,
        instruction: &'static str,
        rest: &str,
        lookup: &Lookup,
    ) -> Result<Vec<(String, String)>, ParseErrorKind> {
        let words = lines::quoted_words(rest, self.escape);
        let Some(first) = words.first() else {
            return Err(arguments(instruction, "at least one `name=value` pair"));
        };
        if !first.contains('=') {
            let Some((name, value)) = rest.split_once(char::is_whitespace) else {
                return Err(arguments(
                    instruction,
                    "`name=value` pairs, or `name value`",
                ));
            };
            let name = self.expand(name, Quotes::Remove, lookup)?;
            let value = self.expand(value.trim_start(), Quotes::Remove, lookup)?;
            return Ok(vec![(name, value)]);
        }
        words
            .iter()
            .map(|word| {
                let Some((name, value)) = word.split_once('=') else {
                    return Err(ParseErrorKind::NameValue {
                        instruction,
                        word: word.clone(),
                    });
                };
                let name = self.expand(name, Quotes::Remove, lookup)?;
                if name.is_empty() {
                    return Err(empty(instruction, "name"));
                }
                Ok((name, self.expand(value, Quotes::Remove, lookup)?))
            })
            .collect()
    }

    /// EXPOSE: blank-separated `port[/proto]` or `start-end[/proto]` entries.
    fn ports(&self, rest: &str, lookup: &Lookup) -> Result<Vec<String>, ParseErrorKind> {
        let mut ports = Vec::new();
        for word in lines::whitespace_words(rest) {
            ports.extend(parse_ports(&self.expand(&word, Quotes::Remove, lookup)?)?);
        }
        if ports.is_empty() {
            return Err(arguments("EXPOSE", "at least one port"));
        }
        Ok(ports)
    }

    fn volumes(&self, rest: &str, lookup: &Lookup) -> Result<Vec<String>, ParseErrorKind> {
        let (words, quotes) = json_or_words("VOLUME", rest)?;
        if words.is_empty() {
            return Err(arguments("VOLUME", "at least one path"));
        }
        words
            .iter()
            .map(|word| {
                let path = self.expand(word, quotes, lookup)?;
                if path.is_empty() {
                    return Err(empty("VOLUME", "path"));
                }
                Ok(path)
            })
            .collect()
    }

    /// COPY and ADD flags: `--chown=user[:group]` and `--chmod=octal`, substituted.
    fn copy_flags(
        &self,
        instruction: &'static str,
        flags: Vec<Flag>,
        lookup: &Lookup,
    ) -> Result<(Option<String>, Option<u32>), ParseErrorKind> {
        let (mut chown, mut chmod) = (None, None);
        for Flag { name, value } in flags {
            let flag = match name.as_str() {
                "chown" => "chown",
                "chmod" => "chmod",
                "from" => {
                    return Err(ParseErrorKind::MultiStage {
                        what: format!("{instruction} --from"),
                    })
                }
                _ => return Err(unsupported_flag(instruction, name, "--chown, --chmod")),
            };
            let value = self.expand(&value.unwrap_or_default(), Quotes::Remove, lookup)?;
            let invalid = |expected| ParseErrorKind::FlagValue {
                instruction,
                flag,
                value: value.clone(),
                expected,
            };
            if flag == "chown" {
                if value.is_empty() || value.starts_with(':') || value.ends_with(':') {
                    return Err(invalid("`user`, `user:group`, `uid` or `uid:gid`"));
                }
                chown = Some(value);
            } else {
                let octal = !value.is_empty() && value.bytes().all(|b| matches!(b, b'0'..=b'7'));
                let mode = u32::from_str_radix(&value, 8)
                    .ok()
                    .filter(|mode| octal && *mode <= 0o7777);
                chmod = Some(mode.ok_or_else(|| invalid("octal permission bits up to 7777"))?);
            }
        }
        Ok((chown, chmod))
    }

    fn copy(
        &self,
        state: &ConfigState,
        kind: CopyKind,
        rest: &str,
    ) -> Result<CopyInstruction, ParseErrorKind> {
        let instruction = match kind {
            CopyKind::Copy => "COPY",
            CopyKind::Add => "ADD",
        };
        let lookup = |name: &str| state.lookup(name);
        let (flags, rest) = lines::take_flags(rest);
        let (chown, chmod) = self.copy_flags(instruction, flags, &lookup)?;
        if let Json::Absent = lines::json_array(rest) {
            if let Some(word) = lines::heredoc(rest) {
                return Err(ParseErrorKind::Heredoc { instruction, word });
            }
        }
        let (words, quotes) = json_or_words(instruction, rest)?;
        if words.len() < 2 {
            return Err(arguments(
                instruction,
                "at least one source and a destination",
            ));
        }
        let mut expanded = words
            .iter()
            .map(|word| self.expand(word, quotes, &lookup))
            .collect::<Result<Vec<_>, _>>()?;
        let dest = expanded.pop().unwrap_or_default();
        for source in &expanded {
            if source.is_empty() {
                return Err(empty(instruction, "source"));
            }
            if is_url(source) {
                return Err(ParseErrorKind::Url {
                    instruction,
                    path: source.clone(),
                });
            }
        }
        let dest_is_dir = expanded.len() > 1
            || dest.is_empty()
            || dest == "."
            || dest.ends_with('/')
            || dest.ends_with("/.");
        Ok(CopyInstruction {
            kind,
            sources: expanded,
            dest: resolve_path(&state.workdir, &dest),
            dest_is_dir,
            chown,
            chmod,
        })
    }
}

/// RUN, CMD and ENTRYPOINT arguments: the exec form if they are a JSON array of strings, else
/// the shell form (the text as written).
fn command(instruction: &'static str, rest: &str, run: bool) -> Result<Command, ParseErrorKind> {
    match lines::json_array(rest) {
        Json::Strings(argv) => Ok(Command::Exec(argv)),
        Json::NonStrings => Err(ParseErrorKind::NotStringArray { instruction }),
        Json::Absent if rest.is_empty() => Err(arguments(instruction, "a command")),
        Json::Absent => {
            if let Some(word) = lines::heredoc(rest).filter(|_| run) {
                return Err(ParseErrorKind::Heredoc { instruction, word });
            }
            Ok(Command::Shell(rest.to_owned()))
        }
    }
}

/// A JSON array of strings (quotes then are plain characters), else blank-separated words.
fn json_or_words(
    instruction: &'static str,
    rest: &str,
) -> Result<(Vec<String>, Quotes), ParseErrorKind> {
    match lines::json_array(rest) {
        Json::Strings(words) => Ok((words, Quotes::Keep)),
        Json::NonStrings => Err(ParseErrorKind::NotStringArray { instruction }),
        Json::Absent => Ok((lines::whitespace_words(rest), Quotes::Remove)),
    }
}

fn predefined(name: &str) -> Option<String> {
    PLATFORM_ARGS
        .iter()
        .find(|(key, _)| *key == name)
        .map(|(_, value)| (*value).to_owned())
}

fn is_url(source: &str) -> bool {
    let lower = source.to_ascii_lowercase();
    ["http://", "https://", "git://", "git@", "ssh://"]
        .iter()
        .any(|scheme| lower.starts_with(scheme))
}

/// Resolves `path` against the directory `base` (absolute) and normalizes it lexically: `.`
/// and empty components go, `..` goes up but never above `/`, no trailing slash.
pub(super) fn resolve_path(base: &str, path: &str) -> String {
    let joined = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("{base}/{path}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for part in joined.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            _ => parts.push(part),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Parses one EXPOSE entry into `port/proto` entries.
fn parse_ports(value: &str) -> Result<Vec<String>, ParseErrorKind> {
    let error = |reason| ParseErrorKind::Port {
        value: value.to_owned(),
        reason,
    };
    let (range, proto) = value.split_once('/').unwrap_or((value, "tcp"));
    if range.contains(':') {
        return Err(error("host mappings are not part of an image"));
    }
    let proto = proto.to_ascii_lowercase();
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return Err(error("unknown protocol"));
    }
    let port = |text: &str| {
        text.parse::<u16>()
            .ok()
            .filter(|port| *port != 0)
            .ok_or_else(|| error("ports are numbers from 1 to 65535"))
    };
    let (start, end) = match range.split_once('-') {
        Some((start, end)) => (port(start)?, port(end)?),
        None => (port(range)?, port(range)?),
    };
    if start > end {
        return Err(error("the range starts after it ends"));
    }
    Ok((start..=end).map(|p| format!("{p}/{proto}")).collect())
}

fn arguments(instruction: &'static str, expected: &'static str) -> ParseErrorKind {
    ParseErrorKind::Arguments {
        instruction,
        expected,
    }
}

fn empty(instruction: &'static str, what: &'static str) -> ParseErrorKind {
    ParseErrorKind::Empty { instruction, what }
}

fn unsupported_flag(
    instruction: &'static str,
    flag: String,
    accepted: &'static str,
) -> ParseErrorKind {
    ParseErrorKind::UnsupportedFlag {
        instruction,
        flag,
        accepted,
    }
}
