//! `--export` values in QEMU's key=value style: `raw=PATH,socket=PATH,queues=2`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::daemon::export_settings::ExportSettings;
use crate::engine::limits::{check_device_size, SizeError};
use crate::engine::rbd::RbdSpec;
use crate::socket_access::{parse_group, parse_mode, parse_user, SocketAccess};

/// What backs an export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backing {
    /// A raw file or host block device, byte for byte.
    Raw(PathBuf),
    /// A device of this many bytes that stores nothing: reads return zeros.
    Null(u64),
    /// A thin device of the pool. If it does not exist yet, it is created: as a snapshot of
    /// `snapshot_of`, or empty with `size` bytes.
    Thin {
        name: String,
        size: Option<u64>,
        snapshot_of: Option<String>,
        /// Create the device with this external origin (read-only; unmapped blocks read it).
        origin: Option<PathBuf>,
    },
    /// A dm-snapshot style COW device: `origin` read-only, changed chunks in `store`.
    Cow(CowSpec),
    /// An existing Ceph RBD image, byte for byte, through librbd (`rbd=POOL/IMAGE`).
    Rbd(RbdSpec),
}

/// `cow=ORIGIN,store=PATH[,chunk-size=SIZE][,store-size=SIZE][,transient=on]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CowSpec {
    pub origin: PathBuf,
    pub store: PathBuf,
    pub chunk_size: Option<u64>,
    pub store_size: Option<u64>,
    pub transient: bool,
}

/// One parsed `--export`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportSpec {
    pub backing: Backing,
    /// Required for raw and null exports; a thin export defaults to `<pool dir>/<name>.sock`.
    pub socket: Option<PathBuf>,
    /// Export name: the GET_ID serial and the name used in logs.
    pub id: String,
    pub read_only: bool,
    /// O_DIRECT on the backing file (default on).
    pub direct: bool,
    /// Queues, polling, batching; validated as QMP's are.
    pub settings: ExportSettings,
    /// `socket-mode=`, `socket-owner=`, `socket-group=`; unset ones take the daemon's.
    pub access: SocketAccess,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("'{0}' is not key=value")]
    NotKeyValue(String),
    #[error("key '{0}' given twice")]
    Duplicate(String),
    #[error(
        "unknown key '{0}' (known: name, size, snapshot-of, origin, raw, null, cow, rbd, store, chunk-size, store-size, transient, socket, socket-mode, socket-owner, socket-group, id, queues, queue-size, readonly, direct, poll-us, submit-batch)"
    )]
    UnknownKey(String),
    #[error("missing '{0}='")]
    Missing(&'static str),
    #[error("give one of 'name=NAME', 'raw=PATH', 'null=SIZE', 'cow=ORIGIN' or 'rbd=POOL/IMAGE'")]
    Backing,
    #[error("{key}={value}: {why}")]
    BadValue {
        key: &'static str,
        value: String,
        why: String,
    },
}

/// Splits on commas, QEMU style: a doubled comma is a literal comma inside a value.
fn split_options(s: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                if let Some(p) = parts.last_mut() {
                    p.push(',')
                }
            }
            ',' => parts.push(String::new()),
            _ => {
                if let Some(p) = parts.last_mut() {
                    p.push(c)
                }
            }
        }
    }
    parts
}

fn parse_bool(key: &'static str, value: &str) -> Result<bool, SpecError> {
    match value {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(SpecError::BadValue {
            key,
            value: value.into(),
            why: "expected on or off".into(),
        }),
    }
}

