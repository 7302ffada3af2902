//! Supervision of a remote the VMM did not start (an orchestrator's
//! `remote-host` on a socket): with no control channel, heartbeats are
//! requests on the device's own vfio-user channel. On this machine's own
//! /dev/kvm, without a guest: the test plays the vCPU through the PCI root.
//!
//! SIGSTOP → `REMOTE_HUNG` within heartbeat + timeout, and BAR reads return
//! all-ones at once; SIGCONT → still hung (its device channel is out of
//! step, so nothing can tell; a control channel can: remote-host/tests/control.rs);
//! SIGKILL → `REMOTE_DIED` (the socket hangs up).
//! Events are read the way an operator would: from the QMP socket.

#![allow(clippy::unwrap_used, clippy::panic)]

#[path = "support/prerequisites.rs"]
mod prerequisites;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use host::memory::GuestRam;
use host::pci::proxy::ProxyFunction;
use host::pci::root::{PciRoot, SlotLabel};
use host::supervisor::{self, DeathCause, Remote, RemoteState};
use kvm_ioctls::Kvm;
use serde_json::{json, Map, Value};

const SLOT: u8 = 3;
const GSI: u32 = 19;

/// Commands nobody calls: the server is only here for its events.
struct NoCommands;

impl qmp::Commands for NoCommands {
    fn execute(&self, name: &str, _: &Map<String, Value>) -> Result<Value, qmp::QmpError> {
        Err(qmp::QmpError::command_not_found(name))
    }
    fn command_names(&self) -> Vec<String> {
        Vec::new()
    }
}

/// A negotiated QMP client that collects events.
struct EventReader(BufReader<UnixStream>);

impl EventReader {
    fn connect(path: &Path) -> EventReader {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = EventReader(BufReader::new(s));
        assert!(r.next().get("QMP").is_some());
        writeln!(w, "{}", json!({"execute": "qmp_capabilities"})).unwrap();
        assert_eq!(r.next(), json!({"return": {}}));
        r
    }

    fn next(&mut self) -> Value {
        let mut line = String::new();
        self.0
            .read_line(&mut line)
            .expect("no QMP message within 10 s");
        serde_json::from_str(&line).unwrap()
    }

    /// The next event named `name` (others are skipped), and when it came.
    fn wait(&mut self, name: &str) -> (Value, Instant) {
        loop {
            let v = self.next();
            if v["event"] == name {
                return (v, Instant::now());
            }
        }
    }
}

fn read32(root: &PciRoot, addr: u64) -> u32 {
    let mut d = [0u8; 4];
    assert!(root.mmio_read(addr, &mut d));
    u32::from_le_bytes(d)
}

