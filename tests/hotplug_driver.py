#!/usr/bin/env python3
"""Drives the VM of tests/host_hotplug.rs (ACPI PCI hotplug) with QEMU's
own client (qemu.qmp), in step with its guest job (`STEP name`, then a
line on the console input; see tests/qmp_common.py).

Usage: hotplug_driver.py HOST CONFIG QMP_SOCKET CONSOLE_LOG RESULTS_JSON
"""

import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_common import CONFIG, Console, Events, finish, results, run, start_vm  # noqa: E402
from qemu.qmp import ExecuteError  # noqa: E402


async def main():
    host, qmp, say = await start_vm("host-hotplug-test")
    ev = Events(qmp)
    con = Console()
    r = results["replies"]

    # An LSI controller with a drive, into the running remote: the guest
    # finds its disk with no rescan of its own.
    await con.wait_step("ready")
    disk1 = os.path.join(os.path.dirname(CONFIG), "disk1.img")
    r["add-lsi1"] = await qmp.execute("device_add", {
        "driver": "lsi53c895a", "id": "lsi1", "remote": "storage", "addr": "0x6",
        "drive": [{"file": disk1, "scsi-id": 0}]})
    say("go")

    # The guest used the disk; device_del asks it to let go, and the
    # function goes when it did.
    await con.wait_step("sdb-used")
    r["del-lsi1"] = await qmp.execute("device_del", {"id": "lsi1"})
    r["lsi1-deleted"] = await ev.wait("DEVICE_DELETED", timeout=120, device="lsi1")
    r["remotes-after-del"] = await qmp.execute("query-remote")
    r["pci-after-del"] = await qmp.execute("query-pci")
    say("go")

    # The same for an in-process function.
    await con.wait_step("lsi1-gone")
    r["add-dma9"] = await qmp.execute("device_add", {
        "driver": "dma-example", "id": "dma9", "addr": "0x7"})
    say("go")

    # The guest now ignores hotplug events (its GPE disabled): the
    # function stays, and a second device_del says the unplug is pending.
    await con.wait_step("dma9-found")
    r["del-dma9"] = await qmp.execute("device_del", {"id": "dma9"})
    try:
        await ev.wait("DEVICE_DELETED", timeout=3, device="dma9")
        r["deleted-while-ignored"] = True
    except TimeoutError:
        r["deleted-while-ignored"] = False
    r["pci-while-pending"] = await qmp.execute("query-pci")
    say("go")

    # The guest listens again (a request made while it did not is lost to
    # it, as on real hardware): device_del again says the unplug is
    # pending and sends the request once more, and it goes through.
    await con.wait_step("dma9-listening")
    try:
        await qmp.execute("device_del", {"id": "dma9"})
        r["del-again"] = "unexpected success"
    except ExecuteError as e:
        r["del-again"] = str(e)
    r["dma9-deleted"] = await ev.wait("DEVICE_DELETED", timeout=120, device="dma9")
    say("go")

    # A plugin that panics on one request, in a remote that restarts.
    await con.wait_step("magic-ready")
    for _ in range(300):
        plugins = next(x for x in await qmp.execute("query-remote") if x["id"] == "plugins")
        if "magic" in (plugins.get("state-saved") or []):
            break
        await asyncio.sleep(0.1)
    r["plugins-pid-before"] = plugins["pid"]
    say("go")
    await con.wait_step("magic-panicked")
    r["magic-restarted"] = await ev.wait("DEVICE_RESTARTED", timeout=60, device="magic")
    r["remotes-at-end"] = await qmp.execute("query-remote")
    say("go")

    await con.wait_step("done")
    await finish(host, qmp, ev)


run(main, "hotplug_driver")
