//! The fast path: a shared-memory ring of BAR accesses between our own two
//! ends, beside the socket (which stays the contract any vfio-user or
//! mpqemu peer speaks).
//!
//! One page of a memfd the VMM creates, and two eventfds: `kick` (VMM to
//! remote: there is work) and `reply` (remote to VMM: work is done). The
//! VMM is the only producer (its proxy function is locked per access), a
//! thread of the remote the only consumer:
//!
//! - the VMM writes an access into slot `head % SLOTS` and publishes
//!   `head + 1` (release); a read then waits until `tail` passes its slot
//!   and takes the data from the slot; a write is posted (the VMM goes on
//!   at once);
//! - the remote takes slots in order, runs each on the device, writes a
//!   read's data back into its slot and publishes `tail + 1`;
//! - both sides poll briefly (yielding, adaptive, as the socket does:
//!   docs/channel.md) and then sleep on their eventfd, saying so in a flag
//!   the other side checks after publishing (set flag, check again, then
//!   sleep: no wakeup is lost).
//!
//! Order: every BAR access of a device goes through the ring once it is
//! on, and the VMM drains the ring before anything it still sends on the
//! socket (configuration accesses, reset, heartbeats), so nothing
//! overtakes a posted write: the remote applies accesses in the order the
//! guest made them, as over the socket.
//!
//! Mirrors: a device may declare registers whose reads have no side effect
//! (`plugin_api::Device::mirrored_reads`); the remote keeps their values in
//! the page, and the VMM answers such a read from the page, with no round
//! trip, when the mirror is current. Current means: every access the VMM
//! published has been applied (`tail == head`: the remote refreshes the
//! mirrors after each access, before it publishes `tail`), and no change
//! the device made on its own since the last refresh (`valid == changes`:
//! the remote bumps `changes` when the device raises or lowers its
//! interrupt or says its registers changed, before the interrupt reaches
//! the guest; the ring thread then refreshes and sets `valid`). Otherwise
//! the read goes through the ring as any other. `changes` is always odd
//! and `valid` is 0 while a refresh writes the values, so a VMM read that
//! sees `valid == changes` before and after taking a value took a value
//! of that refresh.
//!
//! Trust: the page is shared with the remote. Its memfd is sealed against
//! shrinking and growing (a remote that truncated it would turn the VMM's
//! next look at the ring into SIGBUS). The VMM reads only plain
//! values from it, checks every index against its own (`tail` may not run
//! past `head`, a status is one of two values) and bounds every wait; a
//! remote that writes garbage fails its device, nothing more. The remote
//! checks every slot it takes (BAR index, length) before it reaches the
//! device.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Accesses in flight at most (posted writes the remote has not taken yet,
/// plus one read).
pub const SLOTS: u32 = 32;
/// Size of the shared page.
pub const RING_BYTES: usize = 4096;
const MAGIC: u32 = 0x474e_4952; // "RING"
const VERSION: u32 = 2;
/// Registers mirrored per ring at most (as `plugin_api::function::MAX_MIRRORS`).
pub const MAX_MIRRORS: usize = 16;

const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 4;
const OFF_HEAD: usize = 64;
const OFF_TAIL: usize = 128;
const OFF_SERVER_SLEEPING: usize = 192;
const OFF_CLIENT_SLEEPING: usize = 256;
const OFF_CHANGES: usize = 320;
const OFF_VALID: usize = 384;
const OFF_MIRROR_COUNT: usize = 448;
const OFF_SLOTS: usize = 512;
const SLOT_BYTES: usize = 32;
const OFF_MIRRORS: usize = OFF_SLOTS + SLOTS as usize * SLOT_BYTES;
const MIRROR_BYTES: usize = 16;
const _: () = assert!(OFF_MIRRORS + MAX_MIRRORS * MIRROR_BYTES <= OFF_RUNG);
/// Doorbells the device took (written by the remote, read by the VMM's
/// checkpoints as device activity the VMM never sees).
const OFF_RUNG: usize = 2048;
// Mirror fields (offsets in an entry).
const M_KEY: usize = 0; // bar | len << 8
const M_OFF_LO: usize = 4;
const M_OFF_HI: usize = 8;
const M_VALUE: usize = 12;

const KIND_READ: u32 = 1;
const KIND_WRITE: u32 = 2;
const STATUS_OK: u32 = 0;
const STATUS_ERROR: u32 = 1;

