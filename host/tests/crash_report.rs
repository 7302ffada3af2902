//! A guest that crashes gets a crash report on `host run`'s standard
//! error: every vCPU's registers, each vCPU's last exits with the VMM's
//! time on them, and the console's tail. The guest is a 15-byte ELF
//! "kernel" of our own, run on this machine's `/dev/kvm`: it prints "oops"
//! on the serial console, writes 0x42 to port 0x80, reads the unmapped MMIO address 0xd000_0000 (all-ones), and
//! executes `ud2` with an empty IDT: #UD, #GP, double fault, triple fault.

#![allow(clippy::unwrap_used, clippy::panic)]

#[path = "support/prerequisites.rs"]
#[allow(dead_code)]
mod prerequisites;

use std::path::Path;
use std::process::Command;

/// Where the ELF loads and starts.
const ENTRY: u64 = 0x20_0000;
/// Where its code starts in the file.
const CODE_OFFSET: usize = 0x80;

/// `"oops\n"` to COM1, `mov al,0x42; out 0x80,al; mov eax,[0xd0000000];
/// ud2`, and the address of the `ud2`.
fn code() -> (Vec<u8>, u64) {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for b in b"oops\n" {
        c.extend_from_slice(&[0xb0, *b, 0xee]); // mov al, b; out dx, al
    }
    c.extend_from_slice(&[0xb0, 0x42, 0xe6, 0x80, 0xa1]);
    c.extend_from_slice(&0xd000_0000u64.to_le_bytes());
    let ud2 = ENTRY + c.len() as u64;
    c.extend_from_slice(&[0x0f, 0x0b]);
    (c, ud2)
}

/// An ELF64 executable with one loadable segment holding `code` at
/// [`ENTRY`].
fn elf(code: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF\x02\x01\x01\x00");
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&ENTRY.to_le_bytes());
    f.extend_from_slice(&64u64.to_le_bytes()); // program headers
    f.extend_from_slice(&0u64.to_le_bytes()); // no sections
    f.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 64, 0, 0] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f.extend_from_slice(&5u32.to_le_bytes()); // R+X
    f.extend_from_slice(&(CODE_OFFSET as u64).to_le_bytes());
    f.extend_from_slice(&ENTRY.to_le_bytes());
    f.extend_from_slice(&ENTRY.to_le_bytes());
    f.extend_from_slice(&(code.len() as u64).to_le_bytes());
    f.extend_from_slice(&(code.len() as u64).to_le_bytes());
    f.extend_from_slice(&0x1000u64.to_le_bytes());
    f.resize(CODE_OFFSET, 0);
    f.extend_from_slice(code);
    f
}

