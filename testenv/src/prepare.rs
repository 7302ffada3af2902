//! `testenv prepare`: fetches and unpacks everything the real-guest tests
//! need into the cache directory. Each step is skipped when its marker file
//! exists.

use crate::cmd::{run, run_text};
use crate::{Env, QemuKind};
use anyhow::{bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Marker file names in the cache directory.
pub(crate) const KERNEL_MARKER: &str = "kernel.done";
pub(crate) const BUSYBOX_MARKER: &str = "busybox.done";
pub(crate) const SID_MARKER: &str = "sid.done";
const DEBOOTSTRAP_MARKER: &str = "sid-debootstrap.done";

fn step<T>(name: &str, f: impl FnOnce() -> Result<(T, bool)>) -> Result<T> {
    let t = Instant::now();
    let (v, cached) = f().with_context(|| format!("testenv prepare: step `{name}` failed"))?;
    let secs = t.elapsed().as_secs_f64();
    if cached {
        eprintln!("testenv: {name:<16} cached ({secs:.1} s)");
    } else {
        eprintln!("testenv: {name:<16} done in {secs:.1} s");
    }
    Ok(v)
}

/// Runs every preparation step under `dir` and returns the environment.
pub fn prepare(dir: &Path) -> Result<Env> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let total = Instant::now();
    step("kernel", || kernel(dir))?;
    step("busybox", || busybox(dir))?;
    step("qemu-debian12", || qemu_debian12().map(|v| (v, false)))?;
    step("sid-debootstrap", || sid_debootstrap(dir))?;
    step("qemu-sid", || sid_check(dir))?;
    let env = Env::load(dir)?;
    step("initramfs", || {
        // A smoke build of the builder: the nested L1 image's modules.
        let out = dir.join("work").join("prepare-check.cpio");
        crate::initramfs::build(
            &env,
            &crate::nested::l1_spec(&["true".into()], &Default::default())?,
            &out,
        )?;
        fs::remove_file(&out).ok();
        Ok(((), false))
    })?;
    eprintln!(
        "testenv: prepared in {:.1} s: {}",
        total.elapsed().as_secs_f64(),
        dir.display()
    );
    Ok(env)
}

const APT_HINT: &str = "package apt";

/// The package `linux-image-amd64` currently depends on.
fn resolve_kernel_package() -> Result<String> {
    let find = || -> Result<Option<String>> {
        let out = Command::new("apt-cache")
            .args(["depends", "linux-image-amd64"])
            .output();
        let out = match out {
            Ok(o) => o,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("tool `apt-cache` not found ({APT_HINT}); command was: apt-cache depends linux-image-amd64")
            }
            Err(e) => return Err(e.into()),
        };
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends:"))
            .map(str::trim)
            .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64"))
            .map(str::to_string))
    };
    if let Some(p) = find()? {
        return Ok(p);
    }
    eprintln!("testenv: linux-image-amd64 not known to apt, running apt-get update");
    run(Command::new("apt-get").args(["update", "-q"]), APT_HINT)?;
    find()?.context(
        "package linux-image-amd64 (or its linux-image-6.1.0-N-amd64 dependency) not found by \
         `apt-cache depends linux-image-amd64`, even after apt-get update",
    )
}

/// `apt-get download PKG` into `debs` (skipped when a `PKG_*.deb` is
/// already there), with one `apt-get update` retry. Returns the `.deb`.
pub fn download(debs: &Path, pkg: &str) -> Result<PathBuf> {
    fs::create_dir_all(debs)?;
    let find = || -> Result<Option<PathBuf>> {
        for e in fs::read_dir(debs)? {
            let p = e?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name.starts_with(&format!("{pkg}_")) && name.ends_with(".deb") {
                return Ok(Some(p));
            }
        }
        Ok(None)
    };
    if let Some(p) = find()? {
        return Ok(p);
    }
    let mut cmd = Command::new("apt-get");
    cmd.current_dir(debs).args(["download", "-q", pkg]);
    if let Err(first) = run(&mut cmd, APT_HINT) {
        eprintln!("testenv: apt-get download {pkg} failed, running apt-get update and retrying");
        run(Command::new("apt-get").args(["update", "-q"]), APT_HINT)
            .with_context(|| format!("after: {first:#}"))?;
        run(&mut cmd, APT_HINT).with_context(|| format!("cannot fetch package `{pkg}`"))?;
    }
    find()?.with_context(|| {
        format!(
            "apt-get download {pkg} left no {pkg}_*.deb in {}",
            debs.display()
        )
    })
}

fn unpack(deb: &Path, root: &Path) -> Result<()> {
    fs::create_dir_all(root)?;
    run(
        Command::new("dpkg-deb").arg("-x").arg(deb).arg(root),
        "package dpkg",
    )?;
    Ok(())
}

fn kernel(dir: &Path) -> Result<((), bool)> {
    if dir.join(KERNEL_MARKER).exists() {
        return Ok(((), true));
    }
    let pkg = resolve_kernel_package()?;
    let version = pkg
        .strip_prefix("linux-image-")
        .context("kernel package name")?
        .to_string();
    eprintln!("testenv: kernel package {pkg}");
    let deb = download(&dir.join("debs"), &pkg)?;
    let root = dir.join("debian12");
    unpack(&deb, &root)?;
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{version}"));
    let mods = root.join("lib/modules").join(&version);
    if !vmlinuz.exists() || !mods.join("modules.builtin").exists() {
        bail!(
            "{} did not contain {} and {}",
            deb.display(),
            vmlinuz.display(),
            mods.display()
        );
    }
    fs::write(dir.join(KERNEL_MARKER), format!("{version}\n"))?;
    Ok(((), false))
}

