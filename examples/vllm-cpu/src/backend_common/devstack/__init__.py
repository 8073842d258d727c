"""Development stack: real services started as local processes for tests and local runs.

``services`` holds the process helpers (``ManagedProcess``, ``EtcdServer``,
``NatsServer``, ``free_port``). Nothing here is imported by the worker itself.
"""

from __future__ import annotations

from .services import (
    EtcdServer,
    ManagedProcess,
    NatsServer,
    ServiceError,
    find_binary,
    free_port,
    wait_for_port,
)

__all__ = [
    "EtcdServer",
    "ManagedProcess",
    "NatsServer",
    "ServiceError",
    "find_binary",
    "free_port",
    "wait_for_port",
]
