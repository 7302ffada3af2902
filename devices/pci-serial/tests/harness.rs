//! The serial port through the test bench, linked and loaded from its
//! `.so`: PCI identity, the UART's registers through the I/O BAR, both
//! directions of the byte stream through a real UNIX socket and file, the
//! INTx level, flow control, reset, and state across a restart.
//!
//! Each bench gets a fresh directory holding its socket and output file;
//! the test finds it in [`DIR`] (the bench is made on the test's thread).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::cell::RefCell;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use plugin_api::harness::{PluginSource, TestBench};

// UART registers (offsets in the I/O BAR) and bits.
const RBR_THR: u64 = 0;
const IER: u64 = 1;
const IIR: u64 = 2;
const LCR: u64 = 3;
const LSR: u64 = 5;
const SCR: u64 = 7;
const IER_RDA: u64 = 1;
const IER_THRE: u64 = 2;
const LSR_DR: u64 = 1;
const LSR_THRE: u64 = 0x20;

const WAIT: Duration = Duration::from_secs(10);

thread_local! {
    /// This test's directory (socket `s.sock`, output `out.log`).
    static DIR: RefCell<Option<tempfile::TempDir>> = const { RefCell::new(None) };
}

fn dir() -> PathBuf {
    DIR.with(|d| d.borrow().as_ref().unwrap().path().to_owned())
}

fn bench(source: PluginSource) -> Result<TestBench, String> {
    let d = tempfile::tempdir().unwrap();
    let settings = format!(
        "socket = \"{}\"\noutput = \"{}\"\n",
        d.path().join("s.sock").display(),
        d.path().join("out.log").display()
    );
    DIR.with(|slot| *slot.borrow_mut() = Some(d));
    TestBench::new(source, None, &settings)
}

plugin_api::plugin_tests! {
    plugin: pci_serial,
    bench: bench,
    tests: [
        identity_and_io_bar,
        guest_output_reaches_the_socket_and_the_file,
        client_input_reaches_the_guest_with_an_interrupt,
        input_larger_than_the_fifo_waits_for_the_guest,
        thr_empty_interrupt_is_a_level,
        reset_returns_the_uart_to_power_on,
        state_survives_a_restart,
        hostile_state_is_refused,
        settings_errors_are_clear,
    ],
}

fn base(tb: &mut TestBench) -> u64 {
    tb.map_bars();
    tb.bar_address(0)
}

fn connect() -> UnixStream {
    let s = UnixStream::connect(dir().join("s.sock")).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

/// Reads from the client until `want` bytes arrived (bounded).
fn read_exact(s: &mut UnixStream, want: usize) -> Vec<u8> {
    let mut got = vec![0u8; want];
    s.read_exact(&mut got).unwrap();
    got
}

/// The guest side: reads whatever the UART has until `n` bytes came, waiting
/// for the input thread between polls (bounded).
fn guest_read(tb: &mut TestBench, base: u64, n: usize) -> Vec<u8> {
    let deadline = Instant::now() + WAIT;
    let mut got = Vec::new();
    while got.len() < n {
        if tb.pio_read(base + LSR, 1) & LSR_DR != 0 {
            got.push(tb.pio_read(base + RBR_THR, 1) as u8);
        } else {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} bytes came",
                got.len()
            );
            std::thread::yield_now();
        }
    }
    got
}

