#!/usr/bin/env python3
"""Drives the VM of tests/host_chaos.rs (a guest reading a register of a
device in a remote over and over) and of tests/host_virtio_chaos.rs (a
guest writing and reading two disks in a remote): the remote is killed
(SIGKILL) at random moments, as many times as the file `chaos-kills`
beside the config says (the Rust test writes it), and comes back by
itself (`restart = "on-failure"`). Records each recovery time and which
devices kept their state. Then the remote hangs once (SIGSTOP): the VMM
notices the silence, kills the stopped process and starts another, while
the guest waits.

Usage: chaos_driver.py HOST CONFIG QMP_SOCKET CONSOLE_LOG RESULTS_JSON
"""

import asyncio
import os
import random
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_common import CONFIG, Console, Events, finish, results, run, save, start_vm  # noqa: E402


async def running_pid(qmp, old):
    """The `svc` remote's pid once a new process serves it (bounded)."""
    for _ in range(300):
        st = next(x for x in await qmp.execute("query-remote") if x["id"] == "svc")
        if st["state"] == "running" and st["pid"] not in (None, old):
            return st["pid"]
        await asyncio.sleep(0.1)
    raise TimeoutError("svc never ran again")


async def main():
    # Written by the Rust test beside the config (the environment does not
    # reach L1).
    with open(os.path.join(os.path.dirname(CONFIG), "chaos-kills")) as f:
        kills = int(f.read().strip() or "3")
    host, qmp, say = await start_vm("host-chaos-test")
    ev = Events(qmp)
    con = Console()
    r = results["replies"]
    await con.wait_step("reading")
    st = next(x for x in await qmp.execute("query-remote") if x["id"] == "svc")
    pid = st["pid"]
    r["recovery-ms"] = []
    r["state-kept"] = []
    r["state-resumed"] = []
    rng = random.Random(1234)
    for i in range(kills):
        # 1-3 s apart, as issue 13's chaos test asks.
        await asyncio.sleep(rng.uniform(1.0, 3.0))
        os.kill(pid, signal.SIGKILL)
        e = await ev.wait("REMOTE_RESTARTED", id="svc", timeout=60)
        r["recovery-ms"].append(e["data"].get("recovery-ms"))
        r["state-kept"].append(e["data"].get("state-kept"))
        r["state-resumed"].append(e["data"].get("state-resumed"))
        pid = await running_pid(qmp, pid)
        save()
    # A plugin panic (host_virtio_chaos writes `chaos-panic`, the device
    # to hit): that device comes back alone; its remote, and so its
    # neighbours, go on untouched.
    panic_file = os.path.join(os.path.dirname(CONFIG), "chaos-panic")
    if os.path.exists(panic_file):
        with open(panic_file) as f:
            victim = f.read().strip()
        await asyncio.sleep(rng.uniform(1.0, 2.0))
        def remote_restarts():
            return sum(1 for x in results["events"] if x["event"] == "REMOTE_RESTARTED")
        restarts_before = remote_restarts()
        try:
            await qmp.execute("x-device-control", {"id": victim, "op": "x-panic"})
            reply = "no error"
        except Exception as x:  # the panic comes back as the op's error
            reply = str(x)
        e = await ev.wait("DEVICE_RESTARTED", device=victim, timeout=60)
        st = next(x for x in await qmp.execute("query-remote") if x["id"] == "svc")
        r["panic"] = {"reply": reply, "device": e["data"].get("device"),
                      "recovery-ms": e["data"].get("recovery-ms"),
                      "state-kept": e["data"].get("state-kept"),
                      "state-resumed": e["data"].get("state-resumed"),
                      "same-pid": st["pid"] == pid,
                      "remote-restarts": remote_restarts() - restarts_before}
        save()
    await asyncio.sleep(rng.uniform(1.0, 2.0))
    os.kill(pid, signal.SIGSTOP)
    hung = await ev.wait("REMOTE_HUNG", id="svc", timeout=60)
    e = await ev.wait("REMOTE_RESTARTED", id="svc", timeout=60)
    r["hang"] = {"silent-ms": hung["data"].get("silent-ms"),
                 "recovery-ms": e["data"].get("recovery-ms")}
    r["state-kept"].append(e["data"].get("state-kept"))
    r["state-resumed"].append(e["data"].get("state-resumed"))
    new_pid = await running_pid(qmp, pid)
    # The stopped process is killed and reaped by the VMM (bounded wait).
    for _ in range(100):
        if not os.path.exists(f"/proc/{pid}"):
            break
        await asyncio.sleep(0.1)
    r["hang"]["stopped-process-gone"] = not os.path.exists(f"/proc/{pid}")
    r["hang"]["new-pid"] = new_pid != pid
    save()
    say("go")
    await con.wait_step("done")
    await finish(host, qmp, ev)


run(main, "chaos_driver")
