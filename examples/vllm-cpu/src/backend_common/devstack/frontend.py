"""Run the REAL Dynamo 1.6.1 frontend (``python -m dynamo.frontend``) on loopback.

Used by the e2e tests, ``make run``/``make demo`` and the benchmark. Contract:

* ``find_frontend_python()`` locates the interpreter of the frontend venv (installed by
  ``scripts/install-dynamo-frontend.sh``): ``$DYNAMO_FRONTEND_PYTHON``, else the nearest
  ``.venv-dynamo/bin/python`` walking up from the current directory; ``None`` if absent.
* ``Frontend(...)`` owns one frontend process. ``start()`` launches it on a free
  127.0.0.1 port and returns once ``/health`` or ``/v1/models`` answers 200 (bounded by
  ``start_timeout``); ``stop()`` ends it (SIGTERM, then SIGKILL) and is idempotent. It is a
  context manager. Every socket stays on 127.0.0.1; ``HOME`` and
  ``HF_HOME`` point into ``workdir`` so the frontend's card cache never touches the real
  home directory; the Hugging Face Hub is offline.
* ``worker_env(...)`` gives the variables a worker (ours or Dynamo's) needs to join the same
  stack on loopback; merge it onto ``hermetic_env()`` so that stray ``NATS_SERVER`` /
  ``ETCD_ENDPOINTS`` / ``DYN_*`` values of the caller's shell do not leak in (a set
  ``NATS_SERVER`` makes every Dynamo process wait up to 120 s for NATS).

All waits poll with a fixed period and a deadline; HTTP probes are bounded by a short
timeout and bypass proxies.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from .services import ManagedProcess, ServiceError, free_port

LOOPBACK = "127.0.0.1"
FRONTEND_VENV = ".venv-dynamo"
POLL_S = 0.2
PROBE_TIMEOUT_S = 2.0
STOP_TIMEOUT_S = 15.0
MIN_SYSTEM_PORT, MAX_SYSTEM_PORT = 20000, 32767

DiscoveryBackend = Literal["file", "etcd", "kubernetes"]
RequestPlane = Literal["tcp", "nats"]

# Inherited variables that would silently change which stack a Dynamo process joins.
_LEAKY_VARS = (
    "NATS_SERVER",
    "ETCD_ENDPOINTS",
    "DYN_FILE_KV",
    "HF_TOKEN",
    "KUBECONFIG",
    "POD_NAME",
    "POD_NAMESPACE",
    "POD_UID",
    "CONTAINER_NAME",
)

# Our own opener: no proxies (a corporate http_proxy must not see loopback traffic).
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def find_frontend_python() -> str | None:
    """Path of the frontend venv's python, or ``None`` when there is none.

    ``$DYNAMO_FRONTEND_PYTHON`` wins when set (``None`` if it names no executable file, so
    a wrong setting is reported instead of silently replaced); otherwise the nearest
    ``.venv-dynamo/bin/python`` in the current directory or one of its parents.
    """
    configured = os.environ.get("DYNAMO_FRONTEND_PYTHON")
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    here = Path.cwd().absolute()
    for directory in (here, *here.parents):
        candidate = directory / FRONTEND_VENV / "bin" / "python"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def free_system_port(*, attempts: int = 50) -> int:
    """A free 127.0.0.1 port usable as ``DYN_SYSTEM_PORT`` of a REAL Dynamo 1.6.1 worker.

    Dynamo parses ``DYN_SYSTEM_PORT`` as a signed 16-bit integer and refuses values above
    32767 (``invalid value unsigned int ..., expected i16``), while the OS hands out
    ephemeral ports from 32768 up. So: random ports in [20000, 32767], checked by binding.
    Raises ``OSError`` if none of ``attempts`` tries is free.
    """
    rng = random.SystemRandom()
    for _ in range(attempts):
        port = rng.randint(MIN_SYSTEM_PORT, MAX_SYSTEM_PORT)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port in [{MIN_SYSTEM_PORT}, {MAX_SYSTEM_PORT}] after {attempts} tries")


def hermetic_env(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """``os.environ`` without ``DYN_*`` and the stack-selecting variables, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYN_") and k not in _LEAKY_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides or {})
    return env


