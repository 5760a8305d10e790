"""The architecture as checked contracts: the import layering (import-linter), no import cycle in ``src/``,
and no generic module that names a method — methods speak through the registry and the tuner's hooks.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import deltatune

SRC = Path(deltatune.__file__).parent
PYPROJECT = SRC.parent.parent / "pyproject.toml"


def test_import_contracts_hold() -> None:
    """``lint-imports`` with the contracts in pyproject.toml (the same command CI runs)."""
    pytest.importorskip("importlinter")
    assert PYPROJECT.is_file(), "run the tests from a source checkout"
    # in a subprocess: import-linter reconfigures logging in the process that runs it
    script = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(config_filename=sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", script, str(PYPROJECT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iteratively: the components with more than one module are import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_src_has_no_import_cycle() -> None:
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("deltatune")
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert _strongly_connected(edges) == []


def test_cycle_finder_finds_a_cycle() -> None:
    assert _strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# ---- no generic module names a method ----------------------------------------------------------------
GENERIC = [
    p for p in SRC.rglob("*.py") if "methods" not in p.relative_to(SRC).parts and p.name != "__init__.py"
] + [SRC / "cli" / "__init__.py", SRC / "train" / "__init__.py", SRC / "tasks" / "__init__.py"]


def _method_words() -> set[str]:
    words: set[str] = set()
    for name in deltatune.available_methods():
        spec = deltatune.get_method(name)
        words |= {
            spec.name,
            spec.peft_type,
            spec.display_name,
            spec.config_cls.__name__,
            spec.layer_cls.__name__,
        }
        if spec.tuner_cls is not None:
            words.add(spec.tuner_cls.__name__)
    return {w for w in words if w}


def _code_tokens(tree: ast.AST) -> list[tuple[int, str]]:
    """Identifiers and string constants (docstrings excluded: prose may give examples)."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    tokens: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            tokens.append((node.lineno, node.value))
        elif isinstance(node, ast.Name):
            tokens.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute):
            tokens.append((node.lineno, node.attr))
        elif isinstance(node, ast.alias):
            tokens.append((getattr(node, "lineno", 0), node.name))
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            tokens.append((node.lineno, node.name))
    return tokens


@pytest.mark.parametrize("path", sorted(GENERIC), ids=lambda p: str(p.relative_to(SRC)))
def test_generic_code_never_names_a_method(path: Path) -> None:
    words = _method_words()
    pattern = re.compile(r"(?<![A-Za-z0-9])(" + "|".join(map(re.escape, sorted(words))) + r")(?![a-z0-9])")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    hits = [(line, text) for line, text in _code_tokens(tree) if pattern.search(text)]
    assert not hits, f"{path.name} names a method in code: {hits[:5]}"


def test_the_method_check_can_fail() -> None:
    words = _method_words()
    pattern = re.compile(r"(?<![A-Za-z0-9])(" + "|".join(map(re.escape, sorted(words))) + r")(?![a-z0-9])")
    tree = ast.parse('if config.peft_type == "ADALORA":\n    use(LoraLayer)\n')
    assert [t for _, t in _code_tokens(tree) if pattern.search(t)] == ["ADALORA", "LoraLayer"]


def test_methods_are_discovered_not_listed() -> None:
    """The methods package imports its folder's modules; it names none of them."""
    text = (SRC / "methods" / "__init__.py").read_text(encoding="utf-8")
    assert "pkgutil" in text
    for name in deltatune.available_methods():
        assert f"import {name}" not in text and f".{name} import" not in text
    assert all(f"deltatune.methods.{n}" in sys.modules for n in ("lora", "loha", "lokr", "adalora"))


# ---- each method's modules are independent of the other methods' ---------------------------------------
def _method_of(module: str, names: list[str]) -> str | None:
    """The method a module of ``deltatune.methods`` belongs to: ``methods.<name>`` and its private
    ``methods._<name>_*`` modules; None for a shared helper (``_fused``, ``_lycoris``, ...)."""
    leaf = module.removeprefix("deltatune.methods.")
    for name in names:
        if leaf == name or leaf.startswith(f"_{name}_"):
            return name
    return None


def _cross_method_imports(edges: dict[str, set[str]], extends: dict[str, str | None]) -> list[str]:
    names = sorted(extends, key=len, reverse=True)  # "adalora" before "lora"
    found = []
    for importer, imported in sorted((a, b) for a, bs in edges.items() for b in bs):
        mine, theirs = _method_of(importer, names), _method_of(imported, names)
        if mine and theirs and mine != theirs and extends[mine] != theirs:
            found.append(f"{importer} -> {imported}")
    return found


def test_methods_import_no_other_method_unless_they_extend_it() -> None:
    """The independence contract, read from the registry (a new method needs no edit): a method's modules
    import another method's only when its spec says it ``extends`` that method (DoRA and AdaLoRA: LoRA)."""
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("deltatune")
    edges = {
        m: set(graph.find_modules_directly_imported_by(m))
        for m in graph.modules
        if m.startswith("deltatune.methods.")
    }
    extends = {n: deltatune.get_method(n).extends for n in deltatune.available_methods()}
    assert _cross_method_imports(edges, extends) == []


def test_the_independence_check_can_fail() -> None:
    edges = {"deltatune.methods._loha_layer": {"deltatune.methods._lokr_layer", "deltatune.methods._fused"}}
    extends = {"loha": None, "lokr": None, "lora": None, "adalora": "lora"}
    assert _cross_method_imports(edges, extends) == [
        "deltatune.methods._loha_layer -> deltatune.methods._lokr_layer"
    ]
    ok = {"deltatune.methods._adalora_model": {"deltatune.methods._lora_model"}}
    assert _cross_method_imports(ok, extends) == []
