//! The handshake: fixed newstyle negotiation and option haggling, up to the export the
//! client goes on with (or its leaving). Everything the client sends is checked before it is
//! used: option lengths are bounded before they are read, and option data is parsed with a
//! cursor that cannot read past it.

use std::io;
use std::sync::Arc;

use super::export::{Exports, NbdExport};
use super::meta::{self, Context};
use super::proto::*;
use super::socket::Transport;

/// What a connection enters transmission with.
pub struct Session {
    pub export: Arc<NbdExport>,
    pub structured: bool,
    pub contexts: Vec<Context>,
}

/// How option haggling ended without an export.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeEnd {
    #[error("the client aborted")]
    Aborted,
    #[error("the client broke the protocol: {0}")]
    Violation(&'static str),
    #[error("export '{0}' does not exist")]
    NoExport(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Most queries in one meta context option.
const MAX_QUERIES: u32 = 128;

/// Called with the export a client is about to enter transmission with, before the server
/// says yes: the connection registers itself there, so that once a client has its answer,
/// removing the export sees it. `false`: the export is going away; the client is refused.
pub type Admit<'a> = &'a mut dyn FnMut(&Arc<NbdExport>) -> bool;

struct Haggle<'a, T: Transport> {
    io: &'a mut T,
    exports: &'a Exports,
    admit: Admit<'a>,
    structured: bool,
    /// The export the last SET_META_CONTEXT was for, and what it selected.
    selected: Option<(String, Vec<Context>)>,
}

fn put_u16(v: &mut Vec<u8>, x: u16) {
    v.extend_from_slice(&x.to_be_bytes());
}
fn put_u32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_be_bytes());
}
fn put_u64(v: &mut Vec<u8>, x: u64) {
    v.extend_from_slice(&x.to_be_bytes());
}

impl<T: Transport> Haggle<'_, T> {
    fn reply(&mut self, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
        let mut m = Vec::with_capacity(20 + data.len());
        put_u64(&mut m, OPTION_REPLY_MAGIC);
        put_u32(&mut m, opt);
        put_u32(&mut m, kind);
        put_u32(&mut m, data.len() as u32);
        m.extend_from_slice(data);
        self.io.write_all(&m)
    }

    fn error(&mut self, opt: u32, kind: u32, why: &str) -> io::Result<()> {
        self.reply(opt, kind, why.as_bytes())
    }

    fn read_u32(&mut self) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.io.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    /// NBD_OPT_INFO and NBD_OPT_GO: the export's details; `Some` when GO succeeded.
    fn info(&mut self, opt: u32, data: &[u8]) -> io::Result<Option<Session>> {
        let mut c = Cursor(data);
        let parsed = (|| {
            let n = c.u32()?;
            let name = c.string(n)?;
            let count = c.u16()?;
            let mut wanted = Vec::new();
            for _ in 0..count {
                wanted.push(c.u16()?);
            }
            c.is_empty().then_some((name.to_string(), wanted))
        })();
        let Some((name, wanted)) = parsed else {
            self.error(opt, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO")?;
            return Ok(None);
        };
        let Some(export) = self.exports.get(&name) else {
            self.error(opt, REP_ERR_UNKNOWN, "no such export")?;
            return Ok(None);
        };
        if opt == OPT_GO && !(self.admit)(&export) {
            self.error(opt, REP_ERR_UNKNOWN, "the export is being removed")?;
            return Ok(None);
        }
        let mut info = Vec::new();
        put_u16(&mut info, INFO_EXPORT);
        put_u64(&mut info, export.size());
        put_u16(&mut info, export.transmission_flags(self.structured));
        self.reply(opt, REP_INFO, &info)?;
        // Sent whether asked for or not: requests must be whole sectors.
        let mut sizes = Vec::new();
        put_u16(&mut sizes, INFO_BLOCK_SIZE);
        put_u32(&mut sizes, MIN_BLOCK);
        put_u32(&mut sizes, PREFERRED_BLOCK);
        put_u32(&mut sizes, MAX_PAYLOAD);
        self.reply(opt, REP_INFO, &sizes)?;
        if wanted.contains(&INFO_NAME) {
            let mut n = Vec::new();
            put_u16(&mut n, INFO_NAME);
            n.extend_from_slice(export.name.as_bytes());
            self.reply(opt, REP_INFO, &n)?;
        }
        if wanted.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
            let mut d = Vec::new();
            put_u16(&mut d, INFO_DESCRIPTION);
            d.extend_from_slice(export.description.as_bytes());
            self.reply(opt, REP_INFO, &d)?;
        }
        self.reply(opt, REP_ACK, &[])?;
        if opt != OPT_GO {
            return Ok(None);
        }
        Ok(Some(self.session(export)))
    }

    fn session(&mut self, export: Arc<NbdExport>) -> Session {
        let contexts = match self.selected.take() {
            Some((name, contexts)) if name == export.name => contexts,
            _ => Vec::new(),
        };
        Session {
            export,
            structured: self.structured,
            contexts,
        }
    }

    /// NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT.
    fn meta_context(&mut self, opt: u32, data: &[u8]) -> io::Result<()> {
        let set = opt == OPT_SET_META_CONTEXT;
        if set {
            // A SET replaces the selection even when it fails.
            self.selected = None;
        }
        if !self.structured {
            return self.error(opt, REP_ERR_INVALID, "negotiate structured replies first");
        }
        let mut c = Cursor(data);
        let parsed = (|| {
            let n = c.u32()?;
            let name = c.string(n)?.to_string();
            let count = c.u32()?;
            if count > MAX_QUERIES {
                return Some(Err(name));
            }
            let mut queries = Vec::new();
            for _ in 0..count {
                let n = c.u32()?;
                queries.push(c.string(n)?.to_string());
            }
            c.is_empty().then_some(Ok((name, queries)))
        })();
        let (name, queries) = match parsed {
            None => return self.error(opt, REP_ERR_INVALID, "malformed meta context option"),
            Some(Err(_)) => return self.error(opt, REP_ERR_TOO_BIG, "too many queries"),
            Some(Ok(v)) => v,
        };
        let Some(export) = self.exports.get(&name) else {
            return self.error(opt, REP_ERR_UNKNOWN, "no such export");
        };
        let mut found: Vec<(Context, String)> = Vec::new();
        if queries.is_empty() {
            // Listing everything; selecting nothing.
            if !set {
                found = meta::available(&export);
            }
        } else {
            for q in &queries {
                for m in meta::matching(&export, q, !set) {
                    if !found.iter().any(|(c, _)| *c == m.0) {
                        found.push(m);
                    }
                }
            }
        }
        for (ctx, cname) in &found {
            let mut d = Vec::new();
            put_u32(&mut d, if set { meta::context_id(*ctx) } else { 0 });
            d.extend_from_slice(cname.as_bytes());
            self.reply(opt, REP_META_CONTEXT, &d)?;
        }
        if set {
            self.selected = Some((name, found.into_iter().map(|(c, _)| c).collect()));
        }
        self.reply(opt, REP_ACK, &[])
    }

    /// NBD_OPT_EXPORT_NAME: no error reply is possible, so an unknown name ends the session.
    fn export_name(&mut self, data: &[u8], no_zeroes: bool) -> Result<Session, HandshakeEnd> {
        let name = std::str::from_utf8(data)
            .map_err(|_| HandshakeEnd::Violation("export name is not UTF-8"))?;
        let export = self
            .exports
            .get(name)
            .ok_or_else(|| HandshakeEnd::NoExport(name.to_string()))?;
        if !(self.admit)(&export) {
            return Err(HandshakeEnd::NoExport(name.to_string()));
        }
        let mut m = Vec::with_capacity(134);
        put_u64(&mut m, export.size());
        put_u16(&mut m, export.transmission_flags(self.structured));
        if !no_zeroes {
            m.extend_from_slice(&[0u8; 124]);
        }
        self.io.write_all(&m)?;
        Ok(self.session(export))
    }
}

