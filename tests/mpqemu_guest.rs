//! The guest side of the x-pci-proxy-dev ↔ remote-host (dma-example)
//! tests, shared by `mpqemu_proxy` (TCG) and `mpqemu_nested` (KVM in L1):
//! a busybox job that finds 1234:11e9 in /sys/bus/pci, binds it to
//! `uio_pci_generic`, reads and writes its registers with `devmem`, runs a
//! DMA between two buffers in the low 1 MiB (the only RAM Debian's
//! `STRICT_DEVMEM` lets `devmem` map; the kernel keeps it reserved) and
//! waits up to `$IRQ_WAIT` s (default 10) for the interrupt on `/dev/uio0`.

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testenv::{target_bin, Env, InitramfsSpec, QemuKind, RunOptions};

/// Kernel modules of the job.
pub const MODULES: &[&str] = &["uio", "uio_pci_generic"];

pub const JOB: &str = r#"
d=""
for p in /sys/bus/pci/devices/*; do
  echo "PCI $(basename $p) $(cat $p/vendor) $(cat $p/device)"
  if [ "$(cat $p/vendor) $(cat $p/device)" = "0x1234 0x11e9" ]; then d=$p; fi
done
[ -n "$d" ] || { echo "NO-DEVICE"; exit 1; }
echo "DMAEX $(basename $d) irq $(cat $d/irq)"
res=$(head -n 1 $d/resource)
echo "RES0 $res"
base=$(echo $res | cut -d' ' -f1)
echo "1234 11e9" > /sys/bus/pci/drivers/uio_pci_generic/new_id
[ -c /dev/uio0 ] && echo "UIO-BOUND"
# Memory decoding (uio enabled the device) and bus mastering.
cmd=$(od -An -tu1 -j4 -N1 $d/config)
printf "\\$(printf %o $((cmd | 6)))" | dd of=$d/config bs=1 seek=4 count=1 conv=notrunc 2>/dev/null
echo "CMD $(od -An -tx2 -j4 -N2 $d/config)"
echo "ID $(devmem $base 32)"
devmem $((base + 8)) 32 0x5a5a1234
echo "SCRATCH $(devmem $((base + 8)) 32)"
devmem $((base + 4)) 32 0x0f0f0f0f
echo "LIVENESS $(devmem $((base + 4)) 32)"
i=0
for v in 0x11223344 0x55667788 0x99aabbcc 0xddeeff00; do
  devmem $((0x20000 + i * 4)) 32 $v
  devmem $((0x30000 + i * 4)) 32 0
  i=$((i + 1))
done
devmem $((base + 0x40)) 32 0x20000
devmem $((base + 0x44)) 32 0
devmem $((base + 0x48)) 32 0x30000
devmem $((base + 0x4c)) 32 0
devmem $((base + 0x50)) 32 16
# Open /dev/uio0 before the interrupt can come (a reader only sees
# events after its open), unmask it, then start the DMA with its interrupt.
exec 3< /dev/uio0
printf '\001\000\000\000' > /dev/uio0
devmem $((base + 0x58)) 32 5
ev=$(timeout ${IRQ_WAIT:-10} dd bs=4 count=1 <&3 2>/dev/null | od -An -tu4)
echo "UIO-EVENT ${ev:-none}"
# Without an interrupt (TCG) only the timeout above waited: the copy runs
# on the remote's worker, which a loaded machine may not have run yet.
# STATUS bit 0 is the DMA running; wait (bounded) for it to clear.
n=0
while [ $(( $(devmem $((base + 0x20)) 32) & 1 )) -ne 0 ] && [ $n -lt 300 ]; do
  sleep 0.1; n=$((n + 1))
done
echo "DMA-RESULT $(devmem $((base + 0x5c)) 32)"
echo "IRQ-STATUS $(devmem $((base + 0x24)) 32)"
echo "DST $(devmem 0x30000 32) $(devmem 0x30004 32) $(devmem 0x30008 32) $(devmem 0x3000c 32)"
devmem $((base + 0x2c)) 32 0x100
echo "IRQ-STATUS-AFTER-ACK $(devmem $((base + 0x24)) 32)"
grep -i uio /proc/interrupts
"#;

/// Checks the job output (lower-cased by the caller): ids, BAR0 size,
/// registers, the DMA, and (with `irq`) the interrupt.
pub fn check(out: &str, irq: bool, log: &dyn Fn() -> String) {
    let fail = |what: &str| -> ! {
        panic!(
            "{what}\n--- guest output ---\n{out}\n--- remote-host log ---\n{}",
            log()
        )
    };
    if !out
        .lines()
        .any(|l| l.starts_with("pci ") && l.ends_with(" 0x1234 0x11e9"))
    {
        fail("the guest does not list 1234:11e9 in /sys/bus/pci");
    }
    let res0: Vec<u64> = out
        .lines()
        .find_map(|l| l.strip_prefix("res0 "))
        .unwrap_or_else(|| fail("no BAR0 resource"))
        .split_whitespace()
        .filter_map(|w| u64::from_str_radix(w.trim_start_matches("0x"), 16).ok())
        .collect();
    if res0.len() < 2 || res0[1] - res0[0] + 1 != 0x1000 {
        fail("BAR0 is not 4 KiB");
    }
    for (want, what) in [
        ("uio-bound", "uio_pci_generic did not bind"),
        ("id 0xd3a00001", "BAR0 ID register through the proxy"),
        ("scratch 0x5a5a1234", "SCRATCH write/read"),
        ("liveness 0xf0f0f0f0", "LIVENESS write/read"),
        ("dma-result 0x00000000", "DMA result"),
        ("irq-status 0x00000100", "DMA-done interrupt cause"),
        (
            "dst 0x11223344 0x55667788 0x99aabbcc 0xddeeff00",
            "the DMA copied the buffer in guest RAM",
        ),
        ("irq-status-after-ack 0x00000000", "IRQ_ACK"),
    ] {
        if !out.contains(want) {
            fail(what);
        }
    }
    let event = out
        .lines()
        .find_map(|l| l.strip_prefix("uio-event "))
        .unwrap_or("none")
        .trim();
    if irq && event == "none" {
        fail("no interrupt reached the guest (/dev/uio0)");
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What one run of the pair gave.
pub struct PairRun {
    /// The guest job's output, lower-cased.
    pub output: String,
    /// remote-host's log.
    pub log: String,
}

/// Starts `remote-host serve --protocol mpqemu --fd 3` (dma-example) on
/// one end of a socketpair and boots Debian 12's QEMU 7.2 with
/// `-device x-pci-proxy-dev,fd=N` on the other (`accel`, `cpu`), running
/// [`JOB`] with `IRQ_WAIT=irq_wait`. Checks that the job succeeded and that
/// remote-host saw SYNC_SYSMEM and exited 0 once both ends were gone.
///
/// The socketpair end QEMU uses must survive its exec: `testenv::run_job`
/// builds QEMU's command itself, so the end is made non-CLOEXEC in this
/// process before the run and passed by its number. Each test using this
/// is alone in its binary, so no other child inherits it by accident.
pub fn run_pair(env: &Env, name: &str, accel: &str, cpu: &str, irq_wait: u32) -> PairRun {
    let remote_host = target_bin("remote-host").unwrap();
    let plugins = remote_host.parent().unwrap().to_path_buf();
    assert!(
        plugins.join("libdma_example.so").is_file(),
        "libdma_example.so is not built in {}: run `cargo build --workspace` first",
        plugins.display()
    );
    let dir = testenv::workspace_root()
        .join("target")
        .join(format!("{name}-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let config = dir.join("vm.toml");
    fs::write(
        &config,
        r#"[vm]
memory = "512M"
kernel = "vmlinuz"

[[remote]]
id = "r"

[[device]]
id = "dma0"
remote = "r"
plugin = "dma-example"
slot = 4
"#,
    )
    .unwrap();
    let log_path = dir.join("remote-host.log");

    let (vmm_end, device_end) = UnixStream::pair().unwrap();
    let mut cmd = Command::new(&remote_host);
    cmd.env("RUST_LOG", "debug")
        .args([
            "serve",
            "--remote",
            "r",
            "--protocol",
            "mpqemu",
            "--fd",
            "3",
        ])
        .arg("--config")
        .arg(&config)
        .arg("--plugin-dir")
        .arg(&plugins)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log_path).unwrap());
    testenv::inherit_as_fd3(&mut cmd, device_end.as_raw_fd());
    let mut remote = Killed(cmd.spawn().unwrap());
    drop(device_end);

    // QEMU inherits our end under its own number.
    let n = vmm_end.as_raw_fd();
    // SAFETY: F_SETFD on an fd this process owns (`vmm_end`).
    assert!(unsafe { libc::fcntl(n, libc::F_SETFD, 0) } >= 0);
    let job = format!("IRQ_WAIT={irq_wait}\n{JOB}");
    let spec = InitramfsSpec::new(MODULES, &job);
    let opts = RunOptions {
        qemu: QemuKind::Debian12,
        name: name.into(),
        accel: accel.into(),
        cpu: cpu.into(),
        timeout: Duration::from_secs(240),
        extra_args: vec![
            // mpqemu passes guest RAM to the device as fds: it must be shareable.
            "-object".into(),
            "memory-backend-memfd,id=mem,size=512M,share=on".into(),
            "-machine".into(),
            "memory-backend=mem".into(),
            "-device".into(),
            format!("x-pci-proxy-dev,id=dma0,fd={n}"),
        ],
        ..Default::default()
    };
    let r = env.run_job(&spec, &opts);
    let log = || fs::read_to_string(&log_path).unwrap_or_default();
    let r = r.unwrap_or_else(|e| panic!("{e:#}\n--- remote-host log ---\n{}", log()));
    eprintln!("--- guest job output ---\n{}", r.output);
    assert_eq!(
        r.status,
        0,
        "guest job failed\n--- remote-host log ---\n{}",
        log()
    );

    // QEMU is gone; once our end closes too, remote-host exits 0 like x-remote.
    drop(vmm_end);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = remote.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "remote-host did not exit at EOF\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "remote-host: {status}\n{}", log());
    let l = log();
    assert!(
        l.contains("SYNC_SYSMEM"),
        "the proxy shared guest RAM:\n{l}"
    );
    fs::remove_dir_all(&dir).ok();
    PairRun {
        output: r.output.to_lowercase(),
        log: l,
    }
}
