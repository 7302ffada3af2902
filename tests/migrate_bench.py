#!/usr/bin/env python3
"""The migration benchmark's driver (tests/bin/migrate_compare.rs,
scripts/bench-migrate), run inside the nested L1. For our VMM (the LSI
in a remote), our VMM with the LSI in its own process, and QEMU 7.2 with
its in-process LSI, the same guest (same memory, same initramfs, same
disk image) is migrated live over TCP on loopback
twice: while idle, then while writing with direct I/O; records
`query-migrate`'s total time, downtime and bytes, and checks the guest
runs on at the destination. Then QEMU's multi-process pair
(x-pci-proxy-dev + x-remote) is asked to migrate, and its answer kept.

Usage: migrate_bench.py HOST CONFIG QMP_SOCKET CONSOLE_LOG RESULTS_JSON
(bench.json beside CONFIG: kernel, initrd, image, memory_mib)
"""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The copy check (HOST_MIGRATE_VERIFY, on in the tests) hashes all of RAM
# inside the downtime: never in a benchmark.
os.environ["HOST_MIGRATE_VERIFY"] = "0"
from qmp_common import (  # noqa: E402
    SOCK, connect_qmp, results, run, save, spawn_host)
from qemu.qmp import ExecuteError  # noqa: E402

DIR = os.path.dirname(sys.argv[2])
with open(os.path.join(DIR, "bench.json")) as f:
    B = json.load(f)
QEMU = "/usr/bin/qemu-system-x86_64"
procs = []


def console(kind, name):
    return os.path.join(DIR, f"console-{kind}-{name}.log")


def sock(kind, name):
    return f"{SOCK}.{kind}-{name}"


def qemu(name, extra=(), pass_fds=()):
    args = [QEMU, "-accel", "kvm", "-cpu", "host", "-m", str(B["memory_mib"]), "-smp", "2",
            "-kernel", B["kernel"], "-initrd", B["initrd"],
            "-append", "console=ttyS0 panic=-1 quiet",
            "-display", "none", "-no-reboot", "-net", "none", "-nodefaults",
            "-serial", "file:" + console("qemu", name),
            "-qmp", f"unix:{sock('qemu', name)},server=on,wait=off", *extra]
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=open(os.path.join(DIR, f"qemu-{name}.stderr"), "w"),
                         pass_fds=pass_fds)
    procs.append(p)
    return p


LSI = ["-device", "lsi53c895a,id=lsi0",
       "-drive", f"file={B['image']},format=raw,if=none,id=disk0",
       "-device", "scsi-hd,drive=disk0,bus=lsi0.0,scsi-id=0"]


def start(kind, name, incoming=None):
    """`host`: our VMM, the LSI in a remote; `unix`: the same over a UNIX
    socket; `handover`: the same, the remote handed over to the
    destination (`x-remote-handover`); `inproc`: our VMM, the LSI in its
    process; `qemu`: QEMU 7.2 with its LSI."""
    if kind == "qemu":
        return qemu(name, LSI + (["-incoming", incoming] if incoming else []))
    extra = ["--incoming", incoming] if incoming else []
    config = f"vm-{name}.toml" if kind == "host" else f"vm-{kind}-{name}.toml"
    return spawn_host(os.path.join(DIR, config), sock(kind, name), extra)


