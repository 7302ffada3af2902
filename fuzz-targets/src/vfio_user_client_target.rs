//! vfio-user, the VMM's side: a hostile server's replies into our client
//! (`channel::vfio_user::VfioUserClient`), through every call the VMM
//! makes of it (set-up, accesses, DMA, interrupts, migration v2 and its
//! dirty log). The client must never panic, never wait past its timeout
//! and never take more memory than a reply's announced limits allow.
//!
//! The peer answers each request that wants a reply with the input's next
//! message. When the input's first byte is odd, the peer makes each
//! reply's id and command those of the request (so the fuzzer reaches the
//! parsing of each reply's payload without guessing ids); even, the
//! replies go as they are (mismatched replies, the client's checks).

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::vfio_user_target::fds_for_header;
use crate::wire::{client_session, make_fd, split, Answering, FdKind};
use channel::vfio_user::migration::{DmaRange, MigState, DEVICE_FEATURE_GET, FEATURE_MIGRATION};
use channel::vfio_user::{self, ClientOptions, Header, VfioUserClient, HEADER_SIZE};

/// The calls a VMM makes, each error ignored (a broken client fails the
/// rest at once).
fn session(sock: UnixStream) {
    let opts = ClientOptions {
        // The peer answers at once: a wait this long is a reply that
        // never comes (short, so such inputs stay cheap).
        timeout: Duration::from_millis(25),
        poll: Duration::ZERO,
        adaptive_poll: false,
        max_data_xfer_size: 64 << 10,
        max_msg_fds: 8,
    };
    let Ok(mut c) = VfioUserClient::from_stream(sock, opts) else {
        return;
    };
    let _ = c.device_info();
    for i in 0..vfio_user::PCI_NUM_REGIONS {
        let _ = c.region_info(i);
    }
    for i in 0..vfio_user::PCI_NUM_IRQS {
        let _ = c.irq_info(i);
    }
    let mut buf = [0u8; 256];
    let _ = c.region_read(vfio_user::PCI_CONFIG_REGION_INDEX, 0, &mut buf);
    let _ = c.region_read(0, 0x10, &mut buf[..4]);
    let _ = c.region_write(0, 0, &[1, 2, 3, 4]);
    let _ = c.region_write_posted(0, 4, &[5; 4]);
    let ram = make_fd(FdKind::SealedRam);
    let _ = c.dma_map(0, crate::wire::RAM_SIZE, ram.as_fd(), 0);
    let ev = make_fd(FdKind::Eventfd);
    let _ = c.set_irq_eventfds(vfio_user::PCI_INTX_IRQ_INDEX, 0, &[ev.as_fd()]);
    let _ = c.migration_flags();
    let _ = c.probe_feature(FEATURE_MIGRATION, DEVICE_FEATURE_GET);
    let _ = c.mig_state();
    let _ = c.set_mig_state(MigState::StopCopy);
    let _ = c.mig_read_all(1 << 20);
    let _ = c.set_mig_state(MigState::Resuming);
    let _ = c.mig_write_all(&[0x5a; 100]);
    let _ = c.dma_logging_start(
        4096,
        &[DmaRange {
            iova: 0,
            length: crate::wire::RAM_SIZE,
        }],
    );
    let _ = c.dma_logging_report(0, crate::wire::RAM_SIZE, 4096);
    let _ = c.dma_logging_stop();
    let _ = c.dma_unmap(0, crate::wire::RAM_SIZE);
    let _ = c.reset();
}

/// Our client against a server that answers with `data`.
pub fn vfio_user_client(data: &[u8]) {
    run(data);
}

/// [`vfio_user_client`]; the replies sent and those the input held.
fn run(data: &[u8]) -> (usize, usize) {
    let patch_ids = data.first().is_some_and(|b| b & 1 == 1);
    let replies = split(
        data.get(1..).unwrap_or(&[]),
        HEADER_SIZE,
        Header::size_of,
        fds_for_header,
    );
    let how = Answering {
        header_len: HEADER_SIZE,
        size_of: Header::size_of,
        // The client's largest request: a MIG_DATA_WRITE of
        // `max_data_xfer_size`.
        max_request: 1 << 20,
        // Posted requests get no reply.
        wants_reply: |req| {
            u32::from_le_bytes([req[8], req[9], req[10], req[11]]) & vfio_user::FLAG_NO_REPLY == 0
        },
        fit: Box::new(move |req, reply| {
            if patch_ids && reply.data.len() >= 4 {
                reply.data[..4].copy_from_slice(&req[..4]);
            }
        }),
    };
    client_session(replies, how, session)
}

#[cfg(test)]
mod tests {
    /// The session seed is a good reply to every call, so the fuzzer
    /// starts with the whole session reached.
    #[test]
    fn the_session_seed_answers_every_call() {
        let (sent, total) = super::run(&crate::seeds::named("vfio_user_client", "session"));
        assert!(total > 30, "{total} replies");
        assert_eq!(sent, total);
    }
}
