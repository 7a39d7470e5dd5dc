//! A request header becomes a request to run, an error to answer, or the end of the
//! connection. Every limit is checked here, before any buffer is allocated or any device
//! sees the request: magic, command, flags valid for the command, whole sectors, the export's
//! end (overflow-checked), payload size, read-only exports.

use super::proto::*;

/// What a connection allows.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub size: u64,
    pub writable: bool,
    pub structured: bool,
    pub has_contexts: bool,
    pub fast_zero: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disconnect,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
}

/// A request that passed every check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub cookie: u64,
    pub cmd: Command,
    pub offset: u64,
    pub len: u32,
    /// Complete only once durable.
    pub fua: bool,
    /// For write-zeroes: the range may become a hole (no NO_HOLE flag).
    pub may_unmap: bool,
    /// For block status: one descriptor per context.
    pub req_one: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Run(Request),
    /// Answer `error`; a refused write's `skip` payload bytes follow the header and are read
    /// and dropped.
    Refuse {
        cookie: u64,
        error: u32,
        skip: u32,
    },
    /// Hang up: the stream cannot be trusted (bad magic) or the payload is too big to skip.
    Close(&'static str),
}

fn command(kind: u16) -> Option<Command> {
    Some(match kind {
        CMD_READ => Command::Read,
        CMD_WRITE => Command::Write,
        CMD_DISC => Command::Disconnect,
        CMD_FLUSH => Command::Flush,
        CMD_TRIM => Command::Trim,
        CMD_CACHE => Command::Cache,
        CMD_WRITE_ZEROES => Command::WriteZeroes,
        CMD_BLOCK_STATUS => Command::BlockStatus,
        _ => return None,
    })
}

/// The flags `cmd` may carry (FUA on every command: clients send it everywhere).
fn allowed_flags(cmd: Command, l: &Limits) -> u16 {
    CMD_FLAG_FUA
        | match cmd {
            Command::WriteZeroes => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            Command::Read if l.structured => CMD_FLAG_DF,
            Command::BlockStatus => CMD_FLAG_REQ_ONE,
            _ => 0,
        }
}

