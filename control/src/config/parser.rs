//! Recursive-descent parser from tokens to a raw tree of sections.
//!
//! ```text
//! file      := section EOF
//! section   := statement*
//! statement := KEY VALUE
//!            | "metrics" ( "listen" VALUE | "none" )
//!            | "on" NAME "{" section "}"          (global and resource level)
//!            | "resource" NAME "{" section "}"    (global level)
//! ```
//!
//! Every setting takes exactly one value, so no separators are needed. The
//! parser knows at which [`Level`] it is and rejects statements that do not
//! belong there; values are kept as raw words for the resolution step.

use super::lexer::{Tok, Token};
use super::{Diag, Pos};

/// The four kinds of section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    Global,
    GlobalNode,
    Resource,
    ResourceNode,
}

impl Level {
    pub fn describe(self) -> &'static str {
        match self {
            Level::Global => "global section",
            Level::GlobalNode => "global 'on' block",
            Level::Resource => "resource block",
            Level::ResourceNode => "resource 'on' block",
        }
    }

    /// The level of an `on` block nested in this one, if allowed.
    fn node_level(self) -> Option<Level> {
        match self {
            Level::Global => Some(Level::GlobalNode),
            Level::Resource => Some(Level::ResourceNode),
            Level::GlobalNode | Level::ResourceNode => None,
        }
    }
}

/// A statement that takes a single value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Key {
    Control,
    Pidfile,
    Listen,
    Exportdir,
    Replication,
    Checksum,
    Compression,
    Syncmode,
    Timeout,
    Exec,
    Metaflush,
    Name,
    Local,
    Remote,
    Source,
    Splitbrain,
    Metrics,
    Secret,
    Secretfile,
    Tls,
    Tlscert,
    Tlskey,
    Tlsca,
}

impl Key {
    const ALL: [Key; 23] = [
        Key::Control,
        Key::Pidfile,
        Key::Listen,
        Key::Exportdir,
        Key::Replication,
        Key::Checksum,
        Key::Compression,
        Key::Syncmode,
        Key::Timeout,
        Key::Exec,
        Key::Metaflush,
        Key::Name,
        Key::Local,
        Key::Remote,
        Key::Source,
        Key::Splitbrain,
        Key::Metrics,
        Key::Secret,
        Key::Secretfile,
        Key::Tls,
        Key::Tlscert,
        Key::Tlskey,
        Key::Tlsca,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Key::Control => "control",
            Key::Pidfile => "pidfile",
            Key::Listen => "listen",
            Key::Exportdir => "exportdir",
            Key::Replication => "replication",
            Key::Checksum => "checksum",
            Key::Compression => "compression",
            Key::Syncmode => "syncmode",
            Key::Timeout => "timeout",
            Key::Exec => "exec",
            Key::Metaflush => "metaflush",
            Key::Name => "name",
            Key::Local => "local",
            Key::Remote => "remote",
            Key::Source => "source",
            Key::Splitbrain => "splitbrain",
            Key::Metrics => "metrics",
            Key::Secret => "secret",
            Key::Secretfile => "secretfile",
            Key::Tls => "tls",
            Key::Tlscert => "tlscert",
            Key::Tlskey => "tlskey",
            Key::Tlsca => "tlsca",
        }
    }

    fn from_word(word: &str) -> Option<Key> {
        Key::ALL.into_iter().find(|k| k.as_str() == word)
    }

    /// The levels the statement may appear at, and where it belongs (for
    /// the error message when it is misplaced).
    fn placement(self) -> (&'static [Level], &'static str) {
        use Level::*;
        match self {
            Key::Control | Key::Pidfile | Key::Listen | Key::Exportdir | Key::Metrics => (
                &[Global, GlobalNode],
                "it belongs in the global section or a global 'on' block",
            ),
            Key::Replication
            | Key::Checksum
            | Key::Compression
            | Key::Syncmode
            | Key::Timeout
            | Key::Exec
            | Key::Splitbrain => (
                &[Global, Resource],
                "it cannot be set per node; set it in the resource block or the global section",
            ),
            Key::Metaflush => (
                &[Global, Resource, ResourceNode],
                "it belongs in the global section, a resource block or a resource's 'on' block",
            ),
            Key::Name | Key::Local => (
                &[Resource, ResourceNode],
                "it belongs in a resource block or a resource's 'on' block",
            ),
            Key::Remote | Key::Source => (&[ResourceNode], "it belongs in a resource's 'on' block"),
            Key::Secret | Key::Secretfile | Key::Tls | Key::Tlscert | Key::Tlskey | Key::Tlsca => {
                (&[Global, GlobalNode, Resource, ResourceNode], "")
            }
        }
    }
}

/// A word with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Word {
    pub text: String,
    pub pos: Pos,
}

/// `KEY VALUE`; `pos` is the position of the keyword.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Setting {
    pub key: Key,
    pub pos: Pos,
    pub value: Word,
}

/// `on NAME { ... }` or `resource NAME { ... }`; `pos` is the keyword's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Block {
    pub pos: Pos,
    pub name: Word,
    pub body: Section,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Section {
    pub settings: Vec<Setting>,
    pub on_blocks: Vec<Block>,
    pub resources: Vec<Block>,
}

