//! The control channel between the VMM and a `remote-host`: device
//! hot-add and removal, per-device control operations, and liveness pings.
//!
//! A UNIX stream socket carrying one JSON object per line (at most
//! [`MAX_LINE`] bytes, newline included). A request may carry file
//! descriptors as `SCM_RIGHTS`, attached to its first byte:
//!
//! ```text
//! → {"id": 1, "op": "ping"}
//! ← {"id": 1, "ok": {}}
//! → {"id": 2, "op": "device-add", "device": "dma2", "plugin": "dma-example",
//!    "kind": null, "slot": 7, "settings": "max-transfer = 65536\n"}   + 1 fd
//! ← {"id": 2, "error": "device `dma2` already exists"}
//! ```
//!
//! Lines rather than length-prefixed frames because the traffic is rare,
//! small, and easy to read in a log or type with `socat`. The reader peeks
//! for the newline and then consumes exactly one line, so the fds of the
//! next request are never received with this one.
//!
//! The client ([`ControlClient`]) sends one request at a time and matches
//! replies by id: after a timeout (a remote stopped with SIGSTOP, say) the
//! late reply is skipped when it finally comes, so the client stays usable
//! and a later ping can prove the remote alive again. The server side is
//! [`serve_control`], which hands each request to a handler closure.
//!
//! `docs/channel.md` ("Control channel") lists the operations.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::framing::{Framed, FramingError};

/// Longest line, newline included.
pub const MAX_LINE: usize = 64 * 1024;

/// How long the rest of a line may take once its first byte was peeked
/// (it is already in the socket, so this never really waits), and how long
/// a reply may take to send.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// What went wrong with a control request.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket failed.
    #[error("control socket error: {0}")]
    Io(#[from] io::Error),
    /// No reply within the timeout; the request may still be carried out.
    #[error("no reply on the control channel within {0:?}")]
    Timeout(Duration),
    /// The peer closed the channel (or an earlier failure left it unusable).
    #[error("the control channel is closed")]
    Closed,
    /// The remote refused the request; its message, verbatim.
    #[error("{0}")]
    Remote(String),
    /// The peer broke the protocol (bad JSON, wrong id, ...).
    #[error("control protocol error: {0}")]
    Protocol(String),
}

/// Bytes as lowercase hex (device states on the control channel).
pub fn encode_hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

/// The bytes of [`encode_hex`]'s text; a message names what is wrong.
pub fn decode_hex(s: &str) -> Result<Vec<u8>, String> {
    hex::decode(s).map_err(|e| match e {
        hex::FromHexError::OddLength => "state: an odd number of hex digits".into(),
        hex::FromHexError::InvalidHexCharacter { index, .. } => {
            format!("state: not hex at byte {}", index / 2)
        }
        other => format!("state: {other}"),
    })
}

/// One line read from the socket.
enum Line {
    Complete(Vec<u8>),
    /// Longer than [`MAX_LINE`]; its bytes were discarded.
    TooLong,
}

/// Reassembles lines; keeps a partial line across timeouts.
#[derive(Default)]
struct LineReader {
    partial: Vec<u8>,
    /// The current line went over [`MAX_LINE`]: skip to its newline.
    overflow: bool,
    /// Where peeked bytes land, kept between lines.
    chunk: Vec<u8>,
}

/// The least a peek looks at. A peek copies what it looks at, and a
/// socket may hold many short lines: looking at all of it for each line
/// made reading a burst of lines quadratic. A long line's peeks grow
/// with it, so a state blob of a few MiB still takes a few dozen.
const PEEK_MIN: usize = 1024;

