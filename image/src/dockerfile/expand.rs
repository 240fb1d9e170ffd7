//! Variable substitution in instruction arguments, following BuildKit's shell lexer for one
//! word: `$NAME`, `${NAME}`, `${NAME:-word}`, `${NAME-word}`, `${NAME:+word}`, `${NAME+word}`,
//! `${NAME:?message}`, `${NAME?message}`, single and double quotes (removed), and the escape
//! character (`\` or the backtick `# escape=` chose). Undefined variables expand to nothing.

/// Why a word could not be expanded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpandError {
    #[error("unterminated {0} quote")]
    UnterminatedQuote(&'static str),
    #[error("missing `}}` in `${{...}}`")]
    MissingBrace,
    #[error("bad substitution: `${{` must be followed by a variable name")]
    MissingName,
    #[error(
        "unsupported modifier `{modifier}` in `${{{name}...}}`; supported: `:-`, `-`, `:+`, `+`, `:?`, `?`"
    )]
    UnsupportedModifier { name: String, modifier: String },
    #[error("{name}: {message}")]
    Required { name: String, message: String },
}

/// How quotes in the word are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Quotes {
    /// Shell-like: quotes group and are removed (shell-form arguments).
    Remove,
    /// Quotes are ordinary characters (JSON-form arguments, already unquoted by JSON).
    Keep,
}

/// Expands one word. `lookup` gives a variable's value, `None` when it is unset.
pub(super) fn expand(
    word: &str,
    escape: char,
    quotes: Quotes,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ExpandError> {
    let mut lexer = Lexer {
        chars: word.chars().collect(),
        pos: 0,
        escape,
        quotes,
        lookup,
    };
    lexer.word(None)
}

struct Lexer<'a> {
    chars: Vec<char>,
    pos: usize,
    escape: char,
    quotes: Quotes,
    lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl Lexer<'_> {
    fn next(&mut self) -> Option<char> {
        let ch = self.chars.get(self.pos).copied();
        if ch.is_some() {
            self.pos += 1;
        }
        ch
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    /// Reads up to the end, or up to (and past) an unquoted `stop`, which must then be found.
    fn word(&mut self, stop: Option<char>) -> Result<String, ExpandError> {
        let mut out = String::new();
        loop {
            let Some(ch) = self.next() else {
                return match stop {
                    Some(_) => Err(ExpandError::MissingBrace),
                    None => Ok(out),
                };
            };
            match ch {
                _ if Some(ch) == stop => return Ok(out),
                '\'' if self.quotes == Quotes::Remove => self.single_quoted(&mut out)?,
                '"' if self.quotes == Quotes::Remove => self.double_quoted(&mut out)?,
                '$' => self.dollar(&mut out)?,
                _ if ch == self.escape => match self.quotes {
                    Quotes::Remove => out.extend(self.next()),
                    Quotes::Keep if self.peek() == Some('$') => out.extend(self.next()),
                    Quotes::Keep => out.push(ch),
                },
                _ => out.push(ch),
            }
        }
    }

    fn single_quoted(&mut self, out: &mut String) -> Result<(), ExpandError> {
        loop {
            match self.next() {
                None => return Err(ExpandError::UnterminatedQuote("single")),
                Some('\'') => return Ok(()),
                Some(ch) => out.push(ch),
            }
        }
    }

    fn double_quoted(&mut self, out: &mut String) -> Result<(), ExpandError> {
        loop {
            match self.next() {
                None => return Err(ExpandError::UnterminatedQuote("double")),
                Some('"') => return Ok(()),
                Some('$') => self.dollar(out)?,
                Some(ch) if ch == self.escape => match self.peek() {
                    Some(next) if next == '"' || next == '$' || next == self.escape => {
                        out.push(next);
                        self.pos += 1;
                    }
                    _ => out.push(ch),
                },
                Some(ch) => out.push(ch),
            }
        }
    }

    fn name(&mut self) -> String {
        let mut name = String::new();
        while let Some(ch) = self
            .peek()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        {
            name.push(ch);
            self.pos += 1;
        }
        name
    }

    /// Expands what follows a `$` that has just been read.
    fn dollar(&mut self, out: &mut String) -> Result<(), ExpandError> {
        if self.peek() != Some('{') {
            let name = self.name();
            if name.is_empty() {
                out.push('$');
            } else {
                out.push_str(&(self.lookup)(&name).unwrap_or_default());
            }
            return Ok(());
        }
        self.pos += 1;
        let name = self.name();
        if name.is_empty() {
            return Err(match self.peek() {
                None => ExpandError::MissingBrace,
                Some(_) => ExpandError::MissingName,
            });
        }
        let value = (self.lookup)(&name);
        let colon = self.peek() == Some(':');
        if colon {
            self.pos += 1;
        }
        let op = self.next().ok_or(ExpandError::MissingBrace)?;
        if op == '}' && !colon {
            out.push_str(&value.unwrap_or_default());
            return Ok(());
        }
        if !matches!(op, '-' | '+' | '?') {
            return Err(ExpandError::UnsupportedModifier {
                name,
                modifier: format!("{}{op}", if colon { ":" } else { "" }),
            });
        }
        let word = self.word(Some('}'))?;
        // With a colon, an empty value counts as unset.
        let set = match &value {
            Some(v) => !(colon && v.is_empty()),
            None => false,
        };
        match op {
            '-' if set => out.push_str(&value.unwrap_or_default()),
            '-' => out.push_str(&word),
            '+' if set => out.push_str(&word),
            '+' => {}
            _ if set => out.push_str(&value.unwrap_or_default()),
            _ => {
                let message = if !word.is_empty() {
                    word
                } else if value.is_some() {
                    "is not allowed to be empty".to_owned()
                } else {
                    "is not allowed to be unset".to_owned()
                };
                return Err(ExpandError::Required { name, message });
            }
        }
        Ok(())
    }
}
