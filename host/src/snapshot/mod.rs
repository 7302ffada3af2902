//! Snapshots: the whole machine, paused, as one stream (docs/migration.md).
//!
//! A snapshot holds every vCPU (registers, FPU/XSAVE, MSRs, LAPIC,
//! events), the in-kernel PIC, IOAPIC and PIT, the KVM clock, the VMM's
//! legacy devices, each PCI function's configuration and MSI-X table as
//! the guest set them up, each device's own state (its plugin's
//! `save_state`, taken in this process or over its remote's control
//! channel), and guest RAM. It is restored into a VMM started from the
//! same config (`host run CONFIG --incoming file:PATH`), with new
//! remotes: nothing of the old processes is needed.
//!
//! The stream ([`stream`]) is the same on a file and on a socket; the
//! reader applies RAM as it comes and the rest at the end record, so a
//! stream cut short changes nothing but RAM that is overwritten anyway.
//!
//! Device state before RAM: a device's DMA that lands after its state
//! was taken is in the RAM copy and also redone by the restored device
//! (a read runs again with the same data; the LSI answers a write that
//! was in flight with BUSY and the guest's driver retries it).

pub mod dirty;
pub mod handover;
pub mod legacy;
pub mod pci;
pub mod ram;
pub mod stream;
pub mod uri;
pub mod vcpu;
pub mod verify;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use config::Protocol;
use kvm_bindings::kvm_clock_data;
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::bus::Bus;
use crate::exit::ExitSignal;
use crate::memory::GuestRam;
use crate::reset::IrqchipState;
use crate::supervisor::Remote;
use legacy::LegacyState;
use pci::FunctionImage;
use stream::Record;
use uri::{Listener, MigrationUri, GO, HANDSHAKE_TIMEOUT, TAKEN};
use vcpu::VcpuState;

/// The machine's parts a snapshot reads or writes. The vCPUs must be
/// out of KVM_RUN (held at their gate, or not started yet).
pub struct Parts<'a> {
    pub vm: &'a VmFd,
    pub ram: &'a GuestRam,
    pub bus: &'a Bus,
    pub exit: &'a Arc<ExitSignal>,
    pub vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    pub remotes: Vec<Arc<Remote>>,
    /// KVM's list of MSRs to save (KVM_GET_MSR_INDEX_LIST, read at
    /// start-up).
    pub msr_indices: &'a [u32],
    /// A live save hands its remotes over instead of copying their
    /// devices' states ([`handover`]).
    pub handover: bool,
}

impl Parts<'_> {
    pub(crate) fn remote(&self, id: &str) -> Result<&Arc<Remote>> {
        self.remotes
            .iter()
            .find(|r| r.id == id)
            .with_context(|| format!("remote `{id}` is unknown"))
    }
}

/// Everything but RAM and the devices' own states.
#[derive(Serialize, Deserialize)]
struct MachineImage {
    memory: u64,
    vcpus: Vec<VcpuState>,
    irqchip: IrqchipState,
    clock: kvm_clock_data,
    legacy: LegacyState,
    functions: Vec<FunctionImage>,
}

