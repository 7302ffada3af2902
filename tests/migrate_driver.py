#!/usr/bin/env python3
"""Drives tests/host_migrate.rs. The guest writes and reads back
checksummed blocks through the remote LSI without pause; meanwhile:

1. `stop`/`cont` once, and a `migrate` URI this VMM does not take;
2. a live migration over tcp: to a destination (X) is cancelled during
   pre-copy (bandwidth capped so that it lasts): the source runs on and
   X, whose stream was cut, ends with an error;
3. live migration A -> B over tcp: (loopback); then a PCI function is
   hot-added to B (dma-example in its remote, `dma1` at slot 9), which
   the config the next VMs start from does not have: a destination (N)
   started with `--incoming defer` and given the stream without it
   refuses it (it exits with an error; B runs on), and the next ones
   (`--incoming defer`, then `device_add` of the same function, then
   `migrate-incoming`) take it: B -> C over unix: with
   `x-remote-handover` (B's remote process, with its devices' state, is
   handed to C: nothing of it is copied, and it outlives B), C -> E over
   tcp: again (copied), each source stopped after it and then quit;
4. E is snapshotted to a file (`migrate file:`) and killed with its
   remote; D starts from the file (`--incoming defer`, the function
   added, `migrate-incoming file:`);
5. the guest is told to finish on D, and powers off.

Each VM has its own config (vm-X.toml beside CONFIG: the same machine,
its own console log and monitor socket). Every step waits until the
guest made progress on the VM now running.

Usage: migrate_driver.py HOST CONFIG QMP_SOCKET CONSOLE_LOG RESULTS_JSON
"""

import asyncio
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_common import (  # noqa: E402
    SOCK, Console, Events, connect_qmp, finish, gone, migration_status, results, run, save, sayer, spawn_host)
from qemu.qmp import ExecuteError  # noqa: E402

DIR = os.path.dirname(sys.argv[2])
SNAP = os.path.join(DIR, "vm.snap")
r = results["replies"]


def cfg(name):
    return os.path.join(DIR, f"vm-{name}.toml")


def sock(name):
    return f"{SOCK}.{name}"


async def error_of(qmp, cmd, args):
    try:
        await qmp.execute(cmd, args)
        return "no error"
    except ExecuteError as e:
        return str(e)


async def rounds_on(name, more=5, timeout=240.0):
    """Waits until the guest printed `more` rounds on VM `name`'s console."""
    path = os.path.join(DIR, f"console-{name}.log")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path, errors="replace") as f:
                if f.read().count("\nround ") >= more:
                    return
        except FileNotFoundError:
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError(f"no progress of the guest on VM {name}")


def exit_of(host, timeout=60):
    """A destination's exit code once it ended by itself (killed, and the
    reason, if it did not within `timeout` s)."""
    try:
        return host.wait(timeout=timeout)
    except Exception as e:
        host.kill()
        return str(e)


def rounds_seen(name):
    try:
        with open(os.path.join(DIR, f"console-{name}.log"), errors="replace") as f:
            return f.read().count("\nround ")
    except FileNotFoundError:
        return 0


async def remote_pids(qmp):
    return [x["pid"] for x in await qmp.execute("query-remote") if x.get("pid")]


# The function hot-added to B, as every later VM gets it again.
DMA1 = {"driver": "dma-example", "id": "dma1", "remote": "storage", "addr": "0x9"}


async def deferred(name, uri, add=True):
    """Starts VM `name` with `--incoming defer`, adds the hot-added
    function (`add`) and has it listen on (or read) `uri`; returns the
    host and its monitor."""
    dst = spawn_host(cfg(name), sock(name), ["--incoming", "defer"])
    q = await connect_qmp(f"vm-{name}", sock(name), dst)
    r[f"status-waiting-{name}"] = (await q.execute("query-status"))["status"]
    r[f"own-remote-pids-{name}"] = await remote_pids(q)
    if add:
        await q.execute("device_add", DMA1)
    await q.execute("migrate-incoming", {"uri": uri})
    return dst, q


async def live_hop(src, src_qmp, name, uri, defer=False, handover=False):
    """Migrates the running VM from `src` to a new VM `name` listening on
    `uri` (started with `--incoming defer` and given the hot-added
    function first when `defer`; the source's remotes handed over with
    `handover`); returns (the new host, its monitor). The source is quit
    after."""
    await src_qmp.execute("migrate-set-parameters", {"x-remote-handover": handover})
    if defer:
        dst, q = await deferred(name, uri)
        await q.disconnect()
    else:
        dst = spawn_host(cfg(name), sock(name), ["--incoming", uri])
    # The destination listens before its monitor is up; the source retries
    # its connection until then (bounded).
    for _ in range(300):
        await src_qmp.execute("migrate", {"uri": uri})
        st = await migration_status(src_qmp, ("completed", "failed", "cancelled"))
        if st["status"] == "completed" or "connecting" not in st.get("error-desc", ""):
            break
        await asyncio.sleep(0.1)
    r[f"hop-{name}"] = st
    r[f"status-source-before-{name}"] = (await src_qmp.execute("query-status"))["status"]
    dst_qmp = await connect_qmp(f"vm-{name}", sock(name), dst)
    # A deferred destination's monitor answers before the hand-over ends.
    for _ in range(600):
        r[f"status-{name}"] = (await dst_qmp.execute("query-status"))["status"]
        if r[f"status-{name}"] != "inmigrate":
            break
        await asyncio.sleep(0.05)
    pids = await remote_pids(src_qmp)
    r[f"source-remote-states-before-{name}"] = [
        x["state"] for x in await src_qmp.execute("query-remote")]
    await src_qmp.execute("quit")
    r[f"source-exit-before-{name}"] = src.wait(timeout=60)
    if handover:
        # The source's remotes are the destination's now: alive after the
        # source ended, with the pids the destination reports; the
        # destination's own ones, spawned at its start, are gone.
        r[f"handed-pids-{name}"] = pids
        r[f"handed-alive-{name}"] = [os.path.exists(f"/proc/{p}") for p in pids]
        r[f"remote-pids-{name}"] = await remote_pids(dst_qmp)
        r[f"own-remotes-gone-{name}"] = all(
            gone(p) for p in r.get(f"own-remote-pids-{name}", []))
    else:
        r[f"source-remotes-gone-before-{name}"] = all(gone(p) for p in pids)
    try:
        await src_qmp.disconnect()
    except Exception:
        pass
    save()
    await rounds_on(name)
    return dst, dst_qmp


