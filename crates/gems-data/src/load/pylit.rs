//! A small parser for the Python literals that Qilin stores in CSV cells.
//!
//! Qilin cells hold `str()` of Python objects: numpy arrays without commas
//! (`[1328732  944054 ...]`), lists of dicts with single-quoted keys, `nan`, and `array([...])`
//! wrappers. A real parser is more robust than regular expressions over such text.
//!
//! Hostile cells are bounded: nesting deeper than [`MAX_DEPTH`] is an error (never a stack
//! overflow), every scan moves forward, and an error message quotes at most 100 characters of
//! the input.

use crate::error::quote;

/// The deepest nesting of lists, dicts and `array(...)` calls a cell may have. Real Qilin cells
/// nest three levels; the limit only keeps a hostile cell from exhausting the stack.
pub(super) const MAX_DEPTH: usize = 256;

/// A parsed Python literal.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum PyValue {
    /// Any number (ints and floats alike), `nan` and `inf` included.
    Num(f64),
    /// A string.
    Str(String),
    /// `True` / `False`.
    Bool(bool),
    /// `None`.
    None,
    /// A list, tuple or array.
    List(Vec<PyValue>),
    /// A dict, keys in order.
    Dict(Vec<(PyValue, PyValue)>),
}

impl PyValue {
    /// The value of a string key in a dict.
    pub(super) fn get(&self, key: &str) -> Option<&PyValue> {
        match self {
            PyValue::Dict(entries) => entries
                .iter()
                .find(|(k, _)| matches!(k, PyValue::Str(s) if s == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// The number, if this is one.
    pub(super) fn as_f64(&self) -> Option<f64> {
        match self {
            PyValue::Num(x) => Some(*x),
            PyValue::Bool(b) => Some(f64::from(u8::from(*b))),
            _ => None,
        }
    }
}

/// Parses one literal; the error says what was expected at which character offset.
pub(super) fn parse(text: &str) -> Result<PyValue, String> {
    let mut parser = Parser { s: text.as_bytes(), text, pos: 0, depth: 0 };
    let value = parser.value()?;
    parser.ws();
    if parser.pos != parser.s.len() {
        return Err(format!("trailing text at character {}", parser.pos));
    }
    Ok(value)
}

struct Parser<'a> {
    s: &'a [u8],
    text: &'a str,
    pos: usize,
    /// Lists, dicts and calls currently open.
    depth: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.pos < self.s.len() && self.s[self.pos].is_ascii_whitespace() {
            self.pos += 1;
        }
    }

    fn err<T>(&self, what: &str) -> Result<T, String> {
        Err(format!("expected {what} at character {}", self.pos))
    }

    /// Opens one nesting level, refusing to go deeper than [`MAX_DEPTH`].
    fn enter(&mut self) -> Result<(), String> {
        if self.depth >= MAX_DEPTH {
            return Err(format!(
                "nested deeper than {MAX_DEPTH} levels at character {} (not a Qilin cell?)",
                self.pos
            ));
        }
        self.depth += 1;
        Ok(())
    }

    fn value(&mut self) -> Result<PyValue, String> {
        self.ws();
        match self.s.get(self.pos) {
            None => self.err("a value, found the end"),
            Some(b'[') | Some(b'(') => self.list(),
            Some(b'{') => self.dict(),
            Some(b'\'') | Some(b'"') => self.string().map(PyValue::Str),
            Some(c) if c.is_ascii_digit() || matches!(c, b'-' | b'+' | b'.') => self.number(),
            Some(c) if c.is_ascii_alphabetic() => self.word(),
            Some(_) => self.err("a value"),
        }
    }

    fn list(&mut self) -> Result<PyValue, String> {
        self.enter()?;
        let value = self.list_items();
        self.depth -= 1;
        value
    }

    fn list_items(&mut self) -> Result<PyValue, String> {
        let close = if self.s[self.pos] == b'[' { b']' } else { b')' };
        self.pos += 1;
        let mut items = Vec::new();
        loop {
            self.ws();
            match self.s.get(self.pos) {
                None => return self.err("a closing bracket"),
                Some(&c) if c == close => {
                    self.pos += 1;
                    return Ok(PyValue::List(items));
                }
                Some(b',') => self.pos += 1,
                Some(_) => items.push(self.value()?),
            }
        }
    }

    fn dict(&mut self) -> Result<PyValue, String> {
        self.enter()?;
        let value = self.dict_entries();
        self.depth -= 1;
        value
    }

    fn dict_entries(&mut self) -> Result<PyValue, String> {
        self.pos += 1;
        let mut entries = Vec::new();
        loop {
            self.ws();
            match self.s.get(self.pos) {
                None => return self.err("'}'"),
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(PyValue::Dict(entries));
                }
                Some(b',') => self.pos += 1,
                Some(_) => {
                    let key = self.value()?;
                    self.ws();
                    if self.s.get(self.pos) != Some(&b':') {
                        return self.err("':' in a dict");
                    }
                    self.pos += 1;
                    let value = self.value()?;
                    entries.push((key, value));
                }
            }
        }
    }

    fn string(&mut self) -> Result<String, String> {
        let quote = self.s[self.pos];
        self.pos += 1;
        let mut out = String::new();
        let mut start = self.pos;
        while let Some(&c) = self.s.get(self.pos) {
            if c == quote {
                out.push_str(&self.text[start..self.pos]);
                self.pos += 1;
                return Ok(out);
            }
            if c == b'\\' {
                out.push_str(&self.text[start..self.pos]);
                let escaped = self.s.get(self.pos + 1).copied();
                match escaped {
                    Some(b'n') => out.push('\n'),
                    Some(b't') => out.push('\t'),
                    Some(e) if e.is_ascii() => out.push(e as char),
                    _ => return self.err("an ASCII escape"),
                }
                self.pos += 2;
                start = self.pos;
                continue;
            }
            self.pos += 1;
        }
        self.err("a closing quote")
    }

    fn number(&mut self) -> Result<PyValue, String> {
        let start = self.pos;
        while let Some(&c) = self.s.get(self.pos) {
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'+' | b'.') {
                self.pos += 1;
            } else {
                break;
            }
        }
        let token = &self.text[start..self.pos];
        token
            .parse::<f64>()
            .map(PyValue::Num)
            .map_err(|_| format!("bad number {} at character {start}", quote(token)))
    }

