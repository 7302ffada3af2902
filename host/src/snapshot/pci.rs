//! A PCI function's place in the machine as the guest set it up: its
//! configuration space (BARs, command, interrupt line, capabilities), the
//! MSI-X table the VMM emulates, and the MSI and MSI-X vectors pending
//! (the VMM answers their pending bits). The device's own state travels
//! beside it (`device/<id>` sections).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::pci::root::{PciRoot, SlotLabel};
use crate::pci::PciDevice;

use pci::regs::{BAR0, CAPABILITIES_POINTER, COMMAND, FIRST_CAPABILITY, INTERRUPT_LINE, STATUS};

/// The end of the six BARs.
const BAR_END: usize = 0x28;

/// One function.
#[derive(Serialize, Deserialize)]
pub struct FunctionImage {
    pub slot: u8,
    pub id: String,
    pub remote: Option<String>,
    /// The 256 bytes of configuration space, hex.
    config: String,
    /// The MSI-X table as the guest wrote it, hex (empty without MSI-X).
    msix_table: String,
    /// Vectors pending (masked when their message came).
    msix_pending: Vec<u16>,
    /// MSI vectors pending (masked when their message came; a stream
    /// from before MSI has none).
    #[serde(default)]
    msi_pending: Vec<u16>,
}

fn hex(b: &[u8]) -> String {
    channel::control::encode_hex(b)
}

impl FunctionImage {
    /// Reads the function at `slot`.
    pub fn read(slot: u8, label: &SlotLabel, dev: &mut dyn PciDevice) -> Self {
        let mut cfg = [0u8; 256];
        dev.config_space().read(0, &mut cfg);
        // The capabilities as the function itself answers them: a remote's
        // are in the remote (the VMM's shadow of its configuration space
        // models none, and a snapshot taken from it had no MSI-X: the
        // destination's remote then dropped every vector).
        dev.config_read(STATUS, &mut cfg[STATUS..STATUS + 2]);
        dev.config_read(
            CAPABILITIES_POINTER,
            &mut cfg[CAPABILITIES_POINTER..=CAPABILITIES_POINTER],
        );
        for off in (FIRST_CAPABILITY..256).step_by(4) {
            dev.config_read(off, &mut cfg[off..off + 4]);
        }
        let (mut table, mut pending) = (Vec::new(), Vec::new());
        if let Some((_, l)) = pci::msix::find(&cfg) {
            table = vec![0u8; l.table_size() as usize];
            for (i, chunk) in table.chunks_mut(4).enumerate() {
                dev.bar_read(
                    usize::from(l.table_bar),
                    u64::from(l.table_offset) + 4 * i as u64,
                    chunk,
                );
            }
            let mut pba = vec![0u8; l.pba_size() as usize];
            for (i, chunk) in pba.chunks_mut(4).enumerate() {
                dev.bar_read(
                    usize::from(l.pba_bar),
                    u64::from(l.pba_offset) + 4 * i as u64,
                    chunk,
                );
            }
            pending = (0..l.vectors)
                .filter(|&v| pba[usize::from(v / 8)] & (1 << (v % 8)) != 0)
                .collect();
        }
        // MSI's Pending Bits are the VMM's (a read through the function
        // answers them; the bytes above are the function's own).
        let msi_pending = match pci::msi::find(&cfg) {
            Some((cap, _)) => {
                let granted = pci::msi::MsiState::decode(&cfg[cap..]).granted;
                let mut bits = [0u8; 4];
                dev.config_read(cap + pci::msi::PENDING, &mut bits);
                let bits = u32::from_le_bytes(bits);
                (0..u16::from(granted))
                    .filter(|&v| bits & (1 << v) != 0)
                    .collect()
            }
            None => Vec::new(),
        };
        FunctionImage {
            slot,
            id: label.id.clone(),
            remote: label.remote.clone(),
            config: hex(&cfg),
            msix_table: hex(&table),
            msix_pending: pending,
            msi_pending,
        }
    }

