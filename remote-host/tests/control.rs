//! `remote-host serve --control FD`: the VMM's control channel. Devices
//! come and go at run time (device-add with the device's socket as an
//! fd, device-del), per-device controls reach the plugin (the LSI's
//! drive-add), errors come back verbatim, a stopped process times out
//! without hanging the client and answers again once continued, and the
//! seccomp sandbox refuses a device's attempts to escape.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;
use common::*;

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use channel::control::{ControlClient, ControlError};
use channel::vfio_user::{ClientOptions, VfioUserClient};
use serde_json::json;

fn plugin_dir() -> PathBuf {
    plugin_dir_with(&[
        "libdma_example.so",
        "liblsi53c895a.so",
        "libfaulty_plugin.so",
    ])
}

/// A `remote-host serve --control 3`, killed on drop.
struct Remote {
    child: Child,
    tmp: tempfile::TempDir,
}

impl Remote {
    /// With no config device.
    fn start(extra: &[&str]) -> (Remote, ControlClient) {
        Self::start_with(extra, "", |_| Vec::new())
    }

    /// With `devices` (`[[device]]` tables) in its config, and the
    /// arguments `args(work dir)` gives.
    fn start_with(
        extra: &[&str],
        devices: &str,
        args: impl Fn(&Path) -> Vec<String>,
    ) -> (Remote, ControlClient) {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = tmp.path().join("vm.toml");
        std::fs::write(
            &cfg,
            format!(
                "[vm]\nmemory = \"64M\"\nkernel = \"vmlinuz\"\n\n[[remote]]\nid = \"r\"\n\n{devices}"
            ),
        )
        .unwrap();
        let log = File::create(tmp.path().join("remote-host.log")).unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_remote-host"));
        cmd.env_remove("PLUGIN_PATH")
            .env("RUST_LOG", "debug")
            .args([
                "serve",
                "--remote",
                "r",
                "--protocol",
                "vfio-user",
                "--control",
                "3",
            ])
            .arg("--config")
            .arg(&cfg)
            .arg("--plugin-dir")
            .arg(plugin_dir())
            .args(extra)
            .args(args(tmp.path()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        testenv::inherit_as_fd3(&mut cmd, theirs.as_raw_fd());
        let child = cmd.spawn().unwrap();
        drop(theirs);
        let client = ControlClient::new(ours, Duration::from_secs(10));
        (Remote { child, tmp }, client)
    }

    fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// With a config device `dma0` (dma-example) listening on a socket in
    /// the work directory, once that socket exists.
    fn with_dma0_on_a_socket() -> (Remote, ControlClient, PathBuf) {
        let (remote, ctl) = Self::start_with(
            &[],
            "[[device]]\nid = \"dma0\"\nremote = \"r\"\nplugin = \"dma-example\"\nslot = 3\n",
            |dir| {
                vec![
                    "--socket".into(),
                    dir.join("dma0.sock").display().to_string(),
                ]
            },
        );
        let sock = remote.path().join("dma0.sock");
        let start = Instant::now();
        while !sock.exists() {
            assert!(start.elapsed() < Duration::from_secs(10), "no socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        (remote, ctl, sock)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.tmp.path().join("remote-host.log")).unwrap_or_default()
    }

    /// Sends `sig`; false when the process is gone.
    fn signal(&self, sig: libc::c_int) -> bool {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) on our own child's pid; no memory involved.
        let sent = unsafe { libc::kill(pid, sig) == 0 };
        if sent && sig == libc::SIGSTOP {
            // kill(2) returns before the process has stopped: wait for it,
            // or a request sent now may still be answered.
            let stat = format!("/proc/{pid}/stat");
            let start = Instant::now();
            while !std::fs::read_to_string(&stat)
                .unwrap()
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('T'))
            {
                assert!(start.elapsed() < Duration::from_secs(5), "not stopped");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        sent
    }

    /// Waits for the process to exit by itself.
    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                start.elapsed() < within,
                "remote-host still runs:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        let _ = self.signal(libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- remote-host log ---\n{}", self.log());
        }
    }
}

fn remote_error(r: Result<impl std::fmt::Debug, ControlError>) -> String {
    match r {
        Err(ControlError::Remote(m)) => m,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn vfio_client(sock: UnixStream) -> VfioUserClient {
    let opts = ClientOptions {
        timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    };
    VfioUserClient::from_stream(sock, opts).unwrap()
}

#[test]
fn device_add_serves_vfio_user_and_device_del_closes_it() {
    let (mut remote, mut ctl) = Remote::start(&[]);
    ctl.ping().unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    ctl.device_add("dma9", "dma-example", None, 9, "", OwnedFd::from(theirs))
        .unwrap();
    let mut c = vfio_client(ours.try_clone().unwrap());
    let info = c.device_info().unwrap();
    assert!(info.num_regions >= 8, "{info:?}");
    let mut id = [0u8; 4];
    c.region_read(7, 0, &mut id).unwrap();
    assert_eq!(u16::from_le_bytes([id[0], id[1]]), 0x1234, "vendor id");
    assert_eq!(u16::from_le_bytes([id[2], id[3]]), 0x11e9, "device id");

    // Errors, verbatim.
    let (_a, b) = UnixStream::pair().unwrap();
    let e = remote_error(ctl.device_add("dma9", "dma-example", None, 9, "", OwnedFd::from(b)));
    assert_eq!(e, "device `dma9` already exists");
    let (_a, b) = UnixStream::pair().unwrap();
    let e = remote_error(ctl.device_add("x", "no-such-plugin", None, 10, "", OwnedFd::from(b)));
    assert!(e.contains("plugin `no-such-plugin` not found"), "{e}");
    let (_a, b) = UnixStream::pair().unwrap();
    let e = remote_error(ctl.device_add(
        "y",
        "dma-example",
        None,
        10,
        "bogus = 1\n",
        OwnedFd::from(b),
    ));
    assert!(e.contains("bogus"), "{e}");
    assert_eq!(remote_error(ctl.device_del("nope")), "no device `nope`");
    let e = remote_error(ctl.device_control("nope", "drive-list", json!({})));
    assert_eq!(e, "no device `nope`");
    let e = remote_error(ctl.device_control("dma9", "drive-list", json!({})));
    assert_eq!(e, "this device has no control operation `drive-list`");

    // device-del: the device's socket reaches EOF.
    ctl.device_del("dma9").unwrap();
    drop(c);
    ours.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 16];
    assert_eq!((&ours).read(&mut buf).unwrap(), 0, "EOF after device-del");
    assert_eq!(remote_error(ctl.device_del("dma9")), "no device `dma9`");
    ctl.ping().unwrap();

    // The VMM goes away: so does the remote.
    drop(ctl);
    assert!(remote.wait_exit(Duration::from_secs(20)).success());
}

#[test]
fn device_control_reaches_the_lsi_plugin() {
    let (remote, mut ctl) = Remote::start(&["--socket", "unused-dir"]);
    let (ours, theirs) = UnixStream::pair().unwrap();
    ctl.device_add("lsi0", "lsi53c895a", None, 5, "", OwnedFd::from(theirs))
        .unwrap();
    let img = remote.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 64 * 512]).unwrap();
    let r = ctl
        .device_control(
            "lsi0",
            "drive-add",
            json!({"scsi-id": 1, "file": img, "read-only": false}),
        )
        .unwrap();
    assert_eq!(r, json!({"scsi-id": 1, "capacity": 64 * 512}));
    // Relative paths are relative to the config's directory.
    std::fs::write(remote.path().join("rel.img"), vec![0u8; 8 * 512]).unwrap();
    ctl.device_control(
        "lsi0",
        "drive-add",
        json!({"scsi-id": 2, "file": "rel.img", "read-only": true}),
    )
    .unwrap();
    let list = ctl.device_control("lsi0", "drive-list", json!({})).unwrap();
    assert_eq!(
        list,
        json!([
            {"scsi-id": 1, "lun": 0, "file": img.display().to_string(), "read-only": false, "capacity": 64 * 512},
            {"scsi-id": 2, "lun": 0, "file": remote.path().join("rel.img").display().to_string(), "read-only": true, "capacity": 8 * 512},
        ])
    );
    let e =
        remote_error(ctl.device_control("lsi0", "drive-add", json!({"scsi-id": 7, "file": img})));
    assert!(e.contains("scsi-id 7 is not usable"), "{e}");
    // The device is still served on its socket.
    let mut c = vfio_client(ours);
    let mut id = [0u8; 4];
    c.region_read(7, 0, &mut id).unwrap();
    assert_eq!(u32::from_le_bytes(id), 0x0012_1000);
}

