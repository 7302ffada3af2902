//! Remote device processes: for each `[[remote]]` the VMM either spawns
//! `remote-host serve` (one end of a socketpair inherited as fd 3, or a
//! private socket directory when the remote serves several devices),
//! connects to the socket an orchestrator made (`socket = "..."`), or
//! uses a connected socket it inherited (`host run --remote-fd ID=N`, the
//! way QEMU's `x-remote` is started: it only takes a connected fd).
//! Spawned remotes get `PR_SET_PDEATHSIG`, are each the first process of a
//! PID namespace of their own ([`pid_namespace`]), and are stopped when the
//! VM ends.
//! The protocol is the remote's `protocol` (vfio-user or mpqemu).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod cgroup;
mod pid_namespace;
pub mod pidfd;

use anyhow::{bail, Context, Result};
use channel::control::ControlClient;
use channel::mpqemu::{ClientOptions as MpqemuOptions, MpqemuClient};
use channel::vfio_user::{ClientOptions, VfioUserClient};
use config::{Config, Protocol, RemoteConfig};

/// The fd number the spawned remote finds its socket on.
pub const REMOTE_FD: i32 = 3;

/// How a spawned remote ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcessEnd {
    /// exit(code)
    Exited(i32),
    /// Killed by this signal.
    Signaled(i32),
}

/// The remote processes the VMM spawned (shared: a restart replaces one).
pub type Processes = std::sync::Arc<std::sync::Mutex<Vec<RemoteProcess>>>;

/// How our child `pid` ended, if it has (without reaping it).
pub fn process_end(pid: u32) -> Option<ProcessEnd> {
    wait_end(pid, libc::WNOHANG)
}

/// waitid(2) for the end of child `pid`, leaving it to be reaped
/// (`WNOWAIT`); `flags` may add `WNOHANG`.
fn wait_end(pid: u32, flags: libc::c_int) -> Option<ProcessEnd> {
    // SAFETY: siginfo_t is plain data; zeroed is a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on our own child with a valid out pointer; WNOWAIT
    // leaves the child to be reaped by `RemoteProcess::stop`.
    let r = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOWAIT | flags,
        )
    };
    // SAFETY: si_pid is valid in the SIGCHLD siginfo waitid fills in (0
    // when, with WNOHANG, the child has not changed state).
    if r != 0 || unsafe { info.si_pid() } == 0 {
        return None;
    }
    // SAFETY: as above.
    let status = unsafe { info.si_status() };
    Some(if info.si_code == libc::CLD_EXITED {
        ProcessEnd::Exited(status)
    } else {
        ProcessEnd::Signaled(status)
    })
}

/// A spawned `remote-host`.
#[derive(Debug)]
pub struct RemoteProcess {
    pub id: String,
    child: Child,
    rundir: Option<PathBuf>,
    /// Its resource limits' cgroup, removed once it has ended.
    cgroup: Option<cgroup::RemoteCgroup>,
}

