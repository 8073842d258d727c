"""Kubernetes discovery on ``kubernetes_asyncio`` (docs/wire-protocol.md#kubernetes-discovery).

Selected with ``DYN_DISCOVERY_BACKEND=kubernetes`` (the Dynamo operator's default). The
worker owns one ``DynamoWorkerMetadata`` (``nvidia.com/v1alpha1``) object named after its
pod (``kube_identity.object_name``) in ``POD_NAMESPACE``, whose ``spec.data`` holds the
records etcd and file discovery hold, in four maps keyed by the record key without its
``v1/<bucket>/`` prefix::

    v1/instances/{ns}/{comp}/{ep}/{id:x}         -> endpoints["{ns}/{comp}/{ep}/{id:x}"]
    v1/mdc/{ns}/{comp}/{ep}/{id:x}               -> model_cards[...]
    v1/event_channels/namespace/{ns}/.../{id:x}  -> event_channels[...]
    v1/event_sources/namespace/{ns}/.../{id:x}   -> event_sources[...]

Every change (``put``, ``delete``, ``unregister_all``) writes the whole object again by
server-side apply, as Dynamo 1.6.1 does: ``PATCH .../dynamoworkermetadatas/{name}`` with
``Content-Type: application/apply-patch+yaml``, ``fieldManager=dynamo-worker`` and
``force=true``, the object owned by the pod (``ownerReferences``: the Pod with ``POD_UID``,
``controller: true``, ``blockOwnerDeletion: false``) so Kubernetes deletes it with the pod.
The instance id is fixed by the pod's name (``kube_identity.instance_id_for``), so it never
changes and ``on_reregistered`` is never called. The object is this pod's alone, so ``put``
replaces a key's value instead of refusing it (the create-if-absent rule of ``Discovery``
guards keys that several processes share, which cannot happen here).

The object alone does not make the worker routable: the frontend counts a worker once the
EndpointSlice of its pod lists it ready, which the kubelet decides from the readiness probe
(the status server's ``/health``, ready only between registration and draining).

Configuration: ``KUBECONFIG`` when set, else ``~/.kube/config`` when it exists, else the
in-cluster service account (the order of the Rust client 1.6.1 uses). The pod identity
comes from ``/etc/podinfo/{pod_name,pod_uid,pod_namespace}`` when those files exist (a
downward-API volume), else from ``POD_NAME``, ``POD_UID``, ``POD_NAMESPACE`` (default
``default``), as 1.6.1 reads it.

Failure handling:

* API server unreachable at ``connect()``: ``CONNECT_ATTEMPTS`` tries of a ``GET`` of the
  worker's own object (404 is fine), with growing pauses (about 8 s in all), then a
  ``CannotConnect`` error naming the server; the worker exits non-zero.
* 403 (RBAC missing), at ``connect()`` or on a write: a ``PermissionDenied`` error whose one
  line names the verb and resource to grant; the worker exits non-zero at startup, and
  while serving the line is logged once and the write retried in the background.
* API server lost while serving: ``put``/``delete`` record the change and return; a
  background task re-applies the whole object every ``RETRY_S`` until it succeeds, logging
  once when the server goes and once when it is back. Serving is never interrupted.

``kubernetes_asyncio`` is imported only when this backend is chosen, so a worker using etcd
or file discovery runs without it.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BackendError, DynamoError, cannot_connect, invalid_arg
from .base import Discovery
from .kube_identity import instance_id_for, object_name

if TYPE_CHECKING:
    from ..config import WorkerConfig

__all__ = [
    "API_VERSION",
    "CRD_GROUP",
    "CRD_PLURAL",
    "FIELD_MANAGER",
    "KubeDiscovery",
    "PermissionDenied",
    "PodIdentity",
    "data_map_key",
]

log = logging.getLogger(__name__)

CRD_GROUP = "nvidia.com"
CRD_VERSION = "v1alpha1"
CRD_PLURAL = "dynamoworkermetadatas"
CRD_KIND = "DynamoWorkerMetadata"
API_VERSION = f"{CRD_GROUP}/{CRD_VERSION}"
FIELD_MANAGER = "dynamo-worker"
APPLY_CONTENT_TYPE = "application/apply-patch+yaml"
PODINFO_DIR = Path("/etc/podinfo")

CONNECT_ATTEMPTS = 5
CONNECT_PAUSES_S = (0.5, 1.0, 2.0, 4.0)
REQUEST_TIMEOUT_S = 5.0
RETRY_S = 1.0

# spec.data map for each record bucket (the key's second segment).
_BUCKETS = {
    "instances": "endpoints",
    "mdc": "model_cards",
    "event_channels": "event_channels",
    "event_sources": "event_sources",
}
_MAPS = ("endpoints", "model_cards", "event_channels", "event_sources")


def data_map_key(key: str) -> tuple[str, str]:
    """``v1/<bucket>/<rest>`` -> (``spec.data`` map name, ``<rest>``)."""
    parts = key.split("/", 2)
    if len(parts) != 3 or parts[0] != "v1" or parts[1] not in _BUCKETS or not parts[2]:
        raise invalid_arg(
            f"discovery key {key!r} is not v1/<instances|mdc|event_channels|event_sources>/..."
        )
    return _BUCKETS[parts[1]], parts[2]


class PermissionDenied(DynamoError):
    """The service account lacks an RBAC permission (HTTP 403)."""


def _forbidden(verb: str, namespace: str) -> PermissionDenied:
    return PermissionDenied(
        f"Kubernetes RBAC: the service account may not {verb} {CRD_PLURAL}.{CRD_GROUP} in "
        f"namespace {namespace!r} (403); grant verb '{verb}' on resource '{CRD_PLURAL}' in "
        f"API group '{CRD_GROUP}' (see deploy/k8s/)",
        BackendError.CannotConnect,
    )


@dataclass(frozen=True)
class PodIdentity:
    """The pod (and, in container mode, container) this worker runs as."""

    pod_name: str
    pod_uid: str
    namespace: str
    container_name: str | None = None

    @property
    def name(self) -> str:
        """The ``DynamoWorkerMetadata`` object's name."""
        return object_name(self.pod_name, self.container_name)

    @property
    def instance_id(self) -> int:
        return instance_id_for(self.name)

    @classmethod
    def resolve(cls, config: WorkerConfig, podinfo: Path = PODINFO_DIR) -> PodIdentity:
        """From the downward-API files under ``podinfo``, else ``config`` (POD_* settings).

        Raises ``InvalidArgument`` when the pod name or uid is missing, or when container mode
        has no ``CONTAINER_NAME``.
        """

        def read(file: str, fallback: str | None) -> str | None:
            try:
                text = (podinfo / file).read_text().strip()
            except OSError:
                text = ""
            return text or fallback or None

        pod_name = read("pod_name", config.pod_name)
        pod_uid = read("pod_uid", config.pod_uid)
        namespace = read("pod_namespace", config.pod_namespace)
        if not pod_name:
            raise invalid_arg("kubernetes discovery needs POD_NAME (or /etc/podinfo/pod_name)")
        if not pod_uid:
            raise invalid_arg("kubernetes discovery needs POD_UID (or /etc/podinfo/pod_uid)")
        if not namespace:
            log.warning("POD_NAMESPACE not set, defaulting to 'default'")
            namespace = "default"
        container = None
        if config.kube_discovery_mode == "container":
            if not config.container_name:
                raise invalid_arg(
                    "CONTAINER_NAME is required when DYN_KUBE_DISCOVERY_MODE=container"
                )
            container = config.container_name
        return cls(pod_name, pod_uid, namespace, container)


