"""Straight dependencies, read from the source (AST), not from what happens to be imported at run time:

  * the import graph between tidar_megatron's subpackages (and top-level modules) has no cycle;
  * private names of third-party packages (`x._name`, `getattr(x, "_name")`, `super()._name` over a
    third-party base class, `from x import _name`) appear only inside tidar_megatron/compat/, which names the version they were
    written for;
  * imports inside function bodies are only of optional extras or of modules a file imports late on purpose
    (each with its reason below); everything else is imported at the top of its module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tidar_megatron

PACKAGE = Path(tidar_megatron.__file__).resolve().parent
ROOT = PACKAGE.name

# Optional extras (pyproject.toml) and the project's own Triton kernels, imported where they are used so that
# everything else works without them.
OPTIONAL_EXTRAS = {
    "transformer_engine": "te extra (CUDA only)",
    "apex": "NVIDIA apex from a cluster image",
    "nvidia": "dali extra (nvidia.dali)",
    "lm_eval": "eval extra",
    "accelerate": "eval extra",
    "fastapi": "serve extra",
    "uvicorn": "serve extra",
    "prometheus_client": "serve extra",
    "wandb": "wandb extra",
    "pyarrow": "parquet extra",
    "datasets": "parquet inputs saved by datasets",
    "zstandard": "zstd extra",
    "transformers": "hf extra",
    "triton": "Triton's interpreter, patched only under TRITON_INTERPRET=1",
    "tidar_kernels": "Triton kernels: compiled on first use, only by the backends that run them",
}

MEGATRON = ("megatron", "tidar_megatron.training", "tidar_megatron.model")  # megatron-core: ~4 s to import
# path (under tidar_megatron/) -> (the modules it imports inside functions, why).
DELIBERATELY_LAZY = {
    "training/loop.py": (("torch",) + MEGATRON,
                         "`train --help` prints every field before torch / megatron-core load (tests/test_cli.py)"),
    "data/prefix_check.py": (("megatron",), "megatron-core (seconds, and warnings about TE / Apex) loads when a "
                                            "prefix is read, not when `evaluate` or `generate` start"),
    "data/tokenize_corpus.py": (("megatron",), "megatron-core's indexed_dataset (seconds) loads when .bin/.idx "
                                               "are written, not for `tokenize --help` or an input error"),
    "convert/hf_export.py": (MEGATRON, "the conversion runs in a spawned process (convert/process.py): the "
                                       "caller does not load megatron-core"),
    "convert/hf_import.py": (MEGATRON, "as convert/hf_export.py"),
    "convert/process.py": (MEGATRON, "megatron-core's state and the CPU layer start in the spawned process only"),
    "quickstart.py": (("tidar_megatron.config", "tidar_megatron.convert", "tidar_megatron.evaluation",
                       "tidar_megatron.inference") + MEGATRON,
                      "`quickstart --help` and its first stages (tokenizer, tokenize) run before torch loads"),
    "plots.py": (("matplotlib",), "optional on a cluster image (PlotsUnavailable), and the Agg backend must be "
                                  "chosen before pyplot is imported"),
    "data/tokenizer.py": (("sentencepiece.sentencepiece_model_pb2",), "needs protobuf, which sentencepiece does "
                                                                      "not require: without it texts are encoded whole"),
}


def _lazy_allowed(rel: str, target: str) -> bool:
    prefixes = DELIBERATELY_LAZY.get(rel, ((),))[0]
    return target.split(".")[0] in OPTIONAL_EXTRAS or any(target == p or target.startswith(p + ".") for p in prefixes)


# Private third-party names that cannot be avoided outside compat/: (path, name) -> reason.  Keep it empty.
PRIVATE_ALLOWED: dict[tuple[str, str], str] = {}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        parts = [ROOT, *rel.with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        yield rel.as_posix(), ".".join(parts), ast.parse(path.read_text(), filename=str(path))


MODULES = list(_modules())


def _node(module: str) -> str:
    """tidar_megatron.model.attention -> model; tidar_megatron.config -> config; tidar_megatron -> tidar_megatron."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _is_module(dotted: str) -> bool:
    path = PACKAGE.joinpath(*dotted.split(".")[1:])
    return path.is_dir() or path.with_suffix(".py").exists()


