//! NBD URIs (the NBD project's doc/uri.md, as qemu-img and libnbd take them):
//! `nbd://HOST[:PORT]/NAME` (TCP, port 10809 by default) and
//! `nbd+unix:///NAME?socket=PATH`. TLS schemes (`nbds`, `nbds+unix`) are refused: the
//! client has no TLS, like the server.

use std::fmt;
use std::path::PathBuf;

/// The IANA port of NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// Where an export is and its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    pub target: Target,
    pub export: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Unix(PathBuf),
    /// Host (an IPv6 address without its brackets) and port.
    Tcp(String, u16),
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad NBD URI {uri:?}: {why}")]
pub struct UriError {
    pub uri: String,
    pub why: &'static str,
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            Target::Unix(p) => write!(f, "nbd+unix:///{}?socket={}", self.export, p.display()),
            Target::Tcp(h, port) if h.contains(':') => {
                write!(f, "nbd://[{h}]:{port}/{}", self.export)
            }
            Target::Tcp(h, port) => write!(f, "nbd://{h}:{port}/{}", self.export),
        }
    }
}

/// `%XX` escapes decoded; a broken escape or bytes that are not UTF-8 are errors.
fn unescape(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl NbdUri {
    pub fn parse(uri: &str) -> Result<NbdUri, UriError> {
        let err = |why| UriError {
            uri: uri.to_string(),
            why,
        };
        let (scheme, rest) = uri.split_once("://").ok_or(err("no scheme"))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = unescape(path).ok_or(err("bad escape in the export name"))?;
        let mut socket = None;
        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            match pair.split_once('=') {
                Some(("socket", v)) => {
                    socket = Some(unescape(v).ok_or(err("bad escape in the socket path"))?)
                }
                _ => return Err(err("unknown query parameter")),
            }
        }
        let target = match scheme {
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(err("nbd+unix takes no host"));
                }
                let path = socket.filter(|s| !s.is_empty());
                Target::Unix(path.ok_or(err("nbd+unix needs ?socket=PATH"))?.into())
            }
            "nbd" | "nbd+tcp" => {
                if socket.is_some() {
                    return Err(err("socket= is for nbd+unix"));
                }
                let (host, port) = split_host_port(authority).ok_or(err("bad host or port"))?;
                Target::Tcp(host, port)
            }
            "nbds" | "nbds+unix" | "nbds+tcp" => return Err(err("TLS is not supported")),
            _ => return Err(err("not an NBD scheme")),
        };
        Ok(NbdUri { target, export })
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(a: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = a.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        match after {
            "" => (h, None),
            p => (h, Some(p.strip_prefix(':')?)),
        }
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, Some(p)),
            Some(_) => return None,
            None => (a, None),
        }
    };
    if host.is_empty() {
        return None;
    }
    let port = match port {
        Some(p) => p.parse().ok().filter(|&p| p != 0)?,
        None => DEFAULT_PORT,
    };
    Some((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> NbdUri {
        NbdUri::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn unix_and_tcp_uris_parse() {
        assert_eq!(
            ok("nbd+unix:///vm?socket=/run/t%20b/nbd.sock"),
            NbdUri {
                target: Target::Unix("/run/t b/nbd.sock".into()),
                export: "vm".into()
            }
        );
        assert_eq!(
            ok("nbd://localhost:1234/a%2Fb"),
            NbdUri {
                target: Target::Tcp("localhost".into(), 1234),
                export: "a/b".into()
            }
        );
        assert_eq!(
            ok("nbd://10.0.0.1").target,
            Target::Tcp("10.0.0.1".into(), 10809)
        );
        assert_eq!(ok("nbd://10.0.0.1/").export, "");
        assert_eq!(ok("nbd://[::1]:99/x").target, Target::Tcp("::1".into(), 99));
        assert_eq!(ok("nbd://[::1]/x").target, Target::Tcp("::1".into(), 10809));
    }

    #[test]
    fn a_uri_prints_as_it_parses() {
        for s in [
            "nbd+unix:///vm?socket=/a/b",
            "nbd://h:1/x",
            "nbd://[::1]:2/y",
        ] {
            assert_eq!(ok(s).to_string(), s);
        }
    }

    #[test]
    fn bad_uris_are_refused() {
        for s in [
            "vm",
            "http://h/x",
            "nbds://h/x",
            "nbd+unix:///vm",
            "nbd+unix://host/vm?socket=/a",
            "nbd://h:0/x",
            "nbd://h:99999/x",
            "nbd://:1/x",
            "nbd://h/x?socket=/a",
            "nbd://h/%zz",
            "nbd://h/x?tls=1",
            "nbd://::1/x",
        ] {
            assert!(NbdUri::parse(s).is_err(), "{s} parsed");
        }
    }
}
