//! The monitor server: a UNIX socket, a thread pair per client, the QMP
//! session (greeting, capabilities negotiation, dispatch) and event
//! broadcast.
//!
//! Threads: one acceptor (polls the listening socket and a wake-up
//! socket), and per client a reader (reads, parses, runs the command,
//! queues the reply) and a writer (writes queued replies and events in
//! order). Events are queued without blocking, so [`EventSender::emit`]
//! never waits for a client; a client whose queue is full (it stopped
//! reading) or whose socket stays unwritable past the write timeout is
//! disconnected.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::commands::{Arguments, Commands, ErrorClass, QmpError};
use crate::input::{Framer, Input};

/// Commands the server answers itself, whatever the [`Commands`] say.
pub const BUILTIN_COMMANDS: [&str; 3] = ["qmp_capabilities", "query-commands", "query-version"];

/// The version the greeting and `query-version` report (QEMU's
/// `VersionInfo`). QMP clients only display it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct QemuVersion {
    pub micro: u32,
    pub minor: u32,
    pub major: u32,
}

/// Settings of a [`Server`]; `Default` gives the values documented on each
/// field.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// The greeting's `version.package`; default
    /// `"rust-vmm-remote qmp-<crate version>"`.
    pub package: String,
    /// The greeting's `version.qemu`; default 0.0.0.
    pub version: QemuVersion,
    /// Bytes a client may send without completing a JSON value before it is
    /// disconnected; default 1 MiB.
    pub max_input: usize,
    /// Clients connected at once; more are closed at accept; default 16.
    pub max_clients: usize,
    /// Replies and events queued for one client; a client whose queue is
    /// full when an event comes is disconnected; default 256.
    pub max_queued: usize,
    /// How long one write to a client may block; default 5 s.
    pub write_timeout: Duration,
    /// How long [`Server::shutdown`] waits for client threads (a command
    /// still running, a reply still being written); default 3 s.
    pub shutdown_timeout: Duration,
    /// Permissions of the socket file; default `Some(0o600)` (the monitor
    /// can stop the VM); `None` leaves what the umask gave.
    pub socket_mode: Option<u32>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            package: format!("rust-vmm-remote qmp-{}", env!("CARGO_PKG_VERSION")),
            version: QemuVersion::default(),
            max_input: 1 << 20,
            max_clients: 16,
            max_queued: 256,
            write_timeout: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(3),
            socket_mode: Some(0o600),
        }
    }
}

/// What a client's writer thread is given.
enum Out {
    Line(Arc<str>),
    /// Write nothing more and hang up (after what was queued before).
    Close,
}

struct ClientSlot {
    server: u64,
    negotiated: Arc<AtomicBool>,
    tx: SyncSender<Out>,
    /// A clone of the client's socket, to disconnect it from outside.
    stream: UnixStream,
}

/// Hears every event emitted, in the emitting thread (keep it short).
pub type EventListener = Arc<dyn Fn(&str, &Value) + Send + Sync>;

#[derive(Default)]
struct Hub {
    clients: Mutex<HashMap<u64, ClientSlot>>,
    next_client: AtomicU64,
    next_server: AtomicU64,
    listeners: Mutex<Vec<EventListener>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Sends asynchronous events to every negotiated client of the servers it
/// was given to. Cheap to clone, usable from any thread; create it before
/// the [`Commands`] implementation if commands emit events, and pass it to
/// [`Server::bind_with`].
#[derive(Clone, Default)]
pub struct EventSender {
    hub: Arc<Hub>,
}

impl std::fmt::Debug for EventSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSender")
            .field("clients", &lock(&self.hub.clients).len())
            .finish()
    }
}

#[derive(Serialize)]
struct Timestamp {
    seconds: u64,
    microseconds: u32,
}

#[derive(Serialize)]
struct EventMsg<'a> {
    event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a Value>,
    timestamp: Timestamp,
}

impl EventSender {
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues `{"event": name, "data": data, "timestamp": ...}` for every
    /// client that has completed negotiation, and returns how many that
    /// was. `data` should be an object; `Value::Null` leaves `data` out (as
    /// QEMU does for events without data, e.g. `STOP`). Never blocks on a
    /// client: one that is too far behind is disconnected instead.
    /// Adds a listener inside this process: it hears every event before
    /// the clients do (the VMM reacts to its own events this way, e.g. a
    /// device's failure).
    pub fn listen(&self, f: EventListener) {
        lock(&self.hub.listeners).push(f);
    }