    /// Writes the guest's set-up into the function at its slot of `root`
    /// (the same device, just created from the same config): BARs and
    /// interrupt line, the MSI-X table, the capabilities (MSI-X enable
    /// and mask last but one), the command register last, as a guest
    /// driver would. Read-only bits are left alone by the function's
    /// write masks.
    pub fn write(&self, root: &PciRoot) -> Result<()> {
        let cfg = channel::control::decode_hex(&self.config)
            .map_err(|e| anyhow::anyhow!("{}: configuration space: {e}", self.id))?;
        let Ok(cfg) = <[u8; 256]>::try_from(cfg.as_slice()) else {
            bail!("{}: the configuration space is not 256 bytes", self.id);
        };
        let table = channel::control::decode_hex(&self.msix_table)
            .map_err(|e| anyhow::anyhow!("{}: MSI-X table: {e}", self.id))?;
        root.restore_config(self.slot, |dev| {
            let mine = {
                let mut b = [0u8; 256];
                dev.config_space().read(0, &mut b);
                b
            };
            if mine[..4] != cfg[..4] {
                bail!(
                    "{}: slot {} holds vendor:device {:02x}{:02x}:{:02x}{:02x}, the snapshot's function is {:02x}{:02x}:{:02x}{:02x}",
                    self.id, self.slot, mine[1], mine[0], mine[3], mine[2], cfg[1], cfg[0], cfg[3], cfg[2]
                );
            }
            for off in (BAR0..BAR_END).step_by(4) {
                dev.config_write(off, &cfg[off..off + 4]);
            }
            dev.config_write(INTERRUPT_LINE, &cfg[INTERRUPT_LINE..=INTERRUPT_LINE]);
            if let Some((_, l)) = pci::msix::find(&cfg) {
                if table.len() as u64 != l.table_size() {
                    bail!("{}: the MSI-X table has {} bytes, the function {}", self.id, table.len(), l.table_size());
                }
                for (i, chunk) in table.chunks(4).enumerate() {
                    dev.bar_write(
                        usize::from(l.table_bar),
                        u64::from(l.table_offset) + 4 * i as u64,
                        chunk,
                    );
                }
            }
            let cs = dev.config_space();
            let mut caps: Vec<usize> = (FIRST_CAPABILITY..256)
                .step_by(4)
                .filter(|&off| cs.is_modelled(off))
                .collect();
            // A remote's function keeps its capabilities in the remote
            // (the VMM's shadow models none of them): its MSI and MSI-X
            // registers, which decide where its interrupts go, are written
            // through the function as the guest wrote them, so the remote
            // and the VMM's routes are as the guest left them. The rest of
            // a remote's capabilities is the device's own state.
            if let Some((cap, _)) = pci::msix::find(&cfg) {
                caps.extend((cap..cap + 12).step_by(4));
            }
            if let Some((cap, _)) = pci::msi::find(&cfg) {
                caps.extend((cap..cap + pci::msi::CAP_LEN).step_by(4));
            }
            caps.sort_unstable();
            caps.dedup();
            caps.retain(|&off| off + 4 <= cfg.len());
            for off in caps {
                dev.config_write(off, &cfg[off..off + 4]);
            }
            dev.config_write(COMMAND, &cfg[COMMAND..COMMAND + 2]);
            // Last, with the table, masks and enable in place: a vector
            // pending at the snapshot is pending here, and reaches the
            // guest when it unmasks it (an interrupt it was owed).
            for &v in &self.msix_pending {
                dev.signal_msix(v);
            }
            for &v in &self.msi_pending {
                dev.signal_msi(v);
            }
            Ok(())
        })
        .with_context(|| format!("restoring {} in slot {}", self.id, self.slot))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use pci::msix::MsixLayout;
    use pci::{BarSpec, BarType, ConfigSpace, Identity};

    use super::*;

    const LAYOUT: MsixLayout = MsixLayout {
        vectors: 4,
        table_bar: 0,
        table_offset: 0,
        pba_bar: 0,
        pba_offset: 0x800,
    };

    /// Each vector signalled: (vector, MSI-X enabled, its entry written).
    type Signals = Arc<Mutex<Vec<(u16, bool, bool)>>>;

    /// A function with MSI-X in BAR 0 whose pending bits are what the test
    /// sets; it records each vector signalled and whether MSI-X was
    /// enabled and the vector's table entry written by then.
    struct MsixFunction {
        config: ConfigSpace,
        cap: usize,
        table: Vec<u8>,
        pending: u8,
        signalled: Signals,
        /// What `config_space` shows when set: a remote's function shows
        /// the VMM's shadow, which models no capability.
        shadow: Option<ConfigSpace>,
    }

    impl MsixFunction {
        fn new() -> (Box<Self>, Signals) {
            let mut config = ConfigSpace::new(Identity {
                vendor_id: 0x1234,
                device_id: 0x11e0,
                ..Default::default()
            });
            let bar = BarSpec {
                bar_type: BarType::Memory32,
                size: 0x1000,
                prefetchable: false,
            };
            config.add_bar(0, bar).expect("BAR");
            let cap = pci::msix::add_capability(&mut config, &LAYOUT).expect("MSI-X");
            let signalled = Arc::new(Mutex::new(Vec::new()));
            let f = MsixFunction {
                config,
                cap,
                table: vec![0; LAYOUT.table_size() as usize],
                pending: 0,
                signalled: signalled.clone(),
                shadow: None,
            };
            (Box::new(f), signalled)
        }
    }

    impl PciDevice for MsixFunction {
        fn config_read(&mut self, offset: usize, data: &mut [u8]) {
            self.config.read(offset, data);
        }
        fn config_write(&mut self, offset: usize, data: &[u8]) {
            self.config.write(offset, data);
            // The proxy keeps its shadow's BARs and Command in step.
            if let Some(s) = self.shadow.as_mut() {
                s.write(offset, data);
            }
        }
        fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            if offset >= u64::from(LAYOUT.pba_offset) {
                data.fill(0);
                if offset == u64::from(LAYOUT.pba_offset) {
                    data[0] = self.pending;
                }
            } else {
                data.copy_from_slice(&self.table[o..o + data.len()]);
            }
        }
        fn bar_write(&mut self, _bar: usize, offset: u64, data: &[u8]) {
            let o = offset as usize;
            if o + data.len() <= self.table.len() {
                self.table[o..o + data.len()].copy_from_slice(data);
            }
        }
        fn config_space(&self) -> &ConfigSpace {
            self.shadow.as_ref().unwrap_or(&self.config)
        }
        fn signal_msix(&mut self, vector: u16) {
            let (enabled, _) = pci::msix::control(&self.config, self.cap);
            let entry = usize::from(vector) * 16;
            let written = self.table[entry..entry + 4] != [0; 4];
            self.signalled
                .lock()
                .expect("lock")
                .push((vector, enabled, written));
        }
    }