fn identity_and_io_bar(mut tb: TestBench) {
    assert_eq!(tb.plugin().name, "pci-serial");
    assert_eq!(tb.cfg_read(0x00, 2), 0x1b36);
    assert_eq!(tb.cfg_read(0x02, 2), 0x0002);
    assert_eq!(tb.cfg_read(0x09, 4) & 0xff_ffff, 0x07_00_02, "16550 serial");
    assert_eq!(tb.cfg_read(0x2c, 2), 0x1af4, "subsystem vendor");
    assert_eq!(tb.cfg_read(0x3d, 1), 1, "INTA");
    assert_eq!(tb.probe_bars(), vec![(0, 8, true)]);
    let b = base(&mut tb);
    assert_eq!(b, 0xc000);
    // Power-on: transmitter empty, no data, no interrupt pending.
    assert_eq!(tb.pio_read(b + LSR, 1), 0x60);
    assert_eq!(tb.pio_read(b + IIR, 1) & 0x0f, 0x01);
    tb.pio_write(b + SCR, 1, 0xa5);
    assert_eq!(tb.pio_read(b + SCR, 1), 0xa5);
    // Past the 8 registers nothing decodes: all-ones.
    assert_eq!(tb.pio_read(b + 8, 1), 0xff);
    assert!(!tb.irq().level());
}

fn guest_output_reaches_the_socket_and_the_file(mut tb: TestBench) {
    let b = base(&mut tb);
    let mut client = connect();
    // The client is served once the device accepted it; bytes written
    // before that go to the file only, so wait for the first to arrive.
    let deadline = Instant::now() + WAIT;
    client
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut first = [0u8; 1];
    loop {
        tb.pio_write(b + RBR_THR, 1, u64::from(b'.'));
        if client.read_exact(&mut first).is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the client never got a byte");
    }
    client.set_read_timeout(Some(WAIT)).unwrap();
    let msg = b"hello from the guest\r\n";
    for &c in msg {
        assert_ne!(tb.pio_read(b + LSR, 1) & LSR_THRE, 0);
        tb.pio_write(b + RBR_THR, 1, u64::from(c));
    }
    // Dots may still be on their way from before the client was served.
    let mut got = Vec::new();
    while !got.ends_with(msg) {
        got.extend(read_exact(&mut client, 1));
        assert!(got.len() < 100_000);
    }
    // The file has everything, in order.
    let file = dir().join("out.log");
    let deadline = Instant::now() + WAIT;
    loop {
        let f = std::fs::read(&file).unwrap_or_default();
        if f.ends_with(msg) {
            assert!(f.iter().take(f.len() - msg.len()).all(|&c| c == b'.'));
            break;
        }
        assert!(Instant::now() < deadline, "file holds {f:?}");
        std::thread::yield_now();
    }
}

fn client_input_reaches_the_guest_with_an_interrupt(mut tb: TestBench) {
    let b = base(&mut tb);
    tb.pio_write(b + IER, 1, IER_RDA);
    assert!(!tb.irq().level());
    let mut client = connect();
    client.write_all(b"abc").unwrap();
    assert!(tb.irq().wait_for(true, WAIT), "no interrupt for input");
    assert_eq!(tb.pio_read(b + IIR, 1) & 0x0f, 0x04, "received data");
    assert_eq!(guest_read(&mut tb, b, 3), b"abc");
    assert_eq!(tb.pio_read(b + LSR, 1) & LSR_DR, 0);
    assert!(!tb.irq().level(), "line low once the FIFO is read");
}

fn input_larger_than_the_fifo_waits_for_the_guest(mut tb: TestBench) {
    let b = base(&mut tb);
    let client = connect();
    let data: Vec<u8> = (0..5000u32).map(|i| (i * 13 + 7) as u8).collect();
    let writer = {
        let data = data.clone();
        let mut c = client.try_clone().unwrap();
        std::thread::spawn(move || c.write_all(&data).unwrap())
    };
    // Nothing lost, nothing reordered, however slowly the guest reads.
    assert_eq!(guest_read(&mut tb, b, data.len()), data);
    writer.join().unwrap();
    client.shutdown(std::net::Shutdown::Both).unwrap();
}

fn thr_empty_interrupt_is_a_level(mut tb: TestBench) {
    let b = base(&mut tb);
    tb.pio_write(b + IER, 1, IER_THRE);
    assert!(tb.irq().level(), "THR empty, enabled: line high");
    assert_eq!(tb.pio_read(b + IIR, 1) & 0x0f, 0x02);
    assert!(!tb.irq().level(), "reading IIR acknowledges THR empty");
    tb.pio_write(b + RBR_THR, 1, u64::from(b'x'));
    assert!(tb.irq().level(), "sent: THR empty again");
    tb.pio_write(b + IER, 1, 0);
    assert!(!tb.irq().level(), "disabled in IER: line low");
}

