//! The Dockerfile's lexical layer, as BuildKit's parser has it: parser directives at the top,
//! comments, line continuations, the split into instruction keyword, `--flags` and arguments,
//! and the three argument syntaxes (JSON array, whitespace-separated words, quote-aware words).

use super::{ParseError, ParseErrorKind};

/// The default escape character; `# escape=`` ` switches to the backtick.
pub(super) const DEFAULT_ESCAPE: char = '\\';

/// One instruction after comments are dropped and continuation lines are joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LogicalLine {
    /// 1-based number of the physical line the instruction starts on.
    pub line: usize,
    /// The joined text, trimmed.
    pub text: String,
}

/// What the parser directives chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Directives {
    pub escape: char,
}

/// Splits a Dockerfile into its directives and logical lines.
pub(super) fn split(text: &str) -> Result<(Directives, Vec<LogicalLine>), ParseError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let physical: Vec<&str> = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .collect();
    let directives = directives(&physical)?;
    let escape = directives.escape;
    let mut lines = Vec::new();
    let mut i = 0;
    while i < physical.len() {
        let start = i + 1;
        let first = physical[i].trim_start();
        i += 1;
        if first.starts_with('#') {
            continue;
        }
        let (mut joined, mut continues) = trim_continuation(first, escape);
        while continues && i < physical.len() {
            let raw = physical[i];
            i += 1;
            let trimmed = raw.trim_start();
            // Comment and empty lines inside a continued instruction are dropped, as Docker does.
            if trimmed.starts_with('#') || trimmed.trim_end().is_empty() {
                continue;
            }
            let (part, more) = trim_continuation(raw, escape);
            joined.push_str(&part);
            continues = more;
        }
        let joined = joined.trim();
        if !joined.is_empty() {
            lines.push(LogicalLine {
                line: start,
                text: joined.to_owned(),
            });
        }
    }
    Ok((directives, lines))
}

/// Reads the parser directives (`# name=value`) that open the file. The first line that is not
/// a known directive (a blank line, a comment, an instruction) ends them.
fn directives(physical: &[&str]) -> Result<Directives, ParseError> {
    let mut escape = None;
    let mut syntax_seen = false;
    let mut check_seen = false;
    for (index, line) in physical.iter().enumerate() {
        let Some((name, value)) = directive(line) else {
            break;
        };
        let error = |kind| ParseError::at(index + 1, kind);
        let seen = match name.as_str() {
            "escape" => {
                let chosen = match value {
                    "\\" => '\\',
                    "`" => '`',
                    _ => {
                        return Err(error(ParseErrorKind::InvalidEscape {
                            value: value.to_owned(),
                        }))
                    }
                };
                escape.replace(chosen).is_some()
            }
            // The frontend image is BuildKit's business; this parser is the frontend.
            "syntax" => std::mem::replace(&mut syntax_seen, true),
            "check" => std::mem::replace(&mut check_seen, true),
            _ => break,
        };
        if seen {
            return Err(error(ParseErrorKind::DuplicateDirective { name }));
        }
    }
    Ok(Directives {
        escape: escape.unwrap_or(DEFAULT_ESCAPE),
    })
}

/// Parses `#[ \t]*name[ \t]*=[ \t]*value[ \t]*` into the lowercase name and the value.
fn directive(line: &str) -> Option<(String, &str)> {
    let rest = line.strip_prefix('#')?.trim_start_matches([' ', '\t']);
    let (name, value) = rest.split_once('=')?;
    let name = name.trim_end_matches([' ', '\t']);
    let mut chars = name.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric());
    let value = value.trim_matches([' ', '\t']);
    (valid && !value.is_empty()).then(|| (name.to_ascii_lowercase(), value))
}

/// Removes a trailing escape character (and the blanks after it); says whether it was there.
fn trim_continuation(line: &str, escape: char) -> (String, bool) {
    let trimmed = line.trim_end_matches([' ', '\t']);
    match trimmed.strip_suffix(escape) {
        Some(rest) => (rest.to_owned(), true),
        None => (line.to_owned(), false),
    }
}

/// Splits a logical line into the instruction keyword (as written) and the rest.
pub(super) fn split_keyword(text: &str) -> (&str, &str) {
    match text.split_once(char::is_whitespace) {
        Some((keyword, rest)) => (keyword, rest.trim_start()),
        None => (text, ""),
    }
}

