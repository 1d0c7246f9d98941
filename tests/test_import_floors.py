"""The floors of docs/architecture.md, checked on the source: every module imports only modules on
its own floor or below (imports inside functions included), and no sam_peft modules import each
other in a circle."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sam_peft"

# Lowest first. A module of a package (methods/, report/) is on its package's floor.
FLOORS = {
    "bottom": ["sam_peft", "config", "params", "selection", "scoring", "optim", "io", "errors", "locks"],
    "tasks": ["tasks", "data", "metrics", "device", "prepare", "identity"],
    "model": ["model", "arch"],
    "methods": ["methods", "loader"],
    "engine": ["engine", "checkpoint", "delta", "lib", "hf", "telemetry"],
    "run directory": ["rundir"],
    "run": ["run", "export"],
    "sweep": ["sweep", "sweep_expand", "executors"],
    "report": ["report", "cli"],
}
LEVEL = {("sam_peft" if name == "sam_peft" else f"sam_peft.{name}"): level
         for level, names in enumerate(FLOORS.values()) for name in names}
FLOOR_NAMES = list(FLOORS)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(dotted: str) -> bool:
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(path: Path) -> set[str]:
    """The sam_peft modules a file imports, anywhere in it (functions, TYPE_CHECKING blocks)."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name.split(".")[0] == "sam_peft")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "sam_peft":
                continue
            for alias in node.names:  # `from sam_peft import delta` imports the module sam_peft.delta
                sub = f"{base}.{alias.name}"
                out.add(sub if is_module(sub) else base)
    out.discard(here)
    return out


def floor_of(module: str) -> int:
    for name in (module, *[module.rsplit(".", n)[0] for n in range(1, module.count(".") + 1)]):
        if name in LEVEL and (name == module or name != "sam_peft"):
            return LEVEL[name]
    raise KeyError(module)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
IMPORTS = {m: imported_modules(p) for m, p in MODULES.items()}


def test_every_module_has_a_floor():
    missing = [m for m in MODULES if _floor_or_none(m) is None]
    assert not missing, f"add these modules to FLOORS (and to docs/architecture.md): {missing}"


def _floor_or_none(module: str):
    try:
        return floor_of(module)
    except KeyError:
        return None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_stay_on_their_floor_or_below(module):
    mine = floor_of(module)
    above = sorted(f"{m} ({FLOOR_NAMES[floor_of(m)]})" for m in IMPORTS[module] if floor_of(m) > mine)
    assert not above, f"{module} ({FLOOR_NAMES[mine]}) imports from higher floors: {', '.join(above)}"


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert import_cycles(IMPORTS) == []


def test_the_checker_sees_function_level_imports_and_cycles():
    assert "sam_peft.run" in IMPORTS["sam_peft.executors"]  # imported inside a function there
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_test_module_imports_another():
    """Shared test code lives in util.py, conftest.py and the helper modules, never in a test_*.py."""
    tests = Path(__file__).resolve().parent
    names = {p.stem for p in tests.glob("test_*.py")}
    offenders = {}
    for path in sorted(tests.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            found = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            hits = [n for n in found if n.split(".")[-1] in names or n.startswith("tests.")]
            if hits:
                offenders.setdefault(path.name, []).extend(hits)
    assert not offenders, offenders
