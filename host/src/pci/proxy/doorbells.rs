//! A remote function's doorbells: guest writes that KVM turns into an
//! eventfd signal (KVM_IOEVENTFD with a data match) for the remote's ring
//! thread, with no exit to the VMM (`channel::ring::DoorbellKey`,
//! `plugin_api::Device::doorbells`).
//!
//! A doorbell is rung once whenever it is registered, so that a guest
//! write swallowed by a registration that went away (a remote that died
//! and was replaced) still reaches the device.
//!
//! Each doorbell is registered at its BAR's current guest address while
//! the guest has the BAR placed and decoding on, and moved or dropped at
//! once when a configuration write changes that: an ioeventfd left at an
//! old address would swallow writes meant for whatever the guest put
//! there next.

use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, VmFd};
use pci::{BarType, ConfigSpace};
use vmm_sys_util::eventfd::EventFd;

use channel::ring::DoorbellKey;

/// One doorbell and where it is registered.
struct Bell {
    key: DoorbellKey,
    fd: EventFd,
    at: Option<IoEventAddress>,
}

/// The doorbells of one function.
pub struct Doorbells {
    vm: Arc<VmFd>,
    bells: Vec<Bell>,
}

fn same(a: &IoEventAddress, b: &IoEventAddress) -> bool {
    match (a, b) {
        (IoEventAddress::Mmio(x), IoEventAddress::Mmio(y)) => x == y,
        (IoEventAddress::Pio(x), IoEventAddress::Pio(y)) => x == y,
        _ => false,
    }
}

impl Doorbells {
    /// The doorbells `bells` (keys the remote accepted with these
    /// eventfds), not registered yet: [`Doorbells::sync`] places them.
    pub fn new(vm: Arc<VmFd>, bells: Vec<(DoorbellKey, EventFd)>) -> Self {
        Doorbells {
            vm,
            bells: bells
                .into_iter()
                .map(|(key, fd)| Bell { key, fd, at: None })
                .collect(),
        }
    }

    /// Keeps only the doorbells `keep` accepts (before any is registered).
    pub fn retain(&mut self, keep: impl Fn(&DoorbellKey) -> bool) {
        self.bells.retain(|b| keep(&b.key));
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.bells.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.bells.is_empty()
    }

    /// Registers, moves or drops each doorbell to match where `shadow`
    /// has its BAR now (placed and decoding: registered; else not).
    pub fn sync(&mut self, shadow: &ConfigSpace) {
        let active = shadow.active_bars();
        for b in &mut self.bells {
            let want = active
                .iter()
                .find(|a| a.index == usize::from(b.key.bar))
                .and_then(|a| {
                    let addr = a.base.checked_add(b.key.offset)?;
                    Some(if a.spec.bar_type == BarType::Io {
                        IoEventAddress::Pio(addr)
                    } else {
                        IoEventAddress::Mmio(addr)
                    })
                });
            let unchanged = match (&b.at, &want) {
                (Some(x), Some(y)) => same(x, y),
                (None, None) => true,
                _ => false,
            };
            if unchanged {
                continue;
            }
            unregister(&self.vm, b);
            if let Some(addr) = want {
                match register(&self.vm, &b.fd, &addr, &b.key) {
                    Ok(()) => {
                        b.at = Some(addr);
                        // Rung once now: a ring the guest made while this
                        // doorbell was nowhere (a restarted remote's old
                        // eventfd swallowed it) is not lost. A doorbell
                        // only asks the device to look for work, so an
                        // extra one costs a look.
                        if let Err(e) = b.fd.write(1) {
                            tracing::warn!("doorbell eventfd: {e}");
                        }
                    }
                    // The write then exits to the VMM and goes through the
                    // ring as any other: slower, never lost.
                    Err(e) => tracing::warn!(
                        "doorbell BAR{} {:#x}: KVM_IOEVENTFD at {addr:?}: {e}; its writes take the ring",
                        b.key.bar,
                        b.key.offset
                    ),
                }
            }
        }
    }

    /// Drops every registration (the function is going away or being
    /// replaced: its successor registers the same addresses).
    pub fn release(&mut self) {
        for b in &mut self.bells {
            unregister(&self.vm, b);
        }
    }
}

impl Drop for Doorbells {
    fn drop(&mut self) {
        self.release();
    }
}

/// KVM matches the data by the width of the value's type.
fn register(
    vm: &VmFd,
    fd: &EventFd,
    addr: &IoEventAddress,
    k: &DoorbellKey,
) -> Result<(), kvm_ioctls::Error> {
    match k.len {
        1 => vm.register_ioevent(fd, addr, k.value as u8),
        2 => vm.register_ioevent(fd, addr, k.value as u16),
        4 => vm.register_ioevent(fd, addr, k.value as u32),
        _ => vm.register_ioevent(fd, addr, k.value),
    }
}

fn unregister(vm: &VmFd, b: &mut Bell) {
    let Some(addr) = b.at.take() else {
        return;
    };
    let k = &b.key;
    let r = match k.len {
        1 => vm.unregister_ioevent(&b.fd, &addr, k.value as u8),
        2 => vm.unregister_ioevent(&b.fd, &addr, k.value as u16),
        4 => vm.unregister_ioevent(&b.fd, &addr, k.value as u32),
        _ => vm.unregister_ioevent(&b.fd, &addr, k.value),
    };
    if let Err(e) = r {
        tracing::warn!(
            "doorbell BAR{} {:#x}: unregistering at {addr:?}: {e}",
            k.bar,
            k.offset
        );
    }
}
