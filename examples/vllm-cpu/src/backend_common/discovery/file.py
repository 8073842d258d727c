"""File discovery: the layout Dynamo's file KV store uses (docs/wire-protocol.md#file-discovery).

Selected with ``DYN_DISCOVERY_BACKEND=file`` on the frontend and every worker; they
must share a filesystem. Root: ``DYN_FILE_KV`` (default ``$TMPDIR/dynamo_store_kv``).

Layout (checked against files the real 1.6.1 sample backend writes)::

    <root>/v1/instances/<enc(ns/comp/ep/id)>     Endpoint record JSON
    <root>/v1/mdc/<enc(ns/comp/ep/id)>           Model record JSON

The first two key segments name the bucket directory; the rest of the key is one
file name in which every byte that is not an ASCII letter or digit is written as
``%XX`` (upper-case hex), so ``my-ns/sample/generate/6c01144d29c5f1ee`` becomes
``my%2Dns%2Fsample%2Fgenerate%2F6c01144d29c5f1ee``.

Liveness is the file's mtime: a heartbeat task touches every owned file each
``ttl / 3`` seconds; peers treat files older than ``ttl`` (10 s) as expired and may
delete them (then the heartbeat writes them again). Files are written atomically:
the JSON goes to a temp file under ``<root>/.tmp`` (outside every bucket, so a
watcher never sees a half-written entry) and is hard-linked into place, which also
gives create-if-absent semantics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import tempfile
import time
from pathlib import Path

from ..errors import invalid_arg
from .base import Discovery

__all__ = ["DEFAULT_FILE_TTL", "FileDiscovery", "decode_key", "default_root", "encode_key"]

log = logging.getLogger(__name__)

DEFAULT_FILE_TTL = 10.0


def default_root() -> str:
    """``$TMPDIR/dynamo_store_kv``: the frontend's root when ``DYN_FILE_KV`` is unset.

    ``DYN_FILE_KV`` itself is read by ``args.py`` into ``WorkerConfig.file_kv``.
    """
    return os.path.join(tempfile.gettempdir(), "dynamo_store_kv")


def encode_key(rest: str) -> str:
    """Percent-encode every byte that is not ``[A-Za-z0-9]`` (Rust's NON_ALPHANUMERIC set)."""
    return "".join(
        chr(b) if (48 <= b <= 57 or 65 <= b <= 90 or 97 <= b <= 122) else f"%{b:02X}"
        for b in rest.encode()
    )


def decode_key(name: str) -> str:
    """Inverse of ``encode_key``."""
    from urllib.parse import unquote

    return unquote(name)


def _split(key: str) -> tuple[str, str]:
    parts = key.split("/", 2)
    if len(parts) < 3 or not all(parts):
        raise invalid_arg(f"discovery key {key!r} is not '<v1>/<bucket>/<rest>'")
    return f"{parts[0]}/{parts[1]}", parts[2]


class FileDiscovery(Discovery):
    """Discovery through files under ``root``. See the module docstring."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        ttl: float = DEFAULT_FILE_TTL,
        heartbeat_s: float | None = None,
    ) -> None:
        self._root = Path(root).absolute()
        self._ttl = float(ttl)
        self._heartbeat_s = heartbeat_s if heartbeat_s is not None else self._ttl / 3
        if self._heartbeat_s <= 0 or self._heartbeat_s >= self._ttl:
            raise invalid_arg("file discovery heartbeat must be > 0 and shorter than the TTL")
        self._instance_id: int | None = None
        self._records: dict[str, dict] = {}
        self._heartbeat: asyncio.Task | None = None
        self.on_reregistered = None  # never called: a file instance id cannot be lost

    @property
    def root(self) -> Path:
        return self._root

    @property
    def instance_id(self) -> int:
        if self._instance_id is None:
            raise RuntimeError("FileDiscovery.connect() has not been called")
        return self._instance_id

    @property
    def records(self) -> dict[str, dict]:
        return dict(self._records)

    def path_for(self, key: str) -> Path:
        """The file that holds ``key``."""
        bucket, rest = _split(key)
        return self._root / bucket / encode_key(rest)

    async def connect(self) -> None:
        if self._instance_id is not None:
            return
        self._root.mkdir(parents=True, exist_ok=True)
        (self._root / ".tmp").mkdir(exist_ok=True)
        # Random non-zero u64, like the Rust file backend (ids may exceed 2^63).
        self._instance_id = secrets.randbits(64) or 1
        self._heartbeat = asyncio.create_task(self._heartbeat_loop(), name="file-kv-heartbeat")
        log.info("file discovery root=%s instance=%x", self._root, self._instance_id)

    async def put(self, key: str, value: dict) -> None:
        if self._instance_id is None:
            raise RuntimeError("FileDiscovery.connect() has not been called")
        path = self.path_for(key)
        data = json.dumps(value, separators=(",", ":")).encode()
        if not path.exists():
            try:
                self._write(path, data, replace=False)
            except FileExistsError:
                raise invalid_arg(f"discovery key {key!r} was created concurrently") from None
            self._records[key] = value
            return
        try:
            same = path.read_bytes() == data
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            same, age = False, self._ttl + 1
        if not same and age < self._ttl:
            raise invalid_arg(f"discovery key {key!r} already exists (another instance owns it)")
        if same:
            os.utime(path)
            self._records[key] = value
            return
        # An expired leftover (a crashed instance): take it over.
        self._write(path, data, replace=True)
        self._records[key] = value

    def _write(self, path: Path, data: bytes, *, replace: bool) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self._root / ".tmp", prefix="kv-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            if replace:
                os.replace(tmp, path)
            else:
                os.link(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    async def delete(self, key: str) -> None:
        self._records.pop(key, None)
        try:
            self.path_for(key).unlink()
        except FileNotFoundError:
            pass

    async def unregister_all(self) -> None:
        task, self._heartbeat = self._heartbeat, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        for key in list(self._records):
            await self.delete(key)

    async def close(self) -> None:
        await self.unregister_all()

    async def _heartbeat_loop(self) -> None:
        """Touch every owned file; rewrite any a peer expired. Never raises."""
        while True:
            await asyncio.sleep(self._heartbeat_s)
            for key, value in list(self._records.items()):
                path = self.path_for(key)
                try:
                    os.utime(path)
                except FileNotFoundError:
                    log.warning("file discovery entry %s vanished; writing it again", path.name)
                    try:
                        data = json.dumps(value, separators=(",", ":")).encode()
                        self._write(path, data, replace=True)
                    except OSError as exc:
                        log.warning("file discovery rewrite failed: %r", exc)
                except OSError as exc:
                    log.warning("file discovery heartbeat failed for %s: %r", path, exc)
