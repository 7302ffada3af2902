//! What the benchmark binaries (`lsi-compare`, `virtio-compare`) share:
//! the processes they start and the CPU those use, read from /proc.

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command};

use anyhow::{bail, Context, Result};

/// CPU time (user + system) of process `pid`, from /proc; 0 when gone.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) in parentheses.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat: 12 and 13 here.
    // SAFETY: sysconf with a valid name.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) / hz
}

/// Interrupts between CPUs so far, summed over the CPUs (/proc/interrupts):
/// rescheduling, function calls and TLB shootdowns. Inside L1 each one
/// that reaches a CPU running a guest forces a world switch, the moment
/// the emulated SVM mishandles (docs/testenv.md); a benchmark prints them
/// per guest to compare VMMs by how often they cause them.
#[derive(Debug, Default, Clone, Copy)]
pub struct Ipis {
    pub resched: u64,
    pub call: u64,
    pub tlb: u64,
}

impl Ipis {
    pub fn now() -> Ipis {
        let text = fs::read_to_string("/proc/interrupts").unwrap_or_default();
        let mut ipis = Ipis::default();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            let Some(name) = words.next() else { continue };
            let sum: u64 = words.map_while(|w| w.parse::<u64>().ok()).sum();
            match name {
                "RES:" => ipis.resched = sum,
                "CAL:" => ipis.call = sum,
                "TLB:" => ipis.tlb = sum,
                _ => {}
            }
        }
        ipis
    }

    /// What happened since `before`, as a line per second of `secs`.
    pub fn since(self, before: Ipis, secs: f64) -> String {
        let per = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs.max(0.001);
        format!(
            "resched {:.0}/s, call {:.0}/s, tlb {:.0}/s",
            per(self.resched, before.resched),
            per(self.call, before.call),
            per(self.tlb, before.tlb)
        )
    }
}

/// The processes named `comm` whose parent is `parent`.
pub fn children_named(parent: u32, comm: &str) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let tag = format!("({comm})");
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
            stat.contains(&tag) && after.split_whitespace().nth(1) == Some(&parent.to_string())
        })
        .collect()
}

/// The remote-host processes `host` (pid `vmm`) spawned.
pub fn remotes_of(vmm: u32) -> Vec<u32> {
    children_named(vmm, "remote-host")
}

/// Kills a helper process when dropped.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Makes `fd` inheritable by the next exec (clears CLOEXEC).
pub fn inheritable(fd: &OwnedFd) -> Result<i32> {
    let n = fd.as_raw_fd();
    // SAFETY: F_SETFD on an fd this process owns.
    if unsafe { libc::fcntl(n, libc::F_SETFD, 0) } < 0 {
        bail!("fcntl: {}", std::io::Error::last_os_error());
    }
    Ok(n)
}

/// Spawns `cmd` with `fd` inherited as fd 3.
pub fn spawn_with_fd3(cmd: &mut Command, fd: OwnedFd) -> Result<Child> {
    testenv::inherit_as_fd3(cmd, fd.as_raw_fd());
    let child = cmd.spawn().context("spawning the device process")?;
    drop(fd);
    Ok(child)
}

/// A binary built beside the running one (target/<profile>/NAME).
pub fn sibling_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.with_file_name(name);
    if !p.is_file() {
        bail!("{} not found: build the workspace first", p.display());
    }
    Ok(p)
}

/// `TIME name start end` lines (guest uptime seconds) of a job's output:
/// each name with its duration.
pub fn parse_times(output: &str) -> Vec<(String, f64)> {
    output
        .lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("TIME ")?.split_whitespace();
            let name = w.next()?.to_string();
            let s: f64 = w.next()?.parse().ok()?;
            let e: f64 = w.next()?.parse().ok()?;
            Some((name, e - s))
        })
        .collect()
}

