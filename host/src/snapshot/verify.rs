//! A check of pre-copy's dirty tracking, on when `HOST_MIGRATE_VERIFY=1`
//! (the whole-system tests set it).
//!
//! A live save sends each page once, then again each time KVM's dirty
//! log or a device's DMA log says it changed. If either log misses a
//! write, the destination gets an old page, and the guest there finds
//! page tables or data that are not what it wrote: a crash much later
//! that points nowhere near its cause (issue 17's restored VM). So the
//! source keeps a hash of the last version of every page it sent, and
//! once the last pass is out (vCPUs stopped, devices saved) compares
//! them with its RAM: a page that differs is a write the logs missed.
//! Both ends also log a digest of the whole of RAM (the source's at the
//! end of the save, the destination's once the stream is applied, before
//! any vCPU runs): equal digests prove the copy whole, end to end.

use std::collections::hash_map::DefaultHasher;
use std::hash::Hasher;
use std::os::unix::fs::FileExt;

use anyhow::{Context, Result};

use super::ram::PAGE;
use crate::memory::GuestRam;

/// Whether `HOST_MIGRATE_VERIFY=1`.
pub fn enabled() -> bool {
    std::env::var("HOST_MIGRATE_VERIFY").is_ok_and(|v| v == "1")
}

fn page_hash(page: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    h.write(page);
    h.finish()
}

/// The hash of the last version sent of every page (per RAM region),
/// `None` for a page not sent yet.
#[derive(Debug)]
pub struct Ledger {
    regions: Vec<(u64, Vec<Option<u64>>)>,
}

/// What [`Ledger::check`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Pages whose RAM differs from the last version sent (their guest
    /// addresses, in order).
    pub differ: Vec<u64>,
    /// Pages never sent.
    pub unsent: u64,
    /// Pages compared.
    pub pages: u64,
    /// The digest of all of RAM ([`digest`]'s).
    pub digest: u64,
}

impl Ledger {
    pub fn new(ram: &GuestRam) -> Ledger {
        Ledger {
            regions: ram
                .regions
                .iter()
                .map(|r| (r.gpa, vec![None; r.size.div_ceil(PAGE) as usize]))
                .collect(),
        }
    }

    /// Notes the bytes sent for the guest range starting at `gpa`
    /// (page-aligned; a short last page is hashed as it is).
    pub fn record(&mut self, gpa: u64, bytes: &[u8]) {
        for (i, page) in bytes.chunks(PAGE as usize).enumerate() {
            let at = gpa + i as u64 * PAGE;
            if let Some(slot) = self.slot(at) {
                *slot = Some(page_hash(page));
            }
        }
    }

    fn slot(&mut self, gpa: u64) -> Option<&mut Option<u64>> {
        self.regions.iter_mut().find_map(|(start, pages)| {
            let i = gpa.checked_sub(*start)? / PAGE;
            pages.get_mut(usize::try_from(i).ok()?)
        })
    }

    /// Compares every page of `ram` now with the last version sent, and
    /// takes the RAM digest in the same pass.
    pub fn check(&self, ram: &GuestRam) -> Result<Verdict> {
        let mut v = Verdict::default();
        let mut h = DefaultHasher::new();
        each_chunk(ram, |region, off, chunk| {
            h.write(chunk);
            let (start, hashes) = &self.regions[region];
            for (i, page) in chunk.chunks(PAGE as usize).enumerate() {
                let at = off + i as u64 * PAGE;
                v.pages += 1;
                match usize::try_from(at / PAGE).ok().and_then(|p| hashes.get(p)) {
                    Some(Some(sent)) if *sent != page_hash(page) => v.differ.push(start + at),
                    Some(Some(_)) => {}
                    _ => v.unsent += 1,
                }
            }
        })?;
        v.digest = h.finish();
        Ok(v)
    }
}

/// Reads all of guest RAM once, a MiB at a time: `f(region index, offset
/// in the region, bytes)`.
fn each_chunk(ram: &GuestRam, mut f: impl FnMut(usize, u64, &[u8])) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    for (i, r) in ram.regions.iter().enumerate() {
        let mut off = 0;
        while off < r.size {
            let n = (r.size - off).min(buf.len() as u64) as usize;
            ram.memfd
                .read_at(&mut buf[..n], r.fd_offset + off)
                .context("reading guest RAM")?;
            f(i, off, &buf[..n]);
            off += n as u64;
        }
    }
    Ok(())
}

/// A digest of the whole of guest RAM (what [`Ledger::check`] gives as
/// [`Verdict::digest`] for the same bytes).
pub fn digest(ram: &GuestRam) -> Result<u64> {
    let mut h = DefaultHasher::new();
    each_chunk(ram, |_, _, chunk| h.write(chunk))?;
    Ok(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_written_after_it_was_sent_is_found() {
        let ram = GuestRam::new(1 << 20).unwrap();
        let mut ledger = Ledger::new(&ram);
        let mut all = vec![0u8; 1 << 20];
        ram.memfd.read_at(&mut all, 0).unwrap();
        ledger.record(0, &all);
        let clean = ledger.check(&ram).unwrap();
        assert_eq!(clean.differ, Vec::<u64>::new());
        let before = digest(&ram).unwrap();
        assert_eq!(clean.digest, before, "one digest, whichever pass takes it");

        // A write nobody logged: found, and the digest changes.
        ram.memfd.write_at(&[1], 0x3004).unwrap();
        let v = ledger.check(&ram).unwrap();
        assert_eq!((v.differ, v.unsent, v.pages), (vec![0x3000], 0, 256));
        assert_ne!(digest(&ram).unwrap(), before);
        assert_eq!(ledger.check(&ram).unwrap().digest, digest(&ram).unwrap());

        // Sent again: matches again.
        let mut page = vec![0u8; PAGE as usize];
        ram.memfd.read_at(&mut page, 0x3000).unwrap();
        ledger.record(0x3000, &page);
        assert!(ledger.check(&ram).unwrap().differ.is_empty());
    }

    #[test]
    fn pages_never_sent_are_counted_apart() {
        let ram = GuestRam::new(64 << 10).unwrap();
        let mut ledger = Ledger::new(&ram);
        ledger.record(0x1000, &[0u8; PAGE as usize]);
        let v = ledger.check(&ram).unwrap();
        assert_eq!((v.differ.len(), v.unsent, v.pages), (0, 15, 16));
    }
}
