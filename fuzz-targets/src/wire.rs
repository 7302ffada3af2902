//! A peer on the other end of a socket: sends a fuzz input as messages
//! (with file descriptors where the input asks for them) while a server
//! reads them, drains whatever the server answers, and closes its sending
//! side at the end, so every server loop ends at EOF.

use std::fs::File;
use std::io::Read;
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::OnceLock;
use std::time::Duration;

use channel::Framed;

/// One message as the peer sends it: bytes, and fds on its first byte.
pub(crate) struct Chunk {
    pub data: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// The kinds of fd a fuzz input can attach to a message.
#[derive(Clone, Copy, Debug)]
pub(crate) enum FdKind {
    /// Guest RAM as the VMM shares it: a sealed 1 MiB memfd.
    SealedRam,
    /// An unsealed 8 KiB memfd (a peer that lies about sizes, or could
    /// truncate it).
    SmallRam,
    /// An eventfd (irqfd, resample or unmask fd).
    Eventfd,
    /// A socket: neither memory nor an eventfd.
    Socket,
}

impl FdKind {
    pub(crate) fn from_bits(b: u32) -> FdKind {
        match b & 3 {
            0 => FdKind::SealedRam,
            1 => FdKind::SmallRam,
            2 => FdKind::Eventfd,
            _ => FdKind::Socket,
        }
    }
}

/// Size of [`FdKind::SealedRam`].
pub(crate) const RAM_SIZE: u64 = 1 << 20;

fn memfd(size: u64, seal: bool) -> OwnedFd {
    // SAFETY: memfd_create with a valid NUL-terminated name; the result is
    // checked and then owned by the File.
    let file = unsafe {
        let fd = libc::memfd_create(
            c"fuzz-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        );
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        File::from_raw_fd(fd)
    };
    if let Err(e) = file.set_len(size) {
        panic!("memfd set_len: {e}");
    }
    if seal {
        // SAFETY: F_ADD_SEALS on our own memfd; no memory is involved.
        let r = unsafe {
            libc::fcntl(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
            )
        };
        assert!(r == 0, "F_ADD_SEALS: {}", std::io::Error::last_os_error());
    }
    OwnedFd::from(file)
}

/// A new fd of `kind`.
pub(crate) fn make_fd(kind: FdKind) -> OwnedFd {
    match kind {
        FdKind::SealedRam => memfd(RAM_SIZE, true),
        FdKind::SmallRam => memfd(8 << 10, false),
        FdKind::Eventfd => {
            // SAFETY: eventfd returns a new fd (checked) that the OwnedFd owns.
            unsafe {
                let fd = libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK);
                assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
                OwnedFd::from_raw_fd(fd)
            }
        }
        FdKind::Socket => dead_socket(),
    }
}

/// A UNIX socket whose peer has hung up. Every one is a copy (`dup`) of
/// the same socket: its peer gone, nothing a target does to it (read:
/// end of stream; write: a broken pipe) changes what the next input
/// sees, and a new socket pair per fd was most of the time of inputs
/// that attach many (creating and freeing a socket's inode costs tens
/// of microseconds).
fn dead_socket() -> OwnedFd {
    static SOCKET: OnceLock<UnixStream> = OnceLock::new();
    let s = SOCKET.get_or_init(|| match UnixStream::pair() {
        Ok((a, _b)) => a,
        Err(e) => panic!("socketpair: {e}"),
    });
    match s.as_fd().try_clone_to_owned() {
        Ok(fd) => fd,
        Err(e) => panic!("dup: {e}"),
    }
}

/// Cuts `data` into messages the way a framed reader would: a header of
/// `header_len` bytes, whose `size_of` is the whole message; a size below
/// the header or past the end takes the rest of the input (the server
/// then refuses it or sees it cut short). `fds` says what the peer
/// attaches to a message, from its header.
pub(crate) fn split(
    data: &[u8],
    header_len: usize,
    size_of: fn(&[u8]) -> usize,
    fds: impl Fn(&[u8]) -> Vec<OwnedFd>,
) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let n = if rest.len() < header_len {
            rest.len()
        } else {
            let size = size_of(&rest[..header_len]);
            if size < header_len || size > rest.len() {
                rest.len()
            } else {
                size
            }
        };
        let (msg, tail) = rest.split_at(n);
        let attached = if msg.len() >= header_len {
            fds(&msg[..header_len])
        } else {
            Vec::new()
        };
        chunks.push(Chunk {
            data: msg.to_vec(),
            fds: attached,
        });
        rest = tail;
    }
    chunks
}

/// Work for one of this thread's peer threads.
type Job = Box<dyn FnOnce() + Send>;

/// A thread kept for the jobs of the thread that made it: a peer's two
/// sides (sending, draining) each run on one, made once per fuzzing
/// thread, because spawning two threads per input was a fifth of the
/// `mpqemu` and `control` targets' time (`clone3`, in `perf`). Per
/// calling thread, not shared: tests run exchanges side by side, and one
/// exchange's job queued behind another's could wait for it forever.
struct Helper(std::sync::mpsc::Sender<Job>);

