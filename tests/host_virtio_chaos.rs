//! Chaos under disk I/O (issue 13): two virtio-blk disks in one remote,
//! a raw one and one with a file system, each under a verified write/read
//! workload of the guest's stock `virtio_blk` driver, while the remote is
//! killed with SIGKILL at random moments 1-3 s apart (`CHAOS_KILLS`
//! times, default 10), then one disk's plugin panics (QMP
//! `x-device-control` `x-panic`: that disk comes back alone, in the same
//! remote process, its neighbour untouched), and then the remote hangs
//! once (SIGSTOP past its timeout). The
//! remote has `restart = "on-failure"`: it comes back by itself, and each
//! disk comes back as it was, not reset (virtio-blk's saved state
//! outlives its doorbells, so the state the VMM saved after the driver set
//! the device up is still current in the middle of the I/O; the restored
//! device takes where it stands in each ring from the used ring).
//!
//! Checked as a user would: no I/O error in the guest, every direct read
//! of a chunk just written matches it, every file read back from the
//! file system (remounted, caches dropped) matches its checksum, the raw
//! image on the host holds exactly the last data the guest wrote to each
//! chunk, the guest's kernel log has no I/O error, and each restart kept
//! both disks' state.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::fs;
use std::path::Path;
use std::time::Duration;

use system_tests::{
    output_field, output_number, prepare_vm, recovery_times, run_chaos, VIRTIO_BLK_MODULES,
};
use testenv::target_bin;

const QMP_SOCKET: &str = "/tmp/host-virtio-chaos/qmp.sock";
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
id = "vd0"
remote = "svc"
plugin = "virtio-blk"
slot = 5
file = "raw.img"
serial = "RAW"

[[device]]
id = "vd1"
remote = "svc"
plugin = "virtio-blk"
slot = 6
file = "fs.img"
serial = "FS"
"#,
        kernel = kernel.display()
    )
}

/// Finds both disks by serial number, makes the file system, fills the
/// raw chunks once, then runs both workloads until the driver's `go`;
/// then verifies everything from the disks and prints the counts.
fn guest_job() -> String {
    format!(
        r#"
raw=; fsd=
i=0
while [ -z "$raw" -o -z "$fsd" ] && [ $i -lt 600 ]; do
  for d in vda vdb; do
    [ -e /sys/block/$d/dev ] || continue
    [ -b /dev/$d ] || mknod /dev/$d b $(cut -d: -f1 /sys/block/$d/dev) $(cut -d: -f2 /sys/block/$d/dev)
    case "$(cat /sys/block/$d/serial 2>/dev/null)" in
      RAW) raw=$d ;;
      FS) fsd=$d ;;
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
pat='i/o error|blk_update|critical (target|medium)|EXT[234]-fs (error|warning)|virtio.*(error|reset|broken)|hung task'
echo "dmesg-errors=$(dmesg | grep -ciE "$pat")"
dmesg | grep -iE "$pat"
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
fn disks_in_a_remote_killed_again_and_again_lose_no_write() {
    system_tests::guest_test("host_virtio_chaos", |env| {
        for bin in ["host", "remote-host", "libvirtio_blk.so"] {
            target_bin(bin).unwrap();
        }
        let mut modules = VIRTIO_BLK_MODULES.to_vec();
        modules.extend(["crc16", "mbcache", "jbd2", "crc32c_generic", "ext4"]);
        let job = guest_job();
        let spec = testenv::InitramfsSpec::new(&modules, &job);
        let dir = prepare_vm(env, "host-virtio-chaos", &spec);
        fs::write(dir.join("vm.toml"), config(&env.kernel)).unwrap();
        for img in ["raw.img", "fs.img"] {
            fs::File::create(dir.join(img))
                .unwrap()
                .set_len(IMAGE)
                .unwrap();
        }
        // After the kills, vd1's plugin panics once (tests/chaos_driver.py).
        fs::write(dir.join("chaos-panic"), "vd1").unwrap();
        let (run, out, kills) = run_chaos(
            env,
            "host_virtio_chaos",
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
        // Every restart, the hang's included, brought both disks back with
        // their state.
        let kept = r["replies"]["state-kept"].as_array().unwrap();
        assert_eq!(kept.len() as u64, kills + 1, "{diag}");
        for k in kept {
            let ids: Vec<&str> = k
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            assert!(
                ids.contains(&"vd0") && ids.contains(&"vd1"),
                "a restart brought a disk back reset (state kept: {k}):\n{diag}"
            );
        }
        assert_eq!(r["replies"]["hang"]["new-pid"], true, "{diag}");
        // The plugin panic: vd1 came back alone, its state kept, in the
        // same remote process (vd0 never stopped).
        let p = &r["replies"]["panic"];
        assert!(
            p["reply"].as_str().unwrap_or_default().contains("x-panic"),
            "the panic's own message is the op's error: {p}\n{diag}"
        );
        assert_eq!(p["device"], "vd1", "{diag}");
        assert_eq!(p["state-kept"], true, "{diag}");
        assert_eq!(p["same-pid"], true, "{diag}");
        assert_eq!(p["remote-restarts"], 0, "{diag}");
        assert_eq!(r["host-exit"], 0, "{diag}");
        eprintln!(
        "host_virtio_chaos: {kills} kills, recovery p50 {} ms max {} ms; a hang recovered in {} ms; a plugin panic in {} ms; raw rounds {raw_rounds}, fs rounds {fs_rounds}, 0 errors, 0 mismatches",
        ms[ms.len() / 2],
        ms[ms.len() - 1],
        r["replies"]["hang"]["recovery-ms"],
        p["recovery-ms"]
    );
        fs::remove_dir_all(&dir).ok();
    });
}
