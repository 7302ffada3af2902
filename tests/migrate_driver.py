#!/usr/bin/env python3
"""Drives tests/host_migrate.rs: while the guest writes and reads back
checksummed blocks through the remote LSI, `stop`/`cont` once, then
snapshot it with `migrate file:` (QEMU's syntax), kill the VMM and its
remote, and start a new VMM from the snapshot (`host run --incoming`),
where the guest's job must go on to its end.

Usage: migrate_driver.py HOST CONFIG QMP_SOCKET CONSOLE_LOG RESULTS_JSON
(the restored VM's config is vm2.toml beside CONFIG: the same machine,
its own console log).
"""

import asyncio
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_common import CONFIG, SOCK, Console, Events, finish, results, run, save, start_vm  # noqa: E402
from qemu.qmp import ExecuteError  # noqa: E402

DIR = os.path.dirname(CONFIG)
SNAP = os.path.join(DIR, "vm.snap")


async def error_of(qmp, cmd, args):
    try:
        await qmp.execute(cmd, args)
        return "no error"
    except ExecuteError as e:
        return str(e)


async def migration_end(qmp, timeout=180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = await qmp.execute("query-migrate")
        if st.get("status") in ("completed", "failed", "cancelled"):
            return st
        await asyncio.sleep(0.1)
    raise TimeoutError("the migration never ended")


def gone(pid, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{pid}"):
            return True
        time.sleep(0.05)
    return False


async def main():
    r = results["replies"]
    host, qmp, _ = await start_vm("migrate-source")
    ev = Events(qmp)
    con = Console()
    await con.wait_step("writing")
    r["bad-uri"] = await error_of(qmp, "migrate", {"uri": "exec:cat > x"})
    await qmp.execute("stop")
    r["status-stopped"] = (await qmp.execute("query-status"))["status"]
    await qmp.execute("cont")
    r["status-cont"] = (await qmp.execute("query-status"))["status"]
    await qmp.execute("migrate", {"uri": "file:" + SNAP})
    r["migrate"] = await migration_end(qmp)
    r["status-after"] = (await qmp.execute("query-status"))["status"]
    r["snapshot-bytes"] = os.path.getsize(SNAP) if os.path.exists(SNAP) else 0
    pids = [x["pid"] for x in await qmp.execute("query-remote") if x.get("pid")]
    save()
    # Everything of the source goes: the VMM by SIGKILL, and its remote
    # (which ends when its VMM's control channel closes).
    host.kill()
    host.wait(timeout=60)
    r["source-remotes-gone"] = all(gone(p) for p in pids)
    r["source-remote-pids"] = pids
    try:
        await qmp.disconnect()
    except Exception:
        pass
    os.unlink(SOCK) if os.path.exists(SOCK) else None
    save()
    host2, qmp2, _ = await start_vm(
        "migrate-destination",
        config=os.path.join(DIR, "vm2.toml"),
        extra=["--incoming", "file:" + SNAP],
    )
    ev2 = Events(qmp2)
    r["status-restored"] = (await qmp2.execute("query-status"))["status"]
    await Console(os.path.join(DIR, "console2.log")).wait_step("done", timeout=600)
    await finish(host2, qmp2, ev2)


run(main, "migrate_driver")
