//! Decoding a command's `arguments` into its struct so that an error names the key it is
//! about from the structure itself: the decoder walks the JSON value and records the keys
//! (and array positions) on the way to whatever serde refused. No error text is parsed.
//!
//! Errors about a key itself (unknown, or missing) are raised by serde at the object that
//! holds it and name the key already; errors about a value carry the path to it.

use std::fmt;
use std::iter::Enumerate;

use serde::de::value::BorrowedStrDeserializer;
use serde::de::{self, DeserializeOwned, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::Deserializer;
use serde_json::Value;

/// One step from the top of the arguments to a value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Key(String),
    Index(usize),
}

/// Why the arguments do not decode, and where.
#[derive(Debug, PartialEq, Eq)]
pub struct DecodeError {
    /// From the top of the arguments to the value refused; empty for the arguments object
    /// itself (a missing or unknown key, which the message names).
    pub path: Vec<Step>,
    pub message: String,
}

impl DecodeError {
    fn within(mut self, step: Step) -> Self {
        self.path.insert(0, step);
        self
    }

    /// The path written as `addr.path` or `actions[0].type`.
    pub fn key(&self) -> Option<String> {
        let mut out = String::new();
        for step in &self.path {
            match step {
                Step::Key(k) if out.is_empty() => out.push_str(k),
                Step::Key(k) => {
                    out.push('.');
                    out.push_str(k);
                }
                Step::Index(i) => out.push_str(&format!("[{i}]")),
            }
        }
        (!out.is_empty()).then_some(out)
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.key() {
            Some(key) => write!(f, "'{key}': {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for DecodeError {}

impl de::Error for DecodeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DecodeError {
            path: Vec::new(),
            message: msg.to_string(),
        }
    }
}

/// Decodes `value` into `T`.
pub fn decode<T: DeserializeOwned>(value: &Value) -> Result<T, DecodeError> {
    T::deserialize(Tracked(value))
}

fn from_json(e: serde_json::Error) -> DecodeError {
    de::Error::custom(e)
}

/// A value being decoded; objects and arrays hand their members out as `Tracked` too.
struct Tracked<'de>(&'de Value);

impl<'de> Deserializer<'de> for Tracked<'de> {
    type Error = DecodeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        match self.0 {
            Value::Object(m) => visitor.visit_map(Fields {
                iter: m.iter(),
                pending: None,
            }),
            Value::Array(a) => visitor.visit_seq(Items {
                iter: a.iter().enumerate(),
            }),
            other => other.deserialize_any(visitor).map_err(from_json),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        // Externally tagged enums: serde_json's own decoding; the path stops at the enum.
        self.0
            .deserialize_enum(name, variants, visitor)
            .map_err(from_json)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct seq tuple tuple_struct map struct identifier
    }
}

struct Fields<'de> {
    iter: serde_json::map::Iter<'de>,
    /// The member whose key was just handed out.
    pending: Option<(&'de String, &'de Value)>,
}

impl<'de> MapAccess<'de> for Fields<'de> {
    type Error = DecodeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DecodeError> {
        let Some((key, value)) = self.iter.next() else {
            return Ok(None);
        };
        self.pending = Some((key, value));
        seed.deserialize(BorrowedStrDeserializer::new(key))
            .map(Some)
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<S::Value, DecodeError> {
        let (key, value) = self
            .pending
            .take()
            .ok_or_else(|| de::Error::custom("a value was asked for before its key"))?;
        seed.deserialize(Tracked(value))
            .map_err(|e| e.within(Step::Key(key.clone())))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

struct Items<'de> {
    iter: Enumerate<std::slice::Iter<'de, Value>>,
}

impl<'de> SeqAccess<'de> for Items<'de> {
    type Error = DecodeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DecodeError> {
        let Some((i, value)) = self.iter.next() else {
            return Ok(None);
        };
        seed.deserialize(Tracked(value))
            .map(Some)
            .map_err(|e| e.within(Step::Index(i)))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use serde_json::json;

    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Probe {
        name: String,
        size: u64,
        addr: Option<Addr>,
        #[serde(default)]
        list: Vec<Addr>,
        #[serde(rename = "queue-size")]
        queue_size: Option<u16>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Addr {
        path: String,
    }

    fn key_of(v: Value) -> Option<String> {
        decode::<Probe>(&v).unwrap_err().key()
    }

    #[test]
    fn a_mistyped_value_is_named_by_its_path() {
        assert_eq!(
            key_of(json!({"name": "a", "size": "big"})),
            Some("size".into())
        );
        assert_eq!(key_of(json!({"name": 5, "size": 1})), Some("name".into()));
        assert_eq!(
            key_of(json!({"name": "a", "size": 1, "addr": {"path": 1}})),
            Some("addr.path".into())
        );
        assert_eq!(
            key_of(json!({"name": "a", "size": 1, "list": [{"path": "x"}, {"path": []}]})),
            Some("list[1].path".into())
        );
        assert_eq!(
            key_of(json!({"name": "a", "size": 1, "queue-size": 70000})),
            Some("queue-size".into())
        );
        assert_eq!(
            key_of(json!({"name": "a", "size": -1})),
            Some("size".into())
        );
    }

    #[test]
    fn missing_and_unknown_keys_are_named_by_serde_at_their_object() {
        let e = decode::<Probe>(&json!({"name": "a"})).unwrap_err();
        assert_eq!(e.key(), None);
        assert!(e.message.contains("`size`"), "{e}");
        let e = decode::<Probe>(&json!({"name": "a", "size": 1, "addr": {}})).unwrap_err();
        assert_eq!(e.key(), Some("addr".into()));
        assert!(e.message.contains("`path`"), "{e}");
        let e = decode::<Probe>(&json!({"name": "a", "size": 1, "colour": 1})).unwrap_err();
        assert_eq!(e.key(), None);
        assert!(e.message.contains("`colour`"), "{e}");
    }

    #[test]
    fn good_arguments_decode_as_serde_json_would() {
        let v = json!({"name": "a", "size": 7, "addr": null, "list": [{"path": "p"}]});
        let a: Probe = decode(&v).unwrap();
        let b: Probe = serde_json::from_value(v).unwrap();
        assert_eq!(a, b);
    }
}