/// What a save wrote.
#[derive(Default, Clone)]
pub struct Saved {
    pub ram: ram::Sent,
    pub device_bytes: u64,
    pub devices: usize,
    /// The remotes offered to the destination instead ([`handover`]).
    pub offered: Vec<Arc<Remote>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn ram_size(ram: &GuestRam) -> u64 {
    ram.regions.iter().map(|r| r.size).sum()
}

/// Why this machine cannot be saved, if it cannot: a device in an mpqemu
/// remote (that dialect has no migration), or in a remote we cannot ask
/// for its state (one an orchestrator started, without our control
/// channel).
pub fn check_savable(p: &Parts) -> Result<()> {
    for (slot, label) in p.bus.pci.labels() {
        let Some(rid) = &label.remote else { continue };
        let r = p
            .remote(rid)
            .with_context(|| format!("device `{}`", label.id))?;
        if r.protocol == Protocol::Mpqemu {
            bail!(
                "device `{}` is served over mpqemu (remote `{rid}`), which has no migration: this VM cannot be saved or migrated",
                label.id
            );
        }
        if !r.has_control() {
            // Then its own protocol must carry the state (vfio-user
            // migration v2).
            let wire = p
                .bus
                .pci
                .with_function(slot, |d| d.wire_migration())
                .unwrap_or_else(|| Err("it is gone".into()));
            if let Err(e) = wire {
                bail!(
                    "device `{}`: remote `{rid}` has no control channel of ours, and its vfio-user connection cannot carry its state: {e}",
                    label.id
                );
            }
        }
    }
    Ok(())
}

/// How long a device's own work in flight may take to finish before its
/// state is taken anyway.
const QUIESCE: std::time::Duration = std::time::Duration::from_secs(5);

/// Each device's state, in this process or from its remote, once the I/O
/// it had in flight finished (bounded): the vCPUs are stopped, so none
/// starts, and the restored device has nothing to redo.
fn device_states(p: &Parts, offered: &[Arc<Remote>]) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for (slot, label) in p.bus.pci.labels() {
        if label
            .remote
            .as_ref()
            .is_some_and(|rid| offered.iter().any(|r| &r.id == rid))
        {
            continue;
        }
        let state = match &label.remote {
            None => p
                .bus
                .pci
                .with_function(slot, |d| d.save_state_quiesced(QUIESCE))
                .flatten()
                .unwrap_or_else(|| Err("the function keeps no state here".into())),
            Some(rid) if p.remote(rid)?.has_control() => p
                .remote(rid)?
                .with_control(|c| c.device_save_with(&label.id, true)),
            // vfio-user migration v2 on the device's own connection.
            Some(_) => p
                .bus
                .pci
                .with_function(slot, |d| d.save_state_quiesced(QUIESCE))
                .flatten()
                .unwrap_or_else(|| Err("the function is gone".into())),
        };
        let state = state.map_err(|e| anyhow::anyhow!("saving device `{}`: {e}", label.id))?;
        out.push((label.id, state));
    }
    Ok(out)
}

/// The machine's registers and set-up (no RAM, no device state).
fn machine_image(p: &Parts) -> Result<MachineImage> {
    let mut vcpus = Vec::new();
    for (id, v) in p.vcpus.iter().enumerate() {
        let fd = lock(v);
        vcpus.push(VcpuState::read(&fd, p.msr_indices).with_context(|| format!("vCPU {id}"))?);
    }
    let mut functions = Vec::new();
    for (slot, label) in p.bus.pci.labels() {
        if let Some(f) = p
            .bus
            .pci
            .with_function(slot, |d| FunctionImage::read(slot, &label, d))
        {
            functions.push(f);
        }
    }
    Ok(MachineImage {
        memory: ram_size(p.ram),
        vcpus,
        irqchip: IrqchipState::read(p.vm)?,
        clock: p.vm.get_clock().context("KVM_GET_CLOCK")?,
        legacy: LegacyState::read(p.bus),
        functions,
    })
}

/// Writes each device's state, or its remote's offer, and the machine
/// (the vCPUs stopped).
fn write_devices_and_machine(p: &Parts, w: &mut impl Write) -> Result<Saved> {
    let mut saved = Saved::default();
    if p.handover {
        for r in handover::candidates(p)? {
            let offer = handover::offer(&r)?;
            let bytes = serde_json::to_vec(&offer).context("encoding a hand-over offer")?;
            stream::write_section(w, &format!("{}{}", handover::SECTION, r.id), &bytes)?;
            saved.offered.push(r);
        }
    }
    for (id, state) in device_states(p, &saved.offered)? {
        saved.device_bytes += state.len() as u64;
        saved.devices += 1;
        stream::write_section(w, &format!("device/{id}"), &state)?;
    }
    let image = serde_json::to_vec(&machine_image(p)?).context("encoding the machine")?;
    stream::write_section(w, "machine", &image)?;
    Ok(saved)
}

/// Writes the paused machine to `w`: the devices' states, the machine,
/// then RAM.
pub fn save(p: &Parts, w: &mut impl Write) -> Result<Saved> {
    check_savable(p)?;
    stream::write_header(w)?;
    let mut saved = write_devices_and_machine(p, w)?;
    let mut ledger = verify::enabled().then(|| verify::Ledger::new(p.ram));
    saved.ram = ram::send_runs(p.ram, w, &ram::all(p.ram), ledger.as_mut())?;
    stream::write_end(w)?;
    w.flush()?;
    if let Some(ledger) = &ledger {
        report_verdict(p.ram, ledger);
    }
    Ok(saved)
}

