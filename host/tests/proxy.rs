//! The proxy path without a guest, on this machine's own /dev/kvm: `host`
//! spawns `remote-host` with the dma-example plugin, wires it as a proxy
//! function on the PCI root, and the test plays the firmware and the
//! driver through the same entry points vCPU exits use (0xCF8/0xCFC, MMIO).
//! DMA goes through the shared memfd, INTx reaches KVM's IOAPIC through the
//! irqfd, and BAR round trips are timed. Skips when /dev/kvm, `remote-host`
//! or the plugin is missing (build them: `cargo build -p remote-host -p
//! dma-example`).

#![allow(clippy::unwrap_used, clippy::panic)]

#[path = "support/prerequisites.rs"]
mod prerequisites;

use std::time::{Duration, Instant};

use host::memory::GuestRam;
use host::pci::proxy::ProxyFunction;
use host::pci::root::{PciRoot, CONFIG_ADDRESS, CONFIG_DATA};
use kvm_bindings::{kvm_irqchip, KVM_IRQCHIP_IOAPIC};
use kvm_ioctls::Kvm;
use vm_memory::{Bytes, GuestAddress};

// dma-example's register map (its crate is the one source).
use dma_example::{
    DMA_CMD_START, DMA_OK, ID_VALUE, IRQ_DMA_DONE, REG_DMA_CMD, REG_DMA_DST, REG_DMA_LEN,
    REG_DMA_RESULT, REG_DMA_SRC, REG_ID, REG_IRQ_ACK, REG_IRQ_RAISE, REG_LIVENESS, REG_SCRATCH,
    REG_STATUS,
};

const SLOT: u8 = 3;
const GSI: u32 = 19;

/// A VM with KVM's in-kernel irqchip, and 64 MiB of guest RAM.
fn kvm_vm() -> (std::sync::Arc<kvm_ioctls::VmFd>, GuestRam) {
    let kvm = Kvm::new().unwrap();
    let vm = std::sync::Arc::new(kvm.create_vm().unwrap());
    vm.create_irq_chip().unwrap();
    (vm, GuestRam::new(64 << 20).unwrap())
}

/// A root bus with `dev` alone in SLOT, its resources assigned (INTx on
/// GSI).
fn bus_of(dev: Box<dyn host::pci::PciDevice>) -> PciRoot {
    let mut root = PciRoot::new();
    root.add(SLOT, dev).unwrap();
    root.assign_resources(&|s| (s == SLOT).then_some(GSI as u8))
        .unwrap();
    root
}

/// Whether the test runs as root; outside CI a test that needs it skips
/// (CI runs as root: there it fails instead).
fn as_root(needs: &str) -> bool {
    // SAFETY: geteuid only reads this process's id.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI runs as root: {needs} needs it"
    );
    eprintln!("skipped: {needs} needs root");
    false
}

/// `dma0` of a connected remote, alone on a root bus of a VM of its own:
/// the bus and BAR0's address, once its ID register answers. The VM and
/// its RAM come back too (they must outlive the bus).
fn dma0_on_a_bus(
    client: host::remote::RemoteClient,
) -> (PciRoot, u64, std::sync::Arc<kvm_ioctls::VmFd>, GuestRam) {
    let (vm, ram) = kvm_vm();
    let func = ProxyFunction::new("dma0", client, &ram, &vm, GSI).unwrap();
    let root = bus_of(Box::new(func));
    let bar0 = u64::from(cfg_read32(&root, 0x10) & !0xf);
    assert_eq!(read32(&root, bar0 + REG_ID), ID_VALUE);
    (root, bar0, vm, ram)
}

fn cfg_read32(root: &PciRoot, reg: u32) -> u32 {
    let a = 0x8000_0000u32 | (u32::from(SLOT) << 11) | reg;
    root.pio_write(CONFIG_ADDRESS, &a.to_le_bytes());
    let mut d = [0u8; 4];
    root.pio_read(CONFIG_DATA, &mut d);
    u32::from_le_bytes(d)
}

fn read32(root: &PciRoot, addr: u64) -> u32 {
    let mut d = [0u8; 4];
    assert!(root.mmio_read(addr, &mut d), "nothing decodes {addr:#x}");
    u32::from_le_bytes(d)
}

fn write32(root: &PciRoot, addr: u64, v: u32) {
    assert!(root.mmio_write(addr, &v.to_le_bytes()));
}

fn ioapic_irr(vm: &kvm_ioctls::VmFd) -> u32 {
    let mut chip = kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).unwrap();
    // SAFETY: chip_id IOAPIC selects the ioapic member of the union.
    unsafe { chip.chip.ioapic.irr }
}

/// Raises dma-example's interrupt through BAR0 and waits (bounded) for
/// KVM's IOAPIC to see pin GSI go up; then acknowledges it.
fn intx_reaches_the_ioapic(root: &PciRoot, vm: &kvm_ioctls::VmFd, bar0: u64) {
    assert_eq!(ioapic_irr(vm) & (1 << GSI), 0);
    write32(root, bar0 + REG_IRQ_RAISE, IRQ_DMA_DONE);
    let deadline = Instant::now() + Duration::from_secs(5);
    while ioapic_irr(vm) & (1 << GSI) == 0 {
        assert!(Instant::now() < deadline, "INTx never reached the IOAPIC");
        std::thread::sleep(Duration::from_millis(1));
    }
    write32(root, bar0 + REG_IRQ_ACK, IRQ_DMA_DONE);
}