#[test]
fn a_stopped_remote_times_out_and_answers_after_sigcont() {
    let (remote, mut ctl) = Remote::start(&[]);
    ctl.ping().unwrap();
    assert!(remote.signal(libc::SIGSTOP));
    ctl.set_timeout(Duration::from_millis(300));
    let start = Instant::now();
    match ctl.ping() {
        Err(ControlError::Timeout(d)) => assert_eq!(d, Duration::from_millis(300)),
        other => panic!("{other:?}"),
    }
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    assert!(matches!(ctl.ping(), Err(ControlError::Timeout(_))));
    assert!(remote.signal(libc::SIGCONT));
    ctl.set_timeout(Duration::from_secs(10));
    // The two late replies are skipped; this ping gets its own.
    ctl.ping().unwrap();
    ctl.ping().unwrap();
}

/// What the `escapes` fixture managed from inside the remote: running a
/// program, connecting to a TCP port of this machine, opening a UNIX socketpair, reading a
/// file outside the remote's config directory, connecting to an abstract
/// UNIX socket of this machine (1 worked, 2 refused).
fn escape_attempts(extra: &[&str]) -> [u32; 5] {
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret");
    std::fs::write(&secret, b"key").unwrap();
    let name = format!(
        "remote-host-escape-test-{}-{}",
        std::process::id(),
        extra.len()
    );
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
    let _listener = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = tcp.local_addr().unwrap().port();
    let (_remote, mut ctl) = Remote::start(extra);
    let (ours, theirs) = UnixStream::pair().unwrap();
    let settings = format!(
        "tcp-port = {port}\nsecret = {:?}\nabstract-socket = {name:?}\n",
        secret.display().to_string()
    );
    ctl.device_add(
        "esc",
        "faulty-plugin",
        Some("escapes"),
        3,
        &settings,
        OwnedFd::from(theirs),
    )
    .unwrap();
    let mut c = vfio_client(ours);
    [0u64, 4, 8, 12, 16].map(|off| {
        let mut v = [0u8; 4];
        c.region_read(0, off, &mut v).unwrap();
        u32::from_le_bytes(v)
    })
}

