use crate::engine::pdata::PdataError;

/// Why a thin-pool metadata operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ThinError {
    #[error(transparent)]
    Pdata(#[from] PdataError),
    #[error("thin device {0} does not exist")]
    NoSuchDevice(u64),
    #[error("thin device {0} already exists")]
    DeviceExists(u64),
    #[error("thin device {0} is already open")]
    DeviceOpen(u64),
    #[error("the pool is out of data space")]
    NoDataSpace,
    #[error("the pool is out of metadata space")]
    NoMetadataSpace,
    #[error("the pool metadata is read-only{}", if *.needs_check { " (needs check)" } else { "" })]
    ReadOnly { needs_check: bool },
    #[error("transaction id is {found}, not the expected {expected}")]
    TransactionIdMismatch { expected: u64, found: u64 },
    #[error("a metadata snapshot is already held")]
    MetadataSnapHeld,
    #[error("no metadata snapshot is held")]
    NoMetadataSnap,
    #[error("cannot shrink the {what} device from {from} to {to} blocks")]
    CannotShrink {
        what: &'static str,
        from: u64,
        to: u64,
    },
    #[error("data block size of {0} sectors is not a multiple of 128 between 128 and 2097152")]
    BadBlockSize(u32),
}

impl ThinError {
    /// Whether the pool must stop changing metadata after this error (it may be half-applied
    /// or the device may be failing), as opposed to a refusal that changed nothing.
    pub fn is_fatal(&self) -> bool {
        matches!(self, ThinError::Pdata(e) if !matches!(e, PdataError::NoSpace(_)))
            || matches!(self, ThinError::NoMetadataSpace)
    }
}

pub type Result<T, E = ThinError> = std::result::Result<T, E>;

/// What a guest's request sees of a metadata error: no space as such, the rest as a thin error.
impl From<ThinError> for crate::engine::BlockError {
    fn from(e: ThinError) -> Self {
        match e {
            ThinError::NoDataSpace => crate::engine::BlockError::NoSpace,
            e => crate::engine::BlockError::Thin(Box::new(e)),
        }
    }
}
