"""Run by every Python process of the serving image at start-up (PYTHONPATH=/opt/tramontane).

Intel AMX: on CPUs that have it, Linux lets a process use the AMX tile registers only after it
has asked (arch_prctl ARCH_REQ_XCOMP_PERM); a process that uses them without asking is killed
with SIGILL, and the request fails once a thread with a too-small signal stack exists. vLLM's CPU
kernels (bf16 attention, oneDNN matmuls) pick AMX from CPUID. On our real node, a scaled-out
engine's worker process died of SIGILL (exit code -4) on its first request while the first
replica served. Asking here, before the interpreter has started any thread, grants it to every
process of the pod (engine workers are spawned as new interpreters, so they ask too).
"""

from __future__ import annotations

import ctypes
import os

_SYS_ARCH_PRCTL = 158  # x86_64
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


def request_amx_permission() -> bool:
    """True when the kernel granted AMX use to this process (False without AMX: harmless)."""
    if os.uname().machine != "x86_64":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0)
    except (OSError, AttributeError):
        return False


AMX_GRANTED = request_amx_permission()
