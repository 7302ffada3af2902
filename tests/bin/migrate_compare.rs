//! `migrate-compare`: live migration of the same guest (256 MiB, 2 vCPUs,
//! the same initramfs and disk image) over TCP on loopback, by our VMM
//! (`host`: the LSI in a remote; the destination has its own remote; the
//! same over a UNIX socket, `unix`, and with the remote handed over to the
//! destination instead of its devices' state copied, `handover`), by
//! our VMM with the LSI in its own process (`inproc`) and by QEMU 7.2 with
//! its in-process LSI (the anchors), under a real KVM: run it
//! inside the nested-KVM L1 (`scripts/bench-migrate`). Each is migrated
//! twice: while the guest is idle, and while it writes 64 KiB blocks with
//! direct I/O. The table gives `query-migrate`'s total time, downtime
//! (vCPUs stopped to running again) and bytes sent; then QEMU's answer
//! when its multi-process pair is asked to migrate.
//! `MIGRATE_COMPARE_JSON` names a file for the table as JSON.

use std::fs;
use std::path::Path;
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use system_tests::bench::sibling_bin;
use system_tests::{
    in_process_lsi_config, lsi_job_modules, make_lsi_image, python_with_qemu_qmp,
    remote_lsi_config, wait_for_disk,
};
use testenv::{Env, InitramfsSpec, ModuleOrder};

const MEMORY_MIB: u32 = 256;

/// Idle for a minute (the first migration), then direct 64 KiB writes
/// until the VM is killed.
fn job() -> String {
    wait_for_disk("sda")
        + r#"
echo "STEP idle"
sleep 60
echo "STEP io"
i=0
while [ $i -lt 1000000 ]; do
    dd if=/dev/zero of=/dev/sda bs=64k seek=$(( 256 + i % 256 )) count=1 oflag=direct conv=notrunc 2>/dev/null
    echo "io $i"
    i=$((i + 1))
done
"#
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("migrate-compare: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let env = Env::load_default()?;
    let dir = testenv::workspace_root()
        .join("target")
        .join(format!("migrate-compare-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let mut spec = InitramfsSpec::new(&lsi_job_modules(), &job());
    spec.order = ModuleOrder::Exact;
    let initrd = dir.join("initrd.cpio");
    env.build_initramfs(&spec, &initrd)?;
    let image = dir.join("disk0.img");
    make_lsi_image(&image);
    for name in ["a", "b", "c"] {
        fs::write(
            dir.join(format!("vm-{name}.toml")),
            remote_lsi_config(&env.kernel, MEMORY_MIB, &format!("host-{name}")),
        )?;
        fs::write(
            dir.join(format!("vm-inproc-{name}.toml")),
            in_process_lsi_config(&env.kernel, MEMORY_MIB, &format!("inproc-{name}")),
        )?;
        for kind in ["unix", "handover"] {
            fs::write(
                dir.join(format!("vm-{kind}-{name}.toml")),
                remote_lsi_config(&env.kernel, MEMORY_MIB, &format!("{kind}-{name}")),
            )?;
        }
    }
    fs::copy(dir.join("vm-a.toml"), dir.join("vm.toml"))?;
    fs::write(
        dir.join("bench.json"),
        serde_json::json!({
            "kernel": env.kernel, "initrd": initrd, "image": image, "memory_mib": MEMORY_MIB,
        })
        .to_string(),
    )?;
    let sock_dir = Path::new("/tmp/migrate-compare");
    fs::create_dir_all(sock_dir)?;
    let driver = testenv::workspace_root().join("tests/migrate_bench.py");
    let results = dir.join("results.json");
    let status = Command::new(python_with_qemu_qmp())
        .arg(&driver)
        .arg(sibling_bin("host")?)
        .arg(dir.join("vm.toml"))
        .arg(sock_dir.join("qmp.sock"))
        .arg(dir.join("console.log"))
        .arg(&results)
        .status()
        .context("running tests/migrate_bench.py")?;
    let r: serde_json::Value = serde_json::from_str(&fs::read_to_string(&results)?)?;
    if !status.success() {
        bail!(
            "the driver failed ({status}): {}; the work directory {} is kept",
            r["failure"],
            dir.display()
        );
    }
    let rep = &r["replies"];
    println!("migrate-compare: {MEMORY_MIB} MiB guest, TCP on loopback, downtime-limit 300 ms\n");
    println!(
        "{:<12} {:>9} {:>12} {:>9} {:>7}   where our downtime went (ms)",
        "", "total ms", "downtime ms", "MiB sent", "rounds"
    );
    let n = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    for key in [
        "host-idle",
        "unix-idle",
        "handover-idle",
        "inproc-idle",
        "qemu-idle",
        "host-io",
        "unix-io",
        "handover-io",
        "inproc-io",
        "qemu-io",
    ] {
        let m = &rep[key];
        let s = &m["stop-and-copy"];
        let mut phases = if s.is_object() {
            format!(
                "devices {:.0}, last RAM {:.0}, destination {:.0}",
                n(&s["devices-ms"]),
                n(&s["ram-ms"]),
                n(&s["acknowledged-ms"])
            )
        } else {
            String::new()
        };
        if m.get("adopted-ms").is_some() {
            // After the source's go, before the guest runs there.
            phases += &format!(", then adopting the remote {:.0}", n(&m["adopted-ms"]));
        }
        println!(
            "{:<12} {:>9.0} {:>12.0} {:>9.1} {:>7}   {phases}",
            key,
            n(&m["total-ms"]),
            n(&m["downtime-ms"]),
            n(&m["bytes"]) / (1 << 20) as f64,
            m["rounds"]
        );
    }
    println!("\nQEMU's multi-process pair: {}", rep["qemu-mp"]);
    if let Ok(out) = std::env::var("MIGRATE_COMPARE_JSON") {
        fs::write(&out, serde_json::to_string_pretty(rep)?)?;
    }
    if std::env::var_os("MIGRATE_COMPARE_KEEP").is_none_or(|v| v.is_empty()) {
        fs::remove_dir_all(&dir).ok();
    }
    Ok(())
}
