//! Chaos under disk I/O on the LSI (issue 13): one LSI53C895A controller
//! in a remote with two disks, a raw one and one with a file system, each
//! under a verified write/read workload of the guest's stock `sym53c8xx`
//! driver, while the remote is killed with SIGKILL at random moments 1-3 s
//! apart (`CHAOS_KILLS` times, default 10) and then hangs once (SIGSTOP
//! past its timeout). The remote has `restart = "on-failure"`.
//!
//! Unlike virtio-blk's, the LSI's state cannot stay current under I/O:
//! every command changes its registers and SCRIPTS' progress through guest
//! RAM. The VMM saved it while the guest left it alone (after the driver
//! set it up), and each restart brings it back from that stale save with
//! `resume-after-loss`: registers and SCRIPTS as the driver set them, then
//! a reset of the SCSI bus. The driver starts the chip up again and the
//! midlayer issues every outstanding command again (a write again with the
//! same data, a read again), so the reset is in the guest's log, once per
//! restart, and nothing else is.
//!
//! Checked as a user would: no I/O error in the guest, every direct read
//! of a chunk just written matches it, every file read back from the
//! file system (remounted, caches dropped) matches its checksum, the raw
//! image on the host holds exactly the last data the guest wrote to each
//! chunk, the guest's kernel log has no I/O error, abort or time-out, and
//! each restart resumed the controller.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::fs;
use std::path::Path;
use std::time::Duration;

use system_tests::{
    lsi_job_modules, output_field, output_number, prepare_vm, recovery_times, run_chaos,
};
use testenv::target_bin;

const QMP_SOCKET: &str = "/tmp/host-lsi-chaos/qmp.sock";
/// Chunks of 128 KiB the raw workload cycles through (4 MiB).
const CHUNKS: u64 = 32;
const IMAGE: u64 = 64 << 20;

fn config(kernel: &Path) -> String {
    format!(
        r#"[vm]
memory = "256M"
vcpus = 2
kernel = "{kernel}"
initrd = "initrd.cpio"
cmdline = "console=ttyS0 quiet"
console-log = "console.log"

[[remote]]
id = "svc"
log = "svc.log"
restart = "on-failure"
restart-limit = 100

[[device]]
id = "lsi0"
remote = "svc"
plugin = "lsi53c895a"
slot = 5

[[device.drive]]
file = "raw.img"
scsi-id = 0

[[device.drive]]
file = "fs.img"
scsi-id = 1
"#,
        kernel = kernel.display()
    )
}

/// Finds both disks by SCSI target, makes the file system, fills the
/// raw chunks once, leaves the disks alone (the VMM's save), then runs
/// both workloads until the driver's `go`; then verifies everything
/// from the disks and prints the counts.
fn guest_job() -> String {
    format!(
        r#"
raw=; fsd=
i=0
while [ -z "$raw" -o -z "$fsd" ] && [ $i -lt 600 ]; do
  for d in sda sdb; do
    [ -e /sys/block/$d/dev ] || continue
    [ -b /dev/$d ] || mknod /dev/$d b $(cut -d: -f1 /sys/block/$d/dev) $(cut -d: -f2 /sys/block/$d/dev)
    case "$(basename "$(readlink /sys/block/$d/device)")" in
      *:0:0:0) raw=$d ;;
      *:0:1:0) fsd=$d ;;
    esac
  done
  sleep 0.1; i=$((i+1))
done
[ -n "$raw" -a -n "$fsd" ] || {{ echo "disks missing: raw=$raw fs=$fsd"; dmesg | tail -30; exit 1; }}
CH={CHUNKS}
mke2fs -q -F /dev/$fsd 16384 || exit 4
mkdir -p /mnt /tmp/last /tmp/sums
mount -t ext2 /dev/$fsd /mnt || exit 5
c=0
while [ $c -lt $CH ]; do
  dd if=/dev/urandom of=/tmp/last/$c bs=64k count=2 2>/dev/null
  dd if=/tmp/last/$c of=/dev/$raw bs=64k seek=$((c*2)) count=2 oflag=direct conv=notrunc 2>/dev/null || exit 6
  c=$((c+1))
