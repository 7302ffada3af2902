//! Where the UART's bytes go: a UNIX socket a user connects to (`socat`,
//! `screen` through `socat PTY,...`) and an output file.
//!
//! Nothing here ever blocks the guest. The UART writes into a bounded
//! queue ([`OutQueue`]); a thread of the device empties it into the file
//! and the connected client, and a full queue (a client that does not
//! read) drops bytes and counts them. Input is read by another thread,
//! one client at a time, and queued into the UART's 64-byte FIFO as the
//! guest makes room: a guest that does not read holds the client back
//! through the socket's own buffer, never through memory of ours.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// Output bytes held for the file and the client at most; more are dropped.
pub const OUT_QUEUE_BYTES: usize = 1 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The guest's output on its way out.
#[derive(Default)]
pub struct Output {
    queue: Mutex<VecDeque<u8>>,
    ready: Condvar,
    stop: AtomicBool,
    /// Bytes dropped because the queue was full.
    pub dropped: AtomicU64,
}

/// The UART's writer: appends to [`Output`]'s queue, never blocks.
#[derive(Clone, Default)]
pub struct OutQueue(pub Arc<Output>);

impl Write for OutQueue {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut q = lock(&self.0.queue);
        let room = OUT_QUEUE_BYTES.saturating_sub(q.len());
        let kept = buf.len().min(room);
        q.extend(&buf[..kept]);
        if kept < buf.len() {
            self.0
                .dropped
                .fetch_add((buf.len() - kept) as u64, Ordering::Relaxed);
        }
        drop(q);
        self.0.ready.notify_one();
        // Accepted whole: a UART cannot tell the guest it is busy.
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The client connected to the socket now, if any: the output thread
/// writes to it, the input thread reads from it.
#[derive(Default)]
pub struct Client(Mutex<Option<UnixStream>>);

impl Client {
    fn set(&self, s: Option<UnixStream>) {
        if let Some(old) = std::mem::replace(&mut *lock(&self.0), s) {
            let _ = old.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Where input bytes go: the device queues them into its UART. Returns how
/// many it took (0 when the FIFO is full); waits for room is the caller's.
pub trait Input: Send + Sync + 'static {
    /// Queues what fits of `bytes` into the receive FIFO.
    fn push(&self, bytes: &[u8]) -> usize;
    /// Waits up to `t` for the guest to read from the FIFO.
    fn wait_room(&self, t: Duration);
}

/// The running streams of one device.
pub struct Streams {
    pub output: Arc<Output>,
    client: Arc<Client>,
    /// The socket's path and its (device, inode): removed at the end only
    /// if it is still ours (a new device may have replaced it).
    socket: Option<(PathBuf, (u64, u64))>,
    stop: Arc<AtomicBool>,
    writer: Option<JoinHandle<()>>,
    reader: Option<JoinHandle<()>>,
}

/// Opens the output file (appending) and the socket (a stale socket at the
/// path is replaced; any other file there is an error), and starts the
/// threads.
pub fn start(
    socket: Option<PathBuf>,
    output_file: Option<PathBuf>,
    output: Arc<Output>,
    input: Arc<dyn Input>,
    log: impl Fn(&str) + Send + Sync + 'static,
) -> Result<Streams, String> {
    let file = match &output_file {
        Some(p) => Some(
            File::options()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| format!("output {}: {e}", p.display()))?,
        ),
        None => None,
    };
    let (listener, socket) = match socket {
        Some(p) => {
            let l = listen(&p)?;
            let id = file_id(&p).unwrap_or_default();
            (Some(l), Some((p, id)))
        }
        None => (None, None),
    };
    let client = Arc::new(Client::default());
    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(log);
    let writer = {
        let (output, client, log) = (output.clone(), client.clone(), log.clone());
        Some(spawn("pci-serial-out", move || {
            write_out(&output, file, &client, &*log)
        })?)
    };
    let reader = match listener {
        Some(listener) => {
            let (client, stop) = (client.clone(), stop.clone());
            Some(spawn("pci-serial-in", move || {
                serve_input(&listener, &client, &stop, &*input, &*log)
            })?)
        }
        None => None,
    };
    Ok(Streams {
        output,
        client,
        socket,
        stop,
        writer,
        reader,
    })
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, String> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| format!("cannot start a thread: {e}"))
}

fn file_id(p: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(p)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

fn listen(p: &Path) -> Result<UnixListener, String> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(p)
            .map_err(|e| format!("socket {}: cannot replace it: {e}", p.display()))?,
        Ok(_) => {
            return Err(format!(
                "socket {}: exists and is not a socket (not replaced)",
                p.display()
            ))
        }
        Err(_) => {}
    }
    UnixListener::bind(p).map_err(|e| format!("socket {}: {e}", p.display()))
}

