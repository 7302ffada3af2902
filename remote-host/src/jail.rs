//! The remote's jail: its own mount, network and IPC namespaces (and a
//! user namespace when it does not start as root), with a root file system
//! that holds only what serving its devices takes, each at its own path:
//! the config's directory and the socket directory (read-write: drives and
//! plugins added at run time are found there), the paths the devices'
//! settings name ([`paths_in_settings`]), the plugin directories and
//! the system's library directories (read-only: `device-add` loads a
//! plugin with the dynamic loader), and `/dev/null`, `/dev/zero`,
//! `/dev/urandom`. Everything else of the machine (other VMs' images, the
//! VMM's QMP socket, `/etc`, `/proc`, `/home`) is absent; the new network
//! namespace has no interface up and its own abstract UNIX socket names.
//!
//! Seccomp cannot look at paths, and this machine's kernel has no
//! Landlock: namespaces are the tool that confines files here. The seccomp
//! filter entered afterwards ([`crate::sandbox`]) refuses `mount`,
//! `unshare`, `setns`, `chroot` and `pivot_root`, so the jail cannot be
//! undone from inside. Optionally ([`Identity`]) the process then drops
//! from root to another user.
//!
//! Namespaces are per process only while it has one thread: [`enter`] runs
//! before the devices are built (plugins start threads).
//!
//! The steps are bubblewrap's: a tmpfs over `/tmp` becomes the root, the
//! old root stays reachable below it to bind from, a fresh directory gets
//! the binds, then becomes the root itself and the old one is detached.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Errors entering the jail. [`JailError::Threaded`], [`JailError::NoBase`],
/// [`JailError::NotRoot`] and [`JailError::Unshare`] leave the process as
/// it was; after any other the process must stop.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// The jail must be entered before any thread starts ({0} run).
    #[error("the jail must be entered before any thread starts ({0} run)")]
    Threaded(usize),
    /// There is no /tmp to build the jail's root on.
    #[error("there is no /tmp directory to build the jail's root on")]
    NoBase,
    /// The kernel refused new namespaces.
    #[error("the kernel refused new {what} namespaces: {source}")]
    Unshare {
        what: &'static str,
        source: io::Error,
    },
    /// The user namespace's id maps could not be written.
    #[error("cannot map the user namespace's ids: {0}")]
    IdMap(io::Error),
    /// A step of building the new root failed.
    #[error("jail: cannot {what} {path}: {source}")]
    Mount {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// Changing to another user needs the remote to start as root.
    #[error("user {uid}:{gid}: only a remote started as root can change its user")]
    NotRoot { uid: u32, gid: u32 },
    /// The kernel refused the change of user.
    #[error("cannot become user {uid}:{gid}: {source}")]
    Identity {
        uid: u32,
        gid: u32,
        source: io::Error,
    },
}

/// What stays visible in the jail, each path at its own place.
#[derive(Clone, Debug, Default)]
pub struct View {
    pub read_write: Vec<PathBuf>,
    pub read_only: Vec<PathBuf>,
}

/// The system's library directories (and the loader's cache), read-only:
/// a plugin loaded at run time may need a library the remote has not
/// loaded yet. Symbolic links among them (merged /usr) are recreated.
pub const SYSTEM_LIBRARIES: &[&str] = &[
    "/lib",
    "/lib64",
    "/usr/lib",
    "/usr/lib64",
    "/etc/ld.so.cache",
];

/// Device nodes bound in (read-write; libraries open them).
const DEVICES: &[&str] = &["/dev/null", "/dev/zero", "/dev/urandom"];

/// Where the process's own descriptor directory is shown: the only part of
/// `/proc` in the jail (what an fd the client sent is, e.g. an eventfd, is
/// read from its link there).
const OWN_FDS: &str = "/proc/self/fd";

/// A user to become once jailed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
}