/// Peeks at what the socket holds, without consuming it.
fn peek(sock: &UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is a valid writable buffer of `buf.len()` bytes for
        // the duration of the call; MSG_PEEK leaves the data queued.
        let n = unsafe {
            libc::recv(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl LineReader {
    /// Reads one line (without its newline), collecting the fds that
    /// arrive with it into `fds`. `deadline` bounds the wait (`None`:
    /// forever). EOF is [`FramingError::Closed`], even inside a line.
    fn read(
        &mut self,
        framed: &Framed,
        fds: &mut Vec<OwnedFd>,
        deadline: Option<Instant>,
        timeout: Duration,
    ) -> Result<Line, FramingError> {
        let mut chunk = std::mem::take(&mut self.chunk);
        let r = self.read_into(&mut chunk, framed, fds, deadline, timeout);
        self.chunk = chunk;
        r
    }

    fn read_into(
        &mut self,
        chunk: &mut Vec<u8>,
        framed: &Framed,
        fds: &mut Vec<OwnedFd>,
        deadline: Option<Instant>,
        timeout: Duration,
    ) -> Result<Line, FramingError> {
        loop {
            let want = self.partial.len().clamp(PEEK_MIN, MAX_LINE);
            chunk.resize(want, 0);
            let wait = match deadline {
                None => None,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(FramingError::Timeout(timeout));
                    }
                    Some(left)
                }
            };
            if !framed.wait_readable(wait)? {
                return Err(FramingError::Timeout(timeout));
            }
            let n = match peek(framed.socket(), chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(FramingError::Closed)
                }
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                return Err(FramingError::Closed);
            }
            let newline = chunk[..n].iter().position(|&b| b == b'\n');
            let take = newline.map_or(n, |p| p + 1);
            // Only this line's bytes: the peeked data is already queued, so
            // this does not wait, and fds of a later line stay queued.
            framed.recv_exact(
                &mut chunk[..take],
                fds,
                Some(SEND_TIMEOUT),
                SEND_TIMEOUT,
                false,
            )?;
            if !self.overflow {
                if self.partial.len() + take > MAX_LINE {
                    self.overflow = true;
                    self.partial = Vec::new();
                } else {
                    self.partial.extend_from_slice(&chunk[..take]);
                }
            }
            if newline.is_some() {
                if std::mem::take(&mut self.overflow) {
                    return Ok(Line::TooLong);
                }
                let mut line = std::mem::take(&mut self.partial);
                line.pop();
                return Ok(Line::Complete(line));
            }
        }
    }
}

fn encode(v: &Value) -> Vec<u8> {
    let mut bytes = v.to_string().into_bytes();
    bytes.push(b'\n');
    bytes
}

/// The VMM side: blocking, one request at a time, never waits past its
/// timeout, never panics on what the remote sends.
pub struct ControlClient {
    framed: Framed,
    timeout: Duration,
    next_id: u64,
    reader: LineReader,
    /// A send was cut short (the stream holds half a request) or the peer
    /// closed: nothing more can be said on this socket.
    closed: bool,
}

impl std::fmt::Debug for ControlClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlClient")
            .field("timeout", &self.timeout)
            .field("next_id", &self.next_id)
            .field("closed", &self.closed)
            .finish()
    }
}

impl ControlClient {
    /// Wraps a connected stream socket. `timeout` bounds each request,
    /// from send to reply.
    pub fn new(stream: UnixStream, timeout: Duration) -> Self {
        let mut framed = Framed::new(stream);
        // Control traffic is rare: sleeping at once costs nothing that
        // matters, spinning would cost a core.
        framed.set_poll(Duration::ZERO);
        ControlClient {
            framed,
            timeout,
            next_id: 1,
            reader: LineReader::default(),
            closed: false,
        }
    }

    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The socket (e.g. to poll it for EOF between requests).
    pub fn socket(&self) -> &UnixStream {
        self.framed.socket()
    }

    /// Whether the remote answers.
    pub fn ping(&mut self) -> Result<(), ControlError> {
        self.request("ping", Map::new(), &[]).map(|_| ())
    }

    /// A `ping` that also returns what the remote reports with it:
    /// `{"failed": [{"device": ID, "reason": TEXT}]}` for devices whose
    /// plugin failed (panicked).
    pub fn ping_status(&mut self) -> Result<Value, ControlError> {
        self.request("ping", Map::new(), &[])
    }