async def main():
    a = spawn_host(cfg("a"), sock("a"))
    qa = await connect_qmp("vm-a", sock("a"), a)
    await Console(os.path.join(DIR, "console-a.log")).wait_step("writing", timeout=300)

    # 1. stop/cont, a URI we do not take.
    r["bad-uri"] = await error_of(qa, "migrate", {"uri": "exec:cat > x"})
    await qa.execute("stop")
    r["status-stopped"] = (await qa.execute("query-status"))["status"]
    await qa.execute("cont")
    r["status-cont"] = (await qa.execute("query-status"))["status"]

    # 2. Cancel during pre-copy: 16 MiB/s makes RAM's first round last seconds.
    x = spawn_host(cfg("x"), sock("x"), ["--incoming", "tcp:127.0.0.1:4441"])
    await qa.execute("migrate-set-parameters", {"max-bandwidth": 16 << 20})
    for _ in range(300):
        await qa.execute("migrate", {"uri": "tcp:127.0.0.1:4441"})
        st = await qa.execute("query-migrate")
        while st.get("status") in ("setup", "active") and st["ram"]["transferred"] < (4 << 20):
            await asyncio.sleep(0.05)
            st = await qa.execute("query-migrate")
        if st.get("status") == "active":
            break
        await asyncio.sleep(0.1)
    r["cancel-at"] = st
    await qa.execute("migrate_cancel")
    r["cancelled"] = await migration_status(qa, ("cancelled", "failed", "completed"))
    r["status-after-cancel"] = (await qa.execute("query-status"))["status"]
    r["x-exit"] = exit_of(x)
    await qa.execute("migrate-set-parameters", {"max-bandwidth": 0})
    await qa.execute("migrate-set-parameters", {"downtime-limit": 300})
    r["params"] = await qa.execute("query-migrate-parameters")
    save()
    await rounds_on("a", more=20)

    # 3. Live: A -> B over TCP; a function hot-added to B; a destination
    # without it refuses the stream; B -> C over a UNIX socket, handing
    # B's remote over, and C -> E over TCP to destinations given it first.
    await qa.execute("migrate-set-parameters", {"x-remote-handover": True})
    r["handover-over-tcp"] = await error_of(qa, "migrate", {"uri": "tcp:127.0.0.1:4449"})
    b, qb = await live_hop(a, qa, "b", "tcp:127.0.0.1:4442")
    r["add-dma1"] = await qb.execute("device_add", DMA1)
    n, qn = await deferred("n", "tcp:127.0.0.1:4444", add=False)
    r["n-cont"] = await error_of(qn, "cont", {})
    r["n-again"] = await error_of(qn, "migrate-incoming", {"uri": "tcp:127.0.0.1:4445"})
    await qb.execute("migrate", {"uri": "tcp:127.0.0.1:4444"})
    r["refused"] = await migration_status(qb, ("completed", "failed", "cancelled"))
    r["status-after-refused"] = (await qb.execute("query-status"))["status"]
    r["n-exit"] = exit_of(n)
    save()
    await rounds_on("b", more=rounds_seen("b") + 5)
    c, qc = await live_hop(
        b, qb, "c", "unix:" + os.path.join(os.path.dirname(SOCK), "mig.sock"), defer=True,
        handover=True)
    c, qc = await live_hop(c, qc, "e", "tcp:127.0.0.1:4443", defer=True)

    # 4. Snapshot E to a file, kill it and its remote, restore as D.
    await qc.execute("migrate", {"uri": "file:" + SNAP})
    r["snapshot"] = await migration_status(qc, ("completed", "failed", "cancelled"))
    r["status-after-snapshot"] = (await qc.execute("query-status"))["status"]
    r["snapshot-bytes"] = os.path.getsize(SNAP) if os.path.exists(SNAP) else 0
    pids = await remote_pids(qc)
    c.kill()
    c.wait(timeout=60)
    r["e-remotes-gone"] = all(gone(p) for p in pids)
    try:
        await qc.disconnect()
    except Exception:
        pass
    save()
    d, qd = await deferred("d", "file:" + SNAP)
    evd = Events(qd)
    for _ in range(600):
        r["status-d"] = (await qd.execute("query-status"))["status"]
        if r["status-d"] != "inmigrate":
            break
        await asyncio.sleep(0.05)
    r["pci-d"] = [f["qdev_id"] for f in (await qd.execute("query-pci"))[0]["devices"]]
    await rounds_on("d")

    # 5. The guest finishes on D.
    sayer(d)("go")
    await Console(os.path.join(DIR, "console-d.log")).wait_step("done", timeout=300)
    await finish(d, qd, evd)


run(main, "migrate_driver")