impl Identity {
    /// `name`, `uid` or `uid:gid` (a name or a bare uid takes the user's
    /// primary group from the password database; a bare uid not there
    /// gets the same number as gid).
    pub fn parse(s: &str) -> Result<Identity, String> {
        if let Some((u, g)) = s.split_once(':') {
            let uid = u
                .parse()
                .map_err(|_| format!("user `{s}`: `{u}` is not a uid"))?;
            let gid = g
                .parse()
                .map_err(|_| format!("user `{s}`: `{g}` is not a gid"))?;
            return Ok(Identity { uid, gid });
        }
        if let Ok(uid) = s.parse::<u32>() {
            let gid = lookup(|pw, buf, len, out| {
                // SAFETY: getpwuid_r writes into `pw` and `buf` (of `len`
                // bytes), both ours, and sets `out`.
                unsafe { libc::getpwuid_r(uid, pw, buf, len, out) }
            })
            .map_or(uid, |(_, g)| g);
            return Ok(Identity { uid, gid });
        }
        let name = CString::new(s).map_err(|_| format!("user `{s}`: not a name"))?;
        let (uid, gid) = lookup(|pw, buf, len, out| {
            // SAFETY: as above, with a NUL-terminated name.
            unsafe { libc::getpwnam_r(name.as_ptr(), pw, buf, len, out) }
        })
        .ok_or_else(|| format!("user `{s}`: no such user"))?;
        Ok(Identity { uid, gid })
    }
}

/// A password database lookup: (uid, gid) of the entry found.
fn lookup(
    f: impl Fn(
        *mut libc::passwd,
        *mut libc::c_char,
        libc::size_t,
        *mut *mut libc::passwd,
    ) -> libc::c_int,
) -> Option<(u32, u32)> {
    // SAFETY: passwd is plain data; zeroed is a valid value to be filled.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    let r = f(&mut pw, buf.as_mut_ptr(), buf.len(), &mut out);
    (r == 0 && !out.is_null()).then_some((pw.pw_uid, pw.pw_gid))
}

