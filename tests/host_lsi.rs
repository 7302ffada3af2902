//! Our VMM with the LSI53C895A plugin, under the real KVM of the nested
//! environment: first in a `remote-host` that `host` spawns (proxy PCI
//! function over vfio-user, guest RAM shared as a memfd, INTx by irqfd +
//! resample), then loaded in-process from the same plugin, then in a
//! `remote-host` the test starts first, as an orchestrator would, with the
//! VMM connecting to its socket. The guest's stock `sym53c8xx` must find
//! sda and the shared LSI job must pass in all three. All three VMs run in
//! one L1 boot.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use system_tests::{check_lsi_disk_job, lsi_disk_job, make_lsi_image, prepare_lsi_vm};
use testenv::{parse_console, target_bin, JobResult, NestedOptions};

/// Where the orchestrated remote listens inside L1 (L1's /tmp is a tmpfs:
/// UNIX sockets do not work on 9p).
const ORCH_SOCKET: &str = "/tmp/host-lsi/lsi0.sock";

fn config(kernel: &Path, name: &str, placement: &str) -> String {
    let socket = if name == "orch" {
        format!("socket = \"{ORCH_SOCKET}\"\n")
    } else {
        String::new()
    };
    format!(
        r#"[vm]
memory = "512M"
vcpus = 2
kernel = "{kernel}"
initrd = "initrd.cpio"
cmdline = "console=ttyS0 quiet"
console-log = "{name}-console.log"

[[remote]]
id = "storage"
log = "{name}-remote.log"
# A nested guest on a loaded machine can stall for seconds: a long timeout
# keeps the disk from being failed by a slow answer (hangs are tested on
# another remote).
timeout-ms = 30000
{socket}
[[device]]
id = "lsi0"
{placement}
plugin = "lsi53c895a"
slot = 4

[[device.drive]]
file = "{name}.img"
scsi-id = 0
"#,
        kernel = kernel.display()
    )
}

/// Guest kernel time (s) at which sda was attached, from the job's dmesg.
fn sda_attached(output: &str) -> String {
    output
        .lines()
        .find(|l| l.contains("Attached SCSI disk"))
        .and_then(|l| l.trim().strip_prefix('['))
        .and_then(|l| l.split(']').next())
        .map_or_else(|| "?".to_owned(), |t| t.trim().to_owned())
}

fn ms(output: &str, key: &str) -> String {
    output
        .lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .unwrap_or("?")
        .to_owned()
}

#[test]
fn lsi_plugin_remote_and_in_process_behind_our_vmm() {
    system_tests::guest_test("host_lsi", |env| {
        let t0 = Instant::now();
        let dir = prepare_lsi_vm(env, "host-lsi", &lsi_disk_job());
        let host = target_bin("host").unwrap();
        for (name, placement) in [
            ("remote", "remote = \"storage\""),
            ("inproc", "in-process = true"),
            ("orch", "remote = \"storage\""),
        ] {
            make_lsi_image(&dir.join(format!("{name}.img")));
            fs::write(
                dir.join(format!("{name}.toml")),
                config(&env.kernel, name, placement),
            )
            .unwrap();
        }
        let run = |name: &str| {
            format!(
            "t=$(date +%s%N); HOST_STATS=1 timeout 240 {host} run {cfg}; echo {name}-EXIT=$?; echo {name}-MS=$(( ($(date +%s%N) - t) / 1000000 ))",
            host = host.display(),
            cfg = dir.join(format!("{name}.toml")).display(),
        )
        };
        let orch = format!(
        "mkdir -p /tmp/host-lsi; {rh} serve --config {cfg} --remote storage --protocol vfio-user --socket {ORCH_SOCKET} & rp=$!; \
         i=0; while [ ! -S {ORCH_SOCKET} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; {run}; kill $rp",
        rh = target_bin("remote-host").unwrap().display(),
        cfg = dir.join("orch.toml").display(),
        run = run("orch"),
    );
        let cmd = format!("{}; {}; {orch}", run("remote"), run("inproc"));
        let opts = NestedOptions {
            name: "host_lsi".into(),
            timeout: Duration::from_secs(600),
            ..Default::default()
        };
        let l1 = env
            .run_nested(&["sh".into(), "-c".into(), cmd], &opts)
            .unwrap();
        eprintln!("--- L1 output ---\n{}", l1.output);
        let job = |name: &str| -> JobResult {
            let console =
                fs::read_to_string(dir.join(format!("{name}-console.log"))).unwrap_or_default();
            let log =
                fs::read_to_string(dir.join(format!("{name}-remote.log"))).unwrap_or_default();
            parse_console(&console).unwrap_or_else(|| {
            panic!("{name}: no job markers in the guest console, which ends:\n{}\n--- console ---\n{console}\n--- remote log ---\n{log}", system_tests::tail_lines(&console, 12))
        })
        };
        let mut attached = Vec::new();
        for name in ["remote", "inproc", "orch"] {
            let r = job(name);
            eprintln!("--- {name}: guest job output ---\n{}", r.output);
            attached.push(format!("{name} {} s", sda_attached(&r.output)));
            check_lsi_disk_job(&r, &dir.join(format!("{name}.img")));
            assert!(
                l1.output.contains(&format!("{name}-EXIT=0")),
                "{name}: host did not exit 0:\n{}",
                l1.output
            );
        }
        // The spawned remote serves the fast path: the driver's ISTAT reads
        // (BAR 1 at 0x14, a byte) are answered from the mirror in the ring's
        // page, most of them without a round trip.
        let remote_run = l1.output.split("remote-EXIT=").next().unwrap_or_default();
        let istat = remote_run
            .lines()
            .find(|l| l.contains("host-stats: device=lsi0 register bar=1 offset=0x14 size=1 "))
            .unwrap_or_else(|| panic!("no ISTAT counters in the remote run:\n{remote_run}"));
        let field = |k: &str| -> u64 {
            istat
                .split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {k} in {istat}"))
        };
        let (reads, mirrored) = (field("reads="), field("mirrored_reads="));
        eprintln!("host_lsi: ISTAT reads {reads}, from the mirror {mirrored}");
        assert!(
            mirrored > 0 && mirrored <= reads,
            "ISTAT reads not answered from the mirror: {istat}"
        );
        eprintln!(
        "host_lsi: passed in {:.1} s (host run in L1: remote {} ms, in-process {} ms, orchestrated remote {} ms)",
        t0.elapsed().as_secs_f64(),
        ms(&l1.output, "remote-MS="),
        ms(&l1.output, "inproc-MS="),
        ms(&l1.output, "orch-MS=")
    );
        eprintln!(
            "host_lsi: sda attached at guest time: {}",
            attached.join(", ")
        );
        fs::remove_dir_all(&dir).ok();
    });
}
