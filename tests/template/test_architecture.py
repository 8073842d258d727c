"""The runtime's architecture, kept so by test: import directions, one config source, doc links.

* Import graph of ``backend_common`` (every ``import`` statement, at module level, under
  ``TYPE_CHECKING`` or inside a function): no cycle; the engine-facing top level never
  imports ``runtime/`` except ``runtime.runner`` (``run``) lazily, inside a function or for
  type checking; ``transport/``, ``discovery/`` and ``devstack/`` never import ``runtime/``;
  nothing but ``runtime.runner`` imports the worker.
* Environment: only the settings' environment module (``args/environment.py``) reads
  ``os.environ``. ``devstack/``
  is exempt: it is the developer's tool that starts etcd, NATS and the frontend for tests and
  demos (it passes environments to child processes), never part of a worker.
* The engine-facing ``kv_events`` (descriptors, hashing, publisher interfaces) never imports
  ``runtime/``, not even lazily: the machinery behind it is ``runtime/kv_events/``.
* ``docs/architecture.md``'s file index names every module of the runtime (a package's own
  ``__init__.py`` only at the top level) and nothing that does not exist.
* Documents: every ``*.md`` reference in the runtime (docstrings, comments, the vendored
  documents' own links) names a file that exists in the runtime and, with ``#anchor``, a
  heading of that file.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

RUNTIME = Path(__file__).resolve().parents[2] / "template" / "src" / "backend_common"
PKG = "backend_common"


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in RUNTIME.rglob("*.py"):
        if "__pycache__" in path.parts:
            continue
        rel = path.relative_to(RUNTIME).with_suffix("")
        parts = [PKG, *rel.parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


class _Imports(ast.NodeVisitor):
    """Collect (target module, lazy) for every import; lazy = inside a function or TYPE_CHECKING."""

    def __init__(self, module: str) -> None:
        self.module = module
        self.depth = 0
        self.found: list[tuple[str, bool]] = []

    def _resolve(self, level: int, name: str | None) -> str:
        if level == 0:
            return name or ""
        base = self.module.split(".")
        if not _is_package(self.module):
            base = base[:-1]
        base = base[: len(base) - (level - 1)]
        return ".".join([*base, name] if name else base)

    def _add(self, target: str) -> None:
        if not target.startswith(PKG):
            return
        # The deepest known module the import names.
        while target and target not in MODULES:
            target = target.rpartition(".")[0]
        if target:
            self.found.append((target, self.depth > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self._resolve(node.level, node.module)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self._add(sub if sub in MODULES else base)

    def _nested(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = _nested
    visit_AsyncFunctionDef = _nested

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        ):
            self._nested(node)
        else:
            self.generic_visit(node)


def _graph() -> dict[str, list[tuple[str, bool]]]:
    graph = {}
    for name, path in MODULES.items():
        visitor = _Imports(name)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8")))
        graph[name] = [(t, lazy) for t, lazy in visitor.found if t != name]
    return graph


GRAPH = _graph()


def _area(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("runtime", "transport", "discovery", "devstack"):
        return parts[1]
    return "engine-facing"


def test_the_graph_sees_the_runtime() -> None:
    # Guards the parser: known edges must be found, or every rule below passes vacuously.
    assert ("backend_common.runtime.worker", False) in GRAPH["backend_common.runtime.runner"]
    assert ("backend_common.runtime.runner", True) in GRAPH["backend_common"]
    assert ("backend_common.errors", False) in GRAPH["backend_common.discovery.base"]


def test_no_import_cycle() -> None:
    # Module-level imports only would allow lazy cycles; the rule is stricter: none at all,
    # except a package importing its own submodules (``transport/__init__`` re-exports).
    edges = {
        m: {t for t, _ in targets if not (_is_package(t) and m.startswith(t + "."))}
        for m, targets in GRAPH.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert cycles == []


def test_engine_facing_modules_import_runtime_only_for_run_and_lazily() -> None:
    bad = [
        (m, t, lazy)
        for m, targets in GRAPH.items()
        if _area(m) == "engine-facing"
        for t, lazy in targets
        if _area(t) == "runtime" and not (t == "backend_common.runtime.runner" and lazy)
    ]
    assert bad == []


def test_engine_facing_kv_events_never_imports_runtime() -> None:
    targets = GRAPH[f"{PKG}.kv_events"]
    assert (f"{PKG}.errors", False) in targets  # the parser sees this module's imports
    assert [t for t, _ in targets if _area(t) == "runtime"] == []


@pytest.mark.parametrize("area", ["transport", "discovery", "devstack"])
def test_transport_discovery_devstack_never_import_runtime(area: str) -> None:
    bad = [
        (m, t)
        for m, targets in GRAPH.items()
        if _area(m) == area
        for t, _ in targets
        if _area(t) == "runtime"
    ]
    assert bad == []


def test_only_the_runner_imports_the_worker() -> None:
    importers = sorted(
        m for m, targets in GRAPH.items() if any(t == f"{PKG}.runtime.worker" for t, _ in targets)
    )
    assert importers == [f"{PKG}.runtime.runner"]


# -- the file index -----------------------------------------------------------------------
def _indexed_paths() -> set[str]:
    """Every path named in the first column of architecture.md's "Key files" table."""
    text = (RUNTIME / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split("## Key files", 1)[1].split("\n## ", 1)[0]
    paths: set[str] = set()
    for line in section.splitlines():
        cells = line.split("|")
        if len(cells) > 2 and "`" in cells[1]:
            paths.update(re.findall(r"`([^`]+)`", cells[1]))
    return paths


def test_the_file_index_lists_every_module() -> None:
    indexed = _indexed_paths()
    modules = {
        p.relative_to(RUNTIME).as_posix()
        for p in RUNTIME.rglob("*.py")
        if "__pycache__" not in p.parts and not (p.name == "__init__.py" and p.parent != RUNTIME)
    }
    assert len(modules) > 40  # the scan sees the runtime
    assert sorted(modules - indexed) == []  # a module nobody can find
    assert sorted(p for p in indexed if not (RUNTIME / p).exists()) == []  # a stale row


# -- environment -------------------------------------------------------------------------
CONFIG_MODULES = {"args/environment.py"}
# devstack/ is a developer tool (starts etcd, NATS, the frontend for tests and demos).
ENV_EXEMPT_DIRS = {"devstack"}


def _env_reads(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb"):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            if any(a.name in ("environ", "getenv", "environb") for a in node.names):
                lines.append(node.lineno)
    return lines


def test_only_the_config_module_reads_the_environment() -> None:
    offenders = {}
    for path in sorted(RUNTIME.rglob("*.py")):
        rel = path.relative_to(RUNTIME)
        if rel.parts[0] in ENV_EXEMPT_DIRS or rel.as_posix() in CONFIG_MODULES:
            continue
        if lines := _env_reads(path):
            offenders[rel.as_posix()] = lines
    assert offenders == {}


def test_the_env_scanner_finds_reads() -> None:
    assert _env_reads(RUNTIME / "args" / "environment.py"), "the scanner must see the reads"


# -- document references -----------------------------------------------------------------
DOCS = RUNTIME / "docs"
_REF = re.compile(r"(?<![\w/.-])((?:\.\./|[\w-]+/)*[\w.-]+\.md)(?:#([\w-]+))?")
_LOCAL_ANCHOR = re.compile(r"\]\(#([\w-]+)\)")
# Ways of citing documents that are not in the repository (section numbers of outside specs).
_FOREIGN = re.compile(r"§|\bwire\.md\b|real-dynamo|copier\.md|contract(\.md)? sections? \d")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    anchors, fenced = set(), False
    for line in md.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6} (.+)", line)):
            anchors.add(_slug(m.group(1)))
    return anchors


def _runtime_text_files() -> list[Path]:
    return sorted(
        p
        for p in RUNTIME.rglob("*")
        if p.is_file() and p.suffix in (".py", ".md") and "__pycache__" not in p.parts
    )


def _references() -> list[tuple[Path, str, str | None, Path]]:
    """(file, reference, anchor, resolved path) for every ``*.md`` reference in the runtime."""
    refs = []
    for path in _runtime_text_files():
        text = path.read_text(encoding="utf-8")
        # Python names documents from the package root; a document links relative to itself.
        base = RUNTIME if path.suffix == ".py" else path.parent
        for m in _REF.finditer(text):
            refs.append((path, m.group(1), m.group(2), (base / m.group(1)).resolve()))
        if path.suffix == ".md":
            refs += [(path, "#" + a, a, path) for a in _LOCAL_ANCHOR.findall(text)]
    return refs


def test_the_design_documents_exist_and_say_what_they_follow() -> None:
    for name in ("architecture.md", "wire-protocol.md", "contract.md", "settings.md"):
        assert (DOCS / name).is_file(), name
    for name in ("architecture.md", "wire-protocol.md", "contract.md"):
        assert "Dynamo 1.6" in (DOCS / name).read_text(encoding="utf-8") or "**1.6.x**" in (
            DOCS / name
        ).read_text(encoding="utf-8"), name


def test_every_document_reference_resolves_to_a_file_and_heading() -> None:
    refs = _references()
    assert len(refs) > 40  # the scanner sees the docstrings' references
    broken = []
    for path, ref, anchor, target in refs:
        where = f"{path.relative_to(RUNTIME)}: {ref}" + (f"#{anchor}" if anchor else "")
        if not target.is_file() or RUNTIME not in target.parents:
            broken.append(f"{where} (no such file in the runtime)")
        elif anchor and anchor not in _anchors(target):
            broken.append(f"{where} (no such heading)")
    assert broken == []


def test_no_reference_to_documents_outside_the_repository() -> None:
    found = [
        f"{p.relative_to(RUNTIME)}:{n}: {line.strip()}"
        for p in _runtime_text_files()
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if _FOREIGN.search(line)
    ]
    assert found == []


def test_the_slug_rule() -> None:
    assert _slug("Response stream (call-home)") == "response-stream-call-home"
    assert _slug("Architecture of `backend_common`") == "architecture-of-backend_common"
