"""Kubernetes discovery (``discovery/kube.py``) against the stand-in API server.

The reference is ``fixtures/kube-wire-dynamo-1.6.1.json``: what Dynamo 1.6.1's own mocker
sent to the stand-in (recorded by ``tests/capture_kube_wire.py``, see its docstring). Our
requests must match it in path, query, content type and body shape; every object we apply
must validate against the operator's CRD schema (``fixtures/dynamoworkermetadata-v1alpha1
.crd.yaml``). Failure behaviour: unreachable at start (bounded retry, then an error and a
non-zero exit), 403 (one line naming the permission), lost while serving (the change is
re-applied when the server is back).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, RUNTIME_SRC
from dwm_schema import dwm_errors
from kube_apiserver import KubeApiServer

from backend_common.config import WorkerConfig
from backend_common.devstack.frontend import hermetic_env
from backend_common.devstack.services import ManagedProcess
from backend_common.discovery import create_discovery
from backend_common.discovery import kube as kube_mod
from backend_common.discovery.base import (
    endpoint_record,
    instance_key,
    model_key,
    model_record,
    tcp_transport,
)
from backend_common.discovery.kube import KubeDiscovery, PermissionDenied, PodIdentity
from backend_common.discovery.kube_identity import instance_id_for, object_name, siphash13
from backend_common.errors import DynamoError
from backend_common.runtime.kv_events.records import event_channel_record, subject_prefix

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
CAPTURE = json.loads((FIXTURES / "kube-wire-dynamo-1.6.1.json").read_text())
DWM_API = "apis/nvidia.com/v1alpha1"
NS = "dyn"


def capture_patches() -> list[dict[str, Any]]:
    return [r for r in CAPTURE["requests"] if r["method"] == "PATCH"]


@pytest.fixture
def api() -> Iterator[KubeApiServer]:
    server = KubeApiServer().start()
    try:
        yield server
    finally:
        server.stop()


def make(api: KubeApiServer, tmp_path: Path, pod: str = "worker-0", **cfg: Any) -> KubeDiscovery:
    config = WorkerConfig(
        discovery_backend="kubernetes",
        pod_name=pod,
        pod_uid=f"uid-{pod}",
        pod_namespace=NS,
        kubeconfig=str(api.write_kubeconfig(tmp_path / "kubeconfig", NS)),
        **cfg,
    )
    discovery = create_discovery(config)
    assert isinstance(discovery, KubeDiscovery)
    return discovery


def worker_records(d: KubeDiscovery) -> list[tuple[str, dict]]:
    iid = d.instance_id
    card = {"display_name": "m", "slug": "m"}
    transport = tcp_transport("127.0.0.1", 40000, iid, "dynamo", "backend", "generate")
    channel = event_channel_record(
        "dynamo",
        "backend",
        "generate",
        "kv-events",
        iid,
        {
            "kind": "Nats",
            "config": {"subject_prefix": subject_prefix("dynamo", "backend", "generate")},
        },
    )
    return [
        channel,
        (
            model_key("dynamo", "backend", "generate", iid),
            model_record("dynamo", "backend", "generate", iid, card),
        ),
        (
            instance_key("dynamo", "backend", "generate", iid),
            endpoint_record("dynamo", "backend", "generate", iid, transport),
        ),
    ]


# -- identity ----------------------------------------------------------------------------
def test_instance_id_is_the_one_the_real_runtime_logs() -> None:
    pod = CAPTURE["pod_name"]
    iid = instance_id_for(pod)
    assert iid == 0x33CE3F78386A9
    # The 1.6.1 mocker logged it, and keyed its model card and endpoint with it.
    assert f"{iid:x}" in CAPTURE["instance_ids_logged"]
    last = capture_patches()[-1]["body"]["spec"]["data"]["model_cards"]
    assert list(last) == [f"dynamo/backend/generate/{iid:x}"]
    assert last[f"dynamo/backend/generate/{iid:x}"]["instance_id"] == iid


def test_instance_id_hash_properties() -> None:
    # The 53-bit mask keeps ids exact in an IEEE-754 double; different names, different ids.
    ids = {instance_id_for(f"worker-{i}") for i in range(200)}
    assert len(ids) == 200 and all(0 < i < 2**53 for i in ids)
    # SipHash-1-3 differs from SipHash-2-4: a wrong round count would still give 64 bits.
    assert siphash13(b"") != siphash13(b"\xff")


def test_container_mode_names_like_1_6_1() -> None:
    assert object_name("worker-0", None) == "worker-0"
    assert object_name("worker-0", "main") == "worker-0"
    assert object_name("worker-0", "engine-1") == "worker-0-engine-1"
    assert instance_id_for(object_name("worker-0", "main")) == instance_id_for("worker-0")
    config = WorkerConfig(
        discovery_backend="kubernetes",
        pod_name="worker-0",
        pod_uid="u",
        pod_namespace=NS,
        kube_discovery_mode="container",
        container_name="engine-1",
    )
    ident = PodIdentity.resolve(config, podinfo=Path("/nonexistent"))
    assert ident.name == "worker-0-engine-1"
    assert ident.instance_id == instance_id_for("worker-0-engine-1") != instance_id_for("worker-0")


def test_pod_identity_errors_and_downward_api_files(tmp_path: Path) -> None:
    with pytest.raises(DynamoError, match="POD_NAME"):
        PodIdentity.resolve(WorkerConfig(pod_uid="u"), podinfo=tmp_path)
    with pytest.raises(DynamoError, match="POD_UID"):
        PodIdentity.resolve(WorkerConfig(pod_name="p"), podinfo=tmp_path)
    with pytest.raises(DynamoError, match="CONTAINER_NAME is required"):
        PodIdentity.resolve(
            WorkerConfig(pod_name="p", pod_uid="u", kube_discovery_mode="container"),
            podinfo=tmp_path,
        )
    with pytest.raises(DynamoError, match="DYN_KUBE_DISCOVERY_MODE"):
        WorkerConfig(kube_discovery_mode="node")
    # The downward-API volume wins over the variables, as in 1.6.1.
    (tmp_path / "pod_name").write_text("from-file\n")
    (tmp_path / "pod_uid").write_text("uid-file")
    ident = PodIdentity.resolve(WorkerConfig(pod_name="env", pod_uid="u"), podinfo=tmp_path)
    assert (ident.pod_name, ident.pod_uid, ident.namespace) == ("from-file", "uid-file", "default")


# -- the wire ------------------------------------------------------------------------------
async def test_requests_match_the_1_6_1_capture(api: KubeApiServer, tmp_path: Path) -> None:
    d = make(api, tmp_path, pod=CAPTURE["pod_name"])
    d.identity = PodIdentity(CAPTURE["pod_name"], CAPTURE["pod_uid"], NS)
    await d.connect()
    await d.register(worker_records(d))
    ours = api.requests_to("dynamoworkermetadatas", "PATCH")
    theirs = capture_patches()
    assert len(ours) == 3  # one whole-object apply per record, as 1.6.1 does
    ref = theirs[2]  # 1.6.1's third apply: event channel, model card, endpoint
    for req in ours:
        assert req.path == ref["path"]
        assert req.query == ref["query"] == {"fieldManager": "dynamo-worker", "force": "true"}
        assert req.headers["Content-Type"] == ref["headers"]["content-type"]
        assert req.headers["Content-Type"] == "application/apply-patch+yaml"
        assert req.headers.get("Accept", "").startswith("application/json")
        assert req.status in (200, 201)
        body = req.body
        assert dwm_errors(body) == []
        assert body["apiVersion"] == ref["body"]["apiVersion"]
        assert body["kind"] == ref["body"]["kind"]
        assert body["metadata"] == ref["body"]["metadata"]  # name + ownerReferences, exactly
        assert set(body["spec"]["data"]) == set(ref["body"]["spec"]["data"])
    data, ref_data = ours[-1].body["spec"]["data"], ref["body"]["spec"]["data"]
    # Same map keys (ours have one event channel; 1.6.1's mocker has several topics).
    assert list(data["endpoints"]) == list(ref_data["endpoints"])
    assert list(data["model_cards"]) == list(ref_data["model_cards"])
    ref_channel = next(iter(ref_data["event_channels"]))
    (channel,) = data["event_channels"]
    assert channel.rsplit("/", 3)[0] == ref_channel.rsplit("/", 3)[0]  # .../topic/<t>/<id>
    for bucket in ("endpoints", "model_cards", "event_channels"):
        for value in data[bucket].values():
            ref_value = next(iter(ref_data[bucket].values()))
            assert value["type"] == ref_value["type"]
            assert set(value) <= set(ref_value) | {"request_plane_codec", "model_suffix"}
    await d.close()


async def test_whole_object_on_every_change(api: KubeApiServer, tmp_path: Path) -> None:
    d = make(api, tmp_path)
    await d.connect()
    records = worker_records(d)
    await d.register(records)
    stored = api.get_object(DWM_API, "dynamoworkermetadatas", NS, "worker-0")
    assert stored is not None
    assert stored["metadata"]["ownerReferences"][0]["uid"] == "uid-worker-0"
    data = stored["spec"]["data"]
    assert len(data["endpoints"]) == len(data["model_cards"]) == len(data["event_channels"]) == 1
    await d.delete(records[1][0])  # the model card
    stored = api.get_object(DWM_API, "dynamoworkermetadatas", NS, "worker-0")
    assert stored is not None and stored["spec"]["data"]["model_cards"] == {}
    assert len(stored["spec"]["data"]["endpoints"]) == 1
    await d.unregister_all()
    stored = api.get_object(DWM_API, "dynamoworkermetadatas", NS, "worker-0")
    assert stored is not None
    assert stored["spec"]["data"] == {m: {} for m in kube_mod._MAPS}
    for req in api.requests_to("dynamoworkermetadatas", "PATCH"):
        assert dwm_errors(req.body) == []
    with pytest.raises(DynamoError, match="v1/<instances"):
        await d.put("v1/other/x", {})
    await d.close()


# -- failures ------------------------------------------------------------------------------
async def test_unreachable_at_start_is_a_bounded_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = KubeApiServer()  # never started: its port refuses connections
    monkeypatch.setattr(kube_mod, "CONNECT_PAUSES_S", (0.05,))
    d = make(api, tmp_path)
    started = time.monotonic()
    with pytest.raises(DynamoError, match="unreachable after 5 attempts"):
        await d.connect()
    assert time.monotonic() - started < 5


async def test_forbidden_names_the_missing_permission(api: KubeApiServer, tmp_path: Path) -> None:
    api.deny("patch", "dynamoworkermetadatas")
    d = make(api, tmp_path)
    await d.connect()  # get is allowed
    with pytest.raises(PermissionDenied) as info:
        await d.register(worker_records(d))
    message = info.value.message
    assert "\n" not in message
    assert "'patch'" in message and "dynamoworkermetadatas" in message and "nvidia.com" in message
    await d.close()
    api.allow_all()
    api.deny("get", "dynamoworkermetadatas")
    d = make(api, tmp_path)
    with pytest.raises(PermissionDenied, match="may not get dynamoworkermetadatas"):
        await d.connect()


async def test_lost_while_serving_reapplies_when_back(
    api: KubeApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kube_mod, "RETRY_S", 0.1)
    d = make(api, tmp_path)
    await d.connect()
    records = worker_records(d)
    await d.register(records[:2])
    api.pause()
    # The write during the outage returns at once; the worker keeps going.
    started = time.monotonic()
    await asyncio.wait_for(d.put(*records[2]), 10)
    assert time.monotonic() - started < kube_mod.REQUEST_TIMEOUT_S + 1
    await asyncio.sleep(0.5)
    api.resume()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stored = api.get_object(DWM_API, "dynamoworkermetadatas", NS, "worker-0")
        if stored and stored["spec"]["data"]["endpoints"]:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the change made during the outage was not re-applied")
    assert time.monotonic() - deadline < 0  # within the bound
    await d.close()


def _kube_worker(api: KubeApiServer, tmp_path: Path, model: Path) -> ManagedProcess:
    env = hermetic_env(
        {
            "PYTHONPATH": f"{RUNTIME_SRC}:{REPO}",
            "DYN_DISCOVERY_BACKEND": "kubernetes",
            "KUBECONFIG": str(api.write_kubeconfig(tmp_path / "kubeconfig", NS)),
            "POD_NAME": "worker-0",
            "POD_UID": "uid-0",
            "POD_NAMESPACE": NS,
            "DYN_TCP_RPC_HOST": "127.0.0.1",
            "DYN_SYSTEM_HOST": "127.0.0.1",
        }
    )
    argv = [sys.executable, "-m", "tests.e2e_engine", "--model-path", str(model)]
    argv += ["--model-name", "tiny"]
    return ManagedProcess(argv, env=env, log_path=tmp_path / "worker.log", cwd=REPO).start()


@pytest.mark.parametrize("failure", ["unreachable", "forbidden"])
def test_worker_process_exits_non_zero(failure: str, tmp_path: Path, tiny_model: Path) -> None:
    """The real worker process: one clear error line and exit code 1, within a bound."""
    api = KubeApiServer()
    if failure == "forbidden":
        api.start()
        api.deny("patch", "dynamoworkermetadatas")
    started = time.monotonic()
    proc = _kube_worker(api, tmp_path, tiny_model)
    try:
        code = proc.wait(timeout=60)
        elapsed = time.monotonic() - started
    finally:
        proc.terminate(timeout=5)
        api.stop()
    log = (tmp_path / "worker.log").read_text()
    print(f"\nkube worker, {failure}: exit {code} after {elapsed:.1f}s")
    assert code == 1, log[-2000:]
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, log[-2000:]
    if failure == "unreachable":
        assert "unreachable after 5 attempts" in errors[0]
        # 5 attempts with 0.5+1+2+4 s between them, plus the process start.
        assert 7.5 <= elapsed < 30, elapsed
    else:
        assert "may not patch dynamoworkermetadatas.nvidia.com" in errors[0]
        assert "grant verb 'patch'" in errors[0]


async def test_in_cluster_service_account_when_no_kubeconfig(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without KUBECONFIG (and no ~/.kube/config) the pod's service account is used: the API
    server address from KUBERNETES_SERVICE_HOST/PORT, the token and CA from the mounted
    secret."""
    from kubernetes_asyncio.config import incluster_config, kube_config

    token, ca = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text("sa-token")
    ca.write_text("not used before a connection")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(ca))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "none"))
    ident = PodIdentity("worker-0", "uid-0", NS)
    configuration = await KubeDiscovery(ident)._load_config()
    assert configuration.host == "https://10.0.0.1:6443"
    assert configuration.ssl_ca_cert == str(ca)
    assert "sa-token" in str(configuration.api_key)
    # Neither a service account nor a kubeconfig: a clear error, not a traceback.
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    with pytest.raises(DynamoError, match="cannot configure from ~/.kube/config or the in-clu"):
        await KubeDiscovery(ident)._load_config()
    with pytest.raises(DynamoError, match="cannot configure from KUBECONFIG="):
        await KubeDiscovery(ident, kubeconfig=str(tmp_path / "missing"))._load_config()


