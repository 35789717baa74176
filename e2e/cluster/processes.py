"""This cluster's processes: found by the state directory in their command line, started in a
session of their own (they outlive `make cluster`), health-checked, stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

from cluster.base import STATE, ClusterError


def _read_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def find(names_by_binary: Mapping[str, str]) -> dict[str, list[int]]:
    """Every live process whose command line names this cluster's state directory, by the name
    of its binary's component (`names_by_binary`); other binaries are left out."""
    marker = str(STATE) + "/"
    found: dict[str, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        cmdline = _read_cmdline(pid)
        if not cmdline or not any(marker in part for part in cmdline[1:]):
            continue
        component = names_by_binary.get(Path(cmdline[0]).name)
        if component is not None:
            found.setdefault(component, []).append(pid)
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def terminate(pids: list[int]) -> None:
    """SIGTERM, then SIGKILL what is still alive after 15 s."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def kill(pids: list[int]) -> None:
    """SIGKILL, as a crash, and wait until they are gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    while any(alive(p) for p in pids):
        time.sleep(0.1)


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def spawn(name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
    """Start argv with its output appended to logs/<name>.log; its pid goes in run/<name>.pid."""
    logs = STATE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (STATE / "run").mkdir(parents=True, exist_ok=True)
    with (logs / f"{name}.log").open("ab") as log_file:
        log_file.write(f"\n==== {time.strftime('%F %T')} starting {name}\n".encode())
        log_file.flush()
        process = subprocess.Popen(
            argv,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # outlives `make cluster`; stopped by `down`
            env={**os.environ, **(env or {})},
            cwd=STATE,
        )
    (STATE / "run" / f"{name}.pid").write_text(str(process.pid))
    return process.pid


def wait(what: str, check: Callable[[], bool], timeout: float, pid: int | None = None) -> None:
    """Until check() holds; a process `pid` that exits meanwhile fails at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if pid is not None and not alive(pid):
            raise ClusterError(
                f"{what} exited during start-up; see {STATE / 'logs' / (what + '.log')}"
            )
        time.sleep(0.25)
    raise ClusterError(
        f"{what} was not healthy after {timeout:.0f}s; see {STATE / 'logs' / (what + '.log')}"
    )


def https_ok(url: str, client: str | None = None, verify: bool = True) -> bool:
    pki = STATE / "pki"
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if client:
        context.load_cert_chain(pki / f"{client}.crt", pki / f"{client}.key")
    try:
        with urllib.request.urlopen(url, context=context, timeout=3) as response:  # noqa: S310 (https only)
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:  # noqa: S310 (http only)
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False
