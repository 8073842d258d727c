"""The stack under test and the workers measured behind it.

``BenchStack(workdir, frontend_python)`` starts etcd and NATS (from the wheels) and ONE real
Dynamo 1.6.1 frontend (etcd discovery, tcp request plane, NATS event plane), all on
127.0.0.1 with free ports; ``stop()`` ends them, also after a failure (it is a context
manager). Each ``Target`` is then served one after the other behind that frontend:
``stack.serve(target)`` starts the worker process, waits until the frontend lists its model
and returns a ``RunningTarget``; ``RunningTarget.stop()`` ends it (SIGTERM, then SIGKILL).

The targets come in like-for-like pairs, ours against Dynamo's (``PAIRS``):

* ``a`` / ``c``: the same engine semantics on both runtimes (tokens ``1..max_tokens``, one
  ``asyncio.sleep(0)`` per token, ``max_tokens`` from the request), KV publishing off on both
  (``--disable-kv-routing``);
* ``a-kv`` / ``c-kv``: the same, KV publishing on for both: per request one ``stored`` event
  when it starts and one ``removed`` event when it ends, and 10 Hz load snapshots;
* ``f`` (no pair): ``bench.ceiling_worker``, the cheapest worker the runtime can be; its
  frontend CPU per token is the frontend's own ceiling that every target is reported against;
* ``b`` / ``d``: the rendered mocker example against Dynamo's Rust mocker at the same
  ``--speedup-ratio`` (100) and the same scheduler defaults (block size 64, 256 sequences,
  8192-token budget, 16384 blocks), both with prefix caching and KV events on. The example runs
  with ``--device none`` (Dynamo's mocker does no device work either) and one token per item.

Every target has its own namespace and model name, so a late-leaving worker of one target can
never receive another target's requests. Dynamo's own workers run with ``--event-plane nats``:
their ZMQ publishers would otherwise bind 0.0.0.0 (backend_common's docs/wire-protocol.md,
"The ZMQ event plane"), and their ``DYN_SYSTEM_PORT`` comes from ``free_system_port``
(Dynamo refuses ports above 32767).
"""

from __future__ import annotations

import os
import shlex
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from backend_common.devstack.frontend import (
    Frontend,
    free_system_port,
    hermetic_env,
    worker_env,
)
from backend_common.devstack.services import EtcdServer, ManagedProcess, NatsServer

__all__ = [
    "CEILING",
    "PAIRS",
    "TARGETS",
    "BenchStack",
    "ProcessStats",
    "RunningTarget",
    "Target",
    "vm_rss_kib",
]

REPO = Path(__file__).resolve().parent.parent
RUNTIME_SRC = REPO / "template" / "src"
MOCKER_SRC = REPO / "examples" / "mocker-cuda" / "src"
READY_TIMEOUT_S = 120.0
SPEEDUP_RATIO = "100"
# The scheduler settings both mockers get, spelled out (they are both mockers' defaults) so that
# the launch lines show them and a change of either default cannot skew the pair.
MOCKER_SCHEDULER = [
    "--block-size",
    "64",
    "--max-num-seqs",
    "256",
    "--max-num-batched-tokens",
    "8192",
    "--num-gpu-blocks-override",
    "16384",
]

PAIRS: tuple[tuple[str, str], ...] = (("a", "c"), ("a-kv", "c-kv"), ("b", "d"), ("e", "f"))
"""(ours, theirs): the comparisons the report makes. (e)/(f), the vLLM pair, has its own
targets, model and result file (``bench.vllm_pair``)."""

CEILING = "z"
"""The target whose frontend CPU per token is the frontend's own ceiling (no pair)."""


