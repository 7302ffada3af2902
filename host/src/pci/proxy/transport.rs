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

    /// Whether the protocol itself can carry the device's state (vfio-user
    /// migration v2, STOP_COPY offered): how a remote without our control
    /// channel is saved and migrated.
    fn migration(&mut self) -> Result<(), TransportError> {
        Err("this protocol carries no migration".into())
    }

    /// The device's state through the protocol: stopped (its own work let
    /// finish for at most `quiesce`), copied, and running again, so a
    /// migration that fails afterwards goes on with it as it was.
    fn save_state(&mut self, quiesce: std::time::Duration) -> Result<Vec<u8>, TransportError> {
        let _ = quiesce;
        Err("this protocol carries no migration".into())
    }

    /// Gives the device `state` from [`save_state`](Self::save_state); it
    /// runs afterwards.
    fn restore_state(&mut self, state: &[u8]) -> Result<(), TransportError> {
        let _ = state;
        Err("this protocol carries no migration".into())
    }

    /// The device's DMA dirty log through the protocol: `"start"` over
    /// the guest RAM `regions` (gpa, length), `"take"` (the runs written
    /// since the last take, each within a region), `"stop"`.
    fn dma_log(
        &mut self,
        action: &str,
        regions: &[(u64, u64)],
    ) -> Result<Vec<(u64, u64)>, TransportError> {
        let _ = (action, regions);
        Err("this protocol carries no DMA dirty log".into())
    }

    /// Ends the connection (the remote sees EOF); `healthy` says whether
    /// queued posted writes may still be flushed first. Returns how many
    /// posted writes the remote refused over the connection's life.
    fn close(&mut self, healthy: bool) -> u64;
}
