//! Replies in transmission: simple replies, and structured reply chunks (data, block status,
//! errors with a message, none).

use super::proto::*;

pub fn simple(cookie: u64, error: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

fn chunk_header(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// The header of the one OFFSET_DATA chunk that answers a read (its `len` data bytes follow).
pub fn read_data_header(cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(28);
    chunk_header(
        &mut out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        len.saturating_add(8),
    );
    out.extend_from_slice(&offset.to_be_bytes());
    out
}

/// The final chunk of a reply that carries nothing more.
pub fn none(cookie: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(20);
    chunk_header(&mut out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
    out
}

/// A final error chunk with a message for people.
pub fn error_chunk(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(MAX_STRING)];
    let mut out = Vec::with_capacity(26 + msg.len());
    chunk_header(
        &mut out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    );
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

/// One context's block status chunk, appended to `out`.
pub fn block_status(
    out: &mut Vec<u8>,
    cookie: u64,
    context: u32,
    descs: &[(u32, u32)],
    done: bool,
) {
    let len = 4 + 8 * descs.len();
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    chunk_header(out, flags, REPLY_TYPE_BLOCK_STATUS, cookie, len as u32);
    out.extend_from_slice(&context.to_be_bytes());
    for (n, f) in descs {
        out.extend_from_slice(&n.to_be_bytes());
        out.extend_from_slice(&f.to_be_bytes());
    }
}

/// An error answer in the form the connection negotiated.
pub fn error(structured: bool, cookie: u64, error: u32, message: &str) -> Vec<u8> {
    if structured {
        error_chunk(cookie, error, message)
    } else {
        simple(cookie, error).to_vec()
    }
}

/// A success without data (simple replies are allowed for these even when structured).
pub fn ok(cookie: u64) -> Vec<u8> {
    simple(cookie, 0).to_vec()
}
