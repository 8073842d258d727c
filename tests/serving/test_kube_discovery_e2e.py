"""Kubernetes discovery end to end: the REAL Dynamo 1.6.1 frontend and our workers.

The frontend runs with ``DYN_DISCOVERY_BACKEND=kubernetes`` and a ``KUBECONFIG`` pointing
at the stand-in API server (``tests/kube_apiserver.py``); each worker runs as a "pod"
(``POD_NAME``/``POD_NAMESPACE``/``POD_UID``) and writes its ``DynamoWorkerMetadata``
there. ``EndpointController`` plays the kubelet and the EndpointSlice controller: it probes
each worker's ``/health`` (the readiness probe on the system port) and publishes the
EndpointSlice the frontend watches. Measured and asserted: time until the model is listed,
time until a worker whose endpoint turns not ready (or whose object is deleted) is out of
rotation, the traffic split across two workers, and that serving goes on while the API
server is away.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from conftest import REPO, RUNTIME_SRC, wait_until
from dwm_schema import dwm_errors
from kube_apiserver import EndpointController, KubeApiServer
from worker_probes import events

from backend_common.devstack.frontend import Frontend, free_system_port, hermetic_env, worker_env
from backend_common.devstack.openai import chat, completion
from backend_common.devstack.services import ManagedProcess
from backend_common.discovery.kube_identity import instance_id_for

pytestmark = pytest.mark.e2e

NS = "dyn"
DWM = ("apis/nvidia.com/v1alpha1", "dynamoworkermetadatas")
MODEL = "tiny-kube"
LISTED_BOUND_S = 30.0  # worker start -> model listed (engine start, registration, probe)
REMOVED_BOUND_S = 5.0  # endpoint not ready / object deleted -> out of rotation


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[tuple[KubeApiServer, EndpointController, Path]]:
    api = KubeApiServer().start()
    controller = EndpointController(api, NS).start()
    try:
        yield api, controller, api.write_kubeconfig(tmp_path / "kubeconfig", NS)
    finally:
        controller.stop()
        api.stop()


def start_worker(
    tmp_path: Path, kubeconfig: Path, model_dir: Path, pod: str, procs: list[ManagedProcess]
) -> tuple[ManagedProcess, int]:
    port = free_system_port()
    env = worker_env(discovery_backend="kubernetes", kubeconfig=kubeconfig, system_port=port)
    env.update(
        {
            "POD_NAME": pod,
            "POD_UID": f"uid-{pod}",
            "POD_NAMESPACE": NS,
            "PYTHONPATH": f"{RUNTIME_SRC}:{REPO}",
            # Long enough to watch /health turn not ready while the worker drains.
            "DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS": "1.0",
        }
    )
    argv = [sys.executable, "-m", "tests.e2e_engine", "--model-path", str(model_dir)]
    argv += ["--model-name", MODEL]
    proc = ManagedProcess(argv, env=hermetic_env(env), log_path=tmp_path / f"{pod}.log", cwd=REPO)
    procs.append(proc.start())
    return proc, port


async def served_by(
    base: str, procs: dict[str, ManagedProcess], n: int, chat_api: bool = True
) -> dict[str, int]:
    """Send ``n`` requests one after another; how many each worker finished."""
    before = {pod: len(events(p, "finish")) for pod, p in procs.items()}
    async with aiohttp.ClientSession() as session:
        for i in range(n):
            call = chat if chat_api or i % 2 else completion
            result = await call(session, base, MODEL, "w5 w6", max_tokens=3, stream=i % 3 == 0)
            assert result.ok, (result.status, result.error)
    await asyncio.sleep(0.2)  # the finish line is logged right after the last item
    return {pod: len(events(p, "finish")) - before[pod] for pod, p in procs.items()}


def http_status(url: str) -> int:
    """The status code of GET ``url``; 0 when nothing answers."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=1) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def removed_logged(fe: Frontend, pod: str) -> bool:
    """Whether the frontend's discovery removed the endpoint of the instance id of ``pod``.

    1.6.1 logs ``event_kind="removed" instance_id=Endpoint(EndpointInstanceId { ...,
    instance_id: <decimal> })``: the id it derived from the EndpointSlice's pod name, which
    must be the one our worker registered under.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", fe.log_text())
    needle = f"instance_id: {instance_id_for(pod)} }})"
    return any(
        'event_kind="removed"' in line and "Endpoint(" in line and needle in line
        for line in text.splitlines()
    )


async def test_frontend_serves_and_drops_kube_workers(
    kube: tuple[KubeApiServer, EndpointController, Path],
    tmp_path: Path,
    tiny_model: Path,
    frontend_python: str,
) -> None:
    api, controller, kubeconfig = kube
    fe = Frontend(
        workdir=tmp_path / "fe",
        python=frontend_python,
        discovery_backend="kubernetes",
        kubeconfig=kubeconfig,
        extra_env={"POD_NAME": "frontend-0", "POD_UID": "uid-frontend", "POD_NAMESPACE": NS},
    )
    procs: list[ManagedProcess] = []
    fe.start()
    try:
        # -- one worker: listed, then chat and completions through it -----------------------
        started = time.monotonic()
        a, port_a = start_worker(tmp_path, kubeconfig, tiny_model, "worker-a", procs)
        controller.add("worker-a", "uid-worker-a", f"http://127.0.0.1:{port_a}/health")
        fe.wait_for_model(MODEL, timeout=LISTED_BOUND_S, watch=[a])
        t_listed = time.monotonic() - started
        split = await served_by(fe.base_url, {"worker-a": a}, 4, chat_api=False)
        assert split == {"worker-a": 4}
        # -- a second worker joins; both get traffic -------------------------------------------
        b, port_b = start_worker(tmp_path, kubeconfig, tiny_model, "worker-b", procs)
        controller.add("worker-b", "uid-worker-b", f"http://127.0.0.1:{port_b}/health")
        wait_until(lambda: controller.pods["worker-b"].ready, LISTED_BOUND_S, message="b ready")
        workers = {"worker-a": a, "worker-b": b}
        split = {"worker-a": 0, "worker-b": 0}
        deadline = time.monotonic() + LISTED_BOUND_S
        while split["worker-b"] == 0 and time.monotonic() < deadline:
            split = await served_by(fe.base_url, workers, 20)
        assert split["worker-a"] > 0 and split["worker-b"] > 0, split
        # -- b's endpoint turns not ready: removed (the frontend's id for b is ours) ---------
        marked = time.monotonic()
        controller.set_ready("worker-b", False)
        wait_until(lambda: removed_logged(fe, "worker-b"), REMOVED_BOUND_S, message="b removed")
        t_not_ready = time.monotonic() - marked
        assert await served_by(fe.base_url, workers, 10) == {"worker-a": 10, "worker-b": 0}
        # -- a's object is deleted: a is removed; no worker left, the model goes --------------
        assert MODEL in fe.models()
        marked = time.monotonic()
        assert api.delete_object(*DWM, NS, "worker-a")
        fe.wait_model_gone(MODEL, timeout=REMOVED_BOUND_S)
        t_deleted = time.monotonic() - marked
        assert removed_logged(fe, "worker-a")
        # -- b ready again: back in rotation ------------------------------------------------
        controller.set_ready("worker-b", None)
        fe.wait_for_model(MODEL, timeout=LISTED_BOUND_S, watch=[b])
        assert (await served_by(fe.base_url, workers, 4))["worker-b"] == 4
        # -- the API server goes away: serving goes on ------------------------------------------
        api.pause()
        try:
            assert (await served_by(fe.base_url, workers, 4))["worker-b"] == 4
        finally:
            api.resume()
        # -- readiness agrees with the object: ready only after registration -----------------
        first_ready = controller.first_ready["worker-a"]
        registered = min(
            r.at
            for r in api.requests_to("dynamoworkermetadatas/worker-a", "PATCH")
            if r.body["spec"]["data"]["endpoints"]
        )
        assert registered < first_ready
        # -- b drains: /health says not ready while it still answers, then the object empties
        assert b.pid is not None
        os.kill(b.pid, signal.SIGTERM)
        health = f"http://127.0.0.1:{port_b}/health"
        codes = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and b.running:
            codes.append(http_status(health))
            await asyncio.sleep(0.02)
        assert 503 in codes and 200 not in codes[codes.index(503) :], codes
        assert b.wait(timeout=30) == 0
        stored = api.get_object(*DWM, NS, "worker-b")
        assert stored is not None and not any(stored["spec"]["data"].values()), stored
        # -- every object our workers sent is a valid DynamoWorkerMetadata ------------------
        patches = api.requests_to("dynamoworkermetadatas", "PATCH")
        assert patches and all(dwm_errors(r.body) == [] for r in patches)
        print(
            f"\nkube e2e: listed {t_listed:.2f}s after start, removed {t_not_ready:.2f}s after "
            f"not-ready, {t_deleted:.2f}s after object deletion; split {split}"
        )
    finally:
        for proc in procs:
            proc.terminate(timeout=15)
        fe.stop()


def pod_object(name: str, containers: dict[str, bool]) -> dict:
    """A Pod as the kubelet reports it: one container status per container, ready or not."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NS,
            "uid": f"uid-{name}",
            "labels": {
                "nvidia.com/dynamo-discovery-backend": "kubernetes",
                "nvidia.com/dynamo-discovery-enabled": "true",
            },
        },
        "spec": {"containers": [{"name": c, "image": "backend"} for c in containers]},
        "status": {
            "phase": "Running",
            "containerStatuses": [
                {
                    "name": c,
                    "ready": ready,
                    "restartCount": 0,
                    "image": "backend",
                    "imageID": "backend@sha256:0",
                    "started": True,
                }
                for c, ready in containers.items()
            ],
        },
    }


