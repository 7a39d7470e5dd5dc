//! The largest disk the engine accepts works to its last sector; one sector more is refused
//! with an error that names the limit.
#![allow(clippy::unwrap_used)]

use thinblk::engine::limits::{SizeError, MAX_DEVICE_BYTES};
use thinblk::engine::thin::{Pool, PoolGeometry, PoolOptions, VolumeError, Volumes};
use thinblk::engine::{BlockDevice, Bufs, BufsMut};

fn thin_pool(dir: &std::path::Path) -> std::sync::Arc<Volumes> {
    let geometry = PoolGeometry {
        block_size: 64 << 10,
        metadata_size: 8 << 20,
        data_size: 16 << 20,
    };
    let pool = Pool::open(
        &dir.join("metadata"),
        &dir.join("data"),
        &geometry,
        PoolOptions::default(),
    )
    .unwrap();
    Volumes::open(pool, &dir.join("devices.json")).unwrap()
}

#[test]
fn a_thin_device_of_the_largest_size_reads_back_its_last_sector() {
    let dir = tempfile::tempdir().unwrap();
    let thin = thin_pool(dir.path());
    thin.create("huge", MAX_DEVICE_BYTES).unwrap();
    let dev = thin.device("huge").unwrap();
    assert_eq!(dev.size(), MAX_DEVICE_BYTES);
    let last = MAX_DEVICE_BYTES - 512;
    let data: Vec<u8> = (0..512u32).map(|i| (i % 251) as u8).collect();
    dev.write(last, &Bufs::one(&data)).unwrap();
    dev.flush().unwrap();
    let mut back = vec![0u8; 512];
    dev.read(last, &mut BufsMut::one(&mut back)).unwrap();
    assert_eq!(back, data);
    // Past the end is refused, not wrapped.
    assert!(dev.write(MAX_DEVICE_BYTES, &Bufs::one(&data)).is_err());
}

#[test]
fn one_sector_past_the_largest_size_is_refused_naming_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let thin = thin_pool(dir.path());
    let too_big = MAX_DEVICE_BYTES + 512;
    let err = thin.create("huge", too_big).unwrap_err();
    assert!(
        matches!(err, VolumeError::Size(SizeError::TooLarge(s)) if s == too_big),
        "{err}"
    );
    assert!(
        err.to_string().contains(&MAX_DEVICE_BYTES.to_string()),
        "{err}"
    );
    thin.create("d", 1 << 20).unwrap();
    let err = thin.resize("d", too_big).unwrap_err();
    assert!(matches!(err, VolumeError::Size(_)), "{err}");
    thin.resize("d", MAX_DEVICE_BYTES).unwrap();
    assert_eq!(thin.device("d").unwrap().size(), MAX_DEVICE_BYTES);
}