fn busybox(dir: &Path) -> Result<((), bool)> {
    if dir.join(BUSYBOX_MARKER).exists() {
        return Ok(((), true));
    }
    let deb = download(&dir.join("debs"), "busybox-static")?;
    let root = dir.join("debian12");
    unpack(&deb, &root)?;
    let bb = root.join("bin/busybox");
    crate::initramfs::busybox_applets(&bb)?;
    fs::write(dir.join(BUSYBOX_MARKER), "bin/busybox\n")?;
    Ok(((), false))
}

fn qemu_debian12() -> Result<()> {
    let v = run_text(
        Env::qemu_command_for(QemuKind::Debian12, Path::new("/nonexistent")).arg("-version"),
        "apt-get install qemu-system-x86",
    )?;
    eprintln!("testenv: {}", v.lines().next().unwrap_or_default());
    Ok(())
}

/// The Debian archive URL apt uses here (first `deb` source that is not a
/// security archive), from /etc/apt/sources.list{,.d/*}. Overridable with
/// `TESTENV_MIRROR`.
pub fn debian_mirror() -> Result<String> {
    if let Ok(m) = std::env::var("TESTENV_MIRROR") {
        if !m.is_empty() {
            return Ok(m);
        }
    }
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    for f in files {
        let name = f.to_string_lossy().into_owned();
        let Ok(text) = fs::read_to_string(&f) else {
            continue;
        };
        let good = |u: &str| {
            (u.starts_with("http://") || u.starts_with("https://"))
                && u.trim_end_matches('/').ends_with("/debian")
        };
        if name.ends_with(".sources") {
            for stanza in text.split("\n\n") {
                let field = |k: &str| {
                    stanza
                        .lines()
                        .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string()))
                };
                let types = field("Types:").unwrap_or_default();
                if !types.split_whitespace().any(|t| t == "deb") {
                    continue;
                }
                if let Some(uris) = field("URIs:") {
                    if let Some(u) = uris.split_whitespace().find(|u| good(u)) {
                        return Ok(u.to_string());
                    }
                }
            }
        } else if name.ends_with(".list") {
            for line in text.lines() {
                let words: Vec<&str> = line
                    .split_whitespace()
                    .filter(|w| !w.starts_with('['))
                    .collect();
                if words.first() == Some(&"deb") {
                    if let Some(u) = words.get(1).filter(|u| good(u)) {
                        return Ok(u.to_string());
                    }
                }
            }
        }
    }
    bail!("no Debian archive (URIs: .../debian) found in /etc/apt/sources.list or /etc/apt/sources.list.d/*.sources; set TESTENV_MIRROR")
}

fn sid_debootstrap(dir: &Path) -> Result<((), bool)> {
    if dir.join(DEBOOTSTRAP_MARKER).exists() {
        return Ok(((), true));
    }
    let root = dir.join("sid");
    let tmp = dir.join("sid.partial");
    for d in [&tmp, &root] {
        if d.exists() {
            fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
        }
    }
    let mirror = debian_mirror()?;
    eprintln!("testenv: debootstrap sid from {mirror}");
    run(
        Command::new("debootstrap")
            .args([
                "--variant=minbase",
                "--include=qemu-system-x86",
                "--keyring=/usr/share/keyrings/debian-archive-keyring.gpg",
                "sid",
            ])
            .arg(&tmp)
            .arg(&mirror),
        "apt-get install debootstrap debian-archive-keyring",
    )?;
    // Free space: the package cache is not needed.
    let cache = tmp.join("var/cache/apt/archives");
    if let Ok(rd) = fs::read_dir(&cache) {
        for e in rd.flatten() {
            if e.path().extension().is_some_and(|x| x == "deb") {
                fs::remove_file(e.path()).ok();
            }
        }
    }
    fs::rename(&tmp, &root)?;
    fs::write(dir.join(DEBOOTSTRAP_MARKER), "")?;
    Ok(((), false))
}

fn sid_check(dir: &Path) -> Result<((), bool)> {
    if dir.join(SID_MARKER).exists() {
        return Ok(((), true));
    }
    let root = dir.join("sid");
    let cmd = || Env::qemu_command_for(QemuKind::Sid, &root);
    let version = run_text(cmd().arg("-version"), "sid tree QEMU")?;
    let version = version.lines().next().unwrap_or_default().to_string();
    match run(cmd().args(["-device", "help"]), "sid tree QEMU") {
        Ok(out) => {
            let devices = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            if !devices.contains("\"vfio-user-pci\"") {
                bail!("sid QEMU ({version}) does not list vfio-user-pci in `-device help`");
            }
        }
        Err(e) => {
            // `-device help` loads every loadable module; if a foreign one
            // aborts it (see Env::qemu_command), ask for the device alone.
            eprintln!("testenv: `-device help` failed ({e:#}); asking for vfio-user-pci alone");
            run(
                cmd().args(["-device", "vfio-user-pci,help"]),
                "sid tree QEMU",
            )
            .with_context(|| format!("sid QEMU ({version}) has no vfio-user-pci"))?;
        }
    }
    eprintln!("testenv: sid {version}, has vfio-user-pci");
    fs::write(dir.join(SID_MARKER), format!("{version}\n"))?;
    Ok(((), false))
}