/// The output thread: everything queued goes to the file and the client.
fn write_out(output: &Output, mut file: Option<File>, client: &Client, log: &dyn Fn(&str)) {
    loop {
        let chunk: Vec<u8> = {
            let mut q = lock(&output.queue);
            while q.is_empty() && !output.stop.load(Ordering::Acquire) {
                q = output.ready.wait(q).unwrap_or_else(|e| e.into_inner());
            }
            if q.is_empty() {
                return; // stopped, and everything written
            }
            q.drain(..).collect()
        };
        if let Some(f) = &mut file {
            if let Err(e) = f.write_all(&chunk) {
                log(&format!("output file: {e}; no more output goes there"));
                file = None;
            }
        }
        // A clone, so that a slow client never holds the lock the input
        // thread needs to replace it.
        let to = lock(&client.0).as_ref().and_then(|s| s.try_clone().ok());
        if let Some(mut s) = to {
            if s.write_all(&chunk).is_err() {
                // The client went away; the input thread notices too.
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// The input thread: one client at a time (others wait in the listen
/// backlog until it disconnects); its bytes go into the UART as the guest
/// makes room.
fn serve_input(
    listener: &UnixListener,
    client: &Client,
    stop: &AtomicBool,
    input: &dyn Input,
    log: &dyn Fn(&str),
) {
    for conn in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            return;
        }
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) => {
                log(&format!("socket: accept: {e}"));
                continue;
            }
        };
        match conn.try_clone() {
            Ok(w) => client.set(Some(w)),
            Err(e) => {
                log(&format!("socket: {e}"));
                continue;
            }
        }
        let mut buf = [0u8; 256];
        'client: loop {
            let n = match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut rest = &buf[..n];
            while !rest.is_empty() {
                if stop.load(Ordering::Acquire) {
                    break 'client;
                }
                let took = input.push(rest);
                rest = &rest[took..];
                if !rest.is_empty() {
                    input.wait_room(Duration::from_millis(200));
                }
            }
        }
        client.set(None);
        if stop.load(Ordering::Acquire) {
            return;
        }
    }
}

impl Streams {
    /// Bytes of output dropped so far (a client that did not read).
    pub fn dropped(&self) -> u64 {
        self.output.dropped.load(Ordering::Relaxed)
    }

    /// Stops the threads (after writing out what was queued), closes the
    /// client and removes the socket.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.output.stop.store(true, Ordering::Release);
        self.output.ready.notify_all();
        self.client.set(None);
        if let Some((p, id)) = &self.socket {
            // Wakes the input thread out of accept(); it sees `stop`. If
            // that connection cannot be made, the thread is left to end
            // with the process rather than hang this call.
            let woke = UnixStream::connect(p).is_ok();
            if file_id(p) == Some(*id) {
                let _ = std::fs::remove_file(p);
            }
            if let Some(t) = self.reader.take() {
                if woke {
                    let _ = t.join();
                }
            }
        }
        if let Some(t) = self.writer.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Streams {
    fn drop(&mut self) {
        self.stop();
    }
}
