//! A slow device may make the guest slow; it may never make it crash.
//!
//! The shared LSI guest job runs behind our VMM with the LSI plugin in a
//! spawned `remote-host`, under deliberate starvation, for several rounds
//! in one L1 boot:
//! - a CPU hog inside L1 and one on this machine beside L1;
//! - bursts of SIGSTOP/SIGCONT (0.1–0.5 s, shorter than the remote's
//!   supervision timeout of 5 s) on the remote, on the VMM, or on both,
//!   every 0.2–1 s for the whole run;
//! - a disk that answers slowly (`delay-us`, changing per round).
//!
//! Every round must end with the guest's job passing, its write in the
//! image byte for byte and the host's data read back, and `host` exiting
//! 0. A round that fails prints the VMM's crash report (registers, last
//! exits, console tail).
//!
//! `STRESS_ROUNDS` (default 2) sets the number of rounds;
//! `scripts/stress-lsi` runs more.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use system_tests::{check_lsi_disk_job, lsi_disk_job, make_lsi_image, prepare_lsi_vm};
use testenv::{parse_console, target_bin, NestedOptions};

/// Disk delay of round `r` (µs per read, write and flush).
fn delay_us(r: usize) -> u64 {
    [20_000, 0, 2_000][r % 3]
}

fn config(kernel: &Path, r: usize) -> String {
    format!(
        r#"[vm]
memory = "512M"
vcpus = 2
kernel = "{kernel}"
initrd = "initrd.cpio"
cmdline = "console=ttyS0"
console-log = "r{r}-console.log"

[[remote]]
id = "storage"
log = "r{r}-remote.log"
# Stop bursts last at most 0.5 s: well inside this timeout, so the
# remote must never be declared hung.
timeout-ms = 5000

[[device]]
id = "lsi0"
remote = "storage"
plugin = "lsi53c895a"
slot = 4

[[device.drive]]
file = "r{r}.img"
scsi-id = 0
delay-us = {delay}
"#,
        kernel = kernel.display(),
        delay = delay_us(r),
    )
}

/// The shell of one round inside L1: `host run` in the background, and
/// while it runs, SIGSTOP/SIGCONT bursts on the remote, the VMM or both.
fn round_script(host: &Path, dir: &Path, r: usize) -> String {
    format!(
        r#"
HOST_STATS=1 timeout 900 {host} run {cfg} > {dir}/r{r}-host.out 2>&1 &
tp=$!
stops=0
while kill -0 $tp 2>/dev/null; do
    sleep 0.$((RANDOM % 8 + 2))
    vmm=$(pgrep -x host | head -n 1)
    rem=$(pgrep -x remote-host | head -n 1)
    case $((RANDOM % 3)) in
        0) t="$rem" ;;
        1) t="$vmm" ;;
        *) t="$rem $vmm" ;;
    esac
    t=$(echo $t)
    [ -n "$t" ] || continue
    kill -STOP $t 2>/dev/null
    sleep 0.$((RANDOM % 5 + 1))
    kill -CONT $t 2>/dev/null
    stops=$((stops + 1))
done
wait $tp
echo "ROUND-{r}-EXIT=$? STOP-BURSTS=$stops"
"#,
        host = host.display(),
        cfg = dir.join(format!("r{r}.toml")).display(),
        dir = dir.display(),
    )
}

#[test]
fn a_starved_remote_lsi_never_crashes_the_guest() {
    system_tests::guest_test("host_stress", |env| {
        let rounds: usize = std::env::var("STRESS_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2)
            .max(1);
        let t0 = Instant::now();
        // The shared job, with a longer wait for sda: under this load the
        // guest may take minutes to probe it, and that is not what is tested.
        let job = lsi_disk_job().replace("-lt 600 ]", "-lt 3000 ]");
        let dir = prepare_lsi_vm(env, "host-stress", &job);
        let host = target_bin("host").unwrap();
        let mut script = String::from("yes > /dev/null & hog=$!\n");
        for r in 0..rounds {
            make_lsi_image(&dir.join(format!("r{r}.img")));
            fs::write(dir.join(format!("r{r}.toml")), config(&env.kernel, r)).unwrap();
            script.push_str(&round_script(&host, &dir, r));
        }
        script.push_str("kill $hog\n");
        let opts = NestedOptions {
            name: "host_stress".into(),
            timeout: Duration::from_secs(300 + 900 * rounds as u64),
            ..Default::default()
        };
        // A hog on this machine too, beside L1, for as long as L1 runs.
        let stop = Arc::new(AtomicBool::new(false));
        let hog = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })
        };
        let l1 = env.run_nested(&["bash".into(), "-c".into(), script], &opts);
        stop.store(true, Ordering::Relaxed);
        hog.join().unwrap();
        let l1 = l1.unwrap();
        eprintln!("--- L1 output ---\n{}", l1.output);
        for r in 0..rounds {
            let host_out =
                fs::read_to_string(dir.join(format!("r{r}-host.out"))).unwrap_or_default();
            let console =
                fs::read_to_string(dir.join(format!("r{r}-console.log"))).unwrap_or_default();
            let exit_line = l1
                .output
                .lines()
                .find(|l| l.starts_with(&format!("ROUND-{r}-EXIT=")))
                .unwrap_or_else(|| panic!("round {r} did not finish:\n{}", l1.output));
            eprintln!(
                "host_stress: round {r} (disk delay {} µs): {exit_line}",
                delay_us(r)
            );
            let Some(job) = parse_console(&console) else {
                panic!(
                "round {r}: no job result in the console\n--- host ---\n{host_out}\n--- console tail ---\n{}",
                tail(&console, 60)
            );
            };
            assert!(
            exit_line.starts_with(&format!("ROUND-{r}-EXIT=0 ")),
            "round {r}: host did not exit 0 ({exit_line})\n--- host ---\n{host_out}\n--- job ---\n{}",
            job.output
        );
            check_lsi_disk_job(&job, &dir.join(format!("r{r}.img")));
            assert!(!host_out.contains("crash report"), "round {r}:\n{host_out}");
            let stats: Vec<&str> = host_out
                .lines()
                .filter(|l| l.starts_with("host-stats:"))
                .collect();
            eprintln!("{}", stats.join("\n"));
        }
        eprintln!(
            "host_stress: {rounds} rounds passed in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        fs::remove_dir_all(&dir).ok();
    });
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