def _absolute(node: ast.ImportFrom, module: str, rel: str) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if rel.endswith("__init__.py") else module.split(".")[:-1]
    base = package[:len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imported(node, module: str, rel: str) -> list[str]:
    """The modules an import statement loads (for `from pkg import name`, pkg.name when that is a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    source = _absolute(node, module, rel)
    if source.split(".")[0] != ROOT:  # a name or a submodule: either way within the package source.name
        return [f"{source}.{a.name}" for a in node.names]
    return [f"{source}.{a.name}" if _is_module(f"{source}.{a.name}") else source for a in node.names]


def import_graph() -> dict[str, dict[str, str]]:
    """subpackage -> {subpackage it imports: 'file:line' of the first such import}, every import counted."""
    graph: dict[str, dict[str, str]] = {}
    for rel, module, tree in MODULES:
        here = _node(module)
        graph.setdefault(here, {})
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _imported(node, module, rel):
                    if target.split(".")[0] == ROOT and _node(target) != here:
                        graph[here].setdefault(_node(target), f"{rel}:{node.lineno}")
    return graph


def find_cycle(graph) -> list[str] | None:
    """One cycle of `graph` as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_reports_a_cycle_as_a_path():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_subpackages_import_each_other_without_a_cycle():
    graph = import_graph()
    assert {"model", "training", "data", "convert", "inference", "compat"} <= set(graph)
    cycle = find_cycle(graph)
    where = [f"{a} -> {b} ({graph[a][b]})" for a, b in zip(cycle, cycle[1:])] if cycle else []
    assert cycle is None, "package cycle: " + " -> ".join(cycle) + "; " + "; ".join(where)


def _defined_names() -> set[str]:
    """Every name tidar_megatron defines: functions, classes, variables, arguments, attributes it assigns
    (outside compat/, whose attribute assignments are patches of third-party modules)."""
    names = set()
    for rel, _, tree in MODULES:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and not rel.startswith("compat/"):
                names.add(node.attr)
    return names


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_third_party_uses(modules=MODULES) -> list[str]:
    defined = _defined_names()
    own_classes = {n.name for _, _, t in MODULES for n in ast.walk(t) if isinstance(n, ast.ClassDef)}
    found = []
    for rel, module, tree in modules:
        if rel.startswith("compat/"):
            continue
        classes = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]

        def third_party_base(node) -> bool:
            owner = [c for c in classes if c.lineno <= node.lineno <= c.end_lineno]
            bases = [ast.unparse(b).split(".")[-1] for c in owner[-1:] for b in c.bases]
            return any(b not in own_classes for b in bases)

        for node in ast.walk(tree):
            name = None
            if isinstance(node, ast.Attribute) and _private(node.attr):
                base = node.value
                is_super = isinstance(base, ast.Call) and getattr(base.func, "id", None) == "super"
                if is_super and third_party_base(node):
                    name = node.attr
                elif not is_super and getattr(base, "id", None) not in ("self", "cls") and node.attr not in defined:
                    name = node.attr
            elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "setattr", "hasattr")
                  and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
                  and isinstance(node.args[1].value, str) and _private(node.args[1].value)
                  and getattr(node.args[0], "id", None) not in ("self", "cls") and node.args[1].value not in defined):
                name = node.args[1].value
            elif isinstance(node, ast.ImportFrom) and _absolute(node, module, rel).split(".")[0] != ROOT:
                name = next((a.name for a in node.names if _private(a.name)), None)
                name = name or next((p for p in (node.module or "").split(".") if _private(p)), None)
            elif isinstance(node, ast.Import):
                name = next((p for a in node.names for p in a.name.split(".") if _private(p)), None)
            if name and (rel, name) not in PRIVATE_ALLOWED:
                found.append(f"{rel}:{node.lineno}: {ast.unparse(node) if len(ast.unparse(node)) < 80 else name}")
    return found


def test_private_third_party_names_only_in_compat():
    found = private_third_party_uses()
    assert not found, "private third-party names outside tidar_megatron/compat/:\n" + "\n".join(found)


def test_the_private_name_check_sees_what_it_should():
    source = ("import torch\nfrom lm_eval.models.utils import _add_special_kwargs\n"
              "class Model(torch.nn.Module):\n    def forward(self, x):\n        self._own = torch._C\n"
              "        return super()._call_impl(x), self._own, x._unpublished, (1, 2).__len__(), getattr(x, '_hidden')\n")
    found = private_third_party_uses([("model/example.py", f"{ROOT}.model.example", ast.parse(source))])
    assert sorted(f.split(": ")[1] for f in found) == [
        "from lm_eval.models.utils import _add_special_kwargs", "getattr(x, '_hidden')", "super()._call_impl",
        "torch._C", "x._unpublished"]


def function_level_imports() -> list[str]:
    found = []
    for rel, module, tree in MODULES:
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    for target in _imported(node, module, rel):
                        if not _lazy_allowed(rel, target):
                            found.append(f"{rel}:{node.lineno}: {target}")
    return sorted(set(found), key=lambda f: (f.split(":")[0], int(f.split(":")[1])))


def test_imports_inside_functions_are_optional_extras_or_deliberately_lazy():
    for rel in DELIBERATELY_LAZY:
        assert (PACKAGE / rel).exists(), f"DELIBERATELY_LAZY names {rel}, which is not on disk"
    found = function_level_imports()
    assert not found, "imports inside functions that belong at the top of their module:\n" + "\n".join(found)


def test_every_subpackage_is_installed_by_a_wheel():
    """pyproject.toml lists the packages a wheel (or a non-editable install) gets: a subpackage missing from
    it imports in the checkout and fails everywhere else."""
    import tomllib

    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join((ROOT, *p.parent.relative_to(PACKAGE).parts)) for p in PACKAGE.rglob("__init__.py")}
    assert on_disk - listed == set(), f"add to [tool.setuptools] packages in pyproject.toml: {on_disk - listed}"
