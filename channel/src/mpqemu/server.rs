//! The device side of mpqemu (what QEMU's `-machine x-remote` does): one
//! connection served by one thread over an [`MpqemuDevice`] that the
//! embedding process (remote-host) implements.
//!
//! What the loop checks so the device does not have to: the header size
//! (at most 192 payload bytes) and fd count (at most 7) before the body is
//! read, an exact payload size per command, fds only on SYNC_SYSMEM (1 to
//! 7) and SET_IRQFD (exactly 2), configuration accesses of 1, 2 or 4
//! bytes inside the 256-byte space, BAR accesses of 1, 2, 4 or 8 bytes.
//!
//! Error policy (QEMU's `x-remote` shuts the whole process down on any
//! error; we do not):
//! - A framing error (EOF or timeout mid-message, a size above the limit,
//!   too many fds), an unparseable message, an unknown command or a `RET`
//!   sent to us closes the channel.
//! - A well-formed request that cannot be served (outside configuration
//!   space, a BAR address no BAR decodes, a device error) gets a `RET` of
//!   `u64::MAX`, the protocol's failure value, and the channel goes on.
//!   SYNC_SYSMEM and SET_IRQFD have no reply: their failures are logged.
//!
//! On return, for whatever reason, the device is told that its client went
//! away ([`MpqemuDevice::client_disconnected`]).

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::Duration;

use super::messages::{BarAccess, ConfigAccess, Header, Message, ParseError, SysmemSlot};
use super::{DeviceError, CONFIG_SPACE_SIZE, HEADER_SIZE, MAX_FDS, MAX_PAYLOAD, RET_FAILURE};
use crate::framing::{Framed, FramingError, RecvLimits, DEFAULT_POLL, DEFAULT_TIMEOUT};

/// What a device process implements to be served over mpqemu.
///
/// Calls come one at a time from the connection's thread, under the
/// mutex given to [`serve_connection`]. Arguments have been checked (see
/// the module docs). Data is the device's little-endian bytes.
pub trait MpqemuDevice: Send {
    /// Replaces the guest RAM the device reaches: drop every earlier
    /// mapping, then map each region's fd.
    fn sync_sysmem(&mut self, regions: Vec<(SysmemSlot, OwnedFd)>) -> Result<(), DeviceError>;
    /// The INTx eventfds: signal `irqfd` on a rising level; when
    /// `resamplefd` fires (EOI), signal again if the level is still high.
    fn set_irqfd(&mut self, irqfd: OwnedFd, resamplefd: OwnedFd) -> Result<(), DeviceError>;
    /// A configuration read of `data.len()` (1, 2, 4) bytes at `addr`.
    fn config_read(&mut self, addr: u32, data: &mut [u8]) -> Result<(), DeviceError>;
    /// A configuration write (BAR placement is learnt from these).
    fn config_write(&mut self, addr: u32, data: &[u8]) -> Result<(), DeviceError>;
    /// A read at absolute address `addr` of memory (`memory`) or I/O
    /// space; refuse an address no BAR of the device decodes.
    fn bar_read(&mut self, addr: u64, memory: bool, data: &mut [u8]) -> Result<(), DeviceError>;
    fn bar_write(&mut self, addr: u64, memory: bool, data: &[u8]) -> Result<(), DeviceError>;
    fn reset(&mut self) -> Result<(), DeviceError>;
    /// The client went away: drop its RAM mappings and eventfds, keep the
    /// device state.
    fn client_disconnected(&mut self);
}

/// Knobs of one served connection.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Name for log messages (the device id).
    pub name: String,
    /// Busy-poll before sleeping on the socket (the upper bound when
    /// `adaptive_poll`).
    pub poll: Duration,
    /// Adapt the busy-poll window to how fast messages come.
    pub adaptive_poll: bool,
    /// Limit on the rest of a message once its first byte arrived, and
    /// on sending a reply.
    pub timeout: Duration,
    /// Limit on waiting for the next message; `None` waits forever (an
    /// idle guest may leave a device alone for hours).
    pub idle_timeout: Option<Duration>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            name: "mpqemu".into(),
            poll: DEFAULT_POLL,
            adaptive_poll: true,
            timeout: DEFAULT_TIMEOUT,
            idle_timeout: None,
        }
    }
}

/// Why a connection ended other than by a clean close.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Framing(#[from] FramingError),
    #[error("malformed message: {0}")]
    Parse(#[from] ParseError),
    #[error("protocol violation: {0}")]
    Protocol(String),
}

fn lock<D: ?Sized>(m: &Mutex<D>) -> std::sync::MutexGuard<'_, D> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serves one client until it disconnects (`Ok`) or breaks the protocol
/// (`Err`; the socket is closed either way).
pub fn serve_connection<D: MpqemuDevice + ?Sized>(
    sock: UnixStream,
    device: &Mutex<D>,
    opts: &ServerOptions,
) -> Result<(), ServerError> {
    let mut framed = Framed::new(sock);
    framed.set_poll(opts.poll);
    framed.set_adaptive(opts.adaptive_poll);
    framed.set_max_fds(MAX_FDS);
    let r = run(&framed, device, opts);
    lock(device).client_disconnected();
    match &r {
        Ok(()) => tracing::info!(device = %opts.name, "mpqemu client disconnected"),
        Err(e) => tracing::warn!(device = %opts.name, "mpqemu channel closed: {e}"),
    }
    r
}