impl RemoteProcess {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Calls `on_exit` as soon as the process ends (SIGCHLD), from a
    /// thread of its own. Waits with `WNOWAIT`, so [`stop`](Self::stop)
    /// still reaps it.
    pub fn watch(&self, on_exit: impl FnOnce(ProcessEnd) + Send + 'static) {
        let pid = self.child.id();
        let spawned = std::thread::Builder::new()
            .name(format!("watch-{}", self.id))
            .spawn(move || {
                if let Some(end) = wait_end(pid, 0) {
                    on_exit(end);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot watch remote {}: {e}", self.id);
        }
    }

    /// Waits up to `grace` for the process to leave (it does once its
    /// clients have gone), then kills it.
    pub fn stop(&mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => {
                    if !st.success() {
                        tracing::warn!("remote {} exited with {st}", self.id);
                    }
                    break;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
            }
        }
        if let Some(d) = self.rundir.take() {
            let _ = std::fs::remove_dir_all(d);
        }
        self.cgroup = None;
    }

    /// Lets the process go without stopping it: it was handed over to
    /// another VMM (a migration on this machine), whose it is now. It is
    /// not killed or reaped here (once this VMM ends, it is reparented),
    /// and its cgroup stays with it, named after this VMM.
    pub fn release(mut self) {
        if let Some(d) = self.rundir.take() {
            // Its devices are reached by `device-connect` now, not there.
            let _ = std::fs::remove_dir_all(d);
        }
        if let Some(c) = self.cgroup.take() {
            c.keep();
        }
        let id = std::mem::take(&mut self.id);
        tracing::info!("remote {id}: process {} released", self.child.id());
        // No Drop: that would kill it. The `Child` holds no fd (stdio is
        // not piped), so forgetting it leaks nothing.
        std::mem::forget(self);
    }

    /// The directories of its resource limits' cgroup, one per hierarchy
    /// (none without limits).
    pub fn cgroup_dirs(&self) -> &[PathBuf] {
        self.cgroup.as_ref().map_or(&[], |c| c.dirs())
    }
}

impl Drop for RemoteProcess {
    fn drop(&mut self) {
        self.stop(Duration::ZERO);
    }
}

/// The `remote-host` binary: `$REMOTE_HOST`, else next to this executable.
pub fn remote_host_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("REMOTE_HOST") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let p = exe
        .parent()
        .map(|d| d.join("remote-host"))
        .context("executable has no directory")?;
    if !p.exists() {
        bail!("{} not found (build it, or set REMOTE_HOST)", p.display());
    }
    Ok(p)
}

fn client_options(r: &RemoteConfig) -> ClientOptions {
    let mut o = ClientOptions {
        timeout: Duration::from_millis(r.timeout_ms.max(1)),
        ..Default::default()
    };
    // Measurement knob: the client's busy-poll window before it sleeps.
    if let Some(us) = std::env::var("HOST_POLL_US")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        o.poll = Duration::from_micros(us);
        o.adaptive_poll = false;
    }
    o
}

fn mpqemu_options(r: &RemoteConfig) -> MpqemuOptions {
    let o = client_options(r);
    MpqemuOptions {
        timeout: o.timeout,
        poll: o.poll,
        adaptive_poll: o.adaptive_poll,
        ..Default::default()
    }
}

/// A connected client of one remote device.
#[derive(Debug)]
pub enum RemoteClient {
    VfioUser(VfioUserClient),
    /// mpqemu has no handshake: the client still has the startup timeout,
    /// and `timeout` is the one to use once the remote has answered.
    Mpqemu {
        client: MpqemuClient,
        timeout: Duration,
    },
}

/// Makes a client over a connected socket. vfio-user's handshake runs now,
/// with the startup timeout.
pub fn client_over(r: &RemoteConfig, sock: UnixStream) -> Result<RemoteClient> {
    match r.protocol {
        Protocol::VfioUser => {
            let opts = client_options(r);
            let normal = opts.timeout;
            let first = ClientOptions {
                timeout: startup_timeout(normal),
                ..opts
            };
            let mut c = VfioUserClient::from_stream(sock, first)?;
            c.set_timeout(normal);
            Ok(RemoteClient::VfioUser(c))
        }
        Protocol::Mpqemu => {
            let opts = mpqemu_options(r);
            let timeout = opts.timeout;
            let first = MpqemuOptions {
                timeout: startup_timeout(timeout),
                ..opts
            };
            Ok(RemoteClient::Mpqemu {
                client: MpqemuClient::from_stream(sock, first),
                timeout,
            })
        }
    }
}

