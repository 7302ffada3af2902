//! Where a migration stream goes or comes from, in QEMU's URI syntax:
//! `file:PATH`, `tcp:HOST:PORT`, `unix:PATH`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// How long a source waits to connect, and for any one write to go out
/// (a destination that stops reading fails the migration, and the source
/// runs on).
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// A migration URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUri {
    /// A snapshot of the stopped VM in a file.
    File(PathBuf),
    /// A live migration over TCP (`HOST` may be a name, an IPv4 address,
    /// `[IPv6]`, or `0` for every address when listening).
    Tcp { host: String, port: u16 },
    /// A live migration over a UNIX socket.
    Unix(PathBuf),
}

impl std::fmt::Display for MigrationUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MigrationUri::File(p) => write!(f, "file:{}", p.display()),
            MigrationUri::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            MigrationUri::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A connected migration stream.
pub trait Stream: Read + Write + Send {
    /// Bounds each later read (the source's wait for [`TAKEN`]).
    fn set_read_deadline(&self, d: Duration) -> std::io::Result<()>;

    /// The UNIX socket under a `unix:` stream, which can carry file
    /// descriptors (a remote's hand-over).
    fn unix(&self) -> Option<&UnixStream> {
        None
    }
}

impl Stream for TcpStream {
    fn set_read_deadline(&self, d: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(d))
    }
}

impl Stream for UnixStream {
    fn set_read_deadline(&self, d: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(d))
    }

    fn unix(&self) -> Option<&UnixStream> {
        Some(self)
    }
}

impl Stream for ReadOnly {
    fn set_read_deadline(&self, _: Duration) -> std::io::Result<()> {
        Ok(())
    }
}

impl MigrationUri {
    /// Parses QEMU's syntax; the error says what is supported.
    pub fn parse(uri: &str) -> Result<Self, String> {
        let unsupported = || {
            format!(
                "Migration URI '{uri}' is not supported: this VMM migrates to file:PATH, tcp:HOST:PORT or unix:PATH"
            )
        };
        match uri.split_once(':') {
            Some(("file", path)) if !path.is_empty() => Ok(MigrationUri::File(path.into())),
            Some(("unix", path)) if !path.is_empty() => Ok(MigrationUri::Unix(path.into())),
            Some(("tcp", rest)) => {
                let (host, port) = rest.rsplit_once(':').ok_or_else(unsupported)?;
                let port: u16 = port
                    .parse()
                    .map_err(|_| format!("Migration URI '{uri}': `{port}` is not a port"))?;
                if host.is_empty() {
                    return Err(unsupported());
                }
                Ok(MigrationUri::Tcp {
                    host: host.to_owned(),
                    port,
                })
            }
            _ => Err(unsupported()),
        }
    }

    /// Whether the VM keeps running while the stream is sent.
    pub fn is_live(&self) -> bool {
        !matches!(self, MigrationUri::File(_))
    }

    fn tcp_addrs(host: &str, port: u16) -> Result<Vec<std::net::SocketAddr>> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let host = if host == "0" { "0.0.0.0" } else { host };
        let addrs: Vec<_> = (host, port)
            .to_socket_addrs()
            .with_context(|| format!("resolving {host}:{port}"))?
            .collect();
        if addrs.is_empty() {
            bail!("{host}:{port} resolves to no address");
        }
        Ok(addrs)
    }

    /// Connects to a destination that listens (`--incoming`).
    pub fn connect(&self) -> Result<Box<dyn Stream>> {
        match self {
            MigrationUri::File(_) => bail!("a file is not connected to"),
            MigrationUri::Tcp { host, port } => {
                let mut last = None;
                for a in Self::tcp_addrs(host, *port)? {
                    match TcpStream::connect_timeout(&a, IO_TIMEOUT) {
                        Ok(s) => {
                            s.set_nodelay(true)?;
                            s.set_write_timeout(Some(IO_TIMEOUT))?;
                            return Ok(Box::new(s));
                        }
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.map_or_else(|| anyhow::anyhow!("no address"), anyhow::Error::from))
                    .with_context(|| format!("connecting to {self}"))
            }
            MigrationUri::Unix(p) => {
                let s = UnixStream::connect(p).with_context(|| format!("connecting to {self}"))?;
                s.set_write_timeout(Some(IO_TIMEOUT))?;
                Ok(Box::new(s))
            }
        }
    }

    /// Listens (or opens the file) now; [`Listener::accept`] takes the
    /// source later. QMP `migrate-incoming` replies once a source can
    /// connect, as QEMU's does.
    pub fn listen(&self) -> Result<Listener> {
        match self {
            MigrationUri::File(p) => Ok(Listener::File(
                std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?,
            )),
            MigrationUri::Tcp { host, port } => {
                let l = TcpListener::bind(&Self::tcp_addrs(host, *port)?[..])
                    .with_context(|| format!("listening on {self}"))?;
                tracing::info!("waiting for a migration on {self}");
                Ok(Listener::Tcp(l))
            }
            MigrationUri::Unix(p) => {
                let _ = std::fs::remove_file(p);
                let l = UnixListener::bind(p).with_context(|| format!("listening on {self}"))?;
                tracing::info!("waiting for a migration on {self}");
                Ok(Listener::Unix(l, p.clone()))
            }
        }
    }
}

