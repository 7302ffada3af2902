//! Handing a remote over to the destination VMM of a live migration on
//! this machine, instead of copying its devices' states
//! (docs/migration.md, "Handing a remote over").
//!
//! With `migrate-set-parameters {"x-remote-handover": true}` and a
//! `unix:` URI, every remote the source spawned (vfio-user, with our
//! control channel) is offered: at stop-and-copy its devices are quiesced
//! (`handover-prepare`) and, in place of their `device/ID` sections, the
//! stream carries one `handover/REMOTE` section ([`Offer`]); the last RAM
//! pass follows, with the devices' DMA up to then. After the end record:
//!
//! 1. the destination asks for the remotes' sockets ([`ASK`]);
//! 2. the source lends each offered remote's control channel (its
//!    heartbeats pause) and sends the control sockets and a pidfd of
//!    each process as `SCM_RIGHTS` on the migration socket itself, with
//!    the ids its requests reached ([`send_sockets`]);
//! 3. the destination applies the machine and answers `TAKEN`;
//! 4. the source clears each remote's parent-death signal
//!    (`handover-release`), lets its processes go, answers `GO`, and shuts
//!    its own device connections down;
//! 5. the destination asks each remote to serve each device on a new
//!    connection (`device-connect`; served once the source's connection
//!    has gone) and puts those in the devices' slots
//!    (`crate::monitor::handover::adopt`).
//!
//! Before `GO` nothing is lost: a failure or a cancel gives the control
//! channels back to the source, which runs on with its remotes (their
//! parent-death signal may be cleared; their control channel still ends
//! them with this VMM). After `GO` the remotes are the destination's; a
//! destination that then fails to reach them ends with an error, as it
//! does when its stream is cut.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use channel::control::ControlClient;
use config::Protocol;
use serde::{Deserialize, Serialize};

use super::Parts;
use crate::supervisor::{Remote, RemoteState};

/// The stream section that offers a remote: `handover/<remote id>`.
pub const SECTION: &str = "handover/";

/// The destination's byte after the end record when the stream offered
/// remotes: send their sockets.
pub const ASK: u8 = 0x08;

/// How many remotes one stream may offer: two fds each (control socket,
/// pidfd) in one message of at most [`channel::framing::MAX_FDS`].
pub const MAX_OFFERS: usize = channel::framing::MAX_FDS / 2;

/// The largest control request id a source may hand on (far from
/// overflowing, exactly representable in JSON).
const MAX_NEXT_ID: u64 = 1 << 53;

/// The largest sockets message (its JSON part).
const MAX_MESSAGE: usize = 64 << 10;

/// A remote offered in the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// Its `[[remote]] id`.
    pub remote: String,
    /// Its process, in the VMMs' PID namespace.
    pub pid: u32,
    /// The devices it serves, each in the slot the stream's machine
    /// section gives it.
    pub devices: Vec<String>,
}

/// The remotes this machine would hand over: those this VMM spawned
/// (a process of its own and our control channel), serving vfio-user.
/// Others (an orchestrator's sockets, `--remote-fd`, in-process devices)
/// go by copy in the same stream.
pub fn candidates(p: &Parts) -> Result<Vec<Arc<Remote>>> {
    let c: Vec<Arc<Remote>> = p
        .remotes
        .iter()
        .filter(|r| r.pid.is_some() && r.protocol == Protocol::VfioUser && r.has_control())
        .cloned()
        .collect();
    if c.len() > MAX_OFFERS {
        bail!(
            "{} remotes to hand over; one migration hands over at most {MAX_OFFERS}",
            c.len()
        );
    }
    Ok(c)
}

/// Quiesces `r`'s devices and describes it for the stream. A device still
/// busy after the bound fails the migration (the source runs on): its
/// late DMA would land in the source's RAM, already sent, and its
/// completion would go to the source, where a copy would have redone it
/// on the destination.
pub fn offer(r: &Remote) -> Result<Offer> {
    let pid = r.pid.context("a remote without a process of ours")?;
    let busy = r
        .with_control(|c| c.handover_prepare())
        .map_err(|e| anyhow::anyhow!("remote `{}`: preparing its hand-over: {e}", r.id))?;
    if !busy.is_empty() {
        bail!(
            "remote `{}`: devices still busy, not handed over: {}",
            r.id,
            busy.join(", ")
        );
    }
    Ok(Offer {
        remote: r.id.clone(),
        pid,
        devices: r.device_ids(),
    })
}

