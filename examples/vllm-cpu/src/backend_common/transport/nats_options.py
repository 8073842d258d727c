"""How the worker connects to NATS: servers, credentials, TLS, reconnects, log hygiene.

``nats_connect_options(servers, options)`` returns the keyword arguments for ``nats.connect``
(nats-py); the NATS request plane calls it once at start-up. ``options`` is
``WorkerConfig.nats`` (``NatsOptions``), filled from the variables named below by ``args.py``.

* Credentials travel in the ``NATS_SERVER`` URLs as nats-py reads them:
  ``nats://user:password@host:port`` or ``nats://token@host:port``; ``NATS_AUTH_TOKEN``
  sets a token without putting it in the URL.
* TLS: ``NATS_TLS_CA`` (CA bundle to verify the server), ``NATS_TLS_CERT`` +
  ``NATS_TLS_KEY`` (client certificate, for servers that verify clients). Any of them, or a
  ``tls://`` URL, turns TLS on; a missing file is an ``InvalidArgument`` at start-up.
* Reconnects never give up (``max_reconnect_attempts=-1``, every 1 s): a worker that
  stopped reconnecting would stay registered but unreachable.
* Nothing logged here contains a secret: URLs are shown through ``redact_url``, and the
  client's own per-attempt tracebacks are replaced by one line per event.
"""

from __future__ import annotations

import logging
import os
import ssl
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..config import NatsOptions
from ..errors import invalid_arg

__all__ = ["nats_connect_options", "redact_url"]

log = logging.getLogger(__name__)


def redact_url(url: str) -> str:
    """``nats://user:secret@h:4222`` -> ``nats://***@h:4222`` (no credentials in logs)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"***@{host}"))


def _tls_context(servers: list[str], options: NatsOptions) -> ssl.SSLContext | None:
    ca = options.tls_ca or None
    cert = options.tls_cert or None
    key = options.tls_key or None
    wants_tls = any(s.strip().startswith("tls://") for s in servers)
    if not (ca or cert or key or wants_tls):
        return None
    if (cert is None) != (key is None):
        raise invalid_arg("NATS client TLS needs both NATS_TLS_CERT and NATS_TLS_KEY")
    for name, path in (("NATS_TLS_CA", ca), ("NATS_TLS_CERT", cert), ("NATS_TLS_KEY", key)):
        if path is not None and not os.path.isfile(path):
            raise invalid_arg(f"{name}: no such file {path!r}")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    if cert and key:
        ctx.load_cert_chain(cert, key)
    return ctx


def nats_connect_options(servers: str, options: NatsOptions | None = None) -> dict[str, Any]:
    """Keyword arguments for ``nats.connect`` (see the module docstring)."""
    options = options or NatsOptions()
    urls = [s.strip() for s in servers.split(",") if s.strip()]
    if not urls:
        raise invalid_arg("NATS_SERVER is empty")
    shown = ", ".join(redact_url(u) for u in urls)

    async def on_error(exc: Exception) -> None:
        log.warning("NATS connection error (%s): %s", shown, type(exc).__name__)

    async def on_disconnected() -> None:
        log.warning("NATS disconnected from %s; reconnecting", shown)

    async def on_reconnected() -> None:
        log.info("NATS reconnected to %s", shown)

    kwargs: dict[str, Any] = {
        "servers": urls,
        "name": "backend_common",
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 1,
        "error_cb": on_error,
        "disconnected_cb": on_disconnected,
        "reconnected_cb": on_reconnected,
    }
    if options.auth_token:
        kwargs["token"] = options.auth_token
    tls = _tls_context(urls, options)
    if tls is not None:
        kwargs["tls"] = tls
    log.info("NATS connecting to %s%s", shown, " (TLS)" if tls is not None else "")
    return kwargs
