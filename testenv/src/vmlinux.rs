//! The ELF `vmlinux` inside a bzImage, for booting the same kernel through
//! the VMM's ELF path (Debian ships only the bzImage).
//!
//! A bzImage is the real-mode setup (`setup_sects` + 1 sectors) followed by
//! the protected-mode part, whose setup header gives where the compressed
//! kernel sits in it (`payload_offset` at 0x248, `payload_length` at 0x24c,
//! boot protocol 2.08+). Debian 12 compresses it with xz; the result is the
//! ELF vmlinux.

use std::path::Path;

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// The compressed payload of a bzImage (its bytes as they are).
pub fn bzimage_payload(image: &[u8]) -> Result<&[u8]> {
    let byte = |at: usize| image.get(at).copied().context("bzImage too short");
    let le32 = |at: usize| -> Result<usize> {
        let b = image.get(at..at + 4).context("bzImage too short")?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    if image.get(0x202..0x206) != Some(b"HdrS") {
        bail!("not a bzImage (no HdrS setup header)");
    }
    let version = u16::from(byte(0x206)?) | u16::from(byte(0x207)?) << 8;
    if version < 0x208 {
        bail!("boot protocol {version:#x} has no payload fields (needs 2.08)");
    }
    // setup_sects 0 means 4 (boot protocol).
    let setup_sects = match byte(0x1f1)? {
        0 => 4,
        n => usize::from(n),
    };
    let start = (setup_sects + 1) * 512 + le32(0x248)?;
    let len = le32(0x24c)?;
    image
        .get(start..start + len)
        .context("payload lies outside the bzImage")
}

/// Unpacks the ELF vmlinux of `bzimage` into `out` (xz payloads only).
pub fn extract_vmlinux(bzimage: &Path, out: &Path) -> Result<()> {
    let image = std::fs::read(bzimage).with_context(|| format!("read {}", bzimage.display()))?;
    let payload = bzimage_payload(&image)?;
    if !payload.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        bail!(
            "{}: payload is not xz (magic {:02x?})",
            bzimage.display(),
            &payload[..payload.len().min(6)]
        );
    }
    // The kernel's xz uses the x86 BCJ filter, which pure-Rust decoders
    // lack: xz-utils does it. `--single-stream` ignores what follows the
    // stream (the kernel appends the unpacked size).
    let elf = xz_decompress(payload).with_context(|| format!("{}: xz", bzimage.display()))?;
    if !elf.starts_with(b"\x7fELF") {
        bail!("{}: the unpacked payload is not ELF", bzimage.display());
    }
    std::fs::write(out, &elf).with_context(|| format!("write {}", out.display()))
}

/// `xz -dc --single-stream` of `data`.
fn xz_decompress(data: &[u8]) -> Result<Vec<u8>> {
    let mut child = Command::new("xz")
        .args(["-dc", "--single-stream"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run `xz` (install xz-utils)")?;
    let mut stdin = child.stdin.take().context("xz stdin")?;
    // Feed it from another thread: it writes while we write.
    let out = std::thread::scope(|s| {
        let feeder = s.spawn(move || stdin.write_all(data));
        let out = child.wait_with_output();
        (feeder.join(), out)
    });
    let output = out.1.context("waiting for xz")?;
    if !output.status.success() {
        bail!(
            "xz -d failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    match out.0 {
        Ok(Ok(())) => Ok(output.stdout),
        Ok(Err(e)) => Err(e).context("writing to xz"),
        Err(_) => bail!("the thread feeding xz panicked"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn not_a_bzimage_is_refused() {
        let err = bzimage_payload(&[0u8; 1024]).unwrap_err();
        assert!(format!("{err}").contains("HdrS"), "{err}");
        let mut img = vec![0u8; 0x300];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206] = 0x08;
        img[0x207] = 0x02;
        img[0x248..0x24c].copy_from_slice(&0x100u32.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&0x100u32.to_le_bytes());
        let err = bzimage_payload(&img).unwrap_err();
        assert!(format!("{err}").contains("outside"), "{err}");
    }
}
