"""``python -m bench.worker_cpu`` serves real requests through the adapter and reports CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO, RUNTIME_SRC


def test_worker_cpu_measures_the_runtime(tmp_path: Path) -> None:
    out = tmp_path / "cpu.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(RUNTIME_SRC), str(REPO)])}
    argv = [sys.executable, "-m", "bench.worker_cpu", "--requests", "40", "--concurrency", "4"]
    argv += ["--repeat", "2", "--out", str(out), "--src", str(RUNTIME_SRC)]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert Path(result["runtime"]) == RUNTIME_SRC / "backend_common"
    assert len(result["cpu_us_per_token"]) == 2
    assert all(0 < x < 10_000 for x in result["cpu_us_per_token"])