#[test]
fn the_sandbox_refuses_programs_and_network_sockets_to_a_device() {
    // Sandboxed and jailed (the default): exec and IP sockets are
    // refused, files outside the remote's view and the machine's abstract
    // sockets are out of reach; what a device needs (UNIX sockets, here)
    // still works, and the device keeps answering after its attempts fail.
    assert_eq!(escape_attempts(&[]), [2, 2, 1, 2, 2]);
    // The jail alone: no program to run (none in its view), no way to
    // this machine's network (its namespace has its own, down, loopback),
    // files and abstract sockets out
    // of reach as above.
    assert_eq!(escape_attempts(&["--no-sandbox"]), [2, 2, 1, 2, 2]);
    // The seccomp filter alone: exec and IP sockets refused; the files and
    // sockets of the machine reachable.
    assert_eq!(escape_attempts(&["--no-jail"]), [2, 2, 1, 1, 1]);
    // Neither: everything works. (So the refusals above are the sandbox's
    // and the jail's, not the fixture's.)
    assert_eq!(
        escape_attempts(&["--no-sandbox", "--no-jail"]),
        [1, 1, 1, 1, 1]
    );
}

#[test]
fn device_del_of_a_config_device_shuts_it_down() {
    let (_remote, mut ctl, sock) = Remote::with_dma0_on_a_socket();
    let mut c = vfio_client(UnixStream::connect(&sock).unwrap());
    let mut id = [0u8; 4];
    c.region_read(0, 0, &mut id).unwrap();
    assert_eq!(u32::from_le_bytes(id), 0xd3a0_0001);
    ctl.device_del("dma0").unwrap();
    // Still connected, but the device is gone: all-ones, never a call
    // into the plugin after its shutdown.
    let mut v = [0u8; 4];
    let _ = c.region_read(0, 0, &mut v);
    assert_eq!(u32::from_le_bytes(v), 0xffff_ffff);
    assert!(remote_error(ctl.device_del("dma0")).contains("no device `dma0`"));
    ctl.ping().unwrap();
}

