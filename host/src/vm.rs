//! `host run`: builds the VM from the config and runs it to the end.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use config::{Config, OnReboot, Placement};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::Kvm;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vm_superio::{I8042Device, Serial};
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::{pm::PowerManagement, SCI_GSI};
use crate::bus::Bus;
use crate::crash::CrashRecord;
use crate::exit::{exit_code, restart_cause, ExitReason, ExitSignal};
use crate::legacy::{Cmos, Ps2Controller};
use crate::memory::GuestRam;
use crate::monitor::{self, Monitor};
use crate::mptable::PciIrq;
use crate::pci::inprocess::InProcessFunction;
use crate::pci::proxy::ProxyFunction;
use crate::pci::root::PciRoot;
use crate::pci::root::SlotLabel;
use crate::pci::PciDevice;
use crate::remote::{self, RemoteProcess};
use crate::serial::{ConsoleOut, EventFdTrigger, ResetTrigger, SERIAL_GSI};
use crate::snapshot::uri::Incoming;
use crate::supervisor::{self, DeathCause, Remote};
use crate::{boot, cpu, reset};

/// TSS for Intel VMX (three pages below the BIOS area).
const TSS_ADDRESS: usize = 0xfffb_d000;

/// The IOAPIC pin of the INTx of a function in `slot`.
pub fn pci_gsi(slot: u8) -> u32 {
    16 + u32::from(slot % 8)
}

/// Appends what our machine needs unless the user already chose.
pub fn kernel_cmdline(user: &str, acpi: bool) -> String {
    let mut s = user.trim().to_owned();
    let mut add = |key: &str, opt: &str| {
        if !s.split_whitespace().any(|w| w.starts_with(key)) {
            s.push(' ');
            s.push_str(opt);
        }
    };
    // Reboot through ACPI's reset register, or without ACPI through the
    // i8042 (the VMM restarts the guest or ends the VM, `on-reboot`);
    // reboot at once on panic (the VMM ends the VM when pvpanic, or
    // without ACPI the console, reports the panic, before that reboot).
    if !acpi {
        add("reboot=", "reboot=k");
    }
    add("panic=", "panic=-1");
    add("pci=", "pci=conf1");
    // Our i8042 only resets: do not probe for a mouse or a mux.
    add("i8042.noaux", "i8042.noaux");
    add("i8042.nomux", "i8042.nomux");
    add("i8042.nopnp", "i8042.nopnp");
    add("i8042.nokbd", "i8042.nokbd");
    s.trim().to_owned()
}

fn lock_processes(p: &remote::Processes) -> std::sync::MutexGuard<'_, Vec<RemoteProcess>> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// Boot timing, printed with `HOST_STATS`.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub setup: Duration,
    pub run: Duration,
}

/// How long the vCPUs get to stop and record their registers after a
/// crash.
const CRASH_PAUSE: Duration = Duration::from_secs(3);

