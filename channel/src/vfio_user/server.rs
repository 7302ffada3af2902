//! The server side of vfio-user: one connection served by one thread over
//! a [`VfioUserDevice`] that the embedding process (remote-host)
//! implements.
//!
//! What the loop checks so the device does not have to: VERSION comes
//! first; accesses stay inside a region the device declared and within
//! `max_data_xfer_size`; SET_IRQS has one data type and one action, an
//! index and range the device declared, and as many eventfds as `count`
//! (or none, to release them); fds ride only on DMA_MAP and SET_IRQS.
//!
//! Error policy:
//! - A framing error (EOF or timeout mid-message, a size below the header
//!   or above the limit, too many fds), a reply-typed or unparseable
//!   message, or a command before VERSION closes the channel.
//! - A well-formed request the device refuses (outside a region, unknown
//!   index, overlapping DMA map, unsupported command) gets an error reply
//!   with an errno, and the channel goes on.
//! - Posted commands (`No_reply`) never get a reply, not even an error one:
//!   their errors are logged.
//!
//! On return, for whatever reason, the device is told that its client went
//! away ([`VfioUserDevice::client_disconnected`]), so it drops the DMA
//! mappings and IRQ fds of that client and keeps its state.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::Duration;

use super::messages::{
    Capabilities, DeviceInfo, DmaMap, DmaUnmap, Header, IrqInfo, ParseError, RegionAccess,
    RegionInfo, Request, SetIrqs, Version,
};
use super::migration::{DmaLoggingReport, DmaLoggingStart, MigState};
use super::{
    DEFAULT_MAX_DATA_XFER, DMA_UNMAP_FLAG_ALL, DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, HEADER_SIZE,
    IRQ_SET_ACTION_TRIGGER, IRQ_SET_ACTION_TYPE_MASK, IRQ_SET_DATA_EVENTFD, IRQ_SET_DATA_NONE,
    IRQ_SET_DATA_TYPE_MASK, REGION_INFO_FLAG_READ, REGION_INFO_FLAG_WRITE, VERSION_MAJOR,
    VERSION_MINOR,
};
use crate::framing::{Framed, FramingError, RecvLimits, DEFAULT_POLL, DEFAULT_TIMEOUT};

mod migration;

/// A refusal from the device: an errno for the reply and a message for
/// the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (errno {errno})")]
pub struct DeviceError {
    pub errno: i32,
    pub message: String,
}

impl DeviceError {
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        DeviceError {
            errno,
            message: message.into(),
        }
    }

    /// `EINVAL`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(libc::EINVAL, message)
    }

    /// `ENOTSUP`.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(libc::ENOTSUP, message)
    }
}

