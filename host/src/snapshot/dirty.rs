//! Which guest pages changed since the last look, for pre-copy: KVM's
//! dirty log for the vCPUs' writes, and each device's DMA dirty log
//! (kept where the device's DMA calls are served: in this process for
//! in-process functions, in the remote for the others, asked for over
//! its control channel).

use std::collections::BTreeSet;

use anyhow::{Context, Result};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::ram::PAGE;
use super::Parts;

/// Turns KVM's dirty logging on or off for every RAM slot.
fn kvm_logging(p: &Parts, on: bool) -> Result<()> {
    for (slot, r) in p.ram.regions.iter().enumerate() {
        let host = p
            .ram
            .mem
            .get_host_address(GuestAddress(r.gpa))
            .context("guest RAM host address")?;
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: r.gpa,
            memory_size: r.size,
            userspace_addr: host as u64,
        };
        // SAFETY: the same slot, address and mapping the VM was built with
        // (owned by `ram`, which outlives the VM); only the flags change.
        unsafe { p.vm.set_user_memory_region(region) }
            .context("KVM_SET_USER_MEMORY_REGION (dirty logging)")?;
    }
    Ok(())
}

/// Runs `action` on every device's DMA dirty log.
fn device_logs(p: &Parts, action: &str) -> Result<Vec<(u64, u64)>> {
    let mut runs = Vec::new();
    for (slot, label) in p.bus.pci.labels() {
        match &label.remote {
            None => {
                let Some(Some(log)) = p.bus.pci.with_function(slot, |d| d.dirty_log()) else {
                    continue;
                };
                match action {
                    "start" => log.start(),
                    "stop" => log.stop(),
                    _ => runs.extend(log.take()),
                }
            }
            Some(rid) if p.remote(rid)?.has_control() => {
                let got = p
                    .remote(rid)?
                    .with_control(|c| c.dirty_log(&label.id, action))
                    .map_err(|e| anyhow::anyhow!("device `{}`: dirty log: {e}", label.id))?;
                runs.extend(got);
            }
            // vfio-user's DMA dirty logging on the device's connection.
            Some(_) => {
                let regions: Vec<(u64, u64)> =
                    p.ram.regions.iter().map(|r| (r.gpa, r.size)).collect();
                let got = p
                    .bus
                    .pci
                    .with_function(slot, |d| d.wire_dirty_log(action, &regions))
                    .unwrap_or_else(|| Err("the function is gone".into()))
                    .map_err(|e| anyhow::anyhow!("device `{}`: DMA dirty log: {e}", label.id))?;
                runs.extend(got);
            }
        }
    }
    Ok(runs)
}

/// Starts logging everywhere (and forgets what came before).
pub fn start(p: &Parts) -> Result<()> {
    kvm_logging(p, true)?;
    if let Err(e) = device_logs(p, "start") {
        let _ = stop(p);
        return Err(e);
    }
    Ok(())
}

/// Stops logging everywhere; errors are logged (the VM runs on either
/// way).
pub fn stop(p: &Parts) -> Result<()> {
    let a = device_logs(p, "stop");
    let b = kvm_logging(p, false);
    a.and(b).map(|_| ())
}

/// The pages written since the last take, as runs of guest RAM, each
/// inside one RAM region.
pub fn take(p: &Parts) -> Result<Vec<(u64, u64)>> {
    let mut pages: BTreeSet<u64> = BTreeSet::new();
    for (slot, r) in p.ram.regions.iter().enumerate() {
        let bitmap =
            p.vm.get_dirty_log(slot as u32, r.size as usize)
                .context("KVM_GET_DIRTY_LOG")?;
        for (w, word) in bitmap.iter().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let b = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                pages.insert(r.gpa / PAGE + w as u64 * 64 + b);
            }
        }
    }
    for (gpa, len) in device_logs(p, "take")? {
        if len == 0 {
            continue;
        }
        let last = gpa.saturating_add(len - 1) / PAGE;
        pages.extend(gpa / PAGE..=last);
    }
    // Only guest RAM (device runs are the remote's word); RAM regions are
    // apart (the MMIO hole lies between), so a run never spans two.
    let in_ram = |page: &u64| {
        let gpa = page * PAGE;
        p.ram
            .regions
            .iter()
            .any(|r| gpa >= r.gpa && gpa < r.gpa + r.size)
    };
    Ok(plugin_api::dirty::runs(pages.into_iter().filter(in_ram)))
}
