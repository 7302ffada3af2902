//! Resource limits of a spawned remote (`[[remote]] memory-max`,
//! `cpu-percent`, `tasks-max`): each spawned process gets a cgroup of its
//! own below the VMM's, with the limits written before the process is
//! moved in, and is moved in by itself between fork and exec (it writes
//! `0`, "the writer", to `cgroup.procs`), so it never runs a line of
//! `remote-host` outside its limits. The cgroup is removed once the
//! process has ended.
//!
//! Both hierarchies: cgroup v2 (one directory, `memory.max`, `cpu.max`,
//! `pids.max`; the VMM's cgroup must let its children have these
//! controllers, that is hold no process itself or be the root, as a
//! systemd unit with `Delegate=yes` whose VMM runs in a child), and v1 (a
//! directory per controller, `memory.limit_in_bytes`, `cpu.cfs_quota_us`,
//! `pids.max`), as this project's machine has.
//!
//! What `memory-max` counts: the remote's own memory, and the pages of
//! shared memory (guest RAM) it is the first to touch; a page the guest
//! or the VMM touched first is charged to them. A limit must leave room
//! for what a device's DMA may be the first to write.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use config::ResourceLimits;

/// The kernel's period for the CPU quota, microseconds (its default).
const CPU_PERIOD_US: u64 = 100_000;

/// Errors making a remote's cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No cgroup file system with the controller a limit needs.
    #[error("cannot limit `{0}`: no cgroup hierarchy with that controller is mounted")]
    NoController(&'static str),
    /// The VMM's own cgroup could not be read.
    #[error("cannot read the VMM's cgroup (/proc/self/cgroup): {0}")]
    OwnCgroup(io::Error),
    /// A cgroup file or directory could not be made or written.
    #[error("cgroup {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// cgroup v2 refused to give the remote's cgroup a controller.
    #[error(
        "cgroup v2: cannot enable `{controller}` below {path} ({source}); the VMM's cgroup \
         must hold no process itself (run the VMM in a child of a delegated cgroup)"
    )]
    NotDelegated {
        controller: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// The cgroup directories of one spawned remote, and its `cgroup.procs`
/// files open for writing (the child writes to them before exec).
#[derive(Debug)]
pub struct RemoteCgroup {
    dirs: Vec<PathBuf>,
    procs: Vec<File>,
}

/// One directory to make, with the files to write in it.
struct Plan {
    dir: PathBuf,
    writes: Vec<(&'static str, String)>,
}

impl RemoteCgroup {
    /// Makes cgroup `name` with `limits` below the VMM's own cgroup, in
    /// the system's hierarchy (`/sys/fs/cgroup`). `None` when no limit is
    /// set.
    pub fn create(name: &str, limits: &ResourceLimits) -> Result<Option<Self>, CgroupError> {
        if !limits.any() {
            return Ok(None);
        }
        let own = std::fs::read_to_string("/proc/self/cgroup").map_err(CgroupError::OwnCgroup)?;
        Self::create_in(Path::new("/sys/fs/cgroup"), &own, name, limits).map(Some)
    }

    /// [`Self::create`] with the hierarchy mounted at `root` and the VMM's
    /// `/proc/self/cgroup` text `own`.
    pub fn create_in(
        root: &Path,
        own: &str,
        name: &str,
        limits: &ResourceLimits,
    ) -> Result<Self, CgroupError> {
        let plans = if root.join("cgroup.controllers").exists() {
            plan_v2(root, own, name, limits)?
        } else {
            plan_v1(root, own, name, limits)?
        };
        let mut made = RemoteCgroup {
            dirs: Vec::new(),
            procs: Vec::new(),
        };
        // On an error `made` is dropped, which removes what was made.
        for plan in plans {
            std::fs::create_dir(&plan.dir)
                .or_else(|e| match e.kind() {
                    // A remote of a VMM that died before removing it.
                    io::ErrorKind::AlreadyExists => Ok(()),
                    _ => Err(e),
                })
                .map_err(|source| CgroupError::Io {
                    path: plan.dir.clone(),
                    source,
                })?;
            made.dirs.push(plan.dir.clone());
            for (file, value) in &plan.writes {
                write_file(&plan.dir.join(file), value)?;
            }
            let procs = plan.dir.join("cgroup.procs");
            let f = open_for_writing(&procs).map_err(|source| CgroupError::Io {
                path: procs,
                source,
            })?;
            made.procs.push(f);
        }
        Ok(made)
    }

    /// The `cgroup.procs` fds a child writes `0` to, to move itself in.
    pub fn procs_fds(&self) -> Vec<RawFd> {
        self.procs.iter().map(|f| f.as_raw_fd()).collect()
    }

    /// The directories, one per hierarchy.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Moves the calling process into the cgroup. Only async-signal-safe
    /// calls: it runs in the child between fork and exec.
    pub fn enter_from_child(fds: &[RawFd]) -> io::Result<()> {
        for &fd in fds {
            // SAFETY: write(2) of a static buffer to an fd the parent
            // opened and the child inherited.
            if unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } != 1 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Leaves the directories as they are (their process now belongs to
    /// another VMM), closing only this VMM's files in them.
    pub fn keep(mut self) {
        self.procs.clear();
        self.dirs.clear();
    }
}

impl Drop for RemoteCgroup {
    /// Removes the directories (a cgroup with a process left is kept, with
    /// a warning: the caller drops it once the process has ended).
    fn drop(&mut self) {
        self.procs.clear();
        for dir in self.dirs.iter().rev() {
            if let Err(e) = std::fs::remove_dir(dir) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!("cgroup {} left behind: {e}", dir.display());
                }
            }
        }
    }
}

/// Opens an existing cgroup file for writing (`create` too: cgroupfs made
/// it with the directory; a plain directory standing in for one in tests
/// has not).
fn open_for_writing(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    open_for_writing(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|source| CgroupError::Io {
            path: path.to_owned(),
            source,
        })
}

/// The VMM's cgroup path in the hierarchy whose `/proc/self/cgroup` line
/// names `controller` (v1), or in the unified one (`controller` empty).
fn own_path<'a>(own: &'a str, controller: &str) -> Option<&'a str> {
    own.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let found = if controller.is_empty() {
            controllers.is_empty()
        } else {
            controllers.split(',').any(|c| c == controller)
        };
        found.then_some(path)
    })
}