/// The paths a device's settings name outside its config's directory
/// (every string value that is an absolute path, at any depth): a file
/// that exists is shown itself (a drive's image), anything else through
/// its directory (a socket or a file the device makes).
pub fn paths_in_settings(settings: &str) -> Vec<PathBuf> {
    fn walk(v: &toml::Value, out: &mut Vec<PathBuf>) {
        match v {
            toml::Value::String(s) if s.starts_with('/') => {
                let p = Path::new(s);
                if p.is_file() {
                    out.push(p.to_path_buf());
                } else if let Some(dir) = p.parent().filter(|d| d.is_dir() && *d != Path::new("/"))
                {
                    out.push(dir.to_path_buf());
                }
            }
            toml::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            toml::Value::Table(t) => t.values().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let Ok(t) = settings.parse::<toml::Table>() {
        t.values().for_each(|v| walk(v, &mut out));
    }
    out
}

/// What [`enter`] did.
#[derive(Clone, Debug, Default)]
pub struct Entered {
    /// A user namespace was made (the remote did not start as root).
    pub user_namespace: bool,
    /// What is visible, and whether writable.
    pub visible: Vec<(PathBuf, bool)>,
}

/// One thing to put in the new root.
#[derive(Debug)]
enum Entry {
    /// `source` of the machine at `path` in the jail (the same path but
    /// for the process's own descriptors).
    Bind {
        path: PathBuf,
        source: PathBuf,
        writable: bool,
    },
    Symlink {
        path: PathBuf,
        target: PathBuf,
    },
}

impl Entry {
    fn path(&self) -> &Path {
        match self {
            Entry::Bind { path, .. } | Entry::Symlink { path, .. } => path,
        }
    }
}

/// Enters the jail: see the module's doc. The current directory is kept
/// when it is visible, else `/`.
pub fn enter(view: &View, identity: Option<Identity>) -> Result<Entered, JailError> {
    let threads = std::fs::read_dir("/proc/self/task").map_or(1, |d| d.count());
    if threads > 1 {
        return Err(JailError::Threaded(threads));
    }
    if !Path::new("/tmp").is_dir() {
        return Err(JailError::NoBase);
    }
    let cwd = std::env::current_dir().ok();
    let entries = resolve(view);
    // SAFETY: geteuid/getegid only read this process's ids.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let root = euid == 0;
    if let (Some(id), false) = (identity, root) {
        return Err(JailError::NotRoot {
            uid: id.uid,
            gid: id.gid,
        });
    }
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC;
    if !root {
        flags |= libc::CLONE_NEWUSER;
    }
    // SAFETY: unshare only changes this (single-threaded) process's
    // namespaces.
    if unsafe { libc::unshare(flags) } != 0 {
        return Err(JailError::Unshare {
            what: if root {
                "mount, network and IPC"
            } else {
                "user, mount, network and IPC"
            },
            source: io::Error::last_os_error(),
        });
    }
    if !root {
        std::fs::write("/proc/self/setgroups", "deny")
            .and_then(|()| std::fs::write("/proc/self/uid_map", format!("{euid} {euid} 1")))
            .and_then(|()| std::fs::write("/proc/self/gid_map", format!("{egid} {egid} 1")))
            .map_err(JailError::IdMap)?;
    }
    build_root(&entries)?;
    let visible = entries
        .iter()
        .filter_map(|e| match e {
            Entry::Bind { path, writable, .. } => Some((path.clone(), *writable)),
            Entry::Symlink { .. } => None,
        })
        .collect::<Vec<_>>();
    let here = cwd
        .filter(|c| visible.iter().any(|(p, _)| c.starts_with(p)))
        .unwrap_or_else(|| PathBuf::from("/"));
    chdir(&here)?;
    if let Some(id) = identity {
        become_user(id)?;
    }
    Ok(Entered {
        user_namespace: !root,
        visible,
    })
}

/// The view's paths made absolute and canonical, with the devices and the
/// symbolic links among the library directories; parents before children.
/// A path that does not exist is left out.
fn resolve(view: &View) -> Vec<Entry> {
    let mut entries = Vec::new();
    let lists = [
        (&view.read_write, true),
        (&view.read_only, false),
        (&DEVICES.iter().map(PathBuf::from).collect::<Vec<_>>(), true),
    ];
    for (paths, writable) in lists {
        for p in paths {
            let Ok(abs) = std::path::absolute(p) else {
                continue;
            };
            // A symbolic link among the library directories is recreated
            // as such (its target is bound when listed itself).
            if let Ok(target) = std::fs::read_link(&abs) {
                if view.read_only.contains(p)
                    && SYSTEM_LIBRARIES.iter().any(|l| abs == Path::new(l))
                {
                    entries.push(Entry::Symlink { path: abs, target });
                    continue;
                }
            }
            if let Ok(path) = std::fs::canonicalize(&abs) {
                entries.push(Entry::Bind {
                    source: path.clone(),
                    path,
                    writable,
                });
            }
        }
    }
    // This process's descriptors, at the name code knows them by (the
    // process keeps its pid: the bind stays right).
    if let Ok(source) = std::fs::canonicalize(OWN_FDS) {
        entries.push(Entry::Bind {
            path: PathBuf::from(OWN_FDS),
            source,
            writable: false,
        });
    }
    // Parents first; a path listed twice is bound once, writable if any
    // listing says so.
    entries.sort_by(|a, b| {
        let depth = |e: &Entry| e.path().components().count();
        depth(a).cmp(&depth(b)).then_with(|| a.path().cmp(b.path()))
    });
    let mut out: Vec<Entry> = Vec::new();
    for e in entries {
        match (out.iter_mut().find(|o| o.path() == e.path()), &e) {
            (Some(Entry::Bind { writable: w, .. }), Entry::Bind { writable: true, .. }) => {
                *w = true
            }
            (Some(_), _) => {}
            (None, _) => out.push(e),
        }
    }
    out
}

fn cstr(p: &Path) -> Result<CString, JailError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| JailError::Mount {
        what: "name",
        path: p.to_path_buf(),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })
}

fn check(r: libc::c_int, what: &'static str, path: &Path) -> Result<(), JailError> {
    if r == 0 {
        Ok(())
    } else {
        Err(JailError::Mount {
            what,
            path: path.to_path_buf(),
            source: io::Error::last_os_error(),
        })
    }
}

fn mount(
    src: Option<&Path>,
    dst: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
    what: &'static str,
) -> Result<(), JailError> {
    let src = src.map(cstr).transpose()?;
    let dst_c = cstr(dst)?;
    let fstype = fstype.map(|f| CString::new(f).unwrap_or_default());
    let data = data.map(|d| CString::new(d).unwrap_or_default());
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that lives
    // across the call.
    let r = unsafe {
        libc::mount(
            ptr(&src),
            dst_c.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    check(r, what, dst)
}

fn chdir(p: &Path) -> Result<(), JailError> {
    let c = cstr(p)?;
    // SAFETY: a NUL-terminated path.
    check(unsafe { libc::chdir(c.as_ptr()) }, "enter", p)
}

fn pivot_root(new: &Path, old: &Path) -> Result<(), JailError> {
    let (n, o) = (cstr(new)?, cstr(old)?);
    // SAFETY: two NUL-terminated paths.
    let r = unsafe { libc::syscall(libc::SYS_pivot_root, n.as_ptr(), o.as_ptr()) };
    check(if r == 0 { 0 } else { -1 }, "pivot the root to", new)
}

fn umount(p: &Path) -> Result<(), JailError> {
    let c = cstr(p)?;
    // SAFETY: a NUL-terminated path.
    check(
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) },
        "detach",
        p,
    )
}

