//! Supervision of remote device processes: one thread per remote notices
//! at once when its channels hang up (poll for `POLLRDHUP`) or its process
//! ends (SIGCHLD, through [`RemoteProcess::watch`]), and sends heartbeats
//! with the remote's period and timeout: a `ping` on the control channel
//! of a `remote-host` we spawned, else a cheap request on each device's
//! own channel (QEMU's `x-remote`, orchestrator-made sockets).
//!
//! A remote that died or hung has its failure flag set: its proxy
//! functions then read all-ones at once instead of waiting for the channel
//! (the vCPUs never wait past the channel timeout, and after the report
//! not at all). The flag stays set: a hung remote that answers again is
//! reported alive, but its devices stay failed until the operator removes
//! them or restarts the remote, because requests timed out in the middle
//! of the devices' protocol streams.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use channel::control::{ControlClient, ControlError};
use config::Protocol;
use serde_json::{json, Value};

use crate::pci::root::PciRoot;
use crate::remote::ProcessEnd;

/// How long a control operation (device-add, drive-add, ...) may take.
const CONTROL_OP_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a remote is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoteState {
    /// No heartbeat answered yet.
    Starting,
    Running,
    /// No heartbeat answer within the timeout.
    Hung,
    /// Its process ended or its channels hung up.
    Dead,
    /// Shut down by us as the VM ended.
    Stopped,
    /// Handed over to another VMM by a migration on this machine: its
    /// process and channels are that VMM's now (docs/migration.md).
    HandedOver,
}

impl RemoteState {
    pub fn name(self) -> &'static str {
        match self {
            RemoteState::Starting => "starting",
            RemoteState::Running => "running",
            RemoteState::Hung => "hung",
            RemoteState::Dead => "dead",
            RemoteState::Stopped => "stopped",
            RemoteState::HandedOver => "handed-over",
        }
    }
}

struct Status {
    state: RemoteState,
    last_heartbeat: Option<SystemTime>,
    last_answer: Instant,
}

/// One remote as the VMM supervises it.
pub struct Remote {
    pub id: String,
    pub protocol: Protocol,
    /// The socket we connected to, for a remote an orchestrator started.
    pub socket: Option<PathBuf>,
    pub pid: Option<u32>,
    pub heartbeat: Duration,
    pub timeout: Duration,
    /// `fast-path`: set up access rings for this remote's devices.
    pub fast_path: bool,
    /// `[[remote]] doorbells`.
    pub doorbells: bool,
    /// Set once the remote died or hung; shared with its proxies.
    pub failed: Arc<AtomicBool>,
    /// When this process (or connection) was set up.
    pub started: Instant,
    status: Mutex<Status>,
    control: Mutex<Option<ControlClient>>,
    /// Device ids it serves (PCI functions), with a duplicate of each
    /// device channel's socket, polled for hang-up.
    devices: Mutex<Vec<(String, Option<OwnedFd>)>>,
    /// A duplicate of the control socket, polled for hang-up (dropped once
    /// the remote is handed over).
    control_fd: Mutex<Option<OwnedFd>>,
    /// A pidfd of its process when it is not our child (a remote a
    /// migration handed over): how it is waited for and killed.
    pidfd: Option<OwnedFd>,
    /// Devices already reported failed.
    reported_failures: Mutex<std::collections::HashSet<String>>,
    /// Its control channel is lent to a migration that may hand the
    /// remote over: heartbeats pause until it comes back or the remote is
    /// handed over.
    lent: AtomicBool,
    /// Told once the remote died or hung (automatic restart).
    failure_hook: Mutex<Option<FailureHook>>,
    /// The devices' last saved states, kept while they are idle, for a
    /// restart after a crash (`restart` other than "never").
    pub checkpoints: Option<crate::checkpoint::Checkpoints>,
}

