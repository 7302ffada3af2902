//! The VMM side of mpqemu (what QEMU's `x-pci-proxy-dev` does): one
//! socket, requests answered in order, every wait bounded by
//! [`ClientOptions::timeout`], busy-polling before sleeping as
//! [`Framed`] does.
//!
//! mpqemu has no posted writes: the device side answers every BAR_WRITE
//! with a `RET`. [`MpqemuClient::bar_write_posted`] still lets a VMM go on
//! without waiting: it sends the write and leaves its `RET` in the socket.
//! Every 16 posted writes the client takes, without waiting, the `RET`s
//! that have already come back whole (`FIONREAD`); only when
//! [`ClientOptions::max_posted`] are outstanding does it wait, for the
//! older half. The next call that waits for a reply (or
//! [`MpqemuClient::flush`]) first collects all of them. A posted write
//! that failed (a `RET` of `u64::MAX`) is counted in
//! [`MpqemuClient::posted_failures`] and logged. This works against
//! QEMU's own `x-remote` too, which handles a socket's messages in order.
//!
//! After a transport or protocol error (timeout, EOF, a reply that is not
//! a well-formed `RET`) the client is broken: the stream may be out of
//! step, so every later call fails with [`ClientError::Broken`].

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::messages::{BarAccess, Command, ConfigAccess, Message, ParseError, SyncSysmem};
use super::messages::{Header, SysmemSlot};
use super::{CONFIG_SPACE_SIZE, HEADER_SIZE, MAX_FDS, RET_FAILURE};
use crate::framing::{Framed, FramingError, RecvLimits, DEFAULT_POLL, DEFAULT_TIMEOUT};

/// Size of a `RET` carrying a value.
const RET_LEN: usize = HEADER_SIZE + 8;

/// Knobs of a client.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Limit on every wait for a reply and on sending.
    pub timeout: Duration,
    /// Busy-poll before sleeping on the socket (the upper bound when
    /// `adaptive_poll`).
    pub poll: Duration,
    /// Adapt the busy-poll window to how fast replies come.
    pub adaptive_poll: bool,
    /// Most posted writes whose `RET` may be left unread; when reached,
    /// the client waits for the older half of them. (`RET`s that have
    /// already come are collected every 16 posted writes without waiting.)
    pub max_posted: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            timeout: DEFAULT_TIMEOUT,
            poll: DEFAULT_POLL,
            adaptive_poll: true,
            max_posted: 256,
        }
    }
}

/// What can go wrong on the client side.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Framing(#[from] FramingError),
    #[error("malformed reply: {0}")]
    Parse(#[from] ParseError),
    /// The device side answered `u64::MAX` (its failure value).
    #[error("the device side failed {cmd:?}")]
    Failed { cmd: Command },
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("the client is unusable after an earlier transport error")]
    Broken,
    #[error("invalid argument: {0}")]
    Invalid(String),
}

/// One guest RAM region for [`MpqemuClient::sync_sysmem`]: `size` bytes
/// of `fd` from `offset`, at guest-physical `gpa`.
#[derive(Debug, Clone, Copy)]
pub struct SysmemRegion<'a> {
    pub gpa: u64,
    pub size: u64,
    pub offset: u64,
    pub fd: BorrowedFd<'a>,
}

/// An mpqemu client on one socket.
#[derive(Debug)]
pub struct MpqemuClient {
    framed: Framed,
    opts: ClientOptions,
    broken: bool,
    /// Posted writes whose `RET` is still in the socket.
    pending: usize,
    posted_failures: u64,
    tx: Vec<u8>,
    rx: Vec<u8>,
}