/// `p` below `base` (`p` absolute).
fn under(base: &str, p: &Path) -> PathBuf {
    Path::new(base).join(p.strip_prefix("/").unwrap_or(p))
}

/// The flags a mount already has (kept on a remount: in a user namespace
/// the kernel refuses to clear locked ones).
fn mount_flags(p: &Path) -> Result<libc::c_ulong, JailError> {
    let c = cstr(p)?;
    // SAFETY: statvfs is plain data, filled by the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statvfs to fill.
    check(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, "inspect", p)?;
    let map = [
        (libc::ST_RDONLY, libc::MS_RDONLY),
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ];
    Ok(map
        .iter()
        .filter(|(st_flag, _)| st.f_flag & st_flag != 0)
        .fold(0, |acc, (_, ms)| acc | ms))
}

fn build_root(entries: &[Entry]) -> Result<(), JailError> {
    let slash = Path::new("/");
    mount(
        None,
        slash,
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
        "make private",
    )?;
    let base = Path::new("/tmp");
    mount(
        Some(Path::new("tmpfs")),
        base,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=0755"),
        "mount a tmpfs on",
    )?;
    chdir(base)?;
    for d in ["newroot", "oldroot"] {
        std::fs::create_dir(base.join(d)).map_err(|source| JailError::Mount {
            what: "create",
            path: base.join(d),
            source,
        })?;
    }
    pivot_root(base, &base.join("oldroot"))?;
    chdir(slash)?;
    // From here the tmpfs is `/`, the machine's root is `/oldroot`.
    let newroot = Path::new("/newroot");
    mount(
        Some(newroot),
        newroot,
        None,
        libc::MS_BIND | libc::MS_REC,
        None,
        "bind",
    )?;
    for e in entries {
        let dst = under("/newroot", e.path());
        let create = |source| JailError::Mount {
            what: "create",
            path: dst.clone(),
            source,
        };
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(create)?;
        }
        match e {
            Entry::Symlink { target, .. } => {
                std::os::unix::fs::symlink(target, &dst).map_err(create)?;
            }
            Entry::Bind {
                source, writable, ..
            } => {
                let src = under("/oldroot", source);
                let is_dir = std::fs::metadata(&src).map(|m| m.is_dir()).unwrap_or(false);
                // A parent's bind may already show this path.
                if !dst.exists() {
                    if is_dir {
                        std::fs::create_dir(&dst).map_err(create)?;
                    } else {
                        std::fs::File::create(&dst).map_err(create)?;
                    }
                }
                mount(
                    Some(&src),
                    &dst,
                    None,
                    libc::MS_BIND | libc::MS_REC,
                    None,
                    "bind",
                )?;
                let mut flags = mount_flags(&dst)? | libc::MS_NOSUID;
                if !writable {
                    flags |= libc::MS_RDONLY;
                }
                mount(
                    None,
                    &dst,
                    None,
                    libc::MS_BIND | libc::MS_REMOUNT | flags,
                    None,
                    "restrict",
                )?;
            }
        }
    }
    umount(Path::new("/oldroot"))?;
    chdir(newroot)?;
    // The new root on top of the tmpfs; the tmpfs detached below it.
    pivot_root(Path::new("."), Path::new("."))?;
    umount(Path::new("."))?;
    chdir(slash)?;
    let flags = mount_flags(slash)? | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
    mount(
        None,
        slash,
        None,
        libc::MS_BIND | libc::MS_REMOUNT | flags,
        None,
        "make read-only",
    )
}

fn become_user(id: Identity) -> Result<(), JailError> {
    let err = || JailError::Identity {
        uid: id.uid,
        gid: id.gid,
        source: io::Error::last_os_error(),
    };
    // SAFETY: setgroups with no groups, then the group and user ids: each
    // only changes this process's credentials.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(err());
        }
        if libc::setresgid(id.gid, id.gid, id.gid) != 0 {
            return Err(err());
        }
        if libc::setresuid(id.uid, id.uid, id.uid) != 0 {
            return Err(err());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