/// Runs the handshake on `io`; returns the session the client goes on with, which `admit`
/// accepted.
pub fn negotiate<T: Transport>(
    io: &mut T,
    exports: &Exports,
    admit: Admit<'_>,
) -> Result<Session, HandshakeEnd> {
    let mut hello = Vec::with_capacity(18);
    put_u64(&mut hello, NBD_MAGIC);
    put_u64(&mut hello, IHAVEOPT);
    put_u16(&mut hello, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    io.write_all(&hello)?;
    let mut h = Haggle {
        io,
        exports,
        admit,
        structured: false,
        selected: None,
    };
    let client_flags = h.read_u32()?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeEnd::Violation("unknown client flags"));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    loop {
        let mut head = [0u8; 16];
        h.io.read_exact(&mut head)?;
        let mut c = Cursor(&head);
        let (magic_hi, magic_lo) = (c.u32(), c.u32());
        let (opt, len) = (c.u32().unwrap_or(0), c.u32().unwrap_or(0));
        let magic = (u64::from(magic_hi.unwrap_or(0)) << 32) | u64::from(magic_lo.unwrap_or(0));
        if magic != IHAVEOPT {
            return Err(HandshakeEnd::Violation("bad option magic"));
        }
        if len > MAX_OPTION_LEN {
            return Err(HandshakeEnd::Violation("option too long"));
        }
        let mut data = vec![0u8; len as usize];
        h.io.read_exact(&mut data)?;
        match opt {
            OPT_EXPORT_NAME => return h.export_name(&data, no_zeroes),
            OPT_ABORT => {
                // The client may already be gone; it need not read the reply.
                let _ = h.reply(opt, REP_ACK, &[]);
                return Err(HandshakeEnd::Aborted);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    h.error(opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                    continue;
                }
                for name in h.exports.names() {
                    let mut d = Vec::new();
                    put_u32(&mut d, name.len() as u32);
                    d.extend_from_slice(name.as_bytes());
                    h.reply(opt, REP_SERVER, &d)?;
                }
                h.reply(opt, REP_ACK, &[])?;
            }
            OPT_STARTTLS => h.error(opt, REP_ERR_UNSUP, "TLS is not supported")?,
            OPT_INFO | OPT_GO => {
                if let Some(session) = h.info(opt, &data)? {
                    return Ok(session);
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() || h.structured {
                    h.error(opt, REP_ERR_INVALID, "structured replies: no data, once")?;
                } else {
                    h.structured = true;
                    h.reply(opt, REP_ACK, &[])?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => h.meta_context(opt, &data)?,
            _ => h.error(opt, REP_ERR_UNSUP, "unknown option")?,
        }
    }
}
