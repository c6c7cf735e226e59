//! Variable substitution in Dockerfile instruction words, with Docker's rules for
//! "environment replacement":
//!
//! | Form              | Result                                                       |
//! |-------------------|--------------------------------------------------------------|
//! | `$name`, `${name}`| the value; an unset variable gives the empty string          |
//! | `${name:-word}`   | the value if set and not empty, else `word`                  |
//! | `${name-word}`    | the value if set (even empty), else `word`                   |
//! | `${name:+word}`   | `word` if set and not empty, else the empty string           |
//! | `${name+word}`    | `word` if set (even empty), else the empty string            |
//! | `${name:?word}`   | the value if set and not empty, else an error saying `word`  |
//! | `${name?word}`    | the value if set (even empty), else an error saying `word`   |
//! | `\c`              | `c` literally, whatever it is: `\$` is a dollar, `\\` a backslash |
//!
//! Names are `[A-Za-z_][A-Za-z0-9_]*`; `$name` takes the longest such run (`$a-b` is the
//! value of `a` then `-b`). A `$` not followed by a name or `{` is kept (`$`, `$1`, `$ `).
//! `word` is itself expanded (`${a:-${b}}`, `${a:-\}}`) and ends at the first unescaped
//! `}`. Values are inserted as they are, never expanded again. A trailing lone `\` is kept.
//! Errors: an unterminated `${`, a name that is empty or malformed (`${}`, `${1}`,
//! `${a b}`), a modifier Docker has but Hearth does not (`${a#x}`, `${a%x}`, `${a/x/y}`),
//! a `?` form whose variable is missing, and substitutions nested more than
//! [`MAX_DEPTH`] deep (the Dockerfile comes from users; recursion stays bounded).
//!
//! What this module leaves to its caller:
//! - **Which instructions are expanded.** Docker expands the arguments of ADD, COPY, ENV,
//!   EXPOSE, FROM, LABEL, STOPSIGNAL, USER, VOLUME and WORKDIR, and never those of RUN, CMD
//!   and ENTRYPOINT (their shell does it, in the VM).
//! - **What is set**: the lookup function sees the ARGs and ENVs in scope at that line.
//! - **Quotes.** Docker's lexer also removes quotes and keeps single-quoted text literal;
//!   here quotes are ordinary characters, because `dockerfile-parser` has already unquoted
//!   ENV, LABEL and ARG values by the time they are expanded.
//!
//! Why not `dockerfile-parser`: version 0.9 returns every instruction's arguments as written.
//! Its one substitution routine, `dockerfile_parser::image::substitute`, serves FROM image
//! references only: it knows `$name` and `${name}` but no modifiers and no `\$` escape, gives
//! up (`None`) on an unset variable instead of expanding it to the empty string, accepts
//! names starting with a digit, and expands values recursively, which Docker does not.

/// Deepest nesting of `${...}` inside a modifier's word (`${a:-${b:-${c}}}` is 3 deep).
pub const MAX_DEPTH: usize = 16;

/// Longest excerpt of the Dockerfile word quoted in an error.
const EXCERPT: usize = 60;

/// Why a word cannot be expanded. Each message quotes the offending substitution.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpandError {
    /// `${` without its closing `}`.
    #[error("`{text}` is missing its closing `}}`")]
    Unterminated {
        /// The substitution, from `${` to the end of the word.
        text: String,
    },
    /// `${}` or a name that is not `[A-Za-z_][A-Za-z0-9_]*`.
    #[error("bad substitution `{text}`: a variable name is letters, digits and `_`, not starting with a digit")]
    BadName {
        /// The substitution.
        text: String,
    },
    /// A modifier other than `-`, `+`, `?` (with or without `:`).
    #[error("unsupported modifier `{modifier}` in `{text}`: use ${{name:-default}}, ${{name:+alternative}} or ${{name:?message}} (each also without the colon)")]
    BadModifier {
        /// The modifier, as written.
        modifier: String,
        /// The substitution.
        text: String,
    },
    /// `${name?message}` or `${name:?message}` with the variable missing.
    #[error("{name}: {message}")]
    Required {
        /// The variable.
        name: String,
        /// The message the Dockerfile gives (expanded), or `is not set` / `is empty`
        /// when it gives none.
        message: String,
    },
    /// Substitutions nested deeper than [`MAX_DEPTH`].
    #[error("`{text}` nests substitutions more than {MAX_DEPTH} deep")]
    TooDeep {
        /// The innermost substitution refused.
        text: String,
    },
}

