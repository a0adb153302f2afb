"""The package's layers point one way: read every module's imports (lazy ones too) and check them.

Layers, lowest first (a module may import its own package and any lower layer, never a higher or equal one):

    0  io, net, tokenization, onnxrt, data, devices, sample_data, cli_options, _proto, st_layout
    1  checkpoints, model, client
    1.5  model_card (reads what train, evaluate and export wrote; all three refresh it)
    2  testing, evaluate, server
    3  train, export, loadtest, corpus
    4  cli (imports commands by name only, when they run)

The serving side (server, client, loadtest, corpus and the modules they stand on) imports no torch at all.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "embedforge"

LAYERS = {
    "io": 0, "net": 0, "tokenization": 0, "onnxrt": 0, "data": 0, "devices": 0, "sample_data": 0, "cli_options": 0,
    "_proto": 0, "st_layout": 0, "quantize": 0,
    "checkpoints": 1, "model": 1, "client": 1,
    "model_card": 1.5,
    "testing": 2, "server": 2, "evaluate": 2.5,
    "train": 3, "export": 3, "loadtest": 3, "corpus": 3,
    "cli": 4, "__main__": 5,
}
TORCH_FREE = {"io", "net", "tokenization", "onnxrt", "data", "sample_data", "cli_options", "_proto", "st_layout",
              "quantize", "client", "server", "loadtest", "corpus", "cli", "__main__"}
TORCH_LIBRARIES = {"torch", "transformers", "sentence_transformers", "safetensors"}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in the file, at any depth; `from a import b` yields a.b too."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


MODULES = all_modules()
TOP_LEVEL = {name.split(".")[1] for name in MODULES if "." in name}


def component(name: str) -> str | None:
    """The layer key of an embedforge module (`embedforge.server.app` -> `server`); None for other names."""
    parts = name.split(".")
    return parts[1] if parts[0] == "embedforge" and len(parts) > 1 and parts[1] in TOP_LEVEL else None


def test_every_module_has_a_layer():
    unplaced = sorted({component(name) for name in MODULES} - set(LAYERS) - {None})
    assert not unplaced, f"add these to LAYERS in {__file__}: {unplaced}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down(name):
    own = component(name)
    if own is None:  # embedforge/__init__.py
        return
    problems = []
    for line, target in imported_modules(MODULES[name]):
        other = component(target)
        if other is not None and other != own and other in LAYERS and LAYERS[other] >= LAYERS[own]:
            problems.append(f"{MODULES[name].relative_to(ROOT)}:{line} imports {target} (layer {LAYERS[other]} "
                            f">= {own}'s {LAYERS[own]})")
        if target.split(".")[0] in {"benchmarks", "scripts", "tests", "conftest"}:
            problems.append(f"{MODULES[name].relative_to(ROOT)}:{line} imports {target}")
        if own in TORCH_FREE and (target.split(".")[0] in TORCH_LIBRARIES or
                                  (other is not None and other not in TORCH_FREE)):
            problems.append(f"{MODULES[name].relative_to(ROOT)}:{line}: serving-side module imports {target}")
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    graph = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for _, target in imported_modules(path):
            if target in MODULES and target != name and not name.startswith(f"{target}."):
                graph[name].add(target)
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                loop = stack[stack.index(nxt):] if nxt in stack else []
                cycles.append(" -> ".join([*loop, node, nxt]))
            elif nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])
    assert not cycles, "\n".join(cycles)


def test_tests_import_no_other_test_module():
    problems = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for line, target in imported_modules(path):
            head = target.split(".")[0]
            if head.startswith("test_") or head == "conftest":
                problems.append(f"tests/{path.name}:{line} imports {target}")
    assert not problems, "\n".join(problems)


def test_the_reader_sees_lazy_and_relative_imports(tmp_path):
    """A planted upward import inside a function, written relatively, is read as what it is."""
    planted = tmp_path / "embedforge" / "server" / "planted.py"
    planted.parent.mkdir(parents=True)
    planted.write_text("def f():\n    from ..train import trainer\n    import torch\n")
    found = [target for _, target in imported_modules(planted, tmp_path)]
    assert "embedforge.train.trainer" in found and "torch" in found
    assert component("embedforge.train.trainer") == "train"
