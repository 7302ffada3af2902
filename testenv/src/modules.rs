//! Kernel module lookup and dependency resolution from the `.modinfo`
//! section of the `.ko` files (no `modinfo`/`kmod` needed on the host).

use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Module names are compared with `-` and `_` treated alike, as kmod does.
pub fn normalize(name: &str) -> String {
    name.trim_end_matches(".ko").replace('-', "_")
}

/// The `.ko` files of one kernel's module tree.
#[derive(Debug, Clone)]
pub struct ModuleIndex {
    by_name: BTreeMap<String, PathBuf>,
    builtin: BTreeSet<String>,
}

fn walk(dir: &Path, out: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        let ft = entry.file_type()?;
        if ft.is_dir() {
            walk(&path, out)?;
        } else if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
            if let Some(stem) = name.strip_suffix(".ko") {
                out.insert(normalize(stem), path.clone());
            }
        }
    }
    Ok(())
}

impl ModuleIndex {
    /// Indexes `modules_dir` (`.../lib/modules/<version>`).
    pub fn new(modules_dir: &Path) -> Result<Self> {
        let mut by_name = BTreeMap::new();
        walk(&modules_dir.join("kernel"), &mut by_name)?;
        let mut builtin = BTreeSet::new();
        if let Ok(text) = fs::read_to_string(modules_dir.join("modules.builtin")) {
            for line in text.lines() {
                if let Some(file) = line.rsplit('/').next() {
                    builtin.insert(normalize(file));
                }
            }
        }
        Ok(ModuleIndex { by_name, builtin })
    }

    /// The `.ko` file of a module.
    pub fn path(&self, name: &str) -> Option<&Path> {
        self.by_name.get(&normalize(name)).map(PathBuf::as_path)
    }

    /// Whether the module is built into the kernel image.
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&normalize(name))
    }

    /// The given modules and everything they depend on (`depends=`), each
    /// after its dependencies. Built-in modules are left out; soft
    /// dependencies are ignored.
    pub fn resolve(&self, names: &[&str]) -> Result<Vec<PathBuf>> {
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        for n in names {
            self.visit(n, &mut seen, &mut order, &mut Vec::new())?;
        }
        Ok(order)
    }

    /// The given modules in the given order, without dependency resolution.
    pub fn ordered(&self, names: &[&str]) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for n in names {
            match self.path(n) {
                Some(p) => out.push(p.to_path_buf()),
                None if self.is_builtin(n) => {}
                None => bail!("kernel module `{n}` not found"),
            }
        }
        Ok(out)
    }

    fn visit(
        &self,
        name: &str,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<PathBuf>,
        stack: &mut Vec<String>,
    ) -> Result<()> {
        let key = normalize(name);
        if seen.contains(&key) {
            return Ok(());
        }
        if stack.contains(&key) {
            bail!("module dependency cycle: {} -> {key}", stack.join(" -> "));
        }
        let Some(path) = self.path(&key) else {
            if self.is_builtin(&key) {
                seen.insert(key);
                return Ok(());
            }
            match stack.last() {
                Some(parent) => bail!("kernel module `{name}` (needed by `{parent}`) not found"),
                None => bail!("kernel module `{name}` not found"),
            }
        };
        let path = path.to_path_buf();
        stack.push(key.clone());
        for dep in modinfo_depends(&path)? {
            self.visit(&dep, seen, order, stack)?;
        }
        stack.pop();
        seen.insert(key);
        order.push(path);
        Ok(())
    }
}

/// All `key=value` strings of an ELF64 module's `.modinfo` section.
pub fn modinfo(path: &Path) -> Result<Vec<(String, String)>> {
    let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let sect = modinfo_section(&data).with_context(|| {
        format!(
            "{}: not an ELF64 module with a .modinfo section",
            path.display()
        )
    })?;
    Ok(sect
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let s = String::from_utf8_lossy(s);
            s.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect())
}

/// The `depends=` list of a module.
pub fn modinfo_depends(path: &Path) -> Result<Vec<String>> {
    Ok(modinfo(path)?
        .into_iter()
        .filter(|(k, _)| k == "depends")
        .flat_map(|(_, v)| {
            v.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect())
}

fn rd<const N: usize>(d: &[u8], off: usize) -> Option<[u8; N]> {
    d.get(off..off + N)?.try_into().ok()
}

fn modinfo_section(d: &[u8]) -> Option<&[u8]> {
    if d.get(0..4)? != b"\x7fELF" || *d.get(4)? != 2 || *d.get(5)? != 1 {
        return None;
    }
    let shoff = usize::try_from(u64::from_le_bytes(rd(d, 0x28)?)).ok()?;
    let shentsize = usize::from(u16::from_le_bytes(rd(d, 0x3a)?));
    let shnum = usize::from(u16::from_le_bytes(rd(d, 0x3c)?));
    let shstrndx = usize::from(u16::from_le_bytes(rd(d, 0x3e)?));
    let sh = |i: usize| -> Option<(u32, usize, usize)> {
        let base = shoff + i * shentsize;
        let name = u32::from_le_bytes(rd(d, base)?);
        let off = usize::try_from(u64::from_le_bytes(rd(d, base + 0x18)?)).ok()?;
        let size = usize::try_from(u64::from_le_bytes(rd(d, base + 0x20)?)).ok()?;
        Some((name, off, size))
    };
    let (_, stroff, strsize) = sh(shstrndx)?;
    let strtab = d.get(stroff..stroff + strsize)?;
    for i in 0..shnum {
        let (name, off, size) = sh(i)?;
        let name = strtab.get(name as usize..)?;
        if name.starts_with(b".modinfo\0") {
            return d.get(off..off + size);
        }
    }
    None
}