/// What can go wrong on the ring.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// The remote did not take or answer an access in time.
    #[error("the remote did not answer on the ring within {0:?}")]
    Timeout(Duration),
    /// The caller gave up (the remote was reported dead or hung).
    #[error("the remote was given up while waiting on the ring")]
    GivenUp,
    /// The shared page holds values no well-behaved remote writes.
    #[error("the ring is corrupt: {0}")]
    Corrupt(&'static str),
    /// The device refused the access.
    #[error("the device refused the access")]
    Device,
    /// Setting the ring up failed.
    #[error("ring setup: {0}")]
    Setup(String),
}

/// One mapping of the shared page.
struct Page {
    ptr: NonNull<u8>,
}

// SAFETY: the page is plain shared memory accessed only through atomics
// and volatile copies; the mapping lives as long as the Page.
unsafe impl Send for Page {}
// SAFETY: as above: every access is atomic or a volatile copy of plain
// bytes, so sharing the mapping between threads is sound.
unsafe impl Sync for Page {}

impl Page {
    fn map(fd: BorrowedFd<'_>) -> Result<Page, RingError> {
        let file = File::from(
            fd.try_clone_to_owned()
                .map_err(|e| RingError::Setup(format!("dup: {e}")))?,
        );
        let len = file
            .metadata()
            .map_err(|e| RingError::Setup(format!("fstat: {e}")))?
            .len();
        if len < RING_BYTES as u64 {
            return Err(RingError::Setup(format!(
                "the ring's memory has {len} bytes, {RING_BYTES} needed"
            )));
        }
        // SAFETY: a fresh shared mapping of RING_BYTES of a file at least
        // that long (checked above); the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RING_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(RingError::Setup(format!(
                "mmap: {}",
                std::io::Error::last_os_error()
            )));
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(RingError::Setup("mmap: null".into()))?;
        Ok(Page { ptr })
    }

    fn word(&self, off: usize) -> &AtomicU32 {
        debug_assert!(off % 4 == 0 && off + 4 <= RING_BYTES);
        // SAFETY: `off` is a 4-aligned offset inside the page (all callers
        // use the constants above or slot offsets bounded by SLOTS), the
        // mapping is page-aligned and lives as long as `self`.
        unsafe { &*self.ptr.as_ptr().add(off).cast::<AtomicU32>() }
    }

    fn mirror(&self, index: usize, field: usize) -> &AtomicU32 {
        debug_assert!(index < MAX_MIRRORS);
        self.word(OFF_MIRRORS + index * MIRROR_BYTES + field)
    }

    fn slot(&self, index: u32, field: usize) -> &AtomicU32 {
        self.word(OFF_SLOTS + (index % SLOTS) as usize * SLOT_BYTES + field)
    }

    /// A slot's 8 data bytes (two little-endian words).
    fn load_data(&self, index: u32) -> [u8; 8] {
        let mut v = [0u8; 8];
        v[..4].copy_from_slice(
            &self
                .slot(index, F_DATA_LO)
                .load(Ordering::Relaxed)
                .to_le_bytes(),
        );
        v[4..].copy_from_slice(
            &self
                .slot(index, F_DATA_HI)
                .load(Ordering::Relaxed)
                .to_le_bytes(),
        );
        v
    }

    /// Writes a slot's 8 data bytes.
    fn store_data(&self, index: u32, v: &[u8; 8]) {
        let word = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        self.slot(index, F_DATA_LO)
            .store(word(&v[..4]), Ordering::Relaxed);
        self.slot(index, F_DATA_HI)
            .store(word(&v[4..]), Ordering::Relaxed);
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), RING_BYTES);
        }
    }
}

// Slot fields (offsets in a slot, all u32 words).
const F_KIND: usize = 0; // kind | bar << 8 | len << 16
const F_STATUS: usize = 4;
const F_OFF_LO: usize = 8;
const F_OFF_HI: usize = 12;
const F_DATA_LO: usize = 16;
const F_DATA_HI: usize = 20;