/// The sockets message: which remote each fd is, in order, and the id
/// the next control request there carries.
#[derive(Serialize, Deserialize)]
struct Sockets {
    remotes: Vec<SocketOf>,
}

#[derive(Serialize, Deserialize)]
struct SocketOf {
    remote: String,
    next_id: u64,
}

/// Control channels the source lent to a hand-over; given back when
/// dropped uncommitted (the migration failed or was cancelled).
pub struct Lent {
    lent: Vec<(Arc<Remote>, ControlClient)>,
}

impl Lent {
    /// `GO` is about to go: each remote stops dying with this VMM. On an
    /// error nothing is handed over (the channels come back on drop).
    pub fn release(&mut self) -> Result<()> {
        for (r, c) in &mut self.lent {
            c.handover_release()
                .map_err(|e| anyhow::anyhow!("remote `{}`: handover-release: {e}", r.id))?;
        }
        Ok(())
    }

    /// The remotes lent.
    pub fn remotes(&self) -> Vec<Arc<Remote>> {
        self.lent.iter().map(|(r, _)| r.clone()).collect()
    }

    /// `GO` went out: the remotes are the destination's (this VMM's
    /// copies of their control sockets close).
    pub fn commit(mut self) {
        for (r, _client) in std::mem::take(&mut self.lent) {
            r.handed_over();
        }
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        for (r, c) in self.lent.drain(..) {
            tracing::info!("remote {}: not handed over; supervised here again", r.id);
            r.return_control(c);
        }
    }
}

/// Answers the destination's [`ASK`]: lends each of `offered`'s control
/// channels and sends their sockets and pidfds on `stream`.
pub fn send_sockets(stream: &UnixStream, offered: &[Arc<Remote>]) -> Result<Lent> {
    tracing::info!("hand-over: the destination asks for the remotes' sockets");
    let mut lent = Lent { lent: Vec::new() };
    for r in offered {
        if r.state() != RemoteState::Running {
            bail!("remote `{}` is {}: not handed over", r.id, r.state().name());
        }
        let c = r
            .lend_control()
            .with_context(|| format!("remote `{}` has no control channel now", r.id))?;
        lent.lent.push((r.clone(), c));
    }
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut remotes = Vec::new();
    for (r, c) in &lent.lent {
        fds.push(
            r.control_socket()
                .with_context(|| format!("remote `{}`: no control socket to pass", r.id))?,
        );
        let pid = r.pid.context("a remote without a process of ours")?;
        fds.push(
            crate::remote::pidfd::open(pid)
                .with_context(|| format!("remote `{}`: pidfd_open({pid})", r.id))?,
        );
        remotes.push(SocketOf {
            remote: r.id.clone(),
            // One more: `handover-release` takes the next.
            next_id: c.next_id() + 1,
        });
    }
    let fds: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
    let json = serde_json::to_vec(&Sockets { remotes }).context("encoding the sockets message")?;
    let mut msg = (json.len() as u32).to_le_bytes().to_vec();
    msg.extend_from_slice(&json);
    send_with_fds(stream, &msg, &fds).context("sending the remotes' sockets")?;
    tracing::info!("hand-over: {} remote(s)' sockets sent", lent.lent.len());
    Ok(lent)
}

/// A remote the destination received: its offer and its control channel.
pub struct Received {
    pub offer: Offer,
    pub control: ControlClient,
    /// A duplicate of the control socket, for the supervisor to poll.
    pub hangup: OwnedFd,
    /// Its process (not the destination's child).
    pub pidfd: OwnedFd,
    /// The pid of that process here, read from the pidfd (not the one
    /// the stream claims).
    pub pid: u32,
}