done
# The disks left alone for 3 s, a dozen heartbeat periods: the VMM saves
# the controller as the driver set it up, the save a crash in the
# middle of the I/O below comes back from.
sync
sleep 3
(
  n=0; ioerr=0; bad=0
  while [ ! -e /tmp/stop ]; do
    c=$((n % CH))
    dd if=/dev/urandom of=/tmp/w bs=64k count=2 2>/dev/null
    cp /tmp/w /tmp/last/$c
    dd if=/tmp/w of=/dev/$raw bs=64k seek=$((c*2)) count=2 oflag=direct conv=notrunc 2>/dev/null || {{ ioerr=$((ioerr+1)); echo "RAW WRITE ERROR chunk $c"; }}
    if dd if=/dev/$raw of=/tmp/r bs=64k skip=$((c*2)) count=2 iflag=direct 2>/dev/null; then
      cmp -s /tmp/w /tmp/r || {{ bad=$((bad+1)); echo "RAW MISMATCH chunk $c"; }}
    else
      ioerr=$((ioerr+1)); echo "RAW READ ERROR chunk $c"
    fi
    n=$((n+1))
  done
  echo "raw-rounds=$n raw-ioerr=$ioerr raw-bad=$bad" > /tmp/raw
) &
(
  n=0; err=0
  while [ ! -e /tmp/stop ]; do
    f=f$((n % 16))
    dd if=/dev/urandom of=/tmp/fw bs=64k count=4 2>/dev/null
    if dd if=/tmp/fw of=/mnt/$f bs=64k conv=fsync 2>/dev/null; then
      md5sum < /tmp/fw > /tmp/sums/$f
    else
      err=$((err+1)); echo "FS WRITE ERROR $f"
    fi
    n=$((n+1))
  done
  echo "fs-rounds=$n fs-err=$err" > /tmp/fs
) &
echo "STEP reading"
read -r -t 900 line || {{ echo "no go"; exit 20; }}
touch /tmp/stop
wait
cat /tmp/raw /tmp/fs
umount /mnt || exit 7
echo 3 > /proc/sys/vm/drop_caches
mount -t ext2 -o ro /dev/$fsd /mnt || exit 8
files=0; fsbad=0
for s in /tmp/sums/*; do
  f=${{s##*/}}
  [ "$(md5sum < /mnt/$f)" = "$(cat $s)" ] || {{ fsbad=$((fsbad+1)); echo "FS MISMATCH $f"; }}
  files=$((files+1))
done
umount /mnt
echo "fs-files=$files fs-bad=$fsbad"
c=0; : > /tmp/expect
while [ $c -lt $CH ]; do cat /tmp/last/$c >> /tmp/expect; c=$((c+1)); done
echo "raw-expect-md5=$(md5sum < /tmp/expect | cut -d' ' -f1)"
echo "raw-disk-md5=$(dd if=/dev/$raw bs=64k count=$((CH*2)) iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
pat='i/o error|blk_update|critical (target|medium)|EXT[234]-fs (error|warning)|hung task|timing out|abort|rejecting i/o|offline|FAILED Result'
echo "dmesg-errors=$(dmesg | grep -ciE "$pat")"
dmesg | grep -iE "$pat"
echo "bus-resets=$(dmesg | grep -c 'SCSI BUS reset detected')"
echo "unit-attentions=$(dmesg | grep -ciE 'power-on or device reset|bus reset occurred')"
dmesg | grep -iE 'reset' | tail -5
sync
echo "STEP done"
"#
    )
}

