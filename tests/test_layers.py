"""Imports run one way, down the layers of STYLE.md: a module imports only from its own layer or below, and the
project's modules form no import cycle.

Reads every module of `posttrain/` and `evals/` with `ast` (imports inside functions included), so the check
needs no import and no model. A function-local import is for a heavy optional library only (HEAVY); a project
import inside a function is how a cycle used to hide, so it counts as a failure. Standard-library imports inside
functions are let through: they cannot reach the project, so they can neither hide a cycle nor cross a layer.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("posttrain", "evals")

# One line per module: its layer. A new module is added here, in the layer it belongs to; a stage file
# (posttrain/stages/<kind>.py) is L3 without a line, so adding a stage kind stays one file and one import.
LAYERS: dict[str, int] = {
    # L0 primitives
    "posttrain.registry": 0,
    "posttrain.schema": 0,
    "posttrain.ranks": 0,
    "posttrain.yaml_caps": 0,
    "posttrain.rundir": 0,
    "posttrain.rundir_check": 0,
    "posttrain.tensors": 0,
    "posttrain.tensor_writer": 0,
    "posttrain.progress": 0,
    # L1 components
    "posttrain.config_refs": 1,
    "posttrain.data": 1,
    "posttrain.data_stream": 1,
    "posttrain.row_checks": 1,
    "posttrain.hub_pins": 1,
    "posttrain.identity": 1,
    "posttrain.mixture": 1,
    "posttrain.chat_mask": 1,
    "posttrain.models": 1,
    "posttrain.model_check": 1,
    "posttrain.model_files": 1,
    "posttrain.hft": 1,
    "posttrain.hft_layouts": 1,
    "posttrain.rollout": 1,
    "posttrain.rewards": 1,
    "posttrain.rewards.builtin": 1,
    "posttrain.rewards.cgroup": 1,
    "posttrain.rewards.child": 1,
    "posttrain.rewards.confine": 1,
    "posttrain.rewards.deadline": 1,
    "posttrain.rewards.harness": 1,
    "posttrain.rewards.ifeval": 1,
    "posttrain.rewards.ifeval_checks": 1,
    "posttrain.rewards.judge": 1,
    "posttrain.rewards.imports": 1,
    "posttrain.rewards.namespace": 1,
    "posttrain.rewards.sandbox": 1,
    "posttrain.rewards.scorer": 1,
    "posttrain.rewards.stats": 1,
    "posttrain.merging": 1,
    "posttrain.merging.compat": 1,
    "posttrain.merging.mergekit": 1,
    "posttrain.merging.methods": 1,
    "posttrain.merging.ops": 1,
    "posttrain.merging.search": 1,
    "posttrain.merging.stream": 1,
    "posttrain.world": 1,
    "posttrain.world.build": 1,
    "posttrain.world.notes": 1,
    "posttrain.world.steps": 1,
    "posttrain.world.tasks": 1,
    "posttrain.world.tuning": 1,
    "posttrain.world.v2": 1,
    "posttrain.world.large": 1,
    "posttrain.tracking": 1,
    # L2 evals
    "evals": 2,
    "evals.backward": 2,
    "evals.cache": 2,
    "evals.checks": 2,
    "evals.config": 2,
    "evals.forgetting": 2,
    "evals.plot": 2,
    "evals.report": 2,
    "evals.run_report": 2,
    "evals.runner": 2,
    "evals.scores": 2,
    "evals.summary": 2,
    "evals.mitigation": 2,
    # L3 stages
    "posttrain.stages": 3,
    "posttrain.stages.base": 3,
    "posttrain.stages.common": 3,
    "posttrain.stages.selection": 3,
    "posttrain.stages.sft": 3,
    "posttrain.stages.dpo": 3,
    "posttrain.stages.grpo": 3,
    "posttrain.stages.combine": 3,
    "posttrain.stages.merge": 3,
    "posttrain.stages.transfer": 3,
    # L4 orchestration
    "posttrain.config": 4,
    "posttrain.pipeline": 4,
    "posttrain.distributed": 4,
    "posttrain.world.trained": 4,
    "posttrain.push": 4,
    "posttrain.mitigate": 4,
    # L5 faces
    "posttrain": 5,
    "posttrain.__main__": 5,
    "posttrain.entry": 5,
    "posttrain.cli": 5,
    "posttrain.cli_list": 5,
    "posttrain.api": 5,
}

# Libraries a function may import for itself: heavy or optional, so the base install and `posttrain --help`
# do not pay for them.
HEAVY = {"torch", "transformers", "trl", "peft", "vllm", "lm_eval", "matplotlib", "datasets", "accelerate",
         "huggingface_hub", "safetensors", "tokenizers", "pyarrow", "math_verify", "jinja2", "tqdm",
         "pandas", "tensorboardX", "wandb"}

# Project imports made inside a function on purpose, each with why: (importer, imported).
DEFERRED = {
    ("posttrain.entry", "posttrain.cli"),  # the entry point checks config files before seconds of CLI imports
}


def _layer(module: str) -> int | None:
    return LAYERS.get(module, 3 if module.startswith("posttrain.stages.") else None)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function?, line) for every import in the file; `from a import b` names the
    submodule a.b when that is a module of the project."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                out.extend((a.name, in_function, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = package[: len(package) - child.level + 1] if child.level else []
                module = ".".join(base + ([child.module] if child.module else []))
                for a in child.names:
                    sub = f"{module}.{a.name}"
                    out.append((sub if sub in known else module, in_function, child.lineno))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return out


def _project(module: str) -> bool:
    return module.split(".")[0] in PACKAGES


def _owner(module: str, known: set[str]) -> str | None:
    """The project module an import names (`posttrain.x.y` -> `posttrain.x.y`, or its nearest known parent)."""
    while module and module not in known:
        module = module.rpartition(".")[0]
    return module or None


def _graph() -> tuple[dict[str, set[str]], dict[str, str]]:
    """The import graph of the project's modules, and its problems: "module -> target: what" -> where."""
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    problems: dict[str, str] = {}
    for name, path in modules.items():
        rel = path.relative_to(REPO)
        for target, in_function, line in _imports(name, path, known):
            top = target.split(".")[0]
            if not _project(target):
                if in_function and top not in HEAVY and top not in sys.stdlib_module_names:
                    problems.setdefault(f"{name} -> {target}: function-local import of a light library", f"{rel}:{line}")
                continue
            owner = _owner(target, known)
            if owner is None or owner == name:
                continue
            graph[name].add(owner)
            if in_function and (name, owner) not in DEFERRED:
                problems.setdefault(f"{name} -> {owner}: function-local project import", f"{rel}:{line}")
            low, high = _layer(name), _layer(owner)
            if low is not None and high is not None and high > low:
                problems.setdefault(f"{name} -> {owner}: L{low} imports L{high}", f"{rel}:{line}")
    return graph, problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_every_module_has_a_layer():
    found = set(_modules())
    assert sorted(m for m in found if _layer(m) is None) == [], "modules missing from LAYERS (add one line each)"
    assert sorted(set(LAYERS) - found) == [], "LAYERS names modules that no longer exist"


def test_imports_run_down_the_layers():
    _, problems = _graph()
    assert sorted(f"{p} ({where})" for p, where in problems.items()) == []


def test_no_import_cycle():
    graph, _ = _graph()
    assert _cycles(graph) == []


def test_the_checker_sees_a_function_local_import_and_a_cycle(tmp_path):
    # The checker itself: an upward import inside a function is found, and a two-module loop is a cycle.
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from posttrain.pipeline import Pipeline\n")
    assert _imports("posttrain.models", path, {"posttrain.pipeline"}) == [("posttrain.pipeline", True, 2)]
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