@dataclass(frozen=True)
class Launch:
    """What to execute for one target: argv, extra environment, the model name to request."""

    argv: list[str]
    env: dict[str, str]
    model: str

    def command_line(self) -> str:
        """The launch line to rerun by hand (paths as on this machine)."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (env + " " if env else "") + shlex.join(self.argv)


@dataclass(frozen=True)
class Target:
    key: str  # the name used in the issue and the report: a, a-kv, b, c, c-kv, d, f
    name: str
    description: str
    ours: bool  # built on backend_common (a, b) or Dynamo's own worker (c, d)
    launch: Callable[[str, Path], Launch]  # (frontend python, tiny model dir) -> Launch


def _reference(namespace: str, *extra: str) -> Callable[[str, Path], Launch]:
    def launch(_frontend_python: str, model_dir: Path) -> Launch:
        model = f"{namespace}-reference"
        argv = [sys.executable, "-m", "backend_common.reference", "--model-path", str(model_dir)]
        argv += ["--model-name", model, "--namespace", namespace, "--event-plane", "nats"]
        argv += ["--delay", "0", *extra]
        return Launch(argv, {"PYTHONPATH": str(RUNTIME_SRC)}, model)

    return launch


def _mocker_example(_frontend_python: str, model_dir: Path) -> Launch:
    model = "bench-b-mocker-cuda"
    argv = [sys.executable, "-m", "mocker_cuda", "--model-path", str(model_dir)]
    argv += ["--model-name", model, "--namespace", "bench-b", "--event-plane", "nats"]
    argv += ["--speedup-ratio", SPEEDUP_RATIO, *MOCKER_SCHEDULER, "--device", "none"]
    return Launch(argv, {"PYTHONPATH": str(MOCKER_SRC)}, model)


def _ceiling(_frontend_python: str, model_dir: Path) -> Launch:
    model = "bench-f-ceiling"
    argv = [sys.executable, "-m", "bench.ceiling_worker", "--model-path", str(model_dir)]
    argv += ["--model-name", model, "--namespace", "bench-f", "--event-plane", "nats"]
    argv += ["--disable-kv-routing"]
    return Launch(argv, {"PYTHONPATH": f"{RUNTIME_SRC}{os.pathsep}{REPO}"}, model)


def _sample(namespace: str, *extra: str) -> Callable[[str, Path], Launch]:
    def launch(frontend_python: str, model_dir: Path) -> Launch:
        # The sample backend loads its tokenizer from --model-name, so the name is the path.
        model = str(model_dir.absolute())
        argv = [frontend_python, "-m", "dynamo.common.backend.sample_main", "--model-name", model]
        argv += ["--namespace", namespace, "--delay", "0", "--event-plane", "nats", *extra]
        return Launch(argv, {}, model)

    return launch


def _dynamo_mocker(frontend_python: str, model_dir: Path) -> Launch:
    model = "bench-d-dynamo-mocker"
    argv = [frontend_python, "-m", "dynamo.mocker", "--model-path", str(model_dir)]
    argv += ["--model-name", model, "--endpoint", "dyn://bench-d.backend.generate"]
    argv += ["--speedup-ratio", SPEEDUP_RATIO, *MOCKER_SCHEDULER, "--event-plane", "nats"]
    return Launch(argv, {}, model)


TARGETS: dict[str, Target] = {
    t.key: t
    for t in (
        Target(
            "a",
            "backend_common reference",
            "backend_common.reference --delay 0 (sleep(0) per token), KV publishing off",
            True,
            _reference("bench-a", "--disable-kv-routing"),
        ),
        Target(
            "c",
            "Dynamo sample backend",
            "dynamo.common.backend.sample_main --delay 0, KV publishing off",
            False,
            _sample("bench-c", "--disable-kv-routing"),
        ),
        Target(
            "a-kv",
            "backend_common reference +KV",
            "backend_common.reference --delay 0 --publish-kv-events (sample's events)",
            True,
            _reference("bench-akv", "--publish-kv-events"),
        ),
        Target(
            "c-kv",
            "Dynamo sample backend +KV",
            "dynamo.common.backend.sample_main --delay 0, KV publishing on (its default)",
            False,
            _sample("bench-ckv"),
        ),
        Target(
            "b",
            "mocker-cuda example",
            f"examples/mocker-cuda, --speedup-ratio {SPEEDUP_RATIO}, --device none",
            True,
            _mocker_example,
        ),
        Target(
            "d",
            "Dynamo Rust mocker",
            f"dynamo.mocker --speedup-ratio {SPEEDUP_RATIO}",
            False,
            _dynamo_mocker,
        ),
        Target(
            CEILING,
            "frontend ceiling",
            "bench.ceiling_worker: the reference engine's tokens without a suspension per "
            "token, KV publishing off (the cheapest worker; measures the frontend)",
            True,
            _ceiling,
        ),
    )
}


def vm_rss_kib(pid: int) -> int | None:
    """Resident memory of ``pid`` (``VmRSS`` of /proc/<pid>/status) in KiB; None if unknown."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{p}/task/{tid}/children", encoding="ascii") as f:
                    todo.extend(int(c) for c in f.read().split())
            except (OSError, ValueError):
                continue
    return out


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime + stime
    except (OSError, ValueError, IndexError):
        return 0.0