/// What a device process implements to be served over vfio-user.
///
/// Calls come one at a time from the connection's thread, under the
/// mutex given to [`serve_connection`]. Arguments have been checked
/// against what the device declared (see the module docs).
pub trait VfioUserDevice: Send {
    /// `flags` (RESET, PCI), `num_regions`, `num_irqs`; `argsz` is filled
    /// in by the server.
    fn device_info(&self) -> DeviceInfo;
    /// Region `index`, or `None` when it does not exist. A region of size
    /// zero is an absent BAR.
    fn region_info(&self, index: u32) -> Option<RegionInfo>;
    /// IRQ `index`, or `None` when it does not exist.
    fn irq_info(&self, index: u32) -> Option<IrqInfo>;
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8])
        -> Result<(), DeviceError>;
    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError>;
    /// Maps `map.size` bytes of `fd` at `map.offset` for DMA at
    /// `map.addr`. `fd` is `None` when the client wants DMA through
    /// messages (refuse with `ENOTSUP` if unsupported).
    fn dma_map(&mut self, map: &DmaMap, fd: Option<OwnedFd>) -> Result<(), DeviceError>;
    /// Drops a mapping made by [`dma_map`](Self::dma_map) with exactly
    /// this address and size, or all of them with `DMA_UNMAP_FLAG_ALL`.
    /// References must be gone when this returns.
    fn dma_unmap(&mut self, unmap: &DmaUnmap) -> Result<(), DeviceError>;
    /// SET_IRQS. `data` is the DATA_BOOL array; `fds` holds `count`
    /// eventfds for DATA_EVENTFD, or none to release that range.
    fn set_irqs(
        &mut self,
        set: &SetIrqs,
        data: &[u8],
        fds: Vec<OwnedFd>,
    ) -> Result<(), DeviceError>;
    /// DEVICE_RESET; a device that migrates is RUNNING afterwards.
    fn reset(&mut self) -> Result<(), DeviceError>;
    /// The client went away: drop its DMA mappings and IRQ fds, keep the
    /// device state.
    fn client_disconnected(&mut self);

    // Migration v2 ([`super::migration`], docs/vfio-user-migration.md).
    // The defaults offer none of it: every such request is refused with
    // ENOTSUP. The loop checks sizes and states before calling these.

    /// The `FEATURE_MIGRATION` flags the device offers (0: no migration).
    fn migration_flags(&self) -> u64 {
        0
    }
    /// The device's migration state (kept across connections).
    fn mig_state(&self) -> MigState {
        MigState::Running
    }
    /// One direct arc from [`mig_state`](Self::mig_state) to `to` (the
    /// loop walks longer paths). On an error the device says where it is
    /// through `mig_state`. Outside RUNNING (and PRE_COPY) the loop
    /// refuses every BAR access; the configuration space is still served.
    fn mig_arc(&mut self, to: MigState) -> Result<(), DeviceError> {
        Err(DeviceError::unsupported(format!(
            "migration (to {to:?}) is not supported"
        )))
    }
    /// The next bytes of the migration data into `buf` (in a saving
    /// state); fewer than asked at its end.
    fn mig_read(&mut self, buf: &mut [u8]) -> Result<usize, DeviceError> {
        let _ = buf;
        Err(DeviceError::unsupported("migration is not supported"))
    }
    /// More migration data (in RESUMING); checked when RESUMING is left.
    fn mig_write(&mut self, data: &[u8]) -> Result<(), DeviceError> {
        let _ = data;
        Err(DeviceError::unsupported("migration is not supported"))
    }
    /// Whether the device logs the pages its DMA writes.
    fn dma_logging(&self) -> bool {
        false
    }
    /// Starts the DMA dirty log; returns the page size it logs in.
    fn dma_logging_start(&mut self, start: &DmaLoggingStart) -> Result<u64, DeviceError> {
        let _ = start;
        Err(DeviceError::unsupported("DMA logging is not supported"))
    }
    fn dma_logging_stop(&mut self) -> Result<(), DeviceError> {
        Err(DeviceError::unsupported("DMA logging is not supported"))
    }
    /// The pages of `report`'s range written since the last report of
    /// them, into the zeroed `bitmap` (see [`DmaLoggingReport`]); reports
    /// clear what they return.
    fn dma_logging_report(
        &mut self,
        report: &DmaLoggingReport,
        bitmap: &mut [u8],
    ) -> Result<(), DeviceError> {
        let _ = (report, bitmap);
        Err(DeviceError::unsupported("DMA logging is not supported"))
    }
}

/// Knobs of one served connection.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Name for log messages (the device id).
    pub name: String,
    /// Busy-poll before sleeping on the socket (the upper bound when
    /// `adaptive_poll`).
    pub poll: Duration,
    /// Adapt the busy-poll window to how fast messages come
    /// ([`Framed::poll_window`]).
    pub adaptive_poll: bool,
    /// Limit on the rest of a message once its first byte arrived, and
    /// on sending a reply.
    pub timeout: Duration,
    /// Limit on waiting for the next command once VERSION is done;
    /// `None` waits forever (an idle guest may leave a device alone for
    /// hours). VERSION itself must arrive within `timeout`.
    pub idle_timeout: Option<Duration>,
    /// Largest REGION_READ/WRITE data we accept (advertised).
    pub max_data_xfer_size: u32,
    /// Most fds in one message (advertised).
    pub max_msg_fds: u32,
    /// Most DMA mappings (advertised; the device enforces it).
    pub max_dma_maps: u32,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            name: "vfio-user".into(),
            poll: DEFAULT_POLL,
            adaptive_poll: true,
            timeout: DEFAULT_TIMEOUT,
            idle_timeout: None,
            max_data_xfer_size: DEFAULT_MAX_DATA_XFER,
            max_msg_fds: 8,
            max_dma_maps: 1024,
        }
    }
}

impl ServerOptions {
    /// Largest message we accept: a REGION_WRITE of the largest data, or
    /// a VERSION with a generous JSON string.
    fn max_message(&self) -> usize {
        HEADER_SIZE + RegionAccess::LEN + (self.max_data_xfer_size as usize).max(64 * 1024)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_msg_fds: Some(self.max_msg_fds),
            max_data_xfer_size: Some(self.max_data_xfer_size),
            max_dma_maps: Some(self.max_dma_maps),
            pgsizes: Some(4096),
            ..Default::default()
        }
    }
}

