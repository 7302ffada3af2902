//! The proxy's mpqemu dialect (QEMU's `x-remote`, or `remote-host
//! --protocol mpqemu`): setup in the order of QEMU's `x-pci-proxy-dev`
//! (SYNC_SYSMEM, the probe, SET_IRQFD) and the [`Transport`] over
//! [`MpqemuClient`].
//!
//! - BAR accesses carry absolute addresses (the shadow's BAR base plus
//!   the offset) and are 1, 2, 4 or 8 bytes.
//! - Configuration accesses with `offset + 4 > 256` are not forwarded
//!   (QEMU 7.2's `x-remote` shuts down on them): reads answer zeros.
//! - Before the first BAR access (after setup and after each reset) the
//!   remote's BARs and command register are checked against the shadow and
//!   written again if they differ: QEMU 7.2 resets its device after it has
//!   started reading the socket, which can wipe the VMM's early
//!   configuration writes.

use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use channel::mpqemu::{ClientError, MpqemuClient, SysmemRegion};
use kvm_ioctls::VmFd;
use pci::{regs, BarSpec, BarType, ConfigSpace};

use super::transport::{BarTarget, Transport, TransportError};
use super::{borrow, identity_of, intx_irqfd, Setup};
use crate::memory::GuestRam;

/// An mpqemu connection to one remote function.
pub struct MpqemuTransport {
    client: MpqemuClient,
    /// Whether the remote's BAR placement has been checked against the
    /// shadow since setup or the last reset.
    verified: bool,
}

/// Sets up the function behind `client`. The client's timeout is the
/// startup one (the remote may still be starting); `timeout` applies
/// afterwards.
pub fn setup(
    id: &str,
    mut client: MpqemuClient,
    timeout: Duration,
    ram: &GuestRam,
    vm: &VmFd,
    gsi: u32,
) -> Result<Setup> {
    let regions: Vec<SysmemRegion<'_>> = ram
        .regions
        .iter()
        .map(|r| SysmemRegion {
            gpa: r.gpa,
            size: r.size,
            offset: r.fd_offset,
            fd: ram.fd(),
        })
        .collect();
    client
        .sync_sysmem(&regions)
        .context("SYNC_SYSMEM of guest RAM")?;
    let mut cfg = [0u8; 256];
    for off in (0..256u32).step_by(4) {
        let v = client
            .config_read(off, 4)
            .with_context(|| format!("config read at {off:#x}"))?;
        cfg[off as usize..off as usize + 4].copy_from_slice(&v.to_le_bytes());
    }
    client.set_timeout(timeout);
    let mut shadow = ConfigSpace::new(identity_of(&cfg));
    if shadow.identity().vendor_id == 0xffff {
        bail!("{id}: the remote has no function (vendor id 0xffff)");
    }
    // BAR sizing, as x-pci-proxy-dev does it: all-ones, read back,
    // restore.
    let size_of = |c: &mut MpqemuClient, off: u32| -> Result<(u32, u32)> {
        let orig = c.config_read(off, 4)?;
        c.config_write(off, 0xffff_ffff, 4)?;
        let v = c.config_read(off, 4)?;
        c.config_write(off, orig, 4)?;
        Ok((orig, v))
    };
    let mut index = 0usize;
    while index < 6 {
        let off = (regs::BAR0 + index * 4) as u32;
        let (orig, v) =
            size_of(&mut client, off).with_context(|| format!("{id}: sizing BAR {index}"))?;
        let io = orig & 1 != 0;
        let bar_type = if io {
            BarType::Io
        } else if orig & 0x6 == 0x4 {
            BarType::Memory64
        } else {
            BarType::Memory32
        };
        let size = match bar_type {
            BarType::Io => u64::from((!(v & !0x3)).wrapping_add(1) & 0xffff),
            BarType::Memory32 => u64::from((!(v & !0xf)).wrapping_add(1)),
            BarType::Memory64 => {
                let (_, hi) = size_of(&mut client, off + 4)
                    .with_context(|| format!("{id}: sizing BAR {}", index + 1))?;
                let mask = (u64::from(hi) << 32) | u64::from(v & !0xf);
                (!mask).wrapping_add(1)
            }
        };
        let size = if v == 0 { 0 } else { size };
        if size > 0 {
            shadow
                .add_bar(
                    index,
                    BarSpec {
                        bar_type,
                        size,
                        prefetchable: orig & 0x8 != 0 && !io,
                    },
                )
                .with_context(|| format!("{id}: BAR {index}"))?;
        }
        index += if size > 0 && bar_type == BarType::Memory64 {
            2
        } else {
            1
        };
    }
    let mut intx = None;
    if cfg[regs::INTERRUPT_PIN] != 0 {
        let (trigger, resample) = intx_irqfd(vm, gsi)?;
        client
            .set_irqfd(borrow(&trigger), borrow(&resample))
            .context("SET_IRQFD")?;
        intx = Some((trigger, resample));
    }
    if pci::msix::find(&cfg).is_some() {
        bail!(
            "{id}: the device has MSI-X, which mpqemu cannot carry; serve it over vfio-user (the remote's protocol)"
        );
    }
    Ok(Setup {
        transport: Box::new(MpqemuTransport {
            client,
            verified: false,
        }),
        shadow,
        intx,
        msix: None,
        msi: None,
    })
}