impl MpqemuClient {
    /// Connects to a device side listening on `path`.
    pub fn connect(path: &Path, opts: ClientOptions) -> Result<Self, ClientError> {
        let sock = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self::from_stream(sock, opts))
    }

    /// Uses an already connected socket (e.g. one end of a socketpair
    /// whose other end a device process inherited). mpqemu has no
    /// handshake, so nothing is exchanged yet.
    pub fn from_fd(fd: OwnedFd, opts: ClientOptions) -> Self {
        Self::from_stream(UnixStream::from(fd), opts)
    }

    /// Like [`from_fd`](Self::from_fd) for a `UnixStream`.
    pub fn from_stream(sock: UnixStream, opts: ClientOptions) -> Self {
        let mut framed = Framed::new(sock);
        framed.set_poll(opts.poll);
        framed.set_adaptive(opts.adaptive_poll);
        // Replies never carry fds.
        framed.set_max_fds(0);
        MpqemuClient {
            framed,
            opts,
            broken: false,
            pending: 0,
            posted_failures: 0,
            tx: Vec::with_capacity(HEADER_SIZE + super::MAX_PAYLOAD),
            rx: Vec::with_capacity(4096),
        }
    }

    /// Changes the busy-poll bound.
    pub fn set_poll(&mut self, poll: Duration) {
        self.opts.poll = poll;
        self.framed.set_poll(poll);
    }

    /// Changes the reply timeout.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.opts.timeout = timeout;
    }

    /// Posted writes whose `RET` reported a failure so far.
    pub fn posted_failures(&self) -> u64 {
        self.posted_failures
    }

    /// Whether an earlier transport or protocol error broke the client.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// The underlying socket.
    pub fn socket(&self) -> &UnixStream {
        self.framed.socket()
    }

    fn check(&self) -> Result<(), ClientError> {
        if self.broken {
            Err(ClientError::Broken)
        } else {
            Ok(())
        }
    }

    fn fail<T>(&mut self, e: impl Into<ClientError>) -> Result<T, ClientError> {
        self.broken = true;
        Err(e.into())
    }

    fn send_tx(&mut self, fds: &[BorrowedFd<'_>]) -> Result<(), ClientError> {
        match self.framed.send(&self.tx, fds, self.opts.timeout) {
            Ok(()) => Ok(()),
            Err(e) => self.fail(e),
        }
    }

    /// Sends `msg` with `fds` and does not wait (SYNC_SYSMEM, SET_IRQFD,
    /// or anything a test wants to send).
    pub fn send(&mut self, msg: &Message, fds: &[BorrowedFd<'_>]) -> Result<(), ClientError> {
        self.check()?;
        if fds.len() > MAX_FDS {
            return Err(ClientError::Invalid(format!(
                "{} fds in one message; QEMU accepts at most {MAX_FDS}",
                fds.len()
            )));
        }
        self.tx.clear();
        msg.encode(&mut self.tx);
        self.send_tx(fds)
    }

    /// Sends raw bytes (for tests of a server's error handling).
    #[doc(hidden)]
    pub fn send_raw(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), ClientError> {
        Ok(self.framed.send(bytes, fds, self.opts.timeout)?)
    }

    /// Collects the `RET`s of posted writes still in the socket.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        self.check()?;
        self.collect(self.pending)
    }

    /// Collects, without waiting, the `RET`s of posted writes that have
    /// already arrived whole.
    fn collect_arrived(&mut self) -> Result<(), ClientError> {
        let mut avail: libc::c_int = 0;
        // SAFETY: FIONREAD stores the readable byte count in `avail`.
        let r = unsafe {
            libc::ioctl(
                self.framed.socket().as_raw_fd(),
                libc::FIONREAD,
                &mut avail as *mut libc::c_int,
            )
        };
        if r < 0 {
            return Ok(());
        }
        let whole = usize::try_from(avail).unwrap_or(0) / RET_LEN;
        self.collect(whole.min(self.pending))
    }

    /// Reads and checks `n` posted-write `RET`s.
    fn collect(&mut self, n: usize) -> Result<(), ClientError> {
        if n == 0 {
            return Ok(());
        }
        self.rx.clear();
        self.rx.resize(n * RET_LEN, 0);
        let mut fds = Vec::new();
        if let Err(e) = self.framed.recv_exact(
            &mut self.rx,
            &mut fds,
            Some(self.opts.timeout),
            self.opts.timeout,
            true,
        ) {
            return self.fail(e);
        }
        self.pending -= n;
        let mut failed = 0;
        for chunk in self.rx.chunks_exact(RET_LEN) {
            match Message::parse(chunk, 0) {
                Ok(Message::Ret(Some(v))) => {
                    if v == RET_FAILURE {
                        failed += 1;
                    }
                }
                Ok(other) => {
                    let e = ClientError::Protocol(format!(
                        "expected the RET of a posted BAR_WRITE, got {:?}",
                        other.command()
                    ));
                    return self.fail(e);
                }
                Err(e) => return self.fail(e),
            }
        }
        if failed > 0 {
            self.posted_failures += failed;
            tracing::warn!("{failed} posted BAR_WRITE(s) failed on the device side");
        }
        Ok(())
    }

    /// Sends `msg` (with `fds`) and waits for its `RET`: `Some(value)`, or
    /// `None` for an empty `RET`. A failure value is returned as is.
    pub fn call(
        &mut self,
        msg: &Message,
        fds: &[BorrowedFd<'_>],
    ) -> Result<Option<u64>, ClientError> {
        self.flush()?;
        self.send(msg, fds)?;
        let mut rfds = Vec::new();
        let r = self.framed.recv_reply(
            &mut self.rx,
            &mut rfds,
            HEADER_SIZE,
            Header::size_of,
            &RecvLimits {
                max_size: HEADER_SIZE + super::MAX_PAYLOAD,
                first: Some(self.opts.timeout),
                rest: self.opts.timeout,
            },
            RET_LEN,
        );
        if let Err(e) = r {
            return self.fail(e);
        }
        match Message::parse(&self.rx, rfds.len()) {
            Ok(Message::Ret(v)) => Ok(v),
            Ok(other) => {
                let e = ClientError::Protocol(format!(
                    "expected RET to {:?}, got {:?}",
                    msg.command(),
                    other.command()
                ));
                self.fail(e)
            }
            Err(e) => self.fail(e),
        }
    }

    /// A call whose `RET` must carry a value; `u64::MAX` is a failure.
    fn call_value(&mut self, msg: &Message) -> Result<u64, ClientError> {
        match self.call(msg, &[])? {
            Some(RET_FAILURE) => Err(ClientError::Failed { cmd: msg.command() }),
            Some(v) => Ok(v),
            None => self.fail(ClientError::Protocol(format!(
                "empty RET to {:?}",
                msg.command()
            ))),
        }
    }

    /// SYNC_SYSMEM: the guest RAM the device may reach, replacing what it
    /// had. At most 7 regions (QEMU 7.2's limit); no reply.
    pub fn sync_sysmem(&mut self, regions: &[SysmemRegion<'_>]) -> Result<(), ClientError> {
        if regions.is_empty() || regions.len() > MAX_FDS {
            return Err(ClientError::Invalid(format!(
                "SYNC_SYSMEM with {} regions (1 to {MAX_FDS})",
                regions.len()
            )));
        }
        let msg = Message::SyncSysmem(SyncSysmem {
            regions: regions
                .iter()
                .map(|r| SysmemSlot {
                    gpa: r.gpa,
                    size: r.size,
                    offset: r.offset,
                })
                .collect(),
        });
        let fds: Vec<BorrowedFd<'_>> = regions.iter().map(|r| r.fd).collect();
        self.flush()?;
        self.send(&msg, &fds)
    }

    /// SET_IRQFD: the eventfd the device signals on a rising INTx level,
    /// and the one the VMM (KVM) signals at EOI; no reply.
    pub fn set_irqfd(
        &mut self,
        irqfd: BorrowedFd<'_>,
        resamplefd: BorrowedFd<'_>,
    ) -> Result<(), ClientError> {
        self.flush()?;
        self.send(&Message::SetIrqfd, &[irqfd, resamplefd])
    }

    fn config_access(addr: u32, len: u32, val: u32) -> Result<ConfigAccess, ClientError> {
        if !matches!(len, 1 | 2 | 4) || addr.checked_add(len).is_none_or(|e| e > CONFIG_SPACE_SIZE)
        {
            return Err(ClientError::Invalid(format!(
                "config access of {len} bytes at {addr:#x}"
            )));
        }
        Ok(ConfigAccess {
            addr,
            val,
            len: len as i32,
        })
    }

    /// PCI_CFGREAD of `len` (1, 2, 4) bytes at `addr`. (QEMU 7.2's
    /// `x-remote` refuses, and shuts down on, any access with
    /// `addr + 4 > 256`, whatever `len`.)
    pub fn config_read(&mut self, addr: u32, len: u32) -> Result<u32, ClientError> {
        let a = Self::config_access(addr, len, 0)?;
        let v = self.call_value(&Message::PciCfgRead(a))?;
        Ok(v as u32)
    }

    /// PCI_CFGWRITE of the low `len` bytes of `val` at `addr`.
    pub fn config_write(&mut self, addr: u32, val: u32, len: u32) -> Result<(), ClientError> {
        let a = Self::config_access(addr, len, val)?;
        self.call_value(&Message::PciCfgWrite(a))?;
        Ok(())
    }

    fn bar_access(addr: u64, val: u64, size: u32, memory: bool) -> Result<BarAccess, ClientError> {
        if !matches!(size, 1 | 2 | 4 | 8) {
            return Err(ClientError::Invalid(format!("BAR access of {size} bytes")));
        }
        Ok(BarAccess {
            addr,
            val,
            size,
            memory,
        })
    }

    /// BAR_READ of `size` (1, 2, 4, 8) bytes at absolute address `addr`
    /// in memory (`memory`) or I/O space. An 8-byte read of all-ones is
    /// indistinguishable from a failure and is returned as a value.
    pub fn bar_read(&mut self, addr: u64, size: u32, memory: bool) -> Result<u64, ClientError> {
        let a = Self::bar_access(addr, 0, size, memory)?;
        let msg = Message::BarRead(a);
        match self.call(&msg, &[])? {
            Some(RET_FAILURE) if size < 8 => Err(ClientError::Failed {
                cmd: Command::BarRead,
            }),
            Some(v) => Ok(v),
            None => self.fail(ClientError::Protocol("empty RET to BarRead".into())),
        }
    }

    /// BAR_WRITE, waiting for its `RET`.
    pub fn bar_write(
        &mut self,
        addr: u64,
        val: u64,
        size: u32,
        memory: bool,
    ) -> Result<(), ClientError> {
        let a = Self::bar_access(addr, val, size, memory)?;
        self.call_value(&Message::BarWrite(a))?;
        Ok(())
    }

    /// BAR_WRITE without waiting: its `RET` is collected later (see the
    /// module docs).
    pub fn bar_write_posted(
        &mut self,
        addr: u64,
        val: u64,
        size: u32,
        memory: bool,
    ) -> Result<(), ClientError> {
        let a = Self::bar_access(addr, val, size, memory)?;
        // Take what has come back now and then, so the window rarely
        // fills and the pipeline never stalls to drain.
        if self.pending >= 16 && self.pending % 16 == 0 {
            self.collect_arrived()?;
        }
        if self.pending >= self.opts.max_posted.max(1) {
            self.collect(self.pending / 2)?;
        }
        self.send(&Message::BarWrite(a), &[])?;
        self.pending += 1;
        Ok(())
    }

    /// DEVICE_RESET; the device side answers an empty `RET`.
    pub fn reset(&mut self) -> Result<(), ClientError> {
        match self.call(&Message::DeviceReset, &[])? {
            None | Some(0) => Ok(()),
            Some(_) => Err(ClientError::Failed {
                cmd: Command::DeviceReset,
            }),
        }
    }
}
