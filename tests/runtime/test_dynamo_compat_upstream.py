"""Dynamo 1.6.1's own unit tests of ``dynamo.common.backend`` against ``dynamo_compat``.

The test files come from the frontend venv's ``ai-dynamo`` wheel, copied unmodified into a
temporary directory (so pytest does not import the wheel's own package ``__init__`` on the
way), and run by pytest in a subprocess of this repository's ``.venv`` with
``dynamo_alias_plugin`` resolving every ``dynamo.*`` import to the compatibility package.
Everything that applies must pass: ``EXPECTED_PASSED`` tests. What cannot apply is listed with
the reason, and is shown not to pass when run anyway, so the list holds nothing that would.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, RUNTIME_SRC
from dynamo_wheel import backend_dir

_BINDING = "tests the Rust PyO3 binding dynamo._core.backend, which this runtime replaces"
NOT_APPLICABLE_TESTS = {
    "test_backend_bindings.py::test_module_exposes_expected_classes": _BINDING,
    "test_backend_bindings.py::test_runtime_config_accepts_optional_fields": _BINDING,
    "test_backend_bindings.py::test_engine_config_required_model_only": _BINDING,
    "test_backend_bindings.py::test_engine_config_full_kwargs_round_trip_through_getters": _BINDING,
    "test_backend_bindings.py::test_llm_registration_preserves_legacy_positional_arguments": (
        _BINDING
    ),
    "test_backend_bindings.py::test_llm_registration_dataclass_matches_binding": _BINDING,
    "test_backend_bindings.py::test_worker_config_minimum_args": _BINDING,
    "test_backend_bindings.py::test_worker_config_accepts_metrics_labels_and_runtime": _BINDING,
    "test_backend_bindings.py::test_worker_config_accepts_parser_runtime_settings": (
        "tests dynamo.llm.ModelRuntimeConfig and the Rust WorkerConfig binding"
    ),
    "test_backend_bindings.py::test_structural_tag_bindings_reject_unknown_config_fields": (
        _BINDING
    ),
    "test_backend_bindings.py::test_worker_config_preserves_legacy_positional_argument_order": (
        _BINDING
    ),
    "test_backend_bindings.py::test_worker_config_accepts_media_configuration": (
        "frontend media decoding (dynamo.llm.MediaDecoder/MediaFetcher) is not provided"
    ),
    "test_backend_bindings.py::test_worker_config_accepts_disaggregation_mode": _BINDING,
    "test_backend_bindings.py::test_python_worker_config_translates_all_disagg_modes": (
        "maps modes onto the Rust enum (_to_rust_disaggregation_mode); ours needs no mapping"
    ),
    "test_backend_bindings.py::test_python_worker_config_round_trips_route_to_encoder": (
        "ends in the Rust WorkerConfig binding; route_to_encoder is refused at start here"
    ),
    "test_backend_bindings.py::test_worker_constructor_requires_engine_config_loop": _BINDING,
    "test_backend_bindings.py::test_worker_config_accepts_default_model_input": _BINDING,
}
_HANDLER = "compares the vLLM / SGLang backends' own handler classes, not in this package"
NOT_APPLICABLE_TESTS.update(
    {
        "test_logprobs.py::test_vllm_handler_matches_shared": _HANDLER,
        "test_logprobs.py::test_sglang_extract_handler_matches_shared": _HANDLER,
        "test_logprobs.py::test_sglang_kwargs_handler_matches_shared": _HANDLER,
    }
)
NOT_APPLICABLE_FILES = {
    "test_metrics_helpers.py": (
        "bridges a registry into the Rust EngineMetrics via dynamo.common.utils.prometheus"
    ),
}
EXPECTED_PASSED = 153
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def dynamo_backend_dir(frontend_python: str) -> Path:
    return backend_dir(frontend_python)


def _pytest(tests: Path, backend: Path, *args: str) -> subprocess.CompletedProcess[str]:
    ini = tests / "pytest.ini"
    ini.write_text("[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DYN_", "PYTEST_"))}
    env["DYNAMO_BACKEND_DIR"] = str(backend)
    env["PYTHONPATH"] = os.pathsep.join([str(RUNTIME_SRC), str(REPO / "tests")])
    argv = [sys.executable, "-m", "pytest", "-c", str(ini), "-p", "dynamo_alias_plugin"]
    argv += ["-p", "no:cacheprovider", "--import-mode=importlib", "-q", "-rfE"]
    argv += ["-W", "ignore::pytest.PytestUnknownMarkWarning", "--rootdir", str(tests), *args]
    return subprocess.run(
        argv, cwd=tests, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )


def _count(output: str, what: str) -> int:
    found = re.search(rf"(\d+) {what}", output.strip().splitlines()[-1])
    return int(found.group(1)) if found else 0


def _copy_tests(backend: Path, dest: Path) -> Path:
    dest.mkdir()
    for source in sorted((backend / "tests").glob("test_*.py")):
        shutil.copyfile(source, dest / source.name)
    return dest


def test_dynamo_backend_unit_tests_pass_on_the_compat_layer(
    dynamo_backend_dir: Path, tmp_path: Path
) -> None:
    tests = _copy_tests(dynamo_backend_dir, tmp_path / "upstream")
    files = sorted(p.name for p in tests.glob("test_*.py"))
    assert set(NOT_APPLICABLE_FILES) <= set(files)
    args = [f for f in files if f not in NOT_APPLICABLE_FILES]
    args += [f"--deselect={test_id}" for test_id in NOT_APPLICABLE_TESTS]
    done = _pytest(tests, dynamo_backend_dir, *args)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert _count(output, "passed") == EXPECTED_PASSED, output[-3000:]
    assert _count(output, "deselected") == len(NOT_APPLICABLE_TESTS) + 1, output[-3000:]
    assert _count(output, "skipped") == 0, output[-3000:]


def test_the_not_applicable_tests_do_fail_here(dynamo_backend_dir: Path, tmp_path: Path) -> None:
    tests = _copy_tests(dynamo_backend_dir, tmp_path / "upstream")
    done = _pytest(tests, dynamo_backend_dir, *NOT_APPLICABLE_TESTS)
    output = done.stdout + done.stderr
    # The binding tests fail (no Rust classes); the handler comparisons skip (no vLLM/SGLang).
    assert _count(output, "passed") == 0, output[-3000:]
    ran = _count(output, "failed") + _count(output, "skipped")
    assert ran == len(NOT_APPLICABLE_TESTS) + 1, output[-3000:]
    for name in NOT_APPLICABLE_FILES:
        done = _pytest(tests, dynamo_backend_dir, name)
        assert done.returncode != 0 and "ImportError" in done.stdout + done.stderr, name
