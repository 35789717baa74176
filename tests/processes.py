"""Background servers of the tests (collector, Prometheus): start, wait until ready, stop."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def start_process(
    argv: Sequence[str],
    log_path: Path,
    ready: Callable[[], bool],
    what: str,
    *,
    timeout: float,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start argv with its output in log_path; return once ready() holds. A process that exits
    or is not ready in time is stopped and reported with where its log is."""
    with log_path.open("ab") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process, grace=5)
            raise RuntimeError(f"{what} did not start: see {log_path}")
        time.sleep(0.1)
    return process


def stop_process(process: subprocess.Popen[bytes] | None, grace: float) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)