/// Asks the source for the sockets of `offers` and takes them, each
/// checked against its offer (bounded by `within`).
pub fn receive_sockets(
    stream: &UnixStream,
    offers: Vec<Offer>,
    timeouts: impl Fn(&str) -> Duration,
    within: Duration,
) -> Result<Vec<Received>> {
    use std::io::Write;
    (&*stream)
        .write_all(&[ASK])
        .context("asking the source for its remotes' sockets")?;
    tracing::info!("hand-over: asking the source for its remotes' sockets");
    let (msg, fds) = recv_with_fds(stream, within)?;
    tracing::info!("hand-over: {} fds received", fds.len());
    let sockets: Sockets = serde_json::from_slice(&msg).context("the sockets message")?;
    if sockets.remotes.len() != offers.len() || fds.len() != 2 * offers.len() {
        bail!(
            "the source offered {} remotes and sent {} fds for {}",
            offers.len(),
            fds.len(),
            sockets.remotes.len()
        );
    }
    let mut out = Vec::new();
    let mut fds = fds.into_iter();
    for (offer, of) in offers.into_iter().zip(sockets.remotes) {
        let (Some(fd), Some(pidfd)) = (fds.next(), fds.next()) else {
            bail!("the source sent too few fds");
        };
        if of.remote != offer.remote {
            bail!(
                "the source sent remote `{}`'s socket where `{}` was offered",
                of.remote,
                offer.remote
            );
        }
        if !channel::framing::is_unix_stream_socket(fd.as_fd()) {
            bail!(
                "remote `{}`: what the source sent is not a UNIX stream socket",
                of.remote
            );
        }
        if of.next_id > MAX_NEXT_ID {
            bail!(
                "remote `{}`: request id {} is out of range",
                of.remote,
                of.next_id
            );
        }
        let pid = crate::remote::pidfd::pid_of(&pidfd).with_context(|| {
            format!(
                "remote `{}`: what the source sent is not a live process's pidfd",
                of.remote
            )
        })?;
        if pid != offer.pid {
            bail!(
                "remote `{}`: the stream says process {}, its pidfd is process {pid}",
                of.remote,
                offer.pid
            );
        }
        let hangup = fd
            .try_clone()
            .with_context(|| format!("remote `{}`: duplicating its socket", of.remote))?;
        let mut control = ControlClient::new(UnixStream::from(fd), timeouts(&offer.remote));
        control.resume_ids_from(of.next_id);
        out.push(Received {
            offer,
            control,
            hangup,
            pidfd,
            pid,
        });
    }
    Ok(out)
}

