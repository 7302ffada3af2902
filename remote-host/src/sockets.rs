//! The sockets `remote-host serve` is given, whatever the protocol: a path
//! to listen on, or an inherited fd (listening, or already connected);
//! and how a device's connections are accepted and served, one session at
//! a time, each protocol supplying only what serves one connection.
//!
//! ## Where the sockets are
//!
//! `--socket PATH`:
//! - the remote has one device in the config, and `PATH` is not an
//!   existing directory: the device listens on `PATH` itself;
//! - otherwise (several devices in the config, even if some failed to
//!   load, or `PATH` is a directory): `PATH` is a directory (created if
//!   missing) and each device listens on `PATH/<device-id>.sock`.
//!
//! A stale socket file at a path is replaced; any other file there is an
//! error. `--fd N` serves one device (the remote must have exactly one) on
//! an inherited socket: a listening socket is accepted on like a path, a
//! connected one is served until its client goes away, then the process
//! exits.
//!
//! ## Connections
//!
//! A device serves one connection at a time; a second client waits until
//! the first has gone (and may time out on its side). A listener keeps
//! accepting after a client leaves.
//!
//! A connection accepted on a listener is served only when its peer's
//! user (SO_PEERCRED) is this process's own, root, or one allowed with
//! `--allow-uid`: another local user who can reach the path (a directory
//! left open by mistake) gets the socket closed, not the guest's RAM.
//! The uid is this process's at accept time (after the jail's `user`, if
//! any), checked again each time. Inherited sockets are the orchestrator's
//! choice and are not checked.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;

use crate::devices::RemoteDevice;

/// Where to serve.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// A socket path, or directory (see the module docs).
    Socket {
        path: PathBuf,
        /// How many devices the config gives this remote (whether or not
        /// they could all be created), which decides the layout: a
        /// device that fails to load must not move the others' sockets.
        devices_in_config: usize,
    },
    /// An inherited socket fd, listening or connected.
    Fd(RawFd),
}

/// Whether `--socket PATH` is a directory of `<device-id>.sock`.
fn is_socket_dir(path: &Path, devices_in_config: usize) -> bool {
    devices_in_config > 1 || path.is_dir()
}

/// The socket path of each device for `--socket PATH` (see the module
/// docs for the rule).
pub fn socket_paths(path: &Path, device_ids: &[&str], devices_in_config: usize) -> Vec<PathBuf> {
    if !is_socket_dir(path, devices_in_config) {
        return device_ids.iter().map(|_| path.to_path_buf()).collect();
    }
    device_ids
        .iter()
        .map(|id| path.join(format!("{id}.sock")))
        .collect()
}

/// One device's connections, whatever the protocol: accepted on a
/// listener or handed over connected, served one at a time, each on its
/// own thread. `serve_one` is the protocol's part: it serves one
/// connection until the client goes away (logging its own errors).
#[derive(Clone)]
pub struct DeviceSessions {
    device: String,
    protocol: &'static str,
    serve_one: Arc<dyn Fn(UnixStream) + Send + Sync>,
    session: Arc<Mutex<()>>,
}

impl DeviceSessions {
    /// Sessions of `device`, under its own lock ([`RemoteDevice::session`],
    /// shared by every way its connections come).
    pub fn new(
        device: &RemoteDevice,
        protocol: &'static str,
        serve_one: impl Fn(UnixStream) + Send + Sync + 'static,
    ) -> Self {
        DeviceSessions {
            device: device.id.clone(),
            protocol,
            serve_one: Arc::new(serve_one),
            session: device.session.clone(),
        }
    }

