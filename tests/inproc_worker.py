"""Run a ``Worker`` inside the test's event loop (file discovery, a status server, no frontend).

For tests of what a worker exposes by itself (``/health``, ``/metrics``): ``running_worker``
starts ``Worker(engine, config).run()`` as a task, waits until it serves, yields the worker
and the status server's base URL, then shuts it down gracefully (bounded in time) and
re-raises any failure of the run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from backend_common.config import WorkerConfig
from backend_common.devstack.services import free_port
from backend_common.engine import LLMEngine
from backend_common.runtime.worker import Worker

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 15.0


def file_config(tmp_path: Path, **overrides: Any) -> WorkerConfig:
    values: dict[str, Any] = dict(
        model_name="inproc-model",
        discovery_backend="file",
        file_kv=str(tmp_path / "filekv"),
        system_port=free_port(),
        event_plane=None,
        # In-process workers leave at once: no frontend routes to them.
        graceful_shutdown_grace_period=0.0,
    )
    values.update(overrides)
    return WorkerConfig(**values)


@asynccontextmanager
async def running_worker(
    engine: LLMEngine, config: WorkerConfig
) -> AsyncIterator[tuple[Worker, str]]:
    worker = Worker(engine, config)
    task = asyncio.get_running_loop().create_task(worker.run())
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (worker.lifecycle.serving and worker._services.status is not None):
        if task.done():
            raise AssertionError(f"worker exited during startup with {task.result()}")
        assert time.monotonic() < deadline, "worker did not start serving in time"
        await asyncio.sleep(0.02)
    try:
        yield worker, worker._services.status.base_url
    finally:
        worker.request_shutdown()
        try:
            code = await asyncio.wait_for(task, STOP_TIMEOUT_S)
        except TimeoutError:
            worker.request_shutdown()  # second signal: skip the remaining waits
            code = await asyncio.wait_for(task, STOP_TIMEOUT_S)
        assert code == 0, f"worker exited with {code}"