fn eventfd() -> Result<OwnedFd, RingError> {
    // SAFETY: eventfd with valid flags; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(RingError::Setup(format!(
            "eventfd: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: a fresh fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn signal(fd: BorrowedFd<'_>) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a local to an eventfd; a full counter
    // (EAGAIN) already means "signalled".
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

fn drain_eventfd(fd: BorrowedFd<'_>) {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a local from a nonblocking eventfd.
    unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
}

/// Sleeps until `fd` is readable or `timeout` passes (a timeout or an
/// error is only the end of the nap: the caller looks again).
fn sleep_on(fd: BorrowedFd<'_>, timeout: Duration) {
    let _ = crate::framing::wait_fd(fd, libc::POLLIN, Some(Instant::now() + timeout), timeout);
}

/// The adaptive poll window of one waiting side, adapted as the socket's
/// ([`crate::framing::adapted_window`]).
struct Window {
    bound: Duration,
    current: Duration,
}

impl Window {
    fn new(bound: Duration) -> Self {
        Window {
            bound,
            current: bound,
        }
    }

    /// After a wait that slept and was satisfied `after` since it began.
    fn slept(&mut self, after: Duration) {
        self.current = crate::framing::adapted_window(self.current, self.bound, after);
    }
}

/// What the VMM creates and hands the remote (over the control channel).
pub struct RingFds {
    pub memory: OwnedFd,
    pub kick: OwnedFd,
    pub reply: OwnedFd,
}

/// The VMM's end.
pub struct RingClient {
    page: std::sync::Arc<Page>,
    kick: OwnedFd,
    reply: OwnedFd,
    head: u32,
    timeout: Duration,
    window: Window,
    /// The mirrored registers, as the remote declared them at setup
    /// ([`RingClient::load_mirrors`]); read once, so a remote that
    /// rewrites the table later changes nothing.
    mirrors: Vec<MirrorKey>,
    /// Slots before this one have had their status looked at.
    checked: u32,
    /// Posted writes the device refused, not yet taken
    /// ([`RingClient::take_refused_writes`]).
    refused_writes: u64,
}

/// A mirrored register: BAR, offset, width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MirrorKey {
    pub bar: u8,
    pub offset: u64,
    pub len: u8,
}

/// Creates a ring: the VMM's end and the fds for the remote's.
pub fn create(timeout: Duration, poll: Duration) -> Result<(RingClient, RingFds), RingError> {
    let name = c"access-ring";
    // SAFETY: memfd_create with a valid NUL-terminated name; checked.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(RingError::Setup(format!(
            "memfd_create: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: a fresh fd nothing else owns.
    let memory = unsafe { OwnedFd::from_raw_fd(fd) };
    File::from(
        memory
            .try_clone()
            .map_err(|e| RingError::Setup(e.to_string()))?,
    )
    .set_len(RING_BYTES as u64)
    .map_err(|e| RingError::Setup(format!("sizing the ring: {e}")))?;
    // The remote gets this fd: sealed, it can neither shrink the page
    // under our mapping (SIGBUS for the whole VMM on our next look at the
    // ring) nor lift the seals.
    // SAFETY: F_ADD_SEALS on the memfd just created; no memory involved.
    let sealed = unsafe {
        libc::fcntl(
            memory.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
        )
    };
    if sealed != 0 {
        return Err(RingError::Setup(format!(
            "sealing the ring: {}",
            std::io::Error::last_os_error()
        )));
    }
    let page = Page::map(memory.as_fd())?;
    page.word(OFF_MAGIC).store(MAGIC, Ordering::Relaxed);
    page.word(OFF_CHANGES).store(1, Ordering::Relaxed);
    page.word(OFF_VERSION).store(VERSION, Ordering::Release);
    let kick = eventfd()?;
    let reply = eventfd()?;
    let fds = RingFds {
        memory,
        kick: kick
            .try_clone()
            .map_err(|e| RingError::Setup(e.to_string()))?,
        reply: reply
            .try_clone()
            .map_err(|e| RingError::Setup(e.to_string()))?,
    };
    Ok((
        RingClient {
            page: std::sync::Arc::new(page),
            kick,
            reply,
            head: 0,
            timeout,
            window: Window::new(poll),
            mirrors: Vec::new(),
            checked: 0,
            refused_writes: 0,
        },
        fds,
    ))
}

/// The count of doorbells the remote's device took, kept in the ring's
/// page: readable from any thread of either end
/// ([`RingClient::doorbells_taken`], [`RingServer::doorbells_taken`]).
#[derive(Clone)]
pub struct DoorbellsTaken {
    page: std::sync::Arc<Page>,
}

impl DoorbellsTaken {
    /// The count (the remote's word: a value only, never trusted for more
    /// than its own device's checkpoints).
    pub fn load(&self) -> u64 {
        u64::from(self.page.word(OFF_RUNG).load(Ordering::SeqCst))
    }
}

impl RingClient {
    /// The count of doorbells the device took, as the remote keeps it.
    pub fn doorbells_taken(&self) -> DoorbellsTaken {
        DoorbellsTaken {
            page: self.page.clone(),
        }
    }