def _loopback_vars() -> dict[str, str]:
    # Without the *_HOST variables the TCP request plane picks host "auto", which may be a
    # non-loopback address.
    return {
        "DYN_HTTP_HOST": LOOPBACK,
        "DYN_TCP_RPC_HOST": LOOPBACK,
        "DYN_TCP_RESPONSE_STREAM_HOST": LOOPBACK,
        "DYN_EVENT_PLANE_HOST": LOOPBACK,
        "DYN_SYSTEM_HOST": LOOPBACK,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


def _stack_vars(
    discovery_backend: DiscoveryBackend,
    file_kv: Path | str | None,
    etcd_endpoint: str | None,
    nats_url: str | None,
    request_plane: RequestPlane,
    kubeconfig: Path | str | None = None,
) -> dict[str, str]:
    if discovery_backend not in ("file", "etcd", "kubernetes"):
        raise ValueError(
            f"discovery_backend must be 'file', 'etcd' or 'kubernetes', not {discovery_backend!r}"
        )
    if request_plane not in ("tcp", "nats"):
        raise ValueError(f"request_plane must be 'tcp' or 'nats', not {request_plane!r}")
    env: dict[str, str] = {
        "DYN_DISCOVERY_BACKEND": discovery_backend,
        "DYN_REQUEST_PLANE": request_plane,
    }
    if discovery_backend == "file":
        if file_kv is None:
            raise ValueError("file discovery needs file_kv (a directory shared by all processes)")
        env["DYN_FILE_KV"] = str(Path(file_kv).absolute())
    elif discovery_backend == "kubernetes":
        # The pod identity (POD_NAME, POD_NAMESPACE, POD_UID) is per process: the caller adds it.
        if kubeconfig is None:
            raise ValueError("kubernetes discovery needs kubeconfig (the API server to use)")
        env["KUBECONFIG"] = str(Path(kubeconfig).absolute())
    else:
        if not etcd_endpoint:
            raise ValueError("etcd discovery needs etcd_endpoint, e.g. http://127.0.0.1:2379")
        env["ETCD_ENDPOINTS"] = etcd_endpoint
    if request_plane == "nats" and not nats_url:
        raise ValueError("the nats request plane needs nats_url")
    if nats_url:
        env["NATS_SERVER"] = nats_url
    return env


def worker_env(
    *,
    discovery_backend: DiscoveryBackend,
    file_kv: Path | str | None = None,
    etcd_endpoint: str | None = None,
    nats_url: str | None = None,
    request_plane: RequestPlane = "tcp",
    system_port: int | None = None,
    kubeconfig: Path | str | None = None,
) -> dict[str, str]:
    """Variables a worker process needs to join a stack on loopback.

    Only the variables to set are returned; build the full environment with
    ``hermetic_env(worker_env(...))``. ``system_port`` sets ``DYN_SYSTEM_PORT`` (the worker's
    status server, which also serves the model card files to the frontend); a real Dynamo
    worker accepts at most 32767 there, see ``free_system_port``.
    Raises ``ValueError`` for an incomplete combination (file without ``file_kv``, kubernetes
    without ``kubeconfig`` (the pod identity variables are the caller's to add), etcd
    without ``etcd_endpoint``, nats request plane without ``nats_url``) or a port outside
    1..65535.
    """
    env = _loopback_vars()
    env.update(
        _stack_vars(discovery_backend, file_kv, etcd_endpoint, nats_url, request_plane, kubeconfig)
    )
    if system_port is not None:
        if not 0 < system_port < 65536:
            raise ValueError(f"system_port must be in 1..65535, got {system_port}")
        env["DYN_SYSTEM_PORT"] = str(system_port)
    return env


def _http_get_json(url: str, timeout: float = PROBE_TIMEOUT_S) -> tuple[int, Any]:
    """GET ``url``; (status, parsed JSON or None). Connection failures give status 0."""
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (OSError, urllib.error.URLError):
        return 0, None
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, None


class Frontend:
    """One real ``dynamo.frontend`` process on 127.0.0.1 (see the module docstring).

    ``workdir`` holds the log (``frontend.log``), the scratch ``home/`` and ``hf/``
    directories and, for file discovery without an explicit ``file_kv``, ``filekv/``.
    ``router_mode`` None keeps the frontend default (round-robin); ``event_plane`` None
    keeps its default (zmq). Dynamo's own workers of a zmq stack must run with KV events
    disabled (``--disable-kv-routing``) or ``--event-plane nats``: their ZMQ publishers bind
    0.0.0.0. backend_common workers bind theirs on ``DYN_EVENT_PLANE_HOST`` (127.0.0.1 here).
    """

    def __init__(
        self,
        *,
        workdir: Path | str,
        python: str | None = None,
        discovery_backend: DiscoveryBackend = "file",
        file_kv: Path | str | None = None,
        etcd_endpoint: str | None = None,
        nats_url: str | None = None,
        request_plane: RequestPlane = "tcp",
        kubeconfig: Path | str | None = None,
        router_mode: str | None = None,
        event_plane: str | None = None,
        http_port: int | None = None,
        extra_args: Sequence[str] = (),
        extra_env: Mapping[str, str] | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        self.python = python or find_frontend_python()
        if self.python is None:
            raise FileNotFoundError(
                "no Dynamo frontend python: set DYNAMO_FRONTEND_PYTHON or run `make frontend` "
                f"(creates {FRONTEND_VENV}/ via scripts/install-dynamo-frontend.sh)"
            )
        self.workdir = Path(workdir).absolute()
        if discovery_backend == "file" and file_kv is None:
            file_kv = self.workdir / "filekv"
        self.file_kv = Path(file_kv).absolute() if file_kv is not None else None
        self.discovery_backend = discovery_backend
        self.etcd_endpoint = etcd_endpoint
        self.nats_url = nats_url
        self.request_plane = request_plane
        self.port = http_port or free_port()
        self.start_timeout = start_timeout
        self.log_path = self.workdir / "frontend.log"
        stack = _stack_vars(
            discovery_backend, self.file_kv, etcd_endpoint, nats_url, request_plane, kubeconfig
        )
        self.env = hermetic_env(
            {
                **_loopback_vars(),
                **stack,
                "DYN_HTTP_PORT": str(self.port),
                "HOME": str(self.workdir / "home"),
                "HF_HOME": str(self.workdir / "hf"),
                **(extra_env or {}),
            }
        )
        argv = [self.python, "-m", "dynamo.frontend", "--http-host", LOOPBACK]
        argv += ["--http-port", str(self.port), "--discovery-backend", discovery_backend]
        argv += ["--request-plane", request_plane]
        if router_mode is not None:
            argv += ["--router-mode", router_mode]
        if event_plane is not None:
            argv += ["--event-plane", event_plane]
        self.argv = [*argv, *extra_args]
        self._proc: ManagedProcess | None = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>`` (no trailing slash)."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int | None:
        """PID of the running frontend, ``None`` before ``start()``."""
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.running

    def start(self) -> Frontend:
        """Launch the frontend and wait until it answers; returns ``self``.

        Raises ``ServiceError`` (with the log tail) when the process exits early and
        ``TimeoutError`` when it does not answer within ``start_timeout``; the process is
        stopped in both cases.
        """
        if self._proc is not None:
            raise ServiceError("Frontend.start() called twice")
        for sub in ("home", "hf"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        if self.file_kv is not None:
            self.file_kv.mkdir(parents=True, exist_ok=True)
        self._proc = ManagedProcess(
            self.argv, env=self.env, log_path=self.log_path, cwd=self.workdir
        ).start()
        try:
            self._wait(self._answers, self.start_timeout, "answer on " + self.base_url)
        except BaseException:
            self.stop()
            raise
        return self

    def _answers(self) -> bool:
        for path in ("/health", "/v1/models"):
            if _http_get_json(self.base_url + path)[0] == 200:
                return True
        return False

    def _wait(
        self, ready: Any, timeout: float, what: str, watch: Sequence[ManagedProcess] = ()
    ) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for proc in watch:
                if not proc.running:
                    raise ServiceError(
                        f"process {proc.argv[:4]} exited with {proc.returncode} while waiting "
                        f"for the frontend to {what}; its log tail:\n{proc.log_tail()}"
                    )
            if self._proc is None or not self._proc.running:
                code = None if self._proc is None else self._proc.returncode
                raise ServiceError(
                    f"frontend is not running (exit code {code}) while waiting to {what}; "
                    f"log tail:\n{self.log_tail()}"
                )
            if ready():
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"frontend did not {what} within {timeout} s; log tail:\n{self.log_tail()}"
                )
            time.sleep(POLL_S)

    def models(self) -> list[str]:
        """Model ids listed by ``/v1/models`` (empty when it does not answer)."""
        status, body = _http_get_json(self.base_url + "/v1/models")
        if status != 200 or not isinstance(body, dict):
            return []
        return [m["id"] for m in body.get("data") or [] if isinstance(m, dict) and "id" in m]

    def model_info(self, name: str) -> dict[str, Any] | None:
        """The ``/v1/models`` entry of ``name`` (e.g. ``context_window``), or ``None``."""
        status, body = _http_get_json(self.base_url + "/v1/models")
        if status == 200 and isinstance(body, dict):
            for m in body.get("data") or []:
                if isinstance(m, dict) and m.get("id") == name:
                    return m
        return None

    def wait_for_model(
        self, name: str, timeout: float = 60.0, *, watch: Sequence[ManagedProcess] = ()
    ) -> None:
        """Return once ``name`` is in ``/v1/models``.

        ``TimeoutError`` after ``timeout`` s; ``ServiceError`` as soon as the frontend or one
        of the ``watch`` processes (typically the worker serving ``name``) has exited, so a
        crashing worker fails fast instead of after the whole timeout.
        """
        self._wait(lambda: name in self.models(), timeout, f"list model {name!r}", watch)

    def wait_model_gone(self, name: str, timeout: float = 30.0) -> None:
        """Return once ``name`` is no longer in ``/v1/models``; ``TimeoutError`` otherwise.

        ``ServiceError`` if the frontend exits meanwhile.
        """
        self._wait(lambda: name not in self.models(), timeout, f"drop model {name!r}")

    def health(self) -> dict[str, Any] | None:
        """The JSON of ``/health`` (instances with their transport addresses), or ``None``."""
        status, body = _http_get_json(self.base_url + "/health")
        return body if status == 200 and isinstance(body, dict) else None

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Idempotent; returns the exit code."""
        return self._proc.terminate(timeout) if self._proc is not None else None

    def log_text(self) -> str:
        """Everything the frontend wrote to stdout/stderr so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def __enter__(self) -> Frontend:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
