//! A minimal writer for the "newc" cpio format that the kernel unpacks as an
//! initramfs (see the kernel's `Documentation/driver-api/early-userspace`).

use std::collections::BTreeSet;
use std::io::{self, Write};

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Writes a newc archive; parent directories are created on demand.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    ino: u32,
    written: u64,
    dirs: BTreeSet<String>,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive on `out`.
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            ino: 1,
            written: 0,
            dirs: BTreeSet::new(),
        }
    }

    fn pad(&mut self) -> io::Result<()> {
        let rem = (self.written % 4) as usize;
        if rem != 0 {
            let zeros = [0u8; 4];
            self.out.write_all(&zeros[..4 - rem])?;
            self.written += (4 - rem) as u64;
        }
        Ok(())
    }

    fn raw(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cpio entry too large"))?;
        let ino = if name == "TRAILER!!!" { 0 } else { self.ino };
        self.ino += 1;
        let header = format!(
            "070701{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            ino,
            mode,
            0,
            0,
            nlink,
            0,
            size,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.written += (header.len() + name.len() + 1) as u64;
        self.pad()?;
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        self.pad()
    }

    fn parents(&mut self, path: &str) -> io::Result<()> {
        let mut acc = String::new();
        let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        for comp in comps.iter().take(comps.len().saturating_sub(1)) {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(comp);
            if self.dirs.insert(acc.clone()) {
                let name = acc.clone();
                self.raw(&name, S_IFDIR | 0o755, 2, (0, 0), &[])?;
            }
        }
        Ok(())
    }

    fn clean(path: &str) -> String {
        path.trim_start_matches('/').to_string()
    }

    /// Adds a directory (and its parents).
    pub fn dir(&mut self, path: &str) -> io::Result<()> {
        let p = Self::clean(path);
        self.parents(&p)?;
        if self.dirs.insert(p.clone()) {
            self.raw(&p, S_IFDIR | 0o755, 2, (0, 0), &[])?;
        }
        Ok(())
    }

    /// Adds a regular file with permission bits `perm` (e.g. 0o755).
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        let p = Self::clean(path);
        self.parents(&p)?;
        self.raw(&p, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    /// Adds a symbolic link `path -> target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let p = Self::clean(path);
        self.parents(&p)?;
        self.raw(&p, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        let p = Self::clean(path);
        self.parents(&p)?;
        self.raw(&p, S_IFCHR | (perm & 0o7777), 1, (major, minor), &[])
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.raw("TRAILER!!!", 0, 1, (0, 0), &[])?;
        // The kernel accepts any length, but pad to 512 like cpio(1) does.
        let rem = (self.written % 512) as usize;
        if rem != 0 {
            self.out.write_all(&vec![0u8; 512 - rem])?;
        }
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_aligned() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("/a/b/c", 0o644, b"hello").unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        let buf = w.finish().unwrap();
        assert_eq!(buf.len() % 512, 0);
        let text = String::from_utf8_lossy(&buf);
        assert!(text.starts_with("070701"));
        // directories a, a/b come before the file
        let a = text.find("a\0").unwrap();
        let ab = text.find("a/b\0").unwrap();
        let abc = text.find("a/b/c\0").unwrap();
        assert!(a < ab && ab < abc);
        assert!(text.contains("TRAILER!!!"));
    }
}