/// How many device sections a stream may carry (one per PCI slot).
const MAX_DEVICES: usize = 32;
/// How many bytes of device state a stream may carry in all (the LSI's is
/// about 17 KiB), so that a hostile stream cannot make the destination
/// hold 32 sections of the largest size.
const MAX_DEVICE_BYTES: usize = 64 << 20;

/// The device states a stream brought, bounded in count and bytes.
#[derive(Default)]
struct DeviceStates {
    states: BTreeMap<String, Vec<u8>>,
    bytes: usize,
}

impl DeviceStates {
    fn insert(&mut self, id: &str, state: Vec<u8>) -> Result<()> {
        if self.states.contains_key(id) {
            bail!("the snapshot has two states for device `{id}`");
        }
        if self.states.len() >= MAX_DEVICES {
            bail!("the snapshot holds more than {MAX_DEVICES} device states");
        }
        if self.bytes + state.len() > MAX_DEVICE_BYTES {
            bail!(
                "the snapshot's device states exceed {} MiB",
                MAX_DEVICE_BYTES >> 20
            );
        }
        self.bytes += state.len();
        self.states.insert(id.to_owned(), state);
        Ok(())
    }
}

/// Reads a snapshot from `r` into a machine just built from the same
/// config, whose vCPUs have not run yet (or are held). RAM is written as
/// it comes; everything else once the whole stream is in.
pub fn restore(p: &Parts, r: &mut impl Read) -> Result<()> {
    let read = read_stream(p, r)?;
    if !read.offers.is_empty() {
        bail!("the stream hands remotes over, which only a live migration on this machine can");
    }
    apply(p, read.image, read.states.states, &[])
}

/// What a stream brought, RAM aside (written as it came).
struct ReadStream {
    image: MachineImage,
    states: DeviceStates,
    offers: Vec<handover::Offer>,
}

fn read_stream(p: &Parts, r: &mut impl Read) -> Result<ReadStream> {
    stream::read_header(r)?;
    let mut image: Option<MachineImage> = None;
    let mut states = DeviceStates::default();
    let mut offers = Vec::new();
    loop {
        match stream::read_record(r)? {
            Record::Ram { gpa, bytes } => ram::receive(p.ram, gpa, &bytes)?,
            Record::RamZero { gpa, len } => ram::receive_zero(p.ram, gpa, len)?,
            Record::Section { name, bytes } if name == "machine" => {
                image = Some(
                    serde_json::from_slice(&bytes)
                        .context("the snapshot's machine section is not this VMM's")?,
                );
            }
            Record::Section { name, bytes } if name.starts_with(handover::SECTION) => {
                offers.push(handover::parse_offer(&name, &bytes, &offers)?);
            }
            Record::Section { name, bytes } => {
                let Some(id) = name.strip_prefix("device/") else {
                    bail!("unknown section `{name}` in the snapshot");
                };
                states.insert(id, bytes)?;
            }
            Record::End => break,
        }
    }
    let image = image.context("the snapshot has no machine section")?;
    if verify::enabled() {
        match verify::digest(p.ram) {
            Ok(d) => tracing::info!("migration verify: restored RAM digest {d:016x}"),
            Err(e) => tracing::warn!("migration verify: {e:#}"),
        }
    }
    Ok(ReadStream {
        image,
        states,
        offers,
    })
}