/// p50 and p99 of `n` SCRATCH reads through BAR0, in µs.
fn read_latency_us(root: &PciRoot, bar0: u64, n: usize) -> (f64, f64) {
    let mut lat: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            read32(root, bar0 + REG_SCRATCH);
            t.elapsed()
        })
        .collect();
    lat.sort();
    (
        lat[n / 2].as_secs_f64() * 1e6,
        lat[n * 99 / 100].as_secs_f64() * 1e6,
    )
}

#[test]
fn proxy_function_over_spawned_remote_host() {
    proxy_over_spawned_remote_host("vfio-user", false);
}

/// The same with the fast path: a spawned remote with its control channel
/// gets an access ring (`ring-setup`), and every BAR access of the
/// sequence (registers, DMA, interrupts, timing) goes through it.
#[test]
fn proxy_function_on_the_access_ring() {
    proxy_over_spawned_remote_host("vfio-user", true);
}

/// The access ring under a remote spoken to over mpqemu: the ring does not
/// depend on the dialect.
#[test]
fn proxy_function_on_the_access_ring_mpqemu() {
    proxy_over_spawned_remote_host("mpqemu", true);
}

/// The same over mpqemu: `remote-host serve --protocol mpqemu --fd 3`
/// (SYNC_SYSMEM, SET_IRQFD, absolute BAR addresses, posted writes whose
/// `RET`s are collected later).
#[test]
fn proxy_function_over_spawned_remote_host_mpqemu() {
    proxy_over_spawned_remote_host("mpqemu", false);
}

