//! Serving a device's access ring (`channel::ring`): the fast path the
//! VMM sets up over the control channel (`ring-setup`) for a remote it
//! spawned. A thread per device takes the BAR accesses the VMM publishes
//! and runs them on the device under its lock, the same calls the socket
//! path makes; the socket keeps serving everything else (configuration
//! accesses, DMA maps, interrupts, reset), which the VMM only sends once
//! the ring is drained.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use channel::ring::{Access, MirrorKey, RingFds, RingServer};

use crate::devices::RemoteDevice;

/// How often an idle ring thread wakes by itself (stopping it wakes it at
/// once): once a second is all an idle device costs.
const STOP_CHECK: Duration = Duration::from_secs(1);

/// A device's ring thread. Dropping it asks the thread to stop (and wakes
/// it) without waiting; [`RingThread::stop`] waits.
pub struct RingThread {
    stop: Arc<AtomicBool>,
    waker: channel::ring::RingWaker,
    thread: Option<JoinHandle<()>>,
    dev: Arc<RemoteDevice>,
    /// Whether the device was told its writes are posted.
    posted: bool,
    /// Whether the VMM's accesses are all applied.
    pub watch: channel::ring::RingWatch,
}

/// Maps the ring and starts serving it for `dev`, with the registers the
/// device lets the VMM mirror (`Device::mirrored_reads`) kept in the page.
pub fn start(
    dev: Arc<RemoteDevice>,
    fds: RingFds,
    doorbells: Vec<(std::os::fd::OwnedFd, channel::ring::DoorbellKey)>,
    poll: Duration,
    posted: bool,
) -> Result<RingThread, String> {
    let mut server = RingServer::new(fds, poll).map_err(|e| e.to_string())?;
    server.set_doorbells(doorbells);
    let taken = server.doorbells_taken();
    let (mirrors, refused) = dev.function().mirrored_reads();
    for why in refused {
        tracing::warn!(device = %dev.id, "{why}");
    }
    let keys: Vec<MirrorKey> = mirrors
        .iter()
        .map(|m| MirrorKey {
            bar: m.bar,
            offset: m.offset,
            len: m.len,
        })
        .collect();
    server.set_mirrors(&keys);
    let watch = server.watch();
    let waker = server.waker();
    if !keys.is_empty() {
        dev.mirrors.attach(Some(server.invalidator()));
        tracing::info!(device = %dev.id, mirrors = keys.len(), "mirrored registers on the ring");
    }
    // From now on no vCPU waits for the device's writes: it may do the
    // work they start inline (a device that does not know the notice
    // refuses it, and nothing changes). Only when the config asks.
    if posted {
        posted_writes(&dev, true);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let id = dev.id.clone();
    let served = dev.clone();
    let thread = std::thread::Builder::new()
        .name(format!("ring-{id}"))
        .spawn(move || {
            server.serve(
                &|| flag.load(Ordering::Relaxed),
                STOP_CHECK,
                |access, bar, offset, data| {
                    let mut f = dev.function();
                    match access {
                        Access::Read => f.bar_read(bar, offset, data).is_ok(),
                        Access::Write => f.bar_write(bar, offset, data).is_ok(),
                    }
                },
            );
            tracing::info!(
                device = %dev.id,
                doorbells_taken = taken.load(),
                "access ring stopped"
            );
        })
        .map_err(|e| format!("device `{id}`: cannot start its ring thread: {e}"))?;
    Ok(RingThread {
        stop,
        waker,
        thread: Some(thread),
        dev: served,
        posted,
        watch,
    })
}

/// Tells the device whether its BAR writes are posted
/// (`plugin_api::control::POSTED_WRITES`).
fn posted_writes(dev: &RemoteDevice, on: bool) {
    let args = plugin_api::control::json!({ "on": on });
    if dev
        .function()
        .control(plugin_api::control::POSTED_WRITES, &args)
        .is_ok()
    {
        tracing::debug!(device = %dev.id, on, "posted writes");
    }
}

impl RingThread {
    /// Stops the thread and waits for it (bounded: a device call that
    /// never returns leaves it running).
    pub fn stop(mut self, within: Duration) -> bool {
        self.stop.store(true, Ordering::Relaxed);
        self.waker.wake();
        self.dev.mirrors.attach(None);
        let Some(thread) = self.thread.take() else {
            return true;
        };
        let stopped = crate::join_within(thread, within);
        if stopped && self.posted {
            // Writes come on the socket again, where a vCPU may wait.
            posted_writes(&self.dev, false);
        }
        stopped
    }
}

impl Drop for RingThread {
    /// A ring thread nobody stopped (its entry dropped) would otherwise
    /// serve the device forever.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.waker.wake();
        self.dev.mirrors.attach(None);
    }
}