/// The COW keys; `Ok(None)` without `cow=` (and then none of its keys may be given).
fn parse_cow(take: &mut impl FnMut(&str) -> Option<String>) -> Result<Option<CowSpec>, SpecError> {
    let origin = take("cow");
    let store = take("store");
    let chunk_size = take("chunk-size")
        .map(|v| parse_size("chunk-size", &v))
        .transpose()?;
    let store_size = take("store-size")
        .map(|v| parse_size("store-size", &v))
        .transpose()?;
    let transient = take("transient")
        .map(|v| parse_bool("transient", &v))
        .transpose()?;
    let Some(origin) = origin else {
        let stray = [
            ("store", store.is_some()),
            ("chunk-size", chunk_size.is_some()),
            ("store-size", store_size.is_some()),
            ("transient", transient.is_some()),
        ];
        if let Some((key, _)) = stray.iter().find(|(_, given)| *given) {
            return Err(SpecError::BadValue {
                key,
                value: String::new(),
                why: "only cow= exports take it".into(),
            });
        }
        return Ok(None);
    };
    let store = store.ok_or(SpecError::Missing("store"))?;
    if let Some(c) = chunk_size {
        if crate::engine::cow::format::check_chunk_size(c).is_err() {
            return Err(SpecError::BadValue {
                key: "chunk-size",
                value: c.to_string(),
                why: "must be a power of two from 4K to 512K".into(),
            });
        }
    }
    Ok(Some(CowSpec {
        origin: PathBuf::from(origin),
        store: PathBuf::from(store),
        chunk_size,
        store_size,
        transient: transient.unwrap_or(false),
    }))
}

/// A size in bytes with an optional binary suffix (K, M, G, T): `16G`, `512`, `4k`.
pub fn parse_size(key: &'static str, value: &str) -> Result<u64, SpecError> {
    let bad = |why: &str| SpecError::BadValue {
        key,
        value: value.into(),
        why: why.into(),
    };
    let (digits, shift) = match value.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(bad("expected a number with K, M, G or T")),
            };
            (value.get(..i).unwrap_or(""), shift)
        }
        _ => (value, 0),
    };
    let n: u64 = digits.parse().map_err(|_| bad("not a size"))?;
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| bad("too large"))?;
    match check_device_size(bytes) {
        Ok(()) => Ok(bytes),
        Err(SizeError::NotSectors(_)) => Err(bad("must be a positive multiple of 512")),
        Err(e @ SizeError::TooLarge(_)) => Err(bad(&e.to_string())),
    }
}

/// A number; its range is [`ExportSettings::validate`]'s business.
fn parse_number<T: std::str::FromStr>(key: &'static str, value: &str) -> Result<T, SpecError> {
    value.parse().map_err(|_| SpecError::BadValue {
        key,
        value: value.into(),
        why: "not a number".into(),
    })
}

/// `value` parsed with `parse`, or `default` when the key was not given.
fn parsed_or<T>(
    value: Option<String>,
    default: T,
    parse: impl FnOnce(&str) -> Result<T, SpecError>,
) -> Result<T, SpecError> {
    value.map_or(Ok(default), |v| parse(&v))
}