fn proxy_over_spawned_remote_host(protocol: &str, fast: bool) {
    let Some(dir) = prerequisites::or_skip() else {
        return;
    };
    let rh = dir.join("remote-host");
    std::env::set_var("REMOTE_HOST", &rh);
    let work = dir.join(format!(
        "host-proxy-test-{}-{protocol}-{fast}",
        std::process::id()
    ));
    std::fs::create_dir_all(&work).unwrap();
    // Thousands of round trips on a loaded machine: one slow answer must
    // not fail the device (that is what supervision.rs tests).
    let (_, cfg) = prerequisites::dma_example_config(
        &work,
        "dev",
        &format!("log = \"remote.log\"\nprotocol = \"{protocol}\"\ntimeout-ms = 30000"),
        SLOT,
    );

    let (vm, ram) = kvm_vm();

    let t = Instant::now();
    let s = host::remote::connect_supervised(&cfg, &cfg.remotes[0], None).unwrap();
    let mut proc = s.process.expect("spawned");
    let mut clients = s.clients;
    let (id, client) = clients.pop().unwrap();
    assert_eq!(id, "dma0");
    let mut func = ProxyFunction::new("dma0", client, &ram, &vm, GSI).unwrap();
    // Kept to the end: a remote we spawned exits when its control channel
    // closes.
    let remote = host::supervisor::Remote::new(
        &cfg.remotes[0],
        Some(proc.pid()),
        s.control,
        s.control_hangup,
    );
    if fast {
        remote.attach_fast_path(&vm, "dma0", &mut func);
        assert!(func.has_ring(), "the spawned remote took the access ring");
    }
    let label = if fast { "ring" } else { "socket" };
    let protocol = format!("{protocol} {label}");
    eprintln!("{protocol}: spawn + connect + setup: {:?}", t.elapsed());

    let root = bus_of(Box::new(func));

    // Config space comes from the remote; the BAR was placed by us.
    assert_eq!(cfg_read32(&root, 0), 0x11e9_1234);
    let bar0 = u64::from(cfg_read32(&root, 0x10) & !0xf);
    // In our MMIO window (over vfio-user the function also has the MSI-X
    // BAR, which may be placed first).
    assert!(
        bar0 >= host::memory::PCI_MMIO_START && bar0 % 0x1000 == 0,
        "BAR0 at {bar0:#x}"
    );
    assert_eq!(cfg_read32(&root, 0x3c) & 0xff, GSI);

    // Registers through BAR0.
    assert_eq!(read32(&root, bar0 + REG_ID), ID_VALUE);
    write32(&root, bar0 + REG_SCRATCH, 0x1234_5678);
    assert_eq!(read32(&root, bar0 + REG_SCRATCH), 0x1234_5678);
    write32(&root, bar0 + REG_LIVENESS, 0x0f0f_0000);
    assert_eq!(read32(&root, bar0 + REG_LIVENESS), !0x0f0f_0000);

    // DMA through the shared memfd.
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    ram.mem
        .write_slice(&pattern, GuestAddress(0x10_0000))
        .unwrap();
    write32(&root, bar0 + REG_DMA_SRC, 0x10_0000);
    write32(&root, bar0 + REG_DMA_SRC + 4, 0);
    write32(&root, bar0 + REG_DMA_DST, 0x20_0000);
    write32(&root, bar0 + REG_DMA_DST + 4, 0);
    write32(&root, bar0 + REG_DMA_LEN, 4096);
    write32(&root, bar0 + REG_DMA_CMD, DMA_CMD_START);
    let deadline = Instant::now() + Duration::from_secs(10);
    while read32(&root, bar0 + REG_STATUS) & 1 != 0 {
        assert!(Instant::now() < deadline, "DMA never finished");
    }
    assert_eq!(read32(&root, bar0 + REG_DMA_RESULT), DMA_OK, "DMA result");
    let mut copied = vec![0u8; 4096];
    ram.mem
        .read_slice(&mut copied, GuestAddress(0x20_0000))
        .unwrap();
    assert_eq!(copied, pattern);

    // INTx: the remote signals the irqfd; KVM's IOAPIC pin goes up.
    intx_reaches_the_ioapic(&root, &vm, bar0);

    // Timing of the exits' work (no vCPU involved).
    let n = 5000;
    let (p50, p99) = read_latency_us(&root, bar0, n);
    let t = Instant::now();
    for i in 0..n {
        write32(&root, bar0 + REG_SCRATCH, i as u32);
    }
    assert_eq!(read32(&root, bar0 + REG_SCRATCH), n as u32 - 1);
    let posted = t.elapsed();
    eprintln!(
        "{protocol}: proxy BAR read: p50 {p50:.1} µs, p99 {p99:.1} µs; {n} posted writes + 1 read: {:.1} µs each",
        posted.as_secs_f64() * 1e6 / n as f64
    );

    // The counters by register (QMP query-device-stats) saw exactly what
    // was done: one ID read, n+2 scratch reads and n+1 scratch writes, one
    // IRQ_RAISE write.
    let stats = root
        .with_function(SLOT, |d| d.stats())
        .flatten()
        .expect("a proxy function keeps counters");
    let reg = |off: u64| -> serde_json::Value {
        stats["registers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["bar"] == 0 && r["offset"] == off && r["size"] == 4)
            .cloned()
            .unwrap_or_else(|| panic!("register {off:#x} not counted: {stats}"))
    };
    assert_eq!(reg(REG_ID)["reads"], 1, "{stats}");
    assert_eq!(reg(REG_SCRATCH)["reads"], n as u64 + 2, "{stats}");
    assert_eq!(reg(REG_SCRATCH)["writes"], n as u64 + 1, "{stats}");
    assert_eq!(reg(REG_IRQ_RAISE)["writes"], 1, "{stats}");
    assert_eq!(stats["placement"], "remote");
    assert!(stats["bar-read-mean-us"].as_f64().unwrap() > 0.0, "{stats}");

    // The VM ends: the remote sees EOF and leaves by itself.
    root.shutdown();
    drop(remote);
    let t = Instant::now();
    proc.stop(Duration::from_secs(30));
    eprintln!("remote stopped in {:?}", t.elapsed());
    assert!(
        t.elapsed() < Duration::from_secs(25),
        "remote did not leave on EOF"
    );
    std::fs::remove_dir_all(&work).ok();
}

#[test]
fn in_process_function_same_plugin() {
    let Some(dir) = prerequisites::or_skip() else {
        return;
    };
    let work = dir.join(format!("host-inproc-test-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let cfg_path = work.join("vm.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[vm]\nmemory = \"64M\"\nkernel = \"none\"\n\n[[device]]\nid = \"dma0\"\nin-process = true\nplugin = \"dma-example\"\nslot = {SLOT}\n"
        ),
    )
    .unwrap();
    let cfg = config::Config::load(&cfg_path).unwrap();
    let (vm, ram) = kvm_vm();
    let func = host::pci::inprocess::InProcessFunction::new(
        &cfg.devices[0],
        std::slice::from_ref(&dir),
        ram.mem.clone(),
        vm.clone(),
        GSI,
    )
    .unwrap();
    let root = bus_of(Box::new(func));
    assert_eq!(cfg_read32(&root, 0), 0x11e9_1234);
    let bar0 = u64::from(cfg_read32(&root, 0x10) & !0xf);
    assert_eq!(read32(&root, bar0 + REG_ID), ID_VALUE);

    // INTx: KVM_IRQ_LINE on the same pin.
    intx_reaches_the_ioapic(&root, &vm, bar0);

    let (p50, p99) = read_latency_us(&root, bar0, 5000);
    eprintln!("in-process BAR read: p50 {p50:.2} µs, p99 {p99:.2} µs");
    root.shutdown();
    std::fs::remove_dir_all(&work).ok();
}

#[test]
fn dead_remote_reads_all_ones() {
    let Some(dir) = prerequisites::or_skip() else {
        return;
    };
    let rh = dir.join("remote-host");
    std::env::set_var("REMOTE_HOST", &rh);
    let work = dir.join(format!("host-dead-test-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let (_, cfg) = prerequisites::dma_example_config(&work, "dev", "log = \"remote.log\"", SLOT);
    let (vm, ram) = kvm_vm();
    let (proc, mut clients) = host::remote::connect(&cfg, &cfg.remotes[0], None).unwrap();
    let mut proc = proc.unwrap();
    let (_, client) = clients.pop().unwrap();
    let func = ProxyFunction::new("dma0", client, &ram, &vm, GSI).unwrap();
    let mut root = PciRoot::new();
    root.add(SLOT, Box::new(func)).unwrap();
    root.assign_resources(&|_| None).unwrap();
    let bar0 = u64::from(cfg_read32(&root, 0x10) & !0xf);
    assert_eq!(read32(&root, bar0 + REG_ID), ID_VALUE);

    let (tx, rx) = std::sync::mpsc::channel();
    proc.watch(move |end| {
        let _ = tx.send(end);
    });
    // SAFETY: kill on our own child's pid.
    assert_eq!(unsafe { libc::kill(proc.pid() as i32, libc::SIGKILL) }, 0);
    // The watcher sees the end at once (SIGCHLD), and says how.
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)).unwrap(),
        host::remote::ProcessEnd::Signaled(libc::SIGKILL)
    );
    // The device is gone: reads are all-ones, writes are dropped, config too.
    assert_eq!(read32(&root, bar0), 0xffff_ffff);
    write32(&root, bar0 + REG_SCRATCH, 1);
    assert_eq!(read32(&root, bar0 + REG_SCRATCH), 0xffff_ffff);
    assert_eq!(cfg_read32(&root, 0), 0xffff_ffff);
    proc.stop(Duration::ZERO);
    std::fs::remove_dir_all(&work).ok();
}

