//! Live migration, snapshot and restore with a real guest in the middle
//! of its disk I/O (issue 15). The guest writes 64 KiB blocks of a known
//! pattern through the LSI controller in a remote with direct I/O,
//! reading each back and comparing it, without pause, while the QMP
//! driver (PyPI's `qemu.qmp`, tests/migrate_driver.py) moves it: a live
//! migration over tcp: cancelled during pre-copy (the source runs on),
//! then live migrations A -> B over tcp:, B -> C over unix: handing B's
//! remote process over to C (its devices' state not copied; it outlives
//! B) and C -> E over tcp: (each source quit after), then a snapshot of E
//! to a file, E
//! and its remote killed, and D started from the file, where the guest
//! finishes. A function hot-added to B (not in the config) makes every
//! later destination start with `--incoming defer` and add it before
//! `migrate-incoming`, and one that does not add it (N) refuses the
//! stream while B runs on. Each VM runs its own remote process. Checked as a user would: every block
//! read back matched, the guest made progress on every VM, the host
//! image holds exactly the guest's last blocks, no SCSI error, every
//! source and its remote gone, and the migrations' own numbers.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::fs;
use std::time::Duration;

use system_tests::{
    make_lsi_image, prepare_lsi_vm, remote_lsi_config, run_qmp_driver_with, wait_for_disk,
    GUEST_OFF,
};

/// L1's /tmp is a tmpfs (UNIX sockets do not work on 9p).
const QMP_SOCKET: &str = "/tmp/host-migrate/qmp.sock";
const BLOCK: u64 = 64 << 10;
/// Block slots the guest cycles through (32 MiB from GUEST_OFF).
const SLOTS: u64 = 512;
/// The VMs the guest passes through, in order.
const VMS: [&str; 5] = ["a", "b", "c", "e", "d"];

/// The block of round `i`, as the guest makes it (`yes | head -c`).
fn block(i: u64) -> Vec<u8> {
    format!("migrate-round-{i}\n")
        .into_bytes()
        .into_iter()
        .cycle()
        .take(BLOCK as usize)
        .collect()
}

/// Rounds until the driver's `go` (at most 100000): round `i` writes
/// slot `i % SLOTS`, reads it back and compares.
fn guest_job() -> String {
    format!(
        r#"
{wait}errs() {{ dmesg | grep -ciE "abort|reset|timeout|timed out|I/O error"; }}
e0=$(errs)
(
  i=0; bad=0
  while [ ! -e /tmp/stop ] && [ $i -lt 100000 ]; do
    yes "migrate-round-$i" | head -c {BLOCK} > /tmp/b
    at=$(( {first} + i % {SLOTS} ))
    dd if=/tmp/b of=/dev/sda bs={BLOCK} seek=$at count=1 oflag=direct conv=notrunc 2>/dev/null || {{ echo "write $i failed"; break; }}
    dd if=/dev/sda of=/tmp/r bs={BLOCK} skip=$at count=1 iflag=direct 2>/dev/null || {{ echo "read $i failed"; break; }}
    cmp -s /tmp/b /tmp/r || {{ bad=$((bad + 1)); echo "round $i: read back differs"; }}
    echo "round $i"
    [ $i -eq 8 ] && echo "STEP writing"
    i=$((i + 1))
  done
  echo "rounds=$i bad=$bad" > /tmp/result
) &
read -r -t 1800 line || {{ echo "no go"; exit 20; }}
touch /tmp/stop
wait
cat /tmp/result
echo "scsi_errors_added=$(( $(errs) - e0 ))"
echo "STEP done"
"#,
        first = GUEST_OFF / BLOCK,
        wait = wait_for_disk("sda"),
    )
}

