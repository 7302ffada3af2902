"""What the QMP drivers of the whole-system tests share (tests/qmp_driver.py,
tests/reset_driver.py): starting `host run --qmp` with its standard input
(the guest's console input) in our hands, connecting QEMU's own client
(qemu.qmp) to it, following the guest's `STEP name` lines in the console
log, collecting events, and writing what was observed to a JSON file for
the Rust test to check.

Usage (both drivers): DRIVER HOST CONFIG QMP_SOCKET CONSOLE_LOG RESULTS_JSON
"""

import asyncio
import json
import os
import subprocess
import sys
import time

from qemu.qmp import QMPClient

HOST, CONFIG, SOCK, CONSOLE, RESULTS = sys.argv[1:6]
T0 = time.monotonic()
results = {"steps": [], "events": [], "replies": {}, "errors": {}}
_host_procs = []


def now():
    """Seconds since the driver started."""
    return round(time.monotonic() - T0, 2)


def save():
    with open(RESULTS, "w") as f:
        json.dump(results, f, indent=1, default=str)


class Console:
    """Follows the console log for `STEP name` lines, one after another."""

    def __init__(self, path=CONSOLE):
        self.path = path
        self.pos = 0
        self.buf = ""

    async def wait_step(self, name, timeout=240.0):
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
                results["steps"].append([name, now()])
                save()
                return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"the guest never printed `{needle}`")


class Events:
    """Collects every event; waits for one by name and data members."""

    def __init__(self, qmp):
        self.qmp = qmp
        self.seen = []

    async def wait(self, name, timeout=30.0, **match):
        t0 = time.monotonic()
        while True:
            for i, e in enumerate(self.seen):
                data = e.get("data", {})
                if e["event"] == name and all(data.get(k) == v for k, v in match.items()):
                    self.seen.pop(i)
                    return e
            left = timeout - (time.monotonic() - t0)
            if left <= 0:
                raise TimeoutError(f"no {name} event {match} within {timeout} s")
            try:
                ev = await asyncio.wait_for(self.qmp.events.get(), left)
            except asyncio.TimeoutError:
                continue
            ev = dict(ev)
            ev["at"] = now()
            results["events"].append(ev)
            save()
            self.seen.append(ev)


def spawn_host(config=CONFIG, sock=SOCK, extra=()):
    """Starts `host run CONFIG --qmp SOCK` (plus `extra` arguments), its
    standard input (the guest's console input) in our hands; its stderr
    goes to CONFIG.host-stderr."""
    host = subprocess.Popen(
        [HOST, "run", config, "--qmp", sock, *extra],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=open(config + ".host-stderr", "w"),
        env=dict(os.environ, HOST_STATS="1", HOST_MIGRATE_VERIFY=os.environ.get("HOST_MIGRATE_VERIFY", "1"), HOST_LOG=os.environ.get("HOST_LOG", "warn,host::monitor::restart=info,host::pci::root=info,host::remote=info,host::snapshot=info,host::monitor::handover=info")),
    )
    host.qmp_sock = sock  # for a debug report on failure
    _host_procs.append(host)
    return host


_remote_procs = []


def spawn_remote_host(config, remote, socket_dir, devices, timeout=60.0):
    """Starts `remote-host serve` for `remote` of `config` as an
    orchestrator would (no control channel of the VMM's), its devices'
    sockets in `socket_dir`, and waits (bounded) until each of `devices`
    listens there. Killed when the driver ends."""
    os.makedirs(socket_dir, exist_ok=True)
    rh = subprocess.Popen(
        [os.path.join(os.path.dirname(HOST), "remote-host"), "serve", "--config", config,
         "--remote", remote, "--protocol", "vfio-user", "--socket", socket_dir],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(os.path.dirname(config), f"{remote}.rh-stderr"), "w"),
    )
    _remote_procs.append(rh)
    deadline = time.monotonic() + timeout
    for d in devices:
        path = os.path.join(socket_dir, f"{d}.sock")
        while not os.path.exists(path):
            if rh.poll() is not None:
                raise RuntimeError(f"remote-host for {remote} exited with {rh.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"remote-host for {remote}: no {path}")
            time.sleep(0.05)
    return rh


def gone(pid, timeout=30.0):
    """Whether process `pid` is gone within `timeout` s (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{pid}"):
            return True
        time.sleep(0.05)
    return False


async def connect_qmp(client_name, sock=SOCK, host=None, timeout=60.0):
    """Connects QEMU's client to the monitor at `sock` (bounded; fails at
    once if `host` ended meanwhile)."""
    qmp = QMPClient(client_name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if host is not None and host.poll() is not None:
            raise RuntimeError(f"host exited with {host.returncode} before its monitor answered")
        if os.path.exists(sock):
            try:
                await qmp.connect(sock)
                return qmp
            except Exception:  # not listening yet
                pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the QMP socket {sock} never answered")


def sayer(host):
    """say(line) types a line on the guest's console input of `host`."""

    def say(line):
        host.stdin.write(line.encode() + b"\n")
        host.stdin.flush()

    return say