def test_the_runtime_imports_without_kubernetes_asyncio() -> None:
    """Only the Kubernetes backend needs the package, and only once it connects."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'kubernetes_asyncio':\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import backend_common, backend_common.runtime.worker\n"
        "from backend_common.config import WorkerConfig\n"
        "from backend_common.discovery import create_discovery\n"
        "create_discovery(WorkerConfig(discovery_backend='file', file_kv='/tmp/x'))\n"
        "d = create_discovery(WorkerConfig(discovery_backend='kubernetes', pod_name='p',"
        " pod_uid='u'))\n"
        "print(hex(d.instance_id))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=hermetic_env({"PYTHONPATH": str(RUNTIME_SRC)}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == hex(instance_id_for("p"))


async def test_forbidden_while_serving_logs_one_line_and_keeps_retrying(
    api: KubeApiServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(kube_mod, "RETRY_S", 0.05)
    d = make(api, tmp_path)
    await d.connect()
    records = worker_records(d)
    await d.register(records[:2])
    api.pause()
    await d.put(*records[2])  # deferred: the server is away
    api.deny("patch", "dynamoworkermetadatas")  # ...and comes back without the permission
    api.resume()
    with caplog.at_level("ERROR", logger=kube_mod.__name__):
        await asyncio.sleep(1.0)
    denied = [r for r in caplog.records if "may not patch" in r.getMessage()]
    assert len(denied) == 1, [r.getMessage() for r in caplog.records]
    assert len(api.requests_to("dynamoworkermetadatas", "PATCH")) > 5  # still retrying
    api.allow_all()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        stored = api.get_object(DWM_API, "dynamoworkermetadatas", NS, "worker-0")
        if stored and stored["spec"]["data"]["endpoints"]:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("not re-applied once the permission was granted")
    await d.close()
