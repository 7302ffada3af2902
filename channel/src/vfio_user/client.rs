//! The client side of vfio-user, as a VMM uses it: one socket, one
//! request in flight, every wait bounded by [`ClientOptions::timeout`].
//!
//! Writes can be posted ([`VfioUserClient::region_write_posted`]): the
//! command carries `No_reply` and the call returns once it is sent. The
//! server handles a socket's messages in order, so a later read on the
//! same client sees every earlier posted write.
//!
//! After a transport or protocol error (timeout, EOF, a reply that does
//! not match the request) the client is broken: the stream may be out of
//! step, so every later call fails with [`ClientError::Broken`].

use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::messages::{
    Capabilities, Command, DeviceInfo, DmaMap, DmaUnmap, Header, IrqInfo, ParseError, RegionAccess,
    RegionInfo, SetIrqs, Version,
};
use super::{
    DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE, HEADER_SIZE, IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_DATA_EVENTFD, IRQ_SET_DATA_NONE, VERSION_MAJOR, VERSION_MINOR,
};
use crate::framing::{Framed, FramingError, RecvLimits, DEFAULT_POLL, DEFAULT_TIMEOUT, MAX_FDS};

mod migration;

/// Knobs of a client.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Limit on every wait for a reply (QEMU's `x-msg-timeout` default is
    /// the same 5 s).
    pub timeout: Duration,
    /// Busy-poll before sleeping on the socket (the upper bound when
    /// `adaptive_poll`).
    pub poll: Duration,
    /// Adapt the busy-poll window to how fast replies come
    /// ([`Framed::poll_window`](crate::framing::Framed::poll_window)).
    pub adaptive_poll: bool,
    /// Largest data we accept in one reply (advertised).
    pub max_data_xfer_size: u32,
    /// Most fds in one reply (advertised).
    pub max_msg_fds: u32,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            timeout: DEFAULT_TIMEOUT,
            poll: DEFAULT_POLL,
            adaptive_poll: true,
            max_data_xfer_size: super::DEFAULT_MAX_DATA_XFER,
            max_msg_fds: 8,
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
    /// The server answered with an error reply.
    #[error("server refused {cmd:?}: {}", std::io::Error::from_raw_os_error(*.errno))]
    Remote { cmd: Command, errno: i32 },
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("server speaks vfio-user {major}.{minor}, we need {VERSION_MAJOR}.x")]
    Version { major: u16, minor: u16 },
    #[error("the client is unusable after an earlier transport error")]
    Broken,
    #[error("invalid argument: {0}")]
    Invalid(String),
}

/// A vfio-user client on one socket.
#[derive(Debug)]
pub struct VfioUserClient {
    framed: Framed,
    opts: ClientOptions,
    next_id: u16,
    broken: bool,
    server_version: (u16, u16),
    server_caps: Capabilities,
    tx: Vec<u8>,
    rx: Vec<u8>,
}

impl VfioUserClient {
    /// Connects to a server's socket and negotiates the version.
    pub fn connect(path: &Path, opts: ClientOptions) -> Result<Self, ClientError> {
        let sock = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_stream(sock, opts)
    }

    /// Uses an already connected socket (e.g. one end of a socketpair)
    /// and negotiates the version.
    pub fn from_fd(fd: OwnedFd, opts: ClientOptions) -> Result<Self, ClientError> {
        Self::from_stream(UnixStream::from(fd), opts)
    }

    /// Like [`from_fd`](Self::from_fd) for a `UnixStream`.
    pub fn from_stream(sock: UnixStream, opts: ClientOptions) -> Result<Self, ClientError> {
        let mut framed = Framed::new(sock);
        framed.set_poll(opts.poll);
        framed.set_adaptive(opts.adaptive_poll);
        framed.set_max_fds((opts.max_msg_fds as usize).min(MAX_FDS));
        let mut c = VfioUserClient {
            framed,
            opts,
            next_id: 0,
            broken: false,
            server_version: (0, 0),
            server_caps: Capabilities::default(),
            tx: Vec::with_capacity(4096),
            rx: Vec::with_capacity(4096),
        };
        c.negotiate()?;
        Ok(c)
    }

    /// The version the server answered.
    pub fn server_version(&self) -> (u16, u16) {
        self.server_version
    }

