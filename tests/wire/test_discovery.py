"""Discovery: record/key helpers, etcd (real etcd on a random port) and file backends.

The file layout is checked against the files the REAL Dynamo 1.6.1 sample backend
writes (skipped without a frontend venv, failed in CI).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aetcd
import pytest
from conftest import require_frontend

from backend_common.args import add_common_args, worker_config_from_args
from backend_common.config import EngineConfig, EtcdOptions, WorkerConfig
from backend_common.devstack.frontend import hermetic_env, worker_env
from backend_common.devstack.services import EtcdServer, ManagedProcess
from backend_common.devstack.tinymodel import write_tiny_model
from backend_common.discovery import create_discovery
from backend_common.discovery.base import (
    endpoint_record,
    instance_key,
    instance_path,
    model_key,
    model_record,
    nats_transport,
    rebind_key,
    rebind_record,
    tcp_transport,
)
from backend_common.discovery.etcd import EtcdDiscovery, parse_endpoints
from backend_common.discovery.file import FileDiscovery, decode_key, encode_key
from backend_common.errors import BackendError, DynamoError
from backend_common.runtime.modelcard import build_model_card

BIG_ID = 0xDAD5340EA7BB83A8  # above 2^63, as observed from the file backend


async def wait_until(predicate, within: float, step: float = 0.05):
    """Poll an async or sync predicate until truthy; return its value (bounded)."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(step)


def records_for(iid: int, ns: str = "dynamo", comp: str = "backend", ep: str = "generate"):
    transport = tcp_transport("127.0.0.1", 4321, iid, ns, comp, ep)
    return [
        (model_key(ns, comp, ep, iid), model_record(ns, comp, ep, iid, {"display_name": "m"})),
        (instance_key(ns, comp, ep, iid), endpoint_record(ns, comp, ep, iid, transport)),
    ]


# ------------------------------------------------------------------ helpers (no services)


def test_keys_use_unpadded_lowercase_hex() -> None:
    assert instance_key("dynamo", "sample", "generate", BIG_ID) == (
        "v1/instances/dynamo/sample/generate/dad5340ea7bb83a8"
    )
    assert model_key("ns", "c", "e", 0x1F) == "v1/mdc/ns/c/e/1f"
    assert model_key("ns", "c", "e", 0x1F, "lora-a") == "v1/mdc/ns/c/e/1f/lora-a"
    for bad in (0, -1, 1 << 64):
        with pytest.raises(DynamoError):
            instance_key("ns", "c", "e", bad)
    with pytest.raises(DynamoError):
        instance_key("ns", "a/b", "e", 1)


def test_tcp_transport_escapes_each_component() -> None:
    t = tcp_transport("127.0.0.1", 39615, 0x6A6CA21AD223B164, "dynamo", "sample", "generate")
    assert t == {"tcp": "127.0.0.1:39615/6a6ca21ad223b164/dynamo/sample/generate"}
    assert instance_path(0xAB, "n%s", "c", "e") == "ab/n%25s/c/e"
    # '%' is escaped before '/', so an escaped slash stays distinguishable.
    assert tcp_transport("::1", 80, 1, "a%2F", "c", "e") == {"tcp": "[::1]:80/1/a%252F/c/e"}
    with pytest.raises(DynamoError) as err:
        tcp_transport("localhost", 80, 1, "n", "c", "e")
    assert err.value.backend_error is BackendError.InvalidArgument
    assert "IP address" in err.value.message
    with pytest.raises(DynamoError):
        tcp_transport("127.0.0.1", 0, 1, "n", "c", "e")


