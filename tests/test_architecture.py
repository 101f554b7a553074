"""The rooms' arrows (docs/architecture.md): no import circle among rapm's modules, and no core module imports the demo.

Every import counts, the ones inside functions too: a deferred import is still an arrow between two rooms.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "rapm"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The rapm modules that ``path`` imports (``from rapm.x import y`` counts rapm.x.y when that is a module)."""
    out = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        out.update(n for n in names if n in modules)
    return out - {module_name(path)}


def graph() -> dict[str, set[str]]:
    files = [p for p in ROOT.rglob("*.py")]
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) for p in files}


BUILTIN_TEACHERS = ("rapm.demo", "rapm.scenes")  # the built-in teachers' plug-ins: the core imports none of them


def is_demo(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in BUILTIN_TEACHERS)


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_among_rapm_modules():
    g = graph()
    # a package's __init__ re-exporting its submodules is not a circle of ideas
    g = {m: {d for d in deps if not (m.startswith(d + ".") and d != "rapm")} for m, deps in g.items()}
    assert cycles(g) == []


def test_no_core_module_imports_the_demo():
    offenders = {m: sorted(d for d in deps if is_demo(d)) for m, deps in graph().items() if not is_demo(m)}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_architecture_page_names_every_module():
    page = (ROOT.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    unnamed = sorted(m.removeprefix("rapm.") for m in graph() if m != "rapm" and f"`{m.removeprefix('rapm.')}`" not in page)
    assert unnamed == [], f"docs/architecture.md names no room for {unnamed}"


def _strings(node) -> list[str]:
    """The string constants of a literal: itself, or the items of a tuple, list or set."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for e in node.elts for s in _strings(e)]
    return []


def names_tested(path: Path, names: set[str], root: Path = ROOT.parent) -> list[str]:
    """``file:line name`` wherever ``path`` compares a value with one of ``names`` (==, !=, in, not in; either side)
    or keys a dict literal by one."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Compare):
            hits = [s for part in [node.left, *node.comparators] for s in _strings(part) if s in names]
        elif isinstance(node, ast.Dict):
            hits = [s for k in node.keys if k is not None for s in _strings(k) if s in names]
        else:
            continue
        found += [f"{path.relative_to(root)}:{node.lineno} {s!r}" for s in hits]
    return found


def test_no_family_name_is_tested_outside_the_families():
    from rapm.families import FAMILIES

    names = {f.name for f in FAMILIES}
    outside = [p for p in sorted(ROOT.rglob("*.py")) if "families" not in p.relative_to(ROOT).parts]
    assert [hit for p in outside for hit in names_tested(p, names)] == []


def test_the_family_check_finds_a_family_name_compared(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('def f(x):\n    return x == "sdxl" or x in ("flux",) or {"sd3": 1} or x == "sdx"\n', encoding="utf-8")
    assert names_tested(probe, {"sd", "sdxl", "sd3", "flux"}, tmp_path) == ["probe.py:2 'sdxl'", "probe.py:2 'flux'",
                                                                            "probe.py:2 'sd3'"]


def prefixes_tested(path: Path, names: set[str], root: Path = ROOT.parent, ignore: tuple[str, ...] = ()) -> list[str]:
    """``file:line prefix`` wherever ``path`` calls ``startswith`` with a prefix of one of ``names`` (but ``ignore``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "startswith":
            found += [f"{path.relative_to(root)}:{node.lineno} {s!r}" for a in node.args for s in _strings(a)
                      if s not in ignore and any(n.startswith(s) for n in names)]
    return found


def test_no_method_name_is_tested_outside_the_methods():
    """The methods' names live in rapm/methods/ (REGISTRY); the loop, the CLI, the export and the report read the
    method classes' attributes. (The CLI's help lists the names from METHODS.)"""
    from rapm.methods import METHODS

    names = set(METHODS) - {"rapm"}  # the package's name too: its metadata key, the prefix of its module names
    outside = [p for p in sorted(ROOT.rglob("*.py")) if "methods" not in p.relative_to(ROOT).parts]
    assert [hit for p in outside for hit in names_tested(p, names) + prefixes_tested(p, names, ignore=("rapm",))] == []


def test_the_method_check_finds_a_method_name_compared(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('def f(m):\n    return m != "progressive-rdd" or m.startswith("progressive") or m == "pcmx"\n',
                     encoding="utf-8")
    names = {"progressive", "progressive-rdd", "pcm"}
    assert names_tested(probe, names, tmp_path) + prefixes_tested(probe, names, tmp_path) == [
        "probe.py:2 'progressive-rdd'", "probe.py:2 'progressive'"]


def test_the_families_import_their_base_not_their_package():
    """rapm.families lists the families, so a family module imports rapm.families.base, never the package."""
    g = graph()
    inside = [m for m in g if m.startswith("rapm.families.")]
    assert inside and [(m, "rapm.families") for m in inside if "rapm.families" in g[m]] == []