    pub fn emit(&self, name: &str, data: Value) -> usize {
        let listeners = lock(&self.hub.listeners).clone();
        for l in &listeners {
            l(name, &data);
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let msg = EventMsg {
            event: name,
            data: (!data.is_null()).then_some(&data),
            timestamp: Timestamp {
                seconds: now.as_secs(),
                microseconds: now.subsec_micros(),
            },
        };
        let line: Arc<str> = match serde_json::to_string(&msg) {
            Ok(mut s) => {
                s.push('\n');
                s.into()
            }
            Err(e) => {
                tracing::error!("qmp: event {name} not serialisable: {e}");
                return 0;
            }
        };
        let clients = lock(&self.hub.clients);
        let mut sent = 0;
        for (id, c) in clients.iter() {
            if !c.negotiated.load(Ordering::Acquire) {
                continue;
            }
            match c.tx.try_send(Out::Line(line.clone())) {
                Ok(()) => sent += 1,
                Err(TrySendError::Full(_)) => {
                    tracing::warn!("qmp: client {id} does not read its events; disconnecting it");
                    let _ = c.stream.shutdown(std::net::Shutdown::Both);
                }
                Err(TrySendError::Disconnected(_)) => {}
            }
        }
        tracing::debug!("qmp: event {name} sent to {sent} client(s)");
        sent
    }
}

/// Counts a server's live threads, so that shutdown can wait for them.
#[derive(Default)]
struct Live {
    count: Mutex<usize>,
    cv: Condvar,
}

struct LiveGuard(Arc<Live>);

impl LiveGuard {
    fn new(live: &Arc<Live>) -> Self {
        *lock(&live.count) += 1;
        LiveGuard(live.clone())
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        let mut n = lock(&self.0.count);
        *n = n.saturating_sub(1);
        self.0.cv.notify_all();
    }
}

/// What a client thread needs of its server.
struct Shared {
    id: u64,
    commands: Arc<dyn Commands>,
    options: ServerOptions,
    hub: Arc<Hub>,
    live: Arc<Live>,
    greeting: Arc<str>,
}

/// A QMP monitor listening on a UNIX socket. Dropping it is
/// [`Server::shutdown`].
pub struct Server {
    shared: Arc<Shared>,
    path: PathBuf,
    /// (dev, ino) of the socket we created, so that we only remove our own.
    inode: (u64, u64),
    stopping: Arc<AtomicBool>,
    wake: UnixStream,
    acceptor: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("path", &self.path)
            .field("clients", &self.client_count())
            .finish()
    }
}

/// Removes a stale socket at `path`; refuses a live one and any other kind
/// of file.
fn clear_path(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{}: a server is listening on this socket", path.display()),
            )),
            Err(_) => {
                tracing::info!("qmp: removing stale socket {}", path.display());
                fs::remove_file(path)
            }
        },
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{}: exists and is not a socket", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Listens on `path` with the socket file at `mode` from the moment it
/// is there: bound in a new 0700 directory beside `path` (where nobody
/// else can reach it while its mode is the umask's), given `mode`, then
/// renamed into place.
fn bind_with_mode(path: &Path, mode: u32) -> io::Result<UnixListener> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let template = parent.join(".qmp-XXXXXX");
    let mut buf = std::ffi::CString::new(template.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the socket path"))?
        .into_bytes_with_nul();
    // SAFETY: mkdtemp rewrites the template's trailing XXXXXX in place in
    // our NUL-terminated buffer and makes the directory with mode 0700.
    if unsafe { libc::mkdtemp(buf.as_mut_ptr().cast()) }.is_null() {
        return Err(io::Error::last_os_error());
    }
    buf.pop();
    let dir = PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(buf));
    let inner = dir.join("qmp.sock");
    let made = UnixListener::bind(&inner).and_then(|l| {
        fs::set_permissions(&inner, fs::Permissions::from_mode(mode))?;
        fs::rename(&inner, path)?;
        Ok(l)
    });
    let _ = fs::remove_file(&inner);
    let _ = fs::remove_dir(&dir);
    made
}

impl Server {
    /// Listens on `path` with default options and a new [`EventSender`]
    /// (see [`Server::events`]).
    pub fn bind(path: impl AsRef<Path>, commands: Arc<dyn Commands>) -> io::Result<Server> {
        Self::bind_with(path, commands, ServerOptions::default(), EventSender::new())
    }