    /// `tail`, checked: it may never run past what was published.
    fn tail(&self) -> Result<u32, RingError> {
        let tail = self.page.word(OFF_TAIL).load(Ordering::SeqCst);
        if self.head.wrapping_sub(tail) > SLOTS {
            return Err(RingError::Corrupt("tail runs past head"));
        }
        Ok(tail)
    }

    /// Counts the posted writes the device refused among the accesses
    /// applied up to `tail` (each slot is looked at once, before it can be
    /// used again: a slot is reused only after `tail` passed it).
    fn check_applied(&mut self, tail: u32) {
        while self.checked != tail {
            let i = self.checked;
            let kind = self.page.slot(i, F_KIND).load(Ordering::Relaxed) & 0xff;
            if kind == KIND_WRITE
                && self.page.slot(i, F_STATUS).load(Ordering::Acquire) == STATUS_ERROR
            {
                self.refused_writes += 1;
            }
            self.checked = i.wrapping_add(1);
        }
    }

    /// How many posted writes the device refused since the last call
    /// (known once they were applied: after any later wait, or
    /// [`drain`](Self::drain)).
    pub fn take_refused_writes(&mut self) -> u64 {
        std::mem::take(&mut self.refused_writes)
    }

    /// Waits until `done(tail)`; `give_up` is asked while waiting.
    fn wait(
        &mut self,
        done: impl Fn(u32) -> bool,
        give_up: &dyn Fn() -> bool,
    ) -> Result<(), RingError> {
        let t = self.tail()?;
        if done(t) {
            self.check_applied(t);
            return Ok(());
        }
        let start = Instant::now();
        let window = self.window.current;
        while start.elapsed() < window {
            std::thread::yield_now();
            let t = self.tail()?;
            if done(t) {
                self.check_applied(t);
                return Ok(());
            }
        }
        let flag = self.page.word(OFF_CLIENT_SLEEPING);
        loop {
            flag.store(1, Ordering::SeqCst);
            let t = self.tail()?;
            if done(t) {
                flag.store(0, Ordering::Relaxed);
                self.window.slept(start.elapsed());
                self.check_applied(t);
                return Ok(());
            }
            if give_up() {
                flag.store(0, Ordering::Relaxed);
                return Err(RingError::GivenUp);
            }
            let left = self.timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                flag.store(0, Ordering::Relaxed);
                return Err(RingError::Timeout(self.timeout));
            }
            // Wake at least every 50 ms to ask `give_up`.
            sleep_on(self.reply.as_fd(), left.min(Duration::from_millis(50)));
            drain_eventfd(self.reply.as_fd());
        }
    }

    fn publish(
        &mut self,
        kind: u32,
        bar: u8,
        offset: u64,
        data: &[u8],
        give_up: &dyn Fn() -> bool,
    ) -> Result<u32, RingError> {
        if !matches!(data.len(), 1 | 2 | 4 | 8) {
            return Err(RingError::Device);
        }
        // Room for one more.
        let head = self.head;
        self.wait(|tail| head.wrapping_sub(tail) < SLOTS, give_up)?;
        let mut v = [0u8; 8];
        v[..data.len()].copy_from_slice(data);
        let p = &self.page;
        p.slot(head, F_KIND).store(
            kind | u32::from(bar) << 8 | (data.len() as u32) << 16,
            Ordering::Relaxed,
        );
        p.slot(head, F_STATUS).store(STATUS_OK, Ordering::Relaxed);
        p.slot(head, F_OFF_LO)
            .store(offset as u32, Ordering::Relaxed);
        p.slot(head, F_OFF_HI)
            .store((offset >> 32) as u32, Ordering::Relaxed);
        p.store_data(head, &v);
        self.head = head.wrapping_add(1);
        p.word(OFF_HEAD).store(self.head, Ordering::SeqCst);
        if p.word(OFF_SERVER_SLEEPING).load(Ordering::SeqCst) != 0 {
            signal(self.kick.as_fd());
        }
        Ok(head)
    }

    /// A posted BAR write: returns once published.
    pub fn write(
        &mut self,
        bar: u8,
        offset: u64,
        data: &[u8],
        give_up: &dyn Fn() -> bool,
    ) -> Result<(), RingError> {
        self.publish(KIND_WRITE, bar, offset, data, give_up)
            .map(|_| ())
    }

    /// A BAR read: waits for the remote's answer.
    pub fn read(
        &mut self,
        bar: u8,
        offset: u64,
        data: &mut [u8],
        give_up: &dyn Fn() -> bool,
    ) -> Result<(), RingError> {
        let slot = self.publish(KIND_READ, bar, offset, data, give_up)?;
        let want = slot.wrapping_add(1);
        self.wait(|tail| tail.wrapping_sub(want) < SLOTS, give_up)?;
        let p = &self.page;
        match p.slot(slot, F_STATUS).load(Ordering::Acquire) {
            STATUS_OK => {}
            STATUS_ERROR => return Err(RingError::Device),
            _ => return Err(RingError::Corrupt("a status no remote writes")),
        }
        let v = p.load_data(slot);
        let n = data.len();
        data.copy_from_slice(&v[..n]);
        Ok(())
    }

    /// Takes the table of mirrored registers the remote wrote when it set
    /// the ring up (call once the remote said the ring is served). Entries
    /// no well-behaved remote writes (a count past [`MAX_MIRRORS`], a
    /// width other than 1, 2 or 4, a BAR past 5) are refused as a whole.
    pub fn load_mirrors(&mut self) -> Result<&[MirrorKey], RingError> {
        let p = &self.page;
        let count = p.word(OFF_MIRROR_COUNT).load(Ordering::Acquire) as usize;
        if count > MAX_MIRRORS {
            return Err(RingError::Corrupt("more mirrors than the page holds"));
        }
        let mut keys = Vec::with_capacity(count);
        for i in 0..count {
            let key = p.mirror(i, M_KEY).load(Ordering::Relaxed);
            let (bar, len) = ((key & 0xff) as u8, ((key >> 8) & 0xff) as u8);
            if bar > 5 || !matches!(len, 1 | 2 | 4) || key >> 16 != 0 {
                return Err(RingError::Corrupt("a mirror no remote declares"));
            }
            let offset = u64::from(p.mirror(i, M_OFF_LO).load(Ordering::Relaxed))
                | u64::from(p.mirror(i, M_OFF_HI).load(Ordering::Relaxed)) << 32;
            keys.push(MirrorKey { bar, offset, len });
        }
        self.mirrors = keys;
        Ok(&self.mirrors)
    }

    /// Whether the remote declared this register mirrored: a read of it
    /// has no side effect on the device.
    pub fn is_mirrored(&self, bar: u8, offset: u64, len: usize) -> bool {
        self.mirrors
            .iter()
            .any(|k| k.bar == bar && k.offset == offset && usize::from(k.len) == len)
    }

    /// Answers a read from its mirror when there is one and it is current
    /// (see the module docs); `false`: the read must go through the ring.
    pub fn read_mirror(&self, bar: u8, offset: u64, data: &mut [u8]) -> bool {
        let Some(i) = self
            .mirrors
            .iter()
            .position(|k| k.bar == bar && k.offset == offset && usize::from(k.len) == data.len())
        else {
            return false;
        };
        // Every published access applied (and its refresh with it).
        if !matches!(self.tail(), Ok(t) if t == self.head) {
            return false;
        }
        let p = &self.page;
        let changes = p.word(OFF_CHANGES).load(Ordering::SeqCst);
        let valid = p.word(OFF_VALID).load(Ordering::Acquire);
        if valid != changes {
            return false;
        }
        let value = p.mirror(i, M_VALUE).load(Ordering::Acquire);
        if p.word(OFF_VALID).load(Ordering::Acquire) != valid
            || p.word(OFF_CHANGES).load(Ordering::SeqCst) != changes
        {
            return false;
        }
        let n = data.len();
        data.copy_from_slice(&value.to_le_bytes()[..n]);
        true
    }

    /// Waits until the remote has applied every access published so far
    /// (before anything goes on the socket).
    pub fn drain(&mut self, give_up: &dyn Fn() -> bool) -> Result<(), RingError> {
        let head = self.head;
        self.wait(|tail| tail == head, give_up)
    }
}

