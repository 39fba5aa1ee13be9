"""The package's layout rules, checked on the source (imports inside functions included):
no import cycle among chimera_ray modules (an import through a package counts as an edge to its
``__init__``), Ray only in ``chimera_ray.pipelines``, and the lower floors (leaves, the toy world,
lora, families, data, models, plan) import nothing above them. A floor finds what is built above
it (the toy models and datasets) in a registry that the higher floor fills (``chimera_ray.builtins``)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "chimera_ray"

LEAVES = {"chimera_ray.config", "chimera_ray.io", "chimera_ray.cache", "chimera_ray.sampling", "chimera_ray.lease",
          "chimera_ray.storage"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(path: Path, known: set[str]) -> list[tuple[str, int]]:
    """Every import in the file (any depth), as (imported module, line). ``from pkg import sub``
    is an import of ``pkg`` (its ``__init__`` runs, or is found half-run) and of ``pkg.sub``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, node.lineno))
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if sub in known:
                    out.append((sub, node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for target, _ in _imports(path, known):
            if target in known and target != m:
                graph[m].add(target)
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for n in graph[todo.pop()] - seen:
            seen.add(n)
            todo.append(n)
    return seen


def test_the_checker_finds_a_cycle_and_a_clean_graph():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_checker_sees_an_import_through_a_package(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from chimera_ray.pipelines import watchdog\nimport chimera_ray.pipelines.faults\n")
    known = {"chimera_ray.pipelines", "chimera_ray.pipelines.watchdog", "chimera_ray.pipelines.faults"}
    assert sorted(_imports(f, known)) == [("chimera_ray.pipelines", 1), ("chimera_ray.pipelines.faults", 2),
                                          ("chimera_ray.pipelines.watchdog", 1)]
    # pipelines/__init__ -> common -> (through the package) pipelines: a cycle.
    graph = {"p": {"p.common"}, "p.common": {"p", "p.watchdog"}, "p.watchdog": set()}
    assert _find_cycle(graph) == ["p", "p.common", "p"]


def test_no_import_cycle_among_modules():
    # Every edge counts, a package's __init__ -> its own modules included: importing a module
    # runs its package's __init__ first, which is no edge here; only an import that names the
    # package (``from pkg import x``) is one.
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_back_through_a_package_that_imports_it():
    # ``from chimera_ray.pipelines import watchdog`` in a module that pipelines/__init__ imports
    # runs while that __init__ is half done: it works only while the name asked for is a module
    # (or already bound). Import the module itself (``import chimera_ray.pipelines.watchdog``).
    mods = _modules()
    graph = _graph()
    bad = [f"{mods[m].relative_to(ROOT)}:{line}: {m} imports {pkg}, whose __init__ imports {m}"
           for pkg, path in mods.items() if path.name == "__init__.py"
           for m in sorted(_reachable(graph, pkg)) if m.startswith(pkg + ".")
           for target, line in _imports(mods[m], set(mods)) if target == pkg]
    assert not bad, "imports back through a package:\n" + "\n".join(bad)


def test_ray_is_imported_only_in_pipelines():
    mods = _modules()
    offenders = [f"{p.relative_to(ROOT)}:{line}" for m, p in mods.items() if not m.startswith("chimera_ray.pipelines")
                 for target, line in _imports(p, set(mods)) if target == "ray" or target.startswith("ray.")]
    assert not offenders, f"ray imported outside chimera_ray.pipelines: {offenders}"


# No floor lists a higher one: what a floor finds above it (the toy models and datasets) is
# registered by the higher floor (``chimera_ray.builtins``), and a run's pre-flight, which needs
# data, plan and models, is ``chimera_ray.preflight`` above all three.
@pytest.mark.parametrize("prefix, allowed", [
    ("leaves", LEAVES),
    ("chimera_ray.toy", LEAVES | {"chimera_ray.toy"}),
    ("chimera_ray.lora", LEAVES | {"chimera_ray.lora"}),
    ("chimera_ray.families", LEAVES | {"chimera_ray.families", "chimera_ray.lora"}),
    ("chimera_ray.data", LEAVES | {"chimera_ray.data"}),
    ("chimera_ray.models", LEAVES | {"chimera_ray.models", "chimera_ray.families", "chimera_ray.lora"}),
    ("chimera_ray.plan", LEAVES | {"chimera_ray.plan", "chimera_ray.data"}),
])
def test_lower_layers_import_nothing_above_them(prefix, allowed):
    graph = _graph()
    own = LEAVES if prefix == "leaves" else {m for m in graph if m == prefix or m.startswith(prefix + ".")}
    bad = [(m, n) for m in own for n in graph[m]
           if n != "chimera_ray" and not any(n == a or n.startswith(a + ".") for a in allowed)]
    assert not bad, f"{prefix} imports above itself: {sorted(bad)}"