/// Why a connection ended other than by a clean close.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Framing(#[from] FramingError),
    #[error("malformed {command}: {error}")]
    Parse { command: u16, error: ParseError },
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// Serves one client until it disconnects (`Ok`) or breaks the protocol
/// (`Err`; the socket is closed either way).
pub fn serve_connection<D: VfioUserDevice + ?Sized>(
    sock: UnixStream,
    device: &Mutex<D>,
    opts: &ServerOptions,
) -> Result<(), ServerError> {
    let mut conn = Connection {
        framed: Framed::new(sock),
        opts,
        negotiated: false,
        tx: Vec::with_capacity(4096),
    };
    conn.framed.set_poll(opts.poll);
    conn.framed.set_adaptive(opts.adaptive_poll);
    conn.framed.set_max_fds(opts.max_msg_fds as usize);
    let r = conn.run(device);
    lock(device).client_disconnected();
    match &r {
        Ok(()) => tracing::info!(device = %opts.name, "vfio-user client disconnected"),
        Err(e) => tracing::warn!(device = %opts.name, "vfio-user channel closed: {e}"),
    }
    r
}

fn lock<D: ?Sized>(m: &Mutex<D>) -> std::sync::MutexGuard<'_, D> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Connection<'a> {
    framed: Framed,
    opts: &'a ServerOptions,
    negotiated: bool,
    tx: Vec<u8>,
}

/// The answer to one request.
enum Outcome {
    /// Success; the reply payload is in `tx` after the header room.
    Reply,
    /// A refusal to report with an errno.
    Refused(DeviceError),
}