async def wait_console(kind, name, needle, count=1, timeout=600.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(console(kind, name), errors="replace") as f:
                if f.read().count(needle) >= count:
                    return
        except FileNotFoundError:
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{kind}-{name}: no {count} x `{needle}`")


async def migrate(qmp, uri):
    """Migrates; retries while the destination is not listening yet."""
    for _ in range(300):
        await qmp.execute("migrate", {"uri": uri})
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            st = await qmp.execute("query-migrate")
            if st.get("status") in ("completed", "failed", "cancelled"):
                break
            await asyncio.sleep(0.05)
        if st.get("status") == "completed":
            return st
        if "onnect" not in st.get("error-desc", ""):
            raise RuntimeError(f"migration failed: {st}")
        await asyncio.sleep(0.1)
    raise RuntimeError("the destination never listened")


def adopted_ms(kind, name, timeout=30.0):
    """A destination's time from the source's go to its remotes adopted
    (our hand-over only: part of the guest's pause the source's
    `downtime` does not see), from its log; the source may count the
    migration done before the destination wrote it (bounded wait)."""
    path = os.path.join(DIR, f"vm-{kind}-{name}.toml.host-stderr")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path, errors="replace") as f:
                for line in f:
                    if "adopted in " in line:
                        return float(line.split("adopted in ")[1].split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            pass
        time.sleep(0.1)
    return None


def numbers(st):
    return {"total-ms": st.get("total-time"), "downtime-ms": st.get("downtime"),
            "setup-ms": st.get("setup-time"),
            "bytes": st["ram"]["transferred"] + st.get("device-state-bytes", 0),
            "rounds": st["ram"].get("dirty-sync-count"),
            "stop-and-copy": st.get("stop-and-copy")}


async def quit_vm(qmp, proc):
    """`quit`, the monitor closed, the process gone."""
    await qmp.execute("quit")
    try:
        await qmp.disconnect()
    except Exception:
        pass
    proc.wait(timeout=60)


def uri(kind, port):
    if kind in ("unix", "handover"):
        return f"unix:{os.path.dirname(SOCK)}/mig-{kind}-{port}.sock"
    return f"tcp:127.0.0.1:{port}"


async def one_vmm(kind, port):
    a = start(kind, "a")
    qa = await connect_qmp(f"{kind}-a", sock(kind, "a"), a)
    params = {"downtime-limit": 300}
    if kind == "qemu":
        # QEMU caps at 128 MiB/s by default; ours has no cap.
        params["max-bandwidth"] = 10 << 30
    if kind == "handover":
        params["x-remote-handover"] = True
    await qa.execute("migrate-set-parameters", params)
    await wait_console(kind, "a", "STEP idle")
    b = start(kind, "b", uri(kind, port))
    st = await migrate(qa, uri(kind, port))
    results["replies"][f"{kind}-idle"] = numbers(st)
    if kind == "handover":
        results["replies"][f"{kind}-idle"]["adopted-ms"] = adopted_ms(kind, "b")
    save()
    qb = await connect_qmp(f"{kind}-b", sock(kind, "b"), b)
    await qb.execute("migrate-set-parameters", params)
    await quit_vm(qa, a)
    # The guest turns to disk I/O by itself after its idle minute.
    await wait_console(kind, "b", "\nio ", count=20)
    c = start(kind, "c", uri(kind, port + 1))
    st = await migrate(qb, uri(kind, port + 1))
    results["replies"][f"{kind}-io"] = numbers(st)
    if kind == "handover":
        results["replies"][f"{kind}-io"]["adopted-ms"] = adopted_ms(kind, "c")
    save()
    await quit_vm(qb, b)
    await wait_console(kind, "c", "\nio ", count=20)
    results["replies"][f"{kind}-runs-on"] = True
    c.kill()
    c.wait(timeout=60)
    save()


async def qemu_mp():
    """QEMU's multi-process pair: its answer to `migrate`."""
    mine, theirs = socket.socketpair()
    remote = subprocess.Popen(
        [QEMU, "-machine", "x-remote,accel=kvm:tcg", "-nodefaults", "-display", "none",
         "-device", "lsi53c895a,id=lsi0",
         "-drive", f"file={B['image']},format=raw,if=none,id=disk0",
         "-device", "scsi-hd,drive=disk0,bus=lsi0.0,scsi-id=0",
         "-object", f"x-remote-object,id=robj0,devid=lsi0,fd={theirs.fileno()}"],
        pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(DIR, "qemu-mp-remote.stderr"), "w"))
    procs.append(remote)
    p = qemu("mp", ["-device", f"x-pci-proxy-dev,id=lsi0,fd={mine.fileno()}"],
             pass_fds=[mine.fileno()])
    q = await connect_qmp("qemu-mp", sock("qemu", "mp"), p)
    try:
        await q.execute("migrate", {"uri": "tcp:127.0.0.1:4499"})
        await asyncio.sleep(1)
        st = await q.execute("query-migrate")
        answer = f"status {st.get('status')}: {st.get('error-desc', '')}"
    except ExecuteError as e:
        answer = str(e)
    results["replies"]["qemu-mp"] = answer
    p.kill()
    remote.kill()
    save()


async def main():
    # MIGRATE_COMPARE_ONLY=handover,qemu runs only those (a diagnosis).
    only = [k for k in os.environ.get("MIGRATE_COMPARE_ONLY", "").split(",") if k]
    for kind, port in [("host", 4450), ("unix", 4465), ("handover", 4470), ("inproc", 4455),
                       ("qemu", 4460)]:
        if not only or kind in only:
            await one_vmm(kind, port)
    if not only or "qemu-mp" in only:
        await qemu_mp()


try:
    run(main, "migrate_bench")
finally:
    for p in procs:
        if p.poll() is None:
            p.kill()