/// Judges one request header.
pub fn check(h: &RequestHeader, l: &Limits) -> Verdict {
    if h.magic != REQUEST_MAGIC {
        return Verdict::Close("bad request magic");
    }
    let is_write = h.kind == CMD_WRITE;
    if is_write && h.len > MAX_PAYLOAD {
        return Verdict::Close("write payload larger than the maximum");
    }
    let skip = if is_write { h.len } else { 0 };
    let refuse = |error| Verdict::Refuse {
        cookie: h.cookie,
        error,
        skip,
    };
    let Some(cmd) = command(h.kind) else {
        return refuse(EINVAL);
    };
    if h.flags & !allowed_flags(cmd, l) != 0 {
        return refuse(EINVAL);
    }
    let req = Request {
        cookie: h.cookie,
        cmd,
        offset: h.offset,
        len: h.len,
        fua: h.flags & CMD_FLAG_FUA != 0,
        may_unmap: h.flags & CMD_FLAG_NO_HOLE == 0,
        req_one: h.flags & CMD_FLAG_REQ_ONE != 0,
    };
    match cmd {
        // No range: offset and length are reserved.
        Command::Disconnect | Command::Flush => return Verdict::Run(req),
        Command::Read if h.len > MAX_PAYLOAD => return refuse(EINVAL),
        Command::BlockStatus if !l.structured || !l.has_contexts || h.len == 0 => {
            return refuse(EINVAL)
        }
        _ => {}
    }
    let mutates = matches!(cmd, Command::Write | Command::Trim | Command::WriteZeroes);
    if mutates && !l.writable {
        return refuse(EPERM);
    }
    let aligned = h.offset.is_multiple_of(u64::from(MIN_BLOCK)) && h.len.is_multiple_of(MIN_BLOCK);
    if !aligned {
        return refuse(EINVAL);
    }
    match h.offset.checked_add(u64::from(h.len)) {
        Some(end) if end <= l.size => {}
        _ if matches!(cmd, Command::Write | Command::WriteZeroes) => return refuse(ENOSPC),
        _ => return refuse(EINVAL),
    }
    if cmd == Command::WriteZeroes
        && h.flags & CMD_FLAG_FAST_ZERO != 0
        && (!req.may_unmap || !l.fast_zero)
    {
        // Only unmapping is faster than writing; say so at once, changing nothing.
        return refuse(ENOTSUP);
    }
    Verdict::Run(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        size: 1 << 20,
        writable: true,
        structured: true,
        has_contexts: true,
        fast_zero: true,
    };

    fn hdr(kind: u16, flags: u16, offset: u64, len: u32) -> RequestHeader {
        RequestHeader {
            magic: REQUEST_MAGIC,
            flags,
            kind,
            cookie: 7,
            offset,
            len,
        }
    }

    fn error_of(v: Verdict) -> u32 {
        match v {
            Verdict::Refuse { error, .. } => error,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn requests_within_the_export_run() {
        let v = check(&hdr(CMD_WRITE, CMD_FLAG_FUA, 4096, 4096), &L);
        assert!(matches!(v, Verdict::Run(Request { fua: true, .. })));
        let v = check(&hdr(CMD_READ, 0, (1 << 20) - 512, 512), &L);
        assert!(matches!(v, Verdict::Run(_)));
    }

    #[test]
    fn ranges_past_the_end_or_overflowing_are_refused() {
        assert_eq!(error_of(check(&hdr(CMD_READ, 0, 1 << 20, 512), &L)), EINVAL);
        assert_eq!(
            error_of(check(&hdr(CMD_WRITE, 0, 1 << 20, 512), &L)),
            ENOSPC
        );
        let wrap = u64::MAX - 511;
        assert_eq!(error_of(check(&hdr(CMD_TRIM, 0, wrap, 1024), &L)), EINVAL);
        assert_eq!(
            error_of(check(&hdr(CMD_WRITE_ZEROES, 0, wrap, 1024), &L)),
            ENOSPC
        );
    }

    #[test]
    fn a_refused_write_still_has_its_payload_skipped() {
        let v = check(&hdr(CMD_WRITE, 0, 1 << 30, 4096), &L);
        assert_eq!(
            v,
            Verdict::Refuse {
                cookie: 7,
                error: ENOSPC,
                skip: 4096
            }
        );
    }

    #[test]
    fn huge_writes_and_bad_magic_close_the_connection() {
        assert!(matches!(
            check(&hdr(CMD_WRITE, 0, 0, MAX_PAYLOAD + 512), &L),
            Verdict::Close(_)
        ));
        let mut h = hdr(CMD_READ, 0, 0, 512);
        h.magic = 0;
        assert!(matches!(check(&h, &L), Verdict::Close(_)));
        assert_eq!(
            error_of(check(&hdr(CMD_READ, 0, 0, MAX_PAYLOAD + 512), &L)),
            EINVAL
        );
    }

    #[test]
    fn unknown_commands_and_flags_are_einval() {
        assert_eq!(error_of(check(&hdr(99, 0, 0, 0), &L)), EINVAL);
        assert_eq!(
            error_of(check(&hdr(CMD_READ, CMD_FLAG_NO_HOLE, 0, 512), &L)),
            EINVAL
        );
        assert_eq!(error_of(check(&hdr(CMD_READ, 1 << 9, 0, 512), &L)), EINVAL);
        assert_eq!(error_of(check(&hdr(CMD_READ, 0, 1, 512), &L)), EINVAL);
    }

    #[test]
    fn read_only_exports_refuse_every_change() {
        let ro = Limits {
            writable: false,
            ..L
        };
        for kind in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
            assert_eq!(error_of(check(&hdr(kind, 0, 0, 512), &ro)), EPERM);
        }
        assert!(matches!(
            check(&hdr(CMD_FLUSH, 0, 0, 0), &ro),
            Verdict::Run(_)
        ));
    }

    #[test]
    fn fast_zero_is_refused_where_it_would_write() {
        let f = CMD_FLAG_FAST_ZERO;
        assert!(matches!(
            check(&hdr(CMD_WRITE_ZEROES, f, 0, 4096), &L),
            Verdict::Run(_)
        ));
        let v = check(&hdr(CMD_WRITE_ZEROES, f | CMD_FLAG_NO_HOLE, 0, 4096), &L);
        assert_eq!(error_of(v), ENOTSUP);
        let slow = Limits {
            fast_zero: false,
            ..L
        };
        assert_eq!(
            error_of(check(&hdr(CMD_WRITE_ZEROES, f, 0, 4096), &slow)),
            ENOTSUP
        );
    }

    #[test]
    fn block_status_needs_a_context_and_a_length() {
        let none = Limits {
            has_contexts: false,
            ..L
        };
        assert_eq!(
            error_of(check(&hdr(CMD_BLOCK_STATUS, 0, 0, 512), &none)),
            EINVAL
        );
        assert_eq!(error_of(check(&hdr(CMD_BLOCK_STATUS, 0, 0, 0), &L)), EINVAL);
    }
}