/// Where a destination takes its stream from, ready before the source
/// comes.
pub enum Listener {
    File(std::fs::File),
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Takes one source's connection (waits as long as it takes).
    pub fn accept(self) -> Result<Box<dyn Stream>> {
        match self {
            Listener::File(f) => Ok(Box::new(ReadOnly(f))),
            Listener::Tcp(l) => {
                let (s, from) = l.accept().context("accepting the migration")?;
                tracing::info!("migration from {from}");
                s.set_write_timeout(Some(IO_TIMEOUT))?;
                Ok(Box::new(s))
            }
            Listener::Unix(l, p) => {
                let (s, _) = l.accept().context("accepting the migration")?;
                let _ = std::fs::remove_file(p);
                s.set_write_timeout(Some(IO_TIMEOUT))?;
                Ok(Box::new(s))
            }
        }
    }
}

/// What `host run --incoming` was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// Restore from this stream before the guest runs.
    Now(MigrationUri),
    /// `defer`: the VM waits, stopped ("inmigrate"), for QMP
    /// `migrate-incoming URI`; its monitor serves meanwhile, so devices
    /// the source hot-added can be added first (as with QEMU's
    /// `-incoming defer`).
    Defer,
}

impl Incoming {
    /// `defer`, or a [`MigrationUri`].
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "defer" {
            return Ok(Incoming::Defer);
        }
        MigrationUri::parse(s).map(Incoming::Now)
    }
}

/// A file as a stream: the acknowledgement a destination writes back
/// goes nowhere.
struct ReadOnly(std::fs::File);

impl Read for ReadOnly {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for ReadOnly {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The byte a destination sends once the whole stream is applied; the
/// source answers [`GO`] and stays stopped. Without it (EOF, a time-out)
/// the source runs on, and sends no [`GO`].
pub const TAKEN: u8 = 0x06;

/// The source's answer to [`TAKEN`]: only with it does the destination
/// run the guest, so that a source that gave up waiting (and runs on)
/// and a destination that took the VM never both run it.
pub const GO: u8 = 0x07;

/// How long either side waits for the other's byte.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_qemu_users_write() {
        assert_eq!(
            MigrationUri::parse("file:/tmp/vm.snap"),
            Ok(MigrationUri::File("/tmp/vm.snap".into()))
        );
        assert_eq!(
            MigrationUri::parse("tcp:127.0.0.1:4444"),
            Ok(MigrationUri::Tcp {
                host: "127.0.0.1".into(),
                port: 4444
            })
        );
        assert_eq!(
            MigrationUri::parse("tcp:[::1]:4444").map(|u| u.to_string()),
            Ok("tcp:[::1]:4444".into())
        );
        assert_eq!(
            MigrationUri::parse("unix:/run/m.sock"),
            Ok(MigrationUri::Unix("/run/m.sock".into()))
        );
        let e = MigrationUri::parse("exec:cat").unwrap_err();
        assert!(e.contains("file:PATH, tcp:HOST:PORT or unix:PATH"), "{e}");
        assert!(MigrationUri::parse("tcp:host:99999")
            .unwrap_err()
            .contains("not a port"));
        assert!(MigrationUri::parse("tcp:4444").is_err());
        assert!(MigrationUri::parse("file:").is_err());
        assert!(MigrationUri::parse("nothing").is_err());
    }

    #[test]
    fn incoming_takes_defer_or_a_uri() {
        assert_eq!(Incoming::parse("defer"), Ok(Incoming::Defer));
        assert_eq!(
            Incoming::parse("unix:/run/m.sock"),
            Ok(Incoming::Now(MigrationUri::Unix("/run/m.sock".into())))
        );
        assert!(Incoming::parse("deferred").is_err());
    }

    #[test]
    fn a_listener_is_ready_before_the_source_comes() {
        // What migrate-incoming relies on: once `listen` returned, a
        // source connects at once, before anything accepts.
        let dir = tempfile::tempdir().unwrap();
        let uri = MigrationUri::Unix(dir.path().join("l.sock"));
        let listener = uri.listen().unwrap();
        let mut source = uri.connect().unwrap();
        source.write_all(b"stream").unwrap();
        drop(source);
        let mut got = Vec::new();
        listener.accept().unwrap().read_to_end(&mut got).unwrap();
        assert_eq!(got, b"stream");
    }

    #[test]
    fn a_stream_goes_through_a_unix_socket_and_back() {
        let dir = tempfile::tempdir().unwrap();
        let uri = MigrationUri::Unix(dir.path().join("m.sock"));
        let u2 = uri.clone();
        let dest = std::thread::spawn(move || {
            let mut s = u2.listen().unwrap().accept().unwrap();
            let mut b = [0u8; 5];
            s.read_exact(&mut b).unwrap();
            s.write_all(&[TAKEN]).unwrap();
            b
        });
        let mut s = (0..500)
            .find_map(|_| {
                let s = uri.connect().ok();
                if s.is_none() {
                    std::thread::sleep(Duration::from_millis(10));
                }
                s
            })
            .expect("the destination never listened");
        s.write_all(b"hello").unwrap();
        let mut ack = [0u8; 1];
        s.read_exact(&mut ack).unwrap();
        assert_eq!(ack[0], TAKEN);
        assert_eq!(&dest.join().unwrap(), b"hello");
    }
}
