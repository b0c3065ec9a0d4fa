//! JSON written member by member into a byte buffer: the bytes
//! `serde_json` writes for the same values (tested), without its
//! serializer's per-field and per-string calls through `io::Write` and its
//! escaping of names we know have nothing to escape. For the hot paths
//! only: an event published (`json_datum`), a long series answered.

/// An object being written: its members so far, and where they go.
#[derive(Debug)]
pub struct Object<'a> {
    pub out: &'a mut Vec<u8>,
    empty: bool,
}

impl<'a> Object<'a> {
    /// Writes the opening brace.
    pub fn open(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Object { out, empty: true }
    }

    /// The comma before every member but the first.
    #[inline(always)]
    fn member(&mut self) {
        if !std::mem::take(&mut self.empty) {
            self.out.push(b',');
        }
    }

    /// A member's key from the data (a map's), escaped.
    pub fn key(&mut self, key: &str) {
        self.member();
        text(self.out, key);
        self.out.push(b':');
    }

    /// A field's name: ours, with nothing to escape, so written as it is.
    #[inline(always)]
    pub fn field(&mut self, name: &'static str) {
        self.member();
        plain(self.out, name);
        self.out.push(b':');
    }

    #[inline(always)]
    pub fn string(&mut self, name: &'static str, value: &str) {
        self.field(name);
        text(self.out, value);
    }

    /// A string of ours with nothing to escape (an enum symbol, an id).
    #[inline(always)]
    pub fn symbol(&mut self, name: &'static str, value: &str) {
        self.field(name);
        plain(self.out, value);
    }

    #[inline(always)]
    pub fn optional_string(&mut self, name: &'static str, value: Option<&str>) {
        match value {
            Some(value) => self.string(name, value),
            None => {
                self.field(name);
                self.out.extend_from_slice(b"null");
            }
        }
    }

    #[inline(always)]
    pub fn number(&mut self, name: &'static str, value: impl itoa::Integer) {
        self.field(name);
        self.out
            .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    }

    /// A member holding an array of objects, each `item` written by
    /// `write`.
    #[inline(always)]
    pub fn objects<T>(
        &mut self,
        name: &'static str,
        items: impl IntoIterator<Item = T>,
        mut write: impl FnMut(&mut Object<'_>, T),
    ) {
        self.field(name);
        self.out.push(b'[');
        for (i, item) in items.into_iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            let mut object = Object::open(self.out);
            write(&mut object, item);
            object.close();
        }
        self.out.push(b']');
    }

    /// Ends the object.
    #[inline(always)]
    pub fn close(self) {
        self.out.push(b'}');
    }
}

/// `value` as a JSON string, nothing in it escaped.
#[inline(always)]
pub fn plain(out: &mut Vec<u8>, value: &str) {
    out.reserve(value.len() + 2);
    out.push(b'"');
    out.extend_from_slice(value.as_bytes());
    out.push(b'"');
}

/// `value` as a JSON string, escaped as serde_json escapes: quote, backslash
/// and the control characters, the rest as it is.
pub fn text(out: &mut Vec<u8>, value: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = value.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    // Most text has nothing to escape: one pass over it without branches
    // decides, and then it is copied whole.
    let mut escapes = 0u8;
    for &b in bytes {
        escapes |= u8::from(b < 0x20) | u8::from(b == b'"') | u8::from(b == b'\\');
    }
    if escapes == 0 {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut plain = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            0x09 => b"\\t",
            0x0a => b"\\n",
            0x0c => b"\\f",
            0x0d => b"\\r",
            0x00..=0x1f => &[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ],
            _ => continue,
        };
        out.extend_from_slice(&bytes[plain..i]);
        out.extend_from_slice(short);
        plain = i + 1;
    }
    out.extend_from_slice(&bytes[plain..]);
    out.push(b'"');
}