/// A plugin given as a path in `device-add` is relative to the config
/// file's directory, as in the config itself, not to the remote's current
/// directory (which is this test's, elsewhere) nor to the C library's
/// search path (a bare `lib*.so`).
#[test]
fn device_add_resolves_a_plugin_path_against_the_config_directory() {
    let (remote, mut ctl) = Remote::start(&[]);
    let sub = remote.path().join("mine");
    std::fs::create_dir(&sub).unwrap();
    let lib = plugin_dir().join("libdma_example.so");
    std::fs::copy(&lib, sub.join("libdma_example.so")).unwrap();
    std::fs::copy(&lib, remote.path().join("libdma_example.so")).unwrap();
    for (id, plugin) in [
        ("p1", "mine/libdma_example.so"),
        ("p2", "libdma_example.so"),
    ] {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ctl.device_add(id, plugin, None, 9, "", OwnedFd::from(theirs))
            .unwrap_or_else(|e| panic!("{plugin}: {e}\n{}", remote.log()));
        let mut c = vfio_client(ours);
        let mut id_bytes = [0u8; 2];
        c.region_read(7, 0, &mut id_bytes).unwrap();
        assert_eq!(u16::from_le_bytes(id_bytes), 0x1234, "{plugin}");
    }
}

/// Threads of this process called `name` (as `/proc` shows them).
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == name)
        .count()
}