    #[test]
    fn a_vector_pending_at_the_snapshot_is_pending_after_the_restore() {
        restore_msix(false);
    }

    /// A remote's function: the VMM's view of its configuration space
    /// models no capability, and MSI-X is still enabled on the destination
    /// (a live migration of a remote virtio-blk left the guest waiting
    /// for interrupts the remote dropped with MSI-X off).
    #[test]
    fn a_remote_functions_msix_is_enabled_after_the_restore() {
        restore_msix(true);
    }

    /// A remote's function as the VMM sees it: `f` answers configuration
    /// reads and writes as the remote would, while its `config_space` is
    /// the proxy's shadow (BARs and Command, no capability).
    fn behind_a_proxy(f: &mut MsixFunction) {
        let mut shadow = ConfigSpace::new(Identity {
            vendor_id: 0x1234,
            device_id: 0x11e0,
            ..Default::default()
        });
        shadow
            .add_bar(0, f.config.bar_spec(0).expect("BAR 0"))
            .expect("BAR");
        f.shadow = Some(shadow);
    }

    fn restore_msix(remote: bool) {
        let label = SlotLabel {
            id: "dev0".into(),
            remote: None,
        };
        let (mut source, _) = MsixFunction::new();
        if remote {
            behind_a_proxy(&mut source);
        }
        source.config_write(0x10, &0xfebf_0000u32.to_le_bytes());
        // Vector 2's message, masked; vector 0 unmasked and idle.
        source.bar_write(0, 2 * 16, &0xfee0_0000u32.to_le_bytes());
        source.bar_write(0, 2 * 16 + 8, &0x41u32.to_le_bytes());
        source.bar_write(0, 2 * 16 + 12, &1u32.to_le_bytes());
        source.bar_write(0, 0, &0xfee0_0000u32.to_le_bytes());
        let ctrl = pci::msix::encode_control(0, true, false);
        source.config_write(source.cap + 2, &ctrl.to_le_bytes());
        source.config_write(COMMAND, &0x0006u16.to_le_bytes());
        source.pending = 1 << 2;
        let image = FunctionImage::read(7, &label, source.as_mut());
        let bytes = serde_json::to_vec(&image).expect("encode");
        let image: FunctionImage = serde_json::from_slice(&bytes).expect("decode");

        let root = PciRoot::new();
        let (mut target, signalled) = MsixFunction::new();
        if remote {
            behind_a_proxy(&mut target);
        }
        let cap = target.cap;
        root.insert(7, label, target).expect("insert");
        image.write(&root).expect("restore");
        // Signalled once, after MSI-X was enabled and the entry written:
        // the router keeps it pending while the vector is masked.
        assert_eq!(*signalled.lock().expect("lock"), vec![(2, true, true)]);
        let mut ctrl = [0u8; 2];
        root.with_function(7, |d| d.config_read(cap + 2, &mut ctrl))
            .expect("slot 7");
        assert_eq!(
            pci::msix::decode_control(u16::from_le_bytes(ctrl)),
            (true, false),
            "MSI-X enabled, the function unmasked"
        );
        let mut cfg = [0u8; 256];
        root.with_function(7, |d| d.config_space().read(0, &mut cfg))
            .expect("slot 7");
        assert_eq!(&cfg[0x10..0x14], &0xfebf_0000u32.to_le_bytes());
        assert_eq!(u16::from_le_bytes([cfg[COMMAND], cfg[COMMAND + 1]]), 0x0006);
    }