/// How a remote failed, as its failure hook hears it.
#[derive(Clone, Copy, Debug)]
pub enum Failure {
    /// Its process ended or its channels hung up.
    Died(DeathCause),
    /// It stopped answering heartbeats within its timeout.
    Hung,
}

impl Failure {
    /// Whether the remote ended of its own accord with success (`exit(0)`):
    /// `restart = "on-failure"` leaves that alone.
    pub fn clean_exit(self) -> bool {
        matches!(
            self,
            Failure::Died(DeathCause::Process(ProcessEnd::Exited(0)))
        )
    }
}

/// What runs when a remote fails, after its event went out: the monitor's
/// automatic restart (`[[remote]] restart`). Returns whether a restart
/// follows (the failure message says what the devices do meanwhile).
pub type FailureHook = Arc<dyn Fn(Failure) -> bool + Send + Sync>;

/// What a failed remote's devices do next, for its failure message.
fn what_follows(restarting: bool) -> &'static str {
    if restarting {
        "its devices wait for its automatic restart"
    } else {
        "its devices now read all-ones"
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A wall-clock time as QMP's `{"seconds", "microseconds"}`.
pub fn timestamp(t: SystemTime) -> Value {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    json!({"seconds": d.as_secs(), "microseconds": d.subsec_micros()})
}

/// Why a heartbeat failed.
enum Silence {
    /// No answer within the timeout.
    Timeout,
    /// The channel is gone.
    Closed(String),
}

impl Remote {
    pub fn new(
        cfg: &config::RemoteConfig,
        pid: Option<u32>,
        control: Option<ControlClient>,
        control_fd: Option<OwnedFd>,
    ) -> Remote {
        Remote {
            id: cfg.id.clone(),
            protocol: cfg.protocol,
            socket: cfg.socket.clone(),
            pid,
            heartbeat: Duration::from_millis(cfg.heartbeat_ms),
            timeout: Duration::from_millis(cfg.timeout_ms),
            fast_path: cfg.fast_path,
            doorbells: cfg.doorbells,
            failed: Arc::new(AtomicBool::new(false)),
            started: Instant::now(),
            status: Mutex::new(Status {
                state: RemoteState::Starting,
                last_heartbeat: None,
                last_answer: Instant::now(),
            }),
            control: Mutex::new(control),
            devices: Mutex::new(Vec::new()),
            control_fd: Mutex::new(control_fd),
            pidfd: None,
            reported_failures: Mutex::new(Default::default()),
            lent: AtomicBool::new(false),
            failure_hook: Mutex::new(None),
            checkpoints: (cfg.restart != config::RestartPolicy::Never)
                .then(crate::checkpoint::Checkpoints::default),
        }
    }

    /// Puts `proxy` (device `id`) on the fast path when this remote is ours
    /// (a control channel) and `fast-path` is on: an access ring created
    /// here, handed over with the control channel's `ring-setup`. On any
    /// failure the device stays on the socket, which is said in the log.
    pub fn attach_fast_path(
        &self,
        vm: &Arc<kvm_ioctls::VmFd>,
        id: &str,
        proxy: &mut crate::pci::proxy::ProxyFunction,
    ) {
        if !self.fast_path || !self.has_control() {
            return;
        }
        let (ring, fds) = match channel::ring::create(self.timeout, channel::framing::DEFAULT_POLL)
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("{id}: no access ring ({e}); BAR accesses stay on the socket");
                return;
            }
        };
        let (bells, state_doorbells) = self.doorbell_eventfds(id);
        if let Some(keys) = state_doorbells {
            // Its saved state stays current while the guest only rings it,
            // whichever way the doorbells arrive.
            proxy.set_state_doorbells(keys);
        }
        let keyed: Vec<(channel::ring::DoorbellKey, std::os::fd::BorrowedFd<'_>)> = bells
            .iter()
            .map(|(k, e)| (*k, crate::pci::proxy::borrow(e)))
            .collect();
        match self.with_control(|c| c.ring_setup(id, &fds, &keyed)) {
            Ok(()) => {
                proxy.attach_ring(ring);
                if !bells.is_empty() {
                    proxy.attach_doorbells(crate::pci::proxy::doorbells::Doorbells::new(
                        vm.clone(),
                        bells,
                    ));
                }
                tracing::info!("{id}: BAR accesses on the access ring");
            }
            Err(e) => {
                tracing::warn!("{id}: no access ring ({e}); BAR accesses stay on the socket")
            }
        }
    }

    /// The doorbells device `id` declares, each with a fresh eventfd (none
    /// when the remote predates them or `doorbells = false`), and all of
    /// them again when the device's saved states outlive them.
    #[allow(clippy::type_complexity)]
    fn doorbell_eventfds(
        &self,
        id: &str,
    ) -> (
        Vec<(channel::ring::DoorbellKey, vmm_sys_util::eventfd::EventFd)>,
        Option<Vec<channel::ring::DoorbellKey>>,
    ) {
        if !self.doorbells {
            return (Vec::new(), None);
        }
        let declared = match self.with_control(|c| c.device_doorbells(id)) {
            Ok(d) => d,
            Err(e) => {
                tracing::info!("{id}: no doorbells ({e}); every write takes the ring");
                return (Vec::new(), None);
            }
        };
        let keys = declared.keys;
        let state_doorbells = declared.state_outlives.then(|| keys.clone());
        let room = channel::framing::MAX_FDS - 3;
        if keys.len() > room {
            tracing::warn!(
                "{id}: {} doorbells declared, {room} delivered through KVM; the rest take the ring",
                keys.len()
            );
        }
        let bells = keys
            .into_iter()
            .take(room)
            .filter_map(|k| {
                match vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK) {
                    Ok(e) => Some((k, e)),
                    Err(e) => {
                        tracing::warn!("{id}: doorbell eventfd: {e}; that write takes the ring");
                        None
                    }
                }
            })
            .collect();
        (bells, state_doorbells)
    }

    /// Records a device served by this remote; `socket_fd`: its channel;
    /// `activity`: its proxy's count of accesses that reached it.
    pub fn add_device(
        &self,
        id: &str,
        socket_fd: Option<std::os::fd::RawFd>,
        activity: impl Into<crate::checkpoint::Activity>,
    ) {
        if let Some(cp) = &self.checkpoints {
            cp.track(id, activity);
        }
        let dup = socket_fd.and_then(|fd| {
            // SAFETY: F_DUPFD_CLOEXEC on an fd the caller keeps open for
            // the call; the result is a new fd we own.
            let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
            // SAFETY: `n` is a fresh fd owned by nobody else.
            (n >= 0).then(|| unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(n) })
        });
        lock(&self.devices).push((id.to_owned(), dup));
    }

    /// Forgets a device (after `device_del`).
    pub fn remove_device(&self, id: &str) {
        if let Some(cp) = &self.checkpoints {
            cp.forget(id);
        }
        lock(&self.devices).retain(|(d, _)| d != id);
    }

    pub fn device_ids(&self) -> Vec<String> {
        lock(&self.devices).iter().map(|(d, _)| d.clone()).collect()
    }

    pub fn state(&self) -> RemoteState {
        lock(&self.status).state
    }

    /// Whether the VMM can ask this remote to add devices and drives.
    pub fn has_control(&self) -> bool {
        lock(&self.control).is_some()
    }

    /// Runs `f` on the control channel; a clear error when there is none
    /// or the remote is no longer usable.
    pub fn with_control<T>(
        &self,
        f: impl FnOnce(&mut ControlClient) -> Result<T, ControlError>,
    ) -> Result<T, String> {
        match self.state() {
            RemoteState::Dead | RemoteState::Stopped | RemoteState::HandedOver => {
                return Err(format!("Remote '{}' is not running", self.id))
            }
            RemoteState::Hung => return Err(format!("Remote '{}' is not answering", self.id)),
            _ => {}
        }
        let mut c = lock(&self.control);
        let Some(c) = c.as_mut() else {
            if self.is_lent() {
                return Err(format!(
                    "Remote '{}' is being handed over by a migration",
                    self.id
                ));
            }
            return Err(format!(
                "Remote '{}' was not started by this VMM: it has no control channel",
                self.id
            ));
        };
        // An operation may take long for good reasons (loading a plugin,
        // a drive-del waiting for the disk's commands in flight): it gets
        // its own, longer limit, so that a slow success is not reported
        // as a failure. Heartbeats wait for it (they take the same lock)
        // and set their own timeout again.
        c.set_timeout(self.timeout.max(CONTROL_OP_TIMEOUT));
        f(c).map_err(|e| match e {
            ControlError::Remote(m) => m,
            e => format!("remote '{}': {e}", self.id),
        })
    }

    /// The `query-remote` entry.
    pub fn query(&self) -> Value {
        let st = lock(&self.status);
        json!({
            "id": self.id,
            "pid": self.pid,
            "socket": self.socket.as_ref().map(|p| p.display().to_string()),
            "protocol": self.protocol.name(),
            "state": st.state.name(),
            "devices": self.device_ids(),
            "devices-failed": self.failed.load(Ordering::Acquire),
            "control": self.has_control(),
            "state-saved": self.checkpoints.as_ref().map(|c| c.current_ids()),
            "last-heartbeat": st.last_heartbeat.map(timestamp),
            "heartbeat-age-ms": st.last_heartbeat.map(|_| st.last_answer.elapsed().as_millis() as u64),
        })
    }

    fn answered(&self, events: &qmp::EventSender) {
        let mut st = lock(&self.status);
        st.last_heartbeat = Some(SystemTime::now());
        st.last_answer = Instant::now();
        match st.state {
            RemoteState::Starting => st.state = RemoteState::Running,
            RemoteState::Hung => {
                st.state = RemoteState::Running;
                drop(st);
                tracing::warn!("remote {} answers again", self.id);
                events.emit("REMOTE_ALIVE", json!({"id": self.id, "pid": self.pid}));
            }
            _ => {}
        }
    }

    fn hung(&self, events: &qmp::EventSender) {
        let mut st = lock(&self.status);
        if !matches!(st.state, RemoteState::Starting | RemoteState::Running) {
            return;
        }
        st.state = RemoteState::Hung;
        let silent = st.last_answer.elapsed();
        drop(st);
        events.emit(
            "REMOTE_HUNG",
            json!({"id": self.id, "pid": self.pid, "silent-ms": silent.as_millis() as u64,
                   "devices": self.device_ids()}),
        );
        // The hook first (it holds the guest's accesses when a restart
        // follows), then the devices fail: no access sees the gap.
        let restarting = self.failed_now(Failure::Hung);
        eprintln!(
            "host: remote `{}` does not answer ({} ms); {}",
            self.id,
            silent.as_millis(),
            what_follows(restarting)
        );
        self.failed.store(true, Ordering::Release);
    }

    /// Saves the state of each device that went idle since its last save
    /// (see [`crate::checkpoint`]); a device that cannot save is not
    /// asked again until the guest has used it.
    pub fn checkpoint_idle(&self) {
        let Some(cp) = &self.checkpoints else {
            return;
        };
        if !self.has_control() {
            return;
        }
        for (id, count) in cp.due() {
            let state = self.with_control(|c| c.device_save(&id));
            if let Err(e) = &state {
                tracing::debug!("remote {}: device {id} not saved: {e}", self.id);
            }
            cp.record(&id, count, state.ok());
        }
    }

    /// Hands the failure to the hook, if one is set; whether a restart
    /// follows.
    fn failed_now(&self, failure: Failure) -> bool {
        let hook = lock(&self.failure_hook).clone();
        hook.is_some_and(|hook| hook(failure))
    }

    /// Runs `hook` once this remote dies or hangs (not when it is
    /// stopped or retired).
    pub fn on_failure(&self, hook: FailureHook) {
        *lock(&self.failure_hook) = Some(hook);
    }

    /// Marks the remote dead (once) and reports why. A remote already
    /// stopped by us (the VM ends: [`stopped`](Self::stopped) comes before
    /// the processes are stopped) is not reported.
    pub fn died(&self, why: DeathCause, events: &qmp::EventSender) {
        let mut st = lock(&self.status);
        if matches!(
            st.state,
            RemoteState::Dead | RemoteState::Stopped | RemoteState::HandedOver
        ) {
            return;
        }
        st.state = RemoteState::Dead;
        drop(st);
        let mut data = json!({"id": self.id, "pid": self.pid, "devices": self.device_ids()});
        match why {
            DeathCause::HangUp => data["reason"] = "eof".into(),
            DeathCause::Process(ProcessEnd::Exited(c)) => {
                data["reason"] = "exit".into();
                data["code"] = c.into();
            }
            DeathCause::Process(ProcessEnd::Signaled(s)) => {
                data["reason"] = "signal".into();
                data["signal"] = s.into();
            }
        }
        let reason = data["reason"].clone();
        events.emit("REMOTE_DIED", data);
        // The hook first (see `hung`).
        let restarting = self.failed_now(Failure::Died(why));
        eprintln!(
            "host: remote `{}` died while the VM runs ({reason}); {}",
            self.id,
            what_follows(restarting)
        );
        self.failed.store(true, Ordering::Release);
    }

    /// Marks the remote stopped (the VM ends, or it is being replaced)
    /// and closes its control channel: a `remote-host` we spawned exits
    /// when that channel reaches EOF.
    pub fn stopped(&self) {
        let mut st = lock(&self.status);
        if st.state == RemoteState::HandedOver {
            // Its channels are another VMM's now (or about to be): shutting
            // them down would cut that VMM off too.
            return;
        }
        st.state = RemoteState::Stopped;
        drop(st);
        if let Some(fd) = &*lock(&self.control_fd) {
            // SAFETY: shutdown on a socket fd we own; it ends the
            // connection for every duplicate, so the peer sees EOF.
            unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }

    /// Retires the remote before a restart: its devices fail at once (the
    /// vCPUs stop waiting on it) and no more events are sent for it.
    pub fn retire(&self) {
        self.failed.store(true, Ordering::Release);
        self.stopped();
    }

    /// Lends the control channel to a migration that offers this remote to
    /// another VMM: heartbeats pause (they would interleave with that
    /// VMM's requests) until [`return_control`](Self::return_control) or
    /// [`handed_over`](Self::handed_over). `None` without a control
    /// channel.
    pub fn lend_control(&self) -> Option<ControlClient> {
        let mut c = lock(&self.control);
        let client = c.take()?;
        self.lent.store(true, Ordering::Release);
        Some(client)
    }

    /// Whether a migration holds its control channel.
    pub fn is_lent(&self) -> bool {
        self.lent.load(Ordering::Acquire)
    }

    /// The migration did not hand the remote over: its control channel
    /// comes back, and heartbeats go on.
    pub fn return_control(&self, client: ControlClient) {
        let mut c = lock(&self.control);
        *c = Some(client);
        self.lent.store(false, Ordering::Release);
    }

    /// From just before `GO`: the remote is (about to be) another VMM's.
    /// No heartbeat, event or restart from here; [`stopped`](Self::stopped)
    /// leaves its channels open. Returns the state to go back to should
    /// `GO` not go out ([`not_handed_over`](Self::not_handed_over)).
    pub fn handing_over(&self) -> RemoteState {
        let mut st = lock(&self.status);
        std::mem::replace(&mut st.state, RemoteState::HandedOver)
    }

    /// `GO` did not go out: back to `before`.
    pub fn not_handed_over(&self, before: RemoteState) {
        let mut st = lock(&self.status);
        if st.state == RemoteState::HandedOver {
            st.state = before;
        }
    }

    /// `GO` went out: the remote is another VMM's; its devices fail here
    /// (the guest runs there), and this VMM keeps no copy of its control
    /// socket (so that the remote sees the end of its channel when that
    /// VMM goes, whether or not this one still runs).
    pub fn handed_over(&self) {
        lock(&self.status).state = RemoteState::HandedOver;
        self.failed.store(true, Ordering::Release);
        *lock(&self.control) = None;
        *lock(&self.control_fd) = None;
    }

    /// A duplicate of the control socket (what a hand-over passes).
    pub fn control_socket(&self) -> Option<OwnedFd> {
        lock(&self.control_fd)
            .as_ref()
            .and_then(|f| f.try_clone().ok())
    }

    /// Gives the remote its process's pidfd (one a migration handed over,
    /// not our child).
    pub fn with_pidfd(mut self, pidfd: OwnedFd) -> Self {
        self.pidfd = Some(pidfd);
        self
    }

    /// For a remote that is not our child: waits up to `grace` for its
    /// process to end (its control channel was just shut down), then kills
    /// it through its pidfd and waits a little more. Nothing to do for
    /// our own children (their `RemoteProcess` does it).
    pub fn end_adopted_process(&self, grace: Duration) {
        let Some(fd) = &self.pidfd else {
            return;
        };
        if crate::remote::pidfd::wait(fd, grace) {
            return;
        }
        tracing::warn!("remote {}: its process did not end; killing it", self.id);
        crate::remote::pidfd::kill(fd);
        crate::remote::pidfd::wait(fd, Duration::from_secs(1));
    }

    /// Waits up to `period` for a hang-up on any of the remote's channels.
    fn hung_up_within(&self, period: Duration) -> bool {
        // Our own copy for the poll: a hand-over may drop the remote's
        // meanwhile.
        let control_fd = self.control_socket();
        let devices = lock(&self.devices);
        // Whose each fd is: a device's id, or `None` for the control channel.
        let (owners, mut fds): (Vec<Option<String>>, Vec<libc::pollfd>) = devices
            .iter()
            .filter_map(|(id, fd)| fd.as_ref().map(|fd| (Some(id.clone()), fd)))
            .chain(control_fd.as_ref().map(|fd| (None, fd)))
            .map(|(owner, fd)| {
                let p = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLRDHUP,
                    revents: 0,
                };
                (owner, p)
            })
            .unzip();
        drop(devices);
        if fds.is_empty() {
            std::thread::sleep(period);
            return false;
        }
        let ms = period.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs
        // whose fds stay open (owned by `self`) for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n <= 0 {
            return false;
        }
        // A pending reply is POLLIN, not a hang-up: the clients read it.
        let hung: Vec<&Option<String>> = fds
            .iter()
            .zip(&owners)
            .filter(|(p, _)| p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0)
            .map(|(_, o)| o)
            .collect();
        if hung.is_empty() {
            return false;
        }
        // A device removed while we polled (device_del closes its
        // channel) is no hang-up of the remote.
        let devices = lock(&self.devices);
        hung.iter().any(|o| match o {
            None => true,
            Some(id) => devices.iter().any(|(d, _)| d == id),
        })
    }

    /// `DEVICE_FAILED` once for each device the remote says has failed
    /// (its plugin panicked; the remote keeps serving the others).
    /// Forgets that `device` was reported failed (it was restarted: a
    /// failure of the new instance is news).
    pub fn forget_failure(&self, device: &str) {
        lock(&self.reported_failures).remove(device);
    }

    fn report_failures(&self, status: &Value, events: &qmp::EventSender) {
        let Some(failed) = status.get("failed").and_then(Value::as_array) else {
            return;
        };
        let mut reported = lock(&self.reported_failures);
        for f in failed {
            let (Some(device), Some(reason)) = (
                f.get("device").and_then(Value::as_str),
                f.get("reason").and_then(Value::as_str),
            ) else {
                continue;
            };
            if reported.insert(device.to_owned()) {
                eprintln!(
                    "host: device {device} (remote `{}`) failed: {reason}",
                    self.id
                );
                events.emit(
                    "DEVICE_FAILED",
                    json!({"device": device, "remote": self.id, "reason": reason}),
                );
            }
        }
    }

    /// Why the channels hung up: a process we spawned usually died, and
    /// its exit status is the better report (its SIGCHLD may trail the
    /// hang-up by a moment).
    fn hang_up_cause(&self) -> DeathCause {
        if let Some(pid) = self.pid {
            let deadline = Instant::now() + Duration::from_millis(200);
            loop {
                if let Some(end) = crate::remote::process_end(pid) {
                    return DeathCause::Process(end);
                }
                if Instant::now() >= deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        DeathCause::HangUp
    }

    /// One heartbeat: a control `ping`, else a request on each device that
    /// can still take one. `Ok(false)`: nothing could be asked (no device,
    /// or all failed), which says nothing either way.
    fn beat(&self, pci: &PciRoot, events: &qmp::EventSender) -> Result<bool, Silence> {
        {
            let mut c = lock(&self.control);
            // Lent to a migration: no heartbeat on any channel (the lock
            // orders this check with `lend_control`).
            if self.lent.load(Ordering::Acquire) {
                return Ok(false);
            }
            if let Some(c) = c.as_mut() {
                c.set_timeout(self.timeout);
                return match c.ping_status() {
                    Ok(status) => {
                        self.report_failures(&status, events);
                        Ok(true)
                    }
                    Err(ControlError::Timeout(_)) => Err(Silence::Timeout),
                    Err(e) => Err(Silence::Closed(e.to_string())),
                };
            }
        }
        let mut answered = false;
        for id in self.device_ids() {
            let Some(slot) = pci.slot_of(&id) else {
                continue;
            };
            let deadline = Instant::now() + self.timeout;
            let r = pci.with_function(slot, |f| f.heartbeat()).flatten();
            match r {
                Some(Err(e)) if Instant::now() >= deadline || e.contains("timed out") => {
                    return Err(Silence::Timeout)
                }
                Some(Err(e)) => return Err(Silence::Closed(e)),
                Some(Ok(())) => answered = true,
                None => {}
            }
        }
        Ok(answered)
    }
}

/// Why a remote is dead.
#[derive(Clone, Copy, Debug)]
pub enum DeathCause {
    /// A channel reached EOF.
    HangUp,
    /// Its process ended.
    Process(ProcessEnd),
}

/// Starts the supervision thread of `remote`; it ends when the remote is
/// dead or stopped (the VM ends, or a restart replaced it). Not when the
/// exit signal is set: that is also how a reset starts, and the remotes
/// live on across a reset.
pub fn spawn(remote: Arc<Remote>, pci: Arc<PciRoot>, events: qmp::EventSender) {
    let name = format!("supervise-{}", remote.id);
    let r = std::thread::Builder::new().name(name).spawn(move || loop {
        if matches!(
            remote.state(),
            RemoteState::Dead | RemoteState::Stopped | RemoteState::HandedOver
        ) {
            return;
        }
        if remote.hung_up_within(remote.heartbeat) {
            remote.died(remote.hang_up_cause(), &events);
            continue;
        }
        if remote.state() == RemoteState::Stopped {
            return;
        }
        match remote.beat(&pci, &events) {
            Ok(true) => {
                remote.answered(&events);
                remote.checkpoint_idle();
            }
            Ok(false) => {}
            Err(Silence::Timeout) => remote.hung(&events),
            Err(Silence::Closed(why)) => {
                tracing::warn!("remote {}: heartbeat: {why}", remote.id);
                remote.died(remote.hang_up_cause(), &events);
            }
        }
    });
    if let Err(e) = r {
        tracing::error!("cannot start supervision: {e}");
    }
}