    /// Accepts clients until the listener fails for good (normally never).
    pub fn accept_loop(&self, listener: UnixListener) {
        for conn in listener.incoming() {
            match conn {
                Ok(sock) => {
                    if let Err(why) = peer_allowed(&sock) {
                        tracing::warn!(device = %self.device, "refused a connection: {why}");
                        continue;
                    }
                    let me = self.clone();
                    let spawned = std::thread::Builder::new()
                        .name(format!("{}-conn-{}", self.protocol, self.device))
                        .spawn(move || me.serve(sock));
                    if let Err(e) = spawned {
                        tracing::error!(device = %self.device, "cannot start connection thread: {e}");
                    }
                }
                Err(e) => {
                    tracing::warn!(device = %self.device, "accept failed: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        }
    }

    /// Serves one connected client, once the one before it has gone.
    pub fn serve(&self, sock: UnixStream) {
        let _session = self.session.lock().unwrap_or_else(|e| e.into_inner());
        tracing::info!(device = %self.device, "{} client connected", self.protocol);
        (self.serve_one)(sock);
    }
}

/// Users allowed to connect besides this process's own and root.
static ALLOWED_UIDS: std::sync::OnceLock<Vec<u32>> = std::sync::OnceLock::new();

/// Adds `uids` to the peers allowed on listening sockets (once, at start).
pub fn allow_peer_uids(uids: &[u32]) {
    let _ = ALLOWED_UIDS.set(uids.to_vec());
}

/// Whether `sock`'s peer may be served: its uid is ours, root's or an
/// allowed one.
pub fn peer_allowed(sock: &UnixStream) -> Result<(), String> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a ucred
    // on our stack, for an fd we own.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(format!(
            "no peer credentials: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: geteuid only reads this process's id.
    let ours = unsafe { libc::geteuid() };
    let extra = ALLOWED_UIDS.get().map(Vec::as_slice).unwrap_or(&[]);
    if cred.uid == ours || cred.uid == 0 || extra.contains(&cred.uid) {
        return Ok(());
    }
    Err(format!(
        "its peer (pid {}) runs as uid {}, not this process's ({ours}), root or an --allow-uid",
        cred.pid, cred.uid
    ))
}

/// Serves `devices` at `endpoint` until every listener ends (normally
/// never), or, for a connected `--fd`, until its client goes away.
/// `sessions` builds each device's protocol server.
pub fn serve_endpoint(
    devices: Vec<Arc<RemoteDevice>>,
    endpoint: Endpoint,
    protocol: &'static str,
    sessions: impl Fn(Arc<RemoteDevice>) -> DeviceSessions,
) -> anyhow::Result<()> {
    if devices.is_empty() {
        anyhow::bail!("no device to serve");
    }
    match endpoint {
        Endpoint::Socket {
            path,
            devices_in_config,
        } => {
            let ids: Vec<&str> = devices.iter().map(|d| d.id.as_str()).collect();
            let paths = socket_paths(&path, &ids, devices_in_config);
            if is_socket_dir(&path, devices_in_config) {
                std::fs::create_dir_all(&path).with_context(|| {
                    format!("cannot create socket directory {}", path.display())
                })?;
            }
            let mut threads = Vec::new();
            for (dev, p) in devices.into_iter().zip(paths) {
                let listener = bind(&p)?;
                tracing::info!(device = %dev.id, socket = %p.display(), "{protocol} listening");
                let server = sessions(dev.clone());
                let t = std::thread::Builder::new()
                    .name(format!("{protocol}-{}", dev.id))
                    .spawn(move || server.accept_loop(listener))
                    .context("cannot start listener thread")?;
                threads.push(t);
            }
            for t in threads {
                let _ = t.join();
            }
            Ok(())
        }
        Endpoint::Fd(n) => {
            let [dev] = <[_; 1]>::try_from(devices).map_err(|d| {
                anyhow::anyhow!(
                    "--fd serves one device; this remote has {} (use --socket DIR)",
                    d.len()
                )
            })?;
            let fd = inherited_socket(n)?;
            let server = sessions(dev.clone());
            if is_listening(fd.as_fd())? {
                tracing::info!(device = %dev.id, fd = n, "{protocol} listening on inherited fd");
                server.accept_loop(UnixListener::from(fd));
            } else {
                tracing::info!(device = %dev.id, fd = n, "{protocol} serving inherited connection");
                server.serve(UnixStream::from(fd));
            }
            Ok(())
        }
    }
}

/// Listens on `path`, replacing a stale socket there (never another file).
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
        } else {
            anyhow::bail!("{} exists and is not a socket", path.display());
        }
    }
    UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))
}

/// Takes ownership of inherited fd `n` (`--fd N`, `--control N`) after
/// checking it is an open stream socket, and keeps it out of anything this
/// process starts.
pub fn inherited_socket(n: RawFd) -> anyhow::Result<OwnedFd> {
    // SAFETY: F_GETFD only queries the descriptor table.
    if n < 0 || unsafe { libc::fcntl(n, libc::F_GETFD) } < 0 {
        anyhow::bail!("fd {n} is not an open file descriptor");
    }
    // SAFETY: the fd is open (checked above) and was handed to this
    // process on its command line to own; nothing else in the process
    // uses it.
    let fd = unsafe { OwnedFd::from_raw_fd(n) };
    // SAFETY: F_SETFD on an fd we own.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    if !is_stream_socket(fd.as_fd()) {
        anyhow::bail!("fd {n} is not a stream socket");
    }
    Ok(fd)
}

pub use channel::framing::is_stream_socket;

/// Whether `fd` is a listening socket (else a connected one).
pub fn is_listening(fd: BorrowedFd<'_>) -> anyhow::Result<bool> {
    channel::framing::socket_option(fd, libc::SO_ACCEPTCONN)
        .map(|v| v != 0)
        .context("getsockopt(SO_ACCEPTCONN)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_device_uses_the_path_several_use_a_directory() {
        let p = Path::new("/nonexistent/dev.sock");
        assert_eq!(socket_paths(p, &["a"], 1), vec![p.to_path_buf()]);
        let d = Path::new("/nonexistent/dir");
        assert_eq!(
            socket_paths(d, &["a", "b"], 2),
            vec![d.join("a.sock"), d.join("b.sock")]
        );
        // One of two configured devices failed: still a directory.
        assert_eq!(socket_paths(d, &["b"], 2), vec![d.join("b.sock")]);
        let tmp = std::env::temp_dir();
        assert_eq!(socket_paths(&tmp, &["a"], 1), vec![tmp.join("a.sock")]);
    }
}
