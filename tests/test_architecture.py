"""The import rule of ``docs/architecture.md``, checked on the syntax tree of every module.

The layer table is read from the fenced ``layers`` block of that page, so the page and this
check cannot drift. Every import counts, function-local and ``TYPE_CHECKING`` ones included:
a dependency hidden in a function is still a dependency. Each failure names the importing
module, its line and the import that breaks the rule.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the package its modules are installed under
SOURCES = {"python/trilora": "trilora", "kernels": "trilora.kernels", "bench": "trilora.bench"}


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, package in SOURCES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join([package, *parts])] = path
    return mods


MODULES = _modules()


def _layers() -> tuple[list[list[str]], set[tuple[str, str]], set[str]]:
    text = (ROOT / "docs/architecture.md").read_text()
    found = re.search(r"```layers\n(.*?)```", text, re.S)
    assert found, "docs/architecture.md has no ```layers block"
    layers, allowed, kernel_callers = [], set(), set()
    for raw in found.group(1).splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, _, value = line.partition(":")
        if key == "layer":
            layers.append(value.split())
        elif key == "allow":
            a, _, b = value.partition("->")
            allowed.add((a.strip(), b.strip()))
        elif key == "kernel-callers":
            kernel_callers = set(value.split())
        else:
            raise AssertionError(f"docs/architecture.md layers block: cannot read {raw!r}")
    return layers, allowed, kernel_callers


LAYERS, ALLOWED, KERNEL_CALLERS = _layers()
GROUPS = {g: len(LAYERS) - i for i, line in enumerate(LAYERS) for g in line}


def group_of(module: str) -> str | None:
    """The layer-table group of a trilora module: its longest listed prefix (``trilora``
    itself is the root package only)."""
    if module == "trilora":
        return "trilora" if "trilora" in GROUPS else None
    parts = module.split(".")[1:]
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in GROUPS:
            return name
    return None


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _known(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> list[tuple[int, str, str, str]]:
    """``(line, imported trilora module, what the source says, imported name)`` for every
    import of a trilora module in ``module``; external imports come back with their full
    dotted name as the imported module and ``""`` as the name."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append((node.lineno, alias.name, f"import {alias.name}", ""))
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, path.name == "__init__.py", node)
            text = f"from {'.' * node.level}{node.module or ''} import "
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                # the package itself runs first (an edge too), then the submodule if any
                out.append((node.lineno, base, text + alias.name, alias.name))
                if sub in MODULES:
                    out.append((node.lineno, sub, text + alias.name, ""))
    return out


def _edges() -> dict[str, list[tuple[int, str, str, str]]]:
    edges = {}
    for module in MODULES:
        edges[module] = []
        for line, target, text, name in imports_of(module):
            if not target.startswith("trilora"):
                edges[module].append((line, target, text, name))
                continue
            known = _known(target)
            if known and known != module:
                edges[module].append((line, known, text, name))
    return edges


EDGES = _edges()


def _where(module: str, line: int, text: str) -> str:
    return f"{MODULES[module].relative_to(ROOT)}:{line} ({module}): `{text}`"


def test_every_module_has_a_layer():
    missing = [m for m in MODULES if group_of(m) is None]
    assert not missing, f"modules in no layer of docs/architecture.md: {missing}"


def test_no_upward_import():
    bad = []
    for module, edges in EDGES.items():
        mine = group_of(module)
        for line, target, text, _ in edges:
            theirs = group_of(target) if target.startswith("trilora") else None
            if theirs is None or theirs == mine or (mine, theirs) in ALLOWED:
                continue
            if target == "trilora" and module != "trilora":
                continue  # the root package runs first anyway; a facade name is caught below
            if GROUPS[theirs] >= GROUPS[mine]:
                where = "the same layer" if GROUPS[theirs] == GROUPS[mine] else "a higher layer"
                bad.append(f"{_where(module, line, text)}: {mine} imports {theirs}, {where}")
    assert not bad, "imports against the layers of docs/architecture.md:\n" + "\n".join(bad)


def test_no_name_from_the_lazy_facade():
    """``import trilora`` then ``trilora.get_peft_model`` hides which module is used."""
    bad = []
    for module, edges in EDGES.items():
        for line, target, text, name in edges:
            if target != "trilora" or module == "trilora":
                continue
            if text.startswith("import ") or (
                name and f"trilora.{name}" not in MODULES and name != "__version__"
            ):
                bad.append(f"{_where(module, line, text)}: import the module that defines it")
    assert not bad, "uses of the lazy `trilora` facade inside trilora:\n" + "\n".join(bad)


def test_no_private_name_across_modules():
    bad = []
    for module, edges in EDGES.items():
        for line, target, text, name in edges:
            if not target.startswith("trilora") or target == module:
                continue
            if name.startswith("_") and not name.startswith("__"):
                bad.append(f"{_where(module, line, text)}: {name} is private to {target}")
    assert not bad, "private names imported from another module:\n" + "\n".join(bad)