async def test_container_mode_with_the_real_frontend(
    kube: tuple[KubeApiServer, EndpointController, Path],
    tmp_path: Path,
    tiny_model: Path,
    frontend_python: str,
) -> None:
    """DYN_KUBE_DISCOVERY_MODE=container: the frontend watches Pods and their container
    statuses; our worker in container ``engine-0`` registers as ``{pod}-engine-0`` under the
    id of that name, and the frontend routes to it once that container is ready."""
    api, _, kubeconfig = kube
    container_env = {"DYN_KUBE_DISCOVERY_MODE": "container"}
    fe = Frontend(
        workdir=tmp_path / "fe",
        python=frontend_python,
        discovery_backend="kubernetes",
        kubeconfig=kubeconfig,
        extra_env={
            **container_env,
            "CONTAINER_NAME": "main",
            "POD_NAME": "frontend-0",
            "POD_UID": "uid-frontend",
            "POD_NAMESPACE": NS,
        },
    )
    procs: list[ManagedProcess] = []
    fe.start()
    try:
        port = free_system_port()
        env = worker_env(discovery_backend="kubernetes", kubeconfig=kubeconfig, system_port=port)
        env.update(
            {
                **container_env,
                "CONTAINER_NAME": "engine-0",
                "POD_NAME": "worker-c",
                "POD_UID": "uid-worker-c",
                "POD_NAMESPACE": NS,
                "PYTHONPATH": f"{RUNTIME_SRC}:{REPO}",
            }
        )
        argv = [sys.executable, "-m", "tests.e2e_engine", "--model-path", str(tiny_model)]
        argv += ["--model-name", MODEL]
        log = tmp_path / "worker-c.log"
        worker = ManagedProcess(argv, env=hermetic_env(env), log_path=log, cwd=REPO)
        procs.append(worker.start())
        wait_until(
            lambda: api.get_object(*DWM, NS, "worker-c-engine-0") is not None,
            LISTED_BOUND_S,
            message="worker-c-engine-0 written",
        )
        stored = api.get_object(*DWM, NS, "worker-c-engine-0")
        assert stored is not None and dwm_errors(stored) == []
        assert stored["metadata"]["ownerReferences"][0]["name"] == "worker-c"
        iid = instance_id_for("worker-c-engine-0")
        wait_until(
            lambda: bool(
                (api.get_object(*DWM, NS, "worker-c-engine-0") or {})["spec"]["data"]["endpoints"]
            ),
            LISTED_BOUND_S,
            message="endpoint registered",
        )
        data = api.get_object(*DWM, NS, "worker-c-engine-0")["spec"]["data"]  # type: ignore[index]
        assert list(data["endpoints"]) == [f"dynamo/backend/generate/{iid:x}"]
        api.put_object("api/v1", "pods", pod_object("worker-c", {"engine-0": True}))
        fe.wait_for_model(MODEL, timeout=LISTED_BOUND_S, watch=[worker])
        split = await served_by(fe.base_url, {"worker-c": worker}, 4)
        assert split == {"worker-c": 4}
        # The container turns not ready: the frontend drops it (by the container-mode id).
        marked = time.monotonic()
        api.put_object("api/v1", "pods", pod_object("worker-c", {"engine-0": False}))
        fe.wait_model_gone(MODEL, timeout=REMOVED_BOUND_S)
        print(f"\nkube container mode: removed {time.monotonic() - marked:.2f}s after not-ready")
    finally:
        for proc in procs:
            proc.terminate(timeout=15)
        fe.stop()
