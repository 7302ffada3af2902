//! The harness holds a device to its `mirrored_reads` declaration, as a
//! VMM's mirrors would expose a broken one: a register changed by the
//! device's own thread must be announced.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use plugin_api::harness::{PluginSource, TestBench};
use plugin_api::{BarDesc, Device, DeviceDesc, Host, MirroredRead, PciIdentity};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// Whether the background change is announced.
    announce: bool,
    /// Declare a 3-byte mirror (refused).
    #[serde(default)]
    bad_width: bool,
    /// Names this device's background changes in [`CHANGES`].
    #[serde(default)]
    id: u32,
}

/// The ids of the devices whose background change is done: how a test
/// waits for it without a BAR access (after which the harness, as a
/// VMM, refreshes its mirrors) and without sleeping.
static CHANGES: (Mutex<Vec<u32>>, Condvar) = (Mutex::new(Vec::new()), Condvar::new());

fn wait_for_change(id: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut done = CHANGES.0.lock().unwrap();
    while !done.contains(&id) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "device {id}: no background change in 10 s");
        done = CHANGES.1.wait_timeout(done, left).unwrap().0;
    }
}

/// BAR 1: register 0 (mirrored) counts; a write to 4 makes a thread of the
/// device bump it 20 ms later.
struct Counter {
    value: Arc<AtomicU32>,
    host: Host,
    announce: bool,
    bad_width: bool,
    id: u32,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Counter {
    fn create(s: Settings, host: Host) -> Result<Box<dyn Device>, String> {
        Ok(Box::new(Counter {
            value: Arc::new(AtomicU32::new(7)),
            host,
            announce: s.announce,
            bad_width: s.bad_width,
            id: s.id,
            threads: Vec::new(),
        }))
    }
}

impl Device for Counter {
    fn describe(&self) -> DeviceDesc {
        DeviceDesc::new(PciIdentity::new(0x1234, 0x0001, 0xff_00_00))
            .with_bars([BarDesc::mmio32(1, 16)])
    }
    fn mirrored_reads(&self) -> Vec<MirroredRead> {
        vec![MirroredRead::new(1, 0, if self.bad_width { 3 } else { 4 })]
    }
    fn bar_read(&mut self, _bar: u8, offset: u64, data: &mut [u8]) {
        let v = if offset == 0 {
            self.value.load(Ordering::SeqCst)
        } else {
            0
        };
        let n = data.len().min(4);
        data[..n].copy_from_slice(&v.to_le_bytes()[..n]);
    }
    fn bar_write(&mut self, _bar: u8, offset: u64, _data: &[u8]) {
        if offset == 4 {
            let (value, host, announce) = (self.value.clone(), self.host.clone(), self.announce);
            let id = self.id;
            self.threads.push(std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                value.fetch_add(1, Ordering::SeqCst);
                if announce {
                    host.registers_changed();
                }
                CHANGES.0.lock().unwrap().push(id);
                CHANGES.1.notify_all();
            }));
        }
    }
    fn reset(&mut self) {}
    fn shutdown(&mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

plugin_api::export_plugin! {
    name: "mirror-counter",
    devices: { "mirror-counter" => Counter::create },
}

fn bench(settings: &str) -> Result<TestBench, String> {
    TestBench::new(PluginSource::Linked(plugin_module()), None, settings)
}

/// Starts the background change of device `id` and waits until it
/// happened.
fn change_in_background(b: &mut TestBench, id: u32) -> u64 {
    b.map_bars();
    let base = b.bar_address(1);
    assert_eq!(b.mmio_read(base, 4), 7);
    b.mmio_write(base + 4, 4, 1);
    b.wait_idle(Duration::from_secs(5)).unwrap();
    wait_for_change(id);
    base
}

#[test]
fn an_announced_change_passes() {
    let mut b = bench("announce = true\nid = 1").unwrap();
    let base = change_in_background(&mut b, 1);
    assert_eq!(b.mmio_read(base, 4), 8);
}

#[test]
#[should_panic(expected = "did not call Host::registers_changed")]
fn a_change_the_device_keeps_quiet_about_is_caught() {
    let mut b = bench("announce = false\nid = 2").unwrap();
    let base = change_in_background(&mut b, 2);
    b.mmio_read(base, 4);
}

#[test]
fn a_declaration_a_vmm_would_cut_short_is_refused() {
    let e = bench("announce = true\nbad_width = true").err().unwrap();
    assert!(e.contains("not 1, 2 or 4 bytes"), "{e}");
}

/// `plugin_module()` gives the one module it made, not a new one leaked
/// at each call (a fuzz target making a bench per input grew by the
/// module's size per input).
#[test]
fn the_linked_module_is_made_once() {
    let first = plugin_module().0.to_raw_ptr();
    for _ in 0..3 {
        assert_eq!(plugin_module().0.to_raw_ptr(), first);
    }
}