impl std::str::FromStr for ExportSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        let mut kv = BTreeMap::new();
        for part in split_options(s) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| SpecError::NotKeyValue(part.clone()))?;
            if kv.insert(k.to_string(), v.to_string()).is_some() {
                return Err(SpecError::Duplicate(k.into()));
            }
        }
        let mut take = |k: &str| kv.remove(k);
        let size = take("size").map(|v| parse_size("size", &v)).transpose()?;
        let snapshot_of = take("snapshot-of");
        let origin = take("origin").map(PathBuf::from);
        let cow = parse_cow(&mut take)?;
        let rbd = take("rbd");
        let backing = match (take("name"), take("raw"), take("null"), cow, rbd) {
            (Some(name), None, None, None, None) => Backing::Thin {
                name,
                size,
                snapshot_of: snapshot_of.clone(),
                origin: origin.clone(),
            },
            (None, Some(path), None, None, None) => Backing::Raw(PathBuf::from(path)),
            (None, None, Some(size), None, None) => Backing::Null(parse_size("null", &size)?),
            (None, None, None, Some(cow), None) => Backing::Cow(cow),
            (None, None, None, None, Some(image)) => Backing::Rbd(image.parse().map_err(
                |e: crate::engine::rbd::RbdSpecError| SpecError::BadValue {
                    key: "rbd",
                    value: image.clone(),
                    why: e.to_string(),
                },
            )?),
            _ => return Err(SpecError::Backing),
        };
        if let (Some(o), Some(_)) = (&origin, &snapshot_of) {
            return Err(SpecError::BadValue {
                key: "origin",
                value: o.display().to_string(),
                why: "a snapshot takes its origin device's external origin; give origin= or snapshot-of=".into(),
            });
        }
        if let (Some(o), false) = (&origin, matches!(backing, Backing::Thin { .. })) {
            return Err(SpecError::BadValue {
                key: "origin",
                value: o.display().to_string(),
                why: "only thin exports (name=) take an external origin; see cow=".into(),
            });
        }
        if let Backing::Thin {
            size: Some(_),
            snapshot_of: Some(origin),
            ..
        } = &backing
        {
            return Err(SpecError::BadValue {
                key: "size",
                value: origin.clone(),
                why: "a snapshot takes its origin's size; give size= or snapshot-of=".into(),
            });
        }
        if !matches!(backing, Backing::Thin { .. }) {
            if let Some(size) = size {
                return Err(SpecError::BadValue {
                    key: "size",
                    value: size.to_string(),
                    why: "only thin exports (name=) take a size".into(),
                });
            }
            if let Some(origin) = snapshot_of {
                return Err(SpecError::BadValue {
                    key: "snapshot-of",
                    value: origin,
                    why: "only thin exports (name=) can be snapshots".into(),
                });
            }
        }
        let socket = take("socket").map(PathBuf::from);
        if socket.is_none() && !matches!(backing, Backing::Thin { .. }) {
            return Err(SpecError::Missing("socket"));
        }
        let id = take("id").unwrap_or_else(|| match (&backing, &socket) {
            (Backing::Thin { name, .. }, _) => name.clone(),
            (_, Some(socket)) => socket
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "thinblk".into()),
            _ => "thinblk".into(),
        });
        let d = ExportSettings::default();
        let settings = ExportSettings {
            num_queues: parsed_or(take("queues"), d.num_queues, |v| parse_number("queues", v))?,
            queue_size: parsed_or(take("queue-size"), d.queue_size, |v| {
                parse_number("queue-size", v)
            })?,
            poll_us: parsed_or(take("poll-us"), d.poll_us, |v| parse_number("poll-us", v))?,
            submit_batch: parsed_or(take("submit-batch"), d.submit_batch, |v| {
                parse_number("submit-batch", v)
            })?,
        };
        settings.validate().map_err(|e| SpecError::BadValue {
            key: e.setting.cli_key(),
            value: e.value.to_string(),
            why: e.rule,
        })?;
        let access = parse_access(&mut take)?;
        let read_only = parsed_or(take("readonly"), false, |v| parse_bool("readonly", v))?;
        let direct = parsed_or(take("direct"), true, |v| parse_bool("direct", v))?;
        if let Some(k) = kv.into_keys().next() {
            return Err(SpecError::UnknownKey(k));
        }
        Ok(ExportSpec {
            backing,
            socket,
            id,
            read_only,
            direct,
            settings,
            access,
        })
    }
}

