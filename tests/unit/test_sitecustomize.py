"""The serving image's start-up request for Intel AMX (images/serving/sitecustomize.py)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SITECUSTOMIZE = Path(__file__).resolve().parents[2] / "images" / "serving" / "sitecustomize.py"


def _has_amx() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def test_a_fresh_interpreter_is_granted_amx_when_the_cpu_has_it() -> None:
    """Run as Python runs it in the image: first thing, in a new process."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('sitecustomize', {str(SITECUSTOMIZE)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "print(module.AMX_GRANTED)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == str(_has_amx())


@pytest.mark.skipif(not _has_amx(), reason="this CPU has no AMX")
def test_asking_twice_is_harmless() -> None:
    spec = importlib.util.spec_from_file_location("amx_again", SITECUSTOMIZE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.request_amx_permission() is True