/// When the control channel ends, the ring threads it started for config
/// devices end too (they used to serve on, with the device, forever).
#[test]
fn the_end_of_the_control_channel_stops_its_ring_threads() {
    use remote_host::control::Control;
    use remote_host::devices::{create_from, DeviceSpec};
    use std::os::fd::AsFd;
    use std::sync::Arc;

    let plugin = plugin_api::loader::LoadedPlugin::linked(dma_example::plugin_module());
    let tmp = tempfile::tempdir().unwrap();
    let spec = DeviceSpec {
        id: "rngdev".into(),
        plugin: "dma-example".into(),
        kind: None,
        slot: 4,
        settings: String::new(),
        base_dir: tmp.path().to_path_buf(),
    };
    let dev = Arc::new(create_from(&spec, &plugin).unwrap());
    let control = Control::new(
        std::slice::from_ref(&dev),
        Vec::new(),
        tmp.path().to_path_buf(),
        remote_host::dialect::Dialect::new(config::Protocol::VfioUser, Duration::ZERO),
    );
    let (ours, theirs) = UnixStream::pair().unwrap();
    let served = std::thread::spawn(move || control.run(theirs));
    let mut ctl = ControlClient::new(ours, Duration::from_secs(10));
    let (_vmm_end, fds) = channel::ring::create(Duration::from_secs(5), Duration::ZERO).unwrap();
    let mut body = serde_json::Map::new();
    body.insert("device".into(), json!("rngdev"));
    ctl.request(
        "ring-setup",
        body,
        &[fds.memory.as_fd(), fds.kick.as_fd(), fds.reply.as_fd()],
    )
    .unwrap();
    // A thread names itself once it runs: wait for it (bounded).
    let start = Instant::now();
    while threads_named("ring-rngdev") != 1 {
        assert!(start.elapsed() < Duration::from_secs(5), "no ring thread");
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(ctl);
    served.join().unwrap().unwrap();
    assert_eq!(
        threads_named("ring-rngdev"),
        0,
        "the ring thread outlived its control channel"
    );
    dev.shutdown();
}

/// How a VMM that was handed this remote over reaches its devices
/// (docs/migration.md, "Handing a remote over"): `device-connect` gives a
/// device a new connection, served once the one it has now is gone, with
/// the device's state as that client left it. `handover-prepare` and
/// `handover-release` are answered.
#[test]
fn device_connect_serves_a_device_again_once_its_client_left_with_its_state() {
    let (_remote, mut ctl, sock) = Remote::with_dma0_on_a_socket();
    let mut first = vfio_client(UnixStream::connect(&sock).unwrap());
    first
        .region_write(0, 0x08, &0x5eed_u32.to_le_bytes())
        .unwrap();
    // A device added on the control channel is reached the same way.
    let (added_ours, added_theirs) = UnixStream::pair().unwrap();
    ctl.device_add(
        "dma9",
        "dma-example",
        None,
        9,
        "",
        OwnedFd::from(added_theirs),
    )
    .unwrap();
    let mut added = vfio_client(added_ours);
    added
        .region_write(0, 0x08, &0x0909_u32.to_le_bytes())
        .unwrap();

    assert_eq!(ctl.handover_prepare().unwrap(), Vec::<String>::new());
    ctl.handover_release().unwrap();
    let (next, theirs) = UnixStream::pair().unwrap();
    ctl.device_connect("dma0", OwnedFd::from(theirs)).unwrap();
    let (next9, theirs9) = UnixStream::pair().unwrap();
    ctl.device_connect("dma9", OwnedFd::from(theirs9)).unwrap();
    // The old client is still the one served.
    let mut v = [0u8; 4];
    first.region_read(0, 0x08, &mut v).unwrap();
    assert_eq!(u32::from_le_bytes(v), 0x5eed);
    // Once it has gone, the new one is, and finds what it left.
    drop(first);
    drop(added);
    let mut second = vfio_client(next);
    second.region_read(0, 0x08, &mut v).unwrap();
    assert_eq!(u32::from_le_bytes(v), 0x5eed, "dma0's state was kept");
    let mut second9 = vfio_client(next9);
    second9.region_read(0, 0x08, &mut v).unwrap();
    assert_eq!(u32::from_le_bytes(v), 0x0909, "dma9's state was kept");

    // Refusals, and the channel goes on.
    let (_a, b) = UnixStream::pair().unwrap();
    assert_eq!(
        remote_error(ctl.device_connect("nope", OwnedFd::from(b))),
        "no device `nope`"
    );
    let e = remote_error(ctl.request("device-connect", json_map(json!({"device": "dma0"})), &[]));
    assert!(e.contains("takes one file descriptor"), "{e}");
    let f = File::open("/dev/null").unwrap();
    let e = remote_error(ctl.request(
        "device-connect",
        json_map(json!({"device": "dma0"})),
        &[std::os::fd::AsFd::as_fd(&f)],
    ));
    assert!(e.contains("not a stream socket"), "{e}");
    ctl.ping().unwrap();
}

fn json_map(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    match v {
        serde_json::Value::Object(m) => m,
        _ => panic!("not an object"),
    }
}

/// A remote spawned as the VMM spawns it (`PR_SET_PDEATHSIG`, fired when
/// the spawning *thread* ends) dies with its spawner, unless it was told
/// `handover-release` first: then it outlives it and still answers. This
/// is what lets a source VMM end once it handed its remote over.
#[test]
fn handover_release_lets_the_remote_outlive_its_spawner() {
    for release in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = tmp.path().join("vm.toml");
        std::fs::write(
            &cfg,
            "[vm]\nmemory = \"64M\"\nkernel = \"vmlinuz\"\n\n[[remote]]\nid = \"r\"\n",
        )
        .unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_remote-host"));
        cmd.env_remove("PLUGIN_PATH")
            .args(["serve", "--remote", "r", "--control", "3", "--config"])
            .arg(&cfg)
            .arg("--plugin-dir")
            .arg(plugin_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        testenv::inherit_as_fd3(&mut cmd, theirs.as_raw_fd());
        // SAFETY: prctl only, in the forked child before exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let (tx, rx) = std::sync::mpsc::channel();
        let spawner = std::thread::spawn(move || {
            tx.send(cmd.spawn().unwrap()).unwrap();
            // The spawner lives until told to end.
            let _ = wait.recv();
        });
        let mut child = rx.recv().unwrap();
        drop(theirs);
        let mut ctl = ControlClient::new(ours, Duration::from_secs(10));
        ctl.ping().unwrap();
        if release {
            ctl.handover_release().unwrap();
        }
        drop(go);
        spawner.join().unwrap();
        if release {
            // Still there, still answering, a while after the signal would
            // have come (it follows the thread's end by microseconds).
            for _ in 0..20 {
                ctl.ping().unwrap();
                std::thread::sleep(Duration::from_millis(10));
            }
            assert!(child.try_wait().unwrap().is_none());
            let _ = child.kill();
            let _ = child.wait();
        } else {
            let st = child.wait().unwrap();
            assert_eq!(
                std::os::unix::process::ExitStatusExt::signal(&st),
                Some(libc::SIGKILL),
                "{st}"
            );
        }
    }
}

/// Serving the config's devices fails (here: their socket cannot be
/// made): the remote ends with a failure, with a control channel too, so
/// that the VMM learns it at once instead of at its start-up time limit.
#[test]
fn a_remote_whose_serving_fails_ends_even_with_a_control_channel() {
    let (mut remote, _ctl) = Remote::start_with(
        &[],
        "[[device]]\nid = \"dma0\"\nremote = \"r\"\nplugin = \"dma-example\"\nslot = 3\n",
        |_| vec!["--socket".into(), "/dev/null/dma0.sock".into()],
    );
    let st = remote.wait_exit(Duration::from_secs(20));
    assert!(!st.success(), "{st}");
    assert!(
        remote.log().contains("serving the config's devices"),
        "{}",
        remote.log()
    );
}
