//! Path patterns: `.dockerignore` rules (Docker's `patternmatcher`) and the globs of COPY and
//! ADD sources (Go's `filepath.Match`, one path segment at a time).
//!
//! Both know `*` (any run of characters but `/`), `?` (one character but `/`), classes
//! (`[abc]`, `[a-z]`, `[^a]`) and `\` escapes. Only `.dockerignore` knows `**`: any number of
//! directories, including none.

/// A syntax error in a pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("unterminated `[` character class")]
    UnterminatedClass,
    #[error("`!` must be followed by a pattern")]
    EmptyExclusion,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Char(char),
    /// `*`
    Star,
    /// `?`
    Question,
    /// `[...]`: inclusive ranges, negated with a leading `^` or `!`.
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
    /// `**` (or `**/`) followed by more pattern: empty, or anything ending in `/`.
    AnyDirs,
    /// `**` at the end: anything.
    AnyRest,
}

/// A compiled pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    tokens: Vec<Token>,
}

impl Glob {
    /// Compiles a pattern; `double_star` turns on `**`.
    pub fn new(pattern: &str, double_star: bool) -> Result<Glob, PatternError> {
        let chars: Vec<char> = pattern.chars().collect();
        let mut tokens = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            let ch = chars[i];
            i += 1;
            match ch {
                '*' if double_star && chars.get(i) == Some(&'*') => {
                    i += 1;
                    if chars.get(i) == Some(&'/') {
                        i += 1;
                    }
                    tokens.push(if i == chars.len() {
                        Token::AnyRest
                    } else {
                        Token::AnyDirs
                    });
                }
                '*' => tokens.push(Token::Star),
                '?' => tokens.push(Token::Question),
                '[' => {
                    let (token, next) = class(&chars, i)?;
                    tokens.push(token);
                    i = next;
                }
                '\\' if i < chars.len() => {
                    tokens.push(Token::Char(chars[i]));
                    i += 1;
                }
                _ => tokens.push(Token::Char(ch)),
            }
        }
        Ok(Glob { tokens })
    }

    /// Whether the whole of `text` matches.
    pub fn matches(&self, text: &str) -> bool {
        let text: Vec<char> = text.chars().collect();
        let width = text.len() + 1;
        let mut memo = vec![None; (self.tokens.len() + 1) * width];
        self.match_from(&text, 0, 0, &mut memo)
    }

    fn match_from(&self, text: &[char], t: usize, i: usize, memo: &mut [Option<bool>]) -> bool {
        let key = t * (text.len() + 1) + i;
        if let Some(known) = memo[key] {
            return known;
        }
        let here = text.get(i).copied();
        let single = |ok: bool| ok && here.is_some_and(|c| c != '/');
        let result = match self.tokens.get(t) {
            None => i == text.len(),
            Some(Token::Char(c)) => here == Some(*c) && self.match_from(text, t + 1, i + 1, memo),
            Some(Token::Question) => single(true) && self.match_from(text, t + 1, i + 1, memo),
            Some(Token::Class { negated, ranges }) => {
                let inside =
                    here.is_some_and(|c| ranges.iter().any(|(a, b)| (*a..=*b).contains(&c)));
                single(inside != *negated) && self.match_from(text, t + 1, i + 1, memo)
            }
            Some(Token::Star) => {
                self.match_from(text, t + 1, i, memo)
                    || (single(true) && self.match_from(text, t, i + 1, memo))
            }
            Some(Token::AnyRest) => (i..=text.len()).any(|j| self.match_from(text, t + 1, j, memo)),
            Some(Token::AnyDirs) => {
                self.match_from(text, t + 1, i, memo)
                    || (i + 1..=text.len())
                        .any(|j| text[j - 1] == '/' && self.match_from(text, t + 1, j, memo))
            }
        };
        memo[key] = Some(result);
        result
    }
}