/// `word` with its variables substituted by Docker's rules (see the module docs).
///
/// `vars` looks a variable up: `None` when it is unset, `Some("")` when it is set but
/// empty (the `:` forms treat both alike; the others do not).
///
/// # Errors
///
/// An [`ExpandError`] for an unterminated `${`, a malformed name, an unsupported modifier,
/// a missing `?` variable, or nesting deeper than [`MAX_DEPTH`].
///
/// # Example
///
/// ```
/// use hearth_image::expand::expand;
/// let vars = |name: &str| (name == "HOME").then(|| "/root".to_owned());
/// assert_eq!(expand("${HOME}/app:$PORT", &vars).unwrap(), "/root/app:");
/// assert_eq!(expand("${PORT:-8080} \\$HOME", &vars).unwrap(), "8080 $HOME");
/// assert!(expand("${HOME", &vars).is_err());
/// ```
pub fn expand(word: &str, vars: &impl Fn(&str) -> Option<String>) -> Result<String, ExpandError> {
    Expander { word, pos: 0, vars }.text(None, 0)
}

/// A cursor over one word.
struct Expander<'a, F> {
    word: &'a str,
    /// Byte offset of the next character.
    pos: usize,
    vars: &'a F,
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_name(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

impl<'a, F: Fn(&str) -> Option<String>> Expander<'a, F> {
    fn peek(&self) -> Option<char> {
        self.word[self.pos..].chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    /// The longest run of name characters at the cursor (possibly empty).
    fn name(&mut self) -> &'a str {
        let start = self.pos;
        if self.peek().is_some_and(is_name_start) {
            while self.peek().is_some_and(is_name) {
                self.pos += 1;
            }
        }
        let word = self.word;
        &word[start..self.pos]
    }

    /// The substitution starting at byte `start`, up to its `}` or the end, for messages.
    fn excerpt(&self, start: usize) -> String {
        let rest = &self.word[start..];
        let end = rest.find('}').map_or(rest.len(), |i| i + 1);
        let mut text: String = rest[..end].chars().take(EXCERPT).collect();
        if text.len() < end {
            text.push_str("...");
        }
        text
    }

    /// Expanded text up to the end of the word or, inside the `${` at byte `brace`, up to
    /// its first unescaped `}` (consumed, not included).
    fn text(&mut self, brace: Option<usize>, depth: usize) -> Result<String, ExpandError> {
        let mut out = String::new();
        loop {
            match self.bump() {
                None => {
                    return match brace {
                        None => Ok(out),
                        Some(start) => Err(ExpandError::Unterminated { text: self.excerpt(start) }),
                    }
                }
                Some('}') if brace.is_some() => return Ok(out),
                Some('\\') => out.push(self.bump().unwrap_or('\\')),
                Some('$') => {
                    let start = self.pos - 1;
                    match self.peek() {
                        Some('{') => {
                            self.pos += 1;
                            out.push_str(&self.braced(start, depth)?);
                        }
                        Some(c) if is_name_start(c) => {
                            let name = self.name();
                            out.push_str(&(self.vars)(name).unwrap_or_default());
                        }
                        _ => out.push('$'),
                    }
                }
                Some(c) => out.push(c),
            }
        }
    }

    /// The value of the `${...}` that starts at byte `start`, the cursor just past its `{`.
    fn braced(&mut self, start: usize, depth: usize) -> Result<String, ExpandError> {
        if depth >= MAX_DEPTH {
            return Err(ExpandError::TooDeep { text: self.excerpt(start) });
        }
        let name = self.name().to_owned();
        let after = self.bump();
        if name.is_empty() {
            return Err(match after {
                None => ExpandError::Unterminated { text: self.excerpt(start) },
                Some(_) => ExpandError::BadName { text: self.excerpt(start) },
            });
        }
        let (colon, op) = match after {
            None => return Err(ExpandError::Unterminated { text: self.excerpt(start) }),
            Some('}') => return Ok((self.vars)(&name).unwrap_or_default()),
            Some(':') => (true, self.bump()),
            Some(c @ ('-' | '+' | '?' | '#' | '%' | '/' | '^' | ',' | '@')) => (false, Some(c)),
            Some(_) => return Err(ExpandError::BadName { text: self.excerpt(start) }),
        };
        let op = match op {
            Some(op @ ('-' | '+' | '?')) => op,
            None => return Err(ExpandError::Unterminated { text: self.excerpt(start) }),
            Some(other) => {
                let modifier = if colon { format!(":{other}") } else { other.to_string() };
                return Err(ExpandError::BadModifier { modifier, text: self.excerpt(start) });
            }
        };
        // Docker expands the word whether or not it is used.
        let word = self.text(Some(start), depth + 1)?;
        let raw = (self.vars)(&name);
        let is_set = raw.is_some();
        let value = raw.filter(|v| !(colon && v.is_empty()));
        Ok(match (op, value) {
            ('-', Some(v)) => v,
            ('-', None) => word,
            ('+', Some(_)) => word,
            ('+', None) => String::new(),
            (_, Some(v)) => v,
            (_, None) => {
                let message = match (word.is_empty(), is_set) {
                    (false, _) => word,
                    (true, true) => "is empty".to_owned(),
                    (true, false) => "is not set".to_owned(),
                };
                return Err(ExpandError::Required { name, message });
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn with(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| map.get(name).cloned()
    }

    fn ok(word: &str) -> String {
        let vars = with(&[("A", "alpha"), ("B", "beta"), ("EMPTY", ""), ("_x1", "under"), ("D", "$A")]);
        expand(word, &vars).unwrap_or_else(|e| panic!("{word}: {e}"))
    }

    fn err(word: &str) -> ExpandError {
        expand(word, &with(&[("A", "alpha"), ("EMPTY", "")])).expect_err(word)
    }

    #[test]
    fn plain_and_braced_names() {
        assert_eq!(ok("$A"), "alpha");
        assert_eq!(ok("${A}"), "alpha");
        assert_eq!(ok("x${A}y"), "xalphay");
        assert_eq!(ok("$A/$B"), "alpha/beta");
        assert_eq!(ok("$A-$B.tar"), "alpha-beta.tar");
        assert_eq!(ok("$AB"), "", "longest name: AB is unset");
        assert_eq!(ok("${A}B"), "alphaB");
        assert_eq!(ok("$_x1 ${_x1}"), "under under");
        assert_eq!(ok("$UNSET|${UNSET}|$EMPTY"), "||");
        assert_eq!(ok("$D"), "$A", "values are not expanded again");
        assert_eq!(ok("é$A€"), "éalpha€");
    }

    #[test]
    fn dollars_without_a_name_stay() {
        assert_eq!(ok("$"), "$");
        assert_eq!(ok("a$"), "a$");
        assert_eq!(ok("$1"), "$1");
        assert_eq!(ok("$ A"), "$ A");
        assert_eq!(ok("$$"), "$$");
        assert_eq!(ok("$-"), "$-");
        assert_eq!(ok("$é"), "$é");
    }

    #[test]
    fn modifiers() {
        assert_eq!(ok("${A:-d}"), "alpha");
        assert_eq!(ok("${UNSET:-d}"), "d");
        assert_eq!(ok("${EMPTY:-d}"), "d");
        assert_eq!(ok("${EMPTY-d}"), "");
        assert_eq!(ok("${UNSET-d}"), "d");
        assert_eq!(ok("${A:+w}"), "w");
        assert_eq!(ok("${UNSET:+w}"), "");
        assert_eq!(ok("${EMPTY:+w}"), "");
        assert_eq!(ok("${EMPTY+w}"), "w");
        assert_eq!(ok("${A:?need A}"), "alpha");
        assert_eq!(ok("${EMPTY?need it}"), "");
        assert_eq!(ok("${UNSET:-}"), "");
        assert_eq!(ok("${UNSET:-a b  c}"), "a b  c");
        assert_eq!(ok("${UNSET:-$A}"), "alpha");
        assert_eq!(ok("${UNSET:-${B:+x$A}}"), "xalpha");
        assert_eq!(ok("${UNSET:-{x}}"), "{x}", "the word ends at the first }}");
        assert_eq!(ok("${UNSET:-a\\}b}"), "a}b");
        assert_eq!(ok("${UNSET:-a:-b}"), "a:-b");
        assert_eq!(ok("${A:-$}"), "alpha");
    }

    #[test]
    fn escapes() {
        assert_eq!(ok("\\$A"), "$A");
        assert_eq!(ok("\\${A}"), "${A}");
        assert_eq!(ok("\\\\$A"), "\\alpha");
        assert_eq!(ok("Rex\\ The\\ Dog"), "Rex The Dog");
        assert_eq!(ok("a\\"), "a\\", "a trailing backslash is kept");
        assert_eq!(ok("\\é"), "é");
        assert_eq!(ok("${UNSET:-\\$A}"), "$A");
    }

    #[test]
    fn quotes_are_ordinary_characters() {
        assert_eq!(ok("'$A' \"$A\""), "'alpha' \"alpha\"");
    }

    #[test]
    fn malformed_substitutions_are_errors() {
        for word in ["${", "${A", "x${A", "${A:", "${A:-word", "${UNSET:-${B}", "${A:-}${"] {
            assert!(matches!(err(word), ExpandError::Unterminated { .. }), "{word}: {}", err(word));
        }
        for word in ["${}", "${:-x}", "${1}", "${A B}", "${A.B}", "${-x}", "${é}", "${{A}}"] {
            assert!(matches!(err(word), ExpandError::BadName { .. }), "{word}: {}", err(word));
        }
        for (word, modifier) in [("${A:x}", ":x"), ("${A:}", ":}"), ("${A#x}", "#"), ("${A%%x}", "%"), ("${A/a/b}", "/"), ("${A:=x}", ":=")]
        {
            assert_eq!(err(word), ExpandError::BadModifier { modifier: modifier.into(), text: word.into() }, "{word}");
        }
        assert_eq!(err("${UNSET?say $A}"), ExpandError::Required { name: "UNSET".into(), message: "say alpha".into() });
        assert_eq!(err("${EMPTY:?}").to_string(), "EMPTY: is empty");
        assert_eq!(err("${UNSET?}").to_string(), "UNSET: is not set");
        // Errors in an unused word still count, as in Docker.
        assert!(matches!(err("${A:-${}}"), ExpandError::BadName { .. }));
    }

    #[test]
    fn messages_quote_the_substitution() {
        assert_eq!(err("cp ${A:-x /app").to_string(), "`${A:-x /app` is missing its closing `}`");
        assert_eq!(
            err("${A#x} rest").to_string(),
            "unsupported modifier `#` in `${A#x}`: use ${name:-default}, ${name:+alternative} or ${name:?message} (each also without the colon)"
        );
        let long = format!("${{A:-{}", "x".repeat(500));
        assert!(err(&long).to_string().len() < 120);
    }

    #[test]
    fn nesting_is_bounded() {
        let nested = |n: usize| format!("{}{}", "${U:-".repeat(n), "}".repeat(n));
        assert_eq!(ok(&nested(MAX_DEPTH)), "");
        assert!(matches!(err(&nested(MAX_DEPTH + 1)), ExpandError::TooDeep { .. }));
        // Deep enough to overflow the stack if nesting were unbounded.
        assert!(matches!(err(&nested(100_000)), ExpandError::TooDeep { .. }));
    }

    /// `s` with every `$` and `\` escaped.
    fn escape(s: &str) -> String {
        s.chars().flat_map(|c| if c == '$' || c == '\\' { vec!['\\', c] } else { vec![c] }).collect()
    }

    proptest! {
        #[test]
        fn words_without_dollar_or_backslash_are_unchanged(word in "[^$\\\\]*") {
            prop_assert_eq!(ok(&word), word);
        }

        #[test]
        fn escaped_words_come_back_literally(word in ".*") {
            prop_assert_eq!(ok(&escape(&word)), word);
        }

        #[test]
        fn nothing_panics(word in "([$\\\\{}:+?#-]|[AB]|EMPTY| |é){0,40}") {
            let _ = expand(&word, &with(&[("A", "alpha"), ("EMPTY", "")]));
        }

        #[test]
        fn values_are_inserted_verbatim(
            name in "[A-Za-z_][A-Za-z0-9_]{0,8}",
            value in proptest::option::of(".*"),
            word in "[^$\\\\}]*",
            prefix in "[^$\\\\]*",
        ) {
            let vars = |n: &str| if n == name { value.clone() } else { None };
            let set = value.clone().unwrap_or_default();
            let non_empty = value.clone().filter(|v| !v.is_empty());
            prop_assert_eq!(expand(&format!("{prefix}${{{name}}}"), &vars).unwrap(), format!("{prefix}{set}"));
            prop_assert_eq!(expand(&format!("${name}/"), &vars).unwrap(), format!("{set}/"));
            prop_assert_eq!(expand(&format!("${{{name}:-{word}}}"), &vars).unwrap(), non_empty.clone().unwrap_or(word.clone()));
            prop_assert_eq!(expand(&format!("${{{name}-{word}}}"), &vars).unwrap(), value.clone().unwrap_or(word.clone()));
            prop_assert_eq!(expand(&format!("${{{name}:+{word}}}"), &vars).unwrap(), if non_empty.is_some() { word.clone() } else { String::new() });
            prop_assert_eq!(expand(&format!("${{{name}+{word}}}"), &vars).unwrap(), if value.is_some() { word.clone() } else { String::new() });
            prop_assert_eq!(expand(&format!("${{{name}:?{word}}}"), &vars).ok(), non_empty);
        }
    }
}