    /// Asks the remote to create `device` from `plugin` (device `kind`, or
    /// the plugin's only one) with `settings_toml` as its `[[device]]`
    /// table, and to serve it on `conn` with its protocol.
    pub fn device_add(
        &mut self,
        device: &str,
        plugin: &str,
        kind: Option<&str>,
        slot: u8,
        settings_toml: &str,
        conn: OwnedFd,
    ) -> Result<(), ControlError> {
        let mut body = Map::new();
        body.insert("device".into(), json!(device));
        body.insert("plugin".into(), json!(plugin));
        body.insert("kind".into(), json!(kind));
        body.insert("slot".into(), json!(slot));
        body.insert("settings".into(), json!(settings_toml));
        // The remote has its own copy once the request is sent; ours
        // closes when `conn` drops at the end of this call.
        self.request("device-add", body, &[conn.as_fd()])
            .map(|_| ())
    }

    /// Asks the remote to serve its existing `device` on `conn` too, once
    /// the device's current client has gone (the device keeps its state).
    pub fn device_connect(&mut self, device: &str, conn: OwnedFd) -> Result<(), ControlError> {
        let mut body = Map::new();
        body.insert("device".into(), json!(device));
        self.request("device-connect", body, &[conn.as_fd()])
            .map(|_| ())
    }

