use super::*;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

/// A device of 16 registers of 4 bytes in BAR 1 that logs every access.
#[derive(Default)]
struct Regs {
    values: [u32; 16],
    log: Vec<(Access, u64, u32)>,
}

fn serve(
    fds: RingFds,
    regs: Arc<Mutex<Regs>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let server = RingServer::new(fds, Duration::from_micros(50)).unwrap();
    serve_with(server, regs, stop)
}

fn serve_with(
    mut server: RingServer,
    regs: Arc<Mutex<Regs>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        server.serve(
            &|| stop.load(Ordering::Relaxed),
            Duration::from_millis(20),
            |access, bar, offset, data| {
                let mut r = regs.lock().unwrap();
                let i = (offset / 4) as usize;
                if bar != 1 || i >= 16 {
                    return false;
                }
                match access {
                    Access::Read => {
                        let v = r.values[i];
                        data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
                        r.log.push((access, offset, v));
                    }
                    Access::Write => {
                        let mut b = [0u8; 4];
                        b[..data.len()].copy_from_slice(data);
                        let v = u32::from_le_bytes(b);
                        r.values[i] = v;
                        r.log.push((access, offset, v));
                    }
                }
                true
            },
        );
    })
}

fn never() -> bool {
    false
}

#[test]
fn reads_see_every_earlier_posted_write_in_order() {
    let (mut client, fds) = create(Duration::from_secs(10), Duration::from_micros(50)).unwrap();
    let regs = Arc::new(Mutex::new(Regs::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let t = serve(fds, regs.clone(), stop.clone());
    // More posted writes than slots: the producer waits for room.
    for i in 0..200u32 {
        client
            .write(1, u64::from(i % 16) * 4, &i.to_le_bytes(), &never)
            .unwrap();
    }
    let mut b = [0u8; 4];
    client.read(1, 4 * 7, &mut b, &never).unwrap();
    assert_eq!(
        u32::from_le_bytes(b),
        199,
        "the last write to register 7 (199 % 16)"
    );
    // Narrow accesses.
    client.write(1, 8, &[0xab], &never).unwrap();
    let mut one = [0u8; 1];
    client.read(1, 8, &mut one, &never).unwrap();
    assert_eq!(one, [0xab]);
    // A refused access is an error, and the ring goes on.
    assert!(matches!(
        client.read(1, 4 * 99, &mut b, &never),
        Err(RingError::Device)
    ));
    client.read(1, 4 * 7, &mut b, &never).unwrap();
    client.drain(&never).unwrap();
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
    let log = regs.lock().unwrap().log.clone();
    let writes: Vec<u32> = log
        .iter()
        .filter(|(a, _, _)| *a == Access::Write)
        .map(|(_, _, v)| *v)
        .take(200)
        .collect();
    assert_eq!(writes, (0..200).collect::<Vec<_>>(), "applied in order");
}

#[test]
fn a_sleeping_remote_is_woken_and_an_idle_one_burns_no_cpu() {
    let (mut client, fds) = create(Duration::from_secs(10), Duration::from_micros(50)).unwrap();
    let regs = Arc::new(Mutex::new(Regs::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let t = serve(fds, regs, stop.clone());
    let mut b = [0u8; 4];
    for round in 0..5u32 {
        // Long enough for the server to go to sleep on its eventfd.
        std::thread::sleep(Duration::from_millis(5));
        client.write(1, 0, &round.to_le_bytes(), &never).unwrap();
        client.read(1, 0, &mut b, &never).unwrap();
        assert_eq!(u32::from_le_bytes(b), round);
    }
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
}

#[test]
fn a_remote_that_never_answers_is_a_timeout_or_given_up() {
    let (mut client, _fds) = create(Duration::from_millis(200), Duration::from_micros(50)).unwrap();
    let mut b = [0u8; 4];
    let t = Instant::now();
    assert!(matches!(
        client.read(1, 0, &mut b, &never),
        Err(RingError::Timeout(_))
    ));
    assert!(t.elapsed() >= Duration::from_millis(200));
    let (mut client, _fds) = create(Duration::from_secs(30), Duration::from_micros(50)).unwrap();
    let flag = AtomicBool::new(false);
    let giver = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(100));
            flag.store(true, Ordering::Relaxed);
        });
        client.read(1, 0, &mut b, &|| flag.load(Ordering::Relaxed))
    });
    assert!(matches!(giver, Err(RingError::GivenUp)), "{giver:?}");
}