/// Parses a whole file (the global section).
pub(crate) fn parse(tokens: &[Token]) -> Result<Section, Diag> {
    let mut parser = Parser { tokens, next: 0 };
    parser.section(Level::Global, None)
}

struct Parser<'a> {
    tokens: &'a [Token],
    next: usize,
}

/// The block being parsed, for "expected '}'" messages.
struct Opener<'a> {
    what: &'a str,
    pos: Pos,
}

impl Parser<'_> {
    fn peek(&self) -> &Token {
        // The lexer always ends the stream with Eof, which is never consumed.
        &self.tokens[self.next.min(self.tokens.len() - 1)]
    }

    fn bump(&mut self) -> Token {
        let token = self.peek().clone();
        if token.tok != Tok::Eof {
            self.next += 1;
        }
        token
    }

    /// Statements up to the closing brace (or end of file for the global
    /// section), which is consumed.
    fn section(&mut self, level: Level, opener: Option<Opener<'_>>) -> Result<Section, Diag> {
        let mut section = Section::default();
        loop {
            let token = self.peek().clone();
            match (&token.tok, &opener) {
                (Tok::Eof, None) => return Ok(section),
                (Tok::Eof, Some(open)) => {
                    return Err(Diag::new(
                        token.pos,
                        format!(
                            "expected '}}' to close the '{}' block opened at {}, found end of file",
                            open.what, open.pos
                        ),
                    ))
                }
                (Tok::Close, None) => {
                    return Err(Diag::new(
                        token.pos,
                        "unexpected '}': there is no open block to close",
                    ))
                }
                (Tok::Close, Some(_)) => {
                    self.bump();
                    return Ok(section);
                }
                (Tok::Open, _) => {
                    return Err(Diag::new(
                        token.pos,
                        format!("expected a statement in {}, found '{{'", level.describe()),
                    ))
                }
                (Tok::Word(word), _) => {
                    self.bump();
                    self.statement(level, word, token.pos, &mut section)?;
                }
            }
        }
    }

    /// One statement whose keyword `word` (at `pos`) was just consumed.
    fn statement(
        &mut self,
        level: Level,
        word: &str,
        pos: Pos,
        section: &mut Section,
    ) -> Result<(), Diag> {
        match word {
            "on" => {
                let Some(inner) = level.node_level() else {
                    return Err(Diag::new(
                        pos,
                        format!(
                            "'on' blocks cannot be nested: found 'on' in a {}",
                            level.describe()
                        ),
                    ));
                };
                let block = self.block("on", "a node name", pos, inner)?;
                section.on_blocks.push(block);
            }
            "resource" => {
                if level != Level::Global {
                    return Err(Diag::new(
                        pos,
                        format!(
                            "'resource' is not allowed in a {}: resource blocks belong in the global section",
                            level.describe()
                        ),
                    ));
                }
                let block = self.block("resource", "a resource name", pos, Level::Resource)?;
                section.resources.push(block);
            }
            _ => {
                let Some(key) = Key::from_word(word) else {
                    let hint = match word {
                        "extentsize" | "keepdirty" => {
                            " (it is set in the metadata by 'hastctl create -e/-k', not in hast.conf)"
                        }
                        _ => "",
                    };
                    return Err(Diag::new(
                        pos,
                        format!("unknown statement '{word}' in {}{hint}", level.describe()),
                    ));
                };
                let (levels, hint) = key.placement();
                if !levels.contains(&level) {
                    return Err(Diag::new(
                        pos,
                        format!("'{word}' is not allowed in a {}: {hint}", level.describe()),
                    ));
                }
                let value = if key == Key::Metrics {
                    self.metrics_value()?
                } else {
                    self.value(word, "a value")?
                };
                section.settings.push(Setting { key, pos, value });
            }
        }
        Ok(())
    }

    /// `NAME { section }` after the keyword `keyword` at `pos`.
    fn block(
        &mut self,
        keyword: &str,
        expected: &str,
        pos: Pos,
        inner: Level,
    ) -> Result<Block, Diag> {
        let name = self.value(keyword, expected)?;
        let what = format!("{keyword} {}", name.text);
        let token = self.bump();
        if token.tok != Tok::Open {
            return Err(Diag::new(
                token.pos,
                format!(
                    "expected '{{' after '{what}', found {}",
                    token.tok.describe()
                ),
            ));
        }
        let opener = Opener { what: &what, pos };
        let body = self.section(inner, Some(opener))?;
        Ok(Block { pos, name, body })
    }

    /// What follows `metrics`: `listen ADDRESS` (the address is the
    /// value) or `none`.
    fn metrics_value(&mut self) -> Result<Word, Diag> {
        let word = self.value("metrics", "'listen <address>' or 'none'")?;
        match word.text.as_str() {
            "none" => Ok(word),
            "listen" => self.value("metrics listen", "an address"),
            other => Err(Diag::new(
                word.pos,
                format!("expected 'listen <address>' or 'none' after 'metrics', found '{other}'"),
            )),
        }
    }

    /// The word after `keyword`.
    fn value(&mut self, keyword: &str, expected: &str) -> Result<Word, Diag> {
        let token = self.bump();
        match token.tok {
            Tok::Word(text) => Ok(Word {
                text,
                pos: token.pos,
            }),
            other => Err(Diag::new(
                token.pos,
                format!(
                    "expected {expected} after '{keyword}', found {}",
                    other.describe()
                ),
            )),
        }
    }
}