async def start_vm(client_name, config=CONFIG, extra=()):
    """Starts `host run CONFIG --qmp SOCK` (`config` and `extra` arguments
    if given) and connects to its monitor. Returns (host process, QMP
    client, say) where say(line) types a line on the guest's console
    input."""
    host = spawn_host(config, SOCK, extra)
    qmp = await connect_qmp(client_name, SOCK, host)
    results["greeting"] = str(qmp.greeting)
    return host, qmp, sayer(host)


async def finish(host, qmp, events, timeout=120):
    """After the guest's last step: the SHUTDOWN event, then host's exit."""
    try:
        results["replies"]["shutdown"] = await events.wait("SHUTDOWN", timeout=timeout)
    except Exception as x:  # the VM may end before we read it
        results["replies"]["shutdown"] = str(x)
    try:
        await qmp.disconnect()
    except Exception:
        pass
    results["host-exit"] = host.wait(timeout=timeout)
    results["seconds"] = now()


async def migration_status(qmp, want, timeout=300.0):
    """query-migrate until its status is one of `want` (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = await qmp.execute("query-migrate")
        if st.get("status") in want:
            return st
        await asyncio.sleep(0.05)
    raise TimeoutError(f"the migration never reached {want}")


async def live_migrate(host, qmp, replace, before_b=None):
    """Live-migrates the running VM over unix: to a second VM (B), started
    with `--incoming` from CONFIG with the `replace` substitutions made
    (its own console log, remote logs, sockets; `before_b(config)` runs
    first when given); quits the source once
    the migration completed. Records what a test checks under
    results["replies"]: "migrated" (query-migrate), "source-status",
    "source-exit", "source-remotes-gone", "source-verify" (the source's
    copy check lines), "status-b". Returns B's host, monitor and events."""
    d = os.path.dirname(CONFIG)
    with open(CONFIG) as f:
        text = f.read()
    for old, new in replace.items():
        text = text.replace(old, new)
    cfg_b = os.path.join(d, "vm-b.toml")
    with open(cfg_b, "w") as f:
        f.write(text)
    if before_b is not None:
        # What B needs before it starts (an orchestrated remote of its own).
        before_b(cfg_b)
    uri = "unix:" + SOCK + ".mig"
    bhost = spawn_host(cfg_b, SOCK + ".b", ["--incoming", uri])
    r = results["replies"]
    # B listens before its monitor is up; the source retries its
    # connection until then (bounded).
    for _ in range(300):
        await qmp.execute("migrate", {"uri": uri})
        st = await migration_status(qmp, ("completed", "failed", "cancelled"))
        if st.get("status") == "completed" or "connecting" not in st.get("error-desc", ""):
            break
        await asyncio.sleep(0.1)
    r["migrated"] = st
    r["source-status"] = (await qmp.execute("query-status"))["status"]
    pids = [x["pid"] for x in await qmp.execute("query-remote") if x.get("pid")]
    await qmp.execute("quit")
    r["source-exit"] = host.wait(timeout=60)
    r["source-remotes-gone"] = all(gone(p) for p in pids)
    try:
        await qmp.disconnect()
    except Exception:
        pass
    with open(CONFIG + ".host-stderr", errors="replace") as f:
        r["source-verify"] = [ln.strip() for ln in f if "migration verify" in ln]
    save()
    bqmp = await connect_qmp("vm-b", SOCK + ".b", bhost)
    r["status-b"] = (await bqmp.execute("query-status"))["status"]
    return bhost, bqmp, Events(bqmp)


async def debug_reports():
    """QMP `x-debug-report` of every host still running (bounded)."""
    out = []
    for h in _host_procs:
        if h.poll() is not None:
            continue
        qmp = QMPClient("debug-report")
        try:
            await asyncio.wait_for(qmp.connect(h.qmp_sock), 10)
            r = await asyncio.wait_for(qmp.execute("x-debug-report"), 30)
            out.append(r["report"])
        except Exception as x:
            out.append(f"host {h.pid}: no debug report: {type(x).__name__}: {x}")
        finally:
            try:
                await qmp.disconnect()
            except Exception:
                pass
    results["debug-reports"] = out


def run(main, name):
    """Runs the driver's `main` coroutine; on any failure records it, kills
    the VM (never leave it waiting for a step) and exits 1."""
    try:
        asyncio.run(main())
    except Exception as x:
        results["failure"] = f"{type(x).__name__}: {x}"
        save()
        # Before the kill: what each VM still running was doing (a guest
        # that went quiet: its vCPUs' registers and last exits).
        try:
            asyncio.run(debug_reports())
        except Exception as y:
            results["debug-reports"] = [f"none: {type(y).__name__}: {y}"]
        save()
        for h in _host_procs + _remote_procs:
            h.kill()
        print(f"{name}: {results['failure']}", file=sys.stderr)
        sys.exit(1)
    for rh in _remote_procs:
        rh.kill()
    save()
    print(f"{name}: done")