    fn word(&mut self) -> Result<PyValue, String> {
        let start = self.pos;
        while self
            .s
            .get(self.pos)
            .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b'.')
        {
            self.pos += 1;
        }
        match &self.text[start..self.pos] {
            "True" => Ok(PyValue::Bool(true)),
            "False" => Ok(PyValue::Bool(false)),
            "None" => Ok(PyValue::None),
            "nan" | "NaN" => Ok(PyValue::Num(f64::NAN)),
            "inf" => Ok(PyValue::Num(f64::INFINITY)),
            // `array([...])`, `np.array([...], dtype=...)`: keep the first argument.
            _ if self.s.get(self.pos) == Some(&b'(') => {
                self.pos += 1;
                self.enter()?;
                let inner = self.value();
                self.depth -= 1;
                let inner = inner?;
                let mut depth = 1;
                while depth > 0 {
                    match self.s.get(self.pos) {
                        None => return self.err("')'"),
                        Some(b'(') => depth += 1,
                        Some(b')') => depth -= 1,
                        _ => {}
                    }
                    self.pos += 1;
                }
                Ok(inner)
            }
            other => Err(format!("unknown word {} at character {start}", quote(other))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_numpy_and_dict_cells() {
        let v = parse("[1328732  944054\n 1299335]").unwrap();
        assert_eq!(
            v,
            PyValue::List(vec![
                PyValue::Num(1328732.0),
                PyValue::Num(944054.0),
                PyValue::Num(1299335.0)
            ])
        );
        let v =
            parse("[{'click': 1.0, 'note_id': 'ab', 'page_time': nan}\n {'click': 0}]").unwrap();
        let PyValue::List(items) = v else { panic!("not a list") };
        assert_eq!(items[0].get("click").and_then(PyValue::as_f64), Some(1.0));
        assert_eq!(items[0].get("note_id"), Some(&PyValue::Str("ab".into())));
        let v = parse("[array([1.96e+06, 3.2e+02])\n array([77464.,   320.2])]").unwrap();
        assert!(matches!(v, PyValue::List(ref l) if l.len() == 2));
        assert!(parse("[1 2").is_err());
        assert!(parse("[1 x2]").is_err());
    }
}
