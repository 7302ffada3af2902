#!/usr/bin/env python3
"""Drives the VM of tests/host_reset.rs through its QMP monitor (qemu.qmp)
across three boots of the same guest job:

1. the job prints `STEP ask` and waits; we call `system_reset` and expect
   RESET {guest: false, reason: host-qmp-system-reset};
2. after the restart the job prints `STEP ask` again; we answer `reboot`
   on the VMM's standard input (forwarded to the guest's serial port), the
   guest runs `reboot -f`, and we expect RESET {guest: true, reason:
   guest-reset};
3. the third boot's `STEP ask` gets `poweroff`: the job ends, the guest
   powers off, and `host` must exit (its code goes into the results).

Usage: reset_driver.py HOST CONFIG QMP_SOCKET CONSOLE_LOG RESULTS_JSON
Everything observed goes into RESULTS_JSON for the Rust test to check.
"""

import asyncio
import json
import os
import subprocess
import sys
import time

from qemu.qmp import QMPClient

HOST, CONFIG, SOCK, CONSOLE, RESULTS = sys.argv[1:6]
STEP_TIMEOUT = 90.0

results = {"steps": [], "events": [], "replies": {}}
HOST_PROC = []
T0 = time.monotonic()


def save():
    with open(RESULTS, "w") as f:
        json.dump(results, f, indent=1, default=str)


def now():
    return round(time.monotonic() - T0, 2)


class Console:
    """Follows the console log for `STEP name` lines, one after another."""

    def __init__(self, path):
        self.path = path
        self.pos = 0
        self.buf = ""

    async def wait_step(self, name, timeout=STEP_TIMEOUT):
        deadline = time.monotonic() + timeout
        needle = f"STEP {name}"
        while time.monotonic() < deadline:
            try:
                with open(self.path, "r", errors="replace") as f:
                    f.seek(self.pos)
                    chunk = f.read()
                    self.pos = f.tell()
                self.buf += chunk
            except FileNotFoundError:
                pass
            if needle in self.buf:
                self.buf = self.buf.split(needle, 1)[1]
                results["steps"].append([name, now()])
                save()
                return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"the guest never printed `{needle}`")


class Events:
    """Collects every event; waits for one by name."""

    def __init__(self, qmp):
        self.qmp = qmp
        self.seen = []

    async def wait(self, name, timeout=60.0):
        t0 = time.monotonic()
        while True:
            for i, e in enumerate(self.seen):
                if e["event"] == name:
                    self.seen.pop(i)
                    return e
            left = timeout - (time.monotonic() - t0)
            if left <= 0:
                raise TimeoutError(f"no {name} event within {timeout} s")
            try:
                ev = await asyncio.wait_for(self.qmp.events.get(), left)
            except asyncio.TimeoutError:
                continue
            ev = dict(ev)
            ev["at"] = now()
            results["events"].append(ev)
            save()
            self.seen.append(ev)


async def main():
    host = subprocess.Popen(
        [HOST, "run", CONFIG, "--qmp", SOCK],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=open(CONFIG + ".host-stderr", "w"),
        env=dict(os.environ, HOST_STATS="1"),
    )
    HOST_PROC.append(host)

    def say(line):
        host.stdin.write(line.encode() + b"\n")
        host.stdin.flush()

    qmp = QMPClient("host-reset-test")
    for _ in range(600):
        if os.path.exists(SOCK):
            try:
                await qmp.connect(SOCK)
                break
            except Exception:  # not listening yet
                pass
        await asyncio.sleep(0.1)
    else:
        raise RuntimeError("the QMP socket never answered")
    ev = Events(qmp)
    con = Console(CONSOLE)
    r = results["replies"]

    # Boot 1: a reset from the monitor.
    await con.wait_step("ask")
    r["system_reset"] = await qmp.execute("system_reset")
    r["reset-host"] = await ev.wait("RESET")
    r["status-after-reset"] = await qmp.execute("query-status")

    # Boot 2: the guest reboots itself.
    await con.wait_step("ask")
    say("reboot")
    r["reset-guest"] = await ev.wait("RESET")

    # Boot 3: the guest powers off, which ends the VM.
    await con.wait_step("ask")
    say("poweroff")
    try:
        r["shutdown"] = await ev.wait("SHUTDOWN", timeout=60)
    except Exception as x:  # the VM may end before we read it
        r["shutdown"] = str(x)
    try:
        await qmp.disconnect()
    except Exception:
        pass
    results["host-exit"] = host.wait(timeout=60)
    results["seconds"] = now()
    save()


try:
    asyncio.run(main())
except Exception as x:
    results["failure"] = f"{type(x).__name__}: {x}"
    save()
    for h in HOST_PROC:  # never leave the VM waiting for a step
        h.kill()
    print(f"reset_driver: {results['failure']}", file=sys.stderr)
    sys.exit(1)
save()
print("reset_driver: done")