/// Takes over inherited fd `fd` (a connected socket) for the remote `id`
/// (`host run --remote-fd ID=N`): checks it is a socket and marks it
/// close-on-exec, so spawned remotes do not inherit it.
pub fn inherited_socket(id: &str, fd: i32) -> Result<UnixStream> {
    if fd < 3 {
        bail!("--remote-fd {id}={fd}: fds 0-2 are stdio");
    }
    // SAFETY: fstat on any fd number only fills `st`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid out pointer.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        bail!("--remote-fd {id}={fd}: {}", std::io::Error::last_os_error());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        bail!("--remote-fd {id}={fd}: not a socket");
    }
    // SAFETY: F_SETFD on an open fd.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        bail!("--remote-fd {id}={fd}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: the fd is open, was inherited for this purpose, and nothing
    // else in this process owns it (each --remote-fd is taken once).
    Ok(UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn serve_command(config: &Config, r: &RemoteConfig) -> Result<Command> {
    let mut cmd = Command::new(remote_host_binary()?);
    let cfg_path = std::path::absolute(&config.path).context("config path")?;
    cmd.arg("serve")
        .arg("--config")
        .arg(cfg_path)
        .arg("--remote")
        .arg(&r.id)
        .arg("--protocol")
        .arg(r.protocol.name())
        .stdin(Stdio::null());
    Ok(cmd)
}

fn wait_socket(path: &Path, child: &mut Child, timeout: Duration) -> Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(s) = UnixStream::connect(path) {
            return Ok(s);
        }
        if let Ok(Some(st)) = child.try_wait() {
            bail!(
                "remote-host exited ({st}) before listening on {}",
                path.display()
            );
        }
        if Instant::now() > deadline {
            bail!("{} did not appear within {timeout:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A remote's process (when spawned) and one client per device id.
pub type Connected = (Option<RemoteProcess>, Vec<(String, RemoteClient)>);

/// The fd a spawned remote finds its control channel on.
pub const CONTROL_FD: i32 = 4;

/// What [`connect_supervised`] gives: the remote's process, a client per
/// device, and (for a `remote-host` we spawned) its control channel.
pub struct Supervised {
    pub process: Option<RemoteProcess>,
    pub clients: Vec<(String, RemoteClient)>,
    pub control: Option<ControlClient>,
    /// A duplicate of the control socket, for the supervisor to poll.
    pub control_hangup: Option<OwnedFd>,
}

/// How long a freshly spawned remote may take to answer at all.
pub fn startup_timeout(normal: Duration) -> Duration {
    normal.max(Duration::from_secs(60))
}

/// Starts (or connects to) remote `r` and returns a connected client per
/// device of that remote, in config order. `inherited`: a connected
/// socket given with `--remote-fd` (the remote must have one device).
pub fn connect(
    config: &Config,
    r: &RemoteConfig,
    inherited: Option<UnixStream>,
) -> Result<Connected> {
    let s = connect_inner(config, r, inherited, false)?;
    Ok((s.process, s.clients))
}

/// As [`connect`], and a spawned `remote-host` also gets a control
/// channel (`--control 4`: heartbeats, device and drive hotplug). Such a
/// remote is spawned even with no device yet, so devices can be added.
pub fn connect_supervised(
    config: &Config,
    r: &RemoteConfig,
    inherited: Option<UnixStream>,
) -> Result<Supervised> {
    connect_inner(config, r, inherited, true)
}

/// Moves `fd` to `target` in a forked child before exec. Goes through a
/// high number first so that moving one fd never clobbers another that is
/// still to be moved.
fn move_fd_high(fd: i32) -> std::io::Result<i32> {
    // SAFETY: F_DUPFD on an fd that is open in the child.
    let n = unsafe { libc::fcntl(fd, libc::F_DUPFD, 64) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n)
}

fn connect_inner(
    config: &Config,
    r: &RemoteConfig,
    inherited: Option<UnixStream>,
    with_control: bool,
) -> Result<Supervised> {
    let devices: Vec<String> = config
        .devices_of_remote(&r.id)
        .map(|d| d.id.clone())
        .collect();
    let mut clients = Vec::new();
    if let Some(sock) = inherited {
        if devices.len() != 1 {
            bail!(
                "{}: --remote-fd {}: the remote has {} devices; an inherited socket serves exactly one",
                r.location,
                r.id,
                devices.len()
            );
        }
        let c = client_over(r, sock)
            .with_context(|| format!("remote `{}`, device `{}`", r.id, devices[0]))?;
        clients.push((devices[0].clone(), c));
        return Ok(Supervised {
            process: None,
            clients,
            control: None,
            control_hangup: None,
        });
    }
    if let Some(sock) = &r.socket {
        for id in &devices {
            let path = if sock.is_dir() {
                sock.join(format!("{id}.sock"))
            } else {
                sock.clone()
            };
            let s = UnixStream::connect(&path).with_context(|| {
                format!(
                    "remote `{}`, device `{id}`: cannot connect to {}",
                    r.id,
                    path.display()
                )
            })?;
            let c =
                client_over(r, s).with_context(|| format!("remote `{}`, device `{id}`", r.id))?;
            clients.push((id.clone(), c));
        }
        return Ok(Supervised {
            process: None,
            clients,
            control: None,
            control_hangup: None,
        });
    }
    if devices.is_empty() && !with_control {
        return Ok(Supervised {
            process: None,
            clients,
            control: None,
            control_hangup: None,
        });
    }
    spawn_remote(config, r, with_control, false)?.connect(r)
}

/// The fd a standby `remote-host` waits on (`serve --standby 5`): one byte
/// from the VMM starts it, end of file ends it.
pub const STANDBY_FD: i32 = 5;

/// A spawned `remote-host` not connected to yet: its process and our ends
/// of its channels. A standby one (see [`spawn_standby`]) waits for
/// [`connect`](Self::connect) before it builds its devices.
pub struct Spawned {
    proc: RemoteProcess,
    /// The config's devices of the remote, in order.
    devices: Vec<String>,
    /// One device: our end of the socket it serves it on.
    device_socket: Option<UnixStream>,
    /// Otherwise the directory its devices' sockets appear in.
    rundir: Option<PathBuf>,
    control_ours: Option<UnixStream>,
    control_hangup: Option<OwnedFd>,
    /// A standby's start signal (the write end of its pipe).
    go: Option<OwnedFd>,
    timeout: Duration,
}

impl Spawned {
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Starts a standby (one byte on its pipe) and connects to its
    /// devices, as [`connect_supervised`] does to a fresh remote.
    pub fn connect(mut self, r: &RemoteConfig) -> Result<Supervised> {
        if let Some(go) = self.go.take() {
            let mut f = std::fs::File::from(go);
            if let Err(e) = std::io::Write::write_all(&mut f, b"g") {
                self.proc.stop(Duration::ZERO);
                bail!("remote `{}`: its standby process is gone ({e})", r.id);
            }
        }
        let mut clients = Vec::new();
        if let Some(ours) = self.device_socket.take() {
            let id = self.devices.first().cloned().unwrap_or_default();
            // The first reply waits for the process to start and load its
            // plugins (slow on a cold cache, seconds in a nested guest).
            match client_over(r, ours).with_context(|| format!("remote `{}`, device `{id}`", r.id))
            {
                Ok(c) => clients.push((id, c)),
                Err(e) => {
                    self.proc.stop(Duration::ZERO);
                    return Err(e);
                }
            }
        } else if let Some(rundir) = &self.rundir {
            for id in &self.devices {
                let sock = wait_socket(
                    &rundir.join(format!("{id}.sock")),
                    &mut self.proc.child,
                    self.timeout,
                )?;
                let c = client_over(r, sock)
                    .with_context(|| format!("remote `{}`, device `{id}`", r.id))?;
                clients.push((id.clone(), c));
            }
        }
        let timeout = self.timeout;
        Ok(Supervised {
            process: Some(self.proc),
            clients,
            control: self.control_ours.map(|s| ControlClient::new(s, timeout)),
            control_hangup: self.control_hangup,
        })
    }
}

/// Spawns a `remote-host` for `r` that gets ready (config read, jail
/// entered) and then waits, its devices not built, until
/// [`Spawned::connect`] starts it: what an automatic restart takes
/// instead of starting a process from nothing (docs/qmp.md). Dropped
/// unused, it ends (its pipe closes; the VMM's end kills it too).
pub fn spawn_standby(config: &Config, r: &RemoteConfig) -> Result<Spawned> {
    spawn_remote(config, r, true, true)
}

/// Spawns `remote-host serve` for `r`: its device on an inherited socket
/// (fd 3) when it has exactly one, else in a private socket directory;
/// with `with_control` its control channel on fd 4; with `standby` its
/// start pipe on fd 5.
fn spawn_remote(
    config: &Config,
    r: &RemoteConfig,
    with_control: bool,
    standby: bool,
) -> Result<Spawned> {
    let devices: Vec<String> = config
        .devices_of_remote(&r.id)
        .map(|d| d.id.clone())
        .collect();
    let timeout = startup_timeout(client_options(r).timeout);
    let mut cmd = serve_command(config, r)?;
    // The control channel: ours stays here, theirs becomes fd 4.
    let (control_ours, control_theirs) = if with_control {
        let (a, b) = UnixStream::pair().context("socketpair")?;
        cmd.arg("--control").arg(CONTROL_FD.to_string());
        (Some(a), Some(OwnedFd::from(b)))
    } else {
        (None, None)
    };
    let control_hangup = control_ours
        .as_ref()
        .and_then(|s| s.try_clone().ok())
        .map(OwnedFd::from);
    let (go, go_theirs) = if standby {
        let mut fds = [0i32; 2];
        // SAFETY: `fds` is a valid out array of two ints.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error()).context("standby pipe");
        }
        cmd.arg("--standby").arg(STANDBY_FD.to_string());
        // SAFETY: pipe2 just made both fds; each is owned once here.
        unsafe {
            (
                Some(OwnedFd::from_raw_fd(fds[1])),
                Some(OwnedFd::from_raw_fd(fds[0])),
            )
        }
    } else {
        (None, None)
    };
    let (device_socket, device_theirs, rundir) = if devices.len() == 1 {
        let (ours, theirs) = UnixStream::pair().context("socketpair")?;
        cmd.arg("--fd").arg(REMOTE_FD.to_string());
        (Some(ours), Some(OwnedFd::from(theirs)), None)
    } else {
        // No device or several: a private socket directory, one socket
        // per device.
        let rundir = private_dir(&format!("host-{}-", r.id))?;
        cmd.arg("--socket").arg(&rundir);
        (None, None, Some(rundir))
    };
    let moves: Vec<(i32, i32)> = [
        (device_theirs.as_ref(), REMOTE_FD),
        (control_theirs.as_ref(), CONTROL_FD),
        (go_theirs.as_ref(), STANDBY_FD),
    ]
    .into_iter()
    .filter_map(|(fd, to)| fd.map(|f| (f.as_raw_fd(), to)))
    .collect();
    let cgroup = cgroup::RemoteCgroup::create(&cgroup_name(r), &r.limits)
        .with_context(|| format!("remote `{}`: its resource limits", r.id))?;
    let cgroup_fds = cgroup.as_ref().map(|c| c.procs_fds()).unwrap_or_default();
    // SAFETY: the hook only calls async-signal-safe functions (fcntl,
    // dup2, prctl, write) on fds that stay open until the child has
    // exec'd; it allocates nothing (`moves` and `cgroup_fds` were made
    // before the fork).
    unsafe {
        cmd.pre_exec(move || {
            // In its limits before a line of remote-host runs.
            cgroup::RemoteCgroup::enter_from_child(&cgroup_fds)?;
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Each fd goes high first, so that moving one never clobbers
            // another that is still to be moved.
            let mut high = [(-1i32, -1i32); 3];
            for (slot, &(fd, to)) in high.iter_mut().zip(moves.iter()) {
                *slot = (move_fd_high(fd)?, to);
            }
            for &(fd, to) in high.iter().take(moves.len()) {
                if libc::dup2(fd, to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let t = std::time::Instant::now();
    // The jail's PID namespace part is the VMM's to make (see
    // `pid_namespace`); `jail = false` turns it off with the rest.
    let spawned = spawn_child(cmd, r.jail != Some(false));
    tracing::info!("remote {}: spawned in {:?}", r.id, t.elapsed());
    let child = match spawned {
        Ok(c) => c,
        Err(e) => {
            if let Some(d) = &rundir {
                let _ = std::fs::remove_dir_all(d);
            }
            return Err(e).with_context(|| format!("spawning remote-host for `{}`", r.id));
        }
    };
    drop((device_theirs, control_theirs, go_theirs));
    Ok(Spawned {
        proc: RemoteProcess {
            id: r.id.clone(),
            child,
            rundir: rundir.clone(),
            cgroup,
        },
        devices,
        device_socket,
        rundir,
        control_ours,
        control_hangup,
        go,
        timeout,
    })
}

/// The cgroup of one spawned process of remote `r`: `host-<VMM pid>-<remote
/// id>-<n>`, a new one per process (a standby and the remote it replaces
/// run side by side).
fn cgroup_name(r: &RemoteConfig) -> String {
    static SPAWNED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SPAWNED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("host-{}-{}-{n}", std::process::id(), r.id)
}

/// A new directory only this user can enter, with an unguessable name
/// (mkdtemp: created atomically with mode 0700, never an existing one), in
/// the temporary directory: where a remote's device sockets go. A name
/// another local user could predict and create first would let them
/// receive the guest's RAM through a socket of their own.
pub fn private_dir(prefix: &str) -> Result<PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    let template = std::env::temp_dir().join(format!("{prefix}XXXXXX"));
    let mut bytes = std::ffi::CString::new(template.into_os_string().into_vec())
        .context("temporary directory path")?
        .into_bytes_with_nul();
    // SAFETY: `bytes` is a NUL-terminated template ending in XXXXXX that
    // mkdtemp rewrites in place; it lives across the call.
    let p = unsafe { libc::mkdtemp(bytes.as_mut_ptr().cast()) };
    if p.is_null() {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("creating a private directory for {prefix}"));
    }
    bytes.pop();
    Ok(PathBuf::from(std::ffi::OsString::from_vec(bytes)))
}

/// Spawns `cmd` from a thread that lives as long as the VMM. A spawned
/// remote has `PR_SET_PDEATHSIG`, which the kernel fires when the *thread*
/// that forked it ends, not the process: a remote spawned by a thread
/// that ends soon after (an automatic restart's, a QMP client's) was
/// killed with it. Should that thread not start, the caller's thread
/// spawns, as before (and with no PID namespace). With `own_pid_namespace`
/// the child is the first process of a new PID namespace where the VMM may
/// make one ([`pid_namespace`]).
fn spawn_child(cmd: Command, own_pid_namespace: bool) -> std::io::Result<Child> {
    use std::sync::mpsc::{channel, SendError, Sender};
    type Job = (Command, bool, Sender<std::io::Result<Child>>);
    static SPAWNER: std::sync::OnceLock<std::sync::Mutex<Sender<Job>>> = std::sync::OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = channel::<Job>();
        let started = std::thread::Builder::new()
            .name("remote-spawner".into())
            .spawn(move || {
                let namespaces = pid_namespace::PidNamespaces::open()
                    .inspect_err(|e| {
                        tracing::info!(
                            "remotes share the VMM's PID namespace (it may not make one: {e})"
                        )
                    })
                    .ok();
                while let Ok((mut cmd, own, reply)) = rx.recv() {
                    let ns = namespaces.as_ref().filter(|_| own);
                    let ns = ns.filter(|ns| match ns.next_child_in_a_new_one() {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::warn!("no PID namespace for this remote: {e}");
                            false
                        }
                    });
                    let _ = reply.send(cmd.spawn());
                    if let Some(Err(e)) = ns.map(|ns| ns.back_to_our_own()) {
                        tracing::warn!(
                            "the next remote may be made in this one's PID namespace: {e}"
                        );
                    }
                }
            });
        if let Err(e) = started {
            tracing::warn!("no spawner thread ({e}); remotes are spawned by the asking thread");
        }
        std::sync::Mutex::new(tx)
    });
    let (reply, answer) = channel();
    let sent =
        spawner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send((cmd, own_pid_namespace, reply));
    match sent {
        Ok(()) => answer
            .recv()
            .unwrap_or_else(|_| Err(std::io::Error::other("the spawner thread ended"))),
        Err(SendError((mut cmd, _, _))) => cmd.spawn(),
    }
}

#[cfg(test)]
mod private_dir_tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn private_dirs_are_new_and_only_ours() {
        let a = private_dir("host-test-").unwrap();
        let b = private_dir("host-test-").unwrap();
        assert_ne!(a, b);
        for d in [&a, &b] {
            let m = std::fs::metadata(d).unwrap();
            assert!(m.is_dir());
            assert_eq!(m.mode() & 0o777, 0o700, "{}", d.display());
            // SAFETY: geteuid has no preconditions.
            assert_eq!(m.uid(), unsafe { libc::geteuid() });
            std::fs::remove_dir(d).unwrap();
        }
    }
}