/// A remote serving two devices: spawned with a private socket directory
/// (one socket per device) instead of an inherited fd.
#[test]
fn one_remote_two_devices() {
    let Some(dir) = prerequisites::or_skip() else {
        return;
    };
    let rh = dir.join("remote-host");
    std::env::set_var("REMOTE_HOST", &rh);
    let work = dir.join(format!("host-two-test-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let cfg_path = work.join("vm.toml");
    std::fs::write(
        &cfg_path,
        "[vm]\nmemory = \"64M\"\nkernel = \"none\"\n\n[[remote]]\nid = \"dev\"\nlog = \"remote.log\"\n\n\
         [[device]]\nid = \"a\"\nremote = \"dev\"\nplugin = \"dma-example\"\nslot = 3\n\n\
         [[device]]\nid = \"b\"\nremote = \"dev\"\nplugin = \"dma-example\"\nslot = 5\n",
    )
    .unwrap();
    let cfg = config::Config::load(&cfg_path).unwrap();
    let (vm, ram) = kvm_vm();
    let (proc, clients) = host::remote::connect(&cfg, &cfg.remotes[0], None).unwrap();
    let mut proc = proc.unwrap();
    assert_eq!(clients.len(), 2);
    let mut root = PciRoot::new();
    for ((id, client), slot) in clients.into_iter().zip([3u8, 5]) {
        let f = ProxyFunction::new(&id, client, &ram, &vm, 16 + u32::from(slot)).unwrap();
        root.add(slot, Box::new(f)).unwrap();
    }
    root.assign_resources(&|_| None).unwrap();
    let bar = |slot: u8| {
        let a = 0x8000_0000u32 | (u32::from(slot) << 11) | 0x10;
        root.pio_write(CONFIG_ADDRESS, &a.to_le_bytes());
        let mut d = [0u8; 4];
        root.pio_read(CONFIG_DATA, &mut d);
        u64::from(u32::from_le_bytes(d) & !0xf)
    };
    let (a, b) = (bar(3), bar(5));
    assert_ne!(a, b);
    // Separate devices: each keeps its own scratch register.
    write32(&root, a + REG_SCRATCH, 0xaaaa);
    write32(&root, b + REG_SCRATCH, 0xbbbb);
    assert_eq!(read32(&root, a + REG_SCRATCH), 0xaaaa);
    assert_eq!(read32(&root, b + REG_SCRATCH), 0xbbbb);
    root.shutdown();
    proc.stop(Duration::from_millis(100));
    std::fs::remove_dir_all(&work).ok();
}

/// QEMU 7.2's own `x-remote` (its `lsi53c895a`, no disk) behind a proxy
/// function, on the fd path of `--remote-fd`: the probe finds the LSI's
/// ids and BARs, the placement check before the first BAR access passes
/// (re-writing the BARs if x-remote's startup reset wiped them), and
/// SCRATCHA reads back through memory and I/O BARs. Skips without
/// /dev/kvm or QEMU, except under CI, where it fails.
#[test]
fn qemu_x_remote_behind_proxy_function() {
    use host::pci::PciDevice;
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::net::UnixStream;
    let qemu = std::path::Path::new("/usr/bin/qemu-system-x86_64");
    let Some(dir) = prerequisites::or_skip() else {
        return;
    };
    if !qemu.exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI: needs {} (apt install qemu-system-x86)",
            qemu.display()
        );
        eprintln!("SKIP: needs {}", qemu.display());
        return;
    }
    let work = dir.join(format!("host-x-remote-test-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let cfg_path = work.join("vm.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[vm]\nmemory = \"64M\"\nkernel = \"none\"\n\n[[remote]]\nid = \"storage\"\nprotocol = \"mpqemu\"\ntimeout-ms = 10000\n\n[[device]]\nid = \"lsi0\"\nremote = \"storage\"\nplugin = \"lsi53c895a\"\nslot = {SLOT}\n"
        ),
    )
    .unwrap();
    let cfg = config::Config::load(&cfg_path).unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    let theirs = OwnedFd::from(theirs);
    let raw = theirs.as_raw_fd();
    let mut cmd = std::process::Command::new(qemu);
    cmd.args([
        "-machine",
        "x-remote",
        "-nodefaults",
        "-display",
        "none",
        "-device",
        "lsi53c895a,id=lsi0",
        "-object",
        "x-remote-object,id=robj0,devid=lsi0,fd=3",
    ])
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::null());
    testenv::inherit_as_fd3(&mut cmd, raw);
    let mut child = cmd.spawn().unwrap();
    drop(theirs);

    let (vm, ram) = kvm_vm();
    let t = Instant::now();
    let (proc, mut clients) = host::remote::connect(&cfg, &cfg.remotes[0], Some(ours)).unwrap();
    assert!(proc.is_none(), "nothing is spawned for an inherited socket");
    let (_, client) = clients.pop().unwrap();
    let func = ProxyFunction::new("lsi0", client, &ram, &vm, GSI).unwrap();
    eprintln!("x-remote: connect + probe: {:?}", t.elapsed());
    let specs: Vec<(usize, u64)> = func
        .config_space()
        .bar_specs()
        .map(|(i, s)| (i, s.size))
        .collect();
    assert_eq!(specs, vec![(0, 0x100), (1, 0x400), (2, 0x2000)]);
    let root = bus_of(Box::new(func));
    assert_eq!(cfg_read32(&root, 0), 0x0012_1000, "LSI53C895A ids");
    let io = u16::try_from(cfg_read32(&root, 0x10) & !0x3).unwrap();
    let mmio = u64::from(cfg_read32(&root, 0x14) & !0xf);
    // SCRATCHA (0x34) through BAR1 memory, then BAR0 I/O.
    write32(&root, mmio + 0x34, 0x1234_5678);
    assert_eq!(read32(&root, mmio + 0x34), 0x1234_5678);
    let mut d = [0u8; 4];
    assert!(root.pio_read(io + 0x34, &mut d));
    assert_eq!(u32::from_le_bytes(d), 0x1234_5678);
    for i in 0..64u32 {
        write32(&root, mmio + 0x34, i);
    }
    assert_eq!(read32(&root, mmio + 0x34), 63);
    root.shutdown();
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "x-remote did not exit at EOF"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("x-remote left {:?} after the VM", t.elapsed());
    std::fs::remove_dir_all(&work).ok();
}

