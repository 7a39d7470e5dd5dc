//! Block devices: what a virtual disk is, independent of how it is served.

pub mod pdata;
