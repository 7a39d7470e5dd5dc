//! The client's side of fixed newstyle negotiation: the greeting, STRUCTURED_REPLY (taken
//! when offered, so read errors come with messages and reads may come in chunks), then GO
//! asking for the block size constraints. A server without GO gets EXPORT_NAME instead.

use super::ClientError;
use crate::nbd::proto::*;
use crate::nbd::socket::Transport;

/// What the server told of the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    /// Transmission flags (`FLAG_*` of proto.rs).
    pub flags: u16,
    pub structured: bool,
    /// Size constraints; defaults of the spec when the server gave none.
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_payload: u32,
}

impl ExportInfo {
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// An option reply's header and data.
struct OptReply {
    kind: u32,
    data: Vec<u8>,
}

fn send_option(t: &mut impl Transport, opt: u32, data: &[u8]) -> Result<(), ClientError> {
    let len = u32::try_from(data.len()).map_err(|_| ClientError::protocol("option too long"))?;
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(data);
    t.write_all(&m)?;
    Ok(())
}

fn read_reply(t: &mut impl Transport, opt: u32) -> Result<OptReply, ClientError> {
    let mut h = [0u8; 20];
    t.read_exact(&mut h)?;
    let mut c = Cursor(&h);
    let magic = c.bytes(8).map(|b| {
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        u64::from_be_bytes(a)
    });
    let (echo, kind, len) = (c.u32(), c.u32(), c.u32());
    if magic != Some(OPTION_REPLY_MAGIC) || echo != Some(opt) {
        return Err(ClientError::protocol("bad option reply header"));
    }
    let (Some(kind), Some(len)) = (kind, len) else {
        return Err(ClientError::protocol("short option reply header"));
    };
    // A server may say little in an option reply; a huge one is a broken server.
    if len > MAX_OPTION_LEN {
        return Err(ClientError::protocol("option reply too long"));
    }
    let mut data = vec![0u8; len as usize];
    t.read_exact(&mut data)?;
    Ok(OptReply { kind, data })
}

/// The error an `REP_ERR_*` reply stands for (its data is a message).
fn refused(opt: &'static str, r: &OptReply) -> ClientError {
    ClientError::Refused {
        option: opt,
        reply: r.kind,
        message: String::from_utf8_lossy(&r.data).into_owned(),
    }
}

/// Negotiates export `name` on a freshly connected transport.
pub fn negotiate(t: &mut impl Transport, name: &str) -> Result<ExportInfo, ClientError> {
    if name.len() > MAX_STRING {
        return Err(ClientError::protocol("export name too long"));
    }
    let mut hello = [0u8; 18];
    t.read_exact(&mut hello)?;
    let mut c = Cursor(&hello);
    let (m1, m2) = (c.bytes(8), c.bytes(8));
    if m1 != Some(&NBD_MAGIC.to_be_bytes()[..]) || m2 != Some(&IHAVEOPT.to_be_bytes()[..]) {
        return Err(ClientError::protocol(
            "not a newstyle NBD server (oldstyle is not supported)",
        ));
    }
    let server = c.u16().unwrap_or(0);
    if server & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ClientError::protocol("server is not fixed newstyle"));
    }
    let no_zeroes = server & FLAG_NO_ZEROES != 0;
    let mut flags = FLAG_C_FIXED_NEWSTYLE;
    if no_zeroes {
        flags |= FLAG_C_NO_ZEROES;
    }
    t.write_all(&flags.to_be_bytes())?;

    send_option(t, OPT_STRUCTURED_REPLY, &[])?;
    let r = read_reply(t, OPT_STRUCTURED_REPLY)?;
    let structured = match r.kind {
        REP_ACK => true,
        k if k & (1 << 31) != 0 => false,
        _ => {
            return Err(ClientError::protocol(
                "unexpected reply to STRUCTURED_REPLY",
            ))
        }
    };

    let mut go = Vec::with_capacity(name.len() + 8);
    go.extend_from_slice(&(name.len() as u32).to_be_bytes());
    go.extend_from_slice(name.as_bytes());
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(t, OPT_GO, &go)?;
    let mut info = ExportInfo {
        size: 0,
        flags: 0,
        structured,
        min_block: 1,
        preferred_block: 4096,
        max_payload: MAX_PAYLOAD,
    };
    let mut have_export = false;
    loop {
        let r = read_reply(t, OPT_GO)?;
        match r.kind {
            REP_INFO => {
                let mut c = Cursor(&r.data);
                match c.u16() {
                    Some(INFO_EXPORT) => {
                        let size = c.bytes(8).map(|b| {
                            let mut a = [0u8; 8];
                            a.copy_from_slice(b);
                            u64::from_be_bytes(a)
                        });
                        let (Some(size), Some(flags)) = (size, c.u16()) else {
                            return Err(ClientError::protocol("short NBD_INFO_EXPORT"));
                        };
                        info.size = size;
                        info.flags = flags;
                        have_export = true;
                    }
                    Some(INFO_BLOCK_SIZE) => {
                        let (Some(min), Some(pref), Some(max)) = (c.u32(), c.u32(), c.u32()) else {
                            return Err(ClientError::protocol("short NBD_INFO_BLOCK_SIZE"));
                        };
                        // The spec's bounds: powers of two, min <= 64 KiB <= ... ; anything
                        // else is a broken server whose limits cannot be trusted.
                        if !min.is_power_of_two()
                            || !pref.is_power_of_two()
                            || min > 65536
                            || pref < min
                            || max < pref.max(min)
                        {
                            return Err(ClientError::protocol("bad NBD_INFO_BLOCK_SIZE"));
                        }
                        info.min_block = min;
                        info.preferred_block = pref;
                        info.max_payload = max.min(MAX_PAYLOAD);
                    }
                    // Names, descriptions and types we did not ask for are ignored.
                    _ => {}
                }
            }
            REP_ACK if have_export => return Ok(info),
            REP_ACK => {
                return Err(ClientError::protocol(
                    "GO acknowledged without NBD_INFO_EXPORT",
                ))
            }
            REP_ERR_UNSUP => return export_name(t, name, no_zeroes, structured),
            k if k & (1 << 31) != 0 => return Err(refused("GO", &r)),
            _ => return Err(ClientError::protocol("unexpected reply to GO")),
        }
    }
}

/// The old way in, for servers without GO: no error is possible, the server hangs up.
fn export_name(
    t: &mut impl Transport,
    name: &str,
    no_zeroes: bool,
    structured: bool,
) -> Result<ExportInfo, ClientError> {
    send_option(t, OPT_EXPORT_NAME, name.as_bytes())?;
    let mut b = [0u8; 10];
    t.read_exact(&mut b).map_err(|_| ClientError::Refused {
        option: "EXPORT_NAME",
        reply: REP_ERR_UNKNOWN,
        message: "the server hung up".into(),
    })?;
    if !no_zeroes {
        let mut zeroes = [0u8; 124];
        t.read_exact(&mut zeroes)?;
    }
    let mut size = [0u8; 8];
    size.copy_from_slice(&b[..8]);
    Ok(ExportInfo {
        size: u64::from_be_bytes(size),
        flags: u16::from_be_bytes([b[8], b[9]]),
        structured,
        min_block: 1,
        preferred_block: 4096,
        max_payload: MAX_PAYLOAD,
    })
}