fn cfg_write(root: &PciRoot, reg: u32, data: &[u8]) {
    let a = 0x8000_0000u32 | (u32::from(SLOT) << 11) | (reg & !3);
    root.pio_write(CONFIG_ADDRESS, &a.to_le_bytes());
    root.pio_write(CONFIG_DATA + u16::from((reg & 3) as u8), data);
}

/// MSI of a function in a spawned `remote-host` (dma-example with
/// `interrupt = "msi"`): its capability is found in the remote's
/// configuration space, the remote takes one eventfd per vector (vfio-user
/// SET_IRQS of the MSI index) and signals it only once the guest enabled
/// MSI; the VMM serves the Pending Bits from it while the vector is
/// masked, and attaches it to KVM at unmask (KVM takes the signal: the
/// bit clears); meanwhile INTx stays off the IOAPIC.
#[test]
fn msi_of_a_remote_function_is_routed_by_the_vmm() {
    let Some(dir) = prerequisites::or_skip() else {
        return;
    };
    std::env::set_var("REMOTE_HOST", dir.join("remote-host"));
    let work = dir.join(format!("host-proxy-msi-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let path = work.join("vm.toml");
    std::fs::write(
        &path,
        format!(
            "[vm]\nmemory = \"64M\"\nkernel = \"none\"\n\n\
             [[remote]]\nid = \"r\"\nlog = \"remote.log\"\ntimeout-ms = 30000\nplugin-dirs = [\"{}\"]\n\n\
             [[device]]\nid = \"dma0\"\nremote = \"r\"\nplugin = \"dma-example\"\nslot = {SLOT}\ninterrupt = \"msi\"\n",
            prerequisites::profile_dir().display()
        ),
    )
    .unwrap();
    let cfg = config::Config::load(&path).unwrap();
    let (vm, ram) = kvm_vm();
    let routes = host::pci::msix::GsiRoutes::new();
    let s = host::remote::connect_supervised(&cfg, &cfg.remotes[0], None).unwrap();
    let mut proc = s.process.expect("spawned");
    let mut clients = s.clients;
    let (_, client) = clients.pop().unwrap();
    let func = ProxyFunction::new("dma0", client, &ram, &vm, GSI)
        .unwrap()
        .with_msix(&vm, &routes)
        .unwrap();
    let remote = host::supervisor::Remote::new(
        &cfg.remotes[0],
        Some(proc.pid()),
        s.control,
        s.control_hangup,
    );
    let root = bus_of(Box::new(func));
    let bar0 = u64::from(cfg_read32(&root, 0x10) & !0xf);
    // The capability list leads to MSI.
    let mut cap = cfg_read32(&root, 0x34) & 0xfc;
    while cap != 0 && cfg_read32(&root, cap) & 0xff != u32::from(pci::msi::CAP_ID_MSI) {
        cap = (cfg_read32(&root, cap) >> 8) & 0xfc;
    }
    assert_ne!(cap, 0, "no MSI capability");
    let ctrl = cfg_read32(&root, cap) >> 16;
    assert_eq!(ctrl & 0x180, 0x180, "64-bit, per-vector masking");
    let pending = || cfg_read32(&root, cap + pci::msi::PENDING as u32);
    let wait_pending = |want: u32| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while pending() != want {
            assert!(
                Instant::now() < deadline,
                "pending bits {:#x}, not {want:#x}",
                pending()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    };

    // Programmed and enabled with the vector masked.
    cfg_write(&root, cap + 4, &0xfee0_0000u32.to_le_bytes());
    cfg_write(&root, cap + 8, &0u32.to_le_bytes());
    cfg_write(&root, cap + 12, &0x4041u16.to_le_bytes());
    cfg_write(&root, cap + 16, &1u32.to_le_bytes());
    cfg_write(&root, cap + 2, &1u16.to_le_bytes());
    assert_eq!(pending(), 0);
    write32(&root, bar0 + REG_IRQ_RAISE, 1);
    wait_pending(1);
    assert_eq!(ioapic_irr(&vm) & (1 << GSI), 0, "INTx while MSI is enabled");
    // Unmasked: the irqfd is attached and KVM takes the signal.
    cfg_write(&root, cap + 16, &0u32.to_le_bytes());
    wait_pending(0);
    write32(&root, bar0 + REG_IRQ_ACK, 1);
    // Disabled: a raise is INTx again, and no bit is left pending.
    cfg_write(&root, cap + 16, &1u32.to_le_bytes());
    cfg_write(&root, cap + 2, &0u16.to_le_bytes());
    intx_reaches_the_ioapic(&root, &vm, bar0);
    assert_eq!(pending(), 0);

    root.shutdown();
    drop(remote);
    proc.stop(Duration::from_secs(30));
    std::fs::remove_dir_all(&work).ok();
}

/// A standby `remote-host` (what an automatic restart takes): spawned,
/// it reads its config, enters its jail and waits without building its
/// devices; started, it serves them like any remote, config space and
/// registers through the proxy.
#[test]
fn a_standby_remote_waits_then_serves_once_started() {
    let Some(dir) = prerequisites::or_skip() else {
        return;
    };
    std::env::set_var("REMOTE_HOST", dir.join("remote-host"));
    let work = dir.join(format!("host-proxy-standby-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let (_, cfg) = prerequisites::dma_example_config(
        &work,
        "r",
        "log = \"remote.log\"\ntimeout-ms = 30000",
        SLOT,
    );
    let log = || std::fs::read_to_string(work.join("remote.log")).unwrap_or_default();
    let sb = host::remote::spawn_standby(&cfg, &cfg.remotes[0]).unwrap();
    let pid = sb.pid();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !log().contains("standby: ready") {
        assert!(Instant::now() < deadline, "no standby: {}", log());
        std::thread::sleep(Duration::from_millis(5));
    }
    // Waiting: alive, its device not made.
    std::thread::sleep(Duration::from_millis(50));
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert!(!log().contains("device created"), "{}", log());

    let s = sb.connect(&cfg.remotes[0]).unwrap();
    assert_eq!(s.process.as_ref().map(|p| p.pid()), Some(pid));
    assert!(s.control.is_some(), "its control channel");
    let mut clients = s.clients;
    let (id, client) = clients.pop().unwrap();
    assert_eq!(id, "dma0");
    let (vm, ram) = kvm_vm();
    let func = ProxyFunction::new("dma0", client, &ram, &vm, GSI).unwrap();
    let root = bus_of(Box::new(func));
    assert_eq!(cfg_read32(&root, 0), 0x11e9_1234);
    let bar0 = u64::from(cfg_read32(&root, 0x10) & !0xf);
    assert_eq!(read32(&root, bar0 + REG_ID), ID_VALUE);
    let l = log();
    assert!(
        l.contains("standby: started") && l.contains("device created"),
        "{l}"
    );

    // The VM ends: with its control channel closed the remote leaves.
    root.shutdown();
    drop((s.control, s.control_hangup));
    if let Some(mut p) = s.process {
        let t = Instant::now();
        p.stop(Duration::from_secs(30));
        assert!(
            t.elapsed() < Duration::from_secs(25),
            "did not leave on EOF"
        );
    }
    std::fs::remove_dir_all(&work).ok();
}

/// The pid namespace `pid`'s process is in, and its pids from the
/// outermost namespace inward (`NSpid`).
fn pid_namespace_of(pid: u32) -> (std::path::PathBuf, Vec<u32>) {
    let ns = std::fs::read_link(format!("/proc/{pid}/ns/pid")).unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let nspid = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    (ns, nspid)
}

/// The one-letter state of `pid` (`T` when stopped).
fn process_state(pid: u32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The state follows the command's closing parenthesis.
    stat.rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next())
        .unwrap()
}

fn wait_state(pid: u32, stopped: bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while (process_state(pid) == 'T') != stopped {
        assert!(Instant::now() < deadline, "state {}", process_state(pid));
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A remote the VMM spawns is the first process of a PID namespace of its
/// own (pid 1 inside: it sees no other process of the machine), while from
/// outside it is still the VMM's child: it serves, `SIGSTOP`/`SIGCONT`
/// stop and resume it, `SIGKILL` ends it and its end is seen. `jail =
/// false` leaves it in the VMM's namespace. Making a PID namespace needs
/// root.
#[test]
fn a_spawned_remote_is_alone_in_a_pid_namespace_of_its_own() {
    let Some(dir) = prerequisites::or_skip() else {
        return;
    };
    if !as_root("making a PID namespace") {
        return;
    }
    std::env::set_var("REMOTE_HOST", dir.join("remote-host"));
    let ours = std::fs::read_link("/proc/self/ns/pid").unwrap();
    for jail in [true, false] {
        let work = dir.join(format!("host-proxy-pidns-{}-{jail}", std::process::id()));
        std::fs::create_dir_all(&work).unwrap();
        let (_, cfg) = prerequisites::dma_example_config(
            &work,
            "r",
            &format!("log = \"remote.log\"\ntimeout-ms = 30000\njail = {jail}"),
            SLOT,
        );
        let s = host::remote::connect_supervised(&cfg, &cfg.remotes[0], None).unwrap();
        let mut proc = s.process.expect("spawned");
        let pid = proc.pid();
        let (ns, nspid) = pid_namespace_of(pid);
        if !jail {
            assert_eq!((ns, nspid), (ours.clone(), vec![pid]));
            proc.stop(Duration::ZERO);
            std::fs::remove_dir_all(&work).ok();
            continue;
        }
        assert_ne!(ns, ours, "the remote shares our PID namespace");
        assert_eq!(nspid, vec![pid, 1], "not the first process of its own");

        let mut clients = s.clients;
        let (_, client) = clients.pop().unwrap();
        let (root, bar0, _vm, _ram) = dma0_on_a_bus(client);

        // Signals from the VMM's namespace reach it as they reach any child.
        let sig = |s: i32| {
            // SAFETY: kill on our own child's pid.
            assert_eq!(unsafe { libc::kill(pid as i32, s) }, 0);
        };
        sig(libc::SIGSTOP);
        wait_state(pid, true);
        sig(libc::SIGCONT);
        wait_state(pid, false);
        assert_eq!(read32(&root, bar0 + REG_ID), ID_VALUE);
        sig(libc::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(30);
        let end = loop {
            if let Some(end) = host::remote::process_end(pid) {
                break end;
            }
            assert!(Instant::now() < deadline, "SIGKILL did not end it");
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(end, host::remote::ProcessEnd::Signaled(libc::SIGKILL));
        root.shutdown();
        drop((s.control, s.control_hangup));
        proc.stop(Duration::ZERO);
        std::fs::remove_dir_all(&work).ok();
    }
}

/// `memory-max`, `cpu-percent` and `tasks-max` put a spawned remote in a
/// cgroup of its own holding those limits from its first instruction:
/// the kernel's files say so, the remote serves, and the cgroup is gone
/// once the remote has ended. Needs root and a writable cgroup hierarchy
/// (v1 on this project's machine).
#[test]
fn a_spawned_remote_runs_in_a_cgroup_with_its_limits() {
    let Some(dir) = prerequisites::or_skip() else {
        return;
    };
    if !as_root("making cgroups") {
        return;
    }
    std::env::set_var("REMOTE_HOST", dir.join("remote-host"));
    let work = dir.join(format!("host-proxy-cgroup-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let (_, cfg) = prerequisites::dma_example_config(
        &work,
        "r",
        "log = \"remote.log\"\ntimeout-ms = 30000\n\
         memory-max = \"256M\"\ncpu-percent = 50\ntasks-max = 64",
        SLOT,
    );
    let s = host::remote::connect_supervised(&cfg, &cfg.remotes[0], None).unwrap();
    let mut proc = s.process.expect("spawned");
    let pid = proc.pid();
    let dirs = proc.cgroup_dirs().to_vec();
    assert!(!dirs.is_empty());
    // Each of the remote's cgroups (per /proc) is one of those made for
    // it, and each holds it and its limit.
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let v2 = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let mut seen = Vec::new();
    for (controller, file, want) in [
        ("memory", "memory.limit_in_bytes", "268435456"),
        ("cpu", "cpu.cfs_quota_us", "50000"),
        ("pids", "pids.max", "64"),
    ] {
        let (file, want) = match (v2, controller) {
            (false, _) => (file, want),
            (true, "memory") => ("memory.max", want),
            (true, "cpu") => ("cpu.max", "50000 100000"),
            (true, _) => (file, want),
        };
        let line = own
            .lines()
            .find(|l| {
                let c = l.split(':').nth(1).unwrap_or("");
                if v2 {
                    c.is_empty()
                } else {
                    c.split(',').any(|c| c == controller)
                }
            })
            .unwrap();
        let path = line.splitn(3, ':').nth(2).unwrap();
        let mount = if v2 {
            std::path::PathBuf::from("/sys/fs/cgroup")
        } else {
            std::path::Path::new("/sys/fs/cgroup").join(controller)
        };
        let dir = mount.join(path.trim_start_matches('/'));
        assert!(
            dirs.contains(&dir),
            "{controller}: {} not in {dirs:?}",
            dir.display()
        );
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
        assert!(
            procs.lines().any(|p| p == pid.to_string()),
            "{controller}: {procs}"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join(file)).unwrap().trim(),
            want,
            "{controller}"
        );
        seen.push(dir);
    }

    let mut clients = s.clients;
    let (_, client) = clients.pop().unwrap();
    let (root, _, _vm, _ram) = dma0_on_a_bus(client);

    root.shutdown();
    drop((s.control, s.control_hangup));
    proc.stop(Duration::from_secs(30));
    for d in &seen {
        assert!(!d.exists(), "{} left behind", d.display());
    }
    std::fs::remove_dir_all(&work).ok();
}

/// A `remote-host` the test started itself on an inherited socket (an
/// orchestrator's remote: no control channel of ours), killed on drop.
struct Orchestrated(std::process::Child);

impl Drop for Orchestrated {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `remote-host serve` for the config's remote `r` on one end of a
/// socketpair; the VMM's proxy function for its `dma0` on the other.
fn orchestrated_dma0(
    dir: &std::path::Path,
    cfg_path: &std::path::Path,
    cfg: &config::Config,
    vm: &std::sync::Arc<kvm_ioctls::VmFd>,
    ram: &GuestRam,
) -> (Orchestrated, PciRoot) {
    use std::os::fd::{AsRawFd, OwnedFd};
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let theirs = OwnedFd::from(theirs);
    let mut cmd = std::process::Command::new(dir.join("remote-host"));
    cmd.args(["serve", "--config"])
        .arg(cfg_path)
        .args(["--remote", "r", "--protocol", "vfio-user", "--fd", "3"])
        .stdin(std::process::Stdio::null());
    testenv::inherit_as_fd3(&mut cmd, theirs.as_raw_fd());
    let child = Orchestrated(cmd.spawn().unwrap());
    drop(theirs);
    let (proc, mut clients) = host::remote::connect(cfg, &cfg.remotes[0], Some(ours)).unwrap();
    assert!(proc.is_none());
    let (_, client) = clients.pop().unwrap();
    let func = ProxyFunction::new("dma0", client, ram, vm, GSI).unwrap();
    (child, bus_of(Box::new(func)))
}

/// A remote without our control channel is saved and restored through
/// vfio-user migration v2 on its own connection, and its DMA is logged
/// there: the proxy function's dirty log reports the page a DMA wrote,
/// once; its state, saved, leaves it running; restored into a second
/// remote, that one's registers are the first one's; a cut state is
/// refused with the remote's reason.
#[test]
fn a_remote_without_our_control_channel_migrates_over_vfio_user() {
    use host::pci::PciDevice;
    let Some(dir) = prerequisites::or_skip() else {
        return;
    };
    let work = dir.join(format!("host-proxy-v2-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let (cfg_path, cfg) = prerequisites::dma_example_config(&work, "r", "timeout-ms = 30000", SLOT);
    let (vm_a, ram_a) = kvm_vm();
    let (vm_b, ram_b) = kvm_vm();
    let (_a, root_a) = orchestrated_dma0(&dir, &cfg_path, &cfg, &vm_a, &ram_a);
    let (_b, root_b) = orchestrated_dma0(&dir, &cfg_path, &cfg, &vm_b, &ram_b);
    let bar0 = u64::from(cfg_read32(&root_a, 0x10) & !0xf);
    assert_eq!(u64::from(cfg_read32(&root_b, 0x10) & !0xf), bar0);
    let on_a = |f: &mut dyn FnMut(&mut dyn PciDevice)| root_a.with_function(SLOT, f).unwrap();
    let regions: Vec<(u64, u64)> = ram_a.regions.iter().map(|r| (r.gpa, r.size)).collect();

    // The DMA dirty log through the connection.
    on_a(&mut |d| d.wire_migration().unwrap());
    on_a(&mut |d| assert!(d.wire_dirty_log("start", &regions).unwrap().is_empty()));
    ram_a
        .mem
        .write_slice(&[0x5a; 256], GuestAddress(0x10_0000))
        .unwrap();
    for (off, v) in [
        (REG_SCRATCH, 0x600d_cafe),
        (REG_DMA_SRC, 0x10_0000),
        (REG_DMA_SRC + 4, 0),
        (REG_DMA_DST, 0x23_4000),
        (REG_DMA_DST + 4, 0),
        (REG_DMA_LEN, 256),
        (REG_DMA_CMD, DMA_CMD_START),
    ] {
        write32(&root_a, bar0 + off, v);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while read32(&root_a, bar0 + REG_STATUS) & 1 != 0 {
        assert!(Instant::now() < deadline, "DMA never finished");
    }
    assert_eq!(read32(&root_a, bar0 + REG_DMA_RESULT), DMA_OK);
    on_a(&mut |d| {
        assert_eq!(
            d.wire_dirty_log("take", &regions).unwrap(),
            [(0x23_4000, 4096)]
        )
    });
    on_a(&mut |d| assert!(d.wire_dirty_log("take", &regions).unwrap().is_empty()));
    on_a(&mut |d| {
        d.wire_dirty_log("stop", &regions).unwrap();
    });

    // Saved: the state, and the device runs on.
    let mut state = Vec::new();
    on_a(&mut |d| {
        state = d
            .save_state_quiesced(Duration::from_secs(5))
            .unwrap()
            .unwrap()
    });
    assert_eq!(read32(&root_a, bar0 + REG_SCRATCH), 0x600d_cafe);
    // Restored elsewhere: the same registers.
    assert_ne!(read32(&root_b, bar0 + REG_SCRATCH), 0x600d_cafe);
    root_b
        .with_function(SLOT, |d| d.restore_state(&state).unwrap().unwrap())
        .unwrap();
    for reg in [REG_SCRATCH, REG_LIVENESS, REG_DMA_DST, REG_DMA_LEN] {
        assert_eq!(
            read32(&root_b, bar0 + reg),
            read32(&root_a, bar0 + reg),
            "register {reg:#x}"
        );
    }
    // A state cut short: the remote's reason comes back.
    let e = root_b
        .with_function(SLOT, |d| {
            d.restore_state(&state[..state.len() - 1]).unwrap()
        })
        .unwrap()
        .unwrap_err();
    assert!(e.contains("refused the state"), "{e}");
    root_a.shutdown();
    root_b.shutdown();
    std::fs::remove_dir_all(&work).ok();
}
