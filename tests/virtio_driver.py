#!/usr/bin/env python3
"""Drives the resize part of tests/host_virtio_blk.rs: once the guest has
its virtio-blk disk, `block_resize` of the device (by its id) to twice the
image's size, after a shrink that must be refused; the guest sees the new
capacity by itself (a configuration change interrupt); the remote is
then restarted, and the guest writes at its new last sector through the
new process.

Usage: virtio_driver.py HOST CONFIG QMP_SOCKET CONSOLE_LOG RESULTS_JSON
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_common import CONFIG, Console, Events, finish, results, run, start_vm  # noqa: E402
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
    await con.wait_step("done")
    await finish(host, qmp, ev)


run(main, "virtio_driver")
