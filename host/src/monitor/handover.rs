//! The destination's side of a remote's hand-over (docs/migration.md,
//! "Handing a remote over"): once the source let the VM go, each remote
//! it handed over serves its devices on new connections, and those take
//! the slots where this VMM's own new remote's devices were; that remote
//! is stopped. The devices keep the state they have in the handed-over
//! process: nothing of theirs was copied.

use std::os::unix::net::UnixStream;
use std::sync::Arc;

use anyhow::{Context, Result};
use kvm_ioctls::VmFd;

use crate::bus::Bus;
use crate::memory::GuestRam;
use crate::pci::proxy::ProxyFunction;
use crate::pci::root::PciRoot;
use crate::snapshot::handover::Received;
use crate::supervisor::Remote;
use crate::vm::pci_gsi;

/// What a destination adopts remotes into.
pub struct Adopter<'a> {
    pub config: &'a config::Config,
    pub vm: &'a Arc<VmFd>,
    pub ram: &'a GuestRam,
    pub bus: &'a Bus,
    pub events: &'a qmp::EventSender,
}

impl Adopter<'_> {
    /// Connects to each device of the handed-over remote `r` again and
    /// puts it in its slot (BARs, interrupt line, command register and
    /// MSI-X as the stream set them up there). Returns the remote, to
    /// take the place of the one this VMM spawned for it (which the
    /// caller stops).
    pub fn adopt(&self, r: Received) -> Result<Arc<Remote>> {
        let Received {
            offer,
            mut control,
            hangup,
            pidfd,
            pid,
        } = r;
        let rid = offer.remote.clone();
        let rcfg = self
            .config
            .remote(&rid)
            .with_context(|| format!("remote `{rid}` is not in the config"))?;
        let mut clients = Vec::new();
        for dev in &offer.devices {
            let slot = self
                .bus
                .pci
                .labels()
                .into_iter()
                .find(|(_, l)| &l.id == dev && l.remote.as_deref() == Some(&rid))
                .map(|(s, _)| s)
                .with_context(|| format!("device `{dev}` of remote `{rid}` has no slot here"))?;
            let (ours, theirs) = UnixStream::pair().context("socketpair")?;
            control
                .device_connect(dev, theirs.into())
                .map_err(|e| anyhow::anyhow!("remote `{rid}`: device-connect {dev}: {e}"))?;
            // The handshake is answered once the source's connection has
            // gone (the source shuts it down right after `GO`).
            let client = crate::remote::client_over(rcfg, ours)
                .with_context(|| format!("remote `{rid}`, device `{dev}`"))?;
            clients.push((dev.clone(), slot, client));
        }
        let remote =
            Arc::new(Remote::new(rcfg, Some(pid), Some(control), Some(hangup)).with_pidfd(pidfd));
        for (dev, slot, client) in clients {
            let mut proxy = ProxyFunction::new(&dev, client, self.ram, self.vm, pci_gsi(slot))
                .and_then(|p| p.with_msix(self.vm, &self.bus.msi_routes))
                .with_context(|| format!("device `{dev}`"))?
                .with_supervision(
                    remote.failed.clone(),
                    super::fail_hook(self.events, Some(&rid)),
                );
            remote.attach_fast_path(self.vm, &dev, &mut proxy);
            remote.add_device(&dev, Some(proxy.socket_fd()), proxy.activity());
            self.bus
                .pci
                .replace(slot, Box::new(proxy))
                .with_context(|| format!("device `{dev}`: its slot"))?;
        }
        tracing::info!(
            "remote {rid} (process {pid}) adopted with {} devices",
            offer.devices.len()
        );
        Ok(remote)
    }
}

/// How long the guest's accesses to a handed-over remote's devices wait
/// for its adoption (its devices' connections wait up to a minute for
/// the source's to go; the VM ends if they fail).
const ADOPTION_HOLD: std::time::Duration = std::time::Duration::from_secs(90);

/// Holds the guest's accesses to the slots of the remotes the source
/// handed over (bounded: [`ADOPTION_HOLD`]) until they are adopted, so
/// that the vCPUs can run before; both restore paths call it before the
/// guest runs. Returns the slots held.
pub fn hold(pci: &PciRoot, handed: &[Received]) -> Vec<u8> {
    let slots: Vec<u8> = pci
        .labels()
        .into_iter()
        .filter(|(_, l)| {
            handed
                .iter()
                .any(|h| l.remote.as_deref() == Some(h.offer.remote.as_str()))
        })
        .map(|(s, _)| s)
        .collect();
    pci.hold(&slots, ADOPTION_HOLD);
    slots
}

/// Logs how long adopting `n` remotes took since `started` (the source's
/// `GO`): part of the guest's pause that the source's `downtime` does not
/// see, since it ends at `GO` (`tests/migrate_bench.py` reads this line).
pub fn report(n: usize, started: std::time::Instant) {
    if n > 0 {
        tracing::info!(
            "{n} handed-over remote(s) adopted in {:.1} ms after the source's go",
            started.elapsed().as_secs_f64() * 1e3
        );
    }
}
