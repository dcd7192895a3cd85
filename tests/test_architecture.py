"""The library's boundaries, read from the source with ast: no import cycle inside miss_compile/ or
export/ (installed as miss_compile.export), no module importing another's private name, and a bare
`import miss_compile` loading no distributed machinery of its own."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"miss_compile": ROOT / "miss_compile", "miss_compile.export": ROOT / "export"}
USERS = ("tests", "benchmarks", "examples")  # code that imports the library from outside


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of miss_compile and miss_compile.export."""
    files = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.glob("*.py")):
            files[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return files


MODULES = module_files()


def imports(path: Path, module: str) -> list[tuple[int, str, str | None]]:
    """(line, imported module, imported name or None) for every import in `path` that runs: function
    bodies too (an import deferred into a function still closes a cycle), `if TYPE_CHECKING:` not."""
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    found = []
    for node in runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            source = f"{base}.{node.module}" if node.level and node.module else base if node.level else node.module
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.append((node.lineno, submodule, None) if submodule in MODULES else (node.lineno, source, alias.name))
    return found


def runtime_nodes(node: ast.AST) -> list[ast.AST]:
    """Every node under `node` but those of `if TYPE_CHECKING:` bodies (read by type checkers only)."""
    nodes = [node]
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            nodes += [item for orelse in child.orelse for item in runtime_nodes(orelse)]
        else:
            nodes += runtime_nodes(child)
    return nodes


def library_module(name: str) -> str | None:
    """The miss_compile module `name` is or lies in (miss_compile.export.onnx for itself, None outside)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        targets = {library_module(target) for _, target, _ in imports(path, module)}
        graph[module] = {target for target in targets if target and target != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_imports(path: Path, module: str) -> list[str]:
    """`from x import _y` where x is another library module: `_y` is x's own business."""
    return [f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name}:{line}: {name} from {target}"
            for line, target, name in imports(path, module)
            if name is not None and is_private(name) and library_module(target) not in (None, module)]


def test_the_graph_sees_every_module_and_import():
    graph = import_graph()
    assert {"miss_compile", "miss_compile.checkpoint", "miss_compile.export", "miss_compile.export.onnx"} <= graph.keys()
    assert "miss_compile.checkpoint" in graph["miss_compile"]  # from .checkpoint import load_adapter
    assert "miss_compile.ops" in graph["miss_compile.layer"]  # from . import ops
    assert "miss_compile.files" in graph["miss_compile.export.onnx"]  # from miss_compile.files import ...


def test_type_checking_imports_are_not_edges(tmp_path):
    path = tmp_path / "user.py"
    path.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .runtime import A\n"
                    "else:\n    from .onnx import B\ndef f():\n    from .validate import C\n")
    assert imports(path, "miss_compile.export.x") == [
        (1, "typing", "TYPE_CHECKING"), (5, "miss_compile.export.onnx", "B"), (7, "miss_compile.export.validate", "C")]


def test_cycles_finds_a_cycle_and_only_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []




def test_no_import_cycle_in_the_library():
    graph = import_graph()
    found = {f"{module} -> {target}" for component in cycles(graph) for module in component
             for target in graph[module] & set(component)}
    assert found == set(), (
        "modules that import each other (function-level imports count): move what both need into a third")


def test_no_module_imports_a_private_name_of_another():
    found = [line for module, path in MODULES.items() for line in private_imports(path, module)]
    assert found == [], "make what another module needs public (no underscore, in its module's __all__)"


@pytest.mark.parametrize("folder", USERS)
def test_tests_benchmarks_and_examples_import_only_public_names(folder):
    found = [line for path in sorted((ROOT / folder).rglob("*.py")) for line in private_imports(path, folder)]
    assert found == []


def test_private_imports_are_found(tmp_path):
    path = tmp_path / "user.py"
    path.write_text("from miss_compile.backend import _hidden, shown\nfrom miss_compile import stacked\n"
                    "from .checkpoint import _inner\nfrom .lora import _its_own\n")
    assert private_imports(path, "miss_compile.lora") == [
        "user.py:1: _hidden from miss_compile.backend", "user.py:3: _inner from miss_compile.checkpoint"]


def test_the_package_exports_the_verbs_users_call():
    """The rest lives in its module: miss_compile.distributed, .layer (MissLinear), .passes (PassReport)."""
    import miss_compile

    assert sorted(miss_compile.__all__) == sorted([
        "MissConfig", "apply_miss", "load_adapter", "read_adapter", "save_adapter", "set_active_adapters",
        "enable_adapters", "adapters_disabled", "merge_adapters", "unmerge_adapters", "miss_backend", "make_backend",
        "explain", "stack_adapters", "adapter_ids_for", "NO_ADAPTER", "to_lora",
    ])
    assert all(getattr(miss_compile, name) is not None for name in miss_compile.__all__)


def test_import_miss_compile_loads_no_distributed_machinery_of_its_own():
    """miss_compile.distributed (DDP, FSDP2, DTensor) loads only when imported. torch._inductor, which
    the backend needs at import (its graph pass subclasses CustomGraphPass), loads torch._dynamo and
    that loads torch.distributed.fsdp itself (torch 2.13): those come with torch, not from us."""
    code = """if True:
        import sys
        import torch._inductor.compile_fx, torch._inductor.custom_graph_pass, transformers.pytorch_utils
        before = set(sys.modules)
        import miss_compile
        print(*sorted(set(sys.modules) - before))"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    added = set(result.stdout.split())
    assert "miss_compile.checkpoint" in added and "miss_compile.distributed" not in added
    assert {name for name in added if name.startswith(("torch.distributed", "torch.nn.parallel"))} == set()