    /// A function with an MSI capability (4 vectors) whose Pending Bits
    /// read what the test sets (the VMM's router answers them in a real
    /// function); it records each vector signalled and whether MSI was
    /// enabled by then.
    struct MsiFunction {
        config: ConfigSpace,
        cap: usize,
        pending: u32,
        signalled: MsiSignals,
    }

    /// Each MSI vector signalled: (vector, MSI enabled by then).
    type MsiSignals = Arc<Mutex<Vec<(u16, bool)>>>;

    impl MsiFunction {
        fn new() -> (Box<Self>, MsiSignals) {
            let mut config = ConfigSpace::new(Identity {
                vendor_id: 0x1234,
                device_id: 0x11e1,
                ..Default::default()
            });
            let cap = pci::msi::add_capability(&mut config, 4).expect("MSI");
            let signalled = Arc::new(Mutex::new(Vec::new()));
            let f = MsiFunction {
                config,
                cap,
                pending: 0,
                signalled: signalled.clone(),
            };
            (Box::new(f), signalled)
        }
    }

    impl PciDevice for MsiFunction {
        fn config_read(&mut self, offset: usize, data: &mut [u8]) {
            self.config.read(offset, data);
            if offset == self.cap + pci::msi::PENDING && data.len() == 4 {
                data.copy_from_slice(&self.pending.to_le_bytes());
            }
        }
        fn config_write(&mut self, offset: usize, data: &[u8]) {
            self.config.write(offset, data);
        }
        fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
            data.fill(0xff);
        }
        fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
        fn config_space(&self) -> &ConfigSpace {
            &self.config
        }
        fn signal_msi(&mut self, vector: u16) {
            let enabled = pci::msi::MsiState::read(&self.config, self.cap).enabled;
            self.signalled.lock().expect("lock").push((vector, enabled));
        }
    }

    #[test]
    fn an_msi_vector_pending_at_the_snapshot_is_pending_after_the_restore() {
        let label = SlotLabel {
            id: "dev1".into(),
            remote: None,
        };
        let (mut source, _) = MsiFunction::new();
        let cap = source.cap;
        // 4 vectors granted, vector 1 masked and pending; bit 3 is set
        // too but never counts past the vectors granted (2 here).
        source.config_write(cap + pci::msi::ADDRESS_LO, &0xfee0_0000u32.to_le_bytes());
        source.config_write(cap + pci::msi::DATA, &0x40u16.to_le_bytes());
        source.config_write(cap + pci::msi::MASK, &0b10u32.to_le_bytes());
        let ctrl = {
            let mut b = [0u8; 2];
            source.config.read(cap + pci::msi::CONTROL, &mut b);
            pci::msi::encode_control(u16::from_le_bytes(b), true, 2)
        };
        source.config_write(cap + pci::msi::CONTROL, &ctrl.to_le_bytes());
        source.config_write(COMMAND, &0x0406u16.to_le_bytes());
        source.pending = 0b1010;
        let image = FunctionImage::read(9, &label, source.as_mut());
        let bytes = serde_json::to_vec(&image).expect("encode");
        let image: FunctionImage = serde_json::from_slice(&bytes).expect("decode");
        assert_eq!(image.msi_pending, vec![1]);

        let root = PciRoot::new();
        let (target, signalled) = MsiFunction::new();
        root.insert(9, label, target).expect("insert");
        image.write(&root).expect("restore");
        // Signalled once, with MSI enabled as the guest left it.
        assert_eq!(*signalled.lock().expect("lock"), vec![(1, true)]);
        let mut cfg = [0u8; 256];
        root.with_function(9, |d| d.config_space().read(0, &mut cfg))
            .expect("slot 9");
        let state = pci::msi::MsiState::decode(&cfg[cap..]);
        assert_eq!((state.enabled, state.granted, state.mask), (true, 2, 0b10));
    }

    #[test]
    fn a_stream_from_before_msi_restores_without_msi_pending() {
        let (mut f, _) = MsiFunction::new();
        let label = SlotLabel {
            id: "dev1".into(),
            remote: None,
        };
        let mut v =
            serde_json::to_value(FunctionImage::read(3, &label, f.as_mut())).expect("encode");
        v.as_object_mut().expect("object").remove("msi_pending");
        let image: FunctionImage = serde_json::from_value(v).expect("an older image decodes");
        assert!(image.msi_pending.is_empty());
    }
}
