//! Walks a top-level JSON object entry by entry, knowing the line of every key.
//!
//! `serde_json` reports line numbers for syntax errors but not for values that parse fine and
//! are wrong (an unknown item, an empty user, a duplicate key). Parsing the top-level object
//! ourselves, and each value with `serde_json`, gives both: exact positions for every entry and
//! serde's typed decoding of each value.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::{Error, Result, quote};

/// Iterator-like reader over `"key": value` entries of one top-level JSON object.
pub(crate) struct ObjectEntries<'a> {
    text: &'a str,
    path: &'a Path,
    pos: usize,
    counted_to: usize,
    line: usize,
    started: bool,
    finished: bool,
    first: bool,
}

impl<'a> ObjectEntries<'a> {
    pub(crate) fn new(text: &'a str, path: &'a Path) -> Self {
        Self {
            text,
            path,
            pos: 0,
            counted_to: 0,
            line: 1,
            started: false,
            finished: false,
            first: true,
        }
    }

    /// The 1-based line of the current position.
    fn current_line(&mut self) -> usize {
        let pos = self.pos.min(self.text.len());
        if pos > self.counted_to {
            self.line +=
                self.text.as_bytes()[self.counted_to..pos].iter().filter(|&&b| b == b'\n').count();
            self.counted_to = pos;
        }
        self.line
    }

    fn skip_ws(&mut self) {
        let bytes = self.text.as_bytes();
        while self.pos < bytes.len() && matches!(bytes[self.pos], b' ' | b'\n' | b'\r' | b'\t') {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn error(&mut self, message: impl Into<String>) -> Error {
        let line = self.current_line();
        Error::malformed(self.path, line, message)
    }

    fn expect(&mut self, byte: u8, what: &str) -> Result<()> {
        self.skip_ws();
        match self.peek() {
            Some(b) if b == byte => {
                self.pos += 1;
                Ok(())
            }
            Some(b) => Err(self.error(format!("expected {what}, found {:?}", b as char))),
            None => {
                Err(self
                    .error(format!("unexpected end of file, expected {what} (truncated JSON?)")))
            }
        }
    }

    /// Parses one JSON value at the current position with serde.
    fn value<T: DeserializeOwned>(&mut self, what: &str) -> Result<T> {
        self.skip_ws();
        let base_line = self.current_line();
        let rest = &self.text[self.pos..];
        let mut stream = serde_json::Deserializer::from_str(rest).into_iter::<T>();
        match stream.next() {
            Some(Ok(value)) => {
                self.pos += stream.byte_offset();
                Ok(value)
            }
            Some(Err(err)) => {
                let line = base_line + err.line().saturating_sub(1);
                let message = json_message(&err);
                Err(Error::malformed(self.path, line, format!("bad {what}: {message}")))
            }
            None => {
                Err(self
                    .error(format!("unexpected end of file, expected {what} (truncated JSON?)")))
            }
        }
    }

    /// The next entry as `(key, line of the key, value)`, or `None` after the closing brace.
    pub(crate) fn next_entry<T: DeserializeOwned>(&mut self) -> Result<Option<(String, usize, T)>> {
        if self.finished {
            return Ok(None);
        }
        if !self.started {
            self.expect(b'{', "'{' opening the top-level object")?;
            self.started = true;
        }
        self.skip_ws();
        if self.first {
            if self.peek() == Some(b'}') {
                return self.finish();
            }
        } else {
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => return self.finish(),
                Some(b) => {
                    return Err(self.error(format!("expected ',' or '}}', found {:?}", b as char)));
                }
                None => {
                    return Err(self.error(
                        "unexpected end of file inside the top-level object (truncated JSON?)",
                    ));
                }
            }
        }
        self.first = false;
        self.skip_ws();
        let line = self.current_line();
        if self.peek() != Some(b'"') {
            return Err(match self.peek() {
                None => self.error("unexpected end of file, expected a key (truncated JSON?)"),
                Some(b) => self.error(format!("expected a string key, found {:?}", b as char)),
            });
        }
        let key: String = self.value("key")?;
        self.expect(b':', "':' after a key")?;
        let value = self.value(&format!("value of key {}", quote(&key)))?;
        Ok(Some((key, line, value)))
    }

    fn finish<T>(&mut self) -> Result<Option<T>> {
        self.pos += 1;
        self.finished = true;
        self.skip_ws();
        if self.pos < self.text.len() {
            return Err(self.error("trailing characters after the top-level object"));
        }
        Ok(None)
    }
}

/// Shortens an error message that may quote hostile input (serde quotes whole strings): at most
/// about 200 characters, the head and the tail kept, the cut marked.
pub(crate) fn shorten(message: String) -> String {
    const HEAD: usize = 120;
    const TAIL: usize = 80;
    let chars = message.chars().count();
    if chars <= HEAD + TAIL + 20 {
        return message;
    }
    let head: String = message.chars().take(HEAD).collect();
    let tail: String = message.chars().skip(chars - TAIL).collect();
    format!("{head}... ({} characters cut) ...{tail}", chars - HEAD - TAIL)
}

/// The message of a `serde_json` error for one line or value: position suffix dropped (the
/// caller names file and line), a truncation hint added, hostile quotes shortened.
pub(crate) fn json_message(e: &serde_json::Error) -> String {
    let mut message = e.to_string();
    if let Some(cut) = message.find(" at line ") {
        message.truncate(cut);
    }
    if e.is_eof() {
        message.push_str(" (truncated JSON?)");
    }
    shorten(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(text: &str) -> Result<Vec<(String, usize, Vec<u32>)>> {
        let path = Path::new("t.json");
        let mut entries = ObjectEntries::new(text, path);
        let mut out = Vec::new();
        while let Some(e) = entries.next_entry()? {
            out.push(e);
        }
        Ok(out)
    }

    #[test]
    fn reads_entries_with_lines() {
        let got = all("{\n \"a\": [1, 2],\n \"b\": []\n}\n").unwrap();
        assert_eq!(got, vec![("a".into(), 2, vec![1, 2]), ("b".into(), 3, vec![])]);
        assert!(all("{}").unwrap().is_empty());
    }

    #[test]
    fn truncated_and_bad_values_name_the_line() {
        let err = all("{\n \"a\": [1, 2],\n \"b\": [3,").unwrap_err().to_string();
        assert!(err.starts_with("t.json:3:"), "{err}");
        assert!(err.contains("truncated"), "{err}");
        let err = all("{\n \"a\": [1, 2],\n\n \"b\": [\"x\"]}").unwrap_err().to_string();
        assert!(err.starts_with("t.json:4:"), "{err}");
        let err = all("{\"a\": [1]} x").unwrap_err().to_string();
        assert!(err.contains("trailing"), "{err}");
    }
}