fn run_host(dir: &Path, profile: &Path) -> (Option<i32>, String, String) {
    let out = Command::new(profile.join("host"))
        .current_dir(dir)
        .args(["run", "vm.toml"])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_triple_fault_prints_registers_last_exits_and_console() {
    let Some(profile) = prerequisites::or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (code, ud2) = code();
    std::fs::write(dir.path().join("crash.elf"), elf(&code)).unwrap();
    std::fs::write(
        dir.path().join("vm.toml"),
        "[vm]\nmemory = \"64M\"\nvcpus = 2\nkernel = \"crash.elf\"\n",
    )
    .unwrap();
    let (status, stdout, stderr) = run_host(dir.path(), &profile);
    assert!(stdout.contains("oops"), "the console: {stdout}");
    assert_eq!(status, Some(3), "a triple fault exits with 3:\n{stderr}");
    assert!(
        stderr.contains("host: crash report: TripleFault"),
        "{stderr}"
    );
    let section = |name: &str| -> String {
        let start = stderr
            .find(name)
            .unwrap_or_else(|| panic!("no `{name}`:\n{stderr}"));
        let rest = &stderr[start + name.len()..];
        rest[..rest.find("\n---").unwrap_or(rest.len())].to_owned()
    };
    // The boot vCPU's exits: the port write and the MMIO read, with the
    // value the guest got.
    let exits = section("--- vCPU 0 last exits");
    let out_line = exits
        .lines()
        .find(|l| l.contains("pio-out") && l.contains("addr=0x00000080"))
        .unwrap_or_else(|| panic!("no write to port 0x80:\n{exits}"));
    assert!(out_line.contains("data=0x42"), "{out_line}");
    let read = exits
        .lines()
        .find(|l| l.contains("mmio-read"))
        .unwrap_or_else(|| panic!("no MMIO read:\n{exits}"));
    assert!(
        read.contains("addr=0xd0000000") && read.contains("data=0xffffffff"),
        "{read}"
    );
    // Registers of both vCPUs. On Intel and on this machine's PVM the
    // crashed vCPU still shows where it was (on AMD, KVM re-initializes it
    // at the shutdown: docs/host.md); the second vCPU never started and
    // was stopped to be read.
    let regs0 = section("--- vCPU 0 registers");
    assert!(regs0.contains("rip="), "{regs0}");
    if !regs0.contains("rip=0x000000000000fff0") {
        assert!(
            regs0.contains(&format!("rip={ud2:#018x}")),
            "vCPU 0 stopped at the ud2 ({ud2:#x}):\n{regs0}"
        );
        assert!(regs0.contains("rax=0x00000000ffffffff"), "{regs0}");
    }
    let regs1 = section("--- vCPU 1 registers");
    assert!(
        regs1.contains("stopped after the crash") && regs1.contains("rip="),
        "{regs1}"
    );
    let console = section("--- console");
    assert!(console.contains("  | oops"), "{console}");
}

/// One QMP exchange on `stream`: sends `cmd`, returns the reply's line
/// (events before it are skipped).
fn qmp(
    stream: &mut std::os::unix::net::UnixStream,
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    cmd: &str,
) -> serde_json::Value {
    use std::io::Write;
    stream.write_all(cmd.as_bytes()).unwrap();
    stream.write_all(b"\n").unwrap();
    loop {
        let line = lines.next().unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v.get("return").is_some() || v.get("error").is_some() {
            return v;
        }
    }
}

#[test]
fn a_guest_that_went_quiet_is_reported_on_request_and_runs_on() {
    use std::io::BufRead;
    use std::time::{Duration, Instant};
    let Some(profile) = prerequisites::or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // "oops", the port write, then a loop on itself: a guest that runs
    // without a word or an exit.
    let (mut code, ud2) = code();
    code.truncate((ud2 - ENTRY) as usize - 9); // before the MMIO read (9 bytes)
    let spin = ENTRY + code.len() as u64;
    code.extend_from_slice(&[0xeb, 0xfe]); // jmp $
    std::fs::write(dir.path().join("quiet.elf"), elf(&code)).unwrap();
    std::fs::write(
        dir.path().join("vm.toml"),
        "[vm]\nmemory = \"64M\"\nvcpus = 2\nkernel = \"quiet.elf\"\nconsole-log = \"console.log\"\n",
    )
    .unwrap();
    let sock = dir.path().join("qmp.sock");
    let mut host = Command::new(profile.join("host"))
        .current_dir(dir.path())
        .args(["run", "vm.toml", "--qmp"])
        .arg(&sock)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut stream = loop {
        match std::os::unix::net::UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < deadline, "no QMP socket: {e}");
                assert!(host.try_wait().unwrap().is_none(), "host ended early");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut lines = std::io::BufReader::new(stream.try_clone().unwrap()).lines();
    lines.next().unwrap().unwrap(); // the greeting
    qmp(
        &mut stream,
        &mut lines,
        r#"{"execute": "qmp_capabilities"}"#,
    );
    // Wait until the guest has printed, then ask.
    let console = dir.path().join("console.log");
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("oops")
    {
        assert!(Instant::now() < deadline, "the guest never printed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let reply = qmp(&mut stream, &mut lines, r#"{"execute": "x-debug-report"}"#);
    let report = reply["return"]["report"]
        .as_str()
        .unwrap_or_else(|| panic!("{reply}"));
    assert!(
        report.starts_with("host: debug report: requested (QMP x-debug-report)\n"),
        "{report}"
    );
    // vCPU 0 is in its loop, read on request; its last exit is the port
    // write.
    let regs0 = report
        .split("--- vCPU 0 registers")
        .nth(1)
        .and_then(|r| r.split("\n---").next())
        .unwrap_or_else(|| panic!("{report}"));
    assert!(regs0.contains("(read on request)"), "{regs0}");
    assert!(regs0.contains(&format!("rip={spin:#018x}")), "{regs0}");
    assert!(
        report.contains("pio-out    addr=0x00000080 len=1 data=0x42"),
        "{report}"
    );
    assert!(report.contains("  | oops"), "{report}");
    // The guest runs on: not held, and a second report is fresh.
    let status = qmp(&mut stream, &mut lines, r#"{"execute": "query-status"}"#);
    assert_eq!(status["return"]["status"], "running", "{status}");
    let again = qmp(&mut stream, &mut lines, r#"{"execute": "x-debug-report"}"#);
    assert!(
        again["return"]["report"]
            .as_str()
            .is_some_and(|r| r.contains(&format!("rip={spin:#018x}"))),
        "{again}"
    );
    qmp(&mut stream, &mut lines, r#"{"execute": "quit"}"#);
    let out = host.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