/// Reads the machine from a migration stream (the vCPUs not started, or
/// held). Waits for the source as QEMU's `-incoming` does; once the whole
/// stream is applied, tells the source, and runs the guest only when the
/// source answers that it let it go.
///
/// Remotes the source handed over come back with their control channels,
/// for the caller to put in their devices' slots
/// (`crate::monitor::handover::adopt`) before the guest runs.
pub fn restore_incoming(
    parts: &Parts,
    uri: &MigrationUri,
    listener: Listener,
) -> Result<Vec<handover::Received>> {
    let t = std::time::Instant::now();
    let mut stream = listener.accept()?;
    let read = read_stream(
        parts,
        &mut std::io::BufReader::with_capacity(1 << 20, &mut stream),
    )?;
    // The source sends nothing after the end record until asked, so the
    // reader above took nothing that follows.
    let mut received = Vec::new();
    if !read.offers.is_empty() {
        let Some(sock) = stream.unix() else {
            bail!("the source hands remotes over, which needs a unix: migration");
        };
        for o in &read.offers {
            check_offer(parts, o)?;
        }
        let timeouts = |id: &str| parts.remote(id).map_or(HANDSHAKE_TIMEOUT, |r| r.timeout);
        received =
            handover::receive_sockets(sock, read.offers.clone(), timeouts, HANDSHAKE_TIMEOUT)?;
    }
    tracing::info!("stream read from {uri} in {:?}", t.elapsed());
    apply(parts, read.image, read.states.states, &read.offers)?;
    tracing::info!("restored from {uri} in {:?}", t.elapsed());
    if !uri.is_live() {
        return Ok(received);
    }
    stream
        .write_all(&[TAKEN])
        .and_then(|()| stream.flush())
        .context("telling the source the VM is taken")?;
    // The guest runs here only once the source has let it go.
    stream.set_read_deadline(HANDSHAKE_TIMEOUT)?;
    let mut go = [0u8; 1];
    match stream.read(&mut go) {
        Ok(1) if go[0] == GO => Ok(received),
        Ok(_) => bail!("the source did not hand the VM over (it closed the stream)"),
        Err(e) => bail!("the source did not hand the VM over: {e}"),
    }
}

/// An offered remote is one this VM has too, serving the same devices.
fn check_offer(p: &Parts, o: &handover::Offer) -> Result<()> {
    let r = p
        .remote(&o.remote)
        .with_context(|| format!("the source hands over remote `{}`", o.remote))?;
    if r.protocol != Protocol::VfioUser {
        bail!("remote `{}` is not a vfio-user remote here", o.remote);
    }
    let mut here: Vec<String> = p
        .bus
        .pci
        .labels()
        .into_iter()
        .filter(|(_, l)| l.remote.as_deref() == Some(&o.remote))
        .map(|(_, l)| l.id)
        .collect();
    let mut there = o.devices.clone();
    here.sort();
    there.sort();
    if here != there {
        bail!(
            "remote `{}` serves {there:?} on the source and {here:?} here",
            o.remote
        );
    }
    Ok(())
}

/// Applies a stream read whole; the devices of `offers`' remotes keep the
/// state they have in the remote itself.
fn apply(
    p: &Parts,
    image: MachineImage,
    mut states: BTreeMap<String, Vec<u8>>,
    offers: &[handover::Offer],
) -> Result<()> {
    if image.memory != ram_size(p.ram) {
        bail!(
            "the snapshot's guest has {} MiB of RAM, this VM {} MiB",
            image.memory >> 20,
            ram_size(p.ram) >> 20
        );
    }
    if image.vcpus.len() != p.vcpus.len() {
        bail!(
            "the snapshot's guest has {} vCPUs, this VM {}",
            image.vcpus.len(),
            p.vcpus.len()
        );
    }
    let here: Vec<(u8, String)> = p
        .bus
        .pci
        .labels()
        .into_iter()
        .map(|(s, l)| (s, l.id))
        .collect();
    let there: Vec<(u8, String)> = image
        .functions
        .iter()
        .map(|f| (f.slot, f.id.clone()))
        .collect();
    if here != there {
        bail!("the snapshot's PCI functions (slot, id) are {there:?}, this VM's {here:?}");
    }
    // The machine first, then the devices: a device may raise an
    // interrupt the moment its state is back (virtio-blk signals each
    // queue once after a restore), and the irqchip's and vCPUs' state
    // written after it would erase that interrupt from the local APIC
    // (KVM_SET_LAPIC replaces IRR), leaving the guest waiting for good.
    image.legacy.write(p.bus, p.exit)?;
    image.irqchip.restore(p.vm)?;
    let mut clock = image.clock;
    // The guest's clock goes on from where it stopped (no jump by the
    // time the snapshot spent on disk).
    clock.flags = 0;
    p.vm.set_clock(&clock).context("KVM_SET_CLOCK")?;
    for (id, (v, s)) in p.vcpus.iter().zip(&image.vcpus).enumerate() {
        s.write(&lock(v)).with_context(|| format!("vCPU {id}"))?;
    }
    for f in &image.functions {
        f.write(&p.bus.pci)?;
        // Keyed on the offers' own device lists (checked against this
        // VM's slots), not on what the machine section says.
        if offers.iter().any(|o| o.devices.contains(&f.id)) {
            // Handed over: its remote holds its state; its slot gets the
            // remote's connection once the source let go.
            continue;
        }
        let state = states
            .remove(&f.id)
            .with_context(|| format!("the snapshot has no state for device `{}`", f.id))?;
        let done = match &f.remote {
            None => p
                .bus
                .pci
                .with_function(f.slot, |d| d.restore_state(&state))
                .flatten()
                .unwrap_or_else(|| Err("the function keeps no state here".into())),
            Some(rid) if p.remote(rid)?.has_control() => p
                .remote(rid)?
                .with_control(|c| c.device_restore(&f.id, &state)),
            Some(_) => p
                .bus
                .pci
                .with_function(f.slot, |d| d.restore_state(&state))
                .flatten()
                .unwrap_or_else(|| Err("the function is gone".into())),
        };
        done.map_err(|e| anyhow::anyhow!("restoring device `{}`: {e}", f.id))?;
    }
    if let Some(id) = states.keys().next() {
        bail!("the snapshot has a state for device `{id}`, which this VM does not have");
    }
    Ok(())
}

