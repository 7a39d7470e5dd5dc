//! Declared on-disk structures: a struct's fields are listed once, in disk order, with their
//! little-endian types; offsets and sizes follow from the declaration. No hand offsets.

/// A fixed-size little-endian field.
pub trait LeField: Sized {
    const SIZE: usize;
    /// Decodes from exactly `SIZE` bytes; `None` if `bytes` is too short.
    fn get(bytes: &[u8]) -> Option<Self>;
    /// Encodes into the first `SIZE` bytes of `out`; does nothing if `out` is too short.
    fn put(&self, out: &mut [u8]);
}

macro_rules! le_int {
    ($t:ty) => {
        impl LeField for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn get(bytes: &[u8]) -> Option<Self> {
                let a: [u8; std::mem::size_of::<$t>()] =
                    bytes.get(..Self::SIZE)?.try_into().ok()?;
                Some(<$t>::from_le_bytes(a))
            }
            fn put(&self, out: &mut [u8]) {
                if let Some(o) = out.get_mut(..Self::SIZE) {
                    o.copy_from_slice(&self.to_le_bytes());
                }
            }
        }
    };
}
le_int!(u32);
le_int!(u64);

impl<const N: usize> LeField for [u8; N] {
    const SIZE: usize = N;
    fn get(bytes: &[u8]) -> Option<Self> {
        bytes.get(..N)?.try_into().ok()
    }
    fn put(&self, out: &mut [u8]) {
        if let Some(o) = out.get_mut(..N) {
            o.copy_from_slice(self);
        }
    }
}

/// Declares a struct whose layout on disk is its fields in order, packed, little-endian.
/// Generates `SIZE`, `decode(&[u8]) -> Option<Self>` and `encode(&self, &mut [u8])`.
macro_rules! on_disk {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $( $(#[$fmeta:meta])* $fvis:vis $field:ident : $ty:ty ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        $vis struct $name {
            $( $(#[$fmeta])* $fvis $field: $ty ),*
        }

        impl $name {
            /// Size of the packed structure in bytes.
            pub const SIZE: usize = 0 $( + <$ty as $crate::engine::pdata::codec::LeField>::SIZE )*;

            /// Decodes the structure from the start of `bytes`; `None` if too short.
            #[allow(unused_assignments)]
            pub fn decode(bytes: &[u8]) -> Option<Self> {
                let mut at = 0usize;
                $(
                    let $field = <$ty as $crate::engine::pdata::codec::LeField>::get(bytes.get(at..)?)?;
                    at += <$ty as $crate::engine::pdata::codec::LeField>::SIZE;
                )*
                Some(Self { $( $field ),* })
            }

            /// Encodes the structure at the start of `out` (which must hold `SIZE` bytes).
            #[allow(unused_assignments)]
            pub fn encode(&self, out: &mut [u8]) {
                let mut at = 0usize;
                $(
                    if let Some(o) = out.get_mut(at..) {
                        $crate::engine::pdata::codec::LeField::put(&self.$field, o);
                    }
                    at += <$ty as $crate::engine::pdata::codec::LeField>::SIZE;
                )*
            }
        }
    };
}
pub(crate) use on_disk;

/// Reads a little-endian u64 at `at`, or `None` beyond the end.
pub fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    u64::get(bytes.get(at..)?)
}

/// Reads a little-endian u32 at `at`, or `None` beyond the end.
pub fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    u32::get(bytes.get(at..)?)
}

#[cfg(test)]
mod tests {

    on_disk! {
        #[derive(Debug, PartialEq)]
        struct Sample {
            a: u32,
            b: u64,
            c: [u8; 3],
        }
    }

    #[test]
    fn declared_struct_round_trips_in_field_order() {
        let s = Sample {
            a: 1,
            b: 0x0203,
            c: [7, 8, 9],
        };
        let mut buf = [0u8; 15];
        assert_eq!(Sample::SIZE, 15);
        s.encode(&mut buf);
        assert_eq!(buf, [1, 0, 0, 0, 3, 2, 0, 0, 0, 0, 0, 0, 7, 8, 9]);
        assert_eq!(Sample::decode(&buf), Some(s));
        assert_eq!(Sample::decode(&buf[..14]), None);
    }
}