/// A BAR access the remote runs on its device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// The remote's end.
pub struct RingServer {
    page: std::sync::Arc<Page>,
    kick: std::sync::Arc<OwnedFd>,
    reply: OwnedFd,
    tail: u32,
    window: Window,
    mirrors: Vec<MirrorKey>,
    /// The last sleep ended with nothing to do: the next goes straight
    /// back to sleep, without the poll window (an idle ring costs one
    /// wakeup per stop check, not a spin each time).
    dozing: bool,
    /// Doorbells: eventfds KVM signals when the guest writes their value
    /// ([`RingServer::set_doorbells`]).
    doorbells: Vec<(OwnedFd, DoorbellKey)>,
}

/// A doorbell: the guest writing `value` (`len` bytes) at `offset` of BAR
/// `bar`, delivered without the VMM (KVM signals an eventfd the server
/// waits on beside `kick`) as a write of that value.
///
/// Order: a doorbell found rung is delivered after every access published
/// on the ring by then, so after every access the guest made before it
/// (the VMM publishes an access before the vCPU resumes). Accesses
/// published after it may overtake it, and several rings before the
/// server looks are one delivery: what `plugin_api::Device::doorbells`
/// asks of the writes a device declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DoorbellKey {
    pub bar: u8,
    pub offset: u64,
    pub len: u8,
    pub value: u64,
}

