"""The worker's system status server (docs/wire-protocol.md#status-server), on aiohttp.

Started by the worker only when ``DYN_SYSTEM_PORT`` is set to a port (-1, 1.6.1's default,
means no status server). Routes:

* ``GET /health``: calls the ``health`` callback -> ``(ok, details)``; 200 with
  ``{"status": "healthy", **details}`` or 503 with ``{"status": "unhealthy", **details}``.
  A callback that raises or takes longer than ``health_timeout`` counts as unhealthy.
  Without a callback the server is healthy while it runs.
* ``GET /live``: 200 while the process runs.
* ``GET /metrics``: Prometheus text of ``registry`` (the worker passes
  ``engine_metrics.scrape_registry``: its own metrics plus the engine's global-registry and
  multiprocess ones).
* ``GET /v1/metadata/.../{filename}``: the model card's artifact files, which the
  frontend downloads through the ``http://`` paths in the card. Only the exact
  ``{files_prefix}/{name}`` URLs of files given via ``set_files`` (or the
  constructor) are served; everything else is 404, so no request can reach any
  other file on disk.

The worker builds the model card after this server is up (the card's URLs need
``base_url``), then calls ``set_files(card.files_prefix, card.files)``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["HealthCallback", "StatusServer"]

log = logging.getLogger(__name__)

HealthCallback = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]


class StatusServer:
    """``/health``, ``/live``, ``/metrics`` and card files. See the module docstring."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        registry: CollectorRegistry | None = None,
        health: HealthCallback | None = None,
        files_prefix: str | None = None,
        files: dict[str, Path] | None = None,
        health_timeout: float = 10.0,
    ) -> None:
        self.host = host
        self._requested_port = port
        self.registry = registry if registry is not None else CollectorRegistry()
        self._health = health
        self._health_timeout = health_timeout
        self._files_prefix = ""
        self._files: dict[str, Path] = {}
        if files_prefix is not None or files:
            self.set_files(files_prefix or "", files or {})
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._own_address: str | None = None

    # -- configuration ------------------------------------------------------------
    def set_files(self, prefix: str, files: dict[str, Path]) -> None:
        """Serve ``files`` (name -> local path) at ``{prefix}/{name}``; replaces earlier files."""
        for name in files:
            if not name or "/" in name or name in (".", ".."):
                raise ValueError(f"bad served file name {name!r}")
        self._files_prefix = unquote(prefix.rstrip("/"))
        self._files = {name: Path(path) for name, path in files.items()}

    # -- lifecycle ----------------------------------------------------------------
    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._handle_health)
        app.router.add_get("/live", self._handle_live)
        app.router.add_get("/metrics", self._handle_metrics)
        app.router.add_get("/v1/metadata/{tail:.+}", self._handle_file)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self._requested_port)
        await site.start()
        # runner.addresses holds the bound socket names: the real port when 0 was asked for.
        self._port = int(self._runner.addresses[0][1])
        if self.host in ("", "0.0.0.0", "::"):
            self._own_address = await _own_address(
                socket.AF_INET6 if self.host == "::" else socket.AF_INET
            )
        log.info("status server listening on %s", self.base_url)

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("StatusServer.start() has not been called")
        return self._port

    @property
    def base_url(self) -> str:
        """``http://host:port`` as other processes reach it (the model card's file URLs).

        A wildcard bind address is advertised as this host's own address: its host name
        resolved, which is the container's or pod's address there, so that a frontend in
        another container can fetch the card files. Loopback when the name does not resolve.
        """
        host = self.host
        if host in ("", "0.0.0.0", "::"):
            host = self._own_address or ("::1" if host == "::" else "127.0.0.1")
        try:
            if ipaddress.ip_address(host).version == 6:
                host = f"[{host}]"
        except ValueError:
            pass  # a host name: use as is
        return f"http://{host}:{self.port}"

    # -- handlers -----------------------------------------------------------------
    async def _handle_health(self, request: web.Request) -> web.Response:
        if self._health is None:
            return web.json_response({"status": "healthy"})
        try:
            async with asyncio.timeout(self._health_timeout):
                ok, details = await self._health()
        except Exception as exc:  # noqa: BLE001 - a failing check means unhealthy, not a 500
            ok, details = False, {"error": f"health check failed: {exc!r}"}
        body = {"status": "healthy" if ok else "unhealthy", **(details or {})}
        return web.json_response(body, status=200 if ok else 503)

    async def _handle_live(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "live"})

    async def _handle_metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _handle_file(self, request: web.Request) -> web.StreamResponse:
        # Compare the decoded path with the exact prefix; take only the last segment as
        # the name and look it up in the dict. Nothing from the URL touches the disk.
        path = request.path  # already percent-decoded by aiohttp
        prefix, _, name = path.rpartition("/")
        target = self._files.get(name) if prefix == self._files_prefix else None
        if target is None or not target.is_file():
            raise web.HTTPNotFound(text=f"no such metadata file: {path}")
        return web.FileResponse(target)


async def _own_address(family: int) -> str | None:
    """The first ``family`` address this host's name resolves to; None if it does not."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            socket.gethostname(), None, family=family, type=socket.SOCK_STREAM
        )
    except OSError:
        return None
    return str(infos[0][4][0]) if infos else None
