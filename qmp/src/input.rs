//! Splitting a client's byte stream into JSON values.
//!
//! QMP has no framing of its own: a request is one JSON value, usually
//! followed by a newline. Values are taken from the stream as soon as they
//! are complete (several per read, or one spread over many reads). A
//! syntax error is reported once and the rest of that line is dropped, so a
//! client that sends one request per line (every real client) is back in
//! step at its next line. An incomplete value longer than the limit is
//! fatal for the connection.

use serde_json::Value;

/// One thing read from a client.
#[derive(Debug, PartialEq)]
pub(crate) enum Input {
    /// A complete JSON value (not necessarily an object).
    Value(Value),
    /// Bytes that are not JSON; the text is QEMU's "JSON parse error, ...".
    ParseError(String),
}

/// More than the limit is buffered without a complete value.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Oversized(pub usize);

pub(crate) struct Framer {
    buf: Vec<u8>,
    /// Dropping bytes up to the next newline after a syntax error.
    discarding: bool,
    max: usize,
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

impl Framer {
    pub(crate) fn new(max: usize) -> Self {
        Framer {
            buf: Vec::new(),
            discarding: false,
            max,
        }
    }

    /// Feeds bytes read from the client; returns what became complete.
    pub(crate) fn push(&mut self, mut data: &[u8]) -> Result<Vec<Input>, Oversized> {
        if self.discarding {
            match data.iter().position(|&b| b == b'\n') {
                None => return Ok(Vec::new()),
                Some(i) => {
                    self.discarding = false;
                    data = &data[i + 1..];
                }
            }
        }
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        loop {
            let start = self
                .buf
                .iter()
                .position(|&b| !is_ws(b))
                .unwrap_or(self.buf.len());
            self.buf.drain(..start);
            if self.buf.is_empty() {
                break;
            }
            let mut values = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
            match values.next() {
                None => {
                    self.buf.clear();
                    break;
                }
                Some(Ok(v)) => {
                    let used = values.byte_offset();
                    self.buf.drain(..used);
                    out.push(Input::Value(v));
                }
                Some(Err(e)) if e.is_eof() => {
                    if self.buf.len() > self.max {
                        let n = self.buf.len();
                        self.buf = Vec::new();
                        return Err(Oversized(n));
                    }
                    break;
                }
                Some(Err(e)) => {
                    out.push(Input::ParseError(format!("JSON parse error, {e}")));
                    let at = error_offset(&self.buf, e.line(), e.column());
                    match self.buf[at..].iter().position(|&b| b == b'\n') {
                        Some(i) => {
                            self.buf.drain(..at + i + 1);
                        }
                        None => {
                            self.buf.clear();
                            self.discarding = true;
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Bytes buffered for an incomplete value.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// The byte offset of serde_json's (1-based line, 1-based byte column),
/// clamped into `buf`; the error's own byte is included so that an error
/// detected at a newline drops only that line.
fn error_offset(buf: &[u8], line: usize, column: usize) -> usize {
    let mut offset = 0;
    for _ in 1..line {
        match buf[offset..].iter().position(|&b| b == b'\n') {
            Some(i) => offset += i + 1,
            None => return buf.len().saturating_sub(1),
        }
    }
    (offset + column.saturating_sub(1)).min(buf.len().saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn values(inputs: Vec<Input>) -> Vec<Value> {
        inputs
            .into_iter()
            .map(|i| match i {
                Input::Value(v) => v,
                Input::ParseError(e) => json!({ "parse-error": e }),
            })
            .collect()
    }

    #[test]
    fn several_values_in_one_read_and_one_over_many() {
        let mut f = Framer::new(1 << 20);
        let got = values(f.push(b"{\"a\":1}\n{\"b\":2}{\"c\"").unwrap());
        assert_eq!(got, vec![json!({"a":1}), json!({"b":2})]);
        assert!(f.push(b":").unwrap().is_empty());
        assert_eq!(values(f.push(b"3}\r\n").unwrap()), vec![json!({"c":3})]);
        assert_eq!(f.pending(), 0);
    }

    #[test]
    fn syntax_error_drops_the_rest_of_its_line() {
        let mut f = Framer::new(1 << 20);
        let got = f.push(b"{\"execute\" foo bar}\n{\"ok\":1}\n").unwrap();
        assert_eq!(got.len(), 2);
        match &got[0] {
            Input::ParseError(e) => assert!(e.starts_with("JSON parse error, "), "{e}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(got[1], Input::Value(json!({"ok":1})));
    }

    #[test]
    fn syntax_error_without_newline_drops_until_one_arrives() {
        let mut f = Framer::new(1 << 20);
        let got = f.push(b"nonsense {\"x\":").unwrap();
        assert_eq!(got.len(), 1);
        assert!(f.push(b"1} still the bad line").unwrap().is_empty());
        assert_eq!(
            values(f.push(b" end\n{\"y\":2}\n").unwrap()),
            vec![json!({"y":2})]
        );
    }

    #[test]
    fn error_on_a_later_line_of_a_pretty_printed_value() {
        let mut f = Framer::new(1 << 20);
        let got = f
            .push(b"{\n  \"a\": 1,\n  \"b\": nope\n}\n{\"c\":3}\n")
            .unwrap();
        // The error is on line 3; line 4 ("}") is then an error of its own,
        // as in any line-resynchronising parser; line 5 is read again.
        assert!(matches!(got[0], Input::ParseError(_)));
        assert_eq!(got.last(), Some(&Input::Value(json!({"c":3}))));
    }

    #[test]
    fn oversized_incomplete_value() {
        let mut f = Framer::new(1000);
        assert!(f.push(b"{\"a\":\"").unwrap().is_empty());
        assert!(f.push(&[b'x'; 900]).unwrap().is_empty());
        assert_eq!(f.push(&[b'x'; 200]), Err(Oversized(1106)));
    }

    #[test]
    fn garbage_bytes_never_panic() {
        let mut f = Framer::new(4096);
        let mut seed = 0x1234_5678u32;
        for _ in 0..2000 {
            let mut chunk = Vec::new();
            for _ in 0..(seed % 37) {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                let pick = b"{}[]\":,\n 0123456789eE.-+truefalsnul\\u\xff\xc3";
                chunk.push(pick[(seed >> 16) as usize % pick.len()]);
            }
            let _ = f.push(&chunk);
        }
        // Deep nesting hits serde_json's recursion limit: an error, not a
        // stack overflow.
        let mut deep = vec![b'['; 100_000];
        deep.push(b'\n');
        let mut f = Framer::new(1 << 20);
        let got = f.push(&deep).unwrap();
        assert!(matches!(got[0], Input::ParseError(_)));
    }
}
