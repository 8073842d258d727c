"""etcd discovery on ``aetcd`` (docs/wire-protocol.md#keys-and-leases).

One lease per process; its id is the instance id. Every key is created with a
transaction ``VERSION(key) == 0 -> PUT(key, value, lease)``, so two workers can
never overwrite each other's records. A background task refreshes the lease every
``ttl / 3`` seconds.

Failure handling (the worker must survive all of these):

* etcd unreachable for a while: refreshes fail; the task retries every
  ``0.25 .. 1`` s (capped so that it notices etcd's return within about a second),
  logging once per outage. The gRPC channel is built with a short reconnect
  backoff for the same reason. If etcd kept the lease (it restores leases from
  its data directory), nothing else happens.
* the lease is gone (a refresh answers TTL 0: expired during a partition, or
  revoked by someone else): a new lease is granted, ``instance_id`` changes, and
  the records are written again under the new id, either by the worker's
  ``on_reregistered`` hook or, without one, by rewriting the tracked Endpoint /
  Model records (``rebind_record``). A failed attempt is retried on the next tick.

``ETCD_ENDPOINTS`` may list several URLs; ``connect()`` uses the first one that
answers and the keep-alive task moves on to the next after a failed refresh.

TLS (Dynamo's variables): ``ETCD_AUTH_CA`` (trusted CA) plus, for client-certificate
authentication, ``ETCD_AUTH_CLIENT_CERT`` and ``ETCD_AUTH_CLIENT_KEY``. Each is a PEM file
path or, as Dynamo's Rust client reads them, the PEM text itself. With TLS configured the
endpoints are ``https://`` (or bare ``host:port``); an ``http://`` endpoint next to TLS
settings, or an ``https://`` one without them, is a configuration error, never a silent
downgrade. A failed handshake (untrusted server, missing or rejected client certificate)
surfaces at ``connect()`` as ``CannotConnect``. Differences from Dynamo's client, both
supersets: ``ETCD_AUTH_CA`` alone gives server-only TLS (Dynamo needs all three), and
user/password combine with TLS (Dynamo ignores the TLS variables when a user is set).
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import aetcd
import aetcd.exceptions
import grpc
from aetcd import rpc, watcher
from aetcd.client import _handle_errors  # maps grpc errors to aetcd's types (TlsClient)

from ..config import EtcdOptions
from ..errors import DynamoError, cannot_connect, invalid_arg, unknown
from .base import Discovery, rebind_key, rebind_record

__all__ = ["DEFAULT_TTL", "EtcdDiscovery", "EtcdTls", "TlsClient", "parse_endpoints"]

log = logging.getLogger(__name__)

DEFAULT_TTL = 10
# Per-RPC deadline. Keep-alives are tiny; a slow answer is as bad as none.
RPC_TIMEOUT_S = 3
RETRY_MIN_S = 0.25
RETRY_MAX_S = 1.0
_GRPC_OPTIONS = {
    # grpc's default reconnect backoff grows to 120 s; we want to see etcd again fast.
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.min_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 1000,
}


def parse_endpoints(endpoints: str, *, tls: bool = False) -> list[tuple[str, int]]:
    """``"http://a:2379,b:2380"`` -> ``[("a", 2379), ("b", 2380)]`` (default port 2379).

    ``tls`` says whether TLS is configured: then ``https://`` (or no scheme) is required,
    otherwise ``http://`` / ``grpc://`` (or no scheme). A mismatch raises ``InvalidArgument``.
    """
    out: list[tuple[str, int]] = []
    plain, secure = ("http://", "grpc://"), ("https://",)
    for raw in endpoints.split(","):
        item = raw.strip()
        if not item:
            continue
        if item.startswith("unix://") or item.startswith("unixs://"):
            raise invalid_arg(f"etcd endpoint {item!r}: unix sockets are not supported")
        if not tls and item.startswith(secure):
            raise invalid_arg(
                f"etcd endpoint {item!r} is https:// but no TLS is configured: set ETCD_AUTH_CA "
                "(and ETCD_AUTH_CLIENT_CERT / ETCD_AUTH_CLIENT_KEY for client certificates)"
            )
        if tls and item.startswith(plain):
            raise invalid_arg(
                f"etcd endpoint {item!r} is plain {item.split(':', 1)[0]}:// but ETCD_AUTH_CA "
                "is set: use https:// (refusing to send credentials in clear)"
            )
        for scheme in plain + secure:
            if item.startswith(scheme):
                item = item[len(scheme) :]
        item = item.rstrip("/")
        if item.startswith("["):  # [v6]:port
            host, _, rest = item[1:].partition("]")
            port_s = rest[1:] if rest.startswith(":") else ""
        elif item.count(":") == 1:
            host, _, port_s = item.partition(":")
        else:
            host, port_s = item, ""
        try:
            port = int(port_s) if port_s else 2379
        except ValueError:
            raise invalid_arg(f"etcd endpoint {raw.strip()!r}: bad port {port_s!r}") from None
        if not host or not 0 < port < 65536:
            raise invalid_arg(f"etcd endpoint {raw.strip()!r} is not host:port")
        out.append((host, port))
    if not out:
        raise invalid_arg("ETCD_ENDPOINTS is empty")
    return out


class EtcdTls:
    """TLS material for the etcd client: PEM bytes of the CA and, optionally, client identity.

    ``from_options(options)`` takes ``EtcdOptions.tls_ca`` / ``tls_client_cert`` /
    ``tls_client_key`` (``ETCD_AUTH_CA`` / ``ETCD_AUTH_CLIENT_CERT`` / ``ETCD_AUTH_CLIENT_KEY``,
    each a file path or inline PEM text) and returns ``None`` when none is set.
    """

    def __init__(self, ca: bytes, cert: bytes | None = None, key: bytes | None = None) -> None:
        if (cert is None) != (key is None):
            raise invalid_arg("etcd TLS needs both ETCD_AUTH_CLIENT_CERT and ETCD_AUTH_CLIENT_KEY")
        self.ca, self.cert, self.key = ca, cert, key

    @classmethod
    def from_options(cls, options: EtcdOptions) -> EtcdTls | None:
        ca = options.tls_ca or None
        cert = options.tls_client_cert or None
        key = options.tls_client_key or None
        if ca is None and cert is None and key is None:
            return None
        if ca is None:
            raise invalid_arg("etcd TLS client certificate given without ETCD_AUTH_CA")
        return cls(
            _pem("ETCD_AUTH_CA", ca),
            _pem("ETCD_AUTH_CLIENT_CERT", cert) if cert else None,
            _pem("ETCD_AUTH_CLIENT_KEY", key) if key else None,
        )

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


def _pem(var: str, value: str) -> bytes:
    """``value`` if it is PEM text (Dynamo's Rust client reads the variable so), else the file."""
    if value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    try:
        data = Path(value).read_bytes()
    except OSError as exc:
        raise invalid_arg(f"{var}: cannot read {value!r}: {exc.strerror}") from None
    if b"-----BEGIN" not in data:
        raise invalid_arg(f"{var}: {value!r} is not a PEM file")
    return data


class TlsClient(aetcd.Client):
    """``aetcd.Client`` over a TLS gRPC channel.

    Why it exists: aetcd 1.0 has no TLS option; its ``connect()`` always opens
    ``rpc.insecure_channel``. This override is the same method (aetcd 1.0's
    ``Client.connect``, pinned ``aetcd==1.0.*``) with one change: the channel is
    ``grpc.aio.secure_channel`` (re-exported by ``aetcd.rpc``) with ``credentials``.
    Every other method of the client is inherited unchanged.
    """

    _is_connecting: bool  # set by aetcd.Client

    def __init__(self, *, credentials: grpc.ChannelCredentials, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._credentials = credentials

    @_handle_errors
    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:  # another task is connecting: wait for it
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            target = f"{self._host}:{self._port}"
            self.channel = rpc.secure_channel(
                target, self._credentials, options=list(self._options.items())
            )
            if self._username is not None and self._password is not None:
                self.auth_stub = rpc.AuthStub(self.channel)
                request = rpc.AuthenticateRequest(name=self._username, password=self._password)
                resp = await self.auth_stub.Authenticate(request, timeout=self._timeout)
                self.metadata = (("token", resp.token),)
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(
                rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
            )
            self._connected.set()
        finally:
            self._is_connecting = False


def _encode(value: dict) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class EtcdDiscovery(Discovery):
    """Discovery in etcd with a kept-alive lease. See the module docstring."""

    def __init__(
        self,
        endpoints: str,
        *,
        ttl: int = DEFAULT_TTL,
        username: str | None = None,
        password: str | None = None,
        tls: EtcdTls | None = None,
    ) -> None:
        self._endpoints = parse_endpoints(endpoints, tls=tls is not None)
        self._tls = tls
        if ttl < 2:
            raise invalid_arg(f"etcd lease TTL must be >= 2 s, got {ttl}")
        if (username is None) != (password is None):
            raise invalid_arg("etcd auth needs both ETCD_AUTH_USERNAME and ETCD_AUTH_PASSWORD")
        self._ttl = int(ttl)
        self._username = username
        self._password = password
        self._client: aetcd.Client | None = None
        self._endpoint_index = 0
        self._lease_id: int | None = None
        self._records: dict[str, dict] = {}
        self._keepalive: asyncio.Task | None = None
        self._lock = asyncio.Lock()  # serialises puts against re-registration
        self._closed = False
        self._stopping = False
        self.on_reregistered = None
        self.reregistrations = 0  # how many times a lost lease was replaced

    @classmethod
    def from_options(cls, endpoints: str, options: EtcdOptions | None = None) -> EtcdDiscovery:
        """A client for ``endpoints`` with ``options`` (lease TTL, user, TLS: ``EtcdOptions``)."""
        options = options or EtcdOptions()
        return cls(
            endpoints,
            ttl=options.lease_ttl,
            username=options.username or None,
            password=options.password or None,
            tls=EtcdTls.from_options(options),
        )

    # -- properties ---------------------------------------------------------------

    @property
    def instance_id(self) -> int:
        if self._lease_id is None:
            raise RuntimeError("EtcdDiscovery.connect() has not succeeded yet")
        return self._lease_id

    @property
    def ttl(self) -> int:
        return self._ttl

    @property
    def endpoint(self) -> str:
        host, port = self._endpoints[self._endpoint_index]
        return f"{host}:{port}"

    @property
    def records(self) -> dict[str, dict]:
        return dict(self._records)

    # -- lifecycle ----------------------------------------------------------------

    def _new_client(self, index: int) -> aetcd.Client:
        host, port = self._endpoints[index]
        kwargs: dict[str, Any] = {
            "host": host,
            "port": port,
            "username": self._username,
            "password": self._password,
            "timeout": RPC_TIMEOUT_S,
            "options": dict(_GRPC_OPTIONS),
        }
        if self._tls is not None:
            return TlsClient(credentials=self._tls.credentials(), **kwargs)
        return aetcd.Client(**kwargs)

    async def connect(self) -> None:
        """Reach the first answering endpoint and grant the lease."""
        if self._lease_id is not None:
            return
        errors = []
        for index in range(len(self._endpoints)):
            client = self._new_client(index)
            try:
                async with asyncio.timeout(RPC_TIMEOUT_S + 1):
                    await client.status()
                # A read checks the credentials now (etcd 3.5 grants leases without auth).
                await client.get(b"v1/instances/")
                lease = await client.lease(self._ttl)
            except Exception as exc:  # noqa: BLE001 - every failure means "try the next one"
                errors.append(f"{self._endpoints[index][0]}:{self._endpoints[index][1]}: {exc!r}")
                await _close_quietly(client)
                continue
            self._client, self._endpoint_index, self._lease_id = client, index, lease.id
            log.info(
                "etcd discovery connected endpoint=%s lease=%x ttl=%ss",
                self.endpoint,
                lease.id,
                lease.ttl,
            )
            self._stopping = False
            self._keepalive = asyncio.create_task(self._keepalive_loop(), name="etcd-keepalive")
            return
        what = "cannot reach etcd (ETCD_ENDPOINTS"
        if self._tls is not None:
            # A failed handshake looks like an unreachable server to gRPC; say where to look.
            what += "; TLS: check ETCD_AUTH_CA and the client certificate"
        raise cannot_connect(what + "): " + "; ".join(errors))

    async def put(self, key: str, value: dict) -> None:
        async with self._lock:
            try:
                await self._create(key, value)
            except aetcd.exceptions.ClientError as exc:
                raise _typed(exc, f"etcd put {key!r} failed") from exc
            self._records[key] = value

    async def _create(self, key: str, value: dict) -> None:
        client, lease_id = self._require()
        data = _encode(value)
        tx = client.transactions
        ok, _ = await client.transaction(
            compare=[tx.version(key.encode()) == 0],
            success=[tx.put(key.encode(), data, lease=lease_id)],
            failure=[],
        )
        if ok:
            return
        # The key exists. If it is ours with the same value (a retried put), that is fine.
        current = await client.get(key.encode())
        if current is not None and current.lease == lease_id and current.value == data:
            return
        raise invalid_arg(f"discovery key {key!r} already exists (another instance owns it)")

    async def delete(self, key: str) -> None:
        client, _ = self._require()
        self._records.pop(key, None)
        try:
            await client.delete(key.encode())
        except aetcd.exceptions.ClientError as exc:
            raise _typed(exc, f"etcd delete {key!r} failed") from exc

    async def unregister_all(self) -> None:
        """Stop the keep-alive and revoke the lease: every key goes at once."""
        await self._stop_keepalive()
        lease_id, self._lease_id = self._lease_id, None
        self._records.clear()
        if lease_id is None or self._client is None:
            return
        try:
            async with asyncio.timeout(RPC_TIMEOUT_S + 1):
                await self._client.revoke_lease(lease_id)
            log.info("etcd lease %x revoked; instance unregistered", lease_id)
        except Exception as exc:  # noqa: BLE001 - the lease will expire anyway
            log.warning("etcd lease revoke failed (keys expire in %ss): %r", self._ttl, exc)

    async def close(self) -> None:
        if self._closed:
            return
        await self.unregister_all()
        self._closed = True
        if self._client is not None:
            await _close_quietly(self._client)
            self._client = None

    # -- keep-alive ---------------------------------------------------------------

    def _require(self) -> tuple[aetcd.Client, int]:
        if self._client is None or self._lease_id is None:
            raise RuntimeError("etcd discovery is not connected")
        return self._client, self._lease_id

    async def _stop_keepalive(self) -> None:
        """Stop the keep-alive task, bounded.

        The flag matters: on Python 3.11 ``asyncio.wait_for`` can swallow a
        cancellation that races with its inner call completing, so a cancelled loop
        might otherwise keep running (and an unbounded ``await task`` hang).
        """
        self._stopping = True
        task, self._keepalive = self._keepalive, None
        if task is None or task is asyncio.current_task():
            return
        for _ in range(3):
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=1.0)
            if done:
                return
        log.warning("etcd keep-alive task did not stop; abandoning it")

    async def _keepalive_loop(self) -> None:
        """Refresh every ttl/3; on errors retry quickly; replace a lost lease."""
        interval = self._ttl / 3
        delay = RETRY_MIN_S
        outage_logged = False
        while not self._stopping:
            try:
                client, lease_id = self._require()
                async with asyncio.timeout(RPC_TIMEOUT_S):
                    reply = await client.refresh_lease(lease_id)
                if reply is None or reply.TTL <= 0:
                    log.warning("etcd lease %x is gone; registering again", lease_id)
                    await self._reregister()
                if outage_logged:
                    log.info("etcd reachable again endpoint=%s", self.endpoint)
                outage_logged = False
                delay = RETRY_MIN_S
                await asyncio.sleep(interval)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - never let an outage kill the worker
                if self._stopping:
                    return
                if not outage_logged:
                    log.warning("etcd keep-alive failed endpoint=%s: %r", self.endpoint, exc)
                    outage_logged = True
                else:
                    log.debug("etcd keep-alive still failing: %r", exc)
                await self._rotate_endpoint()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    async def _rotate_endpoint(self) -> None:
        if len(self._endpoints) < 2 or self._client is None:
            return
        old = self._client
        self._endpoint_index = (self._endpoint_index + 1) % len(self._endpoints)
        self._client = self._new_client(self._endpoint_index)
        await _close_quietly(old)

    async def _reregister(self) -> None:
        """Grant a new lease and write the records again under the new instance id.

        Raises on failure, after revoking the new lease so that the next keep-alive
        tick sees a lost lease again and retries from scratch (no half-written set of
        keys survives on a live lease).
        """
        hook = self.on_reregistered
        async with self._lock:
            client, old_id = self._require()
            lease = await client.lease(self._ttl)
            new_id = lease.id
            self._lease_id = new_id
            self.reregistrations += 1
            log.info("etcd re-registration: instance %x -> %x", old_id, new_id)
            old_records = self._records
            if hook is None:
                # Track the full rebound set before writing, so a retry rewrites all of it.
                self._records = {
                    rebind_key(k, old_id, new_id): rebind_record(v, old_id, new_id)
                    for k, v in old_records.items()
                }
                try:
                    for key, value in self._records.items():
                        await self._create(key, value)
                except Exception:
                    await _ignore(client.revoke_lease(new_id))
                    raise
                return
            self._records = {}
        # Outside the lock: the hook calls put().
        try:
            await hook(new_id)
        except Exception as exc:
            log.warning("on_reregistered hook failed for %x: %r", new_id, exc)
            await _ignore(client.revoke_lease(new_id))
            raise


def _typed(exc: Exception, what: str) -> DynamoError:
    """aetcd errors as DynamoErrors: connectivity -> CannotConnect, the rest -> Unknown."""
    text = f"{what}: {type(exc).__name__}: {exc}"
    if isinstance(
        exc, aetcd.exceptions.ConnectionFailedError | aetcd.exceptions.ConnectionTimeoutError
    ):
        return cannot_connect(text)
    return unknown(text)


async def _ignore(coro: Any) -> None:
    try:
        async with asyncio.timeout(RPC_TIMEOUT_S):
            await coro
    except Exception:  # noqa: BLE001
        pass


async def _close_quietly(client: aetcd.Client) -> None:
    try:
        async with asyncio.timeout(RPC_TIMEOUT_S):
            await client.close()
    except Exception:  # noqa: BLE001
        pass