    /// The capabilities the server announced.
    pub fn server_capabilities(&self) -> &Capabilities {
        &self.server_caps
    }

    /// Changes the busy-poll duration.
    pub fn set_poll(&mut self, poll: Duration) {
        self.opts.poll = poll;
        self.framed.set_poll(poll);
    }

    /// Changes the reply timeout.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.opts.timeout = timeout;
    }

    /// The limit on every wait for a reply.
    pub fn timeout(&self) -> Duration {
        self.opts.timeout
    }

    /// The largest data one message carries both ways (the smaller of the
    /// two sides' `max_data_xfer_size`).
    pub fn max_data_xfer_size(&self) -> usize {
        self.chunk()
    }

    fn negotiate(&mut self) -> Result<(), ClientError> {
        let ours = Version {
            major: VERSION_MAJOR,
            minor: VERSION_MINOR,
            capabilities: Capabilities {
                max_msg_fds: Some(self.opts.max_msg_fds),
                max_data_xfer_size: Some(self.opts.max_data_xfer_size),
                ..Default::default()
            },
        };
        let mut payload = Vec::new();
        ours.encode(&mut payload);
        let (_, _) = self.call(Command::Version, &payload, &[], &[])?;
        let theirs = Version::parse(self.reply_payload())?;
        if theirs.major != VERSION_MAJOR {
            self.broken = true;
            return Err(ClientError::Version {
                major: theirs.major,
                minor: theirs.minor,
            });
        }
        self.server_version = (theirs.major, theirs.minor);
        self.server_caps = theirs.capabilities;
        Ok(())
    }

    fn reply_payload(&self) -> &[u8] {
        self.rx.get(HEADER_SIZE..).unwrap_or(&[])
    }

    fn start(
        &mut self,
        cmd: Command,
        payload_len: usize,
        no_reply: bool,
    ) -> Result<u16, ClientError> {
        if self.broken {
            return Err(ClientError::Broken);
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.tx.clear();
        Header::command(id, cmd, payload_len, no_reply).encode(&mut self.tx);
        Ok(id)
    }

    fn send(&mut self, fds: &[BorrowedFd<'_>]) -> Result<(), ClientError> {
        let r = self.framed.send(&self.tx, fds, self.opts.timeout);
        if r.is_err() {
            self.broken = true;
        }
        Ok(r?)
    }

    /// Sends `payload` parts as command `cmd` and waits for its reply,
    /// which is left in `rx`. Returns the reply header and its fds.
    fn call(
        &mut self,
        cmd: Command,
        head: &[u8],
        data: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(Header, Vec<OwnedFd>), ClientError> {
        let max_fds = self.server_caps.max_msg_fds() as usize;
        if fds.len() > max_fds {
            return Err(ClientError::Invalid(format!(
                "{} fds in one message; the server accepts {max_fds}",
                fds.len()
            )));
        }
        let id = self.start(cmd, head.len() + data.len(), false)?;
        self.tx.extend_from_slice(head);
        self.tx.extend_from_slice(data);
        self.send(fds)?;
        // Expected reply size, so it is read in one call when it is there.
        let hint = match cmd {
            Command::Version => 4096,
            Command::RegionRead => {
                let count = head
                    .get(12..16)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize)
                    .unwrap_or(0);
                HEADER_SIZE + RegionAccess::LEN + count
            }
            _ => HEADER_SIZE + 64,
        };
        self.wait_reply(id, cmd, hint)
    }

    fn wait_reply(
        &mut self,
        id: u16,
        cmd: Command,
        hint: usize,
    ) -> Result<(Header, Vec<OwnedFd>), ClientError> {
        let mut fds = Vec::new();
        let max =
            HEADER_SIZE + RegionAccess::LEN + self.opts.max_data_xfer_size as usize + 64 * 1024;
        // One reply is outstanding, so reading up to its expected size in
        // one call cannot take bytes of another message.
        let r = self.framed.recv_reply(
            &mut self.rx,
            &mut fds,
            HEADER_SIZE,
            Header::size_of,
            &RecvLimits {
                max_size: max,
                first: Some(self.opts.timeout),
                rest: self.opts.timeout,
            },
            hint,
        );
        if let Err(e) = r {
            self.broken = true;
            return Err(e.into());
        }
        let h = match Header::parse(&self.rx) {
            Ok(h) => h,
            Err(e) => {
                self.broken = true;
                return Err(e.into());
            }
        };
        if !h.is_reply() || h.msg_id != id || h.cmd != cmd as u16 {
            self.broken = true;
            return Err(ClientError::Protocol(format!(
                "expected the reply to {cmd:?} #{id}, got cmd {} #{} flags {:#x}",
                h.cmd, h.msg_id, h.flags
            )));
        }
        if h.is_error() {
            return Err(ClientError::Remote {
                cmd,
                errno: h.error as i32,
            });
        }
        Ok((h, fds))
    }

    /// DEVICE_GET_INFO.
    pub fn device_info(&mut self) -> Result<DeviceInfo, ClientError> {
        let mut p = Vec::with_capacity(DeviceInfo::LEN);
        DeviceInfo {
            argsz: DeviceInfo::LEN as u32,
            ..Default::default()
        }
        .encode(&mut p);
        self.call(Command::DeviceGetInfo, &p, &[], &[])?;
        Ok(DeviceInfo::parse(self.reply_payload())?)
    }

    /// GET_REGION_INFO of region `index`, with the fd the server sent for
    /// mmap, if any. Capabilities (sparse mmap) are not requested.
    pub fn region_info(
        &mut self,
        index: u32,
    ) -> Result<(RegionInfo, Option<OwnedFd>), ClientError> {
        let mut p = Vec::with_capacity(RegionInfo::LEN);
        RegionInfo {
            argsz: RegionInfo::LEN as u32,
            index,
            ..Default::default()
        }
        .encode(&mut p);
        let (_, mut fds) = self.call(Command::DeviceGetRegionInfo, &p, &[], &[])?;
        let info = RegionInfo::parse(self.reply_payload())?;
        Ok((info, fds.pop()))
    }

    /// GET_IRQ_INFO of IRQ `index`.
    pub fn irq_info(&mut self, index: u32) -> Result<IrqInfo, ClientError> {
        let mut p = Vec::with_capacity(IrqInfo::LEN);
        IrqInfo {
            argsz: IrqInfo::LEN as u32,
            index,
            ..Default::default()
        }
        .encode(&mut p);
        self.call(Command::GetIrqInfo, &p, &[], &[])?;
        Ok(IrqInfo::parse(self.reply_payload())?)
    }

    /// DMA_MAP of `size` bytes of `fd` (from `offset`) at DMA address
    /// `addr`, readable and writable by the device.
    pub fn dma_map(
        &mut self,
        addr: u64,
        size: u64,
        fd: BorrowedFd<'_>,
        offset: u64,
    ) -> Result<(), ClientError> {
        let mut p = Vec::with_capacity(DmaMap::LEN);
        DmaMap {
            argsz: DmaMap::LEN as u32,
            flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
            offset,
            addr,
            size,
        }
        .encode(&mut p);
        self.call(Command::DmaMap, &p, &[], &[fd])?;
        Ok(())
    }

    /// DMA_MAP as given, with or without an fd (without one, the client
    /// asks for DMA through DMA_READ/DMA_WRITE messages, which a server
    /// may refuse). `argsz` is filled in.
    pub fn dma_map_with(
        &mut self,
        map: &DmaMap,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), ClientError> {
        let mut p = Vec::with_capacity(DmaMap::LEN);
        DmaMap {
            argsz: DmaMap::LEN as u32,
            ..*map
        }
        .encode(&mut p);
        match fd {
            Some(fd) => self.call(Command::DmaMap, &p, &[], &[fd])?,
            None => self.call(Command::DmaMap, &p, &[], &[])?,
        };
        Ok(())
    }

    /// DMA_UNMAP of a mapping made with exactly this address and size.
    pub fn dma_unmap(&mut self, addr: u64, size: u64) -> Result<(), ClientError> {
        let mut p = Vec::with_capacity(DmaUnmap::LEN);
        DmaUnmap {
            argsz: DmaUnmap::LEN as u32,
            flags: 0,
            addr,
            size,
        }
        .encode(&mut p);
        self.call(Command::DmaUnmap, &p, &[], &[])?;
        Ok(())
    }

    fn chunk(&self) -> usize {
        let ours = self.opts.max_data_xfer_size;
        let theirs = self.server_caps.max_data_xfer_size();
        ours.min(theirs).max(1) as usize
    }

    /// REGION_READ of `data.len()` bytes at `offset` of `region` (split
    /// into `max_data_xfer_size` pieces when larger).
    pub fn region_read(
        &mut self,
        region: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), ClientError> {
        let chunk = self.chunk();
        let mut done = 0usize;
        let mut p = Vec::with_capacity(RegionAccess::LEN);
        while done < data.len() {
            let n = (data.len() - done).min(chunk);
            let off = offset + done as u64;
            p.clear();
            RegionAccess {
                offset: off,
                region,
                count: n as u32,
            }
            .encode(&mut p);
            self.call(Command::RegionRead, &p, &[], &[])?;
            let (a, bytes) = RegionAccess::parse(self.reply_payload(), "REGION_READ reply", true)?;
            if a.count as usize != n || a.region != region || a.offset != off {
                self.broken = true;
                return Err(ClientError::Protocol(format!(
                    "REGION_READ reply for {} bytes of region {} at {:#x}, asked {n} at {off:#x}",
                    a.count, a.region, a.offset
                )));
            }
            data[done..done + n].copy_from_slice(bytes);
            done += n;
        }
        Ok(())
    }

    /// REGION_WRITE, waiting for the server's acknowledgement.
    pub fn region_write(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ClientError> {
        self.write(region, offset, data, false)
    }

    /// Posted REGION_WRITE: sent with `No_reply`, returns once sent. A
    /// later read on this client sees it; a failure is only in the
    /// server's log.
    pub fn region_write_posted(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ClientError> {
        self.write(region, offset, data, true)
    }

    fn write(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
        posted: bool,
    ) -> Result<(), ClientError> {
        if data.is_empty() {
            return Err(ClientError::Invalid("empty region write".into()));
        }
        let chunk = self.chunk();
        for (i, piece) in data.chunks(chunk).enumerate() {
            let off = offset + (i * chunk) as u64;
            let id = self.start(
                Command::RegionWrite,
                RegionAccess::LEN + piece.len(),
                posted,
            )?;
            RegionAccess {
                offset: off,
                region,
                count: piece.len() as u32,
            }
            .encode(&mut self.tx);
            self.tx.extend_from_slice(piece);
            self.send(&[])?;
            if !posted {
                self.wait_reply(id, Command::RegionWrite, HEADER_SIZE + RegionAccess::LEN)?;
            }
        }
        Ok(())
    }

    /// SET_IRQS with explicit flags, DATA_BOOL bytes and eventfds.
    pub fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        data: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ClientError> {
        let mut p = Vec::with_capacity(SetIrqs::LEN + data.len());
        SetIrqs {
            argsz: (SetIrqs::LEN + data.len()) as u32,
            flags,
            index,
            start,
            count,
        }
        .encode(&mut p);
        self.call(Command::SetIrqs, &p, data, fds)?;
        Ok(())
    }

    /// Routes vectors `start..start + fds.len()` of IRQ `index` to
    /// eventfds (DATA_EVENTFD | ACTION_TRIGGER).
    pub fn set_irq_eventfds(
        &mut self,
        index: u32,
        start: u32,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ClientError> {
        self.set_irqs(
            index,
            IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
            start,
            fds.len() as u32,
            &[],
            fds,
        )
    }

    /// Releases every trigger of IRQ `index` (DATA_NONE | ACTION_TRIGGER,
    /// count 0).
    pub fn disable_irqs(&mut self, index: u32) -> Result<(), ClientError> {
        self.set_irqs(
            index,
            IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER,
            0,
            0,
            &[],
            &[],
        )
    }

    /// DEVICE_RESET.
    pub fn reset(&mut self) -> Result<(), ClientError> {
        self.call(Command::DeviceReset, &[], &[], &[])?;
        Ok(())
    }

    /// Sends raw bytes on the socket (for tests of the server's error
    /// handling).
    #[doc(hidden)]
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        Ok(self.framed.send(bytes, &[], self.opts.timeout)?)
    }

    /// The underlying socket.
    pub fn socket(&self) -> &UnixStream {
        self.framed.socket()
    }
}
