//! mpqemu, the VMM's side: a hostile remote's `RET`s into our client
//! (`channel::mpqemu::MpqemuClient`), through every call the VMM's proxy
//! makes (set-up, configuration and BAR accesses, posted writes and their
//! late `RET`s, reset). The client must never panic, never wait past its
//! timeout, and take no more memory than one message's limit.
//!
//! The peer answers each request QEMU's remote answers (all but
//! SYNC_SYSMEM and SET_IRQFD) with the input's next message, as it is:
//! mpqemu has no message ids, so order is all there is to check.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::wire::{client_session, make_fd, split, Answering, FdKind};
use channel::mpqemu::{ClientOptions, Command, Header, MpqemuClient, SysmemRegion, HEADER_SIZE};

/// The calls the VMM's proxy makes, each error ignored.
fn session(sock: UnixStream) {
    let mut c = MpqemuClient::from_stream(
        sock,
        ClientOptions {
            // The peer answers at once: a wait this long is a reply that
            // never comes. Short, so such inputs stay cheap: at 25 ms the
            // fuzzer spent most of its time waiting (under 300 inputs a
            // second on a third of a core). On a loaded machine a reply
            // may come later than this; the client then takes the peer for
            // hung, which is one more path it must survive.
            timeout: Duration::from_millis(4),
            poll: Duration::ZERO,
            adaptive_poll: false,
            max_posted: 8,
        },
    );
    let ram = make_fd(FdKind::SealedRam);
    let _ = c.sync_sysmem(&[SysmemRegion {
        gpa: 0,
        size: crate::wire::RAM_SIZE,
        offset: 0,
        fd: ram.as_fd(),
    }]);
    let (irq, resample) = (make_fd(FdKind::Eventfd), make_fd(FdKind::Eventfd));
    let _ = c.set_irqfd(irq.as_fd(), resample.as_fd());
    let _ = c.config_read(0, 4);
    let _ = c.config_read(0x10, 4);
    let _ = c.config_write(0x10, 0xffff_ffff, 4);
    let _ = c.config_read(0x10, 4);
    let _ = c.config_write(0x10, 0xfebf_0000, 4);
    let _ = c.bar_read(0xfebf_0000, 4, true);
    let _ = c.bar_read(0xfebf_0000, 8, true);
    let _ = c.bar_write(0xfebf_0004, 0x55, 1, true);
    for i in 0..12 {
        let _ = c.bar_write_posted(0xfebf_0008, i, 4, true);
    }
    let _ = c.flush();
    let _ = c.bar_read(0xc000, 2, false);
    let _ = c.reset();
}

/// Our client against a remote that answers with `data`.
pub fn mpqemu_client(data: &[u8]) {
    run(data);
}

/// [`mpqemu_client`]; the replies sent and those the input held.
fn run(data: &[u8]) -> (usize, usize) {
    let replies = split(data, HEADER_SIZE, Header::size_of, |h| {
        crate::mpqemu_target::fds_for_header(h)
    });
    let how = Answering {
        header_len: HEADER_SIZE,
        size_of: Header::size_of,
        // The client's largest request is a SYNC_SYSMEM.
        max_request: 64 << 10,
        // QEMU's remote answers all but these.
        wants_reply: |req| {
            let cmd = Header::parse(req).map_or(-1, |h| h.cmd);
            cmd != Command::SyncSysmem as i32 && cmd != Command::SetIrqfd as i32
        },
        fit: Box::new(|_, _| {}),
    };
    client_session(replies, how, session)
}

#[cfg(test)]
mod tests {
    /// The session seed answers every call that waits for an answer.
    #[test]
    fn the_session_seed_answers_every_call() {
        let (sent, total) = super::run(&crate::seeds::named("mpqemu_client", "session"));
        assert!(total > 15, "{total} replies");
        assert_eq!(sent, total);
    }
}