fn md5_of_head(image: &Path, bytes: u64) -> String {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c {bytes} '{}' | md5sum | cut -d' ' -f1",
            image.display()
        ))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn an_lsi_in_a_remote_killed_again_and_again_loses_no_write() {
    system_tests::guest_test("host_lsi_chaos", |env| {
        for bin in ["host", "remote-host", "liblsi53c895a.so"] {
            target_bin(bin).unwrap();
        }
        let job = guest_job();
        let spec = testenv::InitramfsSpec::new(&lsi_job_modules(), &job);
        let dir = prepare_vm(env, "host-lsi-chaos", &spec);
        fs::write(dir.join("vm.toml"), config(&env.kernel)).unwrap();
        for img in ["raw.img", "fs.img"] {
            fs::File::create(dir.join(img))
                .unwrap()
                .set_len(IMAGE)
                .unwrap();
        }
        let (run, out, kills) = run_chaos(
            env,
            "host_lsi_chaos",
            &dir,
            QMP_SOCKET,
            10,
            Duration::from_secs(180),
        );
        let (r, diag) = (&run.results, &run.diag);
        let field = |key: &str| output_field(&out, key, diag);
        let num = |key: &str| output_number(&out, key, diag);
        for key in [
            "raw-ioerr=",
            "raw-bad=",
            "fs-err=",
            "fs-bad=",
            "dmesg-errors=",
        ] {
            assert_eq!(num(key), 0, "{key} in the guest:\n{diag}");
        }
        let (raw_rounds, fs_rounds) = (num("raw-rounds="), num("fs-rounds="));
        assert!(
            raw_rounds > 10 && fs_rounds > 10 && num("fs-files=") > 0,
            "the workloads hardly ran:\n{diag}"
        );
        // The raw image on the host: the last data the guest wrote to each
        // chunk, as the guest also read it back from its disk.
        let expect = field("raw-expect-md5=");
        assert_eq!(
            field("raw-disk-md5="),
            expect,
            "the guest's disk differs from what it wrote:\n{diag}"
        );
        assert_eq!(
            md5_of_head(&dir.join("raw.img"), CHUNKS * 128 * 1024),
            expect,
            "the image on the host differs from what the guest wrote:\n{diag}"
        );
        let ms = recovery_times(r, kills, diag);
        // Every restart, the hang's included, brought the controller back
        // with its state: restored from a save still current (a kill while
        // the guest left it alone: the driver pauses 3 s after a bus
        // reset, its `settle_delay`), or resumed from a stale one (a kill
        // in the middle of the I/O). Never reset.
        let kept = r["replies"]["state-kept"].as_array().unwrap();
        let resumed = r["replies"]["state-resumed"].as_array().unwrap();
        assert_eq!(kept.len() as u64, kills + 1, "{diag}");
        assert_eq!(resumed.len() as u64, kills + 1, "{diag}");
        let has =
            |v: &serde_json::Value| v.as_array().is_some_and(|a| a.iter().any(|d| d == "lsi0"));
        let mut resumes = 0;
        for (k, s) in kept.iter().zip(resumed) {
            assert!(
                has(k) != has(s),
                "a restart brought the controller back reset, or twice (kept: {k}, resumed: {s}):\n{diag}"
            );
            resumes += u64::from(has(s));
        }
        assert!(
            resumes > 0,
            "no kill came in the middle of the I/O:\n{diag}"
        );
        assert_eq!(r["replies"]["hang"]["new-pid"], true, "{diag}");
        assert_eq!(r["host-exit"], 0, "{diag}");
        // What the guest saw: one SCSI bus reset per resume (two resumes
        // before the driver handled the first may fold into one).
        let resets = num("bus-resets=");
        assert!(
            resets >= 1 && resets <= resumes,
            "{resets} bus resets for {resumes} resumes:\n{diag}"
        );
        eprintln!(
            "host_lsi_chaos: {kills} kills ({resumes} restarts resumed a stale save, the others restored a current one), recovery p50 {} ms max {} ms; a hang recovered in {} ms; raw rounds {raw_rounds}, fs rounds {fs_rounds}, 0 errors, 0 mismatches; the guest saw {resets} SCSI bus resets and {} unit attentions",
            ms[ms.len() / 2],
            ms[ms.len() - 1],
            r["replies"]["hang"]["recovery-ms"],
            num("unit-attentions=")
        );
        fs::remove_dir_all(&dir).ok();
    });
}
