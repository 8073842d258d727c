"""A minimal stand-in Kubernetes API server for the Kubernetes-discovery tests.

No real API server can be installed on the test machines, so this one implements only
what the Dynamo 1.6.1 frontend and a Kubernetes-discovery worker use (see
docs/wire-protocol.md#kubernetes-discovery in the vendored runtime):

* namespaced collections ``/api/v1/namespaces/{ns}/{plural}`` and
  ``/apis/{group}/{version}/namespaces/{ns}/{plural}``: list (``labelSelector`` with
  ``key=value`` terms, ``limit`` accepted and ignored: everything fits one page) and watch
  (``watch=true&resourceVersion=N``: every change after N, then new ones as they happen,
  until ``timeoutSeconds`` or the client leaves), with one resource-version counter for
  all objects as the real server has;
* one object: ``GET``; ``PATCH`` with ``application/apply-patch+yaml`` (server-side
  apply: creates the object or replaces its labels, annotations, owner references and
  every top-level field but ``metadata`` and ``status``); ``DELETE``.

The test side changes objects as the kubelet and the endpoint controller would with
``put_object`` / ``delete_object`` (e.g. an EndpointSlice whose endpoint turns
ready or not ready). ``requests`` records every request (method, path, query, headers,
body) for the wire assertions. Fault injection: ``deny(verb, plural)`` answers 403 as
RBAC would; ``pause()`` closes the listening socket and every open connection
(unreachable), ``resume()`` listens on the same port again.

Not modelled: authentication and authorization beyond ``deny``, admission (defaulting,
schema validation: the tests validate against the CRD schema themselves), field-manager
ownership and apply conflicts (every apply wins, as ``force=true`` makes it on a real
server), watch bookmarks, ``sendInitialEvents``, pagination (``continue``), resource-version
expiry (410 Gone), garbage collection through owner references, and TLS.

Runs its own event loop on a background thread so synchronous tests can use it; bound to
127.0.0.1 on a free port. ``start()`` / ``stop()``; also a context manager.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from backend_common.devstack.services import free_port

APPLY_PATCH = "application/apply-patch+yaml"
WATCH_CAP_S = 300.0  # a watch never outlives this, whatever timeoutSeconds says

Key = tuple[str, str]  # (api prefix, plural), e.g. ("apis/nvidia.com/v1alpha1", "dyn...")


@dataclass
class Recorded:
    """One request as it arrived."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any = None
    status: int = 0
    at: float = field(default_factory=time.monotonic)  # when it arrived


@dataclass
class _Collection:
    objects: dict[tuple[str, str], dict] = field(default_factory=dict)  # (ns, name) -> obj
    events: list[tuple[int, str, dict]] = field(default_factory=list)  # (rv, type, obj)


def _matches(obj: dict, selector: str | None) -> bool:
    if not selector:
        return True
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in selector.split(","):
        key, _, value = term.strip().partition("=")
        if labels.get(key) != value:
            return False
    return True


