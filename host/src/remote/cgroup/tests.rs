//! The cgroup plans against plain directories standing in for the
//! hierarchies (the real one is tested in `host/tests/proxy.rs`).

use super::*;

fn limits() -> ResourceLimits {
    ResourceLimits {
        memory_bytes: Some(256 << 20),
        cpu_percent: Some(150),
        tasks: Some(64),
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap()
}

/// A v1 hierarchy as this machine has: a directory per controller, the
/// VMM in a memory cgroup of its own and at the root of the others.
#[test]
fn v1_limits_go_to_each_controllers_directory() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    for c in ["memory", "cpu", "pids"] {
        std::fs::create_dir_all(r.join(c)).unwrap();
        std::fs::write(r.join(c).join("cgroup.procs"), "").unwrap();
    }
    std::fs::create_dir_all(r.join("memory/jobs/vm1")).unwrap();
    let own = "9:name=systemd:/\n8:pids:/\n4:memory:/jobs/vm1\n2:cpu,cpuacct:/\n0::/\n";
    let cg = RemoteCgroup::create_in(r, own, "host-1-disk-0", &limits()).unwrap();
    let (mem, cpu, pids) = (
        r.join("memory/jobs/vm1/host-1-disk-0"),
        r.join("cpu/host-1-disk-0"),
        r.join("pids/host-1-disk-0"),
    );
    assert_eq!(cg.dirs(), [mem.clone(), cpu.clone(), pids.clone()]);
    assert_eq!(read(&mem.join("memory.limit_in_bytes")), "268435456");
    assert_eq!(read(&cpu.join("cpu.cfs_period_us")), "100000");
    assert_eq!(read(&cpu.join("cpu.cfs_quota_us")), "150000");
    assert_eq!(read(&pids.join("pids.max")), "64");
    assert_eq!(cg.procs_fds().len(), 3);
    // Only the controllers a limit needs.
    let only_cpu = ResourceLimits {
        cpu_percent: Some(50),
        ..ResourceLimits::default()
    };
    let cg2 = RemoteCgroup::create_in(r, own, "host-1-disk-1", &only_cpu).unwrap();
    assert_eq!(cg2.dirs(), [r.join("cpu/host-1-disk-1")]);
    assert_eq!(read(&r.join("cpu/host-1-disk-1/cpu.cfs_quota_us")), "50000");
}

#[test]
fn a_limit_whose_controller_is_not_mounted_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::create_dir_all(r.join("cpu")).unwrap();
    std::fs::write(r.join("cpu/cgroup.procs"), "").unwrap();
    let own = "2:cpu:/\n";
    let e = RemoteCgroup::create_in(r, own, "x", &limits()).unwrap_err();
    assert!(matches!(e, CgroupError::NoController("memory")), "{e}");
    assert!(!r.join("cpu/x").exists(), "nothing made");
}

/// v2: one directory below the VMM's, the controllers enabled for it in
/// the VMM's `cgroup.subtree_control` first.
#[test]
fn v2_limits_go_to_one_directory_with_the_controllers_enabled() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::write(r.join("cgroup.controllers"), "cpuset cpu io memory pids\n").unwrap();
    let parent = r.join("vm.slice/vmm");
    std::fs::create_dir_all(&parent).unwrap();
    std::fs::write(parent.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
    std::fs::write(parent.join("cgroup.subtree_control"), "memory\n").unwrap();
    let own = "0::/vm.slice/vmm\n";
    let cg = RemoteCgroup::create_in(r, own, "host-1-disk-0", &limits()).unwrap();
    let dir = parent.join("host-1-disk-0");
    assert_eq!(cg.dirs(), std::slice::from_ref(&dir));
    assert_eq!(read(&dir.join("memory.max")), "268435456");
    assert_eq!(read(&dir.join("cpu.max")), "150000 100000");
    assert_eq!(read(&dir.join("pids.max")), "64");
    // memory was enabled already; cpu then pids were asked for (a plain
    // file keeps the last write, where cgroupfs adds each).
    assert!(read(&parent.join("cgroup.subtree_control")).starts_with("+pids"));

    // A controller the VMM's cgroup does not have.
    std::fs::write(parent.join("cgroup.controllers"), "memory\n").unwrap();
    std::fs::write(parent.join("cgroup.subtree_control"), "memory\n").unwrap();
    let e = RemoteCgroup::create_in(r, own, "y", &limits()).unwrap_err();
    assert!(matches!(e, CgroupError::NoController("cpu")), "{e}");
}

#[test]
fn own_paths_are_read_per_controller() {
    let own = "12:pids:/a\n4:memory:/b/c\n2:cpu,cpuacct:/\n0::/unified\n";
    assert_eq!(own_path(own, "pids"), Some("/a"));
    assert_eq!(own_path(own, "memory"), Some("/b/c"));
    assert_eq!(own_path(own, "cpu"), Some("/"));
    assert_eq!(own_path(own, "cpuacct"), Some("/"));
    assert_eq!(own_path(own, ""), Some("/unified"));
    assert_eq!(own_path(own, "blkio"), None);
}
