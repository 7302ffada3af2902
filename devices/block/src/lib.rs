//! SCSI disk target and its storage backends.
//!
//! [`ScsiDisk`] is one logical unit (LUN 0) of a SCSI target: the controller
//! (the LSI53C895A plugin) hands it CDBs it collected in the COMMAND phase.
//! [`ScsiDisk::plan`] says, without I/O, which data phase the command needs
//! (or completes it at once with CHECK CONDITION); after the transfer the
//! controller calls [`ScsiDisk::execute`] on a worker thread, which does the
//! blocking I/O and returns the status, the data in and the sense.
//!
//! Every CDB is a typed struct in [`cdb`] with its own parser; sense data is
//! in [`sense`]; storage is behind the [`Backend`] trait, with [`RawFile`] for
//! raw image files. See `docs/block.md` for the design.

pub mod backend;
pub mod cdb;
mod config;
pub mod delayed;
mod disk;
pub mod inquiry;
pub mod mode_pages;
pub mod raw_file;
pub mod sense;

pub use backend::Backend;
pub use cdb::{cdb_length, may_block, plain_transfer, Command};
pub use config::DriveConfig;
pub use disk::{
    status, CommandPlan, Completion, DataDirection, ScsiDisk, MAX_TRANSFER_BYTES,
    MAX_UNMAP_DESCRIPTORS, MAX_WRITE_SAME_BYTES,
};
pub use raw_file::RawFile;
pub use sense::{Sense, SenseKey};

use std::io;
use std::path::PathBuf;

/// Errors from opening or reconfiguring a disk (host side, never guest).
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("invalid block size {0}: must be 512, 1024, 2048 or 4096")]
    InvalidBlockSize(u32),
    #[error("disk image {path} ({size} bytes) is smaller than one {block_size}-byte block")]
    TooSmall {
        path: PathBuf,
        size: u64,
        block_size: u32,
    },
    #[error("size {size} is not a positive multiple of the block size {block_size}")]
    InvalidSize { size: u64, block_size: u32 },
    #[error("the drive is read-only")]
    ReadOnly,
    #[error("LUN {0} is not supported: a drive is LUN 0 of its target")]
    UnsupportedLun(u8),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}