fn run<D: MpqemuDevice + ?Sized>(
    framed: &Framed,
    device: &Mutex<D>,
    opts: &ServerOptions,
) -> Result<(), ServerError> {
    let mut rx = Vec::with_capacity(HEADER_SIZE + MAX_PAYLOAD);
    let mut tx = Vec::with_capacity(HEADER_SIZE + 8);
    let mut fds = Vec::new();
    loop {
        fds.clear();
        match framed.recv_message(
            &mut rx,
            &mut fds,
            HEADER_SIZE,
            Header::size_of,
            &RecvLimits {
                max_size: HEADER_SIZE + MAX_PAYLOAD,
                first: opts.idle_timeout,
                rest: opts.timeout,
            },
        ) {
            Ok(()) => {}
            Err(FramingError::Closed) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let msg = Message::parse(&rx, fds.len())?;
        let reply: Option<u64> = match msg {
            Message::Ret(_) => {
                return Err(ServerError::Protocol("RET sent to the device side".into()))
            }
            Message::SyncSysmem(s) => {
                let regions: Vec<(SysmemSlot, OwnedFd)> =
                    s.regions.into_iter().zip(fds.drain(..)).collect();
                let layout: Vec<String> = regions
                    .iter()
                    .map(|(r, _)| format!("{:#x}+{:#x}@{:#x}", r.gpa, r.size, r.offset))
                    .collect();
                match lock(device).sync_sysmem(regions) {
                    Ok(()) => {
                        tracing::debug!(device = %opts.name, "SYNC_SYSMEM {}", layout.join(" "))
                    }
                    Err(e) => {
                        tracing::warn!(device = %opts.name, "SYNC_SYSMEM {} failed: {e}", layout.join(" "))
                    }
                }
                None
            }
            Message::SetIrqfd => {
                let mut it = fds.drain(..);
                if let (Some(irqfd), Some(resample)) = (it.next(), it.next()) {
                    if let Err(e) = lock(device).set_irqfd(irqfd, resample) {
                        tracing::warn!(device = %opts.name, "SET_IRQFD failed: {e}");
                    }
                }
                None
            }
            Message::PciCfgRead(a) => Some(config_read(device, &a, opts)),
            Message::PciCfgWrite(a) => Some(config_write(device, &a, opts)),
            Message::BarRead(a) => Some(bar_read(device, &a, opts)),
            Message::BarWrite(a) => Some(bar_write(device, &a, opts)),
            Message::DeviceReset => {
                let r = lock(device).reset();
                match r {
                    Ok(()) => Message::Ret(None).encode(&mut tx),
                    Err(e) => {
                        tracing::warn!(device = %opts.name, "reset failed: {e}");
                        Message::Ret(Some(RET_FAILURE)).encode(&mut tx)
                    }
                };
                None
            }
        };
        if let Some(v) = reply {
            Message::Ret(Some(v)).encode(&mut tx);
        }
        if !tx.is_empty() {
            framed.send(&tx, &[], opts.timeout)?;
            tx.clear();
        }
    }
}

fn refused(opts: &ServerOptions, what: &str, e: DeviceError) -> u64 {
    tracing::debug!(device = %opts.name, "{what} refused: {e}");
    RET_FAILURE
}

fn config_range(a: &ConfigAccess) -> Result<(u32, usize), DeviceError> {
    let len = match a.len {
        1 | 2 | 4 => a.len as u32,
        _ => {
            return Err(DeviceError::invalid(format!(
                "config access of {} bytes",
                a.len
            )))
        }
    };
    if a.addr
        .checked_add(len)
        .is_none_or(|e| e > CONFIG_SPACE_SIZE)
    {
        return Err(DeviceError::invalid(format!(
            "config access of {len} bytes at {:#x} is outside the 256-byte space",
            a.addr
        )));
    }
    Ok((a.addr, len as usize))
}

fn config_read<D: MpqemuDevice + ?Sized>(
    device: &Mutex<D>,
    a: &ConfigAccess,
    opts: &ServerOptions,
) -> u64 {
    let r = config_range(a).and_then(|(addr, len)| {
        let mut b = [0u8; 8];
        lock(device).config_read(addr, &mut b[..len])?;
        Ok(u64::from_le_bytes(b))
    });
    r.unwrap_or_else(|e| refused(opts, "PCI_CFGREAD", e))
}

fn config_write<D: MpqemuDevice + ?Sized>(
    device: &Mutex<D>,
    a: &ConfigAccess,
    opts: &ServerOptions,
) -> u64 {
    let r = config_range(a).and_then(|(addr, len)| {
        let b = a.val.to_le_bytes();
        lock(device).config_write(addr, &b[..len])
    });
    match r {
        Ok(()) => 0,
        Err(e) => refused(opts, "PCI_CFGWRITE", e),
    }
}

fn bar_size(a: &BarAccess) -> Result<usize, DeviceError> {
    match a.size {
        1 | 2 | 4 | 8 => Ok(a.size as usize),
        s => Err(DeviceError::invalid(format!("BAR access of {s} bytes"))),
    }
}

fn bar_read<D: MpqemuDevice + ?Sized>(
    device: &Mutex<D>,
    a: &BarAccess,
    opts: &ServerOptions,
) -> u64 {
    let r = bar_size(a).and_then(|len| {
        let mut b = [0u8; 8];
        lock(device).bar_read(a.addr, a.memory, &mut b[..len])?;
        Ok(u64::from_le_bytes(b))
    });
    r.unwrap_or_else(|e| refused(opts, "BAR_READ", e))
}

fn bar_write<D: MpqemuDevice + ?Sized>(
    device: &Mutex<D>,
    a: &BarAccess,
    opts: &ServerOptions,
) -> u64 {
    let r = bar_size(a).and_then(|len| {
        let b = a.val.to_le_bytes();
        lock(device).bar_write(a.addr, a.memory, &b[..len])
    });
    match r {
        Ok(()) => 0,
        Err(e) => refused(opts, "BAR_WRITE", e),
    }
}

#[cfg(test)]
mod tests;
