//! Guest RAM in the snapshot stream: pages with data as RAM records, runs
//! of zero pages as one zero record (a fresh guest's RAM is mostly
//! zero, and a restored memfd then allocates nothing for it).

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use anyhow::{bail, Context, Result};

use super::stream::{self, MAX_RAM_RECORD};
use super::verify::Ledger;
use crate::memory::GuestRam;

/// The unit of the zero test.
pub const PAGE: u64 = 4096;

/// What a copy of RAM sent.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sent {
    pub data_bytes: u64,
    pub zero_bytes: u64,
}

/// Where the guest range `[gpa, gpa+len)` lies in the memfd, if it is RAM.
fn fd_offset(ram: &GuestRam, gpa: u64, len: u64) -> Option<u64> {
    let end = gpa.checked_add(len)?;
    ram.regions
        .iter()
        .find(|r| gpa >= r.gpa && end <= r.gpa + r.size)
        .map(|r| r.fd_offset + (gpa - r.gpa))
}

/// A buffer for [`send_range`], made once for many ranges (a dirty round
/// sends thousands of single pages).
fn buffer() -> Vec<u8> {
    vec![0u8; MAX_RAM_RECORD as usize]
}

/// Sends the guest pages `[gpa, gpa + len)` (page-aligned, inside one
/// RAM region), reading them through `buf` (from [`buffer`]), noting
/// each page sent in `ledger` when there is one.
pub fn send_range(
    ram: &GuestRam,
    w: &mut impl Write,
    gpa: u64,
    len: u64,
    buf: &mut [u8],
    mut ledger: Option<&mut Ledger>,
) -> Result<Sent> {
    let Some(off) = fd_offset(ram, gpa, len) else {
        bail!("{gpa:#x}+{len:#x} is not guest RAM");
    };
    let mut sent = Sent::default();
    let mut done = 0u64;
    // A run of zero pages not yet written.
    let mut zero_run: Option<(u64, u64)> = None;
    while done < len {
        let n = (len - done).min(buf.len() as u64);
        let chunk = &mut buf[..n as usize];
        ram.memfd
            .read_at(chunk, off + done)
            .context("reading guest RAM")?;
        if let Some(l) = ledger.as_deref_mut() {
            l.record(gpa + done, chunk);
        }
        // Runs of data pages become one record each.
        let mut p = 0usize;
        while p < chunk.len() {
            let page_end = (p + PAGE as usize).min(chunk.len());
            let at = gpa + done + p as u64;
            if chunk[p..page_end].iter().all(|&b| b == 0) {
                zero_run = match zero_run {
                    Some((s, l)) => Some((s, l + (page_end - p) as u64)),
                    None => Some((at, (page_end - p) as u64)),
                };
                p = page_end;
                continue;
            }
            if let Some((s, l)) = zero_run.take() {
                stream::write_ram_zero(w, s, l)?;
                sent.zero_bytes += l;
            }
            let mut q = page_end;
            while q < chunk.len() {
                let e = (q + PAGE as usize).min(chunk.len());
                if chunk[q..e].iter().all(|&b| b == 0) {
                    break;
                }
                q = e;
            }
            stream::write_ram(w, at, &chunk[p..q])?;
            sent.data_bytes += (q - p) as u64;
            p = q;
        }
        done += n;
    }
    if let Some((s, l)) = zero_run {
        stream::write_ram_zero(w, s, l)?;
        sent.zero_bytes += l;
    }
    Ok(sent)
}

impl std::ops::AddAssign for Sent {
    fn add_assign(&mut self, b: Sent) {
        self.data_bytes += b.data_bytes;
        self.zero_bytes += b.zero_bytes;
    }
}

/// Every RAM region, as `(gpa, len)` runs.
pub fn all(ram: &GuestRam) -> Vec<(u64, u64)> {
    ram.regions.iter().map(|r| (r.gpa, r.size)).collect()
}

/// Sends the guest pages of `runs` (each inside one RAM region), through
/// one buffer.
pub fn send_runs(
    ram: &GuestRam,
    w: &mut impl Write,
    runs: &[(u64, u64)],
    mut ledger: Option<&mut Ledger>,
) -> Result<Sent> {
    let mut sent = Sent::default();
    let mut buf = buffer();
    for &(gpa, len) in runs {
        sent += send_range(ram, w, gpa, len, &mut buf, ledger.as_deref_mut())?;
    }
    Ok(sent)
}

/// Writes a RAM record's bytes at `gpa`.
pub fn receive(ram: &GuestRam, gpa: u64, bytes: &[u8]) -> Result<()> {
    let Some(off) = fd_offset(ram, gpa, bytes.len() as u64) else {
        bail!(
            "the snapshot has {} bytes of RAM at {gpa:#x}, outside this guest's RAM",
            bytes.len()
        );
    };
    ram.memfd
        .write_at(bytes, off)
        .context("writing guest RAM")?;
    Ok(())
}

/// Makes `[gpa, gpa+len)` zero, freeing its pages.
pub fn receive_zero(ram: &GuestRam, gpa: u64, len: u64) -> Result<()> {
    let Some(off) = fd_offset(ram, gpa, len) else {
        bail!("the snapshot zeroes {len:#x} bytes at {gpa:#x}, outside this guest's RAM");
    };
    let (Ok(o), Ok(l)) = (i64::try_from(off), i64::try_from(len)) else {
        bail!("zero range {gpa:#x}+{len:#x} out of range");
    };
    // SAFETY: fallocate on a file descriptor we own, with plain integer
    // arguments; punching a hole in a memfd reads back as zeros and the
    // mapping stays valid.
    let rc = unsafe {
        libc::fallocate(
            ram.memfd.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            o,
            l,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("zeroing guest RAM");
    }
    Ok(())
}