#[test]
fn a_remote_that_writes_garbage_is_caught() {
    let (mut client, fds) = create(Duration::from_secs(5), Duration::from_micros(50)).unwrap();
    let hostile = Page::map(fds.memory.as_fd()).unwrap();
    client.write(1, 0, &[1, 2, 3, 4], &never).unwrap();
    // The remote claims to have done 100 accesses.
    hostile.word(OFF_TAIL).store(100, Ordering::SeqCst);
    let mut b = [0u8; 4];
    assert!(matches!(
        client.read(1, 0, &mut b, &never),
        Err(RingError::Corrupt(_))
    ));
    // A status no remote writes.
    let (mut client, fds) = create(Duration::from_secs(5), Duration::from_micros(50)).unwrap();
    let hostile = Page::map(fds.memory.as_fd()).unwrap();
    let r = std::thread::scope(|s| {
        s.spawn(|| {
            while hostile.word(OFF_HEAD).load(Ordering::SeqCst) == 0 {
                std::thread::yield_now();
            }
            hostile.slot(0, F_STATUS).store(77, Ordering::SeqCst);
            hostile.word(OFF_TAIL).store(1, Ordering::SeqCst);
            signal(fds.reply.as_fd());
        });
        client.read(1, 0, &mut b, &never)
    });
    assert!(matches!(r, Err(RingError::Corrupt(_))), "{r:?}");
    // A server refuses a ring that is not one.
    let junk = eventfd().unwrap();
    let fds = RingFds {
        memory: junk,
        kick: eventfd().unwrap(),
        reply: eventfd().unwrap(),
    };
    assert!(RingServer::new(fds, Duration::ZERO).is_err());
}

