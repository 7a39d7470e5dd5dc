//! Persistent data in the Linux kernel's dm-thin on-disk format: block manager, transaction
//! manager, space maps and btrees.
