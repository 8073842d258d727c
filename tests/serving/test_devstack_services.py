"""devstack.services: ManagedProcess, EtcdServer, NatsServer (real binaries, random ports)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import aetcd
import nats
import pytest

from backend_common.devstack.services import (
    EtcdServer,
    ManagedProcess,
    NatsServer,
    ServiceError,
    find_binary,
    free_port,
    port_open,
    wait_for_port,
)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    assert 1024 <= port < 65536
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_managed_process_terminate_logs_and_env(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "p.log"
    code = "import os, time; print('hello', os.environ['X_VAR'], flush=True); time.sleep(60)"
    proc = ManagedProcess(
        [sys.executable, "-c", code], env={**os.environ, "X_VAR": "42"}, log_path=log
    )
    with proc:
        assert proc.running and proc.pid
        for _ in range(100):
            if "hello 42" in proc.log_tail():
                break
            time.sleep(0.05)
        assert "hello 42" in proc.log_tail()
        pid = proc.pid
    assert not proc.running
    assert proc.returncode == -signal.SIGTERM
    assert not pid_alive(pid)  # reaped, not a zombie


def test_managed_process_escalates_to_sigkill(tmp_path: Path) -> None:
    code = (
        "import signal, time, sys\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = ManagedProcess([sys.executable, "-c", code], log_path=tmp_path / "p.log").start()
    try:
        for _ in range(200):
            if "ready" in proc.log_tail():
                break
            time.sleep(0.05)
        assert proc.terminate(timeout=0.5) == -signal.SIGKILL
    finally:
        proc.kill()
    assert not proc.running
    proc2 = ManagedProcess([sys.executable, "-c", "import time; time.sleep(60)"]).start()
    assert proc2.kill() == -signal.SIGKILL
    done = ManagedProcess([sys.executable, "-c", "raise SystemExit(3)"]).start()
    assert done.wait(10) == 3 and done.terminate() == 3


def test_find_binary(tmp_path: Path, monkeypatch) -> None:
    fake = tmp_path / "etcd"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert find_binary("etcd", "ETCD_BIN", str(fake)) == str(fake)
    monkeypatch.setenv("ETCD_BIN", str(fake))
    assert find_binary("etcd", "ETCD_BIN") == str(fake)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ServiceError, match="NOPE_BIN"):
        find_binary("definitely-not-here", "NOPE_BIN")


async def test_etcd_server_start_restart_stop(tmp_path: Path) -> None:
    server = EtcdServer(tmp_path / "etcd")
    try:
        server.start()
        assert server.endpoint == f"http://127.0.0.1:{server.port}" and server.running
        client = aetcd.Client(host="127.0.0.1", port=server.port, timeout=5)
        try:
            await client.put(b"k", b"v1")
        finally:
            await client.close()
        pid = server.pid
        server.restart()
        assert server.pid != pid and not pid_alive(pid)
        client = aetcd.Client(host="127.0.0.1", port=server.port, timeout=5)
        try:
            got = await client.get(b"k")
            assert got is not None and got.value == b"v1"  # the data dir survived
        finally:
            await client.close()
    finally:
        server.stop()
    assert not server.running and not port_open(server.port)


def test_etcd_server_fails_clearly_on_a_taken_port(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        server = EtcdServer(tmp_path / "etcd", port=s.getsockname()[1], start_timeout=10)
        with pytest.raises(ServiceError, match="etcd"):
            server.start()
        assert not server.running


async def test_nats_server_roundtrip_restart_and_token() -> None:
    server = NatsServer()
    try:
        server.start()
        assert server.url == f"nats://127.0.0.1:{server.port}"
        nc = await nats.connect(server.url, allow_reconnect=False)
        try:
            sub = await nc.subscribe("t")
            await nc.publish("t", b"hi")
            msg = await sub.next_msg(timeout=5)
            assert msg.data == b"hi"
        finally:
            await nc.close()
        server.restart()
        wait_for_port(server.port, timeout=5)
        nc = await nats.connect(server.url, allow_reconnect=False)
        await nc.close()
    finally:
        server.stop()
    assert not port_open(server.port)

    secured = NatsServer(token="tok")
    try:
        secured.start()
        with pytest.raises(Exception):  # noqa: B017 - nats-py raises several auth error types
            await asyncio.wait_for(
                nats.connect(secured.url, allow_reconnect=False, max_reconnect_attempts=0), 5
            )
        nc = await nats.connect(secured.url, token="tok", allow_reconnect=False)
        await nc.close()
    finally:
        secured.stop()
