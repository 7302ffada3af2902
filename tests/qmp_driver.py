#!/usr/bin/env python3
"""Drives a running `host` VM through its QMP monitor with QEMU's own
client library (qemu.qmp from PyPI), in step with the guest job of
tests/host_qmp.rs.

The guest prints `STEP <name>` on its console (the VM's console log) and
then waits for a line on its console input; this script answers with a
line on the VMM's standard input, which the VMM forwards to the guest's
serial port. So each side knows when the other has done its part.

Usage: qmp_driver.py HOST CONFIG QMP_SOCKET CONSOLE_LOG RESULTS_JSON
Everything observed goes into RESULTS_JSON for the Rust test to check;
the script itself only fails when the VM cannot be driven at all
(tests/qmp_common.py has the machinery both drivers share).
"""

import asyncio
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_common import CONFIG, Console, Events, finish, results, run, start_vm  # noqa: E402
from qemu.qmp import ExecuteError  # noqa: E402


async def expect_error(qmp, name, cmd, args):
    """Runs a command that must fail; records its error class and text."""
    try:
        r = await qmp.execute(cmd, args)
        results["errors"][name] = {"unexpected-success": r}
    except ExecuteError as e:
        results["errors"][name] = {"class": e.error_class, "desc": str(e)}


async def main():
    host, qmp, say = await start_vm("host-qmp-test")

    def go():
        say("go")

    ev = Events(qmp)
    con = Console()
    r = results["replies"]

    await con.wait_step("ready")
    r["query-status"] = await qmp.execute("query-status")
    r["query-remote"] = await qmp.execute("query-remote")
    r["query-pci"] = await qmp.execute("query-pci")
    r["query-block"] = await qmp.execute("query-block")
    r["query-commands"] = [c["name"] for c in await qmp.execute("query-commands")]

    # Bad arguments: each refused with QMP's error, nothing changed.
    await expect_error(qmp, "del-unknown", "device_del", {"id": "nope"})
    await expect_error(qmp, "add-duplicate", "device_add",
                       {"driver": "dma-example", "id": "lsi0", "remote": "storage"})
    await expect_error(qmp, "add-unknown-remote", "device_add",
                       {"driver": "dma-example", "id": "x1", "remote": "nowhere"})
    await expect_error(qmp, "add-slot-taken", "device_add",
                       {"driver": "dma-example", "id": "x2", "remote": "storage", "addr": "0x4"})
    await expect_error(qmp, "add-bad-plugin", "device_add",
                       {"driver": "no-such-plugin", "id": "x3", "remote": "storage"})
    await expect_error(qmp, "blockdev-missing-file", "blockdev-add",
                       {"driver": "raw", "node-name": "ghost",
                        "file": {"driver": "file", "filename": "/nonexistent.img"}})
    await expect_error(qmp, "hd-unknown-node", "device_add",
                       {"driver": "scsi-hd", "id": "hdx", "drive": "ghost", "bus": "lsi0.0", "scsi-id": 2})
    await expect_error(qmp, "del-controller-in-use", "device_del", {"id": "lsi0"})
    r["query-pci-after-errors"] = await qmp.execute("query-pci")

    # A drive: node, then scsi-hd on the remote LSI controller.
    disk1 = os.path.join(os.path.dirname(CONFIG), "disk1.img")
    await qmp.execute("blockdev-add", {"driver": "raw", "node-name": "disk1",
                                       "file": {"driver": "file", "filename": disk1}})
    await expect_error(qmp, "blockdev-duplicate", "blockdev-add",
                       {"driver": "raw", "node-name": "disk1",
                        "file": {"driver": "file", "filename": disk1}})
    await expect_error(qmp, "hd-controller-target", "device_add",
                       {"driver": "scsi-hd", "id": "hdy", "drive": "disk1", "bus": "lsi0.0", "scsi-id": 7})
    await qmp.execute("device_add", {"driver": "scsi-hd", "id": "hd1", "drive": "disk1",
                                     "bus": "lsi0.0", "scsi-id": 1})
    e = await ev.wait("DRIVE_ADDED", device="hd1")
    r["drive-added"] = e
    await expect_error(qmp, "resize-odd", "block_resize", {"node-name": "disk1", "size": 1000})
    await expect_error(qmp, "resize-shrink", "block_resize", {"node-name": "disk1", "size": 1 << 20})
    await expect_error(qmp, "blockdev-del-in-use", "blockdev-del", {"node-name": "disk1"})
    go()

    await con.wait_step("sdb-written")
    await qmp.execute("block_resize", {"node-name": "disk1", "size": 48 << 20})
    r["query-block-resized"] = await qmp.execute("query-block")
    go()

    await con.wait_step("sdb-deleted")
    await qmp.execute("device_del", {"id": "hd1"})
    r["drive-removed"] = await ev.wait("DRIVE_REMOVED", device="hd1")
    r["hd1-deleted"] = await ev.wait("DEVICE_DELETED", device="hd1")
    await qmp.execute("blockdev-del", {"node-name": "disk1"})
    await expect_error(qmp, "blockdev-del-again", "blockdev-del", {"node-name": "disk1"})
    # A PCI function added to a running remote.
    await qmp.execute("device_add", {"driver": "dma-example", "id": "dma1",
                                     "remote": "storage", "addr": "0x9"})
    # The same plugin in-process, and a plugin whose BAR reads panic, once
    # in the remote (beside the LSI controller) and once in-process.
    await qmp.execute("device_add", {"driver": "dma-example", "id": "dma2", "addr": "0xa"})
    await qmp.execute("device_add", {"driver": "faulty-plugin", "kind": "panics-on-read",
                                     "id": "bad1", "remote": "storage", "addr": "0xb"})
    await qmp.execute("device_add", {"driver": "faulty-plugin", "kind": "panics-on-read",
                                     "id": "bad2", "addr": "0xc"})
    r["query-pci-hotplugged"] = await qmp.execute("query-pci")
    go()

    await con.wait_step("dma-found")
    # The panic's own report; a channel timeout may be reported first on a
    # loaded machine (the proxy gives up on the access before the remote
    # answers), and then the panic comes with the next heartbeat.
    for name in ("bad1", "bad2"):
        for _ in range(2):
            e = await ev.wait("DEVICE_FAILED", device=name)
            r[f"{name}-failed"] = e
            if "went wrong" in e["data"]["reason"]:
                break
    misc = next(x for x in await qmp.execute("query-remote") if x["id"] == "misc")
    os.kill(misc["pid"], signal.SIGSTOP)
    t_stop = time.monotonic()
    e = await ev.wait("REMOTE_HUNG", id="misc", timeout=30)
    r["remote-hung"] = e
    r["hung-after-s"] = time.monotonic() - t_stop
    r["query-remote-hung"] = await qmp.execute("query-remote")
    go()

    await con.wait_step("read-hung")
    os.kill(misc["pid"], signal.SIGKILL)
    t_kill = time.monotonic()
    e = await ev.wait("REMOTE_DIED", id="misc", timeout=30)
    r["remote-died"] = e
    r["died-after-s"] = time.monotonic() - t_kill
    r["query-remote-dead"] = await qmp.execute("query-remote")
    r["query-status-after-death"] = await qmp.execute("query-status")
    go()

    await con.wait_step("dead-read")
    await expect_error(qmp, "restart-unknown", "remote-restart", {"id": "nowhere"})
    await qmp.execute("remote-restart", {"id": "misc"})
    r["remote-restarted"] = await ev.wait("REMOTE_RESTARTED", id="misc")
    for _ in range(600):  # until the first heartbeat of the new process
        remotes = await qmp.execute("query-remote")
        misc = next(x for x in remotes if x["id"] == "misc")
        if misc["state"] == "running":
            break
        await asyncio.sleep(0.1)
    r["query-remote-restarted"] = remotes
    go()

    # `auto` restarts by itself (restart = "on-failure", restart-limit = 2).
    async def auto_pid():
        return next(x for x in await qmp.execute("query-remote") if x["id"] == "auto")["pid"]

    async def auto_running(old_pid):
        for _ in range(600):
            auto = next(x for x in await qmp.execute("query-remote") if x["id"] == "auto")
            if auto["state"] == "running" and auto["pid"] != old_pid:
                return auto["pid"]
            await asyncio.sleep(0.1)
        return None

    await con.wait_step("auto-kill")
    # Until dma3, idle since the guest's write, has had its state saved.
    for _ in range(300):
        auto = next(x for x in await qmp.execute("query-remote") if x["id"] == "auto")
        if "dma3" in (auto.get("state-saved") or []):
            break
        await asyncio.sleep(0.1)
    r["auto-state-saved"] = auto.get("state-saved")
    pid = auto["pid"]
    r["auto-pid-before"] = pid
    os.kill(pid, signal.SIGKILL)
    # The guest reads dma3 at once: during the restart its read waits for
    # the device to be back instead of reading all-ones.
    go()
    r["auto-died"] = await ev.wait("REMOTE_DIED", id="auto", timeout=30)
    r["auto-restarted"] = await ev.wait("REMOTE_RESTARTED", id="auto", timeout=30)
    r["auto-pid-after"] = await auto_running(pid)

    await con.wait_step("auto-limit")
    pid = r["auto-pid-after"]
    os.kill(pid, signal.SIGKILL)
    r["auto-second-restart"] = await ev.wait("REMOTE_RESTARTED", id="auto", timeout=30)
    pid = await auto_running(pid)
    os.kill(pid, signal.SIGKILL)
    r["auto-failed"] = await ev.wait("REMOTE_FAILED", id="auto", timeout=30)
    go()

    # An operator's restart of a remote that still answers: state kept.
    await con.wait_step("storage-restart")
    old = next(x for x in await qmp.execute("query-remote") if x["id"] == "storage")["pid"]
    try:
        await qmp.execute("remote-restart", {"id": "storage"})
        r["storage-restart-error"] = None
    except ExecuteError as e:
        r["storage-restart-error"] = str(e)
    r["storage-restarted"] = await ev.wait("REMOTE_RESTARTED", id="storage", timeout=60)
    for _ in range(600):
        st = next(x for x in await qmp.execute("query-remote") if x["id"] == "storage")
        if st["state"] == "running" and st["pid"] != old:
            break
        await asyncio.sleep(0.1)
    go()

    # The power button: the guest waits for it, then powers off.
    await con.wait_step("power-button")
    r["system_powerdown"] = await qmp.execute("system_powerdown")
    await finish(host, qmp, ev)



run(main, "qmp_driver")