/// Parses a class whose `[` is just before `start`; returns it and the index after its `]`.
fn class(chars: &[char], start: usize) -> Result<(Token, usize), PatternError> {
    let mut i = start;
    let negated = matches!(chars.get(i), Some('^') | Some('!'));
    if negated {
        i += 1;
    }
    let mut ranges = Vec::new();
    let mut first = true;
    loop {
        let mut lo = *chars.get(i).ok_or(PatternError::UnterminatedClass)?;
        i += 1;
        if lo == ']' && !first {
            return Ok((Token::Class { negated, ranges }, i));
        }
        first = false;
        if lo == '\\' {
            lo = *chars.get(i).ok_or(PatternError::UnterminatedClass)?;
            i += 1;
        }
        let mut hi = lo;
        if chars.get(i) == Some(&'-') && chars.get(i + 1).is_some_and(|c| *c != ']') {
            hi = chars[i + 1];
            i += 2;
            if hi == '\\' {
                hi = *chars.get(i).ok_or(PatternError::UnterminatedClass)?;
                i += 1;
            }
        }
        ranges.push((lo, hi));
    }
}

/// Whether a COPY source has glob characters (unescaped `*`, `?` or `[`).
pub fn has_wildcards(pattern: &str) -> bool {
    let mut escaped = false;
    for ch in pattern.chars() {
        match ch {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '*' | '?' | '[' => return true,
            _ => {}
        }
    }
    false
}

/// One `.dockerignore` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    /// A `!` rule: re-includes what earlier rules excluded.
    exception: bool,
    glob: Glob,
}

/// The rules of a `.dockerignore` file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IgnoreRules {
    rules: Vec<Rule>,
}

impl IgnoreRules {
    /// Parses a `.dockerignore`: one pattern a line, `#` comments, blank lines skipped, `!`
    /// for exceptions; patterns are cleaned like paths and a leading `/` is dropped. Errors
    /// carry the 1-based line.
    pub fn parse(text: &str) -> Result<IgnoreRules, (usize, PatternError)> {
        let mut rules = Vec::new();
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        for (index, line) in text.lines().enumerate() {
            if line.starts_with('#') {
                continue;
            }
            let mut pattern = line.trim();
            if pattern.is_empty() {
                continue;
            }
            let exception = pattern.starts_with('!');
            if exception {
                pattern = pattern[1..].trim();
                if pattern.is_empty() {
                    return Err((index + 1, PatternError::EmptyExclusion));
                }
            }
            let cleaned = clean(pattern);
            let cleaned = match cleaned.strip_prefix('/') {
                Some(rest) if !rest.is_empty() => rest,
                _ => cleaned.as_str(),
            };
            let glob = Glob::new(cleaned, true).map_err(|e| (index + 1, e))?;
            rules.push(Rule { exception, glob });
        }
        Ok(IgnoreRules { rules })
    }

    /// Whether any rule is an exception, so that an excluded directory may still hold
    /// included files.
    pub fn has_exceptions(&self) -> bool {
        self.rules.iter().any(|r| r.exception)
    }

    /// Whether the context-relative path `path` (`/`-separated, no leading `./`) is excluded:
    /// the last rule that matches it or one of its parent directories decides.
    pub fn is_ignored(&self, path: &str) -> bool {
        let mut ignored = false;
        for rule in &self.rules {
            // Rules that cannot change the outcome are skipped, as Docker does.
            if rule.exception != ignored {
                continue;
            }
            let parents = path.match_indices('/').map(|(at, _)| &path[..at]);
            if rule.glob.matches(path) || parents.into_iter().any(|p| rule.glob.matches(p)) {
                ignored = !rule.exception;
            }
        }
        ignored
    }
}

/// Go's `filepath.Clean` for `/`-separated paths: repeated slashes, `.` and `dir/..` go;
/// leading `..` stays on relative paths and is dropped on rooted ones; `""` becomes `.`.
pub fn clean(path: &str) -> String {
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => match parts.last() {
                Some(&last) if last != ".." => {
                    parts.pop();
                }
                _ if rooted => {}
                _ => parts.push(".."),
            },
            _ => parts.push(part),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_owned(),
        (false, false) => joined,
    }
}