/// `socket-mode=`, `socket-owner=` and `socket-group=`.
fn parse_access(take: &mut impl FnMut(&str) -> Option<String>) -> Result<SocketAccess, SpecError> {
    let bad = |key: &'static str, value: &str, e: crate::socket_access::AccessError| {
        SpecError::BadValue {
            key,
            value: value.into(),
            why: e.to_string(),
        }
    };
    let mode = take("socket-mode")
        .map(|v| parse_mode(&v).map_err(|e| bad("socket-mode", &v, e)))
        .transpose()?;
    let owner = take("socket-owner")
        .map(|v| parse_user(&v).map_err(|e| bad("socket-owner", &v, e)))
        .transpose()?;
    let group = take("socket-group")
        .map(|v| parse_group(&v).map_err(|e| bad("socket-group", &v, e)))
        .transpose()?;
    Ok(SocketAccess { mode, owner, group })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn rbd_exports_name_a_pool_and_an_image_and_need_a_socket() {
        let s: ExportSpec = "rbd=thinblk/vm1,socket=/tmp/vm1.sock,readonly=on"
            .parse()
            .unwrap();
        assert_eq!(
            s.backing,
            Backing::Rbd(RbdSpec {
                pool: "thinblk".into(),
                image: "vm1".into()
            })
        );
        assert_eq!(s.id, "vm1");
        assert!(s.read_only);
        assert_eq!(
            "rbd=thinblk/vm1".parse::<ExportSpec>(),
            Err(SpecError::Missing("socket"))
        );
        let bad = "rbd=vm1,socket=/tmp/s".parse::<ExportSpec>().unwrap_err();
        assert!(
            matches!(&bad, SpecError::BadValue { key: "rbd", .. }),
            "{bad:?}"
        );
        assert!(bad.to_string().contains("POOL/IMAGE"), "{bad}");
        assert_eq!(
            "rbd=p/i,raw=/x,socket=/tmp/s".parse::<ExportSpec>(),
            Err(SpecError::Backing)
        );
        assert!(matches!(
            "rbd=p/i,size=1G,socket=/tmp/s".parse::<ExportSpec>(),
            Err(SpecError::BadValue { key: "size", .. })
        ));
    }

    #[test]
    fn minimal_spec_takes_defaults() {
        let s: ExportSpec = "raw=/tmp/d.img,socket=/tmp/d.sock".parse().unwrap();
        assert_eq!(s.backing, Backing::Raw("/tmp/d.img".into()));
        assert_eq!((s.read_only, s.direct), (false, true));
        assert_eq!(s.settings, ExportSettings::default());
        assert_eq!(s.id, "d");
    }

    #[test]
    fn every_key_is_understood() {
        let s: ExportSpec =
            "raw=a,,b,socket=s,id=vm1,queues=4,queue-size=1024,readonly=on,direct=off,poll-us=0,submit-batch=32"
                .parse()
                .unwrap();
        assert_eq!(s.backing, Backing::Raw("a,b".into()));
        assert_eq!((s.read_only, s.direct), (true, false));
        assert_eq!(
            s.settings,
            ExportSettings {
                num_queues: 4,
                queue_size: 1024,
                poll_us: 0,
                submit_batch: 32
            }
        );
        assert_eq!(s.id, "vm1");
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        let e = |s: &str| s.parse::<ExportSpec>().unwrap_err().to_string();
        assert!(e("socket=s").contains("name="));
        assert!(e("raw=a").contains("socket="));
        assert!(e("raw=a,socket=s,size=1G").contains("only thin"));
        assert!(e("raw=a,socket=s,queues=17").contains("1 to 16"));
        assert!(e("raw=a,socket=s,queue-size=100").contains("power of two"));
        assert!(e("raw=a,socket=s,colour=red").contains("unknown key 'colour'"));
        assert!(e("raw=a,socket=s,readonly=maybe").contains("on or off"));
        assert!(e("raw=a,raw=b,socket=s").contains("twice"));
        assert!(e("raw=a,null=1G,socket=s").contains("one of"));
        assert!(e("raw=a,socket=s,poll-us=1001").contains("0 to 1000"));
        assert!(e("raw=a,socket=s,poll-us=-1").contains("not a number"));
        assert!(e("raw=a,socket=s,submit-batch=0").contains("1 to 1024"));
        assert!(e("raw=a,socket=s,submit-batch=1025").contains("1 to 1024"));
    }

    #[test]
    fn socket_access_keys_take_octal_modes_and_names_or_numbers() {
        let s: ExportSpec = "name=vm,socket-mode=0660,socket-group=root,socket-owner=0"
            .parse()
            .unwrap();
        assert_eq!(
            s.access,
            SocketAccess {
                mode: Some(0o660),
                owner: Some(0),
                group: Some(0)
            }
        );
        let s: ExportSpec = "name=vm".parse().unwrap();
        assert_eq!(s.access, SocketAccess::default());
        let e = |s: &str| s.parse::<ExportSpec>().unwrap_err().to_string();
        assert!(e("name=vm,socket-mode=999").contains("octal"));
        assert!(e("name=vm,socket-group=no-such-group-here").contains("no group"));
        assert!(e("name=vm,socket-owner=no-such-user-here").contains("no user"));
    }

    #[test]
    fn thin_exports_name_a_device_and_may_create_it() {
        let s: ExportSpec = "name=vm1,size=16G".parse().unwrap();
        assert_eq!(
            s.backing,
            Backing::Thin {
                name: "vm1".into(),
                size: Some(16 << 30),
                snapshot_of: None,
                origin: None,
            }
        );
        assert_eq!((s.socket, s.id.as_str()), (None, "vm1"));
        let s: ExportSpec = "name=vm1,socket=/run/v.sock,readonly=on".parse().unwrap();
        assert_eq!(s.socket, Some(PathBuf::from("/run/v.sock")));
        assert!(s.read_only);
        let s: ExportSpec = "name=s1,snapshot-of=vm1".parse().unwrap();
        assert!(matches!(s.backing, Backing::Thin { snapshot_of: Some(o), .. } if o == "vm1"));
        assert!("name=s1,snapshot-of=vm1,size=1G"
            .parse::<ExportSpec>()
            .is_err());
        assert!("raw=x,socket=s,snapshot-of=vm1"
            .parse::<ExportSpec>()
            .is_err());
    }

    #[test]
    fn cow_exports_name_an_origin_and_a_store() {
        let s: ExportSpec = "cow=/img/g.raw,store=/var/s.cow,chunk-size=16K,transient=on,socket=/s"
            .parse()
            .unwrap();
        assert_eq!(
            s.backing,
            Backing::Cow(CowSpec {
                origin: "/img/g.raw".into(),
                store: "/var/s.cow".into(),
                chunk_size: Some(16 << 10),
                store_size: None,
                transient: true,
            })
        );
        assert_eq!(s.id, "s");
        let e = |s: &str| s.parse::<ExportSpec>().unwrap_err().to_string();
        assert!(e("cow=/g,socket=/s").contains("store="));
        assert!(e("cow=/g,store=/c").contains("socket="));
        assert!(e("cow=/g,store=/c,socket=/s,chunk-size=3K").contains("power of two"));
        assert!(e("cow=/g,store=/c,socket=/s,chunk-size=1M").contains("power of two"));
        assert!(e("raw=/g,store=/c,socket=/s").contains("only cow="));
        assert!(e("cow=/g,name=x,store=/c,socket=/s").contains("one of"));
    }

    #[test]
    fn thin_exports_may_have_an_external_origin() {
        let s: ExportSpec = "name=vm,origin=/img/g.raw".parse().unwrap();
        assert!(
            matches!(s.backing, Backing::Thin { origin: Some(o), size: None, .. } if o == Path::new("/img/g.raw"))
        );
        assert!("name=vm,origin=/g,snapshot-of=a"
            .parse::<ExportSpec>()
            .is_err());
        assert!("raw=/x,origin=/g,socket=/s".parse::<ExportSpec>().is_err());
    }

    #[test]
    fn null_takes_a_size_with_a_binary_suffix() {
        let s: ExportSpec = "null=16G,socket=/tmp/n.sock".parse().unwrap();
        assert_eq!(s.backing, Backing::Null(16 << 30));
        let size = |v: &str| parse_size("null", v);
        assert_eq!(size("4096"), Ok(4096));
        assert_eq!(size("4k"), Ok(4096));
        assert_eq!(size("3M"), Ok(3 << 20));
        assert_eq!(size("2T"), Ok(2 << 40));
    }

    #[test]
    fn bad_null_sizes_are_refused() {
        let e = |v: &str| parse_size("null", v).unwrap_err().to_string();
        assert!(e("0").contains("positive multiple of 512"));
        assert!(e("1000").contains("positive multiple of 512"));
        assert!(e("16X").contains("K, M, G or T"));
        assert!(e("G").contains("not a size"));
        assert!(e("-1G").contains("not a size"));
        assert!(e("99999999999T").contains("too large"));
    }

    #[test]
    fn sizes_stop_at_the_largest_disk() {
        use crate::engine::limits::MAX_DEVICE_BYTES;
        let max = MAX_DEVICE_BYTES.to_string();
        assert_eq!(parse_size("size", &max), Ok(MAX_DEVICE_BYTES));
        let past = (MAX_DEVICE_BYTES + 512).to_string();
        let e = parse_size("size", &past).unwrap_err().to_string();
        assert!(e.contains("largest disk size") && e.contains(&max), "{e}");
        let e = format!("name=d,size={past}")
            .parse::<ExportSpec>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("size=") && e.contains(&max), "{e}");
        assert!(format!("null={past},socket=/s")
            .parse::<ExportSpec>()
            .is_err());
        assert!(format!("null={max},socket=/s")
            .parse::<ExportSpec>()
            .is_ok());
    }
}
