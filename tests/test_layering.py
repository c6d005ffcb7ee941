"""The package layering of `fspo`: imports only point down, and no module imports itself back.

Every ``import`` / ``from ... import`` in the source is read with `ast`, including the lazy ones
inside functions (a lazy import still ties the two modules together; it only hides the circle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import fspo

ROOT = Path(fspo.__file__).parent

# Lowest first. A package may import itself and the packages before it, never one after it.
# ``app`` is the face: the top-level modules (cli.py, paper.py) and the quickstart package, which wire the
# stages together.
# ``testing`` (fspo/testing/: the toy world, tiny models, stub servers) is last, so nothing shipped uses it.
LAYERS = (
    "core",
    "data",
    "llm",
    "sim",
    "synth",
    "models",
    "infer",
    "train",
    "eval",
    "serve",
    "app",
    "testing",
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The fspo modules that `name` imports (a ``from pkg import sub`` counts as importing ``pkg.sub``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "fspo")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] != "fspo":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    return {m for m in out if m in known and m != name}


# Packages of the face: `fspo.quickstart` (profile, pipeline, report, study) sits with cli.py and paper.py.
APP_PACKAGES = ("quickstart",)


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] not in LAYERS:
        return "app"
    return parts[1]


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def test_every_subpackage_has_a_layer():
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    known = set(LAYERS) | set(APP_PACKAGES)
    assert packages <= known, f"packages without a layer in LAYERS: {sorted(packages - known)}"


def test_imports_only_point_down():
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    upward = [
        f"{src} ({_layer(src)}) imports {dst} ({_layer(dst)})"
        for src, deps in _graph().items()
        for dst in deps
        if rank[_layer(dst)] > rank[_layer(src)] and not (_layer(src) == "app" and _layer(dst) == "app")
    ]
    assert not upward, "imports that point up:\n" + "\n".join(sorted(upward))


def test_infer_and_serve_never_import_train_or_eval():
    bad = [
        f"{src} imports {dst}"
        for src, deps in _graph().items()
        if _layer(src) in ("infer", "serve")
        for dst in deps
        if _layer(dst) in ("train", "eval")
    ]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = _graph()
    # A package's __init__ re-exports its modules, and its modules import siblings by full name
    # (``fspo.sim.base``), which Python resolves through the package: ignore module -> own parents.
    edges = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