def test_records_match_the_captured_shapes() -> None:
    iid = 7668682501583516004
    t = tcp_transport("127.0.0.1", 39615, iid, "dynamo", "sample", "generate")
    rec = endpoint_record("dynamo", "sample", "generate", iid, t, device_type="cuda")
    assert rec == {
        "type": "Endpoint",
        "namespace": "dynamo",
        "component": "sample",
        "endpoint": "generate",
        "instance_id": iid,
        "transport": {"tcp": "127.0.0.1:39615/6a6ca21ad223b164/dynamo/sample/generate"},
        "device_type": "cuda",
        "request_plane_codec": "json",
    }
    assert "device_type" not in endpoint_record("a", "b", "c", 1, nats_transport("s"))
    assert endpoint_record("a", "b", "c", 1, nats_transport("s"), codec="msgpack")["transport"] == {
        "nats_tcp": "s"
    }
    with pytest.raises(DynamoError):
        endpoint_record("a", "b", "c", 1, nats_transport("s"), codec="cbor")
    m = model_record("dynamo", "sample", "generate", iid, {"display_name": "x"})
    assert m == {
        "type": "Model",
        "namespace": "dynamo",
        "component": "sample",
        "endpoint": "generate",
        "instance_id": iid,
        "card_json": {"display_name": "x"},
    }
    # u64 ids stay exact through JSON.
    assert json.loads(json.dumps(m))["instance_id"] == iid


def test_rebind_swaps_the_instance_id_everywhere() -> None:
    old, new = 0xABC, 0xDEF
    (mk, mv), (ik, iv) = records_for(old)
    assert rebind_key(ik, old, new) == "v1/instances/dynamo/backend/generate/def"
    assert rebind_key(mk, old, new) == "v1/mdc/dynamo/backend/generate/def"
    assert rebind_record(iv, old, new) == records_for(new)[1][1]
    assert rebind_record(mv, old, new) == records_for(new)[0][1]
    assert iv["instance_id"] == old  # the input is not modified


def test_parse_endpoints() -> None:
    assert parse_endpoints("http://127.0.0.1:2379, http://[::1]:2380,h3") == [
        ("127.0.0.1", 2379),
        ("::1", 2380),
        ("h3", 2379),
    ]
    for bad in ("", "https://a:2379", "http://a:xx"):
        with pytest.raises(DynamoError):
            parse_endpoints(bad)


def test_file_key_encoding_matches_the_rust_backend() -> None:
    # Observed from the real sample backend (namespace "my-ns.x").
    rest = "my-ns.x/sample/generate/6c01144d29c5f1ee"
    assert encode_key(rest) == "my%2Dns%2Ex%2Fsample%2Fgenerate%2F6c01144d29c5f1ee"
    assert encode_key("a_b~c") == "a%5Fb%7Ec"
    assert decode_key(encode_key("ns é/x")) == "ns é/x"


def test_create_discovery_picks_the_backend(tmp_path: Path, monkeypatch) -> None:
    d = create_discovery(
        WorkerConfig(etcd_endpoints="http://127.0.0.1:1", etcd=EtcdOptions(lease_ttl=7))
    )
    assert isinstance(d, EtcdDiscovery) and d.ttl == 7
    f = create_discovery(WorkerConfig(discovery_backend="file", file_kv=str(tmp_path)))
    assert isinstance(f, FileDiscovery) and f.root == tmp_path
    # ETCD_LEASE_TTL reaches the discovery through args.py; a bad value is a typed error there.
    parser = add_common_args(argparse.ArgumentParser())
    monkeypatch.setenv("ETCD_LEASE_TTL", "9")
    assert create_discovery(worker_config_from_args(parser.parse_args([]))).ttl == 9
    monkeypatch.setenv("ETCD_LEASE_TTL", "soon")
    with pytest.raises(DynamoError, match="ETCD_LEASE_TTL"):
        worker_config_from_args(parser.parse_args([]))


