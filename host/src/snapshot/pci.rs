//! A PCI function's place in the machine as the guest set it up: its
//! configuration space (BARs, command, interrupt line, capabilities) and
//! the MSI-X table the VMM emulates. The device's own state travels
//! beside it (`device/<id>` sections).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::pci::root::{PciRoot, SlotLabel};
use crate::pci::PciDevice;

const COMMAND: usize = 0x04;
const BAR0: usize = 0x10;
const BAR_END: usize = 0x28;
const INTERRUPT_LINE: usize = 0x3c;
const FIRST_CAPABILITY: usize = 0x40;

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
}

fn hex(b: &[u8]) -> String {
    channel::control::encode_hex(b)
}

impl FunctionImage {
    /// Reads the function at `slot`.
    pub fn read(slot: u8, label: &SlotLabel, dev: &mut dyn PciDevice) -> Self {
        let mut cfg = [0u8; 256];
        dev.config_space().read(0, &mut cfg);
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
        FunctionImage {
            slot,
            id: label.id.clone(),
            remote: label.remote.clone(),
            config: hex(&cfg),
            msix_table: hex(&table),
            msix_pending: pending,
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
            let caps: Vec<usize> = (FIRST_CAPABILITY..256)
                .step_by(4)
                .filter(|&off| cs.is_modelled(off))
                .collect();
            for off in caps {
                dev.config_write(off, &cfg[off..off + 4]);
            }
            dev.config_write(COMMAND, &cfg[COMMAND..COMMAND + 2]);
            Ok(())
        })
        .with_context(|| format!("restoring {} in slot {}", self.id, self.slot))?;
        if !self.msix_pending.is_empty() {
            tracing::warn!(
                "{}: MSI-X vectors {:?} were pending (masked) at the snapshot; the device raises them again when it has reason to",
                self.id,
                self.msix_pending
            );
        }
        Ok(())
    }
}
