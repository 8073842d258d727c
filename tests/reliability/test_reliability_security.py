"""Security defaults: loopback status server, etcd auth and mutual TLS, NATS credentials and
TLS, no secret in logs, non-root container. Real etcd / nats-server processes (and the real
Dynamo frontend) on 127.0.0.1, started and stopped here; throwaway CAs, server and client
certificates are made with the ``openssl`` CLI.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
from pathlib import Path

import aiohttp
import nats
import pytest
from conftest import REPO, Stack, wait_until
from worker_probes import words

from backend_common.args import add_common_args, worker_config_from_args
from backend_common.config import WorkerConfig
from backend_common.devstack.frontend import Frontend
from backend_common.devstack.openai import chat
from backend_common.devstack.services import (
    EtcdServer,
    EtcdTlsFiles,
    ManagedProcess,
    find_binary,
    free_port,
    wait_for_port,
)
from backend_common.discovery.base import instance_key
from backend_common.discovery.etcd import EtcdDiscovery
from backend_common.errors import BackendError, DynamoError
from backend_common.runtime.status import StatusServer
from backend_common.transport.nats_options import nats_connect_options, redact_url

pytestmark = pytest.mark.timeout(90)

SECRET = "s3cr3t-Pa55-do-not-log"


async def test_status_server_binds_loopback_by_default(monkeypatch) -> None:
    import argparse

    monkeypatch.delenv("DYN_SYSTEM_HOST", raising=False)
    config = worker_config_from_args(add_common_args(argparse.ArgumentParser()).parse_args([]))
    assert config.system_host == "127.0.0.1"
    server = StatusServer()
    await server.start()
    try:
        assert server.base_url.startswith("http://127.0.0.1:")
    finally:
        await server.close()


def test_dockerfile_runs_as_non_root() -> None:
    text = (REPO / "template" / "Dockerfile.jinja").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")


def _worker_stack(tmp_path: Path, tiny_model: Path, **kw) -> Stack:
    # A Stack whose frontend is never started: only the worker's side is under test.
    python = shutil.which("python3") or "python3"
    frontend = Frontend(workdir=tmp_path / "fe", python=python, **kw)
    return Stack(
        frontend,
        discovery=kw["discovery_backend"],
        plane=kw.get("request_plane", "tcp"),
        etcd_endpoint=kw.get("etcd_endpoint"),
        nats_url=kw.get("nats_url"),
        workdir=tmp_path / "w",
        model_dir=tiny_model,
    )


def _serving(proc: ManagedProcess) -> bool:
    return "Serving " in proc.log_path.read_text() or not proc.running


@pytest.mark.e2e
def test_etcd_auth_and_no_password_in_log(tmp_path: Path, tiny_model: Path) -> None:
    etcd = EtcdServer(tmp_path / "etcd", username="worker", password=SECRET).start()
    stack = _worker_stack(
        tmp_path, tiny_model, discovery_backend="etcd", etcd_endpoint=etcd.endpoint
    )
    try:
        env = {"ETCD_AUTH_USERNAME": "worker", "ETCD_AUTH_PASSWORD": SECRET, "DYN_LOG": "debug"}
        good = stack.start_worker("tiny-auth", env=env)
        wait_until(lambda: _serving(good), 30)
        assert good.running, good.log_tail()
        keys = etcd.etcdctl("get", "--prefix", "--keys-only", "v1/", user=True)
        assert "v1/instances/dynamo/backend/generate/" in keys
        bad = stack.start_worker(
            "tiny-auth", env={"ETCD_AUTH_USERNAME": "worker", "ETCD_AUTH_PASSWORD": "wrong"}
        )
        assert bad.wait(30) == 1  # refused at start-up, a clear error, no crash loop
        assert "etcd" in bad.log_tail().lower()
        good.terminate(15)
        for proc in (good, bad):
            assert SECRET not in proc.log_path.read_text()
    finally:
        stack.stop()
        etcd.stop()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_pki(d: Path, name: str = "test-ca") -> dict[str, str]:
    """A throwaway CA in ``d``, a server certificate for 127.0.0.1 and a client certificate.

    Keys: ``ca``, ``cert``/``key`` (server), ``client_cert``/``client_key`` (file paths).
    """
    d.mkdir(parents=True)
    ca = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}"]
    _openssl(*ca, "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    # The server certificate also allows clientAuth: etcd's HTTP gateway dials etcd with it.
    exts = {
        "server": "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
        "client": "extendedKeyUsage=clientAuth\n",
    }
    for who, ext in exts.items():
        csr = ["req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={who}"]
        _openssl(*csr, "-keyout", f"{who}.key", "-out", f"{who}.csr", cwd=d)
        (d / f"{who}.cnf").write_text(ext)
        sign = ["x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key"]
        sign += ["-CAcreateserial", "-days", "1", "-extfile", f"{who}.cnf"]
        _openssl(*sign, "-out", f"{who}.pem", cwd=d)
    names = {
        "ca": "ca.pem",
        "cert": "server.pem",
        "key": "server.key",
        "client_cert": "client.pem",
        "client_key": "client.key",
    }
    return {k: str(d / f) for k, f in names.items()}


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, str]:
    if shutil.which("openssl") is None:
        why = "the openssl CLI is needed to make a throwaway CA"
        if os.environ.get("CI"):
            pytest.fail(why)  # CI machines have it: a missing openssl is a set-up defect there
        pytest.skip(why)
    return make_pki(tmp_path / "pki")


@pytest.fixture
def tls_etcd(tmp_path: Path, tls_files: dict[str, str]):
    """etcd that serves TLS only and requires a client certificate signed by ``tls_files``."""
    files = EtcdTlsFiles(
        ca=tls_files["ca"],
        cert=tls_files["cert"],
        key=tls_files["key"],
        client_cert=tls_files["client_cert"],
        client_key=tls_files["client_key"],
    )
    server = EtcdServer(tmp_path / "etcd-tls", tls=files).start()
    try:
        yield server
    finally:
        server.stop()


def _settings() -> WorkerConfig:
    """The ``WorkerConfig`` the current environment gives (``args.py`` reads every variable)."""
    return worker_config_from_args(add_common_args(argparse.ArgumentParser()).parse_args([]))


def _etcd_from_env(endpoint: str) -> EtcdDiscovery:
    return EtcdDiscovery.from_options(endpoint, _settings().etcd)


def _etcd_tls_env(files: dict[str, str], *, inline: bool) -> dict[str, str]:
    """Dynamo's variables; ``inline`` puts the PEM text in them (as Dynamo's Rust client reads
    them), otherwise the file paths (also accepted by this runtime)."""
    names = {"ETCD_AUTH_CA": "ca", "ETCD_AUTH_CLIENT_CERT": "client_cert"}
    names["ETCD_AUTH_CLIENT_KEY"] = "client_key"
    return {v: Path(files[k]).read_text() if inline else files[k] for v, k in names.items()}


async def test_etcd_mutual_tls_discovery(
    tmp_path: Path, tls_files: dict[str, str], tls_etcd: EtcdServer, monkeypatch
) -> None:
    assert tls_etcd.endpoint.startswith("https://")
    for var, value in _etcd_tls_env(tls_files, inline=False).items():
        monkeypatch.setenv(var, value)
    d = _etcd_from_env(tls_etcd.endpoint)
    try:
        await d.connect()
        await d.put(instance_key("dynamo", "backend", "generate", d.instance_id), {"x": 1})
        keys = tls_etcd.etcdctl("get", "--prefix", "--keys-only", "v1/")
        assert instance_key("dynamo", "backend", "generate", d.instance_id) in keys
    finally:
        await d.close()
    # Refused: no client certificate; a CA that did not sign the server's certificate.
    other = make_pki(tmp_path / "other-pki", "other-ca")
    monkeypatch.delenv("ETCD_AUTH_CLIENT_CERT")
    monkeypatch.delenv("ETCD_AUTH_CLIENT_KEY")
    wrong_ca = {"ETCD_AUTH_CA": other["ca"], "ETCD_AUTH_CLIENT_CERT": tls_files["client_cert"]}
    wrong_ca["ETCD_AUTH_CLIENT_KEY"] = tls_files["client_key"]
    for env in ({}, wrong_ca):
        for var, value in env.items():
            monkeypatch.setenv(var, value)
        denied = _etcd_from_env(tls_etcd.endpoint)
        with pytest.raises(DynamoError) as err:
            await denied.connect()
        assert err.value.backend_error is BackendError.CannotConnect
        assert "TLS" in err.value.message
        await denied.close()
    # Configuration mismatches are refused before any connection attempt.
    with pytest.raises(DynamoError) as err:  # TLS configured, plain endpoint: no downgrade
        _etcd_from_env(tls_etcd.endpoint.replace("https://", "http://"))
    assert err.value.backend_error is BackendError.InvalidArgument
    monkeypatch.delenv("ETCD_AUTH_CA")
    with pytest.raises(DynamoError, match="ETCD_AUTH_CA"):
        _etcd_from_env(tls_etcd.endpoint)  # https:// without any TLS setting
    monkeypatch.setenv("ETCD_AUTH_CA", str(tmp_path / "missing.pem"))
    with pytest.raises(DynamoError, match="cannot read"):
        _etcd_from_env(tls_etcd.endpoint)


@pytest.mark.e2e
async def test_etcd_mutual_tls_worker_and_frontend(
    tmp_path: Path,
    tiny_model: Path,
    frontend_python: str,
    tls_files: dict[str, str],
    tls_etcd: EtcdServer,
) -> None:
    # The real frontend and our worker share one TLS-only etcd and Dynamo's variables.
    env = _etcd_tls_env(tls_files, inline=True)
    frontend = Frontend(
        workdir=tmp_path / "fe",
        python=frontend_python,
        discovery_backend="etcd",
        etcd_endpoint=tls_etcd.endpoint,
        extra_env=env,
    )
    stack = Stack(
        frontend,
        discovery="etcd",
        plane="tcp",
        etcd_endpoint=tls_etcd.endpoint,
        nats_url=None,
        workdir=tmp_path / "w",
        model_dir=tiny_model,
    )
    other = make_pki(tmp_path / "other-pki", "other-ca")
    try:
        await asyncio.to_thread(frontend.start)
        good = await asyncio.to_thread(stack.serve, "tiny-tls", env=env)
        keys = tls_etcd.etcdctl("get", "--prefix", "--keys-only", "v1/")
        assert "v1/instances/dynamo/backend/generate/" in keys
        assert "v1/mdc/dynamo/backend/generate/" in keys
        async with aiohttp.ClientSession() as s:
            r = await chat(s, frontend.base_url, "tiny-tls", "w1", max_tokens=3, stream=True)
        assert r.ok and r.text.strip() == words(3).strip()
        # Without a client certificate, or trusting another CA: refused at start-up, typed.
        no_cert = {"ETCD_AUTH_CA": tls_files["ca"]}
        wrong_ca = {**env, "ETCD_AUTH_CA": _etcd_tls_env(other, inline=True)["ETCD_AUTH_CA"]}
        bad = [stack.start_worker("tiny-tls-bad", env=e) for e in (no_cert, wrong_ca)]
        for proc in bad:
            assert await asyncio.to_thread(proc.wait, 30) == 1
            assert "discovery failed: BackendCannotConnect" in proc.log_tail(), proc.log_tail()
        assert good.running
    finally:
        stack.stop()


def _nats_server(tmp_path: Path, *args: str) -> tuple[ManagedProcess, int]:
    port = free_port()
    argv = [find_binary("nats-server", "NATS_SERVER_BIN"), "-a", "127.0.0.1", "-p", str(port)]
    proc = ManagedProcess([*argv, *args], log_path=tmp_path / f"nats-{port}.log").start()
    try:
        wait_for_port(port, timeout=10)
    except Exception:
        proc.kill()
        raise
    return proc, port


async def _roundtrip(url: str) -> None:
    nc = await nats.connect(
        **{**nats_connect_options(url, _settings().nats), "max_reconnect_attempts": 0}
    )
    try:
        sub = await nc.subscribe("sec.test")
        await nc.publish("sec.test", b"ping")
        msg = await sub.next_msg(timeout=5)
        assert msg.data == b"ping"
    finally:
        await nc.close()


async def _refused(url: str) -> None:
    opts = {
        **nats_connect_options(url, _settings().nats),
        "max_reconnect_attempts": 0,
        "allow_reconnect": False,
    }
    with pytest.raises(Exception):  # noqa: B017 - nats-py raises several error types here
        nc = await asyncio.wait_for(nats.connect(**opts), 10)
        await nc.close()


async def test_nats_token_and_user_password(tmp_path: Path, monkeypatch) -> None:
    token_srv, tport = _nats_server(tmp_path, "--auth", SECRET)
    user_srv, uport = _nats_server(tmp_path, "--user", "worker", "--pass", SECRET)
    try:
        await _roundtrip(f"nats://{SECRET}@127.0.0.1:{tport}")
        monkeypatch.setenv("NATS_AUTH_TOKEN", SECRET)
        await _roundtrip(f"nats://127.0.0.1:{tport}")
        monkeypatch.delenv("NATS_AUTH_TOKEN")
        await _refused(f"nats://wrong@127.0.0.1:{tport}")
        await _roundtrip(f"nats://worker:{SECRET}@127.0.0.1:{uport}")
        await _refused(f"nats://worker:nope@127.0.0.1:{uport}")
    finally:
        token_srv.terminate(5)
        user_srv.terminate(5)
    assert redact_url(f"nats://worker:{SECRET}@127.0.0.1:4222") == "nats://***@127.0.0.1:4222"


async def test_nats_tls(tmp_path: Path, tls_files: dict[str, str], monkeypatch) -> None:
    srv, port = _nats_server(
        tmp_path, "--tls", "--tlscert", tls_files["cert"], "--tlskey", tls_files["key"]
    )
    try:
        monkeypatch.setenv("NATS_TLS_CA", tls_files["ca"])
        await _roundtrip(f"tls://127.0.0.1:{port}")
        monkeypatch.delenv("NATS_TLS_CA")
        await _refused(f"tls://127.0.0.1:{port}")  # not trusted without the CA
    finally:
        srv.terminate(5)


@pytest.mark.e2e
def test_worker_on_authenticated_nats_logs_no_secret(tmp_path: Path, tiny_model: Path) -> None:
    srv, port = _nats_server(tmp_path, "--user", "worker", "--pass", SECRET)
    url = f"nats://worker:{SECRET}@127.0.0.1:{port}"
    stack = _worker_stack(
        tmp_path, tiny_model, discovery_backend="file", nats_url=url, request_plane="nats"
    )
    try:
        proc = stack.start_worker("tiny-nats-auth", env={"DYN_LOG": "debug"})
        wait_until(lambda: _serving(proc), 30)
        assert proc.running, proc.log_tail()
        srv.terminate(5)  # an outage makes the client log its (redacted) URL
        wait_until(lambda: "NATS disconnected" in proc.log_path.read_text(), 10)
        proc.terminate(15)
        text = proc.log_path.read_text()
        assert "nats://***@127.0.0.1" in text
        assert SECRET not in text
    finally:
        stack.stop()
        srv.kill()