def _runqueue_wait_seconds(pid: int) -> float:
    """Time the threads of ``pid`` spent runnable but waiting for a CPU (schedstat field 2)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as f:
                total += int(f.read().split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


class ProcessStats:
    """CPU time, run-queue wait and resident memory of a process tree (the process and its
    children)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu_seconds(self) -> float:
        return sum(_cpu_seconds(p) for p in _descendants(self.pid))

    def runqueue_wait_seconds(self) -> float:
        """Summed over all threads: how long they were ready to run while other work (on this
        shared machine: anything) held the CPUs."""
        return sum(_runqueue_wait_seconds(p) for p in _descendants(self.pid))

    def rss_kib(self) -> int | None:
        values = [vm_rss_kib(p) for p in _descendants(self.pid)]
        known = [v for v in values if v is not None]
        return sum(known) if known else None


class PeakRss:
    """Samples a process tree's RSS every ``interval`` s on a thread while in its ``with``."""

    def __init__(self, stats: ProcessStats, interval: float = 0.25) -> None:
        self.stats = stats
        self.interval = interval
        self.peak_kib: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-rss")

    def _run(self) -> None:
        while True:
            rss = self.stats.rss_kib()
            if rss is not None and (self.peak_kib is None or rss > self.peak_kib):
                self.peak_kib = rss
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class RunningTarget:
    def __init__(self, target: Target, launch: Launch, proc: ManagedProcess) -> None:
        self.target = target
        self.launch = launch
        self.model = launch.model
        self.proc = proc
        assert proc.pid is not None
        self.stats = ProcessStats(proc.pid)

    def rss_kib(self) -> int | None:
        return self.stats.rss_kib()

    def stop(self) -> None:
        self.proc.terminate(timeout=15)


class BenchStack:
    """etcd + NATS + one real frontend on loopback (see the module docstring)."""

    def __init__(self, workdir: Path, frontend_python: str, model_dir: Path) -> None:
        self.workdir = workdir
        self.frontend_python = frontend_python
        self.model_dir = model_dir
        self.etcd = EtcdServer(workdir / "etcd")
        self.nats = NatsServer(log_path=workdir / "nats.log")
        self.frontend: Frontend | None = None

    def start(self) -> BenchStack:
        try:
            self.etcd.start()
            self.nats.start()
            self.frontend = Frontend(
                workdir=self.workdir / "frontend",
                python=self.frontend_python,
                discovery_backend="etcd",
                etcd_endpoint=self.etcd.endpoint,
                nats_url=self.nats.url,
                request_plane="tcp",
                event_plane="nats",
            ).start()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def base_url(self) -> str:
        assert self.frontend is not None, "start() first"
        return self.frontend.base_url

    def serve(self, target: Target) -> RunningTarget:
        """Start ``target``'s worker and return once the frontend lists its model."""
        assert self.frontend is not None, "start() first"
        launch = target.launch(self.frontend_python, self.model_dir)
        env = worker_env(
            discovery_backend="etcd",
            etcd_endpoint=self.etcd.endpoint,
            nats_url=self.nats.url,
            request_plane="tcp",
            system_port=free_system_port(),
        )
        env["HOME"] = str(self.workdir / "home")
        env["HF_HOME"] = str(self.workdir / "hf")
        env.update(launch.env)
        log = self.workdir / f"worker-{target.key}.log"
        proc = ManagedProcess(launch.argv, env=hermetic_env(env), log_path=log, cwd=REPO)
        proc.start()
        running = RunningTarget(target, launch, proc)
        try:
            self.frontend.wait_for_model(launch.model, timeout=READY_TIMEOUT_S, watch=[proc])
        except BaseException:
            running.stop()
            raise
        return running

    def wait_gone(self, model: str, timeout: float = 30.0) -> None:
        """Wait (bounded) until the frontend no longer lists ``model``."""
        if self.frontend is None:
            return
        deadline = time.monotonic() + timeout
        while model in self.frontend.models() and time.monotonic() < deadline:
            time.sleep(0.2)

    def stop(self) -> None:
        if self.frontend is not None:
            self.frontend.stop()
        self.nats.stop()
        self.etcd.stop()

    def __enter__(self) -> BenchStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