/// Whether an mpqemu config access may be forwarded: QEMU 7.2's
/// `x-remote` shuts down on any access with `offset + 4 > 256`.
fn config_ok(offset: usize, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && offset + 4 <= 256
}

fn sized(len: usize) -> Result<u32, TransportError> {
    if matches!(len, 1 | 2 | 4 | 8) {
        Ok(len as u32)
    } else {
        Err(format!("a {len}-byte access"))
    }
}

impl MpqemuTransport {
    /// Whether the remote decodes the BARs and the command register where
    /// the shadow has them.
    fn placement_matches(&mut self, shadow: &ConfigSpace) -> Result<bool, ClientError> {
        for (index, _) in shadow.bar_specs() {
            let off = (regs::BAR0 + index * 4) as u32;
            if self.client.config_read(off, 4)? != shadow.read_value(off as usize, 4) {
                return Ok(false);
            }
        }
        let want_cmd = u32::from(shadow.command() & 0x7);
        Ok(self.client.config_read(regs::COMMAND as u32, 2)? & 0x7 == want_cmd)
    }

    /// Writes the shadow's BARs and command bits into the remote.
    fn write_placement(&mut self, shadow: &ConfigSpace) -> Result<(), ClientError> {
        for (index, spec) in shadow.bar_specs() {
            let off = regs::BAR0 + index * 4;
            self.client
                .config_write(off as u32, shadow.read_value(off, 4), 4)?;
            if spec.bar_type == BarType::Memory64 {
                self.client
                    .config_write(off as u32 + 4, shadow.read_value(off + 4, 4), 4)?;
            }
        }
        let cmd = self.client.config_read(regs::COMMAND as u32, 2)?;
        let want_cmd = u32::from(shadow.command() & 0x7);
        self.client
            .config_write(regs::COMMAND as u32, (cmd & !0x7) | want_cmd, 2)
    }
}

impl Transport for MpqemuTransport {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) -> Result<(), TransportError> {
        if !config_ok(offset, data.len()) {
            data.fill(0);
            return Ok(());
        }
        let v = self
            .client
            .config_read(offset as u32, data.len() as u32)
            .map_err(|e| e.to_string())?;
        data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
        Ok(())
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) -> Result<(), TransportError> {
        if !config_ok(offset, data.len()) {
            return Ok(());
        }
        let mut v = [0u8; 4];
        v[..data.len()].copy_from_slice(data);
        self.client
            .config_write(offset as u32, u32::from_le_bytes(v), data.len() as u32)
            .map_err(|e| e.to_string())
    }

    /// Before the first BAR access: the remote must decode the BARs where
    /// the shadow has them (QEMU 7.2's startup reset may have wiped the
    /// placement); up to three rewrites.
    fn before_bar_access(&mut self, shadow: &ConfigSpace) -> Result<(), TransportError> {
        if self.verified {
            return Ok(());
        }
        for attempt in 0..3 {
            if self.placement_matches(shadow).map_err(|e| e.to_string())? {
                self.verified = true;
                return Ok(());
            }
            tracing::warn!(
                "the remote lost the BAR placement (attempt {attempt}); writing it again"
            );
            if std::env::var_os("HOST_STATS").is_some() {
                eprintln!("host-stats: bar_placement_rewritten=1");
            }
            self.write_placement(shadow).map_err(|e| e.to_string())?;
        }
        if self.placement_matches(shadow).map_err(|e| e.to_string())? {
            self.verified = true;
            Ok(())
        } else {
            Err("the remote does not keep its BARs".into())
        }
    }

    fn bar_read(
        &mut self,
        bar: BarTarget,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), TransportError> {
        let size = sized(data.len())?;
        let v = self
            .client
            .bar_read(bar.base + offset, size, bar.memory)
            .map_err(|e| e.to_string())?;
        data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
        Ok(())
    }

    fn bar_write(
        &mut self,
        bar: BarTarget,
        offset: u64,
        data: &[u8],
    ) -> Result<(), TransportError> {
        let size = sized(data.len())?;
        let mut v = [0u8; 8];
        v[..data.len()].copy_from_slice(data);
        self.client
            .bar_write_posted(bar.base + offset, u64::from_le_bytes(v), size, bar.memory)
            .map_err(|e| e.to_string())
    }

    /// A vendor-id read.
    fn heartbeat(&mut self) -> Result<(), TransportError> {
        self.client
            .config_read(0, 4)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// DEVICE_RESET (QEMU's proxy sends it on a machine reset since QEMU
    /// 6.0, and `x-remote` answers it with a cold reset of the device and an
    /// empty `RET`); the BAR placement is checked again before the next BAR
    /// access, as after setup.
    fn reset(&mut self) -> Result<(), TransportError> {
        self.verified = false;
        // Posted writes first: a failure among them belongs to the old
        // boot.
        self.client
            .flush()
            .and_then(|()| self.client.reset())
            .map_err(|e| e.to_string())
    }

    fn socket_fd(&self) -> RawFd {
        self.client.socket().as_raw_fd()
    }

    /// QEMU's x-remote exits at EOF too.
    fn close(&mut self, healthy: bool) -> u64 {
        if healthy {
            let _ = self.client.flush();
        }
        let failures = self.client.posted_failures();
        let _ = self.client.socket().shutdown(std::net::Shutdown::Both);
        failures
    }
}
