//! QMP, the monitor's side: a client's bytes into `qmp::Server` (the
//! greeting, capabilities negotiation, JSON framing, dispatch, argument
//! checks and replies), with events emitted while it reads. Commands are a
//! small set that reads its arguments the way the VMM's do (the VMM's own
//! commands need a whole machine; their arguments go through the same
//! [`qmp::Arguments`] helpers). QMP trusts its client (docs/security.md),
//! so the point is robustness: no panic, no hang, bounded memory.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use qmp::{Arguments, Commands, QmpError};
use serde_json::{json, Map, Value};

use crate::timed;

/// Commands whose arguments are read as the VMM reads its own.
struct Typed;

impl Commands for Typed {
    fn execute(&self, name: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        match name {
            "echo" => Ok(Value::Object(args.clone())),
            "device_add" => {
                args.allow_only(&["driver", "id", "addr", "remote", "bus"])?;
                let driver = args.str("driver")?;
                let id = args.opt_str("id")?;
                Ok(json!({ "driver": driver, "id": id }))
            }
            "block_resize" => {
                args.allow_only(&["node-name", "device", "size"])?;
                let size = args.u64("size")?;
                let _ = (args.opt_str("node-name")?, args.opt_str("device")?);
                Ok(json!({ "size": size }))
            }
            "migrate-set-parameters" => {
                let _ = (
                    args.opt_u64("downtime-limit")?,
                    args.opt_i64("max-bandwidth")?,
                );
                let _ = args.opt_bool("x-verify")?;
                Ok(json!({}))
            }
            "fail" => Err(QmpError::generic("refused")),
            _ => Err(QmpError::command_not_found(name)),
        }
    }

    fn command_names(&self) -> Vec<String> {
        [
            "echo",
            "device_add",
            "block_resize",
            "migrate-set-parameters",
            "fail",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    }
}

/// The server every input talks to, one connection each, as a VMM's
/// monitor serves one client after another; with its socket's
/// directory and the events it sends.
struct Monitor {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    events: qmp::EventSender,
    server: qmp::Server,
}

fn monitor() -> &'static Monitor {
    static MONITOR: OnceLock<Monitor> = OnceLock::new();
    MONITOR.get_or_init(|| {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("tempdir: {e}"),
        };
        let path = dir.path().join("qmp.sock");
        let events = qmp::EventSender::new();
        let opts = qmp::ServerOptions {
            max_input: 64 << 10,
            write_timeout: Duration::from_secs(2),
            shutdown_timeout: Duration::from_secs(2),
            ..Default::default()
        };
        let server = match qmp::Server::bind_with(&path, Arc::new(Typed), opts, events.clone()) {
            Ok(s) => s,
            Err(e) => panic!("bind {}: {e}", path.display()),
        };
        Monitor {
            _dir: dir,
            path,
            events,
            server,
        }
    })
}

/// One client session: `data` sent, then its end; every reply read until
/// the server hangs up. The server lives across inputs (starting one per
/// input cost most of an input's time); what one session leaves behind
/// in it (a client not let go, a thread not ended) shows as a later
/// session's stall, which [`timed`] reports.
pub fn qmp(data: &[u8]) {
    let m = monitor();
    let mut sock = match UnixStream::connect(&m.path) {
        Ok(s) => s,
        Err(e) => panic!("connect: {e}"),
    };
    // An input of at most the socket's buffer is written at once, with no
    // thread; a longer one (a replayed file) by a thread, as the server
    // may reply before it has read it all.
    let sender = if data.len() <= 32 << 10 {
        let _ = sock.write_all(data);
        let _ = sock.shutdown(std::net::Shutdown::Write);
        None
    } else {
        let input = data.to_vec();
        let writer = match sock.try_clone() {
            Ok(w) => w,
            Err(e) => panic!("dup: {e}"),
        };
        Some(std::thread::spawn(move || {
            let mut w = writer;
            // The server may hang up first (input past its limit).
            let _ = w.write_all(&input);
            let _ = w.shutdown(std::net::Shutdown::Write);
        }))
    };
    m.events.emit("FUZZ", json!({ "during": true }));
    timed("a QMP session", || {
        let _ = sock.set_read_timeout(Some(Duration::from_secs(4)));
        let mut buf = [0u8; 16 << 10];
        while matches!(sock.read(&mut buf), Ok(n) if n > 0) {}
    });
    if let Some(s) = sender {
        let _ = s.join();
    }
    drop(sock);
    // The next session must find the server as this one did.
    let deadline = Instant::now() + crate::ACCESS_LIMIT;
    while m.server.client_count() > 0 {
        assert!(
            Instant::now() < deadline,
            "the server still holds a client that hung up {:?} ago",
            crate::ACCESS_LIMIT
        );
        std::thread::yield_now();
    }
}
