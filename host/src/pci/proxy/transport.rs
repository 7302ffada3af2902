//! The one abstraction over the wire a proxy function speaks (crosvm's
//! `ProxyDevice` in spirit): what the guest's accesses need from a remote,
//! whatever the dialect. Each protocol implements it once
//! ([`super::vfio_user`], [`super::mpqemu`]); the proxy function, its
//! shadow, its failure handling and its counters are written once above
//! it, and so is whatever later lands on the hot path.

use std::os::fd::RawFd;

use pci::ConfigSpace;

/// Where a BAR access goes: the BAR's index, its guest address (mpqemu
/// addresses BARs absolutely) and whether it is memory or I/O.
#[derive(Clone, Copy, Debug)]
pub struct BarTarget {
    pub index: usize,
    pub base: u64,
    pub memory: bool,
}

/// A failed exchange with the remote, as text for the logs and QMP.
pub type TransportError = String;

/// A proxy function's connection to its remote function.
pub trait Transport: Send {
    /// A configuration read. A dialect that cannot carry some access
    /// answers it locally (zeros) instead of failing.
    fn config_read(&mut self, offset: usize, data: &mut [u8]) -> Result<(), TransportError>;

    /// A configuration write (the shadow is already updated).
    fn config_write(&mut self, offset: usize, data: &[u8]) -> Result<(), TransportError>;

    /// Called before every BAR access with the shadow: a dialect whose
    /// remote may lose the BAR placement checks it here (mpqemu).
    fn before_bar_access(&mut self, _shadow: &ConfigSpace) -> Result<(), TransportError> {
        Ok(())
    }

    /// A BAR read; waits for the reply.
    fn bar_read(
        &mut self,
        bar: BarTarget,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), TransportError>;

    /// A posted BAR write: it returns once sent; a later read on the same
    /// transport is answered after the remote applied it.
    fn bar_write(&mut self, bar: BarTarget, offset: u64, data: &[u8])
        -> Result<(), TransportError>;

    /// Hands the remote the eventfd of each MSI-X vector (vfio-user
    /// SET_IRQS of the MSI-X index). A dialect without MSI-X refuses.
    fn set_msix_eventfds(
        &mut self,
        _fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<(), TransportError> {
        Err("this protocol carries no MSI-X".into())
    }

    /// Hands the remote the eventfd of each MSI vector (vfio-user
    /// SET_IRQS of the MSI index). A dialect without MSI refuses.
    fn set_msi_eventfds(
        &mut self,
        _fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<(), TransportError> {
        Err("this protocol carries no MSI".into())
    }

    /// A cheap request that proves the remote answers (supervision of
    /// remotes without a control channel).
    fn heartbeat(&mut self) -> Result<(), TransportError>;

    /// A device reset (VM reset): the remote device forgets its state.
    fn reset(&mut self) -> Result<(), TransportError>;

    /// The socket (the supervisor polls a duplicate for hang-up).
    fn socket_fd(&self) -> RawFd;

    /// Ends the connection (the remote sees EOF); `healthy` says whether
    /// queued posted writes may still be flushed first. Returns how many
    /// posted writes the remote refused over the connection's life.
    fn close(&mut self, healthy: bool) -> u64;
}
