#!/usr/bin/env python3
"""Drives the resize part of tests/host_virtio_blk.rs: once the guest has
its virtio-blk disk, `block_resize` of the device (by its id) to twice the
image's size, after a shrink that must be refused; the guest sees the new
capacity by itself (a configuration change interrupt); the remote is
then restarted, and the guest writes at its new last sector through the
new process. Then the guest writes and reads back 64 KiB blocks without
pause while the VM is live-migrated over unix: to a second VM (B: the
same config, its own console log and remote log) started with
`--incoming`; the source is quit, and once the guest has made progress
on B it is told to stop, checks its earlier write and finishes there.

Usage: virtio_driver.py HOST CONFIG QMP_SOCKET CONSOLE_LOG RESULTS_JSON
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_common import (  # noqa: E402
    CONFIG, Console, Events, finish, live_migrate, results, run, sayer, start_vm)
from qemu.qmp import ExecuteError  # noqa: E402


async def main():
    image = os.path.join(os.path.dirname(CONFIG), "vd.img")
    size = os.path.getsize(image)
    host, qmp, say = await start_vm("host-virtio-blk-test")
    ev = Events(qmp)
    con = Console()
    r = results["replies"]
    await con.wait_step("ready")
    try:
        await qmp.execute("block_resize", {"device": "vd0", "size": size // 2})
        r["shrink"] = "unexpected success"
    except ExecuteError as e:
        r["shrink"] = str(e)
    r["resize"] = await qmp.execute("block_resize", {"device": "vd0", "size": 2 * size})
    r["new-size"] = 2 * size
    # The remote is replaced while the guest's driver is set up: the new
    # process gets the device's state and the MSI-X vectors as the guest
    # programmed them, so the guest's next I/O completes as before.
    await qmp.execute("remote-restart", {"id": "storage"})
    r["restarted"] = await ev.wait("REMOTE_RESTARTED", id="storage", timeout=60)
    say("go")
    await con.wait_step("grown")
    await con.wait_step("tick")
    bhost, bqmp, bev = await live_migrate(host, qmp, {
        '"console.log"': '"console-b.log"', '"vm-remote.log"': '"vm-b-remote.log"'})
    say_b = sayer(bhost)
    con_b = Console(os.path.join(os.path.dirname(CONFIG), "console-b.log"))
    # Progress on B: the guest's loop prints a tick every few rounds.
    for _ in range(2):
        await con_b.wait_step("tick", timeout=120)
    say_b("stop")
    await con_b.wait_step("done")
    await finish(bhost, bqmp, bev)


run(main, "virtio_driver")