    /// Before the remote is handed over: every device's ring drained and
    /// its own work finished (bounded). Returns the devices still busy
    /// after the bound.
    pub fn handover_prepare(&mut self) -> Result<Vec<String>, ControlError> {
        let r = self.request("handover-prepare", Map::new(), &[])?;
        Ok(r.get("busy")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The remote stops dying with the VMM that spawned it.
    pub fn handover_release(&mut self) -> Result<(), ControlError> {
        self.request("handover-release", Map::new(), &[])
            .map(|_| ())
    }

    /// The id the next request will carry.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// Goes on from `next` (the [`next_id`](Self::next_id) of the client
    /// this channel was handed over from), so that a late reply to one of
    /// its requests is skipped as stale instead of taken for a wrong one.
    pub fn resume_ids_from(&mut self, next: u64) {
        self.next_id = self.next_id.max(next);
    }

    /// Hands the remote the access ring of `device` (its memory and its
    /// kick and reply eventfds, [`crate::ring`]) and the eventfds of the
    /// doorbells it delivers (each with the key [`Self::device_doorbells`]
    /// gave): from the reply on, the remote serves the device's BAR
    /// accesses from the ring as well.
    pub fn ring_setup(
        &mut self,
        device: &str,
        fds: &crate::ring::RingFds,
        doorbells: &[(crate::ring::DoorbellKey, BorrowedFd<'_>)],
    ) -> Result<(), ControlError> {
        if 3 + doorbells.len() > crate::framing::MAX_FDS {
            return Err(ControlError::Protocol(format!(
                "ring-setup carries at most {} doorbells",
                crate::framing::MAX_FDS - 3
            )));
        }
        let mut body = Map::new();
        body.insert("device".into(), json!(device));
        let keys: Vec<Value> = doorbells.iter().map(|(k, _)| doorbell_json(k)).collect();
        if !keys.is_empty() {
            body.insert("doorbells".into(), Value::Array(keys));
        }
        let mut all = vec![fds.memory.as_fd(), fds.kick.as_fd(), fds.reply.as_fd()];
        all.extend(doorbells.iter().map(|(_, f)| *f));
        self.request("ring-setup", body, &all).map(|_| ())
    }

    /// The doorbells `device` lets the VMM deliver through KVM
    /// (`device-doorbells`), as the remote checked them. A remote that
    /// predates doorbells answers "unknown op": an error the caller takes
    /// as none.
    pub fn device_doorbells(&mut self, device: &str) -> Result<DeclaredDoorbells, ControlError> {
        let mut body = Map::new();
        body.insert("device".into(), json!(device));
        let reply = self.request("device-doorbells", body, &[])?;
        let keys = parse_doorbells(reply.get("doorbells").unwrap_or(&Value::Null))
            .map_err(|e| ControlError::Protocol(format!("device-doorbells: {e}")))?;
        Ok(DeclaredDoorbells {
            keys,
            // Absent from a remote that predates it: the safe answer.
            state_outlives: reply
                .get("state-outlives-doorbells")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        })
    }

    /// Stops serving `device`, shuts it down and forgets it.
    pub fn device_del(&mut self, device: &str) -> Result<(), ControlError> {
        let mut body = Map::new();
        body.insert("device".into(), json!(device));
        self.request("device-del", body, &[]).map(|_| ())
    }

    /// Runs the device's own control operation `control` with `args`.
    pub fn device_control(
        &mut self,
        device: &str,
        control: &str,
        args: Value,
    ) -> Result<Value, ControlError> {
        let mut body = Map::new();
        body.insert("device".into(), json!(device));
        body.insert("control".into(), json!(control));
        body.insert("args".into(), args);
        self.request("device-control", body, &[])
    }

    /// The device's state (`device-save`): its `save_state`, taken once
    /// its ring is drained.
    pub fn device_save(&mut self, device: &str) -> Result<Vec<u8>, ControlError> {
        self.device_save_with(device, false)
    }

    /// [`device_save`](Self::device_save), after the device's own work in
    /// flight finished (`quiesce`, bounded by the remote: a migration,
    /// whose guest is stopped).
    pub fn device_save_with(
        &mut self,
        device: &str,
        quiesce: bool,
    ) -> Result<Vec<u8>, ControlError> {
        let mut body = Map::new();
        body.insert("device".into(), json!(device));
        if quiesce {
            body.insert("quiesce".into(), json!(true));
        }
        let reply = self.request("device-save", body, &[])?;
        let text = reply
            .get("state")
            .and_then(Value::as_str)
            .ok_or_else(|| ControlError::Protocol("device-save: no `state` in the reply".into()))?;
        decode_hex(text).map_err(ControlError::Protocol)
    }

    /// The device's DMA dirty log (`dirty-log`): `action` "start", "stop"
    /// or "take"; a take returns the `(gpa, len)` runs written since the
    /// last one.
    pub fn dirty_log(
        &mut self,
        device: &str,
        action: &str,
    ) -> Result<Vec<(u64, u64)>, ControlError> {
        let mut body = Map::new();
        body.insert("device".into(), json!(device));
        body.insert("action".into(), json!(action));
        let reply = self.request("dirty-log", body, &[])?;
        let Some(runs) = reply.get("runs") else {
            return Ok(Vec::new());
        };
        serde_json::from_value(runs.clone())
            .map_err(|e| ControlError::Protocol(format!("dirty-log: bad `runs`: {e}")))
    }

    /// Restores the device's state (`device-restore`).
    pub fn device_restore(&mut self, device: &str, state: &[u8]) -> Result<(), ControlError> {
        let mut body = Map::new();
        body.insert("device".into(), json!(device));
        body.insert("state".into(), json!(encode_hex(state)));
        self.request("device-restore", body, &[]).map(|_| ())
    }

    fn framing_error(&mut self, e: FramingError) -> ControlError {
        match e {
            FramingError::Closed | FramingError::Truncated { .. } => {
                self.closed = true;
                ControlError::Closed
            }
            FramingError::Timeout(_) => ControlError::Timeout(self.timeout),
            FramingError::Io(e) => ControlError::Io(e),
            other => {
                // Too many fds from the remote: the stream position is
                // unknown, so this socket is done.
                self.closed = true;
                ControlError::Protocol(other.to_string())
            }
        }
    }

    /// Sends `{"id", "op", ..body}` with `fds` and waits for its reply.
    pub fn request(
        &mut self,
        op: &str,
        mut body: Map<String, Value>,
        fds: &[BorrowedFd<'_>],
    ) -> Result<Value, ControlError> {
        if self.closed {
            return Err(ControlError::Closed);
        }
        let id = self.next_id;
        self.next_id += 1;
        body.insert("id".into(), json!(id));
        body.insert("op".into(), json!(op));
        let bytes = encode(&Value::Object(body));
        if bytes.len() > MAX_LINE {
            return Err(ControlError::Protocol(format!(
                "request of {} bytes exceeds the {MAX_LINE}-byte line limit",
                bytes.len()
            )));
        }
        let deadline = Instant::now() + self.timeout;
        if let Err(e) = self.framed.send(&bytes, fds, self.timeout) {
            // A send cut short leaves half a line in the stream: whatever
            // we sent next would be read as part of it.
            self.closed = true;
            return Err(match e {
                FramingError::Timeout(_) => ControlError::Timeout(self.timeout),
                FramingError::Io(e) => ControlError::Io(e),
                _ => ControlError::Closed,
            });
        }
        loop {
            let mut fds = Vec::new(); // none expected; dropped (closed)
            let line = match self
                .reader
                .read(&self.framed, &mut fds, Some(deadline), self.timeout)
            {
                Ok(Line::Complete(l)) => l,
                Ok(Line::TooLong) => {
                    return Err(ControlError::Protocol(format!(
                        "reply longer than {MAX_LINE} bytes"
                    )))
                }
                Err(e) => return Err(self.framing_error(e)),
            };
            let reply: Value = serde_json::from_slice(&line).map_err(|e| {
                ControlError::Protocol(format!(
                    "reply is not JSON ({e}): {}",
                    String::from_utf8_lossy(&line[..line.len().min(200)])
                ))
            })?;
            match reply.get("id").and_then(Value::as_u64) {
                Some(rid) if rid == id => return parse_reply(&reply),
                // The reply to a request that timed out earlier.
                Some(rid) if rid < id => continue,
                _ => {
                    return Err(ControlError::Protocol(format!(
                        "reply for request {id} has a wrong id: {}",
                        truncate(&reply.to_string())
                    )))
                }
            }
        }
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(200) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// A doorbell as the control channel carries it.
pub fn doorbell_json(k: &crate::ring::DoorbellKey) -> Value {
    json!({"bar": k.bar, "offset": k.offset, "len": k.len, "value": k.value})
}

/// `device-doorbells`' answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredDoorbells {
    /// The writes the VMM may deliver through KVM.
    pub keys: Vec<crate::ring::DoorbellKey>,
    /// The device's saved states stay good after its doorbells
    /// (`Device::state_outlives_doorbells`): a VMM keeping states across
    /// a crash does not count doorbells as the guest reaching the device.
    pub state_outlives: bool,
}

/// A list of doorbells from the other end, checked: at most
/// [`crate::framing::MAX_FDS`] entries, each in BAR 0–5, 1, 2, 4 or 8
/// bytes, its value within its width.
pub fn parse_doorbells(v: &Value) -> Result<Vec<crate::ring::DoorbellKey>, String> {
    let Some(list) = v.as_array() else {
        return Err("`doorbells` is not a list".into());
    };
    if list.len() > crate::framing::MAX_FDS {
        return Err(format!("{} doorbells is too many", list.len()));
    }
    list.iter()
        .map(|d| {
            let field = |n: &str| {
                d.get(n)
                    .and_then(Value::as_u64)
                    .ok_or_else(|| format!("a doorbell without a number `{n}`"))
            };
            let (bar, offset, len, value) = (
                field("bar")?,
                field("offset")?,
                field("len")?,
                field("value")?,
            );
            if bar > 5 || !matches!(len, 1 | 2 | 4 | 8) {
                return Err(format!(
                    "doorbell BAR{bar} of {len} bytes is not a BAR access"
                ));
            }
            if len < 8 && value >> (len * 8) != 0 {
                return Err(format!(
                    "doorbell value {value:#x} does not fit {len} bytes"
                ));
            }
            Ok(crate::ring::DoorbellKey {
                bar: bar as u8,
                offset,
                len: len as u8,
                value,
            })
        })
        .collect()
}

fn parse_reply(reply: &Value) -> Result<Value, ControlError> {
    if let Some(v) = reply.get("ok") {
        return Ok(v.clone());
    }
    match reply.get("error") {
        Some(Value::String(m)) => Err(ControlError::Remote(m.clone())),
        Some(other) => Err(ControlError::Remote(other.to_string())),
        None => Err(ControlError::Protocol(format!(
            "reply has neither `ok` nor `error`: {}",
            truncate(&reply.to_string())
        ))),
    }
}

/// Serves the control protocol on `stream` until EOF: each request's
/// `op`, its whole JSON object and the fds that came with it go to
/// `handler`, whose result becomes the reply (`ok` or `error`). A line that
/// is not a request gets an error reply (`"id": null` when it had no
/// usable id) and the connection goes on.
///
/// Returns `Ok(())` at EOF; an error when the socket fails or a reply
/// cannot be sent.
pub fn serve_control<H>(stream: UnixStream, mut handler: H) -> Result<(), ControlError>
where
    H: FnMut(&str, &Value, Vec<OwnedFd>) -> Result<Value, String>,
{
    let mut framed = Framed::new(stream);
    framed.set_poll(Duration::ZERO);
    let mut reader = LineReader::default();
    loop {
        let mut fds = Vec::new();
        let line = match reader.read(&framed, &mut fds, None, Duration::ZERO) {
            Ok(l) => l,
            Err(FramingError::Closed) => return Ok(()),
            Err(FramingError::Io(e)) => return Err(ControlError::Io(e)),
            Err(e) => return Err(ControlError::Protocol(e.to_string())),
        };
        let reply = match line {
            Line::TooLong => json!({
                "id": null,
                "error": format!("request longer than {MAX_LINE} bytes"),
            }),
            Line::Complete(bytes) => answer(&bytes, fds, &mut handler),
        };
        match framed.send(&encode(&reply), &[], SEND_TIMEOUT) {
            Ok(()) => {}
            Err(FramingError::Closed) => return Ok(()),
            Err(FramingError::Io(e)) => return Err(ControlError::Io(e)),
            Err(FramingError::Timeout(t)) => return Err(ControlError::Timeout(t)),
            Err(e) => return Err(ControlError::Protocol(e.to_string())),
        }
    }
}

fn answer<H>(bytes: &[u8], fds: Vec<OwnedFd>, handler: &mut H) -> Value
where
    H: FnMut(&str, &Value, Vec<OwnedFd>) -> Result<Value, String>,
{
    let request: Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => return json!({"id": null, "error": format!("request is not JSON: {e}")}),
    };
    let id = match request.get("id") {
        Some(id @ Value::Number(n)) if n.is_u64() => id.clone(),
        _ => return json!({"id": null, "error": "request has no `id` (a non-negative integer)"}),
    };
    let Some(op) = request.get("op").and_then(Value::as_str) else {
        return json!({"id": id, "error": "request has no `op` (a string)"});
    };
    match handler(op, &request, fds) {
        Ok(v) => json!({"id": id, "ok": v}),
        Err(m) => json!({"id": id, "error": m}),
    }
}

/// A string member of a request, or an error naming it.
pub fn str_arg<'a>(request: &'a Value, name: &str) -> Result<&'a str, String> {
    request
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("`{name}` must be a string"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::thread;

    fn spawn_server<H>(handler: H) -> (UnixStream, thread::JoinHandle<Result<(), ControlError>>)
    where
        H: FnMut(&str, &Value, Vec<OwnedFd>) -> Result<Value, String> + Send + 'static,
    {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let t = thread::spawn(move || serve_control(b, handler));
        (a, t)
    }

    fn echo(op: &str, req: &Value, fds: Vec<OwnedFd>) -> Result<Value, String> {
        match op {
            "ping" => Ok(json!({})),
            "fail" => Err("refused: because".into()),
            "sleep" => {
                let ms = req.get("ms").and_then(Value::as_u64).unwrap_or(0);
                thread::sleep(Duration::from_millis(ms));
                Ok(json!({"slept": ms}))
            }
            "device-add" => {
                // Write into the passed socket to prove it arrived.
                let [fd] = <[OwnedFd; 1]>::try_from(fds).map_err(|v| format!("{} fds", v.len()))?;
                let mut s = UnixStream::from(fd);
                s.write_all(str_arg(req, "device")?.as_bytes())
                    .map_err(|e| e.to_string())?;
                Ok(json!({}))
            }
            "device-control" => Ok(json!({"echo": req.get("args").cloned()})),
            other => Err(format!("unknown op `{other}`")),
        }
    }

    #[test]
    fn control_ping_control_and_remote_errors() {
        let (a, t) = spawn_server(echo);
        let mut c = ControlClient::new(a, Duration::from_secs(5));
        c.ping().expect("ping");
        let v = c
            .device_control("d", "drive-list", json!({"x": [1, 2]}))
            .expect("control");
        assert_eq!(v, json!({"echo": {"x": [1, 2]}}));
        match c.device_del("d") {
            Err(ControlError::Remote(m)) => assert_eq!(m, "unknown op `device-del`"),
            other => panic!("{other:?}"),
        }
        match c.request("fail", Map::new(), &[]) {
            Err(ControlError::Remote(m)) => assert_eq!(m, "refused: because"),
            other => panic!("{other:?}"),
        }
        c.ping().expect("usable after errors");
        drop(c);
        t.join().expect("thread").expect("clean EOF");
    }

    #[test]
    fn control_passes_an_fd_with_device_add() {
        let (a, t) = spawn_server(echo);
        let mut c = ControlClient::new(a, Duration::from_secs(5));
        let (mine, theirs) = UnixStream::pair().expect("socketpair");
        c.device_add("dev0", "dma-example", None, 4, "", OwnedFd::from(theirs))
            .expect("device-add");
        let mut got = String::new();
        (&mine).read_to_string(&mut got).expect("read");
        assert_eq!(got, "dev0", "the remote wrote on the fd and closed it");
        drop(c);
        t.join().expect("thread").expect("EOF");
    }

    #[test]
    fn control_fds_stay_with_their_request() {
        // Two requests written back to back before the server reads: the
        // first carries no fd, the second one; each must see its own.
        let (a, b) = UnixStream::pair().expect("socketpair");
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let framed = Framed::new(a);
        let (_x, y) = UnixStream::pair().expect("socketpair");
        framed
            .send(b"{\"id\":1,\"op\":\"ping\"}\n", &[], SEND_TIMEOUT)
            .expect("send");
        framed
            .send(b"{\"id\":2,\"op\":\"ping\"}\n", &[y.as_fd()], SEND_TIMEOUT)
            .expect("send");
        drop(y);
        let t = thread::spawn(move || {
            serve_control(b, move |_, req, fds| {
                seen2
                    .lock()
                    .expect("lock")
                    .push((req["id"].as_u64(), fds.len()));
                Ok(json!({}))
            })
        });
        let mut reader = LineReader::default();
        let mut fds = Vec::new();
        let deadline = Some(Instant::now() + Duration::from_secs(5));
        for _ in 0..2 {
            reader
                .read(&framed, &mut fds, deadline, Duration::from_secs(5))
                .map_err(|e| e.to_string())
                .expect("reply");
        }
        drop(framed);
        t.join().expect("thread").expect("EOF");
        assert_eq!(
            *seen.lock().expect("lock"),
            vec![(Some(1), 0), (Some(2), 1)]
        );
    }

    #[test]
    fn control_malformed_lines_get_errors_and_the_connection_goes_on() {
        let (mut a, t) = spawn_server(echo);
        let mut big = vec![b'x'; MAX_LINE + 10];
        big.push(b'\n');
        a.write_all(b"garbage\n{\"op\":\"ping\"}\n{\"id\":3}\n")
            .expect("write");
        a.write_all(&big).expect("write");
        a.write_all(b"{\"id\":4,\"op\":\"ping\"}\n").expect("write");
        let framed = Framed::new(a.try_clone().expect("clone"));
        let mut reader = LineReader::default();
        let mut replies = Vec::new();
        for _ in 0..5 {
            let mut fds = Vec::new();
            let deadline = Some(Instant::now() + Duration::from_secs(5));
            match reader.read(&framed, &mut fds, deadline, Duration::from_secs(5)) {
                Ok(Line::Complete(l)) => {
                    replies.push(serde_json::from_slice::<Value>(&l).expect("json"))
                }
                _ => panic!("no reply"),
            }
        }
        assert!(replies[0]["error"]
            .as_str()
            .expect("e")
            .contains("not JSON"));
        assert_eq!(replies[0]["id"], Value::Null);
        assert!(replies[1]["error"].as_str().expect("e").contains("`id`"));
        assert_eq!(replies[2]["id"], json!(3));
        assert!(replies[2]["error"].as_str().expect("e").contains("`op`"));
        assert!(replies[3]["error"]
            .as_str()
            .expect("e")
            .contains("longer than"));
        assert_eq!(replies[4], json!({"id": 4, "ok": {}}));
        drop(framed);
        drop(a);
        t.join().expect("thread").expect("EOF");
    }

    #[test]
    fn control_timeout_then_stale_reply_is_skipped() {
        let (a, t) = spawn_server(echo);
        let mut c = ControlClient::new(a, Duration::from_millis(100));
        let mut body = Map::new();
        // Long enough that the second ping below is still inside it on a
        // slow machine.
        body.insert("ms".into(), json!(3000));
        let start = Instant::now();
        match c.request("sleep", body, &[]) {
            Err(ControlError::Timeout(d)) => assert_eq!(d, Duration::from_millis(100)),
            other => panic!("{other:?}"),
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        // The server is still sleeping: this ping times out as well...
        assert!(matches!(c.ping(), Err(ControlError::Timeout(_))));
        // ...and once it is awake, the stale replies are skipped.
        c.set_timeout(Duration::from_secs(5));
        c.ping().expect("ping after the remote woke up");
        drop(c);
        t.join().expect("thread").expect("EOF");
    }

    #[test]
    fn control_client_survives_a_garbage_peer() {
        let (a, mut b) = UnixStream::pair().expect("socketpair");
        let mut c = ControlClient::new(a, Duration::from_millis(200));
        // Silence: a timeout, not a hang.
        let start = Instant::now();
        assert!(matches!(c.ping(), Err(ControlError::Timeout(_))));
        assert!(start.elapsed() < Duration::from_secs(10));
        // Not JSON, then wrong shapes, then a future id.
        b.write_all(b"\xff\xfe not json\n").expect("write");
        assert!(matches!(c.ping(), Err(ControlError::Protocol(_))));
        // Request 3 gets a reply with its id but neither `ok` nor `error`.
        b.write_all(b"{\"id\": 3}\n").expect("write");
        assert!(matches!(c.ping(), Err(ControlError::Protocol(_))));
        // Request 4 gets a reply to a request never sent.
        b.write_all(b"{\"id\": 99, \"ok\": {}}\n").expect("write");
        assert!(matches!(c.ping(), Err(ControlError::Protocol(_))));
        b.write_all(b"[1,2,3]\n").expect("write");
        assert!(matches!(c.ping(), Err(ControlError::Protocol(_))));
        // Half a line, then EOF.
        b.write_all(b"{\"id\": 7, \"ok\"").expect("write");
        drop(b);
        assert!(matches!(c.ping(), Err(ControlError::Closed)));
        assert!(matches!(c.ping(), Err(ControlError::Closed)));
    }
}