class KubeDiscovery(Discovery):
    """Discovery through one ``DynamoWorkerMetadata`` object. See the module docstring."""

    def __init__(self, identity: PodIdentity, *, kubeconfig: str | None = None) -> None:
        self.identity = identity
        self._kubeconfig = kubeconfig
        self._records: dict[str, dict] = {}
        self._api: Any = None  # kubernetes_asyncio ApiClient
        self._objects: Any = None  # kubernetes_asyncio CustomObjectsApi
        self._lock = asyncio.Lock()
        self._dirty = asyncio.Event()
        self._retry: asyncio.Task | None = None
        self._server = "the Kubernetes API server"
        self._outage = False
        self.on_reregistered = None  # never called: the id is fixed by the pod name

    @classmethod
    def from_config(cls, config: WorkerConfig) -> KubeDiscovery:
        return cls(PodIdentity.resolve(config), kubeconfig=config.kubeconfig)

    @property
    def instance_id(self) -> int:
        return self.identity.instance_id

    @property
    def records(self) -> dict[str, dict]:
        return dict(self._records)

    # -- the object ------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        """The whole object as applied now: metadata, owner reference and ``spec.data``."""
        ident = self.identity
        data: dict[str, dict[str, Any]] = {m: {} for m in _MAPS}
        for key, value in self._records.items():
            bucket, rest = data_map_key(key)
            data[bucket][rest] = copy.deepcopy(value)
        return {
            "apiVersion": API_VERSION,
            "kind": CRD_KIND,
            "metadata": {
                "name": ident.name,
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "blockOwnerDeletion": False,
                        "controller": True,
                        "kind": "Pod",
                        "name": ident.pod_name,
                        "uid": ident.pod_uid,
                    }
                ],
            },
            "spec": {"data": data},
        }

    # -- lifecycle ---------------------------------------------------------------------
    async def connect(self) -> None:
        if self._api is not None:
            return
        try:
            from kubernetes_asyncio import client
        except ImportError as exc:  # pragma: no cover - a packaging error
            raise invalid_arg(
                "kubernetes discovery needs the kubernetes_asyncio package (pip install "
                "kubernetes_asyncio)"
            ) from exc
        configuration = await self._load_config()
        self._server = configuration.host or self._server
        self._api = client.ApiClient(configuration)
        self._objects = client.CustomObjectsApi(self._api)
        try:
            await self._probe()
        except BaseException:
            await self._close_client()
            raise
        self._retry = asyncio.create_task(self._retry_loop(), name="kube-discovery-reapply")
        log.info(
            "kubernetes discovery: %s/%s on %s, instance_id=%x",
            self.identity.namespace,
            self.identity.name,
            self._server,
            self.instance_id,
        )

    async def _load_config(self) -> Any:
        from kubernetes_asyncio import client, config

        configuration = client.Configuration()
        try:
            if self._kubeconfig:
                await config.load_kube_config(
                    config_file=self._kubeconfig, client_configuration=configuration
                )
                return configuration
            # kube-rs's order (Config::infer), which 1.6.1 uses: a kubeconfig at the default
            # place first, then the pod's service account.
            try:
                await config.load_kube_config(client_configuration=configuration)
            except (config.ConfigException, OSError):
                config.load_incluster_config(client_configuration=configuration)
        except (config.ConfigException, OSError) as exc:
            source = (
                f"KUBECONFIG={self._kubeconfig}"
                if self._kubeconfig
                else "~/.kube/config or the in-cluster service account"
            )
            raise cannot_connect(
                f"kubernetes discovery: cannot configure from {source}: {exc}"
            ) from None
        return configuration

    async def _probe(self) -> None:
        """GET our own object (absent is fine) until the server answers; bounded."""
        from kubernetes_asyncio.client.exceptions import ApiException

        ident = self.identity
        last: BaseException | None = None
        for attempt in range(CONNECT_ATTEMPTS):
            try:
                await self._objects.get_namespaced_custom_object(
                    CRD_GROUP,
                    CRD_VERSION,
                    ident.namespace,
                    CRD_PLURAL,
                    ident.name,
                    _request_timeout=REQUEST_TIMEOUT_S,
                )
                return
            except ApiException as exc:
                if exc.status == 404:
                    return
                if exc.status == 403:
                    raise _forbidden("get", ident.namespace) from None
                last = exc
            except (OSError, TimeoutError, _client_errors()) as exc:
                last = exc
            if attempt < CONNECT_ATTEMPTS - 1:
                pause = CONNECT_PAUSES_S[min(attempt, len(CONNECT_PAUSES_S) - 1)]
                log.warning(
                    "kubernetes discovery: %s not reachable (%s); retry %d/%d in %.1fs",
                    self._server,
                    _describe(last),
                    attempt + 1,
                    CONNECT_ATTEMPTS - 1,
                    pause,
                )
                await asyncio.sleep(pause)
        raise cannot_connect(
            f"kubernetes discovery: API server {self._server} unreachable after "
            f"{CONNECT_ATTEMPTS} attempts: {_describe(last)}"
        )

    async def put(self, key: str, value: dict) -> None:
        if self._api is None:
            raise RuntimeError("KubeDiscovery.connect() has not been called")
        data_map_key(key)  # reject keys that have no place in spec.data
        self._records[key] = copy.deepcopy(value)
        await self._apply_or_defer()

    async def delete(self, key: str) -> None:
        if self._records.pop(key, None) is not None and self._api is not None:
            await self._apply_or_defer()

    async def unregister_all(self) -> None:
        if not self._records or self._api is None:
            self._records.clear()
            return
        self._records.clear()
        await self._apply_or_defer()

    async def close(self) -> None:
        try:
            await self.unregister_all()
        except PermissionDenied as exc:
            log.error("%s", exc.message)
        task, self._retry = self._retry, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        await self._close_client()

    async def _close_client(self) -> None:
        api, self._api, self._objects = self._api, None, None
        if api is not None:
            await api.close()

    # -- writing -------------------------------------------------------------------------
    async def _apply(self) -> None:
        """Server-side apply of ``manifest()``; raises on any failure."""
        from kubernetes_asyncio.client.exceptions import ApiException

        ident = self.identity
        async with self._lock:
            body = self.manifest()
            try:
                await self._objects.patch_namespaced_custom_object(
                    CRD_GROUP,
                    CRD_VERSION,
                    ident.namespace,
                    CRD_PLURAL,
                    ident.name,
                    body,
                    field_manager=FIELD_MANAGER,
                    # The client would send Python's "True"; 1.6.1 (and kubectl) send "true".
                    force="true",
                    _content_type=APPLY_CONTENT_TYPE,
                    _request_timeout=REQUEST_TIMEOUT_S,
                )
            except ApiException as exc:
                if exc.status == 403:
                    raise _forbidden("patch", ident.namespace) from None
                raise

    async def _apply_or_defer(self) -> None:
        """Apply now; if the server is unreachable, leave it to the retry task.

        A 403 is raised (a configuration error the operator must fix); during serving the
        worker's caller logs it and the retry task keeps trying.
        """
        try:
            await self._apply()
        except PermissionDenied:
            self._dirty.set()
            raise
        except Exception as exc:  # noqa: BLE001 - any transport or API failure is retried
            self._dirty.set()
            self._note_outage(exc)
        else:
            self._dirty.clear()
            self._note_recovered()

    def _note_outage(self, exc: BaseException) -> None:
        if not self._outage:
            self._outage = True
            log.warning(
                "kubernetes discovery: cannot write %s/%s (%s); serving continues, "
                "re-applying every %.1fs until the API server answers",
                self.identity.namespace,
                self.identity.name,
                _describe(exc),
                RETRY_S,
            )

    def _note_recovered(self) -> None:
        if self._outage:
            self._outage = False
            log.info(
                "kubernetes discovery: API server back; %s/%s re-applied",
                self.identity.namespace,
                self.identity.name,
            )

    async def _retry_loop(self) -> None:
        """Re-apply the whole object after a failed write until it succeeds. Never raises."""
        denied_logged = False
        while True:
            await self._dirty.wait()
            await asyncio.sleep(RETRY_S)
            if not self._dirty.is_set():
                continue
            try:
                await self._apply()
            except PermissionDenied as exc:
                if not denied_logged:
                    log.error("%s", exc.message)
                    denied_logged = True
                continue
            except Exception as exc:  # noqa: BLE001
                self._note_outage(exc)
                continue
            denied_logged = False
            self._dirty.clear()
            self._note_recovered()


def _client_errors() -> type[BaseException]:
    import aiohttp

    return aiohttp.ClientError


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no answer"
    status = getattr(exc, "status", None)
    if status:
        return f"HTTP {status} {getattr(exc, 'reason', '')}".strip()
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
