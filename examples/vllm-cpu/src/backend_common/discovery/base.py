"""The discovery interface and the records a worker publishes through it
(docs/wire-protocol.md#discovery).

A worker tells the Dynamo frontend that it exists by writing two JSON records
under keys the frontend watches:

* ``v1/instances/{ns}/{comp}/{ep}/{id:x}`` -> the Endpoint record (``endpoint_record``),
  which says how to reach the worker (``transport``) and which payload codec to use;
* ``v1/mdc/{ns}/{comp}/{ep}/{id:x}`` -> the Model record (``model_record``), which
  carries the model card.

``{id:x}`` is the *instance id* in lower-case hex. It is chosen by the discovery
backend (the etcd lease id, a random u64 for the file backend, a hash of the pod
name for the Kubernetes backend), so the worker
calls ``connect()`` first, reads ``instance_id``, then builds and ``put``s its
records. The frontend reacts only to key creation and deletion: deleting the keys
(``unregister_all``) takes the worker out of rotation at once; a crashed worker
disappears when its lease (or file heartbeat) expires.

Lifecycle, as the worker drives it::

    d = create_discovery(config)
    await d.connect()                       # instance_id is now valid
    d.on_reregistered = hook                # optional, see below
    await d.put(model_key(...), model_record(...))
    await d.put(instance_key(...), endpoint_record(...))
    ...                                     # serve
    await d.unregister_all()                # shutdown step 1: keys gone now
    await d.close()

``on_reregistered(new_id)`` is called (etcd only) when the backend had to replace
a lost lease: the old keys are gone, ``instance_id`` already holds the new id and
the hook must ``put`` the records again with keys and values built for that id.
Without a hook the backend rewrites its Endpoint and Model records itself
(``rebind_record``), which is right only if nothing else depends on the id.
"""

from __future__ import annotations

import ipaddress
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import invalid_arg
from ..types import U64_MAX

__all__ = [
    "INSTANCES_BUCKET",
    "MDC_BUCKET",
    "Discovery",
    "ReregisteredHook",
    "endpoint_record",
    "escape_path_component",
    "instance_key",
    "instance_path",
    "model_key",
    "model_record",
    "nats_transport",
    "rebind_key",
    "rebind_record",
    "tcp_transport",
]

INSTANCES_BUCKET = "v1/instances"
MDC_BUCKET = "v1/mdc"

ReregisteredHook = Callable[[int], Awaitable[None]]


def _check_id(instance_id: int) -> int:
    if not isinstance(instance_id, int) or not 0 < instance_id <= U64_MAX:
        raise invalid_arg(f"instance id must be a non-zero u64, got {instance_id!r}")
    return instance_id


def _check_names(ns: str, comp: str, ep: str) -> None:
    for label, value in (("namespace", ns), ("component", comp), ("endpoint", ep)):
        if not value or "/" in value:
            raise invalid_arg(f"{label} must be non-empty and contain no '/', got {value!r}")


def instance_key(ns: str, comp: str, ep: str, instance_id: int) -> str:
    """``v1/instances/{ns}/{comp}/{ep}/{id:x}``: where the Endpoint record lives."""
    _check_names(ns, comp, ep)
    return f"{INSTANCES_BUCKET}/{ns}/{comp}/{ep}/{_check_id(instance_id):x}"


def model_key(ns: str, comp: str, ep: str, instance_id: int, lora_slug: str | None = None) -> str:
    """``v1/mdc/{ns}/{comp}/{ep}/{id:x}[/{lora_slug}]``: where the Model record lives."""
    _check_names(ns, comp, ep)
    key = f"{MDC_BUCKET}/{ns}/{comp}/{ep}/{_check_id(instance_id):x}"
    return f"{key}/{lora_slug}" if lora_slug else key


def escape_path_component(value: str) -> str:
    """Escape one instance-path component: ``%`` -> ``%25`` first, then ``/`` -> ``%2F``."""
    return value.replace("%", "%25").replace("/", "%2F")


def instance_path(instance_id: int, ns: str, comp: str, ep: str) -> str:
    """``{id:x}/{ns}/{comp}/{ep}`` with each name escaped: the TCP frame path of an endpoint."""
    parts = (ns, comp, ep)
    return f"{_check_id(instance_id):x}/" + "/".join(escape_path_component(p) for p in parts)


def tcp_transport(host: str, port: int, instance_id: int, ns: str, comp: str, ep: str) -> dict:
    """``{"tcp": "ip:port/{id:x}/{ns}/{comp}/{ep}"}``.

    The frontend parses the address part as a socket address, so ``host`` must be
    an IP literal (IPv6 is bracketed here), never a host name.
    """
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise invalid_arg(
            f"TCP request-plane host must be an IP address, got {host!r} "
            "(the frontend does not resolve host names; set DYN_TCP_RPC_HOST)"
        ) from None
    if not isinstance(port, int) or not 0 < port < 65536:
        raise invalid_arg(f"TCP request-plane port must be in 1..65535, got {port!r}")
    addr = f"[{ip}]" if ip.version == 6 else str(ip)
    return {"tcp": f"{addr}:{port}/{instance_path(instance_id, ns, comp, ep)}"}


