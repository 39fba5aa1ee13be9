"""The package's layout rules, checked on the source (imports inside functions included):
no import cycle among chimera_ray modules, Ray only in ``chimera_ray.pipelines``, leaves and
the toy world import nothing above them."""

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
    """Every import in the file (any depth), as (imported module, line)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.append((sub if sub in known else node.module, node.lineno))
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


def test_the_checker_finds_a_cycle_and_a_clean_graph():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_among_modules():
    # A package's __init__ re-exports its own modules; importing a module also runs its
    # package's __init__, so only the __init__ -> own-module edges are left out.
    graph = {m: {n for n in deps if not n.startswith(m + ".")} for m, deps in _graph().items()}
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_ray_is_imported_only_in_pipelines():
    mods = _modules()
    offenders = [f"{p.relative_to(ROOT)}:{line}" for m, p in mods.items() if not m.startswith("chimera_ray.pipelines")
                 for target, line in _imports(p, set(mods)) if target == "ray" or target.startswith("ray.")]
    assert not offenders, f"ray imported outside chimera_ray.pipelines: {offenders}"


@pytest.mark.parametrize("prefix, allowed", [
    ("leaves", LEAVES),
    ("chimera_ray.toy", LEAVES | {"chimera_ray.toy"}),
    ("chimera_ray.lora", LEAVES | {"chimera_ray.lora"}),
    ("chimera_ray.families", LEAVES | {"chimera_ray.families", "chimera_ray.lora"}),
    ("chimera_ray.data", LEAVES | {"chimera_ray.data", "chimera_ray.toy", "chimera_ray.plan", "chimera_ray.models"}),
])
def test_lower_layers_import_nothing_above_them(prefix, allowed):
    graph = _graph()
    own = LEAVES if prefix == "leaves" else {m for m in graph if m == prefix or m.startswith(prefix + ".")}
    bad = [(m, n) for m in own for n in graph[m]
           if n != "chimera_ray" and not any(n == a or n.startswith(a + ".") for a in allowed)]
    assert not bad, f"{prefix} imports above itself: {sorted(bad)}"
