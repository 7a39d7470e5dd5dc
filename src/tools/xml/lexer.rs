//! The XML lexer: tags with their attributes (entities decoded), line numbers, comments
//! and a leading declaration skipped; anything else is an error.

use super::{XmlError, XmlErrorKind};

pub(super) struct Tag<'a> {
    pub(super) line: usize,
    pub(super) kind: TagKind<'a>,
}

pub(super) enum TagKind<'a> {
    Open {
        name: &'a str,
        attrs: Vec<(&'a str, String)>,
        empty: bool,
    },
    Close {
        name: &'a str,
    },
}

pub(super) struct Lexer<'a> {
    src: &'a [u8],
    pos: usize,
    pub(super) line: usize,
    seen_tag: bool,
}

fn is_name_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b == b':'
}

fn is_name_char(b: u8) -> bool {
    is_name_start(b) || b.is_ascii_digit() || b == b'-' || b == b'.'
}

impl<'a> Lexer<'a> {
    pub(super) fn new(src: &'a [u8]) -> Lexer<'a> {
        Lexer {
            src,
            pos: 0,
            line: 1,
            seen_tag: false,
        }
    }

    pub(super) fn err(&self, kind: XmlErrorKind) -> XmlError {
        XmlError {
            line: self.line,
            kind,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.src.get(self.pos).copied()
    }

    fn starts_with(&self, s: &[u8]) -> bool {
        self.src.get(self.pos..).is_some_and(|r| r.starts_with(s))
    }

    fn bump(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.pos += 1;
        if b == b'\n' {
            self.line += 1;
        }
        Some(b)
    }

    fn skip_ws(&mut self) -> bool {
        let mut any = false;
        while let Some(b' ' | b'\t' | b'\r' | b'\n') = self.peek() {
            self.bump();
            any = true;
        }
        any
    }

    /// Skips past `end`, or fails at the end of input.
    fn skip_past(&mut self, end: &[u8], what: &'static str) -> Result<(), XmlError> {
        while !self.starts_with(end) {
            if self.bump().is_none() {
                return Err(self.err(XmlErrorKind::UnexpectedEof(what)));
            }
        }
        self.pos += end.len();
        Ok(())
    }

    fn name(&mut self) -> Result<&'a str, XmlError> {
        let start = self.pos;
        match self.peek() {
            Some(b) if is_name_start(b) => {}
            Some(_) => return Err(self.err(XmlErrorKind::Syntax("expected a name"))),
            None => return Err(self.err(XmlErrorKind::UnexpectedEof("inside a tag"))),
        }
        while self.peek().is_some_and(is_name_char) {
            self.pos += 1;
        }
        let bytes = self.src.get(start..self.pos).unwrap_or_default();
        std::str::from_utf8(bytes).map_err(|_| self.err(XmlErrorKind::NotUtf8))
    }

    fn value(&mut self) -> Result<String, XmlError> {
        let quote = match self.bump() {
            Some(q @ (b'"' | b'\'')) => q,
            Some(_) => return Err(self.err(XmlErrorKind::Syntax("expected a quoted value"))),
            None => return Err(self.err(XmlErrorKind::UnexpectedEof("inside a tag"))),
        };
        let start = self.pos;
        loop {
            match self.peek() {
                None => return Err(self.err(XmlErrorKind::UnexpectedEof("inside a value"))),
                Some(b'<') => return Err(self.err(XmlErrorKind::Syntax("'<' inside a value"))),
                Some(b) if b == quote => break,
                Some(_) => {
                    self.bump();
                }
            }
        }
        let raw = self.src.get(start..self.pos).unwrap_or_default();
        self.pos += 1;
        let raw = std::str::from_utf8(raw).map_err(|_| self.err(XmlErrorKind::NotUtf8))?;
        unescape(raw).map_err(|kind| self.err(kind))
    }

    /// The next tag, skipping whitespace, comments and a leading declaration.
    pub(super) fn next(&mut self) -> Result<Option<Tag<'a>>, XmlError> {
        loop {
            self.skip_ws();
            let Some(b) = self.peek() else {
                return Ok(None);
            };
            if b != b'<' {
                let start = self.pos;
                let end = self
                    .src
                    .get(start..)
                    .and_then(|r| r.iter().position(|&c| c == b'<'))
                    .map_or(self.src.len(), |n| start + n);
                let text = self.src.get(start..end.min(start + 40)).unwrap_or_default();
                let text = String::from_utf8_lossy(text).trim_end().to_string();
                return Err(self.err(XmlErrorKind::Text(text)));
            }
            if self.starts_with(b"<!--") {
                self.skip_past(b"-->", "inside a comment")?;
                continue;
            }
            if self.starts_with(b"<?") {
                if self.seen_tag {
                    return Err(self.err(XmlErrorKind::Syntax(
                        "processing instruction after the first element",
                    )));
                }
                self.skip_past(b"?>", "inside a processing instruction")?;
                continue;
            }
            if self.starts_with(b"<!") {
                return Err(self.err(XmlErrorKind::Syntax("DOCTYPE and CDATA are not supported")));
            }
            self.seen_tag = true;
            let line = self.line;
            self.pos += 1;
            if self.peek() == Some(b'/') {
                self.pos += 1;
                let name = self.name()?;
                self.skip_ws();
                if self.bump() != Some(b'>') {
                    return Err(self.err(XmlErrorKind::Syntax("expected '>' after a closing tag")));
                }
                return Ok(Some(Tag {
                    line,
                    kind: TagKind::Close { name },
                }));
            }
            let name = self.name()?;
            let mut attrs: Vec<(&'a str, String)> = Vec::new();
            loop {
                let spaced = self.skip_ws();
                match self.peek() {
                    None => return Err(self.err(XmlErrorKind::UnexpectedEof("inside a tag"))),
                    Some(b'>') => {
                        self.pos += 1;
                        return Ok(Some(Tag {
                            line,
                            kind: TagKind::Open {
                                name,
                                attrs,
                                empty: false,
                            },
                        }));
                    }
                    Some(b'/') => {
                        self.pos += 1;
                        if self.bump() != Some(b'>') {
                            return Err(self.err(XmlErrorKind::Syntax("expected '>' after '/'")));
                        }
                        return Ok(Some(Tag {
                            line,
                            kind: TagKind::Open {
                                name,
                                attrs,
                                empty: true,
                            },
                        }));
                    }
                    Some(_) if !spaced => {
                        return Err(self.err(XmlErrorKind::Syntax(
                            "expected whitespace before an attribute",
                        )))
                    }
                    Some(_) => {}
                }
                let attr = self.name()?;
                self.skip_ws();
                if self.bump() != Some(b'=') {
                    return Err(self.err(XmlErrorKind::Syntax("expected '=' after an attribute")));
                }
                self.skip_ws();
                let value = self.value()?;
                if attrs.iter().any(|(a, _)| *a == attr) {
                    return Err(self.err(XmlErrorKind::DuplicateAttribute(attr.to_string())));
                }
                attrs.push((attr, value));
            }
        }
    }
}

fn unescape(raw: &str) -> Result<String, XmlErrorKind> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(i) = rest.find('&') {
        out.push_str(rest.get(..i).unwrap_or_default());
        let after = rest.get(i + 1..).unwrap_or_default();
        let end = after
            .find(';')
            .ok_or(XmlErrorKind::Syntax("'&' without ';'"))?;
        let ent = after.get(..end).unwrap_or_default();
        let c = match ent {
            "lt" => '<',
            "gt" => '>',
            "amp" => '&',
            "quot" => '"',
            "apos" => '\'',
            _ => {
                let code = if let Some(hex) = ent.strip_prefix("#x") {
                    u32::from_str_radix(hex, 16).ok()
                } else if let Some(dec) = ent.strip_prefix('#') {
                    dec.parse::<u32>().ok()
                } else {
                    None
                };
                code.and_then(char::from_u32)
                    .ok_or_else(|| XmlErrorKind::BadEntity(ent.chars().take(20).collect()))?
            }
        };
        out.push(c);
        rest = after.get(end + 1..).unwrap_or_default();
    }
    out.push_str(rest);
    Ok(out)
}

/// Escapes text for an attribute value between double quotes.
pub fn escape_attr(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}
