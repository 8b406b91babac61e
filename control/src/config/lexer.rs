//! Tokenizer: words, braces and comments.
//!
//! A word is a run of ASCII letters, digits and `. - _ / : [ ]`; keywords are
//! ordinary words (the parser decides from context whether a word is a
//! keyword or a value). `#` starts a comment that runs to the end of the line.
//! Whitespace (including newlines) only separates tokens.

use super::{Diag, Pos};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Tok {
    Word(String),
    Open,
    Close,
    Eof,
}

impl Tok {
    /// How the token is named in "found ..." messages.
    pub fn describe(&self) -> String {
        match self {
            Tok::Word(w) => format!("'{w}'"),
            Tok::Open => "'{'".to_string(),
            Tok::Close => "'}'".to_string(),
            Tok::Eof => "end of file".to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Token {
    pub tok: Tok,
    pub pos: Pos,
}

pub(crate) fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/' | ':' | '[' | ']')
}

/// Character iterator that tracks the position of the next character.
struct Cursor<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
    pos: Pos,
}

impl<'a> Cursor<'a> {
    fn new(text: &'a str) -> Self {
        Cursor {
            chars: text.chars().peekable(),
            pos: Pos { line: 1, col: 1 },
        }
    }

    fn peek(&mut self) -> Option<char> {
        self.chars.peek().copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.chars.next()?;
        if c == '\n' {
            self.pos.line += 1;
            self.pos.col = 1;
        } else {
            self.pos.col += 1;
        }
        Some(c)
    }
}

/// Splits `text` into tokens; the last token is always [`Tok::Eof`].
pub(crate) fn tokenize(text: &str) -> Result<Vec<Token>, Diag> {
    let mut cur = Cursor::new(text);
    let mut tokens = Vec::new();
    while let Some(c) = cur.peek() {
        let pos = cur.pos;
        match c {
            c if c.is_ascii_whitespace() => {
                cur.bump();
            }
            '#' => {
                while cur.peek().is_some_and(|c| c != '\n') {
                    cur.bump();
                }
            }
            '{' | '}' => {
                cur.bump();
                let tok = if c == '{' { Tok::Open } else { Tok::Close };
                tokens.push(Token { tok, pos });
            }
            c if is_word_char(c) => {
                let mut word = String::new();
                while let Some(c) = cur.peek().filter(|&c| is_word_char(c)) {
                    word.push(c);
                    cur.bump();
                }
                tokens.push(Token {
                    tok: Tok::Word(word),
                    pos,
                });
            }
            other => {
                let hint = if other == '"' || other == '\'' {
                    " (values are not quoted)"
                } else {
                    ""
                };
                // Invisible characters (controls, byte order mark, ...) are
                // shown escaped; quotes are shown as they are.
                let shown = match other {
                    '"' | '\'' => other.to_string(),
                    _ => other.escape_debug().to_string(),
                };
                return Err(Diag::new(
                    pos,
                    format!("unexpected character '{shown}'{hint}"),
                ));
            }
        }
    }
    tokens.push(Token {
        tok: Tok::Eof,
        pos: cur.pos,
    });
    Ok(tokens)
}

/// The position just after the last character of `text`.
pub(crate) fn end_position(text: &str) -> Pos {
    let mut cur = Cursor::new(text);
    while cur.bump().is_some() {}
    cur.pos
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<Tok> {
        tokenize(text).unwrap().into_iter().map(|t| t.tok).collect()
    }

    #[test]
    fn values_lex_as_one_word() {
        let w = |s: &str| Tok::Word(s.to_string());
        assert_eq!(
            words("control uds:///var/run/hastctl remote tcp6://[::1]:8457"),
            vec![
                w("control"),
                w("uds:///var/run/hastctl"),
                w("remote"),
                w("tcp6://[::1]:8457"),
                Tok::Eof
            ]
        );
    }

    #[test]
    fn braces_split_words_and_comments_are_skipped() {
        let w = |s: &str| Tok::Word(s.to_string());
        assert_eq!(
            words("on a{local x}# trailing { comment\n}"),
            vec![
                w("on"),
                w("a"),
                Tok::Open,
                w("local"),
                w("x"),
                Tok::Close,
                Tok::Close,
                Tok::Eof
            ]
        );
    }

    #[test]
    fn positions_are_one_based_lines_and_character_columns() {
        let toks = tokenize("# é comment\n\tab  {\n}").unwrap();
        let pos: Vec<(usize, usize)> = toks.iter().map(|t| (t.pos.line, t.pos.col)).collect();
        assert_eq!(pos, vec![(2, 2), (2, 6), (3, 1), (3, 2)]);
    }

    #[test]
    fn bad_character_is_reported_with_position() {
        let err = tokenize("local /a\nremote \"x\"").unwrap_err();
        assert_eq!(err.pos, Pos { line: 2, col: 8 });
        assert_eq!(
            err.message,
            "unexpected character '\"' (values are not quoted)"
        );
        let err = tokenize("a\u{0}").unwrap_err();
        assert_eq!(err.message, "unexpected character '\\0'");
        let err = tokenize("\u{feff}a").unwrap_err();
        assert_eq!(err.message, "unexpected character '\\u{feff}'");
        let err = tokenize("a é").unwrap_err();
        assert_eq!(err.pos, Pos { line: 1, col: 3 });
        assert_eq!(err.message, "unexpected character 'é'");
    }

    #[test]
    fn end_position_counts_characters() {
        assert_eq!(end_position(""), Pos { line: 1, col: 1 });
        assert_eq!(end_position("ab\néé"), Pos { line: 2, col: 3 });
        assert_eq!(end_position("ab\n"), Pos { line: 2, col: 1 });
    }
}