class KubeApiServer:
    """See the module docstring."""

    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[Recorded] = []
        self._collections: dict[Key, _Collection] = {}
        self._rv = 0
        self._denied: set[tuple[str, str]] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._changed: asyncio.Condition | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._lock = threading.Lock()
        self._closing = False

    # -- lifecycle ------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> KubeApiServer:
        self._thread.start()
        self._call(self._start())
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            self._call(self._stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    def pause(self) -> None:
        """Stop listening and drop every connection: clients see the server unreachable."""
        self._call(self._stop())

    def resume(self) -> None:
        """Listen again on the same port, with all objects and resource versions kept."""
        self._call(self._start())

    def __enter__(self) -> KubeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def write_kubeconfig(self, path: Path, namespace: str) -> Path:
        """A kubeconfig whose current context points at this server (plain HTTP, a token)."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
            "users": [{"name": "standin", "user": {"token": "standin-token"}}],
            "contexts": [
                {
                    "name": "standin",
                    "context": {"cluster": "standin", "user": "standin", "namespace": namespace},
                }
            ],
            "current-context": "standin",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    # -- test-side API (thread-safe) -----------------------------------------------
    def deny(self, verb: str, plural: str) -> None:
        """Answer ``verb`` (get, list, watch, patch, delete) on ``plural`` with 403."""
        with self._lock:
            self._denied.add((verb, plural))

    def allow_all(self) -> None:
        with self._lock:
            self._denied.clear()

    def put_object(self, api: str, plural: str, obj: dict) -> dict:
        """Create or replace ``obj`` (as a controller would); returns the stored copy."""
        return self._call(self._store(api, plural, copy.deepcopy(obj)))

    def delete_object(self, api: str, plural: str, namespace: str, name: str) -> bool:
        return self._call(self._delete(api, plural, namespace, name))

    def get_object(self, api: str, plural: str, namespace: str, name: str) -> dict | None:
        with self._lock:
            obj = self._coll(api, plural).objects.get((namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def requests_to(self, plural: str, method: str | None = None) -> list[Recorded]:
        with self._lock:
            return [
                r
                for r in self.requests
                if f"/{plural}" in r.path and (method is None or r.method == method)
            ]

    # -- internals ------------------------------------------------------------------
    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def _coll(self, api: str, plural: str) -> _Collection:
        return self._collections.setdefault((api.strip("/"), plural), _Collection())

    async def _start(self) -> None:
        if self._changed is None:
            self._changed = asyncio.Condition()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1, handle_signals=False)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()

    async def _stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            # Watches end first (they wait on the condition), then the listener and connections.
            self._closing = True
            await self._notify()
            await runner.cleanup()
            self._closing = False

    async def _notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    async def _store(self, api: str, plural: str, obj: dict) -> dict:
        meta = obj.setdefault("metadata", {})
        ns, name = meta.get("namespace", ""), meta["name"]
        with self._lock:
            coll = self._coll(api, plural)
            old = coll.objects.get((ns, name))
            self._rv += 1
            meta["resourceVersion"] = str(self._rv)
            meta.setdefault("uid", (old or {}).get("metadata", {}).get("uid") or str(uuid.uuid4()))
            meta.setdefault(
                "creationTimestamp",
                (old or {}).get("metadata", {}).get("creationTimestamp")
                or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            )
            coll.objects[(ns, name)] = obj
            coll.events.append((self._rv, "MODIFIED" if old else "ADDED", copy.deepcopy(obj)))
        await self._notify()
        return copy.deepcopy(obj)

    async def _delete(self, api: str, plural: str, ns: str, name: str) -> bool:
        with self._lock:
            coll = self._coll(api, plural)
            obj = coll.objects.pop((ns, name), None)
            if obj is None:
                return False
            self._rv += 1
            gone = copy.deepcopy(obj)
            gone["metadata"]["resourceVersion"] = str(self._rv)
            coll.events.append((self._rv, "DELETED", gone))
        await self._notify()
        return True

    @staticmethod
    def _route(path: str) -> tuple[str, str | None, str, str | None] | None:
        """``(api prefix, namespace or None, plural, name or None)`` of a resource path."""
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "v1"]:
            api, rest = "api/v1", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            api, rest = "/".join(parts[:3]), parts[3:]
        else:
            return None
        ns = None
        if len(rest) >= 2 and rest[0] == "namespaces":
            ns, rest = rest[1], rest[2:]
        if len(rest) == 1:
            return api, ns, rest[0], None
        if len(rest) == 2:
            return api, ns, rest[0], rest[1]
        return None

    @staticmethod
    def _status(code: int, reason: str, message: str) -> web.Response:
        body = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }
        return web.json_response(body, status=code)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body: Any = None
        if raw:
            try:
                body = yaml.safe_load(raw.decode())
            except (yaml.YAMLError, UnicodeDecodeError):
                body = raw.decode(errors="replace")
        rec = Recorded(
            request.method, request.path, dict(request.query), dict(request.headers), body
        )
        with self._lock:
            self.requests.append(rec)
        response = await self._dispatch(request, body)
        rec.status = response.status
        return response

    async def _dispatch(self, request: web.Request, body: Any) -> web.StreamResponse:
        route = self._route(request.path)
        if route is None:
            return self._status(404, "NotFound", f"the server could not find {request.path}")
        api, ns, plural, name = route
        q = request.query
        watching = q.get("watch") in ("true", "1")
        verb = {
            "GET": "watch" if watching else ("get" if name else "list"),
            "PATCH": "patch",
            "DELETE": "delete",
        }.get(request.method)
        if verb is None or (verb in ("patch", "delete") and name is None):
            return self._status(405, "MethodNotAllowed", f"{request.method} is not supported")
        with self._lock:
            denied = (verb, plural) in self._denied
        if denied:
            group = api.split("/")[1] if api.startswith("apis/") else ""
            return self._status(
                403,
                "Forbidden",
                f'{plural}.{group} "{name or ""}" is forbidden: User '
                f'"system:serviceaccount:{ns}:default" cannot {verb} resource "{plural}" '
                f'in API group "{group}" in the namespace "{ns}"',
            )
        if verb == "list":
            return self._list(api, ns, plural, q.get("labelSelector"))
        if verb == "watch":
            return await self._watch(request, api, ns, plural)
        assert name is not None
        if verb == "get":
            obj = self.get_object(api, plural, ns or "", name)
            if obj is None:
                return self._status(404, "NotFound", f'{plural} "{name}" not found')
            return web.json_response(obj)
        if verb == "delete":
            if not await self._delete(api, plural, ns or "", name):
                return self._status(404, "NotFound", f'{plural} "{name}" not found')
            return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Success"})
        return await self._apply(request, api, ns or "", plural, name, body)

    def _list(self, api: str, ns: str | None, plural: str, selector: str | None) -> web.Response:
        with self._lock:
            coll = self._coll(api, plural)
            items = [
                copy.deepcopy(o)
                for (ons, _), o in sorted(coll.objects.items())
                if (ns is None or ons == ns) and _matches(o, selector)
            ]
            rv = str(self._rv)
        kind = items[0].get("kind", "") + "List" if items else "List"
        return web.json_response(
            {"kind": kind, "apiVersion": api.partition("/")[2], "metadata": {"resourceVersion": rv}}
            | {"items": items}
        )

    async def _watch(
        self, request: web.Request, api: str, ns: str | None, plural: str
    ) -> web.StreamResponse:
        q = request.query
        try:
            since = int(q.get("resourceVersion") or self._rv)
            timeout = min(float(q.get("timeoutSeconds") or WATCH_CAP_S), WATCH_CAP_S)
        except ValueError:
            return self._status(400, "BadRequest", "resourceVersion/timeoutSeconds not numeric")
        selector = q.get("labelSelector")
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        assert self._changed is not None
        while loop.time() < deadline and not self._closing:
            with self._lock:
                coll = self._coll(api, plural)
                pending = [e for e in coll.events if e[0] > since]
            for rv, kind, obj in pending:
                since = rv
                meta = obj.get("metadata") or {}
                if (ns is None or meta.get("namespace") == ns) and _matches(obj, selector):
                    line = json.dumps({"type": kind, "object": obj}) + "\n"
                    try:
                        await response.write(line.encode())
                    except (ConnectionError, RuntimeError):
                        return response  # the client left
            async with self._changed:
                try:
                    await asyncio.wait_for(
                        self._changed.wait(), timeout=max(0.01, deadline - loop.time())
                    )
                except TimeoutError:
                    break
        try:
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        return response

    async def _apply(
        self, request: web.Request, api: str, ns: str, plural: str, name: str, body: Any
    ) -> web.Response:
        if request.content_type != APPLY_PATCH:
            return self._status(
                415, "UnsupportedMediaType", f"only {APPLY_PATCH} patches are modelled"
            )
        if "fieldManager" not in request.query:
            return self._status(422, "Invalid", "fieldManager is required for apply requests")
        if not isinstance(body, dict) or not isinstance(body.get("metadata"), dict):
            return self._status(400, "BadRequest", "apply body must be an object with metadata")
        meta = body["metadata"]
        if meta.get("name", name) != name:
            return self._status(400, "BadRequest", "metadata.name does not match the URL")
        old = self.get_object(api, plural, ns, name) or {"metadata": {}}
        new = {k: copy.deepcopy(v) for k, v in body.items() if k not in ("metadata", "status")}
        new_meta = {k: v for k, v in old["metadata"].items() if k in ("uid", "creationTimestamp")}
        new_meta.update({"name": name, "namespace": ns, "generation": 1})
        for k in ("labels", "annotations", "ownerReferences"):
            if k in meta:
                new_meta[k] = copy.deepcopy(meta[k])
        if "status" in old:
            new["status"] = old["status"]
        new["metadata"] = new_meta
        stored = await self._store(api, plural, new)
        return web.json_response(stored, status=200 if old.get("metadata") else 201)


ENDPOINTSLICES = ("apis/discovery.k8s.io/v1", "endpointslices")
DISCOVERY_LABELS = {
    "nvidia.com/dynamo-discovery-backend": "kubernetes",
    "nvidia.com/dynamo-discovery-enabled": "true",
}


@dataclass
class Pod:
    """A worker 'pod' the endpoint controller reports: its identity and readiness probe."""

    name: str
    uid: str
    health_url: str
    override: bool | None = None  # None: follow the probe; True/False: forced
    ready: bool = False


class EndpointController:
    """Plays the kubelet and the EndpointSlice controller for one Service.

    Every ``period`` seconds it probes each pod's ``health_url`` (the readiness probe: HTTP
    200 means ready) and, when a pod's readiness changes, writes the Service's EndpointSlice
    (labelled for Dynamo discovery, one endpoint per pod with ``conditions.ready`` and a
    ``targetRef`` to the pod) to the stand-in. ``set_ready(pod, value)`` forces a pod's
    condition (``None`` returns it to the probe). Runs on a daemon thread; ``stop()`` ends it.
    """

    def __init__(
        self, api: KubeApiServer, namespace: str, service: str = "backend", period: float = 0.1
    ) -> None:
        self.api, self.namespace, self.service, self.period = api, namespace, service, period
        self.pods: dict[str, Pod] = {}
        self.first_ready: dict[str, float] = {}  # pod -> when its probe first passed
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def add(self, name: str, uid: str, health_url: str) -> None:
        with self._lock:
            self.pods[name] = Pod(name, uid, health_url)

    def set_ready(self, name: str, value: bool | None) -> None:
        with self._lock:
            self.pods[name].override = value

    def start(self) -> EndpointController:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _probe(self, url: str) -> bool:
        import urllib.request

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(url, timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def _run(self) -> None:
        published: dict[str, bool] | None = None
        while not self._stop.wait(self.period):
            with self._lock:
                pods = list(self.pods.values())
            state = {}
            for pod in pods:
                probed = self._probe(pod.health_url) if pod.override is None else pod.override
                if probed and pod.override is None:
                    self.first_ready.setdefault(pod.name, time.monotonic())
                pod.ready = probed
                state[pod.name] = probed
            if state == published:
                continue
            self.api.put_object(*ENDPOINTSLICES, self._slice(pods))
            published = state

    def _slice(self, pods: list[Pod]) -> dict:
        return {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{self.service}-slice",
                "namespace": self.namespace,
                "labels": {**DISCOVERY_LABELS, "kubernetes.io/service-name": self.service},
            },
            "addressType": "IPv4",
            "endpoints": [
                {
                    "addresses": ["127.0.0.1"],
                    "conditions": {"ready": p.ready, "serving": p.ready, "terminating": False},
                    "targetRef": {
                        "kind": "Pod",
                        "name": p.name,
                        "namespace": self.namespace,
                        "uid": p.uid,
                    },
                }
                for p in pods
            ],
        }