/// Sends `data` with `fds` on its first byte (bounded in time).
fn send_with_fds(stream: &UnixStream, data: &[u8], fds: &[BorrowedFd<'_>]) -> Result<()> {
    let framed = channel::framing::Framed::new(stream.try_clone().context("the migration socket")?);
    framed
        .send(data, fds, SEND_WITHIN)
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// How long sending the sockets message may take (a few hundred bytes).
const SEND_WITHIN: Duration = Duration::from_secs(10);

/// Receives the sockets message: a 4-byte length, that much JSON, and the
/// fds on its first byte; bounded in size, count and time.
fn recv_with_fds(stream: &UnixStream, within: Duration) -> Result<(Vec<u8>, Vec<OwnedFd>)> {
    let framed = channel::framing::Framed::new(stream.try_clone().context("the migration socket")?);
    let mut fds = Vec::new();
    let mut len = [0u8; 4];
    framed
        .recv_exact(&mut len, &mut fds, Some(within), within, false)
        .context("the source sent no sockets")?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_MESSAGE {
        bail!("the source's sockets message claims {len} bytes (at most {MAX_MESSAGE})");
    }
    let mut msg = vec![0u8; len];
    framed
        .recv_exact(&mut msg, &mut fds, Some(within), within, false)
        .context("the source's sockets message was cut short")?;
    if fds.len() > MAX_OFFERS {
        bail!(
            "the source sent {} sockets (at most {MAX_OFFERS})",
            fds.len()
        );
    }
    Ok((msg, fds))
}

/// Checks the offers a stream brought (at most [`MAX_OFFERS`], one per
/// remote) and that its sections name the same remote.
pub fn parse_offer(name: &str, bytes: &[u8], offers: &[Offer]) -> Result<Offer> {
    let id = name.strip_prefix(SECTION).unwrap_or(name);
    let offer: Offer = serde_json::from_slice(bytes)
        .with_context(|| format!("the stream's hand-over section for `{id}`"))?;
    if offer.remote != id {
        bail!(
            "the hand-over section `{name}` describes remote `{}`",
            offer.remote
        );
    }
    if offers.iter().any(|o| o.remote == offer.remote) {
        bail!("the stream offers remote `{id}` twice");
    }
    if offers.len() >= MAX_OFFERS {
        bail!("the stream offers more than {MAX_OFFERS} remotes");
    }
    Ok(offer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn offer(remote: &str, devices: &[&str]) -> Offer {
        Offer {
            remote: remote.into(),
            pid: std::process::id(),
            devices: devices.iter().map(|d| d.to_string()).collect(),
        }
    }

    /// A source that answers the ask with `json` and `fds`.
    fn source(
        a: UnixStream,
        json: &'static [u8],
        fds: Vec<OwnedFd>,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let mut ask = [0u8; 1];
            (&a).read_exact(&mut ask).unwrap();
            assert_eq!(ask[0], ASK);
            let mut msg = (json.len() as u32).to_le_bytes().to_vec();
            msg.extend_from_slice(json);
            let fds: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
            send_with_fds(&a, &msg, &fds).unwrap();
        })
    }

    fn ours() -> OwnedFd {
        crate::remote::pidfd::open(std::process::id()).unwrap()
    }

    fn receive(b: &UnixStream, offers: Vec<Offer>) -> Result<Vec<Received>> {
        receive_sockets(
            b,
            offers,
            |_| Duration::from_secs(1),
            Duration::from_secs(5),
        )
    }

    #[test]
    fn sockets_go_through_the_migration_socket_with_their_ids() {
        let (a, b) = UnixStream::pair().unwrap();
        let (c1, _c1_peer) = UnixStream::pair().unwrap();
        let (c2, _c2_peer) = UnixStream::pair().unwrap();
        let offers = vec![offer("r1", &["d1"]), offer("r2", &["d2", "d3"])];
        let json = br#"{"remotes":[{"remote":"r1","next_id":7},{"remote":"r2","next_id":9}]}"#;
        let sender = source(a, json, vec![c1.into(), ours(), c2.into(), ours()]);
        let got = receive(&b, offers.clone()).unwrap();
        sender.join().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].offer, offers[0]);
        assert_eq!(got[0].pid, std::process::id());
        assert_eq!(got[0].control.next_id(), 7);
        assert_eq!(got[1].control.next_id(), 9);
    }

    #[test]
    fn a_source_that_sends_the_wrong_sockets_is_refused() {
        let offers = vec![offer("r1", &[])];
        let refused = |json: &'static [u8], fds: Vec<OwnedFd>| {
            let (a, b) = UnixStream::pair().unwrap();
            let t = source(a, json, fds);
            let e = receive(&b, offers.clone()).err().unwrap();
            t.join().unwrap();
            format!("{e:#}")
        };
        let sock = || -> OwnedFd { UnixStream::pair().unwrap().0.into() };
        // A remote that was not offered.
        let e = refused(
            br#"{"remotes":[{"remote":"other","next_id":1}]}"#,
            vec![sock(), ours()],
        );
        assert!(e.contains("`other`"), "{e}");
        // A control socket but no pidfd.
        let e = refused(
            br#"{"remotes":[{"remote":"r1","next_id":1}]}"#,
            vec![sock()],
        );
        assert!(e.contains("sent 1 fds"), "{e}");
        // A pidfd that is not one, and a socket that is not a socket.
        let e = refused(
            br#"{"remotes":[{"remote":"r1","next_id":1}]}"#,
            vec![sock(), sock()],
        );
        assert!(e.contains("pidfd"), "{e}");
        let null = || -> OwnedFd { std::fs::File::open("/dev/null").unwrap().into() };
        let e = refused(
            br#"{"remotes":[{"remote":"r1","next_id":1}]}"#,
            vec![null(), ours()],
        );
        assert!(e.contains("not a UNIX stream socket"), "{e}");
        // An id that would overflow.
        let e = refused(
            br#"{"remotes":[{"remote":"r1","next_id":18446744073709551615}]}"#,
            vec![sock(), ours()],
        );
        assert!(e.contains("out of range"), "{e}");
        // A lying length.
        let (a, b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let mut ask = [0u8; 1];
            (&a).read_exact(&mut ask).unwrap();
            (&a).write_all(&u32::MAX.to_le_bytes()).unwrap();
        });
        let e = receive(&b, offers.clone()).err().unwrap();
        t.join().unwrap();
        assert!(format!("{e:#}").contains("claims"), "{e:#}");
        // A source that says nothing: bounded.
        let (_a, b) = UnixStream::pair().unwrap();
        let t0 = std::time::Instant::now();
        assert!(receive_sockets(
            &b,
            offers,
            |_| Duration::from_secs(1),
            Duration::from_millis(200)
        )
        .is_err());
        assert!(t0.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn offers_are_checked() {
        let o = br#"{"remote":"r1","pid":5,"devices":["d"]}"#;
        let first = parse_offer("handover/r1", o, &[]).unwrap();
        assert_eq!(first.pid, 5);
        assert!(parse_offer("handover/r2", o, &[]).is_err());
        assert!(parse_offer("handover/r1", o, &[first]).is_err());
        assert!(parse_offer("handover/r1", b"{", &[]).is_err());
    }
}