/// How a live migration decides when to stop the vCPUs.
#[derive(Debug, Clone, Copy)]
pub struct Precopy {
    /// The longest the guest may stay stopped (QEMU's `downtime-limit`):
    /// pre-copy goes on until what is left would take less to send at
    /// the bandwidth measured.
    pub downtime: std::time::Duration,
    /// Pre-copy rounds at most before stopping anyway (a guest dirtying
    /// memory faster than the link sends it never converges).
    pub max_rounds: u32,
}

/// Pre-copy's progress, after each round.
#[derive(Debug, Default, Clone, Copy)]
pub struct Round {
    pub rounds: u32,
    pub sent: ram::Sent,
    /// Bytes of the stream so far.
    pub stream_bytes: u64,
    /// Bytes the guest dirtied since the last round.
    pub dirty_bytes: u64,
    /// Stream bytes a second, measured on the last round.
    pub bytes_per_second: f64,
    /// Where the vCPUs' stop went, once stopped.
    pub stop_and_copy: StopAndCopy,
}

/// The stop-and-copy pass, in milliseconds.
#[derive(Debug, Default, Clone, Copy)]
pub struct StopAndCopy {
    /// Quiescing and saving the devices, and the machine's state.
    pub devices_ms: f64,
    /// The last dirty pages, and the stream flushed.
    pub ram_ms: f64,
    /// From the end of the stream to the destination's acknowledgement
    /// (it applied the stream; set by the caller).
    pub acknowledged_ms: f64,
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Counts what goes through.
struct Counting<'a, W> {
    inner: &'a mut W,
    bytes: u64,
}

impl<W: Write> Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A live save: all of RAM while the guest runs, then the pages it dirtied
/// (vCPUs and devices' DMA), round after round, until the rest fits
/// `precopy.downtime`; then `stop_vcpus`, the devices' states, the
/// machine, the last dirty pages, and the end record. `progress` hears
/// each round. On an error logging is off again and the caller lets
/// the guest run on (the stream is useless then).
pub fn save_live(
    p: &Parts,
    out: &mut impl Write,
    precopy: Precopy,
    stop_vcpus: impl FnOnce() -> Result<()>,
    progress: &mut dyn FnMut(&Round),
) -> Result<Saved> {
    check_savable(p)?;
    dirty::start(p)?;
    let r = save_live_logged(p, out, precopy, stop_vcpus, progress);
    if let Err(e) = dirty::stop(p) {
        tracing::warn!("migration: turning dirty logging off: {e:#}");
    }
    r
}

