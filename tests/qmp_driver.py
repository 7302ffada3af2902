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
the script itself only fails when the VM cannot be driven at all.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

from qemu.qmp import QMPClient, ExecuteError

HOST, CONFIG, SOCK, CONSOLE, RESULTS = sys.argv[1:6]
STEP_TIMEOUT = 240.0

results = {"steps": {}, "errors": {}, "events": [], "replies": {}}
HOST_PROC = []


def save():
    with open(RESULTS, "w") as f:
        json.dump(results, f, indent=1, default=str)


class Console:
    """Follows the console log for `STEP name` lines."""

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
                results["steps"][name] = time.time()
                return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"the guest never printed `{needle}`")


class Events:
    """Collects every event; waits for one by name."""

    def __init__(self, qmp):
        self.qmp = qmp
        self.seen = []

    async def wait(self, name, timeout=30.0, **match):
        t0 = time.monotonic()
        while True:
            for i, e in enumerate(self.seen):
                if e["event"] == name and all(e.get("data", {}).get(k) == v for k, v in match.items()):
                    self.seen.pop(i)
                    return e, time.monotonic() - t0
            left = timeout - (time.monotonic() - t0)
            if left <= 0:
                raise TimeoutError(f"no {name} event {match} within {timeout} s")
            try:
                ev = await asyncio.wait_for(self.qmp.events.get(), left)
            except asyncio.TimeoutError:
                continue
            ev = dict(ev)
            results["events"].append(ev)
            save()
            self.seen.append(ev)


async def expect_error(qmp, name, cmd, args):
    """Runs a command that must fail; records its error class and text."""
    try:
        r = await qmp.execute(cmd, args)
        results["errors"][name] = {"unexpected-success": r}
    except ExecuteError as e:
        results["errors"][name] = {"class": e.error_class, "desc": str(e)}


async def main():
    host = subprocess.Popen(
        [HOST, "run", CONFIG, "--qmp", SOCK],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=open(CONFIG + ".host-stderr", "w"),
    )
    HOST_PROC.append(host)

    def go():
        host.stdin.write(b"go\n")
        host.stdin.flush()

    qmp = QMPClient("host-qmp-test")
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
    results["greeting"] = str(qmp.greeting)
    ev = Events(qmp)
    con = Console(CONSOLE)
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
    e, _ = await ev.wait("DRIVE_ADDED", device="hd1")
    r["drive-added"] = e
    await expect_error(qmp, "resize-odd", "block_resize", {"node-name": "disk1", "size": 1000})
    await expect_error(qmp, "blockdev-del-in-use", "blockdev-del", {"node-name": "disk1"})
    go()

    await con.wait_step("sdb-written")
    await qmp.execute("block_resize", {"node-name": "disk1", "size": 48 << 20})
    r["query-block-resized"] = await qmp.execute("query-block")
    go()

    await con.wait_step("sdb-deleted")
    await qmp.execute("device_del", {"id": "hd1"})
    r["drive-removed"], _ = await ev.wait("DRIVE_REMOVED", device="hd1")
    r["hd1-deleted"], _ = await ev.wait("DEVICE_DELETED", device="hd1")
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
            e, _ = await ev.wait("DEVICE_FAILED", device=name)
            r[f"{name}-failed"] = e
            if "went wrong" in e["data"]["reason"]:
                break
    misc = next(x for x in await qmp.execute("query-remote") if x["id"] == "misc")
    os.kill(misc["pid"], signal.SIGSTOP)
    t_stop = time.monotonic()
    e, _ = await ev.wait("REMOTE_HUNG", id="misc", timeout=30)
    r["remote-hung"] = e
    r["hung-after-s"] = time.monotonic() - t_stop
    r["query-remote-hung"] = await qmp.execute("query-remote")
    go()

    await con.wait_step("read-hung")
    os.kill(misc["pid"], signal.SIGKILL)
    t_kill = time.monotonic()
    e, _ = await ev.wait("REMOTE_DIED", id="misc", timeout=30)
    r["remote-died"] = e
    r["died-after-s"] = time.monotonic() - t_kill
    r["query-remote-dead"] = await qmp.execute("query-remote")
    r["query-status-after-death"] = await qmp.execute("query-status")
    go()

    await con.wait_step("dead-read")
    await expect_error(qmp, "restart-unknown", "remote-restart", {"id": "nowhere"})
    await qmp.execute("remote-restart", {"id": "misc"})
    r["remote-restarted"], _ = await ev.wait("REMOTE_RESTARTED", id="misc")
    for _ in range(100):  # until the first heartbeat of the new process
        remotes = await qmp.execute("query-remote")
        misc = next(x for x in remotes if x["id"] == "misc")
        if misc["state"] == "running":
            break
        await asyncio.sleep(0.1)
    r["query-remote-restarted"] = remotes
    go()

    await con.wait_step("done")
    try:
        e, _ = await ev.wait("SHUTDOWN", timeout=120)
        r["shutdown"] = e
    except Exception as x:  # the VM may end before we read it
        r["shutdown"] = str(x)
    try:
        await qmp.disconnect()
    except Exception:
        pass
    results["host-exit"] = host.wait(timeout=120)
    save()


try:
    asyncio.run(main())
except Exception as x:
    results["failure"] = f"{type(x).__name__}: {x}"
    save()
    for h in HOST_PROC:  # never leave the VM waiting for a step
        h.kill()
    print(f"qmp_driver: {results['failure']}", file=sys.stderr)
    sys.exit(1)
save()
print("qmp_driver: done")