fn reset_returns_the_uart_to_power_on(mut tb: TestBench) {
    let b = base(&mut tb);
    tb.pio_write(b + SCR, 1, 0x77);
    tb.pio_write(b + LCR, 1, 0x03);
    tb.pio_write(b + IER, 1, IER_THRE);
    assert!(tb.irq().level());
    tb.function().reset().unwrap();
    assert!(!tb.irq().level(), "reset drops the line");
    // A function reset clears the configuration too: map it again.
    let b = base(&mut tb);
    assert_eq!(tb.pio_read(b + SCR, 1), 0);
    assert_eq!(tb.pio_read(b + IER, 1), 0);
}

fn state_survives_a_restart(mut tb: TestBench) {
    let b = base(&mut tb);
    tb.pio_write(b + SCR, 1, 0x3c);
    tb.pio_write(b + LCR, 1, 0x1b);
    tb.pio_write(b + IER, 1, IER_RDA);
    let mut client = connect();
    client.write_all(b"kept").unwrap();
    assert!(tb.irq().wait_for(true, WAIT));
    drop(client);
    // The new device makes a new socket at the same path; the bytes in
    // the FIFO and the pending interrupt come with the state.
    tb.restart_device().unwrap();
    assert!(tb.irq().level(), "pending receive interrupt restored");
    assert_eq!(tb.pio_read(b + SCR, 1), 0x3c);
    assert_eq!(tb.pio_read(b + LCR, 1), 0x1b);
    assert_eq!(guest_read(&mut tb, b, 4), b"kept");
    let mut client = connect();
    client.write_all(b"new").unwrap();
    assert_eq!(guest_read(&mut tb, b, 3), b"new");
}

fn hostile_state_is_refused(mut tb: TestBench) {
    let b = base(&mut tb);
    tb.pio_write(b + SCR, 1, 0x11);
    let good = tb.function().save_state().unwrap();
    let mut long = good.clone();
    long[10] = 65; // FIFO length past 64
    for (blob, says) in [
        (vec![], "empty"),
        (good[..4].to_vec(), "shorter"),
        ([&[2u8][..], &good[1..]].concat(), "version 2"),
        (long, "more than"),
    ] {
        let e = tb.function().restore_state(&blob).unwrap_err();
        assert!(e.message.contains(says), "{says}: {}", e.message);
    }
    assert_eq!(tb.pio_read(b + SCR, 1), 0x11, "left as it was");
    assert!(tb.function().failure().is_none());
}

fn settings_errors_are_clear(tb: TestBench) {
    let source = PluginSource::Linked(pci_serial::plugin_module());
    let d = dir();
    let e = TestBench::new(
        source,
        None,
        &format!("socket = \"{}\"", d.join("no/such/dir/s.sock").display()),
    )
    .err()
    .unwrap();
    assert!(e.contains("socket") && e.contains("no/such/dir"), "{e}");
    // A file that is not a socket is never replaced.
    std::fs::write(d.join("plain"), b"keep me").unwrap();
    let source = PluginSource::Linked(pci_serial::plugin_module());
    let e = TestBench::new(
        source,
        None,
        &format!("socket = \"{}\"", d.join("plain").display()),
    )
    .err()
    .unwrap();
    assert!(e.contains("not a socket"), "{e}");
    assert_eq!(std::fs::read(d.join("plain")).unwrap(), b"keep me");
    let source = PluginSource::Linked(pci_serial::plugin_module());
    let e = TestBench::new(source, None, "sockett = \"x\"")
        .err()
        .unwrap();
    assert!(e.contains("sockett"), "{e}");
    drop(tb);
}
