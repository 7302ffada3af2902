//! `remote-host serve --protocol vfio-user` with the dma-example plugin,
//! driven by the rust-vmm `vfio_user` crate's client (a peer we did not
//! write) and by our own client from `channel`.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;
use common::*;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use channel::vfio_user::{self as vu, ClientOptions, VfioUserClient};

/// Guest-physical base of the memfd we map for DMA.
const RAM_GPA: u64 = 0x1_0000_0000;
const RAM_SIZE: u64 = 1 << 20;

/// A `remote-host serve` process, killed on drop.
struct Server {
    child: Child,
    tmp: tempfile::TempDir,
}

impl Server {
    fn command(tmp: &Path, devices: &[&str]) -> Command {
        serve_command(tmp, devices, "vfio-user")
    }

    /// Serves `devices` on `--socket <tmp>/<socket>`.
    fn start(devices: &[&str], socket: &str) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let child = Self::command(tmp.path(), devices)
            .arg("--socket")
            .arg(tmp.path().join(socket))
            .spawn()
            .unwrap();
        Server { child, tmp }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("remote-host.log")).unwrap_or_default()
    }

    /// Connects to `rel` once the server listens there.
    fn wait_socket(&mut self, rel: &str) -> PathBuf {
        let p = self.path(rel);
        let start = Instant::now();
        loop {
            if UnixStream::connect(&p).is_ok() {
                // That probe connection is closed at once; the server
                // treats it as a client that went away.
                return p;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("remote-host exited with {status}:\n{}", self.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "remote-host does not listen on {}:\n{}",
                p.display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- remote-host log ---\n{}", self.log());
        }
    }
}

/// Runs `f` on a thread and fails the test if it takes longer than
/// `secs` (the vfio_user crate's client waits without timeouts).
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(Ok(v)) => v,
        Ok(Err(p)) => std::panic::resume_unwind(p),
        Err(_) => panic!("timed out after {secs} s"),
    }
}

fn pattern() -> Vec<u8> {
    (0..256u32).map(|i| (i * 7 + 3) as u8).collect()
}

mod rust_vmm {
    //! The `vfio_user` crate's client.