impl DoorbellKey {
    /// Whether a write of `data` (little-endian) at `offset` in BAR `bar`
    /// is this doorbell: same place, width and value.
    pub fn matches(&self, bar: usize, offset: u64, data: &[u8]) -> bool {
        if usize::from(self.bar) != bar
            || self.offset != offset
            || usize::from(self.len) != data.len()
        {
            return false;
        }
        let mut v = [0u8; 8];
        let n = data.len().min(8);
        v[..n].copy_from_slice(&data[..n]);
        u64::from_le_bytes(v) == self.value
    }
}

/// Whether any of `fds` is readable within `timeout` (`None`: now).
fn any_readable(fds: &[BorrowedFd<'_>], timeout: Option<Duration>) -> bool {
    let mut polls: Vec<libc::pollfd> = fds
        .iter()
        .map(|f| libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.map_or(0, |t| {
        i32::try_from(t.as_millis()).unwrap_or(i32::MAX).max(1)
    });
    // SAFETY: `polls` is a live array of `polls.len()` pollfds; poll only
    // writes their `revents`.
    let n = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, ms) };
    n > 0
}

/// Wakes a ring's server out of its sleep (to look at its stop flag).
#[derive(Clone)]
pub struct RingWaker {
    kick: std::sync::Arc<OwnedFd>,
}

impl RingWaker {
    pub fn wake(&self) {
        signal(self.kick.as_fd());
    }
}

/// Whether the VMM's published accesses have all been applied (for the
/// remote's other threads: a state saved while a posted write still waits
/// would miss it).
#[derive(Clone)]
pub struct RingWatch {
    page: std::sync::Arc<Page>,
}

impl RingWatch {
    /// Every access published so far has been applied.
    pub fn drained(&self) -> bool {
        self.page.word(OFF_HEAD).load(Ordering::SeqCst)
            == self.page.word(OFF_TAIL).load(Ordering::SeqCst)
    }
}

/// Tells the VMM that the device changed a mirrored register on its own:
/// bumps `changes` and wakes the ring thread to refresh. Any thread of the
/// remote may hold one; call it before the interrupt that announces the
/// change.
#[derive(Clone)]
pub struct MirrorInvalidator {
    page: std::sync::Arc<Page>,
    kick: std::sync::Arc<OwnedFd>,
}

impl MirrorInvalidator {
    /// The device changed state a mirror shows.
    pub fn invalidate(&self) {
        // +2: `changes` stays odd, never equal to the 0 of a refresh in
        // progress.
        self.page.word(OFF_CHANGES).fetch_add(2, Ordering::SeqCst);
        if self.page.word(OFF_SERVER_SLEEPING).load(Ordering::SeqCst) != 0 {
            signal(self.kick.as_fd());
        }
    }
}

impl RingServer {
    /// Maps the ring the VMM created.
    pub fn new(fds: RingFds, poll: Duration) -> Result<RingServer, RingError> {
        let page = Page::map(fds.memory.as_fd())?;
        if page.word(OFF_MAGIC).load(Ordering::Acquire) != MAGIC
            || page.word(OFF_VERSION).load(Ordering::Acquire) != VERSION
        {
            return Err(RingError::Setup(
                "not an access ring of this version".into(),
            ));
        }
        let tail = page.word(OFF_TAIL).load(Ordering::Acquire);
        Ok(RingServer {
            page: std::sync::Arc::new(page),
            kick: std::sync::Arc::new(fds.kick),
            reply: fds.reply,
            tail,
            window: Window::new(poll),
            mirrors: Vec::new(),
            dozing: false,
            doorbells: Vec::new(),
        })
    }

    /// Delivers the guest's writes of each key's value to the device when
    /// its eventfd (registered by the VMM as a KVM ioeventfd) is signalled
    /// (see [`DoorbellKey`] for the order).
    pub fn set_doorbells(&mut self, doorbells: Vec<(OwnedFd, DoorbellKey)>) {
        self.doorbells = doorbells;
    }

