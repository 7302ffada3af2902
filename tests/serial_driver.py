#!/usr/bin/env python3
"""Drives the pci-serial VM of tests/host_serial.rs: talks to the guest's
shells through the plugin's UNIX sockets (as `socat` would), live-migrates
the VM to a second one (B: its own remote, port socket and output file)
and talks to the same shell through B's port, then hot-adds a second port
into B's remote with QEMU's own client (qemu.qmp).

The guest prints `STEP <name>` on its console and waits for a line on its
console input (see tests/qmp_common.py).

Usage: serial_driver.py HOST CONFIG QMP_SOCKET CONSOLE_LOG RESULTS_JSON
"""

import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_common import (  # noqa: E402
    CONFIG, SOCK, Console, Events, finish, live_migrate, results, run, save, sayer,
    spawn_remote_host, start_vm)

SOCKETS = os.path.dirname(SOCK)
SER0 = os.path.join(SOCKETS, "ser0.sock")
SER0_B = os.path.join(SOCKETS, "ser0-b.sock")
SER1 = os.path.join(SOCKETS, "ser1.sock")
SER2 = os.path.join(SOCKETS, "ser2.sock")
SER2_B = os.path.join(SOCKETS, "ser2-b.sock")


async def converse(path, command, expect, timeout=120.0):
    """Connects to a port's socket and types `command` until `expect`
    comes back: the shell may not have opened its tty yet when the first
    line arrives (the 8250 driver clears the UART when it starts), so the
    line is typed again every 3 s. Returns what the socket sent."""
    deadline = time.monotonic() + timeout
    reader, writer = await asyncio.open_unix_connection(path)
    got = b""
    next_send = 0.0
    try:
        while time.monotonic() < deadline:
            if time.monotonic() >= next_send:
                writer.write(command + b"\n")
                await writer.drain()
                next_send = time.monotonic() + 3.0
            try:
                chunk = await asyncio.wait_for(reader.read(4096), 0.5)
            except asyncio.TimeoutError:
                continue
            if not chunk:
                raise RuntimeError(f"{path} closed; it sent {got!r}")
            got += chunk
            if expect in got:
                return got.decode(errors="replace")
        raise TimeoutError(f"no {expect!r} from {path} within {timeout} s; it sent {got!r}")
    finally:
        writer.close()


async def main():
    # The orchestrator's remote (see tests/host_serial.rs) first: the VMM
    # connects to it at start.
    spawn_remote_host(CONFIG, "orch", os.path.join(SOCKETS, "orch"), ["ser2"])
    host, qmp, say = await start_vm("host-serial-test")
    ev = Events(qmp)
    con = Console()
    r = results["replies"]

    await con.wait_step("ready")
    r["query-pci"] = await qmp.execute("query-pci")
    t = time.monotonic()
    r["ser0-answer"] = await converse(SER0, b"echo hello-$((6*7))", b"hello-42")
    r["ser0-seconds"] = round(time.monotonic() - t, 2)
    r["ser2-answer"] = await converse(SER2, b"echo orch-$((6*7))", b"orch-42")
    save()
    # The VM moves to B while the guest's shell waits on the port; the
    # same shell answers through B's port (the UART's state moved with it).
    qmp_a = qmp
    host, qmp, ev = await live_migrate(host, qmp_a, {
        '"console.log"': '"console-b.log"', '"misc.log"': '"misc-b.log"',
        "ser0.sock": "ser0-b.sock", '"ser0.out"': '"ser0-b.out"',
        '"/tmp/host-serial/orch"': '"/tmp/host-serial/orch-b"', '"orch.log"': '"orch-b.log"',
        "ser2.sock": "ser2-b.sock", '"ser2.out"': '"ser2-b.out"'},
        before_b=lambda cfg_b: spawn_remote_host(
            cfg_b, "orch", os.path.join(SOCKETS, "orch-b"), ["ser2"]))
    say = sayer(host)
    con = Console(os.path.join(os.path.dirname(CONFIG), "console-b.log"))
    r["ser0-moved-answer"] = await converse(SER0_B, b"echo moved-$((6*7))", b"moved-42")
    r["ser2-moved-answer"] = await converse(SER2_B, b"echo orch-moved-$((6*7))", b"orch-moved-42")
    save()
    # A second port into B's running remote; its output file is relative
    # (to the config file's directory, like every path of the config).
    r["device_add"] = await qmp.execute("device_add", {
        "driver": "pci-serial", "id": "ser1", "remote": "misc", "addr": "0x6",
        "socket": SER1, "output": "ser1.out"})
    r["query-pci-hot"] = await qmp.execute("query-pci")
    say("go")

    await con.wait_step("hot-ready")
    r["ser1-answer"] = await converse(SER1, b"echo hot-$((7*6))", b"hot-42")
    say("go")

    await con.wait_step("done")
    await finish(host, qmp, ev)


run(main, "serial_driver")