/// `root` joined with an absolute cgroup path.
fn below(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

/// The limits as (controller, file, value) for cgroup v1.
fn v1_writes(limits: &ResourceLimits) -> Vec<(&'static str, &'static str, String)> {
    let mut w = Vec::new();
    if let Some(m) = limits.memory_bytes {
        w.push(("memory", "memory.limit_in_bytes", m.to_string()));
    }
    if let Some(c) = limits.cpu_percent {
        w.push(("cpu", "cpu.cfs_period_us", CPU_PERIOD_US.to_string()));
        w.push((
            "cpu",
            "cpu.cfs_quota_us",
            (u64::from(c) * CPU_PERIOD_US / 100).to_string(),
        ));
    }
    if let Some(t) = limits.tasks {
        w.push(("pids", "pids.max", t.to_string()));
    }
    w
}

fn plan_v1(
    root: &Path,
    own: &str,
    name: &str,
    limits: &ResourceLimits,
) -> Result<Vec<Plan>, CgroupError> {
    let mut plans: Vec<Plan> = Vec::new();
    for (controller, file, value) in v1_writes(limits) {
        let mount = root.join(controller);
        let path = own_path(own, controller)
            .filter(|_| mount.join("cgroup.procs").exists())
            .ok_or(CgroupError::NoController(controller))?;
        let dir = below(&mount, path).join(name);
        match plans.iter_mut().find(|p| p.dir == dir) {
            Some(p) => p.writes.push((file, value)),
            None => plans.push(Plan {
                dir,
                writes: vec![(file, value)],
            }),
        }
    }
    Ok(plans)
}

fn plan_v2(
    root: &Path,
    own: &str,
    name: &str,
    limits: &ResourceLimits,
) -> Result<Vec<Plan>, CgroupError> {
    let parent = below(root, own_path(own, "").unwrap_or("/"));
    let mut writes = Vec::new();
    let mut controllers = Vec::new();
    if let Some(m) = limits.memory_bytes {
        controllers.push("memory");
        writes.push(("memory.max", m.to_string()));
    }
    if let Some(c) = limits.cpu_percent {
        controllers.push("cpu");
        writes.push((
            "cpu.max",
            format!("{} {CPU_PERIOD_US}", u64::from(c) * CPU_PERIOD_US / 100),
        ));
    }
    if let Some(t) = limits.tasks {
        controllers.push("pids");
        writes.push(("pids.max", t.to_string()));
    }
    let available =
        std::fs::read_to_string(parent.join("cgroup.controllers")).map_err(|source| {
            CgroupError::Io {
                path: parent.join("cgroup.controllers"),
                source,
            }
        })?;
    let enabled =
        std::fs::read_to_string(parent.join("cgroup.subtree_control")).unwrap_or_default();
    for c in controllers {
        if enabled.split_whitespace().any(|e| e == c) {
            continue;
        }
        if !available.split_whitespace().any(|a| a == c) {
            return Err(CgroupError::NoController(c));
        }
        let path = parent.join("cgroup.subtree_control");
        open_for_writing(&path)
            .and_then(|mut f| f.write_all(format!("+{c}").as_bytes()))
            .map_err(|source| CgroupError::NotDelegated {
                controller: c,
                path: parent.clone(),
                source,
            })?;
    }
    Ok(vec![Plan {
        dir: parent.join(name),
        writes,
    }])
}

#[cfg(test)]
mod tests;