/// Round trips through the ring between two threads of this process,
/// for docs/channel.md (`cargo test -p channel ring_latency -- --ignored
/// --nocapture`, release for real numbers).
#[test]
#[ignore = "a measurement, not a test"]
fn ring_latency() {
    let (mut client, fds) = create(Duration::from_secs(10), Duration::from_micros(50)).unwrap();
    let regs = Arc::new(Mutex::new(Regs::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let t = serve(fds, regs, stop.clone());
    let mut b = [0u8; 4];
    let mut sample = |n: usize, idle: Duration| {
        let mut v: Vec<Duration> = (0..n)
            .map(|_| {
                if !idle.is_zero() {
                    std::thread::sleep(idle);
                }
                let t = Instant::now();
                client.read(1, 0, &mut b, &never).unwrap();
                t.elapsed()
            })
            .collect();
        v.sort();
        (v[n / 2], v[n * 99 / 100])
    };
    let (p50, p99) = sample(20_000, Duration::ZERO);
    eprintln!("ring read back to back: p50 {p50:?} p99 {p99:?}");
    let (p50, p99) = sample(500, Duration::from_millis(1));
    eprintln!("ring read after 1 ms idle: p50 {p50:?} p99 {p99:?}");
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
}

/// The remote holds the ring's memfd: it must not be able to shrink it
/// under the VMM's mapping (the VMM's next look at the ring would be
/// SIGBUS for the whole VMM), grow it, or lift the seals.
#[test]
fn the_remote_cannot_resize_the_ring() {
    let (mut client, fds) = create(Duration::from_secs(5), Duration::ZERO).unwrap();
    let file = File::from(fds.memory.try_clone().unwrap());
    for len in [0, 1, RING_BYTES as u64 * 2] {
        let e = file.set_len(len).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "set_len({len})");
    }
    // SAFETY: F_GET_SEALS reads an integer.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    assert_eq!(seals & libc::F_SEAL_SEAL, libc::F_SEAL_SEAL);
    // The ring still works.
    let regs = Arc::new(Mutex::new(Regs::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let t = serve(fds, regs.clone(), stop.clone());
    client.write(1, 4, &7u32.to_le_bytes(), &never).unwrap();
    let mut b = [0u8; 4];
    client.read(1, 4, &mut b, &never).unwrap();
    assert_eq!(u32::from_le_bytes(b), 7);
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
}

/// A poll bound under the smallest window (`--poll-us 5`) adapts without
/// a panic (it used to clamp with min > max).
#[test]
fn a_tiny_poll_bound_adapts() {
    let mut w = Window::new(Duration::from_micros(5));
    w.slept(Duration::from_micros(1));
    assert_eq!(w.current, Duration::from_micros(5));
    w.slept(Duration::from_millis(1));
    assert_eq!(w.current, Duration::ZERO);
    let mut w = Window::new(Duration::ZERO);
    w.slept(Duration::ZERO);
    assert_eq!(w.current, Duration::ZERO);
}

const REG2: MirrorKey = MirrorKey {
    bar: 1,
    offset: 8,
    len: 4,
};

/// A served ring whose register 2 is mirrored.
fn mirrored() -> (
    RingClient,
    Arc<Mutex<Regs>>,
    Arc<AtomicBool>,
    MirrorInvalidator,
    std::thread::JoinHandle<()>,
) {
    let (mut client, fds) = create(Duration::from_secs(10), Duration::from_micros(50)).unwrap();
    let mut server = RingServer::new(fds, Duration::from_micros(50)).unwrap();
    server.set_mirrors(&[REG2]);
    let inv = server.invalidator();
    assert_eq!(client.load_mirrors().unwrap(), &[REG2]);
    let regs = Arc::new(Mutex::new(Regs::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let t = serve_with(server, regs.clone(), stop.clone());
    (client, regs, stop, inv, t)
}

fn mirror_value(client: &RingClient) -> Option<u32> {
    let mut b = [0u8; 4];
    client
        .read_mirror(REG2.bar, REG2.offset, &mut b)
        .then(|| u32::from_le_bytes(b))
}

/// Polls `f` until it gives a value, for at most 10 s.
fn within_10s<T>(mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "not within 10 s");
        std::thread::yield_now();
    }
}

#[test]
fn a_mirror_answers_only_when_current_and_never_before_a_posted_write() {
    let (mut client, regs, stop, _inv, t) = mirrored();
    // Nothing else mirrored: another register, or another width, is not.
    let mut b = [0u8; 4];
    assert!(!client.read_mirror(1, 4, &mut b));
    assert!(!client.read_mirror(1, 8, &mut b[..2]));
    // The server's first refresh makes it current.
    assert_eq!(within_10s(|| mirror_value(&client)), 0);
    let reads_before = regs.lock().unwrap().log.len();
    let mut hits = 0;
    for i in 1..=500u32 {
        client.write(1, 8, &i.to_le_bytes(), &never).unwrap();
        // Right after a posted write the mirror is either not used (the
        // write is not applied yet) or already shows it; never the value
        // before it.
        match mirror_value(&client) {
            Some(v) => {
                assert_eq!(v, i, "the mirror overtook a posted write");
                hits += 1;
            }
            None => {
                client.read(1, 8, &mut b, &never).unwrap();
                assert_eq!(u32::from_le_bytes(b), i);
            }
        }
        // Once every access is applied, the mirror answers with its effect.
        client.drain(&never).unwrap();
        assert_eq!(mirror_value(&client), Some(i));
    }
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
    // 500 answers after a drain came from the page, not the device: the
    // device saw the 500 writes, the refresh reads and the misses only.
    let log = regs.lock().unwrap().log.clone();
    let writes = log.iter().filter(|(a, _, _)| *a == Access::Write).count();
    assert_eq!(writes, 500);
    eprintln!("{hits} of 500 reads right after a posted write hit the mirror");
    assert!(log.len() > reads_before);
}

#[test]
fn a_change_the_device_announces_is_never_hidden_by_the_mirror() {
    let (client, regs, stop, inv, t) = mirrored();
    assert_eq!(within_10s(|| mirror_value(&client)), 0);
    for i in 1..=50u32 {
        // Long enough for the ring thread to go to sleep: the notice
        // must wake it.
        std::thread::sleep(Duration::from_millis(2));
        // The device's own thread changes the register, then says so
        // (before it would raise the interrupt that tells the guest).
        regs.lock().unwrap().values[2] = i;
        inv.invalidate();
        // From now on the old value is never answered.
        match mirror_value(&client) {
            None => {}
            Some(v) => assert_eq!(v, i, "a stale mirror answered after the notice"),
        }
        assert_eq!(within_10s(|| mirror_value(&client)), i);
    }
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
}

#[test]
fn a_mirror_table_no_remote_writes_is_refused() {
    for (count, key) in [(99u32, 0x0401u32), (1, 0x0301), (1, 0x0406), (1, 0x1_0401)] {
        let (mut client, fds) = create(Duration::from_secs(5), Duration::from_micros(50)).unwrap();
        let hostile = Page::map(fds.memory.as_fd()).unwrap();
        hostile.mirror(0, M_KEY).store(key, Ordering::SeqCst);
        hostile
            .word(OFF_MIRROR_COUNT)
            .store(count, Ordering::SeqCst);
        assert!(
            matches!(client.load_mirrors(), Err(RingError::Corrupt(_))),
            "count {count} key {key:#x}"
        );
        let mut b = [0u8; 4];
        assert!(!client.read_mirror(1, 4, &mut b));
    }
}

#[test]
fn a_device_that_refuses_a_mirrored_read_ends_the_mirrors() {
    let (mut client, fds) = create(Duration::from_secs(10), Duration::from_micros(50)).unwrap();
    let mut server = RingServer::new(fds, Duration::from_micros(50)).unwrap();
    // Register 99 does not exist: the refresh is refused.
    let bad = MirrorKey {
        bar: 1,
        offset: 4 * 99,
        len: 4,
    };
    server.set_mirrors(&[bad]);
    assert_eq!(client.load_mirrors().unwrap(), &[bad]);
    let regs = Arc::new(Mutex::new(Regs::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let t = serve_with(server, regs.clone(), stop.clone());
    let mut b = [0u8; 4];
    for i in 0..20u32 {
        client.write(1, 0, &i.to_le_bytes(), &never).unwrap();
        client.read(1, 0, &mut b, &never).unwrap();
        assert_eq!(u32::from_le_bytes(b), i);
        assert!(!client.read_mirror(1, 4 * 99, &mut b));
    }
    // The server did not spin refreshing: one refused refresh, then none.
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
}

#[test]
fn refused_posted_writes_are_counted_once_applied() {
    let (mut client, fds) = create(Duration::from_secs(10), Duration::from_micros(50)).unwrap();
    let regs = Arc::new(Mutex::new(Regs::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let t = serve(fds, regs, stop.clone());
    // Offsets past the 16 registers are refused by the device.
    for off in [0u64, 0x100, 4, 0x104, 8] {
        client.write(1, off, &1u32.to_le_bytes(), &never).unwrap();
    }
    client.drain(&never).unwrap();
    assert_eq!(client.take_refused_writes(), 2);
    assert_eq!(client.take_refused_writes(), 0, "taken once");
    // A refused read is the read's own error, not a refused write.
    let mut b = [0u8; 4];
    assert!(client.read(1, 0x100, &mut b, &never).is_err());
    client.drain(&never).unwrap();
    assert_eq!(client.take_refused_writes(), 0);
    // Many more than the ring holds: each slot is looked at before reuse.
    for i in 0..(3 * SLOTS as u64) {
        let off = if i % 7 == 0 { 0x200 } else { 0 };
        client.write(1, off, &1u32.to_le_bytes(), &never).unwrap();
    }
    client.drain(&never).unwrap();
    assert_eq!(
        client.take_refused_writes(),
        (0..3 * SLOTS as u64).filter(|i| i % 7 == 0).count() as u64
    );
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
}

#[test]
fn a_sleeping_server_is_woken_to_stop() {
    let (_client, fds) = create(Duration::from_secs(10), Duration::from_micros(50)).unwrap();
    let mut server = RingServer::new(fds, Duration::from_micros(50)).unwrap();
    let waker = server.waker();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let t = std::thread::spawn(move || {
        // A stop check far longer than the test's patience.
        server.serve(
            &|| flag.load(Ordering::Relaxed),
            Duration::from_secs(600),
            |_, _, _, _| true,
        );
    });
    stop.store(true, Ordering::Relaxed);
    waker.wake();
    let t0 = Instant::now();
    while !t.is_finished() {
        assert!(t0.elapsed() < Duration::from_secs(10), "not woken");
        std::thread::yield_now();
    }
    t.join().unwrap();
}

#[test]
fn a_doorbell_is_delivered_after_the_accesses_before_it() {
    let (mut client, fds) = create(Duration::from_secs(10), Duration::from_micros(50)).unwrap();
    let regs = Arc::new(Mutex::new(Regs::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut server = RingServer::new(fds, Duration::from_micros(50)).unwrap();
    let bell = eventfd().unwrap();
    // SAFETY: dup of an eventfd this test owns; the copy is owned here.
    let ours = unsafe { OwnedFd::from_raw_fd(libc::dup(bell.as_raw_fd())) };
    let key = DoorbellKey {
        bar: 1,
        offset: 12,
        len: 2,
        value: 0x5a,
    };
    // A second doorbell the device refuses (BAR 2): never counted.
    let refused = eventfd().unwrap();
    // SAFETY: dup of an eventfd this test owns; the copy is owned here.
    let refused_ours = unsafe { OwnedFd::from_raw_fd(libc::dup(refused.as_raw_fd())) };
    let refused_key = DoorbellKey { bar: 2, ..key };
    server.set_doorbells(vec![(bell, key), (refused, refused_key)]);
    let taken = client.doorbells_taken();
    let t = serve_with(server, regs.clone(), stop.clone());
    for round in 0..50u32 {
        // A posted write, then the doorbell as KVM rings it: the write is
        // applied first.
        client.write(1, 8, &round.to_le_bytes(), &never).unwrap();
        signal(ours.as_fd());
        let deadline = Instant::now() + Duration::from_secs(10);
        while taken.load() <= u64::from(round) {
            assert!(Instant::now() < deadline, "doorbell {round} not delivered");
            std::thread::yield_now();
        }
    }
    // Rings before the server looks may be one delivery; never fewer
    // than one after the last.
    signal(refused_ours.as_fd());
    signal(ours.as_fd());
    signal(ours.as_fd());
    let mut b = [0u8; 4];
    client.read(1, 0, &mut b, &never).unwrap();
    stop.store(true, Ordering::Relaxed);
    client.drain(&never).unwrap();
    t.join().unwrap();
    let log = &regs.lock().unwrap().log;
    let writes: Vec<(u64, u32)> = log
        .iter()
        .filter(|(a, _, _)| *a == Access::Write)
        .map(|(_, o, v)| (*o, *v))
        .collect();
    for round in 0..50u32 {
        let w = writes.iter().position(|e| *e == (8, round)).unwrap();
        assert_eq!(writes[w + 1], (12, 0x5a), "round {round}: {writes:?}");
    }
    let delivered = writes.iter().filter(|e| **e == (12, 0x5a)).count() as u64;
    assert!(delivered >= 51);
    assert_eq!(
        taken.load(),
        delivered,
        "the VMM sees the doorbells the device took, not the one it refused"
    );
}

#[test]
fn a_doorbell_key_matches_only_its_place_width_and_value() {
    let k = DoorbellKey {
        bar: 0,
        offset: 0x3004,
        len: 2,
        value: 1,
    };
    assert!(k.matches(0, 0x3004, &[1, 0]));
    assert!(!k.matches(0, 0x3004, &[2, 0]), "another value");
    assert!(!k.matches(0, 0x3004, &[1, 0, 0, 0]), "another width");
    assert!(!k.matches(1, 0x3004, &[1, 0]), "another BAR");
    assert!(!k.matches(0, 0x3000, &[1, 0]), "another offset");
}
