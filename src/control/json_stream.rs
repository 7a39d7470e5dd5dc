//! Cutting a byte stream into top-level JSON texts.
//!
//! QMP clients send JSON values back to back, often without newlines, and a malformed one must
//! not poison the rest of the stream (as serde_json's streaming deserializer would). So the
//! stream is cut first — by bracket depth outside strings — and each piece parsed on its own.

/// Largest single JSON text accepted; a client sending more is cut off.
pub const MAX_TEXT: usize = 1 << 20;

/// What the splitter found at the front of the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// A complete text of this many bytes (leading whitespace included).
    Text(usize),
    /// Bytes that can never start a JSON value, to be reported and dropped.
    Garbage(usize),
    /// More bytes are needed.
    Incomplete,
    /// The text at the front is longer than [`MAX_TEXT`].
    TooLong,
}

fn is_delimiter(b: u8) -> bool {
    b.is_ascii_whitespace() || matches!(b, b'{' | b'}' | b'[' | b']' | b'"' | b',' | b':')
}

/// Finds the first complete top-level JSON text in `buf`.
pub fn next_piece(buf: &[u8]) -> Piece {
    let start = buf.iter().position(|b| !b.is_ascii_whitespace());
    let Some(start) = start else {
        // Whitespace alone is no text yet, but it must not grow the buffer without bound.
        return if buf.len() > MAX_TEXT {
            Piece::TooLong
        } else {
            Piece::Incomplete
        };
    };
    let result = match buf.get(start) {
        Some(b'{' | b'[') => scan_nested(buf, start),
        Some(b'"') => scan_string(buf, start + 1).map(|end| Piece::Text(end + 1)),
        Some(b'}' | b']' | b',' | b':') => Some(Piece::Garbage(start + 1)),
        // A bare scalar (number, true, null, or junk) ends at the next delimiter.
        Some(_) => buf
            .iter()
            .skip(start)
            .position(|&b| is_delimiter(b))
            .map(|n| Piece::Text(start + n)),
        None => None,
    };
    match result {
        Some(p) => p,
        None if buf.len() > MAX_TEXT => Piece::TooLong,
        None => Piece::Incomplete,
    }
}

/// Index of the closing quote of a string whose body starts at `from`.
fn scan_string(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while let Some(&b) = buf.get(i) {
        match b {
            b'\\' => i += 2,
            b'"' => return Some(i),
            _ => i += 1,
        }
    }
    None
}

fn scan_nested(buf: &[u8], start: usize) -> Option<Piece> {
    let mut depth = 0usize;
    let mut i = start;
    while let Some(&b) = buf.get(i) {
        match b {
            b'"' => i = scan_string(buf, i + 1)?,
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth -= 1;
                if depth == 0 {
                    return Some(Piece::Text(i + 1));
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_to_back_objects_without_newlines_are_cut_apart() {
        let buf = br#"{"execute":"a"}{"execute":"b","arguments":{"x":"}{"}}"#;
        assert_eq!(next_piece(buf), Piece::Text(15));
        assert_eq!(next_piece(&buf[15..]), Piece::Text(buf.len() - 15));
    }

    #[test]
    fn partial_texts_wait_for_more() {
        assert_eq!(next_piece(br#"  {"execute": "qu"#), Piece::Incomplete);
        assert_eq!(next_piece(br#"{"a":"\""#), Piece::Incomplete);
        assert_eq!(next_piece(b"   "), Piece::Incomplete);
    }

    #[test]
    fn stray_closers_and_scalars_are_separate_pieces() {
        assert_eq!(next_piece(b" }{}"), Piece::Garbage(2));
        assert_eq!(next_piece(b"42 {}"), Piece::Text(2));
        assert_eq!(next_piece(b"nonsense{}"), Piece::Text(8));
    }

    #[test]
    fn escaped_quotes_do_not_end_strings() {
        let buf = br#"{"a":"x\"}"}"#;
        assert_eq!(next_piece(buf), Piece::Text(buf.len()));
    }

    #[test]
    fn endless_whitespace_is_refused() {
        let buf = vec![b' '; MAX_TEXT + 1];
        assert_eq!(next_piece(&buf), Piece::TooLong);
        assert_eq!(next_piece(&buf[..MAX_TEXT]), Piece::Incomplete);
    }

    #[test]
    fn endless_texts_are_refused() {
        let mut buf = vec![b'['; MAX_TEXT + 10];
        buf[0] = b'{';
        assert_eq!(next_piece(&buf), Piece::TooLong);
    }
}