    pub fn read32(c: &mut vfio_user::Client, region: u32, off: u64) -> u32 {
        let mut b = [0u8; 4];
        c.region_read(region, off, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    pub fn write32(c: &mut vfio_user::Client, region: u32, off: u64, v: u32) {
        c.region_write(region, off, &v.to_le_bytes()).unwrap();
    }
}

#[test]
fn rust_vmm_client_regions_dma_and_interrupt() {
    let mut server = Server::start(&["dma0"], "dma0.sock");
    let sock = server.wait_socket("dma0.sock");
    within(60, move || {
        use rust_vmm::{read32, write32};
        let mut c = vfio_user::Client::new(&sock).unwrap();

        // Region info (the crate fetched all regions while connecting).
        let bar0 = c.region(0).unwrap();
        assert_eq!(bar0.size, 0x1000);
        assert_eq!(bar0.flags & 3, 3, "BAR0 readable and writable");
        assert_eq!(c.region(1).unwrap().size, 0, "no BAR1");
        assert_eq!(c.region(7).unwrap().size, 256, "config space");

        // Config space identity.
        let id = read32(&mut c, 7, 0);
        assert_eq!(id & 0xffff, 0x1234, "vendor");
        assert_eq!(id >> 16, 0x11e9, "device");

        // Registers.
        assert_eq!(read32(&mut c, 0, REG_ID), ID_VALUE);
        write32(&mut c, 0, REG_SCRATCH, 0xcafe_f00d);
        assert_eq!(read32(&mut c, 0, REG_SCRATCH), 0xcafe_f00d);
        write32(&mut c, 0, REG_LIVENESS, 0x0f0f_0000);
        assert_eq!(read32(&mut c, 0, REG_LIVENESS), !0x0f0f_0000);

        // INTx to an eventfd.
        let irq = c.get_irq_info(0).unwrap();
        assert_eq!(irq.count, 1);
        assert_eq!(irq.flags & vu::IRQ_INFO_EVENTFD, vu::IRQ_INFO_EVENTFD);
        let ev = eventfd();
        c.set_irqs(
            0,
            vu::IRQ_SET_DATA_EVENTFD | vu::IRQ_SET_ACTION_TRIGGER,
            0,
            1,
            &[ev.as_raw_fd()],
        )
        .unwrap();

        // DMA through a mapped memfd.
        let ram = memfd(RAM_SIZE);
        let pat = pattern();
        ram.write_all_at(&pat, 0x1000).unwrap();
        c.dma_map(0, RAM_GPA, RAM_SIZE, ram.as_raw_fd()).unwrap();
        let src = RAM_GPA + 0x1000;
        let dst = RAM_GPA + 0x8000;
        write32(&mut c, 0, REG_DMA_SRC, src as u32);
        write32(&mut c, 0, REG_DMA_SRC + 4, (src >> 32) as u32);
        write32(&mut c, 0, REG_DMA_DST, dst as u32);
        write32(&mut c, 0, REG_DMA_DST + 4, (dst >> 32) as u32);
        write32(&mut c, 0, REG_DMA_LEN, pat.len() as u32);
        write32(&mut c, 0, REG_DMA_CMD, DMA_CMD_START | DMA_CMD_IRQ);

        let fired = wait_eventfd(&ev, Duration::from_secs(10));
        assert!(fired.is_some(), "the INTx eventfd did not fire");
        let start = Instant::now();
        while read32(&mut c, 0, REG_STATUS) & 1 != 0 {
            assert!(start.elapsed() < Duration::from_secs(10), "DMA never ends");
        }
        assert_eq!(read32(&mut c, 0, REG_DMA_RESULT), 0, "DMA result");
        let mut copy = vec![0u8; pat.len()];
        ram.read_exact_at(&mut copy, 0x8000).unwrap();
        assert_eq!(copy, pat, "the device copied the pattern");
        assert_eq!(
            read32(&mut c, 0, REG_IRQ_STATUS) & IRQ_DMA_DONE,
            IRQ_DMA_DONE
        );
        write32(&mut c, 0, REG_IRQ_ACK, IRQ_DMA_DONE);
        assert_eq!(read32(&mut c, 0, REG_IRQ_STATUS), 0);

        c.dma_unmap(RAM_GPA, RAM_SIZE).unwrap();
        c.reset().unwrap();
        assert_eq!(read32(&mut c, 0, REG_SCRATCH), 0, "reset clears the device");
    });
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "server still up"
    );
}

fn our_client(path: &Path) -> VfioUserClient {
    VfioUserClient::connect(path, ClientOptions::default()).unwrap()
}

fn read32(c: &mut VfioUserClient, off: u64) -> u32 {
    let mut b = [0u8; 4];
    c.region_read(0, off, &mut b).unwrap();
    u32::from_le_bytes(b)
}

#[test]
fn our_client_posted_writes_dma_and_disconnect() {
    let mut server = Server::start(&["dma0"], "dma0.sock");
    let sock = server.wait_socket("dma0.sock");
    within(60, move || {
        let mut c = our_client(&sock);
        assert_eq!(c.server_version(), (0, 1));
        let info = c.device_info().unwrap();
        assert_eq!(info.num_regions, vu::PCI_NUM_REGIONS);
        assert_eq!(info.flags & vu::DEVICE_FLAGS_PCI, vu::DEVICE_FLAGS_PCI);
        let (r, _) = c.region_info(vu::PCI_CONFIG_REGION_INDEX).unwrap();
        assert_eq!(r.size, 256);

        // Posted writes are seen by the next read.
        for i in 0..200u32 {
            c.region_write_posted(0, REG_SCRATCH, &i.to_le_bytes())
                .unwrap();
        }
        assert_eq!(read32(&mut c, REG_SCRATCH), 199);

        // Out of the region: an error reply, the channel goes on.
        let mut b = [0u8; 8];
        assert!(matches!(
            c.region_read(0, 0xffc, &mut b),
            Err(vu::ClientError::Remote { .. })
        ));
        assert_eq!(read32(&mut c, REG_ID), ID_VALUE);

        // DMA and interrupt through our client.
        let ram = memfd(RAM_SIZE);
        let pat = pattern();
        ram.write_all_at(&pat, 0x2000).unwrap();
        c.dma_map(RAM_GPA, RAM_SIZE, ram.as_fd(), 0).unwrap();
        let ev = eventfd();
        c.set_irq_eventfds(0, 0, &[ev.as_fd()]).unwrap();
        let src = RAM_GPA + 0x2000;
        let dst = RAM_GPA + 0x9000;
        for (off, v) in [
            (REG_DMA_SRC, src as u32),
            (REG_DMA_SRC + 4, (src >> 32) as u32),
            (REG_DMA_DST, dst as u32),
            (REG_DMA_DST + 4, (dst >> 32) as u32),
            (REG_DMA_LEN, pat.len() as u32),
            (REG_DMA_CMD, DMA_CMD_START | DMA_CMD_IRQ),
        ] {
            c.region_write_posted(0, off, &v.to_le_bytes()).unwrap();
        }
        assert!(wait_eventfd(&ev, Duration::from_secs(10)).is_some());
        let mut copy = vec![0u8; pat.len()];
        ram.read_exact_at(&mut copy, 0x9000).unwrap();
        assert_eq!(copy, pat);
        // Still high until acked: an unmask re-signals.
        c.set_irqs(
            0,
            vu::IRQ_SET_DATA_NONE | vu::IRQ_SET_ACTION_UNMASK,
            0,
            1,
            &[],
            &[],
        )
        .unwrap();
        assert!(
            wait_eventfd(&ev, Duration::from_secs(5)).is_some(),
            "unmask with the level high re-signals"
        );
        // The same through an unmask eventfd (what KVM's resample fd does).
        let unmask = eventfd();
        c.set_irqs(
            0,
            vu::IRQ_SET_DATA_EVENTFD | vu::IRQ_SET_ACTION_UNMASK,
            0,
            1,
            &[],
            &[unmask.as_fd()],
        )
        .unwrap();
        // Installing fds while the level is high signals once; drain it.
        let _ = wait_eventfd(&ev, Duration::from_millis(200));
        (&unmask).write_all(&1u64.to_ne_bytes()).unwrap();
        assert!(
            wait_eventfd(&ev, Duration::from_secs(5)).is_some(),
            "a write to the unmask eventfd re-signals"
        );
        c.region_write(0, REG_IRQ_ACK, &IRQ_DMA_DONE.to_le_bytes())
            .unwrap();
        (&unmask).write_all(&1u64.to_ne_bytes()).unwrap();
        assert!(
            wait_eventfd(&ev, Duration::from_millis(200)).is_none(),
            "acked: no re-signal"
        );

        // Refused cleanly, and the channel goes on: DMA without an fd, a
        // socket passed as an eventfd.
        let no_fd = vu::DmaMap {
            flags: vu::DMA_MAP_FLAG_READ | vu::DMA_MAP_FLAG_WRITE,
            addr: 0x2_0000_0000,
            size: 0x1000,
            ..Default::default()
        };
        assert!(matches!(
            c.dma_map_with(&no_fd, None),
            Err(vu::ClientError::Remote { errno, .. }) if errno == libc::ENOTSUP
        ));
        let (not_eventfd, _peer) = UnixStream::pair().unwrap();
        assert!(matches!(
            c.set_irq_eventfds(0, 0, &[not_eventfd.as_fd()]),
            Err(vu::ClientError::Remote { errno, .. }) if errno == libc::EINVAL
        ));
        assert_eq!(read32(&mut c, REG_ID), ID_VALUE);

        // Round-trip latency of a REGION_READ (informational).
        let mut samples: Vec<Duration> = (0..3000)
            .map(|_| {
                let t = Instant::now();
                read32(&mut c, REG_SCRATCH);
                t.elapsed()
            })
            .collect();
        samples.sort();
        println!(
            "REGION_READ round trip, our client -> remote-host (dma-example): p50 {:?} p99 {:?}",
            samples[samples.len() / 2],
            samples[samples.len() * 99 / 100]
        );

        // Disconnect: the mappings go, the device state stays.
        c.region_write(0, REG_SCRATCH, &0x5a5a_5a5au32.to_le_bytes())
            .unwrap();
        drop(c);
        let mut c = our_client(&sock);
        assert_eq!(read32(&mut c, REG_SCRATCH), 0x5a5a_5a5a, "state kept");
        // The old client's eventfd is gone too.
        let _ = wait_eventfd(&ev, Duration::from_millis(50));
        c.region_write(0, REG_IRQ_RAISE, &1u32.to_le_bytes())
            .unwrap();
        assert!(
            wait_eventfd(&ev, Duration::from_millis(300)).is_none(),
            "the old client's eventfd must not fire"
        );
        c.region_write(0, REG_IRQ_ACK, &1u32.to_le_bytes()).unwrap();
        for (off, v) in [(REG_DMA_SRC, src as u32), (REG_DMA_CMD, DMA_CMD_START)] {
            c.region_write(0, off, &v.to_le_bytes()).unwrap();
        }
        let start = Instant::now();
        while read32(&mut c, REG_STATUS) & 1 != 0 {
            assert!(start.elapsed() < Duration::from_secs(10));
        }
        assert_eq!(
            read32(&mut c, REG_DMA_RESULT),
            DMA_FAULT,
            "the old client's mapping is gone"
        );
    });
    assert!(server.child.try_wait().unwrap().is_none());
}

#[test]
fn malformed_message_closes_only_that_channel() {
    let mut server = Server::start(&["dma0", "dma1"], "socks");
    let s0 = server.wait_socket("socks/dma0.sock");
    let s1 = server.wait_socket("socks/dma1.sock");
    within(60, move || {
        // A client of the other device, connected throughout.
        let mut other = our_client(&s1);
        other
            .region_write(0, REG_SCRATCH, &7u32.to_le_bytes())
            .unwrap();

        let expect_closed = |mut s: UnixStream| {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut b = [0u8; 64];
            // The server may answer VERSION first; then it must close.
            loop {
                match s.read(&mut b) {
                    Ok(0) => break,
                    Ok(_) => continue,
                    Err(e) => panic!("server did not close the channel: {e}"),
                }
            }
        };

        // A size below the header.
        let mut s = UnixStream::connect(&s0).unwrap();
        let mut m = Vec::new();
        vu::Header {
            msg_id: 0,
            cmd: 1,
            msg_size: 8,
            flags: 0,
            error: 0,
        }
        .encode(&mut m);
        s.write_all(&m).unwrap();
        expect_closed(s);

        // A valid VERSION, then garbage in a REGION_READ.
        let mut c = our_client(&s0);
        let mut m = Vec::new();
        vu::Header::command(9, vu::Command::RegionRead, 3, false).encode(&mut m);
        m.extend_from_slice(&[1, 2, 3]);
        c.send_raw(&m).unwrap();
        expect_closed(c.socket().try_clone().unwrap());

        // An oversized message.
        let mut s = UnixStream::connect(&s0).unwrap();
        let mut m = Vec::new();
        vu::Header::command(0, vu::Command::Version, 256 << 20, false).encode(&mut m);
        s.write_all(&m).unwrap();
        expect_closed(s);

        // The device is still served, to a peer we did not write too.
        let mut c = vfio_user::Client::new(&s0).unwrap();
        assert_eq!(rust_vmm::read32(&mut c, 0, REG_ID), ID_VALUE);
        // And the other device never noticed.
        assert_eq!(read32(&mut other, REG_SCRATCH), 7);
    });
    assert!(server.child.try_wait().unwrap().is_none());
    let log = server.log();
    assert!(log.contains("vfio-user channel closed"), "{log}");
}

#[test]
fn serves_an_inherited_connected_fd() {
    let tmp = tempfile::tempdir().unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    let raw = theirs.as_raw_fd();
    let mut cmd = Server::command(tmp.path(), &["dma0"]);
    cmd.args(["--fd", "3"]);
    testenv::inherit_as_fd3(&mut cmd, raw);
    let mut child = cmd.spawn().unwrap();
    drop(theirs);
    let result = within(60, move || {
        let mut c = VfioUserClient::from_stream(ours, ClientOptions::default()).unwrap();
        let v = read32(&mut c, REG_ID);
        drop(c);
        v
    });
    assert_eq!(result, ID_VALUE);
    // The connection is gone: the process ends by itself.
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("remote-host did not exit after its client left");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}

#[test]
fn serves_an_inherited_listening_fd_one_client_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("orchestrator.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let raw = listener.as_raw_fd();
    let mut cmd = Server::command(tmp.path(), &["dma0"]);
    cmd.args(["--fd", "3"]);
    testenv::inherit_as_fd3(&mut cmd, raw);
    let child = cmd.spawn().unwrap();
    drop(listener);
    let mut server = Server { child, tmp };
    within(60, move || {
        let mut a = our_client(&path);
        a.region_write(0, REG_SCRATCH, &11u32.to_le_bytes())
            .unwrap();
        // A second client waits while the first is connected: its
        // VERSION is not answered in time.
        let b = VfioUserClient::connect(
            &path,
            ClientOptions {
                timeout: Duration::from_millis(300),
                ..Default::default()
            },
        );
        assert!(
            matches!(
                b,
                Err(vu::ClientError::Framing(channel::FramingError::Timeout(_)))
            ),
            "{b:?}"
        );
        assert_eq!(read32(&mut a, REG_SCRATCH), 11);
        drop(a);
        let mut c = our_client(&path);
        assert_eq!(read32(&mut c, REG_SCRATCH), 11);
    });
    assert!(server.child.try_wait().unwrap().is_none());
}

/// QEMU 11 (the testenv sid tree) with `-device vfio-user-pci` against
/// our server: QEMU's own vfio-user client realizes the device, maps the
/// memfd guest RAM, SeaBIOS places BAR0, and a monitor `xp` of the ID
/// register is a REGION_READ answered by the plugin. No guest kernel.
#[test]
fn qemu_vfio_user_pci_reads_the_device() {
    let Some(env) = testenv::require_env("qemu_vfio_user_pci_reads_the_device") else {
        return;
    };
    let mut server = Server::start(&["dma0"], "dma0.sock");
    let sock = server.wait_socket("dma0.sock");
    let mut qemu = env.qemu_command(testenv::QemuKind::Sid);
    qemu.args([
        "-machine",
        "q35,memory-backend=mem",
        "-m",
        "256M",
        "-object",
        "memory-backend-memfd,id=mem,size=256M,share=on",
        "-accel",
        "tcg",
        "-nodefaults",
        "-display",
        "none",
        "-monitor",
        "stdio",
        "-device",
    ])
    .arg(format!(
        r#"{{"driver":"vfio-user-pci","socket":{{"path":"{}","type":"unix"}}}}"#,
        sock.display()
    ))
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = KillOnDrop(qemu.spawn().unwrap());
    let mut stdin = child.0.stdin.take().unwrap();
    let out = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    for pipe in [
        Box::new(child.0.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.0.stderr.take().unwrap()),
    ] {
        let out = out.clone();
        std::thread::spawn(move || {
            let mut pipe = pipe;
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
    }
    let text = || out.lock().unwrap().clone();
    let wait_for = |pred: &dyn Fn(&str) -> Option<String>, what: &str| -> String {
        let start = Instant::now();
        loop {
            if let Some(v) = pred(&text()) {
                return v;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "QEMU: no {what}:\n{}",
                text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // SeaBIOS assigns BAR0 soon after start; ask until it has.
    let bar0 = {
        let start = Instant::now();
        loop {
            writeln!(stdin, "info pci").unwrap();
            std::thread::sleep(Duration::from_millis(300));
            let t = text();
            // The latest `info pci` counts.
            let found = t
                .rsplit_once("PCI device 1234:11e9")
                .map(|(_, rest)| rest)
                .and_then(|rest| {
                    let line = rest.lines().find(|l| l.contains("BAR0:"))?;
                    let hex = line.split("memory at 0x").nth(1)?.split(' ').next()?;
                    u64::from_str_radix(hex, 16).ok()
                });
            if let Some(a) = found.filter(|&a| a != 0) {
                break a;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "QEMU never showed 1234:11e9 with BAR0 placed:\n{t}\n--- remote-host ---\n{}",
                server.log()
            );
        }
    };
    writeln!(stdin, "xp /1wx {bar0:#x}").unwrap();
    wait_for(
        &|t: &str| t.contains("0xd3a00001").then_some(String::new()),
        "ID register value 0xd3a00001 from `xp`",
    );
    writeln!(stdin, "quit").unwrap();
    let start = Instant::now();
    while child.0.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(20) {
            panic!("QEMU did not quit:\n{}", text());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = server.log();
    assert!(
        log.contains("DMA map"),
        "QEMU mapped its memfd guest RAM:\n{log}"
    );
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "server still up"
    );
}

/// A child process killed when the test ends, even by a panic.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// QEMU's qtest protocol on a child's stdin/stdout.
struct Qtest {
    child: Child,
    stdin: std::process::ChildStdin,
    lines: mpsc::Receiver<String>,
    irqs: Vec<String>,
    transcript: String,
}

impl Qtest {
    fn next_line(&mut self, timeout: Duration) -> Option<String> {
        let line = self.lines.recv_timeout(timeout).ok()?;
        self.transcript.push_str(&line);
        self.transcript.push('\n');
        Some(line)
    }

    /// Sends one command and returns its `OK ...` answer; IRQ events seen
    /// on the way are kept.
    fn cmd(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").unwrap();
        self.transcript.push_str(&format!("> {line}\n"));
        loop {
            let Some(l) = self.next_line(Duration::from_secs(20)) else {
                panic!("qtest: no answer to `{line}`:\n{}", self.transcript);
            };
            if l.starts_with("IRQ ") {
                self.irqs.push(l);
            } else if l.starts_with("OK") {
                return l;
            } else if l.starts_with("FAIL") || l.starts_with("ERR") {
                panic!("qtest: `{line}` -> {l}\n{}", self.transcript);
            }
        }
    }

    fn readl(&mut self, addr: u64) -> u32 {
        let r = self.cmd(&format!("readl {addr:#x}"));
        let hex = r.trim_start_matches("OK 0x");
        u64::from_str_radix(hex.trim(), 16).unwrap() as u32
    }

    fn writel(&mut self, addr: u64, v: u32) {
        self.cmd(&format!("writel {addr:#x} {v:#x}"));
    }

    fn wait_irq_raise(&mut self, timeout: Duration) -> bool {
        let start = Instant::now();
        loop {
            if self.irqs.iter().any(|l| l.starts_with("IRQ raise")) {
                return true;
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return false;
            }
            // Nudge the main loop with a harmless command so an eventfd
            // handler gets to run, then look again.
            if let Some(l) = self.next_line(left.min(Duration::from_millis(100))) {
                if l.starts_with("IRQ ") {
                    self.irqs.push(l);
                }
            } else {
                self.cmd("clock_step 1000000");
            }
        }
    }
}

impl Drop for Qtest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// QEMU 11's vfio-user-pci under the qtest accelerator (no guest, no
/// firmware): the test programs BAR0 through config mechanism #1, writes
/// a pattern into the memfd guest RAM, starts the device's DMA with an
/// interrupt, and sees the copy in guest RAM and the INTx reach the
/// IOAPIC. Everything passes through QEMU's vfio-user client and our
/// server: config and BAR accesses, DMA_MAP of the memfd, SET_IRQS with
/// the trigger eventfd, and the unmask QEMU sends at EOI.
#[test]
fn qemu_vfio_user_pci_dma_and_intx_under_qtest() {
    let Some(env) = testenv::require_env("qemu_vfio_user_pci_dma_and_intx_under_qtest") else {
        return;
    };
    let mut server = Server::start(&["dma0"], "dma0.sock");
    let sock = server.wait_socket("dma0.sock");
    let mut qemu = env.qemu_command(testenv::QemuKind::Sid);
    qemu.args([
        "-machine",
        "q35,memory-backend=mem",
        "-m",
        "256M",
        "-object",
        "memory-backend-memfd,id=mem,size=256M,share=on",
        "-accel",
        "qtest",
        "-qtest",
        "stdio",
        "-qtest-log",
        "/dev/null",
        "-nodefaults",
        "-display",
        "none",
        "-device",
    ])
    .arg(format!(
        r#"{{"driver":"vfio-user-pci","socket":{{"path":"{}","type":"unix"}},"addr":"0x4"}}"#,
        sock.display()
    ))
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(File::create(server.path("qemu.stderr")).unwrap());
    let mut child = qemu.spawn().unwrap();
    let stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut q = Qtest {
        child,
        stdin,
        lines,
        irqs: Vec::new(),
        transcript: String::new(),
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        const BAR0: u64 = 0xfe00_0000;
        const CFG_ADDR: u64 = 0xcf8;
        const CFG_DATA: u64 = 0xcfc;
        // 00:04.0, mechanism #1.
        let cfg = |reg: u32| 0x8000_0000u32 | (4 << 11) | reg;
        q.cmd("irq_intercept_in ioapic");
        q.cmd(&format!("outl {CFG_ADDR:#x} {:#x}", cfg(0)));
        let id = q.cmd(&format!("inl {CFG_DATA:#x}"));
        assert!(id.ends_with("11e91234"), "vendor/device: {id}");
        q.cmd(&format!("outl {CFG_ADDR:#x} {:#x}", cfg(0x10)));
        q.cmd(&format!("outl {CFG_DATA:#x} {BAR0:#x}"));
        q.cmd(&format!("outl {CFG_ADDR:#x} {:#x}", cfg(0x04)));
        q.cmd(&format!("outl {CFG_DATA:#x} 0x6")); // memory + bus master
        assert_eq!(q.readl(BAR0 + REG_ID), ID_VALUE);
        q.writel(BAR0 + REG_SCRATCH, 0x1234_5678);
        assert_eq!(q.readl(BAR0 + REG_SCRATCH), 0x1234_5678);

        let pat = pattern();
        let hex: String = pat.iter().map(|b| format!("{b:02x}")).collect();
        let (src, dst) = (0x10_0000u64, 0x20_0000u64);
        q.cmd(&format!("write {src:#x} {} 0x{hex}", pat.len()));
        q.writel(BAR0 + REG_DMA_SRC, src as u32);
        q.writel(BAR0 + REG_DMA_SRC + 4, 0);
        q.writel(BAR0 + REG_DMA_DST, dst as u32);
        q.writel(BAR0 + REG_DMA_DST + 4, 0);
        q.writel(BAR0 + REG_DMA_LEN, pat.len() as u32);
        q.writel(BAR0 + REG_DMA_CMD, DMA_CMD_START | DMA_CMD_IRQ);
        assert!(
            q.wait_irq_raise(Duration::from_secs(10)),
            "INTx never reached the IOAPIC"
        );
        let start = Instant::now();
        while q.readl(BAR0 + REG_STATUS) & 1 != 0 {
            assert!(start.elapsed() < Duration::from_secs(10), "DMA never ends");
        }
        assert_eq!(q.readl(BAR0 + REG_DMA_RESULT), 0);
        let copy = q.cmd(&format!("read {dst:#x} {}", pat.len()));
        assert_eq!(copy, format!("OK 0x{hex}"), "the device copied the pattern");
        q.writel(BAR0 + REG_IRQ_ACK, IRQ_DMA_DONE);
        assert_eq!(q.readl(BAR0 + REG_IRQ_STATUS), 0);
    }));
    if let Err(p) = result {
        eprintln!(
            "--- qtest transcript ---\n{}\n--- QEMU stderr ---\n{}",
            q.transcript,
            std::fs::read_to_string(server.path("qemu.stderr")).unwrap_or_default()
        );
        std::panic::resume_unwind(p);
    }
    drop(q);
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "server still up"
    );
}

/// The dma-example registers its saved state holds, as a client reads
/// them.
fn saved_registers(c: &mut VfioUserClient) -> Vec<u32> {
    [
        REG_LIVENESS,
        REG_SCRATCH,
        REG_DMA_SRC,
        REG_DMA_DST,
        REG_DMA_LEN,
    ]
    .iter()
    .map(|&r| read32(c, r))
    .collect()
}

/// vfio-user migration v2 between two `remote-host`s, through our client
/// alone (no control channel): the DMA dirty log reports the page a DMA
/// wrote, once; the state moves in 64-byte pieces (the server refusing
/// BAR accesses while stopped); the destination's registers are the
/// source's, and its DMA is where the source's was; a truncated stream
/// fails the destination into ERROR, and a reset brings it back.
#[test]
fn migration_v2_moves_a_device_between_two_remotes() {
    let mut a = Server::start(&["dma0"], "dma0.sock");
    let mut b = Server::start(&["dma0"], "dma0.sock");
    let (pa, pb) = (a.wait_socket("dma0.sock"), b.wait_socket("dma0.sock"));
    within(60, move || {
        use vu::migration::{DmaRange, MigState, MIGRATION_STOP_COPY};
        let opts = ClientOptions {
            max_data_xfer_size: 64,
            ..ClientOptions::default()
        };
        let mut ca = VfioUserClient::connect(&pa, opts.clone()).unwrap();
        let mut cb = VfioUserClient::connect(&pb, opts).unwrap();
        assert_eq!(ca.migration_flags().unwrap(), MIGRATION_STOP_COPY);

        // A DMA while the log is on: exactly its page is reported, once.
        let ram = memfd(RAM_SIZE);
        let pat = pattern();
        ram.write_all_at(&pat, 0x2000).unwrap();
        ca.dma_map(RAM_GPA, RAM_SIZE, ram.as_fd(), 0).unwrap();
        let page = ca
            .dma_logging_start(
                4096,
                &[DmaRange {
                    iova: RAM_GPA,
                    length: RAM_SIZE,
                }],
            )
            .unwrap();
        assert_eq!(page, 4096);
        let (src, dst) = (RAM_GPA + 0x2000, RAM_GPA + 0x9000);
        for (off, v) in [
            (REG_SCRATCH, 0xabcd_1234),
            (REG_DMA_SRC, src as u32),
            (REG_DMA_SRC + 4, (src >> 32) as u32),
            (REG_DMA_DST, dst as u32),
            (REG_DMA_DST + 4, (dst >> 32) as u32),
            (REG_DMA_LEN, pat.len() as u32),
            (REG_DMA_CMD, DMA_CMD_START),
        ] {
            ca.region_write(0, off, &v.to_le_bytes()).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while read32(&mut ca, REG_STATUS) & 1 != 0 {
            assert!(Instant::now() < deadline, "DMA never finished");
        }
        assert_eq!(read32(&mut ca, REG_DMA_RESULT), DMA_OK);
        assert_eq!(
            ca.dma_logging_report(RAM_GPA, RAM_SIZE, 4096).unwrap(),
            [dst]
        );
        assert!(ca
            .dma_logging_report(RAM_GPA, RAM_SIZE, 4096)
            .unwrap()
            .is_empty());
        ca.dma_logging_stop().unwrap();

        // Stop and copy.
        let before = saved_registers(&mut ca);
        ca.set_mig_state(MigState::StopCopy).unwrap();
        let mut four = [0u8; 4];
        assert!(matches!(
            ca.region_read(0, REG_ID, &mut four),
            Err(vu::ClientError::Remote {
                errno: libc::EBUSY,
                ..
            })
        ));
        ca.region_read(vu::PCI_CONFIG_REGION_INDEX, 0, &mut four)
            .unwrap();
        let data = ca.mig_read_all(64 << 20).unwrap();
        assert!(data.len() > 64, "{} bytes", data.len());
        assert_eq!(&data[..8], b"RHVUMIG\0");

        // Resume on the other remote.
        cb.set_mig_state(MigState::Resuming).unwrap();
        cb.mig_write_all(&data).unwrap();
        cb.set_mig_state(MigState::Running).unwrap();
        let after = saved_registers(&mut cb);
        assert_eq!(after, before);
        assert_eq!(after[1], 0xabcd_1234);

        // A stream cut short: refused into ERROR; a reset recovers.
        cb.set_mig_state(MigState::Resuming).unwrap();
        cb.mig_write_all(&data[..data.len() - 3]).unwrap();
        assert!(matches!(
            cb.set_mig_state(MigState::Running),
            Err(vu::ClientError::Remote {
                errno: libc::EINVAL,
                ..
            })
        ));
        assert_eq!(cb.mig_state().unwrap(), MigState::Error);
        cb.reset().unwrap();
        assert_eq!(cb.mig_state().unwrap(), MigState::Running);
        assert_eq!(read32(&mut cb, REG_ID), ID_VALUE);

        // The source, told to run again, goes on as it was.
        ca.set_mig_state(MigState::Running).unwrap();
        assert_eq!(read32(&mut ca, REG_SCRATCH), 0xabcd_1234);
    });
}

/// What a client running as `uid` sees on `path`: "closed" when the
/// server hangs up at once, "open" when it waits for the client's VERSION.
fn peer_view_as(uid: u32, path: &Path) -> String {
    use std::os::unix::process::CommandExt;
    let script = "import socket,sys\n\
        s=socket.socket(socket.AF_UNIX)\n\
        s.connect(sys.argv[1])\n\
        s.settimeout(2)\n\
        try:\n    print('closed' if s.recv(64)==b'' else 'data')\n\
        except socket.timeout:\n    print('open')\n";
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(path)
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A connection from another local user is refused at accept (its
/// SO_PEERCRED), even through a socket anyone can open; `--allow-uid`
/// lets that user in. Needs root (to be another user).
#[test]
fn a_socket_serves_only_its_own_user_root_and_allowed_ones() {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid only reads this process's id.
    if unsafe { libc::geteuid() } != 0 {
        assert!(std::env::var_os("CI").is_none(), "CI runs as root");
        eprintln!("skipped: being another user needs root");
        return;
    }
    const NOBODY: u32 = 65534;
    for allowed in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let mut cmd = Server::command(tmp.path(), &["dma0"]);
        cmd.arg("--socket").arg(tmp.path().join("dma0.sock"));
        if allowed {
            cmd.arg("--allow-uid").arg(NOBODY.to_string());
        }
        let mut server = Server {
            child: cmd.spawn().unwrap(),
            tmp,
        };
        let sock = server.wait_socket("dma0.sock");
        // A directory and socket left open to everyone by mistake.
        std::fs::set_permissions(server.tmp.path(), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).unwrap();
        let want = if allowed { "open" } else { "closed" };
        assert_eq!(peer_view_as(NOBODY, &sock), want, "allowed: {allowed}");
        // Root (and our own user) still gets in.
        let mut c = our_client(&sock);
        assert_eq!(read32(&mut c, REG_ID), ID_VALUE);
        if !allowed {
            assert!(
                server.log().contains("runs as uid 65534"),
                "{}",
                server.log()
            );
        }
    }
}