/// A `--name[=value]` flag given before an instruction's arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Flag {
    pub name: String,
    pub value: Option<String>,
}

/// Takes the leading `--flags` off an instruction's arguments; a lone `--` ends them.
pub(super) fn take_flags(mut rest: &str) -> (Vec<Flag>, &str) {
    let mut flags = Vec::new();
    while let Some(after) = rest.strip_prefix("--") {
        let end = after.find(char::is_whitespace).unwrap_or(after.len());
        let word = &after[..end];
        rest = after[end..].trim_start();
        if word.is_empty() {
            break;
        }
        let (name, value) = match word.split_once('=') {
            Some((name, value)) => (name, Some(value.to_owned())),
            None => (word, None),
        };
        flags.push(Flag {
            name: name.to_ascii_lowercase(),
            value,
        });
    }
    (flags, rest)
}

/// How an argument that may be a JSON array parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Json {
    /// A JSON array of strings: the exec form.
    Strings(Vec<String>),
    /// Not JSON at all: Docker falls back to the shell form.
    Absent,
    /// A JSON array with something other than strings in it: an error in Docker.
    NonStrings,
}

/// Tries the JSON-array form of an argument.
pub(super) fn json_array(rest: &str) -> Json {
    if !rest.starts_with('[') {
        return Json::Absent;
    }
    match serde_json::from_str::<Vec<serde_json::Value>>(rest) {
        Err(_) => Json::Absent,
        Ok(values) => values
            .into_iter()
            .map(|v| match v {
                serde_json::Value::String(s) => Some(s),
                _ => None,
            })
            .collect::<Option<Vec<String>>>()
            .map_or(Json::NonStrings, Json::Strings),
    }
}

/// Splits on runs of blanks, as Docker does for COPY, EXPOSE and FROM arguments.
pub(super) fn whitespace_words(rest: &str) -> Vec<String> {
    rest.split([' ', '\t', '\r', '\u{b}', '\u{c}'])
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Splits into words at unquoted whitespace, keeping quotes and escapes in the words for the
/// variable expander to interpret later (BuildKit's `parseWords`).
pub(super) fn quoted_words(rest: &str, escape: char) -> Vec<String> {
    let chars: Vec<char> = rest.chars().collect();
    let mut words = Vec::new();
    let mut word = String::new();
    // Whether the word has a quote in it, so an empty `""` still counts as a word.
    let mut blank_ok = false;
    let mut quote: Option<char> = None;
    let mut i = 0;
    while i < chars.len() {
        let ch = chars[i];
        i += 1;
        match quote {
            None if ch.is_whitespace() => {
                if blank_ok || !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                blank_ok = false;
            }
            None => {
                if ch == '\'' || ch == '"' {
                    quote = Some(ch);
                    blank_ok = true;
                }
                if ch == escape {
                    // An escape at the very end is dropped; otherwise it and the escaped
                    // character both stay in the word.
                    let Some(&next) = chars.get(i) else { continue };
                    word.push(ch);
                    word.push(next);
                    i += 1;
                    continue;
                }
                word.push(ch);
            }
            Some(q) => {
                if ch == q {
                    quote = None;
                }
                if ch == escape && q != '\'' {
                    let Some(&next) = chars.get(i) else { continue };
                    word.push(ch);
                    word.push(next);
                    i += 1;
                    continue;
                }
                word.push(ch);
            }
        }
    }
    if blank_ok || !word.is_empty() {
        words.push(word);
    }
    words
}

/// Finds a heredoc opener (`<<EOF`, `<<-EOF`, `<<"EOF"`, `2<<EOF`) among shell-form words;
/// here-strings (`<<<`) and a bare `<<` are not heredocs.
pub(super) fn heredoc(rest: &str) -> Option<String> {
    whitespace_words(rest).into_iter().find(|word| {
        let after_digits = word.trim_start_matches(|c: char| c.is_ascii_digit());
        let Some(after) = after_digits.strip_prefix("<<") else {
            return false;
        };
        let name = after.strip_prefix('-').unwrap_or(after);
        let name = name.trim_matches(['"', '\'']);
        !name.is_empty() && !after.starts_with('<')
    })
}
