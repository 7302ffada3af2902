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
Everything observed goes into RESULTS_JSON for the Rust test to check
(tests/qmp_common.py has the machinery both drivers share).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_common import Console, Events, finish, results, run, start_vm  # noqa: E402


async def main():
    host, qmp, say = await start_vm("host-reset-test")
    ev = Events(qmp)
    con = Console()
    r = results["replies"]

    # Boot 1: a reset from the monitor.
    await con.wait_step("ask", timeout=90)
    r["remotes-at-start"] = await qmp.execute("query-remote")
    r["system_reset"] = await qmp.execute("system_reset")
    r["reset-host"] = await ev.wait("RESET", timeout=60)
    r["status-after-reset"] = await qmp.execute("query-status")

    # Boot 2: the guest reboots itself.
    await con.wait_step("ask", timeout=90)
    say("reboot")
    r["reset-guest"] = await ev.wait("RESET", timeout=60)

    # Boot 3: the guest powers off, which ends the VM.
    await con.wait_step("ask", timeout=90)
    r["remotes-after-resets"] = await qmp.execute("query-remote")
    say("poweroff")
    await finish(host, qmp, ev, timeout=60)


run(main, "reset_driver")