fn save_live_logged(
    p: &Parts,
    out: &mut impl Write,
    precopy: Precopy,
    stop_vcpus: impl FnOnce() -> Result<()>,
    progress: &mut dyn FnMut(&Round),
) -> Result<Saved> {
    let mut w = Counting {
        inner: out,
        bytes: 0,
    };
    let mut round = Round::default();
    stream::write_header(&mut w)?;
    // The first round sends all of RAM; each next one what the guest
    // dirtied during the last. Once that fits the downtime (or after
    // `max_rounds`), it is sent live one last time, and only what the
    // guest dirties meanwhile waits for the stop.
    let mut runs = ram::all(p.ram);
    let mut last = false;
    let mut ledger = verify::enabled().then(|| verify::Ledger::new(p.ram));
    loop {
        let (t, before) = (std::time::Instant::now(), w.bytes);
        round.sent += ram::send_runs(p.ram, &mut w, &runs, ledger.as_mut())?;
        w.flush()?;
        round.rounds += 1;
        round.stream_bytes = w.bytes;
        round.bytes_per_second = (w.bytes - before) as f64 / t.elapsed().as_secs_f64().max(1e-3);
        progress(&round);
        if last {
            break;
        }
        runs = dirty::take(p)?;
        round.dirty_bytes = runs.iter().map(|r| r.1).sum();
        let budget = round.bytes_per_second * precopy.downtime.as_secs_f64();
        last = (round.dirty_bytes as f64) <= budget || round.rounds >= precopy.max_rounds;
    }
    stop_vcpus()?;
    let t = std::time::Instant::now();
    // The stop-and-copy pass is a round of its own (QEMU counts its last
    // bitmap sync too).
    round.rounds += 1;
    let mut saved = write_devices_and_machine(p, &mut w)?;
    round.stop_and_copy.devices_ms = ms(t.elapsed());
    // What the vCPUs and devices wrote since the last round (up to their
    // saved states).
    let t = std::time::Instant::now();
    round.sent += ram::send_runs(p.ram, &mut w, &dirty::take(p)?, ledger.as_mut())?;
    stream::write_end(&mut w)?;
    w.flush()?;
    round.stop_and_copy.ram_ms = ms(t.elapsed());
    if let Some(ledger) = &ledger {
        report_verdict(p.ram, ledger);
    }
    round.stream_bytes = w.bytes;
    progress(&round);
    saved.ram = round.sent;
    Ok(saved)
}

/// Logs what [`verify::Ledger::check`] found, and the RAM digest the
/// destination's must equal.
fn report_verdict(ram: &GuestRam, ledger: &verify::Ledger) {
    let verdict = match ledger.check(ram) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!("migration verify: {e:#}");
            return;
        }
    };
    let digest = format!("{:016x}", verdict.digest);
    if verdict.differ.is_empty() && verdict.unsent == 0 {
        tracing::info!(
            "migration verify: all {} pages sent as they are now; RAM digest {digest}",
            verdict.pages
        );
    } else {
        let first: Vec<String> = verdict
            .differ
            .iter()
            .take(16)
            .map(|g| format!("{g:#x}"))
            .collect();
        tracing::error!(
            "migration verify: {} of {} pages differ from their last version sent (a write the dirty logs missed), {} never sent; first: {}; RAM digest {digest}",
            verdict.differ.len(),
            verdict.pages,
            verdict.unsent,
            first.join(" ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_cannot_pile_up_device_states() {
        let mut d = DeviceStates::default();
        d.insert("lsi0", vec![0; 100]).unwrap();
        let e = d.insert("lsi0", vec![0; 100]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the snapshot has two states for device `lsi0`"
        );
        let big = vec![0u8; MAX_DEVICE_BYTES / 2];
        d.insert("a", big.clone()).unwrap();
        let e = d.insert("b", big).unwrap_err();
        assert!(e.to_string().contains("exceed 64 MiB"), "{e}");
        for i in 0..MAX_DEVICES - 2 {
            d.insert(&format!("d{i}"), Vec::new()).unwrap();
        }
        let e = d.insert("one-more", Vec::new()).unwrap_err();
        assert!(e.to_string().contains("more than 32 device states"), "{e}");
    }
}
