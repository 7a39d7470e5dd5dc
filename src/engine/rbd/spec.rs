//! `POOL/IMAGE`: which RBD image a device or store lives on.

use std::fmt;
use std::str::FromStr;

/// An RBD image by pool and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RbdSpec {
    pub pool: String,
    pub image: String,
}

/// Why a `POOL/IMAGE` did not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RbdSpecError {
    #[error("'{0}' is not POOL/IMAGE")]
    NoSlash(String),
    #[error("'{0}': the pool name is empty")]
    EmptyPool(String),
    #[error("'{0}': the image name is empty")]
    EmptyImage(String),
    #[error("'{0}': an image name has no '/' (namespaces are not supported)")]
    Namespace(String),
    #[error("'{0}': '@' names a snapshot, which is read-only; export the image itself")]
    Snapshot(String),
    #[error("'{0}': names may not contain NUL or control characters")]
    BadCharacter(String),
}

impl FromStr for RbdSpec {
    type Err = RbdSpecError;

    fn from_str(s: &str) -> Result<Self, RbdSpecError> {
        let err = |f: fn(String) -> RbdSpecError| Err(f(s.to_string()));
        if s.chars().any(char::is_control) {
            return err(RbdSpecError::BadCharacter);
        }
        let Some((pool, image)) = s.split_once('/') else {
            return err(RbdSpecError::NoSlash);
        };
        if pool.is_empty() {
            return err(RbdSpecError::EmptyPool);
        }
        if image.is_empty() {
            return err(RbdSpecError::EmptyImage);
        }
        if image.contains('/') {
            return err(RbdSpecError::Namespace);
        }
        if image.contains('@') || pool.contains('@') {
            return err(RbdSpecError::Snapshot);
        }
        Ok(RbdSpec {
            pool: pool.into(),
            image: image.into(),
        })
    }
}

impl fmt::Display for RbdSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.pool, self.image)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_slash_image_parses_and_prints_back() {
        let s: RbdSpec = "thinblk/disk-0".parse().unwrap();
        assert_eq!(s.pool, "thinblk");
        assert_eq!(s.image, "disk-0");
        assert_eq!(s.to_string(), "thinblk/disk-0");
    }

    #[test]
    fn malformed_specs_say_what_is_wrong() {
        let e = |s: &str| s.parse::<RbdSpec>().unwrap_err();
        assert_eq!(e("disk"), RbdSpecError::NoSlash("disk".into()));
        assert_eq!(e("/disk"), RbdSpecError::EmptyPool("/disk".into()));
        assert_eq!(e("pool/"), RbdSpecError::EmptyImage("pool/".into()));
        assert_eq!(e("p/ns/i"), RbdSpecError::Namespace("p/ns/i".into()));
        assert_eq!(e("p/i@snap"), RbdSpecError::Snapshot("p/i@snap".into()));
        assert_eq!(e("p/i\0x"), RbdSpecError::BadCharacter("p/i\0x".into()));
        assert!(e("p/ns/i").to_string().contains("p/ns/i"));
    }
}