    /// Listens on `path`: a stale socket there is replaced, a socket with a
    /// live server or a file of another kind is an error. Events sent
    /// through `events` (and its clones) reach this server's clients; one
    /// `EventSender` may serve several servers.
    pub fn bind_with(
        path: impl AsRef<Path>,
        commands: Arc<dyn Commands>,
        options: ServerOptions,
        events: EventSender,
    ) -> io::Result<Server> {
        let path = path.as_ref().to_path_buf();
        clear_path(&path)?;
        let listener = match options.socket_mode {
            None => UnixListener::bind(&path)?,
            Some(mode) => bind_with_mode(&path, mode)?,
        };
        let meta = fs::symlink_metadata(&path)?;
        listener.set_nonblocking(true)?;
        let (wake, wake_rx) = UnixStream::pair()?;

        let greeting = json!({
            "QMP": {
                "version": { "qemu": options.version, "package": options.package },
                "capabilities": [],
            }
        });
        let hub = events.hub;
        let shared = Arc::new(Shared {
            id: hub.next_server.fetch_add(1, Ordering::Relaxed),
            commands,
            options,
            greeting: format!("{greeting}\n").into(),
            hub,
            live: Arc::new(Live::default()),
        });
        let stopping = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let shared = shared.clone();
            let stopping = stopping.clone();
            std::thread::Builder::new()
                .name("qmp-accept".into())
                .spawn(move || accept_loop(&listener, &wake_rx, &stopping, &shared))?
        };
        tracing::info!("qmp: monitor listening on {}", path.display());
        Ok(Server {
            shared,
            path,
            inode: (meta.dev(), meta.ino()),
            stopping,
            wake,
            acceptor: Some(acceptor),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A sender for this server's events (the one given to
    /// [`Server::bind_with`], or the one [`Server::bind`] created).
    pub fn events(&self) -> EventSender {
        EventSender {
            hub: self.shared.hub.clone(),
        }
    }

    /// Clients connected now.
    pub fn client_count(&self) -> usize {
        lock(&self.shared.hub.clients)
            .values()
            .filter(|c| c.server == self.shared.id)
            .count()
    }

    /// Stops accepting, lets every client's running command finish and its
    /// queued replies and events be written, hangs up, and removes the
    /// socket file. Waits at most `shutdown_timeout` for the clients.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(acceptor) = self.acceptor.take() else {
            return;
        };
        self.stopping.store(true, Ordering::Release);
        let _ = io::Write::write_all(&mut self.wake, b"x");
        if acceptor.join().is_err() {
            tracing::error!("qmp: acceptor thread panicked");
        }
        // Readers see end of input, finish what they were doing and tell
        // their writers to close after the queued replies.
        let streams: Vec<UnixStream> = lock(&self.shared.hub.clients)
            .values()
            .filter(|c| c.server == self.shared.id)
            .filter_map(|c| c.stream.try_clone().ok())
            .collect();
        for s in &streams {
            let _ = s.shutdown(std::net::Shutdown::Read);
        }
        let deadline = Instant::now() + self.shared.options.shutdown_timeout;
        let live = &self.shared.live;
        let mut n = lock(&live.count);
        while *n > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!("qmp: {} client thread(s) still busy at shutdown", *n);
                for s in &streams {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
                break;
            }
            n = live
                .cv
                .wait_timeout(n, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        drop(n);
        if let Ok(m) = fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.inode {
                let _ = fs::remove_file(&self.path);
            }
        }
        tracing::info!("qmp: monitor on {} closed", self.path.display());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn poll_readable(fds: &mut [libc::pollfd]) -> io::Result<()> {
    loop {
        // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd of
        // the given length for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if r >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn accept_loop(
    listener: &UnixListener,
    wake: &UnixStream,
    stopping: &AtomicBool,
    shared: &Arc<Shared>,
) {
    let mut fds = [
        libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        if let Err(e) = poll_readable(&mut fds) {
            tracing::error!("qmp: poll failed, no more clients accepted: {e}");
            return;
        }
        if stopping.load(Ordering::Acquire) {
            return;
        }
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = start_client(stream, shared) {
                        tracing::warn!("qmp: could not start a client: {e}");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // E.g. EMFILE: do not spin; the next poll retries.
                    tracing::warn!("qmp: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
            }
        }
    }
}

fn start_client(stream: UnixStream, shared: &Arc<Shared>) -> io::Result<()> {
    let hub = &shared.hub;
    let count = lock(&hub.clients)
        .values()
        .filter(|c| c.server == shared.id)
        .count();
    if count >= shared.options.max_clients {
        tracing::warn!(
            "qmp: refusing a client: {} already connected",
            shared.options.max_clients
        );
        return Ok(());
    }
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(shared.options.write_timeout))?;
    let id = hub.next_client.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = sync_channel(shared.options.max_queued.max(1));
    let _ = tx.try_send(Out::Line(shared.greeting.clone()));
    let negotiated = Arc::new(AtomicBool::new(false));
    lock(&hub.clients).insert(
        id,
        ClientSlot {
            server: shared.id,
            negotiated: negotiated.clone(),
            tx: tx.clone(),
            stream: stream.try_clone()?,
        },
    );
    let spawned = (|| {
        let writer_stream = stream.try_clone()?;
        let guard = LiveGuard::new(&shared.live);
        std::thread::Builder::new()
            .name(format!("qmp-write-{id}"))
            .spawn(move || {
                writer_loop(&writer_stream, rx);
                drop(guard);
            })?;
        let guard = LiveGuard::new(&shared.live);
        let shared2 = shared.clone();
        std::thread::Builder::new()
            .name(format!("qmp-read-{id}"))
            .spawn(move || {
                reader_loop(stream, &tx, &negotiated, &shared2, id);
                drop(guard);
            })?;
        io::Result::Ok(())
    })();
    if let Err(e) = spawned {
        if let Some(slot) = lock(&hub.clients).remove(&id) {
            let _ = slot.stream.shutdown(std::net::Shutdown::Both);
        }
        return Err(e);
    }
    tracing::debug!("qmp: client {id} connected");
    Ok(())
}

/// write(2) without SIGPIPE, whatever the process does with that signal.
fn send_all(stream: &UnixStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: the fd is owned by `stream` and open for the call; `buf`
        // is a valid readable slice of `buf.len()` bytes.
        let n = unsafe {
            libc::send(
                stream.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

fn writer_loop(stream: &UnixStream, rx: Receiver<Out>) {
    for out in rx.iter() {
        match out {
            Out::Line(line) => {
                if let Err(e) = send_all(stream, line.as_bytes()) {
                    tracing::debug!("qmp: client write failed ({e}); disconnecting it");
                    break;
                }
            }
            Out::Close => break,
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

fn reader_loop(
    mut stream: UnixStream,
    tx: &SyncSender<Out>,
    negotiated: &AtomicBool,
    shared: &Shared,
    id: u64,
) {
    let mut framer = Framer::new(shared.options.max_input);
    let mut buf = vec![0u8; 64 * 1024];
    'conn: loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::debug!("qmp: client {id} read failed: {e}");
                break;
            }
        };
        let inputs = match framer.push(&buf[..n]) {
            Ok(inputs) => inputs,
            Err(over) => {
                tracing::warn!(
                    "qmp: client {id} sent {} bytes without a complete JSON value; disconnecting it",
                    over.0
                );
                break;
            }
        };
        for input in inputs {
            let (reply, now_negotiated) = match input {
                Input::Value(v) => catch_unwind(AssertUnwindSafe(|| {
                    handle_request(v, negotiated.load(Ordering::Acquire), shared)
                }))
                .unwrap_or_else(|_| {
                    tracing::error!("qmp: request handling panicked (client {id})");
                    let e = QmpError::generic("Internal error: the command failed");
                    (error_reply(None, &e), false)
                }),
                Input::ParseError(desc) => (error_reply(None, &QmpError::generic(desc)), false),
            };
            if !now_negotiated {
                if tx.send(Out::Line(reply.into())).is_err() {
                    break 'conn;
                }
                continue;
            }
            // The reply to qmp_capabilities: no event may overtake it
            // (qemu.qmp, for one, expects that reply next), and none
            // emitted once the client can have read it may be missed. So
            // it is queued and the client marked negotiated under the lock
            // `emit` holds: every event goes either before both (and is
            // not for this client) or after both.
            let clients = lock(&shared.hub.clients);
            match tx.try_send(Out::Line(reply.into())) {
                Ok(()) => negotiated.store(true, Ordering::Release),
                Err(TrySendError::Full(out)) => {
                    // Replies this client does not read fill its queue:
                    // wait for room without holding up `emit`.
                    drop(clients);
                    if tx.send(out).is_err() {
                        break 'conn;
                    }
                    negotiated.store(true, Ordering::Release);
                }
                Err(TrySendError::Disconnected(_)) => break 'conn,
            }
        }
    }
    lock(&shared.hub.clients).remove(&id);
    let _ = tx.send(Out::Close);
    tracing::debug!("qmp: client {id} disconnected");
}

fn reply_line(mut obj: Map<String, Value>, id: Option<Value>) -> String {
    if let Some(id) = id {
        obj.insert("id".into(), id);
    }
    let mut s = Value::Object(obj).to_string();
    s.push('\n');
    s
}

fn error_reply(id: Option<Value>, e: &QmpError) -> String {
    let mut m = Map::new();
    m.insert(
        "error".into(),
        json!({ "class": e.class.as_str(), "desc": e.desc }),
    );
    reply_line(m, id)
}

fn return_reply(id: Option<Value>, v: Value) -> String {
    let mut m = Map::new();
    m.insert("return".into(), v);
    reply_line(m, id)
}

/// One request to its reply line, with QEMU's checks and wording
/// (qapi/qmp-dispatch.c, monitor/qmp.c); `true` when this request completed
/// capabilities negotiation.
fn handle_request(request: Value, negotiated: bool, shared: &Shared) -> (String, bool) {
    let Value::Object(req) = request else {
        let e = QmpError::generic("QMP input must be a JSON object");
        return (error_reply(None, &e), false);
    };
    let id = req.get("id").cloned();
    match run_request(&req, negotiated, shared) {
        Ok(v) => (return_reply(id, v), !negotiated),
        Err(e) => (error_reply(id, &e), false),
    }
}

/// Runs one request; before negotiation, success means `qmp_capabilities`
/// succeeded.
fn run_request(
    req: &Map<String, Value>,
    negotiated: bool,
    shared: &Shared,
) -> Result<Value, QmpError> {
    let mut name = None;
    let mut args = None;
    for (key, value) in req {
        match (key.as_str(), value) {
            ("execute", Value::String(s)) => name = Some(s.as_str()),
            ("execute", _) => {
                return Err(QmpError::generic(
                    "QMP input member 'execute' must be a string",
                ))
            }
            ("arguments", Value::Object(a)) => args = Some(a),
            ("arguments", _) => {
                return Err(QmpError::generic(
                    "QMP input member 'arguments' must be an object",
                ))
            }
            ("id", _) => {}
            // exec-oob included: out-of-band execution is never offered.
            (other, _) => {
                return Err(QmpError::generic(format!(
                    "QMP input member '{other}' is unexpected"
                )))
            }
        }
    }
    let Some(name) = name else {
        return Err(QmpError::generic("QMP input lacks member 'execute'"));
    };
    let empty = Map::new();
    let args = args.unwrap_or(&empty);

    if !negotiated {
        if name != "qmp_capabilities" {
            return Err(QmpError::new(
                ErrorClass::CommandNotFound,
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ));
        }
        qmp_capabilities(args)?;
        return Ok(json!({}));
    }
    match name {
        "qmp_capabilities" => Err(QmpError::new(
            ErrorClass::CommandNotFound,
            "Capabilities negotiation is already complete, command ignored",
        )),
        "query-commands" => {
            args.allow_only(&[])?;
            let mut names: Vec<String> = BUILTIN_COMMANDS.iter().map(|s| s.to_string()).collect();
            for n in shared.commands.command_names() {
                if !names.contains(&n) {
                    names.push(n);
                }
            }
            Ok(Value::Array(
                names.into_iter().map(|n| json!({ "name": n })).collect(),
            ))
        }
        "query-version" => {
            args.allow_only(&[])?;
            Ok(json!({ "qemu": shared.options.version, "package": shared.options.package }))
        }
        _ => {
            if !shared.commands.command_names().iter().any(|n| n == name) {
                return Err(QmpError::command_not_found(name));
            }
            catch_unwind(AssertUnwindSafe(|| shared.commands.execute(name, args))).unwrap_or_else(
                |_| {
                    tracing::error!("qmp: command {name} panicked");
                    Err(QmpError::generic("Internal error: the command failed"))
                },
            )
        }
    }
}

/// `qmp_capabilities [enable: [QMPCapability]]`; the only capability QEMU
/// defines, `oob`, is not offered.
fn qmp_capabilities(args: &Map<String, Value>) -> Result<(), QmpError> {
    args.allow_only(&["enable"])?;
    let Some(enable) = args.opt_array("enable")? else {
        return Ok(());
    };
    let mut unavailable = Vec::new();
    for (i, cap) in enable.iter().enumerate() {
        match cap {
            Value::String(s) if s == "oob" => unavailable.push(s.as_str()),
            Value::String(s) => {
                return Err(QmpError::generic(format!(
                    "Parameter 'enable[{i}]' does not accept value '{s}'"
                )))
            }
            _ => {
                return Err(QmpError::invalid_parameter_type(
                    &format!("enable[{i}]"),
                    "string",
                ))
            }
        }
    }
    if unavailable.is_empty() {
        Ok(())
    } else {
        Err(QmpError::generic(format!(
            "Capability {} not available",
            unavailable.join(", ")
        )))
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