def nats_transport(subject: str) -> dict:
    """``{"nats_tcp": subject}``: NATS request plane, TCP call-home responses."""
    if not subject:
        raise invalid_arg("NATS subject must be non-empty")
    return {"nats_tcp": subject}


def endpoint_record(
    ns: str,
    comp: str,
    ep: str,
    instance_id: int,
    transport: dict,
    device_type: str | None = None,
    codec: str = "json",
) -> dict:
    """The ``DiscoveryInstance::Endpoint`` JSON (docs/wire-protocol.md#endpoint-record)."""
    _check_names(ns, comp, ep)
    if codec not in ("json", "msgpack"):
        raise invalid_arg(f"request plane codec must be 'json' or 'msgpack', got {codec!r}")
    record: dict[str, Any] = {
        "type": "Endpoint",
        "namespace": ns,
        "component": comp,
        "endpoint": ep,
        "instance_id": _check_id(instance_id),
        "transport": transport,
    }
    if device_type is not None:
        record["device_type"] = device_type
    record["request_plane_codec"] = codec
    return record


def model_record(
    ns: str,
    comp: str,
    ep: str,
    instance_id: int,
    card: dict,
    model_suffix: str | None = None,
) -> dict:
    """The ``DiscoveryInstance::Model`` JSON; ``card`` is ``card_json``.

    See docs/wire-protocol.md#model-record-and-model-card.
    """
    _check_names(ns, comp, ep)
    record: dict[str, Any] = {
        "type": "Model",
        "namespace": ns,
        "component": comp,
        "endpoint": ep,
        "instance_id": _check_id(instance_id),
        "card_json": card,
    }
    if model_suffix:
        record["model_suffix"] = model_suffix
    return record


def rebind_key(key: str, old_id: int, new_id: int) -> str:
    """Swap the ``/{old:x}`` id segment of an instances/mdc key for ``/{new:x}``."""
    parts = key.split("/")
    old_hex = f"{old_id:x}"
    # v1/<bucket>/ns/comp/ep/<id>[/<lora slug>]
    if len(parts) >= 6 and parts[5] == old_hex:
        parts[5] = f"{new_id:x}"
    return "/".join(parts)


def rebind_record(value: dict, old_id: int, new_id: int) -> dict:
    """A copy of an Endpoint/Model record with the instance id (and TCP path) replaced."""
    out = dict(value)
    if out.get("instance_id") == old_id:
        out["instance_id"] = new_id
    transport = out.get("transport")
    if isinstance(transport, dict) and isinstance(transport.get("tcp"), str):
        addr, sep, path = transport["tcp"].partition("/")
        head, slash, rest = path.partition("/")
        if sep and head == f"{old_id:x}":
            out["transport"] = {**transport, "tcp": f"{addr}/{new_id:x}{slash}{rest}"}
    return out


class Discovery(ABC):
    """Publishes a worker's records where the frontend looks for them.

    Contract:

    * ``connect()`` once, before anything else; afterwards ``instance_id`` is set.
      Raises a ``CannotConnect`` ``DynamoError`` if the backend is unreachable.
    * ``put(key, value)`` creates ``key`` (relative, e.g. ``v1/instances/...``) with the
      JSON ``value`` bound to this process's liveness (etcd lease / file heartbeat).
      Create-if-absent: a key that exists with another value raises an
      ``InvalidArgument`` ``DynamoError``; re-putting the identical value is a no-op.
    * ``delete(key)`` removes one of this instance's keys.
    * ``unregister_all()`` removes every key at once (lease revoke / unlink) and stops
      liveness upkeep. Called at the start of graceful shutdown; must be fast.
    * ``close()`` releases connections; it unregisters first if that did not happen.
    * ``on_reregistered``: see the module docstring.

    Implementations never let a backend outage crash the worker: liveness upkeep
    retries in the background and logs.
    """

    on_reregistered: ReregisteredHook | None = None

    @property
    @abstractmethod
    def instance_id(self) -> int:
        """This process's instance id (u64). Valid after ``connect()``."""

    @abstractmethod
    async def connect(self) -> None: ...

    @abstractmethod
    async def put(self, key: str, value: dict) -> None: ...

    @abstractmethod
    async def delete(self, key: str) -> None: ...

    @abstractmethod
    async def unregister_all(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @property
    @abstractmethod
    def records(self) -> dict[str, dict]:
        """A snapshot of the keys this instance currently owns (key -> value)."""

    async def register(self, records: list[tuple[str, dict]]) -> int:
        """``put`` each ``(key, value)`` in order; returns ``instance_id``."""
        for key, value in records:
            await self.put(key, value)
        return self.instance_id

    async def __aenter__(self) -> Discovery:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
