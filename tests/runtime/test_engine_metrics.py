"""An engine's global-registry and multiprocess metrics on the worker's /metrics, once each,
with Dynamo's labels (``backend_common.runtime.engine_metrics``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from backend_common.runtime.engine_metrics import scrape_registry
from backend_common.runtime.metrics import WorkerMetrics


def families(registry: CollectorRegistry) -> dict[str, list]:
    text = generate_latest(registry).decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def worker_metrics() -> WorkerMetrics:
    return WorkerMetrics(
        namespace="ns", component="backend", endpoint="generate", model="m", worker_id=0xAB12
    )


def test_global_registry_metrics_get_dynamo_labels_and_are_not_doubled() -> None:
    own = worker_metrics()
    engine_registry = CollectorRegistry()  # stands in for prometheus_client.REGISTRY
    running = Gauge("vllm:num_requests_running", "running", ["engine"], registry=engine_registry)
    running.labels(engine="0").set(3)
    # Same family name as one of the worker's: the worker's series wins, shown once.
    Gauge("dynamo_component_inflight_requests", "dup", registry=engine_registry).set(99)
    tagged = Gauge("sglang:cache_hit_rate", "hit", ["model"], registry=engine_registry)
    tagged.labels(model="engine-says").set(0.5)

    fams = families(scrape_registry(own.registry, own.labels, global_registry=engine_registry))
    (sample,) = fams["vllm:num_requests_running"]
    assert sample.value == 3
    assert sample.labels == {
        "engine": "0",
        "dynamo_namespace": "ns",
        "dynamo_component": "backend",
        "dynamo_endpoint": "generate",
        "model": "m",
        "model_name": "m",
        "worker_id": "ab12",
    }
    (inflight,) = fams["dynamo_component_inflight_requests"]
    assert inflight.value == 0 and inflight.labels["worker_id"] == "ab12"
    (hit,) = fams["sglang:cache_hit_rate"]
    assert hit.labels["model"] == "engine-says"  # the engine's own label wins


def test_worker_series_carry_worker_id_and_metrics_labels() -> None:
    m = WorkerMetrics(
        namespace="ns",
        component="c",
        endpoint="e",
        model="m",
        worker_id=255,
        extra_labels=[("team", "infra")],
    )
    (sample,) = families(m.registry)["dynamo_component_model_load_time_seconds"]
    assert sample.labels["worker_id"] == "ff" and sample.labels["team"] == "infra"


def test_multiprocess_directory_is_served_once(tmp_path: Path) -> None:
    # Another process of the engine (an SGLang scheduler, say) writes its metrics to the
    # directory; a metric of the same name also lives in this process's registry.
    code = (
        "from prometheus_client import Counter\n"
        "Counter('sglang_prompt_tokens', 'prompt tokens').inc(5)\n"
    )
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    engine_registry = CollectorRegistry()
    Counter("sglang_prompt_tokens", "in-process copy", registry=engine_registry).inc(1)

    own = worker_metrics()
    combined = scrape_registry(
        own.registry, own.labels, multiproc_dir=str(tmp_path), global_registry=engine_registry
    )
    fams = families(combined)
    totals = [s for s in fams["sglang_prompt_tokens"] if s.name == "sglang_prompt_tokens_total"]
    assert len(totals) == 1  # the directory's aggregate, not doubled by the in-process copy
    assert totals[0].value == 5 and totals[0].labels["worker_id"] == "ab12"


def test_missing_multiprocess_directory_falls_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine_registry = CollectorRegistry()
    Counter("engine_steps", "steps", registry=engine_registry).inc(2)
    own = worker_metrics()
    missing = str(tmp_path / "absent")
    combined = scrape_registry(
        own.registry, own.labels, multiproc_dir=missing, global_registry=engine_registry
    )
    fams = families(combined)
    assert fams["engine_steps"][0].value == 2
    assert "is not a directory" in caplog.text


def test_the_worker_reads_the_directory_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse

    from backend_common.args import add_common_args, worker_config_from_args

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    config = worker_config_from_args(add_common_args(argparse.ArgumentParser()).parse_args([]))
    assert config.prometheus_multiproc_dir == str(tmp_path)
