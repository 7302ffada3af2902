#!/usr/bin/env python3
"""Drives the qmp_demo monitor with QEMU's own Python QMP library.

Usage: qemu_qmp_client.py SOCKET

Run by tests/qemu_qmp.rs. Two phases, both with the PyPI package
`qemu.qmp`, a client we did not write:
1. the synchronous `qemu.qmp.legacy.QEMUMonitorProtocol` (what QEMU's
   iotests and machine.py use): connect, negotiate, commands, raw messages
   with our own ids, an event, close;
2. two asynchronous `qemu.qmp.QMPClient`s at once: greeting, query-status,
   query-commands, an unknown command (ExecuteError, CommandNotFound), a bad
   argument (GenericError), an event seen by both, quit.
Exits 0 when every check held; prints what it checked.
"""

import asyncio
import sys

from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

TIMEOUT = 10.0


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"ok: {what}", flush=True)


def legacy_phase(path):
    mon = QEMUMonitorProtocol(path)
    mon.settimeout(TIMEOUT)
    greeting = mon.connect(negotiate=True)
    check(greeting["QMP"]["version"]["qemu"] == {"micro": 0, "minor": 0, "major": 0}
          and greeting["QMP"]["capabilities"] == [],
          f"legacy: greeting {greeting}")
    check(mon.cmd("query-status") == {"status": "running", "running": True},
          "legacy: query-status")
    reply = mon.cmd_obj({"execute": "query-status", "id": "mine-1"})
    check(reply == {"return": {"status": "running", "running": True},
                    "id": "mine-1"},
          f"legacy: raw message, id echoed: {reply}")
    reply = mon.cmd_raw("no-such-command")
    check(reply.get("error", {}).get("class") == "CommandNotFound",
          f"legacy: raw unknown command: {reply}")
    reply = mon.cmd_obj({"execute": "qmp_capabilities"})
    check(reply["error"]["desc"]
          == "Capabilities negotiation is already complete, command ignored",
          "legacy: second qmp_capabilities refused")
    check(mon.cmd("emit-test-event", tag="legacy") == {}, "legacy: emit-test-event")
    event = mon.pull_event(wait=TIMEOUT)
    check(event["event"] == "TEST_EVENT" and event["data"] == {"tag": "legacy"}
          and isinstance(event["timestamp"]["seconds"], int)
          and 0 <= event["timestamp"]["microseconds"] < 1_000_000,
          f"legacy: event {event}")
    mon.close()


async def async_phase(path):
    a = QMPClient("a")
    b = QMPClient("b")
    await asyncio.wait_for(a.connect(path), TIMEOUT)
    await asyncio.wait_for(b.connect(path), TIMEOUT)
    check(a.greeting is not None
          and a.greeting.QMP.version["package"].startswith("rust-vmm-remote"),
          f"async: greeting parsed by QMPClient: {a.greeting}")

    status = await a.execute("query-status")
    check(status == {"status": "running", "running": True}, "async: query-status")

    names = {c["name"] for c in await a.execute("query-commands")}
    want = {"qmp_capabilities", "query-commands", "query-status",
            "emit-test-event", "quit"}
    check(want <= names, f"async: query-commands lists {sorted(names)}")

    try:
        await a.execute("no-such-command")
        check(False, "async: unknown command refused")
    except ExecuteError as err:
        check(err.error_class == "CommandNotFound"
              and err.error.error.desc == "The command no-such-command has not been found",
              f"async: unknown command -> ExecuteError {err.error_class}: {err.error.error.desc}")

    try:
        await a.execute("emit-test-event", {"tag": 5})
        check(False, "async: bad argument refused")
    except ExecuteError as err:
        check(err.error_class == "GenericError"
              and err.error.error.desc == "Invalid parameter type for 'tag', expected: string",
              f"async: bad argument -> ExecuteError {err.error_class}: {err.error.error.desc}")

    # Commands in flight at once on one connection, matched by id.
    results = await asyncio.gather(*(a.execute("query-status") for _ in range(20)))
    check(all(r["running"] for r in results), "async: 20 concurrent executes")

    await a.execute("emit-test-event", {"tag": "hello"})
    for client in (a, b):
        event = await asyncio.wait_for(client.events.get(), TIMEOUT)
        check(event["event"] == "TEST_EVENT" and event["data"] == {"tag": "hello"},
              f"async: client {client.name} got {dict(event)}")

    check(await a.execute("quit") == {}, "async: quit")
    for client in (a, b):
        event = await asyncio.wait_for(client.events.get(), TIMEOUT)
        check(event["event"] == "SHUTDOWN", f"async: client {client.name} got SHUTDOWN")
    for client in (a, b):
        try:
            await client.disconnect()
        except EOFError:
            pass  # the server hung up first, as QEMU does after quit
    print("ok: all checks passed", flush=True)


def main():
    path = sys.argv[1]
    legacy_phase(path)
    asyncio.run(async_phase(path))


if __name__ == "__main__":
    main()