/// A BAR read of a hung remote's device returns all-ones at once: well
/// below the 1.5 s channel timeout, so it did not wait for one.
fn reads_all_ones_without_waiting(root: &PciRoot, bar0: u64) {
    let t = Instant::now();
    assert_eq!(read32(root, bar0), 0xffff_ffff);
    assert!(
        t.elapsed() < Duration::from_millis(750),
        "{:?}",
        t.elapsed()
    );
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

/// A QMP server for `events`, and a negotiated client reading them.
fn event_monitor(dir: &Path, events: &qmp::EventSender) -> (qmp::Server, EventReader) {
    let path = dir.join("qmp.sock");
    let server = qmp::Server::bind_with(
        &path,
        Arc::new(NoCommands),
        qmp::ServerOptions::default(),
        events.clone(),
    )
    .unwrap();
    let reader = EventReader::connect(&path);
    (server, reader)
}

/// dma0 of `remote` as a proxy function under supervision on a PCI root
/// (BAR placed, ID register read through it), once the supervisor has had
/// a first heartbeat answered within `first_heartbeat_within`. Returns the root and BAR 0's address.
fn supervised_dma0(
    remote: &Arc<Remote>,
    client: host::remote::RemoteClient,
    ram: &GuestRam,
    vm: &Arc<kvm_ioctls::VmFd>,
    events: &qmp::EventSender,
    first_heartbeat_within: Duration,
) -> (Arc<PciRoot>, u64) {
    let mut func = ProxyFunction::new("dma0", client, ram, vm, GSI)
        .unwrap()
        .with_supervision(remote.failed.clone(), Arc::new(|_: &str, _: &str| {}));
    // A remote of ours (control channel) puts the device on the access
    // ring: its faults must be reported the same way.
    remote.attach_fast_path(vm, "dma0", &mut func);
    assert_eq!(func.has_ring(), remote.has_control());
    remote.add_device("dma0", Some(func.socket_fd()), func.activity());
    let root = Arc::new(PciRoot::new());
    let label = SlotLabel {
        id: "dma0".into(),
        remote: Some(remote.id.clone()),
    };
    root.insert(SLOT, label, Box::new(func)).unwrap();
    root.assign_resources(&|_| Some(GSI as u8)).unwrap();
    let bar0 = root.functions()[1].bars[0].base;
    assert_eq!(read32(&root, bar0), 0xd3a0_0001);
    supervisor::spawn(remote.clone(), root.clone(), events.clone());
    let t = Instant::now();
    while remote.state() != RemoteState::Running {
        assert!(
            t.elapsed() < first_heartbeat_within,
            "no heartbeat answered"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    (root, bar0)
}

#[test]
fn a_remote_without_control_channel_is_supervised_on_its_device_channel() {
    let Some(dir) = prerequisites::or_skip() else {
        return;
    };
    let rh = dir.join("remote-host");
    let work = tempfile::tempdir().unwrap();
    let sock = work.path().join("dev.sock");
    let (cfg_path, cfg) = prerequisites::dma_example_config(
        work.path(),
        "orch",
        &format!(
            "socket = \"{}\"\nheartbeat-ms = 200\ntimeout-ms = 1500",
            sock.display()
        ),
        SLOT,
    );
    // The orchestrator's remote-host.
    let mut orch = Command::new(&rh)
        .args(["serve", "--config"])
        .arg(&cfg_path)
        .args(["--remote", "orch", "--socket"])
        .arg(&sock)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(30), "no socket");
        std::thread::sleep(Duration::from_millis(10));
    }

    let kvm = Kvm::new().unwrap();
    let vm = Arc::new(kvm.create_vm().unwrap());
    vm.create_irq_chip().unwrap();
    let ram = GuestRam::new(64 << 20).unwrap();
    let s = host::remote::connect_supervised(&cfg, &cfg.remotes[0], None).unwrap();
    assert!(s.process.is_none() && s.control.is_none());
    let remote = Arc::new(Remote::new(&cfg.remotes[0], None, None, None));
    let events = qmp::EventSender::new();
    let (server, mut ev) = event_monitor(work.path(), &events);

    let (_, client) = s.clients.into_iter().next().unwrap();
    let (root, bar0) = supervised_dma0(&remote, client, &ram, &vm, &events, Duration::from_secs(5));
    assert!(remote.query()["last-heartbeat"]["seconds"]
        .as_u64()
        .is_some());

    // Hung: reported within heartbeat + timeout (plus scheduling slack).
    signal(&orch, libc::SIGSTOP);
    let stopped = Instant::now();
    let (hung, at) = ev.wait("REMOTE_HUNG");
    let after = at - stopped;
    eprintln!("REMOTE_HUNG {after:?} after SIGSTOP: {hung}");
    assert!(after < Duration::from_secs(10), "{after:?}");
    assert_eq!(hung["data"]["id"], "orch");
    assert_eq!(hung["data"]["pid"], Value::Null);
    assert_eq!(hung["data"]["devices"], json!(["dma0"]));
    assert_eq!(remote.state(), RemoteState::Hung);
    // A vCPU no longer waits for it.
    reads_all_ones_without_waiting(&root, bar0);

    // It runs again, but without a control channel nothing can tell: the
    // device channel timed out mid-stream and is failed for good. The
    // remote stays `hung` (no REMOTE_ALIVE), the device all-ones.
    signal(&orch, libc::SIGCONT);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(remote.state(), RemoteState::Hung);
    assert_eq!(read32(&root, bar0), 0xffff_ffff);
    assert_eq!(remote.query()["devices-failed"], true);

    // Dead: its socket hangs up, reported at once.
    signal(&orch, libc::SIGKILL);
    let killed = Instant::now();
    let (died, at) = ev.wait("REMOTE_DIED");
    eprintln!("REMOTE_DIED {:?} after SIGKILL: {died}", at - killed);
    assert!(at - killed < Duration::from_secs(10));
    assert_eq!(died["data"]["reason"], "eof");
    assert_eq!(remote.state(), RemoteState::Dead);
    let _ = orch.wait();

    root.shutdown();
    server.shutdown();
}

/// A `remote-host` the VMM spawned: heartbeats are pings on its control
/// channel, so a remote that runs again after SIGCONT is seen answering
/// (`REMOTE_ALIVE`), and its death comes with how it ended (SIGCHLD).
#[test]
fn a_spawned_remote_is_supervised_on_its_control_channel() {
    let Some(dir) = prerequisites::or_skip() else {
        return;
    };
    std::env::set_var("REMOTE_HOST", dir.join("remote-host"));
    let work = tempfile::tempdir().unwrap();
    let (_, cfg) = prerequisites::dma_example_config(
        work.path(),
        "dev",
        "heartbeat-ms = 200\ntimeout-ms = 1500\nlog = \"remote.log\"",
        SLOT,
    );
    let kvm = Kvm::new().unwrap();
    let vm = Arc::new(kvm.create_vm().unwrap());
    vm.create_irq_chip().unwrap();
    let ram = GuestRam::new(64 << 20).unwrap();
    let s = host::remote::connect_supervised(&cfg, &cfg.remotes[0], None).unwrap();
    let mut process = s.process.expect("spawned");
    let pid = process.pid();
    let remote = Arc::new(Remote::new(
        &cfg.remotes[0],
        Some(pid),
        s.control,
        s.control_hangup,
    ));
    assert!(remote.has_control());
    let events = qmp::EventSender::new();
    let (server, mut ev) = event_monitor(work.path(), &events);
    {
        let (remote, events) = (remote.clone(), events.clone());
        process.watch(move |end| remote.died(DeathCause::Process(end), &events));
    }
    let (_, client) = s.clients.into_iter().next().unwrap();
    let (root, bar0) =
        supervised_dma0(&remote, client, &ram, &vm, &events, Duration::from_secs(10));

    let sig = |s: i32| {
        // SAFETY: kill on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid as i32, s) }, 0);
    };
    // A vCPU spinning on a register of the device (on the access ring)
    // while the remote stops: its read in flight gives up once the remote
    // is reported hung, and it reads all-ones from then on.
    let spinner = {
        let root = root.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            while read32(&root, bar0) != 0xffff_ffff {
                assert!(t.elapsed() < Duration::from_secs(60), "never gave up");
            }
            Instant::now()
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    sig(libc::SIGSTOP);
    let stopped = Instant::now();
    let (hung, at) = ev.wait("REMOTE_HUNG");
    eprintln!("REMOTE_HUNG {:?} after SIGSTOP: {hung}", at - stopped);
    assert!(at - stopped < Duration::from_secs(10));
    assert_eq!(hung["data"]["pid"], pid);
    let gave_up = spinner.join().unwrap();
    eprintln!(
        "the spinning reader saw all-ones {:?} after SIGSTOP",
        gave_up - stopped
    );
    assert!(
        gave_up.saturating_duration_since(at) < Duration::from_secs(2),
        "the reader gave up long after REMOTE_HUNG"
    );
    reads_all_ones_without_waiting(&root, bar0);

    sig(libc::SIGCONT);
    let (alive, _) = ev.wait("REMOTE_ALIVE");
    assert_eq!(alive["data"]["id"], "dev");
    assert_eq!(remote.state(), RemoteState::Running);
    // Requests timed out mid-stream: the device stays failed.
    assert_eq!(read32(&root, bar0), 0xffff_ffff);

    sig(libc::SIGKILL);
    let killed = Instant::now();
    let (died, at) = ev.wait("REMOTE_DIED");
    eprintln!("REMOTE_DIED {:?} after SIGKILL: {died}", at - killed);
    assert!(at - killed < Duration::from_secs(10));
    assert_eq!(died["data"]["reason"], "signal");
    assert_eq!(died["data"]["signal"], libc::SIGKILL);
    assert_eq!(remote.state(), RemoteState::Dead);

    process.stop(Duration::ZERO);
    root.shutdown();
    server.shutdown();
}