impl Connection<'_> {
    fn run<D: VfioUserDevice + ?Sized>(&mut self, device: &Mutex<D>) -> Result<(), ServerError> {
        let mut rx = Vec::with_capacity(4096);
        let mut fds = Vec::new();
        loop {
            fds.clear();
            match self.framed.recv_message(
                &mut rx,
                &mut fds,
                HEADER_SIZE,
                Header::size_of,
                &RecvLimits {
                    max_size: self.opts.max_message(),
                    // VERSION must come promptly; later commands may not.
                    first: if self.negotiated {
                        self.opts.idle_timeout
                    } else {
                        Some(self.opts.timeout)
                    },
                    rest: self.opts.timeout,
                },
            ) {
                Ok(()) => {}
                Err(FramingError::Closed) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
            let header =
                Header::parse(&rx).map_err(|error| ServerError::Parse { command: 0, error })?;
            let payload = rx.get(HEADER_SIZE..).unwrap_or(&[]);
            let request = Request::parse(&header, payload).map_err(|error| ServerError::Parse {
                command: header.cmd,
                error,
            })?;
            if !self.negotiated && !matches!(request, Request::Version(_)) {
                return Err(ServerError::Protocol(format!(
                    "command {} before VERSION",
                    header.cmd
                )));
            }
            if header.no_reply()
                && matches!(
                    request,
                    Request::DeviceFeature(..) | Request::MigDataRead(_)
                )
            {
                // Its answer is the point: a posted one would be lost (a
                // READ would advance the stream for nothing).
                tracing::warn!(device = %self.opts.name, cmd = header.cmd, "posted command ignored: it needs a reply");
                continue;
            }
            // Room for the reply header, filled in once the size is known.
            self.tx.clear();
            self.tx.resize(HEADER_SIZE, 0);
            let outcome = self.handle(device, request, std::mem::take(&mut fds));
            if header.no_reply() {
                if let Outcome::Refused(e) = outcome {
                    tracing::warn!(device = %self.opts.name, cmd = header.cmd, "posted command failed: {e}");
                }
                continue;
            }
            match outcome {
                Outcome::Reply => {
                    let h = header.reply(self.tx.len() - HEADER_SIZE);
                    let mut head = Vec::with_capacity(HEADER_SIZE);
                    h.encode(&mut head);
                    self.tx[..HEADER_SIZE].copy_from_slice(&head);
                }
                Outcome::Refused(e) => {
                    tracing::debug!(device = %self.opts.name, cmd = header.cmd, "refused: {e}");
                    self.tx.clear();
                    header.error_reply(e.errno).encode(&mut self.tx);
                }
            }
            self.framed.send(&self.tx, &[], self.opts.timeout)?;
        }
    }

    fn handle<D: VfioUserDevice + ?Sized>(
        &mut self,
        device: &Mutex<D>,
        request: Request<'_>,
        fds: Vec<OwnedFd>,
    ) -> Outcome {
        let takes_fds = matches!(request, Request::DmaMap(_) | Request::SetIrqs(..));
        if !fds.is_empty() && !takes_fds {
            return Outcome::Refused(DeviceError::invalid(format!(
                "{} unexpected file descriptors",
                fds.len()
            )));
        }
        let r = match request {
            Request::Version(v) => self.version(&v),
            Request::DmaMap(m) => self.dma_map(device, &m, fds),
            Request::DmaUnmap(u) => dma_unmap(device, &u, &mut self.tx),
            Request::DeviceGetInfo(_) => {
                let mut info = lock(device).device_info();
                info.argsz = DeviceInfo::LEN as u32;
                info.encode(&mut self.tx);
                Ok(())
            }
            Request::GetRegionInfo(req) => match lock(device).region_info(req.index) {
                Some(mut info) => {
                    info.argsz = RegionInfo::LEN as u32;
                    info.index = req.index;
                    info.cap_offset = 0;
                    info.encode(&mut self.tx);
                    Ok(())
                }
                None => Err(DeviceError::invalid(format!("no region {}", req.index))),
            },
            Request::GetIrqInfo(req) => match lock(device).irq_info(req.index) {
                Some(mut info) => {
                    info.argsz = IrqInfo::LEN as u32;
                    info.index = req.index;
                    info.encode(&mut self.tx);
                    Ok(())
                }
                None => Err(DeviceError::invalid(format!("no IRQ index {}", req.index))),
            },
            Request::SetIrqs(set, data) => set_irqs(device, &set, data, fds),
            Request::RegionRead(a) => self.region_read(device, &a),
            Request::RegionWrite(a, data) => self.region_write(device, &a, data),
            Request::DeviceReset => lock(device).reset(),
            Request::DeviceFeature(f, data) => {
                migration::device_feature(device, &f, data, &self.limits(), &mut self.tx)
            }
            Request::MigDataRead(m) => {
                migration::mig_read(device, &m, &self.limits(), &mut self.tx)
            }
            Request::MigDataWrite(m, data) => {
                migration::mig_write(device, &m, data, &self.limits())
            }
            Request::Unsupported(cmd) => Err(DeviceError::unsupported(format!(
                "command {cmd} is not supported"
            ))),
        };
        match r {
            Ok(()) => Outcome::Reply,
            Err(e) => Outcome::Refused(e),
        }
    }

    fn version(&mut self, v: &Version) -> Result<(), DeviceError> {
        if self.negotiated {
            return Err(DeviceError::invalid("VERSION already negotiated"));
        }
        if v.major != VERSION_MAJOR {
            return Err(DeviceError::unsupported(format!(
                "protocol version {}.{} (we speak {VERSION_MAJOR}.{VERSION_MINOR})",
                v.major, v.minor
            )));
        }
        let reply = Version {
            major: VERSION_MAJOR,
            minor: v.minor.min(VERSION_MINOR),
            capabilities: self.opts.capabilities(),
        };
        reply.encode(&mut self.tx);
        self.negotiated = true;
        tracing::info!(
            device = %self.opts.name,
            "vfio-user client negotiated {}.{} ({:?})",
            reply.major,
            reply.minor,
            v.capabilities
        );
        Ok(())
    }

    fn dma_map<D: VfioUserDevice + ?Sized>(
        &mut self,
        device: &Mutex<D>,
        m: &DmaMap,
        mut fds: Vec<OwnedFd>,
    ) -> Result<(), DeviceError> {
        if fds.len() > 1 {
            return Err(DeviceError::invalid("DMA_MAP with more than one fd"));
        }
        if m.size == 0 || m.addr.checked_add(m.size).is_none() {
            return Err(DeviceError::invalid(format!(
                "DMA_MAP of {:#x} bytes at {:#x}",
                m.size, m.addr
            )));
        }
        if !fds.is_empty() && m.offset.checked_add(m.size).is_none() {
            return Err(DeviceError::invalid("DMA_MAP offset overflows"));
        }
        lock(device).dma_map(m, fds.pop())
    }

    fn limits(&self) -> migration::Limits {
        migration::Limits {
            max_data_xfer_size: self.opts.max_data_xfer_size,
            max_dma_maps: self.opts.max_dma_maps,
        }
    }

    fn check_access<D: VfioUserDevice + ?Sized>(
        &self,
        device: &Mutex<D>,
        a: &RegionAccess,
        flag: u32,
    ) -> Result<(), DeviceError> {
        if a.count > self.opts.max_data_xfer_size {
            return Err(DeviceError::new(
                libc::E2BIG,
                format!("access of {} bytes", a.count),
            ));
        }
        let dev = lock(device);
        if a.region != super::PCI_CONFIG_REGION_INDEX {
            let state = dev.mig_state();
            if !matches!(state, MigState::Running | MigState::PreCopy) {
                return Err(DeviceError::new(
                    libc::EBUSY,
                    format!("region {} in device state {state:?}", a.region),
                ));
            }
        }
        let info = dev
            .region_info(a.region)
            .ok_or_else(|| DeviceError::invalid(format!("no region {}", a.region)))?;
        drop(dev);
        let end = a.offset.checked_add(u64::from(a.count));
        if info.flags & flag == 0 || end.is_none_or(|e| e > info.size) {
            return Err(DeviceError::invalid(format!(
                "access of {} bytes at {:#x} outside region {} ({:#x} bytes, flags {:#x})",
                a.count, a.offset, a.region, info.size, info.flags
            )));
        }
        Ok(())
    }

    fn region_read<D: VfioUserDevice + ?Sized>(
        &mut self,
        device: &Mutex<D>,
        a: &RegionAccess,
    ) -> Result<(), DeviceError> {
        self.check_access(device, a, REGION_INFO_FLAG_READ)?;
        a.encode(&mut self.tx);
        let start = self.tx.len();
        self.tx.resize(start + a.count as usize, 0);
        lock(device).region_read(a.region, a.offset, &mut self.tx[start..])
    }

    fn region_write<D: VfioUserDevice + ?Sized>(
        &mut self,
        device: &Mutex<D>,
        a: &RegionAccess,
        data: &[u8],
    ) -> Result<(), DeviceError> {
        self.check_access(device, a, REGION_INFO_FLAG_WRITE)?;
        lock(device).region_write(a.region, a.offset, data)?;
        a.encode(&mut self.tx);
        Ok(())
    }
}

