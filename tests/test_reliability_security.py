"""Security defaults: loopback status server, etcd auth, NATS credentials and TLS, no secret
in logs, non-root container. Real etcd / nats-server processes on 127.0.0.1, started and
stopped here; a throwaway CA and server certificate are made with the ``openssl`` CLI.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from pathlib import Path

import nats
import pytest
from conftest import REPO, Stack, wait_until

from backend_common.args import add_common_args, worker_config_from_args
from backend_common.devstack.frontend import Frontend
from backend_common.devstack.services import (
    EtcdServer,
    ManagedProcess,
    find_binary,
    free_port,
    wait_for_port,
)
from backend_common.nats_options import nats_connect_options, redact_url
from backend_common.status import StatusServer

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


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to make a throwaway CA")
    d = tmp_path / "pki"
    d.mkdir()
    ca = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca"]
    _openssl(*ca, "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    csr = ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1"]
    _openssl(*csr, "-keyout", "server.key", "-out", "server.csr", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    sign = ["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key"]
    sign += ["-CAcreateserial", "-days", "1", "-extfile", "ext.cnf", "-out", "server.pem"]
    _openssl(*sign, cwd=d)
    names = {"ca": "ca.pem", "cert": "server.pem", "key": "server.key"}
    return {k: str(d / f) for k, f in names.items()}


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
    nc = await nats.connect(**{**nats_connect_options(url), "max_reconnect_attempts": 0})
    try:
        sub = await nc.subscribe("sec.test")
        await nc.publish("sec.test", b"ping")
        msg = await sub.next_msg(timeout=5)
        assert msg.data == b"ping"
    finally:
        await nc.close()


async def _refused(url: str) -> None:
    opts = {**nats_connect_options(url), "max_reconnect_attempts": 0, "allow_reconnect": False}
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