/// The start of a timed guest job on block device `dev` (`sda`, `vda`):
/// waits up to a minute for the device (making its node if devtmpfs did
/// not), and defines `now` (guest uptime) and `run NAME CMD...`, which
/// runs CMD and prints `TIME NAME START END` ([`parse_times`]); a failed
/// command ends the job with status 2.
pub fn timed_job_prologue(dev: &str) -> String {
    format!(
        r#"
i=0
while [ ! -b /dev/{dev} ] && [ $i -lt 600 ]; do
    [ -e /sys/block/{dev}/dev ] && mknod /dev/{dev} b $(cut -d: -f1 /sys/block/{dev}/dev) $(cut -d: -f2 /sys/block/{dev}/dev)
    sleep 0.1; i=$((i+1))
done
[ -b /dev/{dev} ] || {{ echo "no /dev/{dev}"; exit 1; }}
now() {{ cut -d' ' -f1 /proc/uptime; }}
run() {{ name=$1; shift; s=$(now); "$@" 2>/dev/null || exit 2; e=$(now); echo "TIME $name $s $e"; }}
"#
    )
}

/// QEMU arguments that put a guest's `mib` MiB of RAM in a shared memfd,
/// which vhost-user and multi-process devices need.
pub fn shared_ram_args(mib: u32) -> Vec<String> {
    vec![
        "-object".into(),
        format!("memory-backend-memfd,id=mem,size={mib}M,share=on"),
        "-machine".into(),
        "memory-backend=mem".into(),
    ]
}

/// CPU the processes `pids()` lists used during each timed job of a guest
/// (the VMM and its remotes, or QEMU): a thread watches the console file
/// for a job's `BEGIN NAME` line and its `TIME NAME ...` line
/// ([`timed_job_prologue`]'s `run`) and samples /proc at each. The guest
/// pauses after `BEGIN` (0.3 s in the jobs that use it) so that the first
/// sample comes before the I/O; the second one may come up to one poll
/// (20 ms) late, which adds that much idle time.
pub struct JobCpuWatch {
    result: std::sync::Arc<std::sync::Mutex<Vec<(String, f64)>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl JobCpuWatch {
    /// Watches `console`; `pids()` lists the processes to sample.
    pub fn start(console: PathBuf, pids: impl Fn() -> Vec<u32> + Send + 'static) -> JobCpuWatch {
        use std::sync::atomic::Ordering;
        let result = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (r, s) = (result.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let cpu = |p: &[u32]| p.iter().map(|&p| cpu_seconds(p)).sum::<f64>();
            // Jobs begun and not yet timed: name, processes, CPU at BEGIN.
            let mut open: Vec<(String, Vec<u32>, f64)> = Vec::new();
            let mut lines_seen = 0;
            while !s.load(Ordering::Relaxed) {
                let text = fs::read_to_string(&console).unwrap_or_default();
                // Only whole lines (the last may still be being written).
                let whole = text.rsplit_once('\n').map_or("", |(w, _)| w);
                let lines: Vec<&str> = whole.lines().collect();
                for l in lines.iter().skip(lines_seen) {
                    if let Some(name) = l.trim().strip_prefix("BEGIN ") {
                        let p = pids();
                        let c = cpu(&p);
                        open.push((name.trim().to_string(), p, c));
                    } else if let Some(rest) = l.trim().strip_prefix("TIME ") {
                        let name = rest.split_whitespace().next().unwrap_or("");
                        if let Some(i) = open.iter().position(|(n, _, _)| n == name) {
                            let (n, p, c0) = open.remove(i);
                            let mut out = r.lock().unwrap_or_else(|e| e.into_inner());
                            out.push((n, cpu(&p) - c0));
                        }
                    }
                }
                lines_seen = lines.len().max(lines_seen);
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        });
        JobCpuWatch {
            result,
            stop,
            thread: Some(thread),
        }
    }

    /// CPU seconds per job, for the jobs seen begun and timed.
    pub fn finish(mut self) -> Vec<(String, f64)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.result.lock().unwrap_or_else(|e| e.into_inner()))
    }
}