    /// The count of doorbells the device took: the page's word the VMM
    /// reads too ([`RingClient::doorbells_taken`]).
    pub fn doorbells_taken(&self) -> DoorbellsTaken {
        DoorbellsTaken {
            page: self.page.clone(),
        }
    }

    /// Whether a doorbell's eventfd is signalled (one `poll`).
    fn doorbell_pending(&self) -> bool {
        if self.doorbells.is_empty() {
            return false;
        }
        let fds: Vec<BorrowedFd<'_>> = self.doorbells.iter().map(|(f, _)| f.as_fd()).collect();
        any_readable(&fds, None)
    }

    /// Delivers the doorbells rung since the last look, each after every
    /// access published by then. False when none was rung (or the ring
    /// is corrupt: the caller's next look at `head` says so).
    fn ring_doorbells(
        &mut self,
        device: &mut impl FnMut(Access, u8, u64, &mut [u8]) -> bool,
    ) -> bool {
        if !self.doorbell_pending() {
            return false;
        }
        let mut rung = Vec::new();
        for (fd, key) in &self.doorbells {
            let mut v: u64 = 0;
            // SAFETY: reads 8 bytes into a local from a nonblocking
            // eventfd; EAGAIN (not rung) leaves it 0.
            let n = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
            if n == 8 && v > 0 {
                rung.push(*key);
            }
        }
        // Everything the guest did before ringing is published by now.
        let head = self.page.word(OFF_HEAD).load(Ordering::Acquire);
        if head.wrapping_sub(self.tail) > SLOTS {
            return false;
        }
        while self.tail != head {
            self.run_one(device);
        }
        for k in &rung {
            let mut v = k.value.to_le_bytes();
            // Counted before it reaches the device (as the VMM counts an
            // access), taken back if the device refuses it: a save the
            // VMM asked for at the old count is then not current.
            let count = self.page.word(OFF_RUNG);
            count.fetch_add(1, Ordering::SeqCst);
            if !device(Access::Write, k.bar, k.offset, &mut v[..usize::from(k.len)]) {
                count.fetch_sub(1, Ordering::SeqCst);
                tracing::debug!("access ring: the device refused a doorbell");
            }
        }
        self.refresh(device);
        !rung.is_empty()
    }

    /// What wakes this server from another thread.
    pub fn waker(&self) -> RingWaker {
        RingWaker {
            kick: self.kick.clone(),
        }
    }

    /// Declares the mirrored registers (before the VMM is told the ring is
    /// served: it reads the table once, then). At most [`MAX_MIRRORS`];
    /// the rest are left out.
    pub fn set_mirrors(&mut self, keys: &[MirrorKey]) {
        let keys = &keys[..keys.len().min(MAX_MIRRORS)];
        let p = &self.page;
        p.word(OFF_VALID).store(0, Ordering::SeqCst);
        for (i, k) in keys.iter().enumerate() {
            p.mirror(i, M_KEY)
                .store(u32::from(k.bar) | u32::from(k.len) << 8, Ordering::Relaxed);
            p.mirror(i, M_OFF_LO)
                .store(k.offset as u32, Ordering::Relaxed);
            p.mirror(i, M_OFF_HI)
                .store((k.offset >> 32) as u32, Ordering::Relaxed);
        }
        p.word(OFF_MIRROR_COUNT)
            .store(keys.len() as u32, Ordering::Release);
        self.mirrors = keys.to_vec();
    }

    /// A handle other threads use to see whether accesses wait on the ring.
    pub fn watch(&self) -> RingWatch {
        RingWatch {
            page: self.page.clone(),
        }
    }

    /// A handle other threads use to say a mirrored register changed.
    pub fn invalidator(&self) -> MirrorInvalidator {
        MirrorInvalidator {
            page: self.page.clone(),
            kick: self.kick.clone(),
        }
    }

    /// Reads every mirrored register from the device into the page and
    /// marks the mirrors current as of the `changes` seen before reading.
    /// A register the device refuses (a failed device) ends the mirrors
    /// for good: they stay invalid and every read reaches the device.
    fn refresh(&mut self, device: &mut impl FnMut(Access, u8, u64, &mut [u8]) -> bool) {
        if self.mirrors.is_empty() {
            return;
        }
        let p = &self.page;
        let changes = p.word(OFF_CHANGES).load(Ordering::SeqCst);
        p.word(OFF_VALID).store(0, Ordering::SeqCst);
        for (i, k) in self.mirrors.iter().enumerate() {
            let mut v = [0u8; 4];
            let n = usize::from(k.len);
            if !device(Access::Read, k.bar, k.offset, &mut v[..n]) {
                tracing::warn!("access ring: the device refused a mirrored read; mirrors off");
                self.mirrors.clear();
                return;
            }
            p.mirror(i, M_VALUE)
                .store(u32::from_le_bytes(v), Ordering::Release);
        }
        p.word(OFF_VALID).store(changes, Ordering::SeqCst);
    }