/// Runs the VM described by `config_path`; returns the process exit code.
/// `remote_fds`: `(remote id, fd)` pairs of inherited connected sockets
/// to use for those remotes instead of spawning or connecting
/// (`--remote-fd`).
/// `qmp`: the monitor socket (`--qmp`), overriding `[vm] qmp`.
/// `incoming`: a migration stream to start from (`--incoming`) instead
/// of booting the kernel.
pub fn run(
    config_path: &Path,
    remote_fds: &[(String, i32)],
    qmp: Option<&Path>,
    incoming: Option<&Incoming>,
) -> Result<i32> {
    let t0 = Instant::now();
    // The config error already names file, line and column (and its cause).
    let cfg = Config::load(config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    // `Config::load` refuses a file without [vm]; this only names it.
    let vm_cfg = cfg
        .vm
        .clone()
        .with_context(|| format!("{}: missing [vm] section", config_path.display()))?;
    let qmp_path = qmp.map(Path::to_path_buf).or_else(|| vm_cfg.qmp.clone());
    let mut inherited = Vec::new();
    for (id, fd) in remote_fds {
        if !cfg.remotes.iter().any(|r| &r.id == id) {
            bail!("--remote-fd {id}={fd}: the config has no [[remote]] `{id}`");
        }
        if inherited.iter().any(|(i, _)| i == id) {
            bail!("--remote-fd {id}: given twice");
        }
        inherited.push((id.clone(), Some(remote::inherited_socket(id, *fd)?)));
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        eprintln!(
            "host: warning: /dev/kvm is PVM (kvm_pvm): guest ring 0 is emulated, a stock kernel \
             will not boot in practical time here; run host inside the nested KVM environment \
             (docs/host.md, \"Running\")"
        );
    }
    let vcpus = vm_cfg.vcpus;

    let kvm = Kvm::new().context("opening /dev/kvm")?;
    let vm = Arc::new(kvm.create_vm().context("KVM_CREATE_VM")?);
    let ram = Arc::new(GuestRam::new(vm_cfg.memory_bytes)?);
    for (slot, r) in ram.regions.iter().enumerate() {
        let host = ram
            .mem
            .get_host_address(GuestAddress(r.gpa))
            .context("guest RAM host address")?;
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: r.gpa,
            memory_size: r.size,
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping of `r.size` bytes owned by
        // `ram`, which outlives the VM (both live until process exit).
        unsafe { vm.set_user_memory_region(region) }.context("KVM_SET_USER_MEMORY_REGION")?;
    }
    vm.set_tss_address(TSS_ADDRESS)
        .context("KVM_SET_TSS_ADDR")?;
    vm.create_irq_chip().context("KVM_CREATE_IRQCHIP")?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .context("KVM_CREATE_PIT2")?;
    let irqchip = reset::IrqchipState::read(&vm)?;

    let exit = Arc::new(ExitSignal::default());
    let sink: Box<dyn Write + Send> = match &vm_cfg.console_log {
        Some(p) => {
            Box::new(File::create(p).with_context(|| format!("console log {}", p.display()))?)
        }
        None => Box::new(std::io::stdout()),
    };
    let serial_evt = EventFd::new(0).context("eventfd")?;
    vm.register_irqfd(&serial_evt, SERIAL_GSI)
        .context("KVM_IRQFD for COM1")?;
    let serial = Serial::new(
        EventFdTrigger(serial_evt),
        ConsoleOut::new(sink, exit.clone()),
    );
    let i8042 = I8042Device::new(ResetTrigger(exit.clone()));

    // Remotes first: their devices are created before the bus is built.
    let events = qmp::EventSender::new();
    let mut remotes: Vec<RemoteProcess> = Vec::new();
    let mut supervised: Vec<Arc<Remote>> = Vec::new();
    let mut clients = Vec::new();
    for r in &cfg.remotes {
        let sock = inherited
            .iter_mut()
            .find(|(id, _)| id == &r.id)
            .and_then(|(_, s)| s.take());
        let s = remote::connect_supervised(&cfg, r, sock)?;
        let pid = s.process.as_ref().map(RemoteProcess::pid);
        supervised.push(Arc::new(Remote::new(r, pid, s.control, s.control_hangup)));
        remotes.extend(s.process);
        clients.extend(s.clients);
    }
    let root = PciRoot::new();
    let msi_routes = crate::pci::msix::GsiRoutes::new();
    let mut configured_pins = Vec::new();
    let plugin_dirs = plugin_api::loader::default_dirs();
    for d in &cfg.devices {
        let gsi = pci_gsi(d.slot);
        let (dev, remote_id): (Box<dyn PciDevice>, Option<String>) = match &d.placement {
            Placement::Remote(rid) => {
                let Some(pos) = clients.iter().position(|(id, _)| id == &d.id) else {
                    bail!(
                        "{}: device `{}`: remote `{rid}` gave no connection",
                        d.location,
                        d.id
                    );
                };
                let (_, client) = clients.swap_remove(pos);
                let sup = supervised
                    .iter()
                    .find(|s| &s.id == rid)
                    .context("remote without supervision")?;
                let mut proxy = ProxyFunction::new(&d.id, client, &ram, &vm, gsi)
                    .and_then(|p| p.with_msix(&vm, &msi_routes))
                    .with_context(|| format!("{}: device `{}`", d.location, d.id))?
                    .with_supervision(sup.failed.clone(), monitor::fail_hook(&events, Some(rid)));
                sup.attach_fast_path(&vm, &d.id, &mut proxy);
                sup.add_device(&d.id, Some(proxy.socket_fd()), proxy.activity());
                (Box::new(proxy), Some(rid.clone()))
            }
            Placement::InProcess => (
                Box::new(
                    InProcessFunction::new(d, &plugin_dirs, ram.mem.clone(), vm.clone(), gsi)
                        .and_then(|f| f.with_msix(&msi_routes))
                        .with_context(|| format!("{}: device `{}`", d.location, d.id))?
                        .with_fail_hook(monitor::fail_hook(&events, None)),
                ),
                None,
            ),
        };
        let pin = dev.config_space().identity().interrupt_pin;
        if (1..=4).contains(&pin) {
            configured_pins.push((d.slot, pin));
        }
        let label = SlotLabel {
            id: d.id.clone(),
            remote: remote_id,
        };
        root.insert(d.slot, label, dev)
            .with_context(|| format!("{}: device `{}`", d.location, d.id))?;
    }
    // Every slot gets an INTx route, so that functions added later (QMP
    // device_add) have one too: INTA unless a configured function uses
    // another pin.
    let pci_irqs: Vec<PciIrq> = (1..=31u8)
        .map(|slot| PciIrq {
            slot,
            pin: configured_pins
                .iter()
                .find(|(s, _)| *s == slot)
                .map_or(1, |(_, p)| *p),
            gsi: pci_gsi(slot) as u8,
        })
        .collect();
    let used: Vec<u8> = cfg.devices.iter().map(|d| d.slot).collect();
    root.assign_resources(&|slot| used.contains(&slot).then(|| pci_gsi(slot) as u8))?;

    let cmdline = kernel_cmdline(&vm_cfg.cmdline, vm_cfg.acpi);
    tracing::info!("kernel command line: {cmdline}");
    let boot = boot::setup(
        &ram,
        &vm_cfg.kernel,
        vm_cfg.initrd.as_deref(),
        &cmdline,
        vcpus,
        &pci_irqs,
        vm_cfg.acpi,
    )?;
    exit.set_acpi(vm_cfg.acpi);
    let pm = vm_cfg.acpi.then(|| {
        let vm = vm.clone();
        Mutex::new(PowerManagement::new(
            exit.clone(),
            Box::new(move |level| {
                if let Err(e) = vm.set_irq_line(SCI_GSI, level) {
                    tracing::warn!("ACPI SCI: KVM_IRQ_LINE: {e}");
                }
            }),
        ))
    });

    let bus = Arc::new(Bus {
        serial: Mutex::new(serial),
        i8042: Mutex::new(Ps2Controller::new(i8042)),
        cmos: Mutex::new(Cmos::default()),
        pm,
        pci: Arc::new(root),
        msi_routes,
    });
    let base_cpuid = cpu::supported_cpuid(&kvm)?;
    let msr_indices = kvm
        .get_msr_index_list()
        .context("KVM_GET_MSR_INDEX_LIST")?
        .as_slice()
        .to_vec();
    let mut vcpu_list = Vec::new();
    for id in 0..vcpus {
        let (fd, power_on) = cpu::create(&vm, &base_cpuid, &msr_indices, id, vcpus, &boot)?;
        vcpu_list.push(reset::Vcpu {
            fd: Arc::new(Mutex::new(fd)),
            power_on,
            thread: None,
        });
    }
    let mut handed = Vec::new();
    let mut held_for_adoption = Vec::new();
    if let Some(Incoming::Now(uri)) = incoming {
        let parts = crate::snapshot::Parts {
            vm: &vm,
            ram: &ram,
            bus: &bus,
            exit: &exit,
            vcpus: vcpu_list.iter().map(|v| v.fd.clone()).collect(),
            remotes: supervised.clone(),
            msr_indices: &msr_indices,
            handover: false,
        };
        handed = crate::snapshot::restore_incoming(&parts, uri, uri.listen()?)
            .with_context(|| format!("--incoming {uri}"))?;
        // Adopted once the monitor exists, while the guest runs; its
        // accesses to those devices wait until then.
        held_for_adoption = monitor::handover::hold(&bus.pci, &handed);
        events.emit("RESUME", serde_json::json!({}));
    }
    reset::install_kick_handler()?;
    let gate = Arc::new(cpu::Gate::default());
    // `--incoming defer`: the vCPUs park at once and stay held until QMP
    // `migrate-incoming` has restored the machine.
    let deferred = matches!(incoming, Some(Incoming::Defer));
    if deferred {
        gate.request_pause();
    }
    let crash = Arc::new(CrashRecord::new(usize::from(vcpus)));
    let setup = t0.elapsed();
    let t_run = Instant::now();
    for (id, v) in vcpu_list.iter_mut().enumerate() {
        let (fd, bus, exit, gate, crash) = (
            v.fd.clone(),
            bus.clone(),
            exit.clone(),
            gate.clone(),
            crash.clone(),
        );
        v.thread = Some(
            std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || cpu::run(id as u8, fd, bus, exit, gate, crash))
                .context("spawning a vCPU thread")?,
        );
    }
    let machine = reset::Machine {
        vm: vm.clone(),
        ram: ram.clone(),
        bus: bus.clone(),
        exit: exit.clone(),
        gate,
        vcpus: vcpu_list,
        irqchip,
        kernel: vm_cfg.kernel.clone(),
        initrd: vm_cfg.initrd.clone(),
        cmdline,
        pci_irqs,
        held: std::sync::atomic::AtomicBool::new(deferred),
        control: Mutex::new(()),
        msr_indices,
        crash: crash.clone(),
    };
    let machine = Arc::new(machine);

    crate::serial::spawn_stdin_forwarder(bus.clone());
    crate::serial::spawn_lost_irq_guard(bus.clone());
    for p in &remotes {
        let Some(sup) = supervised.iter().find(|s| s.id == p.id).cloned() else {
            continue;
        };
        let events = events.clone();
        p.watch(move |end| sup.died(DeathCause::Process(end), &events));
    }
    for sup in &supervised {
        supervisor::spawn(sup.clone(), bus.pci.clone(), events.clone());
    }
    let processes: remote::Processes = Arc::new(Mutex::new(remotes));
    let monitor = Arc::new(Monitor::new(
        cfg.clone(),
        bus.clone(),
        vm.clone(),
        ram.clone(),
        supervised.clone(),
        processes.clone(),
        exit.clone(),
        events.clone(),
        plugin_dirs.clone(),
    ));
    monitor.set_machine(machine.clone());
    if deferred {
        monitor.await_incoming();
        tracing::info!("--incoming defer: waiting for QMP migrate-incoming");
    }
    monitor.arm_recovery();
    monitor.arm_hotplug();
    monitor.arm_device_recovery();
    // After arming: the adopted remotes get their restart hooks too.
    if !handed.is_empty() {
        let m = monitor.clone();
        std::thread::Builder::new()
            .name("adopt".into())
            .spawn(move || m.adopt_held(handed, held_for_adoption))
            .context("starting the adoption of the handed-over remotes")?;
    }
    drop(supervised);
    let server = match &qmp_path {
        Some(path) => {
            let server = qmp::Server::bind_with(
                path,
                monitor.clone(),
                qmp::ServerOptions::default(),
                events.clone(),
            )
            .with_context(|| format!("QMP socket {}", path.display()));
            match server {
                Ok(s) => Some(s),
                Err(e) => {
                    exit.set(ExitReason::Error(format!("{e:#}")));
                    None
                }
            }
        }
        None => None,
    };
    let mut resets = 0u32;
    let reason = loop {
        let reason = exit.wait();
        let cause = match vm_cfg.on_reboot {
            OnReboot::Restart => restart_cause(&reason, exit.console()),
            OnReboot::Exit => None,
        };
        let Some(cause) = cause else {
            break reason;
        };
        let t = Instant::now();
        if let Err(e) = machine.reset() {
            break ExitReason::Error(format!("VM reset: {e:#}"));
        }
        resets += 1;
        let (guest, why) = cause.qmp_event();
        events.emit("RESET", serde_json::json!({"guest": guest, "reason": why}));
        tracing::info!("VM reset ({why}) in {:?}", t.elapsed());
        if std::env::var_os("HOST_STATS").is_some() {
            eprintln!(
                "host-stats: reset={resets} reason={why} reset_ms={:.1}",
                t.elapsed().as_secs_f64() * 1e3
            );
        }
    };
    tracing::debug!("VM ends: {reason:?}");
    if reason.is_crash() {
        // Every vCPU leaves KVM_RUN and records its registers; bounded,
        // as one may be waiting for a hung remote.
        if let Err(e) = machine.pause(CRASH_PAUSE) {
            tracing::warn!("crash report: {e}");
        }
        eprint!(
            "{}",
            crash.report(&format!("{reason:?}"), &exit.console_tail())
        );
    }
    monitor.stop_remotes();
    events.emit(
        "SHUTDOWN",
        serde_json::json!({
            "guest": !matches!(reason, ExitReason::Quit | ExitReason::HostReset | ExitReason::Error(_)),
            "reason": reason.qmp_reason(exit.console()),
        }),
    );
    if let Some(s) = server {
        s.shutdown();
    }
    let timing = Timing {
        setup,
        run: t_run.elapsed(),
    };
    {
        let mut s = bus.serial.lock().unwrap_or_else(|e| e.into_inner());
        let _ = s.writer_mut().finish();
    }
    tracing::debug!("console flushed");
    bus.pci.shutdown();
    tracing::debug!("devices shut down");
    for r in lock_processes(&processes).iter_mut() {
        r.stop(Duration::from_secs(3));
    }
    let code = exit_code(&reason, exit.console());
    if std::env::var_os("HOST_STATS").is_some() {
        eprintln!(
            "host-stats: setup_ms={:.1} run_ms={:.1} resets={resets} exit={reason:?} code={code} com1_reraised={}",
            timing.setup.as_secs_f64() * 1e3,
            timing.run.as_secs_f64() * 1e3,
            crate::serial::COM1_RERAISED.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    if let ExitReason::Error(e) = &reason {
        eprintln!("host: {e}");
    }
    Ok(code)
}
