//! The pieces of the hostile-frontend suite: a hand-written vhost-user frontend ([`wire`]),
//! guest memory and one virtqueue driven by hand ([`guest`]), and a daemon watched for
//! crashes, leaks and harm to other exports ([`watch`]).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod guest;
pub mod watch;
pub mod wire;