def test_kernel_files_import_only_kernels_torch_and_triton():
    bad = []
    for module, edges in EDGES.items():
        if group_of(module) != "kernels":
            continue
        for line, target, text, _ in edges:
            if target.startswith("trilora") and group_of(target) not in ("kernels", "_source_tree"):
                bad.append(f"{_where(module, line, text)}: a kernel file imports trilora code")
            if target == "torch.nn" or target.startswith("torch.nn."):
                bad.append(f"{_where(module, line, text)}: a kernel file imports torch.nn")
    assert not bad, "\n".join(bad)


def test_only_ops_and_tools_launch_kernels():
    """Modules (nn, patches), optimizers and the trainer call ``trilora.ops``, never a kernel."""
    bad = []
    for module, edges in EDGES.items():
        mine = group_of(module)
        if mine in KERNEL_CALLERS or mine == "kernels":
            continue
        for line, target, text, _ in edges:
            if target.startswith("trilora") and group_of(target) == "kernels":
                bad.append(
                    f"{_where(module, line, text)}: only {sorted(KERNEL_CALLERS)} "
                    "import trilora.kernels"
                )
    assert not bad, "\n".join(bad)


def _cycles() -> list[list[str]]:
    graph = {m: {t for _, t, _, _ in EDGES[m] if t in MODULES} for m in MODULES}
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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

    for v in MODULES:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    bad = []
    for component in _cycles():
        inside = set(component)
        lines = [
            _where(m, line, text) for m in component for line, t, text, _ in EDGES[m] if t in inside
        ]
        bad.append(f"cycle {component}:\n  " + "\n  ".join(lines))
    assert not bad, "import cycles (function-local imports count):\n" + "\n".join(bad)


@pytest.mark.parametrize("folder", ["python", "kernels", "bench", "tests", "docs", "setup.py"])
def test_no_fmt_skip(folder):
    """The formatter formats: no skip markers (one ``# fmt: off`` block per table is fine)."""
    paths = [ROOT / folder] if folder.endswith(".py") else (ROOT / folder).rglob("*.py")
    marker = "# fmt: " + "skip"
    bad = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in paths
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if marker in line
    ]
    assert not bad, f"{marker} lines: {bad[:20]} ({len(bad)} in all)"


def _requirement_name(req: str) -> str:
    return re.split(r"[<>=!~ \[;]", req, maxsplit=1)[0].lower().replace("_", "-")


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {_requirement_name(r) for r in project["dependencies"]}
    extras = {
        extra: {_requirement_name(r) for r in reqs}
        for extra, reqs in project["optional-dependencies"].items()
    }
    return base, extras


def _module_level_imports(tree: ast.Module) -> set[int]:
    """Line numbers of the imports that run when the module is imported, unguarded: in the
    module body or under a module-level ``if`` (not ``TYPE_CHECKING``); one inside a ``try``
    that catches ImportError, a function or a class body runs only on demand or is guarded."""
    lines: set[int] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                lines.add(node.lineno)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                visit(node.body)
                visit(node.orelse)

    visit(tree.body)
    return lines


def test_every_third_party_import_is_a_declared_dependency():
    """What a clean ``pip install trilora`` brings is enough: every package the installed
    modules import when they are imported belongs to a dependency ``pyproject.toml``
    declares, and every package imported on demand (in a function, behind ``try``) belongs
    to a dependency or to one of its extras. The distribution is looked up in this
    environment (``importlib.metadata.packages_distributions``), so a package reached only
    through another package's dependencies (say ``huggingface_hub`` through transformers)
    is caught: a release of that package may drop it."""
    import sys
    from importlib.metadata import packages_distributions

    base, extras = _declared()
    optional = set().union(*extras.values())
    providers = {
        k: {d.lower().replace("_", "-") for d in v} for k, v in packages_distributions().items()
    }
    bad = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        eager = _module_level_imports(tree)
        # the bench ships in the wheel but runs only with the bench extra (trilora bench checks)
        allowed_eager = base | extras["bench"] if module.startswith("trilora.bench") else base
        for line, target, text, _ in imports_of(module):
            top = target.split(".")[0]
            if not top or top == "trilora" or top in sys.stdlib_module_names:
                continue
            dists = providers.get(top)
            if not dists:
                continue  # not installed here: test_missing_extras covers the message
            allowed = allowed_eager if line in eager else base | optional
            if not dists & allowed:
                kind = "at import" if line in eager else "on demand"
                bad.append(
                    f"{_where(module, line, text)}: imports {top} {kind}, from "
                    f"{sorted(dists)}, which pyproject.toml does not declare there"
                )
    assert not bad, "imports of undeclared packages:\n" + "\n".join(bad)