impl Helper {
    fn new(name: &str) -> Helper {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                // Ends when the calling thread (and its sender) is gone.
                for job in rx {
                    job();
                }
            });
        if let Err(e) = spawned {
            panic!("cannot start the peer's {name} thread: {e}");
        }
        Helper(tx)
    }

    /// Runs `job` on the helper; the receiver hears when it is done.
    fn run(&self, job: impl FnOnce() + Send + 'static) -> std::sync::mpsc::Receiver<()> {
        let (done, finished) = std::sync::mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            job();
            let _ = done.send(());
        });
        if self.0.send(job).is_err() {
            panic!("the peer's thread is gone");
        }
        finished
    }
}

thread_local! {
    static SENDER: Helper = Helper::new("peer-send");
    static DRAIN: Helper = Helper::new("peer-drain");
}

/// Runs `serve` on one end of a socket pair while the other end sends
/// `chunks` (then shuts its sending side) and reads every reply.
/// Returns once `serve` has returned and the peer's jobs have ended.
pub(crate) fn exchange(chunks: Vec<Chunk>, serve: impl FnOnce(UnixStream)) {
    let (ours, theirs) = match UnixStream::pair() {
        Ok(p) => p,
        Err(e) => panic!("socketpair: {e}"),
    };
    let reader = match ours.try_clone() {
        Ok(r) => r,
        Err(e) => panic!("dup: {e}"),
    };
    let writer = SENDER.with(|h| {
        h.run(move || {
            let framed = Framed::new(ours);
            for c in &chunks {
                let fds: Vec<BorrowedFd<'_>> = c.fds.iter().map(|f| f.as_fd()).collect();
                // The server may stop reading at any point (a protocol
                // error closes its end): then the rest is not sent.
                if c.data.is_empty() || framed.send(&c.data, &fds, Duration::from_secs(5)).is_err()
                {
                    break;
                }
            }
            let _ = framed.socket().shutdown(Shutdown::Write);
        })
    });
    let drain = DRAIN.with(|h| {
        h.run(move || {
            let mut buf = vec![0u8; 64 << 10];
            let mut r = &reader;
            while matches!(r.read(&mut buf), Ok(n) if n > 0) {}
        })
    });
    serve(theirs);
    // A job that panicked drops its sender unsent: the wait ends anyway.
    let _ = writer.recv();
    let _ = drain.recv();
}

/// Makes a reply fit its request (the request's header) before it goes.
pub(crate) type Fit = Box<dyn Fn(&[u8], &mut Chunk) + Send>;

/// How a client target's peer reads requests and answers them.
pub(crate) struct Answering {
    /// The protocol's header size, and its whole-message size from it.
    pub header_len: usize,
    pub size_of: fn(&[u8]) -> usize,
    /// The largest request read; a larger one ends the session.
    pub max_request: usize,
    /// Whether a request (its header) waits for a reply.
    pub wants_reply: fn(&[u8]) -> bool,
    pub fit: Fit,
}

/// Reads one request (bounded); its header, or `None` at the end.
fn read_request(sock: &UnixStream, how: &Answering) -> Option<Vec<u8>> {
    let mut head = vec![0u8; how.header_len];
    let mut r = sock;
    r.read_exact(&mut head).ok()?;
    let size = (how.size_of)(&head);
    if !(how.header_len..=how.max_request).contains(&size) {
        return None;
    }
    let mut rest = vec![0u8; size - how.header_len];
    r.read_exact(&mut rest).ok()?;
    Some(head)
}

/// Plays a server that answers each request that wants a reply with the
/// next of `replies`, until either runs out; then hangs up. Returns how
/// many replies it sent.
fn answer_requests(sock: UnixStream, replies: Vec<Chunk>, how: Answering) -> usize {
    if sock.set_read_timeout(Some(Duration::from_secs(2))).is_err() {
        return 0;
    }
    let framed = Framed::new(sock);
    let mut sent = 0;
    let mut replies = replies.into_iter().peekable();
    while let Some(req) = read_request(framed.socket(), &how) {
        if !(how.wants_reply)(&req) {
            continue;
        }
        let Some(mut reply) = replies.next() else {
            break;
        };
        (how.fit)(&req, &mut reply);
        let fds: Vec<BorrowedFd<'_>> = reply.fds.iter().map(|f| f.as_fd()).collect();
        if reply.data.is_empty()
            || framed
                .send(&reply.data, &fds, Duration::from_secs(2))
                .is_err()
        {
            break;
        }
        sent += 1;
        // After the last one, hang up at once: a client waiting for more
        // (a reply cut short) sees the end instead of its timeout.
        if replies.peek().is_none() {
            break;
        }
    }
    let _ = framed.socket().shutdown(Shutdown::Both);
    sent
}

/// Runs the client `session` on one end of a socket pair while the other
/// end answers it with `replies` ([`Answering`]). Returns the replies sent
/// and those there were.
pub(crate) fn client_session(
    replies: Vec<Chunk>,
    how: Answering,
    session: impl FnOnce(UnixStream),
) -> (usize, usize) {
    let total = replies.len();
    let (ours, theirs) = match UnixStream::pair() {
        Ok(p) => p,
        Err(e) => panic!("socketpair: {e}"),
    };
    let peer = std::thread::spawn(move || answer_requests(theirs, replies, how));
    // Every wait of the clients is bounded by their own timeout.
    crate::timed("a client session", || session(ours));
    (peer.join().unwrap_or(0), total)
}
