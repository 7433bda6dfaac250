"""The layering of docs/architecture.md, read from the source: every import points down, none is circular,
only the application layer knows Hydra, and no module outgrows one sitting.

Layers, lowest first (a module may import its own package and any lower layer):
  0 core          robustbench_lab.core            torch, numpy, pandas, matplotlib; never Hydra/OmegaConf
  1 attacks       attacks                         the core
  2 defenses      defenses                        the core and attacks (adversarial training crafts attacks)
  2 analyses      robustbench_lab.linearization   the core and attacks
  3 application   robustbench_lab.app             everything below; the only layer that imports Hydra
  4 entry points  the package's top level: robustbench_lab (the API), robustbench_lab.api, robustbench_lab.cli
  5 studies       experiments, benchmarks, run.py
Imports inside functions count like any other (they are read from the whole syntax tree).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNITS = [  # (module prefix, layer); the longest matching prefix decides
    ("robustbench_lab.core", 0),
    ("attacks", 1),
    ("defenses", 2),
    ("robustbench_lab.linearization", 2),
    ("robustbench_lab.app", 3),
    ("robustbench_lab", 4),
    ("experiments", 5),
    ("benchmarks", 5),
    ("run", 5),
]
HYDRA = ("hydra", "omegaconf", "hydra_plugins")
MAX_LINES = 400
SOURCES = ["robustbench_lab", "attacks", "defenses", "experiments", "benchmarks"]


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {"run": ROOT / "run.py"}
    for top in SOURCES:
        for f in sorted((ROOT / top).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


MODULES = _modules()


def _where(module: str) -> str:
    p = MODULES[module]
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def unit_of(module: str) -> tuple[str, int] | None:
    best = None
    for prefix, layer in UNITS:
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, layer)
    return best


def imports_of(module: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import of ``module``, resolved to the most
    specific module of this project where it names one (``from pkg import mod`` -> ``pkg.mod``)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = module.split(".")
                    base = base[: len(base) - child.level + (1 if is_pkg else 0)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                for a in child.names:
                    sub = f"{target}.{a.name}"
                    found.append((sub if sub in MODULES else target, child.lineno, in_function))
            visit(child, inside)

    visit(tree, False)
    return found


def project_imports(module: str) -> list[tuple[str, int, bool]]:
    return [(t, line, fn) for t, line, fn in imports_of(module) if unit_of(t) is not None and
            (t in MODULES or any(m.startswith(t + ".") for m in MODULES))]


def test_the_layer_table_covers_every_module():
    assert len(MODULES) > 40
    assert [m for m in MODULES if unit_of(m) is None] == []


def test_imports_point_down():
    bad = []
    for module in MODULES:
        prefix, layer = unit_of(module)
        for target, line, _ in project_imports(module):
            t_prefix, t_layer = unit_of(target)
            if t_prefix == prefix:
                continue
            if t_layer >= layer:
                bad.append(f"{_where(module)}:{line} ({prefix}, layer {layer}) imports "
                           f"{target} ({t_prefix}, layer {t_layer})")
    assert bad == [], "upward or sideways imports:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = {m: sorted({t for t, _, _ in project_imports(m) if t in MODULES and t != m}) for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:   # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
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
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            strongconnect(v)
    assert cycles == [], f"import cycles: {cycles}"


# (importer, imported) pairs allowed inside a function: an
# optional heavy backend, loaded only when asked for; and the package's top level, which loads the API on
# first use so that importing the core never imports Hydra
LAZY = {("robustbench_lab.app.linearize", "robustbench_lab.linearization.jax_backend"),
        ("robustbench_lab", "robustbench_lab.api")}


def test_no_project_import_inside_a_function():
    """Lazy imports hid the cycles; with one-way layers no project import needs to wait."""
    bad = [f"{_where(m)}:{line} imports {t}" for m in MODULES
           for t, line, fn in project_imports(m) if fn and not any(m == a and t.startswith(b) for a, b in LAZY)]
    assert bad == [], "\n".join(bad)


@pytest.mark.parametrize("layer_prefixes", [("robustbench_lab.core", "attacks", "defenses",
                                              "robustbench_lab.linearization")])
def test_only_the_application_knows_hydra(layer_prefixes):
    bad = []
    for module in MODULES:
        if not module.startswith(layer_prefixes):
            continue
        for target, line, _ in imports_of(module):
            if target.split(".")[0] in HYDRA:
                bad.append(f"{_where(module)}:{line} imports {target}")
    assert bad == [], "\n".join(bad)


def test_modules_fit_one_sitting():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"modules over {MAX_LINES} lines: {long}"


def test_the_checker_sees_a_planted_violation(tmp_path, monkeypatch):
    """The checks above must be able to fail: a core module importing the application is caught."""
    fake = tmp_path / "fake_core.py"
    fake.write_text("from robustbench_lab.app import builders\n\ndef f():\n    import attacks.pgd\n")
    monkeypatch.setitem(MODULES, "robustbench_lab.core.fake_core", fake)
    found = project_imports("robustbench_lab.core.fake_core")
    assert ("robustbench_lab.app.builders", 1, False) in found
    assert ("attacks.pgd", 4, True) in found
    with pytest.raises(AssertionError, match="upward"):
        test_imports_point_down()