#[test]
fn a_guest_in_the_middle_of_disk_io_is_migrated_live_and_restored_from_a_snapshot() {
    system_tests::guest_test("host_migrate", |env| {
        let dir = prepare_lsi_vm(env, "host-migrate", &guest_job());
        make_lsi_image(&dir.join("disk0.img"));
        for vm in VMS.iter().chain(&["x", "n"]) {
            fs::write(
                dir.join(format!("vm-{vm}.toml")),
                remote_lsi_config(&env.kernel, 256, vm),
            )
            .unwrap();
        }
        fs::copy(dir.join("vm-a.toml"), dir.join("vm.toml")).unwrap();
        let logs: Vec<String> = VMS
            .iter()
            .chain(&["x", "n"])
            .flat_map(|vm| {
                [
                    format!("vm-{vm}.toml.host-stderr"),
                    format!("storage-{vm}.log"),
                ]
            })
            .collect();
        let logs: Vec<&str> = logs.iter().map(String::as_str).collect();
        let run = run_qmp_driver_with(
            env,
            "host_migrate",
            "migrate_driver.py",
            &dir,
            QMP_SOCKET,
            // About 70 s on a quiet machine: a run that takes much longer is stuck.
            Duration::from_secs(480),
            &logs,
            false,
        );
        let (r, diag) = (&run.results, &run.diag);
        let console = |vm: &str| {
            fs::read_to_string(dir.join(format!("console-{vm}.log")))
                .unwrap_or_default()
                .replace("\r\n", "\n")
        };
        let consoles: Vec<String> = VMS.iter().map(|vm| console(vm)).collect();
        let diag = format!(
            "{diag}\n--- console-d ---\n{}",
            system_tests::tail_lines(&consoles[4], 40)
        );
        // Pre-copy's dirty tracking, checked by each source
        // (HOST_MIGRATE_VERIFY, set by tests/qmp_common.py): a page it
        // missed is the first thing to know of, before whatever the guest
        // made of it.
        let stderr = |vm: &str| {
            fs::read_to_string(dir.join(format!("vm-{vm}.toml.host-stderr"))).unwrap_or_default()
        };
        for vm in VMS {
            let missed: Vec<String> = stderr(vm)
                .lines()
                .filter(|l| l.contains("pages differ from their last version sent"))
                .map(str::to_owned)
                .collect();
            assert!(missed.is_empty(), "VM {vm}: {missed:?}\n{diag}");
        }
        assert!(
            r.get("failure").is_none() && run.l1_output.contains("DRIVER-EXIT=0"),
            "the driver failed:\n{diag}"
        );
        // Every hop's destination holds, before its vCPUs ran, the RAM its
        // source had at the stop.
        // A source's last verdict is its completed hop's (B's refused one
        // to N came before).
        let digest = |vm: &str, what: &str| {
            stderr(vm)
                .lines()
                .rev()
                .find_map(|l| l.split(what).nth(1))
                .map(|d| d.trim().to_owned())
                .unwrap_or_else(|| panic!("VM {vm}: no `{what}` line:\n{diag}"))
        };
        for (from, to) in [("a", "b"), ("b", "c"), ("c", "e"), ("e", "d")] {
            assert_eq!(
                digest(from, "as they are now; RAM digest "),
                digest(to, "restored RAM digest "),
                "RAM of {from} at its stop and of {to} restored:\n{diag}"
            );
        }
        let job = testenv::parse_console(&consoles.join("\n"))
            .unwrap_or_else(|| panic!("no job markers across the consoles:\n{diag}"));
        assert_eq!(job.status, 0, "guest job failed:\n{diag}");
        let rounds: u64 = job
            .output
            .split_whitespace()
            .find_map(|w| w.strip_prefix("rounds="))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no rounds= in the guest output:\n{diag}"));
        assert!(job.output.contains(" bad=0"), "{diag}");
        assert!(job.output.contains("scsi_errors_added=0"), "{diag}");
        // The guest worked on every VM.
        let per_vm: Vec<usize> = consoles
            .iter()
            .map(|c| c.matches("\nround ").count())
            .collect();
        assert!(
            per_vm.iter().all(|&n| n >= 5),
            "rounds per VM {per_vm:?}:\n{diag}"
        );
        let rep = &r["replies"];
        assert!(
            rep["bad-uri"]
                .as_str()
                .unwrap_or("")
                .contains("file:PATH, tcp:HOST:PORT or unix:PATH"),
            "{diag}"
        );
        assert_eq!(rep["status-stopped"], "paused", "{diag}");
        assert_eq!(rep["status-cont"], "running", "{diag}");
        // The cancelled one: the source runs on, the destination gave up.
        assert_eq!(rep["cancel-at"]["status"], "active", "{diag}");
        assert_eq!(rep["cancelled"]["status"], "cancelled", "{diag}");
        assert_eq!(rep["status-after-cancel"], "running", "{diag}");
        assert!(rep["x-exit"].as_i64().is_some_and(|c| c != 0), "{diag}");
        assert_eq!(rep["params"]["max-bandwidth"], 0, "{diag}");
        for vm in ["b", "c", "e"] {
            let hop = &rep[format!("hop-{vm}")];
            assert_eq!(hop["status"], "completed", "hop to {vm}:\n{diag}");
            // Pre-copy then stop-and-copy, and pages the guest dirtied meanwhile
            // sent again: more than the guest's 256 MiB went through.
            assert!(hop["ram"]["dirty-sync-count"].as_u64() >= Some(2), "{diag}");
            assert!(hop["ram"]["total"].as_u64() > Some(256 << 20), "{diag}");
            assert_eq!(
                rep[format!("status-source-before-{vm}")],
                "postmigrate",
                "{diag}"
            );
            assert_eq!(rep[format!("status-{vm}")], "running", "{diag}");
            assert_eq!(rep[format!("source-exit-before-{vm}")], 0, "{diag}");
            if vm == "c" {
                continue;
            }
            assert_eq!(
                rep[format!("source-remotes-gone-before-{vm}")],
                true,
                "{diag}"
            );
        }
        // B -> C handed B's remote over: the same process serves C (its
        // devices' state was never copied), outlives B, and C's own remote
        // is gone; B showed it handed over. Over tcp: it is refused.
        assert!(
            rep["handover-over-tcp"]
                .as_str()
                .unwrap_or("")
                .contains("needs a unix: URI"),
            "{diag}"
        );
        let handed = &rep["handed-pids-c"];
        assert!(handed.as_array().is_some_and(|a| !a.is_empty()), "{diag}");
        assert_eq!(&rep["remote-pids-c"], handed, "{diag}");
        assert!(
            rep["handed-alive-c"]
                .as_array()
                .is_some_and(|a| a.iter().all(|v| v == true)),
            "{diag}"
        );
        assert_eq!(
            rep["source-remote-states-before-c"],
            serde_json::json!(["handed-over"]),
            "{diag}"
        );
        assert_eq!(rep["own-remotes-gone-c"], true, "{diag}");
        assert!(
            rep["own-remote-pids-c"]
                .as_array()
                .is_some_and(|a| !a.is_empty()
                    && a.iter()
                        .all(|p| !handed.as_array().is_some_and(|h| h.contains(p)))),
            "{diag}"
        );
        assert!(stderr("c").contains("adopted with 2 devices"), "{diag}");
        assert_eq!(
            rep["source-remote-states-before-e"],
            serde_json::json!(["running"]),
            "{diag}"
        );
        // The hot-added function: a destination without it refuses the
        // stream clearly and the source runs on; the ones given it first
        // (`--incoming defer`) take the VM, D with the function in place.
        assert_eq!(rep["add-dma1"], serde_json::json!({}), "{diag}");
        assert_eq!(rep["status-waiting-n"], "inmigrate", "{diag}");
        assert!(
            rep["n-cont"]
                .as_str()
                .unwrap_or("")
                .contains("waits for its incoming migration"),
            "{diag}"
        );
        assert!(
            rep["n-again"]
                .as_str()
                .unwrap_or("")
                .contains("already been started"),
            "{diag}"
        );
        assert_eq!(rep["refused"]["status"], "failed", "{diag}");
        assert_eq!(rep["status-after-refused"], "running", "{diag}");
        assert_eq!(rep["n-exit"], 1, "{diag}");
        let n_stderr = stderr("n");
        assert!(
            n_stderr.contains("migrate-incoming tcp:127.0.0.1:4444")
                && n_stderr.contains("the snapshot's PCI functions (slot, id) are [(4, \"lsi0\"), (9, \"dma1\")], this VM's [(4, \"lsi0\")]"),
            "{n_stderr}\n{diag}"
        );
        for vm in ["c", "e", "d"] {
            assert_eq!(rep[format!("status-waiting-{vm}")], "inmigrate", "{diag}");
        }
        assert_eq!(
            rep["pci-d"],
            serde_json::json!(["host-bridge", "lsi0", "dma1"]),
            "{diag}"
        );
        assert_eq!(rep["snapshot"]["status"], "completed", "{diag}");
        assert_eq!(rep["status-after-snapshot"], "postmigrate", "{diag}");
        assert_eq!(rep["e-remotes-gone"], true, "{diag}");
        assert_eq!(rep["status-d"], "running", "{diag}");
        assert_eq!(r["host-exit"], 0, "{diag}");
        // The host image holds each slot's last block.
        let img = fs::read(dir.join("disk0.img")).unwrap();
        for slot in 0..SLOTS.min(rounds) {
            let last = slot + SLOTS * ((rounds - 1 - slot) / SLOTS);
            let at = (GUEST_OFF + slot * BLOCK) as usize;
            assert!(
                img[at..at + BLOCK as usize] == block(last)[..],
                "slot {slot} on the image is not the guest's round {last}:\n{diag}"
            );
        }
        let hop = |k: &str| {
            let h = &rep[k];
            format!(
                "{} ms total, {} ms down ({}), {} MiB sent in {} rounds",
                h["total-time"],
                h["downtime"],
                h["stop-and-copy"],
                h["ram"]["transferred"].as_u64().unwrap_or(0) >> 20,
                h["ram"]["dirty-sync-count"]
            )
        };
        eprintln!(
        "host_migrate: {rounds} rounds, per VM {per_vm:?}; tcp: {}; unix, remote handed over: {}; tcp: {}; snapshot: {}",
        hop("hop-b"),
        hop("hop-c"),
        hop("hop-e"),
        hop("snapshot")
    );
        fs::remove_dir_all(&dir).ok();
    });
}