fn dma_unmap<D: VfioUserDevice + ?Sized>(
    device: &Mutex<D>,
    u: &DmaUnmap,
    tx: &mut Vec<u8>,
) -> Result<(), DeviceError> {
    if u.flags & DMA_UNMAP_FLAG_GET_DIRTY_BITMAP != 0 {
        return Err(DeviceError::unsupported("dirty page tracking"));
    }
    if u.flags & !DMA_UNMAP_FLAG_ALL != 0 {
        return Err(DeviceError::invalid(format!(
            "DMA_UNMAP flags {:#x}",
            u.flags
        )));
    }
    if u.flags & DMA_UNMAP_FLAG_ALL != 0 && (u.addr != 0 || u.size != 0) {
        return Err(DeviceError::invalid(
            "DMA_UNMAP with UNMAP_ALL needs address and size 0",
        ));
    }
    lock(device).dma_unmap(u)?;
    DmaUnmap {
        argsz: DmaUnmap::LEN as u32,
        ..*u
    }
    .encode(tx);
    Ok(())
}

fn set_irqs<D: VfioUserDevice + ?Sized>(
    device: &Mutex<D>,
    set: &SetIrqs,
    data: &[u8],
    fds: Vec<OwnedFd>,
) -> Result<(), DeviceError> {
    let data_type = set.flags & IRQ_SET_DATA_TYPE_MASK;
    let action = set.flags & IRQ_SET_ACTION_TYPE_MASK;
    if !data_type.is_power_of_two()
        || !action.is_power_of_two()
        || set.flags & !(IRQ_SET_DATA_TYPE_MASK | IRQ_SET_ACTION_TYPE_MASK) != 0
    {
        return Err(DeviceError::invalid(format!(
            "SET_IRQS flags {:#x}",
            set.flags
        )));
    }
    let mut dev = lock(device);
    let info = dev
        .irq_info(set.index)
        .ok_or_else(|| DeviceError::invalid(format!("no IRQ index {}", set.index)))?;
    // DATA_NONE | ACTION_TRIGGER with count 0 releases every trigger.
    let release_all =
        data_type == IRQ_SET_DATA_NONE && action == IRQ_SET_ACTION_TRIGGER && set.count == 0;
    let end = set.start.checked_add(set.count);
    if !release_all && end.is_none_or(|e| e > info.count) {
        return Err(DeviceError::invalid(format!(
            "IRQ index {} has {} vectors, not {}+{}",
            set.index, info.count, set.start, set.count
        )));
    }
    if data_type == IRQ_SET_DATA_EVENTFD {
        if !fds.is_empty() && fds.len() != set.count as usize {
            return Err(DeviceError::invalid(format!(
                "SET_IRQS with {} eventfds for {} vectors",
                fds.len(),
                set.count
            )));
        }
    } else if !fds.is_empty() {
        return Err(DeviceError::invalid(
            "SET_IRQS carries fds without DATA_EVENTFD",
        ));
    }
    dev.set_irqs(set, data, fds)
}

#[cfg(test)]
mod tests;