# ------------------------------------------------------------------ etcd


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path_factory.mktemp("etcd"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
async def raw(etcd: EtcdServer) -> AsyncIterator[aetcd.Client]:
    client = aetcd.Client(host="127.0.0.1", port=etcd.port, timeout=5)
    try:
        yield client
    finally:
        await client.close()


async def leased_keys(client: aetcd.Client) -> dict[str, tuple[dict, int]]:
    return {
        kv.key.decode(): (json.loads(kv.value), kv.lease) for kv in await client.get_prefix(b"v1/")
    }


async def test_etcd_register_and_unregister(etcd: EtcdServer, raw: aetcd.Client) -> None:
    d = EtcdDiscovery(etcd.endpoint, ttl=5)
    try:
        await d.connect()
        iid = d.instance_id
        assert await d.register(records_for(iid)) == iid
        stored = await leased_keys(raw)
        assert stored == {k: (v, iid) for k, v in records_for(iid)}
        info = await raw.get_lease_info(iid)
        assert info.grantedTTL == 5 and 0 < info.TTL <= 5
        assert d.records == dict(records_for(iid))

        # Re-putting the same value is a no-op; another instance cannot take the key.
        key, value = records_for(iid)[1]
        await d.put(key, value)
        other = EtcdDiscovery(etcd.endpoint, ttl=5)
        try:
            await other.connect()
            with pytest.raises(DynamoError) as err:
                await other.put(key, {**value, "instance_id": other.instance_id})
            assert "already exists" in err.value.message
        finally:
            await other.close()
        assert (await leased_keys(raw))[key] == (value, iid)

        await d.delete(records_for(iid)[0][0])
        assert list(await leased_keys(raw)) == [key]

        await d.unregister_all()
        assert await leased_keys(raw) == {}  # immediately, not after the TTL
        assert (await raw.get_lease_info(iid)).TTL == -1  # the lease itself is gone
    finally:
        await d.close()


async def test_etcd_close_revokes_too(etcd: EtcdServer, raw: aetcd.Client) -> None:
    d = EtcdDiscovery(etcd.endpoint, ttl=5)
    await d.connect()
    await d.register(records_for(d.instance_id))
    assert len(await leased_keys(raw)) == 2
    await d.close()
    assert await leased_keys(raw) == {}


async def test_etcd_lost_lease_reregisters_via_hook(etcd: EtcdServer, raw: aetcd.Client) -> None:
    d = EtcdDiscovery(etcd.endpoint, ttl=3)  # keep-alive every 1 s
    calls: list[int] = []

    async def hook(new_id: int) -> None:
        calls.append(new_id)
        await d.register(records_for(new_id))

    try:
        await d.connect()
        old = d.instance_id
        await d.register(records_for(old))
        d.on_reregistered = hook
        await raw.revoke_lease(old)  # out of band: as if it had expired
        assert await wait_until(lambda: calls, within=10), "no re-registration"
        new = calls[0]
        assert new != old and d.instance_id == new
        stored = await wait_until(lambda: _has_n_keys(raw, 2), within=5)
        assert stored == {k: (v, new) for k, v in records_for(new)}
        assert d.records == dict(records_for(new))
        # The new lease is kept alive past its TTL.
        await asyncio.sleep(3.5)
        assert (await raw.get_lease_info(new)).TTL > 0
    finally:
        await d.close()
    assert await leased_keys(raw) == {}


async def test_etcd_failing_hook_is_retried_with_a_fresh_lease(
    etcd: EtcdServer, raw: aetcd.Client
) -> None:
    d = EtcdDiscovery(etcd.endpoint, ttl=3)
    calls: list[int] = []

    async def hook(new_id: int) -> None:
        calls.append(new_id)
        await d.put(*records_for(new_id)[0])
        if len(calls) == 1:
            raise ConnectionError("worker not ready yet")
        await d.put(*records_for(new_id)[1])

    try:
        await d.connect()
        old = d.instance_id
        await d.register(records_for(old))
        d.on_reregistered = hook
        await raw.revoke_lease(old)
        assert await wait_until(lambda: len(calls) >= 2, within=15), calls
        first, second = calls[:2]
        assert len({old, first, second}) == 3
        assert (await raw.get_lease_info(first)).TTL == -1  # the half-used lease was revoked
        stored = await wait_until(lambda: _has_n_keys(raw, 2), within=5)
        assert stored == {k: (v, second) for k, v in records_for(second)}
    finally:
        await d.close()


async def _has_n_keys(raw: aetcd.Client, n: int):
    keys = await leased_keys(raw)
    return keys if len(keys) == n else None


async def test_etcd_lost_lease_without_hook_rebinds_records(
    etcd: EtcdServer, raw: aetcd.Client
) -> None:
    d = EtcdDiscovery(etcd.endpoint, ttl=3)
    try:
        await d.connect()
        old = d.instance_id
        await d.register(records_for(old))
        await raw.revoke_lease(old)
        assert await wait_until(lambda: d.instance_id != old, within=10)
        new = d.instance_id
        stored = await wait_until(lambda: _has_n_keys(raw, 2), within=5)
        assert stored == {k: (v, new) for k, v in records_for(new)}
        assert d.reregistrations == 1
    finally:
        await d.close()


async def test_etcd_unreachable_is_cannot_connect() -> None:
    from backend_common.devstack.services import free_port

    d = EtcdDiscovery(f"http://127.0.0.1:{free_port()}", ttl=5)
    with pytest.raises(DynamoError) as err:
        await d.connect()
    assert err.value.backend_error is BackendError.CannotConnect
    await d.close()


async def test_etcd_restart_under_the_worker(tmp_path: Path) -> None:
    """etcd goes away and comes back: no crash, the same lease keeps the keys alive."""
    server = EtcdServer(tmp_path / "etcd")
    d = EtcdDiscovery(server.endpoint, ttl=3)
    client = None
    try:
        server.start()
        await d.connect()
        iid = d.instance_id
        await d.register(records_for(iid))
        server.stop()
        await asyncio.sleep(1.5)  # at least one failed keep-alive (every 1 s)
        assert d._keepalive is not None and not d._keepalive.done()
        server.start()
        client = aetcd.Client(host="127.0.0.1", port=server.port, timeout=5)
        # Outlive the TTL after the restart: only working keep-alives keep the keys.
        await asyncio.sleep(3.5)
        assert d._keepalive is not None and not d._keepalive.done()
        assert d.instance_id == iid
        assert await leased_keys(client) == {k: (v, iid) for k, v in records_for(iid)}
        # And the connection is usable for new writes.
        key = instance_key("dynamo", "backend", "other", iid)
        await d.put(key, {"x": 1})
        assert (await leased_keys(client))[key] == ({"x": 1}, iid)
    finally:
        await d.close()
        if client is not None:
            await client.close()
        server.stop()


async def test_etcd_with_authentication(tmp_path: Path) -> None:
    server = EtcdServer(tmp_path / "etcd", username="worker", password="s3cret")
    try:
        server.start()
        d = EtcdDiscovery(server.endpoint, ttl=5, username="worker", password="s3cret")
        try:
            await d.connect()
            await d.register(records_for(d.instance_id))
            out = server.etcdctl("get", "--prefix", "v1/", "--keys-only", user=True)
            assert instance_key("dynamo", "backend", "generate", d.instance_id) in out
        finally:
            await d.close()
        for user, password in ((None, None), ("worker", "wrong")):
            denied = EtcdDiscovery(server.endpoint, ttl=5, username=user, password=password)
            with pytest.raises(DynamoError) as err:
                await denied.connect()
            assert err.value.backend_error is BackendError.CannotConnect
            await denied.close()
    finally:
        server.stop()


# ------------------------------------------------------------------ file backend


async def test_file_layout_put_and_unregister(tmp_path: Path) -> None:
    d = FileDiscovery(tmp_path / "kv")
    await d.connect()
    try:
        iid = d.instance_id
        assert 0 < iid < 1 << 64
        await d.register(records_for(iid, ns="my-ns.x"))
        name = encode_key(f"my-ns.x/backend/generate/{iid:x}")
        for bucket, (key, value) in zip(
            ("mdc", "instances"), records_for(iid, ns="my-ns.x"), strict=True
        ):
            path = tmp_path / "kv" / "v1" / bucket / name
            assert d.path_for(key) == path
            assert json.loads(path.read_bytes()) == value
        assert os.listdir(tmp_path / "kv" / ".tmp") == []  # temp files never linger
        await d.unregister_all()
        assert os.listdir(tmp_path / "kv" / "v1" / "instances") == []
        assert os.listdir(tmp_path / "kv" / "v1" / "mdc") == []
    finally:
        await d.close()


async def test_file_heartbeat_refreshes_and_restores(tmp_path: Path) -> None:
    d = FileDiscovery(tmp_path, ttl=2, heartbeat_s=0.2)
    await d.connect()
    try:
        key, value = records_for(d.instance_id)[1]
        await d.put(key, value)
        path = d.path_for(key)
        old = time.time() - 100
        os.utime(path, (old, old))
        assert await wait_until(lambda: path.stat().st_mtime > old + 50, within=3)
        path.unlink()  # a peer expired it
        assert await wait_until(path.exists, within=3)
        assert json.loads(path.read_bytes()) == value
    finally:
        await d.close()
    assert not path.exists()


async def test_file_create_if_absent(tmp_path: Path) -> None:
    a, b = FileDiscovery(tmp_path), FileDiscovery(tmp_path)
    await a.connect()
    await b.connect()
    try:
        key, value = records_for(a.instance_id)[1]
        await a.put(key, value)
        await a.put(key, value)  # idempotent
        with pytest.raises(DynamoError):
            await b.put(key, {"other": True})
        # An expired leftover (its owner died) may be taken over.
        old = time.time() - 60
        os.utime(a.path_for(key), (old, old))
        await b.put(key, {"other": True})
        assert json.loads(a.path_for(key).read_bytes()) == {"other": True}
    finally:
        await a.close()
        await b.close()


# ------------------------------------------------------------------ against the real sample


def _frontend_python() -> str:
    return require_frontend()


@pytest.mark.e2e
async def test_file_records_match_the_real_sample_backend(tmp_path: Path) -> None:
    """Same file names, same Endpoint keys, and the same card as the real 1.6.1 worker."""
    python = _frontend_python()
    model_dir = write_tiny_model(tmp_path / "tiny-model")
    kv = tmp_path / "kv"
    ns = "my-ns.x"
    env = hermetic_env(worker_env(discovery_backend="file", file_kv=kv))
    argv = [python, "-m", "dynamo.common.backend.sample_main", "--model-name", str(model_dir)]
    argv += ["--namespace", ns, "--component", "sample", "--discovery-backend", "file"]
    argv += ["--disable-kv-routing"]
    sample = ManagedProcess(argv, env=env, log_path=tmp_path / "sample.log").start()
    try:
        inst_dir, mdc_dir = kv / "v1" / "instances", kv / "v1" / "mdc"
        ready = await wait_until(
            lambda: inst_dir.is_dir() and os.listdir(inst_dir) and os.listdir(mdc_dir), within=60
        )
        assert ready, sample.log_tail()
        [real_name] = os.listdir(inst_dir)
        assert os.listdir(mdc_dir) == [real_name]
        real_ep = json.loads((inst_dir / real_name).read_bytes())
        real_model = json.loads((mdc_dir / real_name).read_bytes())
    finally:
        sample.terminate(15)
    real_id = real_ep["instance_id"]
    assert decode_key(real_name) == f"{ns}/sample/generate/{real_id:x}"

    config = WorkerConfig(
        namespace=ns, component="sample", model_name=str(model_dir), discovery_backend="file"
    )
    engine = EngineConfig(
        model=str(model_dir),
        context_length=2048,
        kv_cache_block_size=16,
        total_kv_blocks=1000,
        max_num_seqs=64,
        max_num_batched_tokens=2048,
    )
    card = build_model_card(config, engine, base_url=None).card
    d = FileDiscovery(tmp_path / "ours")
    await d.connect()
    try:
        iid = d.instance_id
        transport = tcp_transport("127.0.0.1", 1234, iid, ns, "sample", "generate")
        ours = [
            (
                model_key(ns, "sample", "generate", iid),
                model_record(ns, "sample", "generate", iid, card),
            ),
            (
                instance_key(ns, "sample", "generate", iid),
                endpoint_record(ns, "sample", "generate", iid, transport, device_type="cuda"),
            ),
        ]
        await d.register(ours)
        name = encode_key(f"{ns}/sample/generate/{iid:x}")
        # Same directory layout and name encoding as the real worker.
        assert sorted(
            p.relative_to(tmp_path / "ours").as_posix() for p in d.root.rglob("*") if p.is_file()
        ) == [
            f"v1/instances/{name}",
            f"v1/mdc/{name}",
        ]
        our_ep = json.loads((d.root / "v1" / "instances" / name).read_bytes())
        our_model = json.loads((d.root / "v1" / "mdc" / name).read_bytes())
    finally:
        await d.close()
    assert set(our_ep) == set(real_ep)
    assert our_ep["transport"]["tcp"].split("/", 1)[1] == real_ep["transport"]["tcp"].split("/", 1)[
        1
    ].replace(f"{real_id:x}", f"{iid:x}")
    assert set(our_model) == set(real_model)
    our_card = dict(our_model["card_json"])
    our_card.pop("extra_files", None)  # we also list special_tokens_map.json
    assert our_card == real_model["card_json"]


@pytest.mark.e2e
@pytest.mark.parametrize("backend", ["file", "etcd"])
async def test_real_frontend_lists_and_drops_our_registration(tmp_path: Path, backend: str) -> None:
    """Our records + a card whose files come from our status server satisfy the real FE."""
    import socket

    from backend_common.devstack.frontend import Frontend
    from backend_common.runtime.status import StatusServer

    python = _frontend_python()
    model_dir = write_tiny_model(tmp_path / "tiny")
    etcd = EtcdServer(tmp_path / "etcd").start() if backend == "etcd" else None
    fe = Frontend(
        python=python,
        workdir=tmp_path / "fe",
        discovery_backend=backend,
        etcd_endpoint=etcd.endpoint if etcd else None,
    )
    status = StatusServer()
    listener = socket.socket()  # a reachable (idle) request-plane address
    d = None
    try:
        fe.start()
        await status.start()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        d = FileDiscovery(fe.file_kv) if etcd is None else EtcdDiscovery(etcd.endpoint)
        await d.connect()
        iid = d.instance_id
        cfg = WorkerConfig(model_name="ours", model_path=str(model_dir))
        engine = EngineConfig(model="ours", context_length=1536)
        mc = build_model_card(cfg, engine, base_url=status.base_url)
        status.set_files(mc.files_prefix, mc.files)
        ns, comp, ep = cfg.namespace, cfg.component, cfg.endpoint
        port = listener.getsockname()[1]
        transport = tcp_transport("127.0.0.1", port, iid, ns, comp, ep)
        await d.register(
            [
                (model_key(ns, comp, ep, iid), model_record(ns, comp, ep, iid, mc.card)),
                (instance_key(ns, comp, ep, iid), endpoint_record(ns, comp, ep, iid, transport)),
            ]
        )
        try:
            await asyncio.to_thread(fe.wait_for_model, "ours", 60)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{fe.log_tail(60)}") from exc
        assert fe.model_info("ours")["context_window"] == 1536
        await d.unregister_all()
        await asyncio.to_thread(fe.wait_model_gone, "ours", 30)
    finally:
        if d is not None:
            await d.close()
        await status.close()
        listener.close()
        fe.stop()
        if etcd is not None:
            etcd.stop()