    /// Whether the device changed a mirrored register since the last
    /// refresh.
    fn stale(&self) -> bool {
        !self.mirrors.is_empty()
            && self.page.word(OFF_VALID).load(Ordering::SeqCst)
                != self.page.word(OFF_CHANGES).load(Ordering::SeqCst)
    }

    /// Serves accesses until `stop()` says so (asked at least every
    /// `stop_check`). `device(access, bar, offset, data)` runs one access:
    /// for a read it fills `data`; `false` means the device refused it.
    pub fn serve(
        &mut self,
        stop: &dyn Fn() -> bool,
        stop_check: Duration,
        mut device: impl FnMut(Access, u8, u64, &mut [u8]) -> bool,
    ) {
        loop {
            let head = self.page.word(OFF_HEAD).load(Ordering::Acquire);
            if head.wrapping_sub(self.tail) > SLOTS {
                // A VMM that writes this is not ours to serve.
                tracing::error!("access ring: head {head} runs past tail {}", self.tail);
                return;
            }
            if head != self.tail {
                self.run_one(&mut device);
                continue;
            }
            if self.stale() {
                self.refresh(&mut device);
                continue;
            }
            if self.ring_doorbells(&mut device) {
                continue;
            }
            if stop() {
                return;
            }
            self.idle(stop_check);
        }
    }

    fn run_one(&mut self, device: &mut impl FnMut(Access, u8, u64, &mut [u8]) -> bool) {
        let p = &self.page;
        let i = self.tail;
        let word = p.slot(i, F_KIND).load(Ordering::Relaxed);
        let (kind, bar, len) = (word & 0xff, (word >> 8) & 0xff, (word >> 16) as usize);
        let offset = u64::from(p.slot(i, F_OFF_LO).load(Ordering::Relaxed))
            | u64::from(p.slot(i, F_OFF_HI).load(Ordering::Relaxed)) << 32;
        let mut v = p.load_data(i);
        let ok = matches!(len, 1 | 2 | 4 | 8)
            && bar < 6
            && match kind {
                KIND_READ => {
                    let ok = device(Access::Read, bar as u8, offset, &mut v[..len]);
                    p.store_data(i, &v);
                    ok
                }
                KIND_WRITE => device(Access::Write, bar as u8, offset, &mut v[..len]),
                _ => false,
            };
        p.slot(i, F_STATUS)
            .store(if ok { STATUS_OK } else { STATUS_ERROR }, Ordering::Relaxed);
        // Before `tail`: once the VMM sees this access applied, the
        // mirrors show its effect.
        self.refresh(device);
        let p = &self.page;
        self.tail = i.wrapping_add(1);
        p.word(OFF_TAIL).store(self.tail, Ordering::SeqCst);
        if p.word(OFF_CLIENT_SLEEPING).load(Ordering::SeqCst) != 0 {
            signal(self.reply.as_fd());
        }
    }

    /// Nothing to do: poll for the window, then sleep on `kick`.
    fn idle(&mut self, stop_check: Duration) {
        let start = Instant::now();
        // SeqCst: the look after raising the sleeping flag must not be
        // ordered before it (the producer publishes, then looks at the
        // flag: one of the two sees the other).
        let pending = |s: &Self| {
            s.page.word(OFF_HEAD).load(Ordering::SeqCst) != s.tail
                || s.stale()
                || s.doorbell_pending()
        };
        if !self.dozing {
            while start.elapsed() < self.window.current {
                std::thread::yield_now();
                if pending(self) {
                    return;
                }
            }
        }
        let flag = self.page.word(OFF_SERVER_SLEEPING);
        flag.store(1, Ordering::SeqCst);
        if !pending(self) {
            if self.doorbells.is_empty() {
                sleep_on(self.kick.as_fd(), stop_check);
            } else {
                let mut fds = vec![self.kick.as_fd()];
                fds.extend(self.doorbells.iter().map(|(f, _)| f.as_fd()));
                any_readable(&fds, Some(stop_check));
            }
            drain_eventfd(self.kick.as_fd());
        }
        flag.store(0, Ordering::Relaxed);
        if pending(self) {
            self.window.slept(start.elapsed());
            self.dozing = false;
        } else {
            self.dozing = true;
        }
    }
}

#[cfg(test)]
mod tests;
